"""Small time-conditioned conv nets for images (C, H, W): a U-Net f(x, t, cond) and what is built from it.

* ``UNet`` — DDPM-style (Ho et al.): a 3×3 conv stem; per resolution level ``blocks_per_level`` residual
  blocks [GroupNorm → act → conv3×3 → GroupNorm, + Linear(time emb.), act → conv3×3] with a 1×1 skip
  when the width changes; a stride-2 conv between levels going down, nearest ×2 upsample + conv3×3 going up;
  the down path's output at each level is concatenated on channels into the up path's first block of that
  level; a middle block at the lowest resolution; GroupNorm → act → conv3×3 out. Level i has width
  ``channels · channel_mults[i]``; there are len(channel_mults) − 1 halvings, so H and W must be divisible by
  2^(len(channel_mults) − 1) (any size otherwise; no power-of-two rule).
* ``UNetEnergy`` — E(x, t) = ½‖x − f(x, t)‖² (paper 001's energy parametrisation).
* ``UNetGenerator`` — G(x_t, z, t) → x_0: the latent z enters through the U-Net's ``cond`` input.
* ``ConvEncoder`` — q(z | x_{t−1}, x_t, t): the U-Net's down path on the two images stacked on channels,
  global average pool, Linear → (mean, log_var).

Time conditioning: emb(t · time_scale) (+ Linear(cond) when conditioned) → Linear → act → Linear → act,
then each block adds its own Linear of that, per channel, to its normalised first-conv output.
GroupNorm groups: the largest divisor of the width that is ≤ 8 (8 for the usual widths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ebm_scale.diffusion.embeddings import EMBEDDINGS, batch_times
from ebm_scale.errors import require
from ebm_scale.nets.mlp import ACTIVATIONS
from ebm_scale.nets.time_mlp import even_embed_dim
from ebm_scale.schema import Config, Rule, knob


@dataclass
class UNetConfig(Config):
    channels: int = knob(32, ge=1)
    # one level each (width = channels · mult); H, W divisible by 2^(len−1)
    channel_mults: tuple[int, ...] = knob((1, 2), ge=1, nonempty=True)  # and integers: rules()
    blocks_per_level: int = knob(1, ge=1)
    embed_dim: int = knob(64, ge=2, note="half sines, half cosines")  # and even: rules()
    activation: str = knob("swish", choices=ACTIVATIONS, noun="activation")
    # sinusoidal (integer steps) | fourier (t ∈ [0, 1])
    embedding: str = knob("sinusoidal", choices=EMBEDDINGS, noun="time embedding")
    # t is multiplied by this before embedding (t ∈ [0, 1] with sinusoidal: ~1000)
    time_scale: float = knob(1.0, gt=0)

    def rules(self):
        mults = list(self.channel_mults)  # OmegaConf hands tuples back as lists
        yield Rule(
            "channel_mults",
            all(isinstance(m, int) for m in mults),
            f"must be a non-empty list of integers >= 1, got {mults}",
        )
        yield even_embed_dim(self.embed_dim)

    def check_shape(self, shape: tuple[int, ...], prefix: str) -> None:
        """The data-dependent rules (the data's shape is known only next to the config, not inside it)."""
        require(
            len(shape) == 3 and min(shape) >= 1,
            f"{prefix}.arch",
            f"unet needs images (C, H, W), got shape {tuple(shape)}; use the mlp arch for flat data",
        )
        factor = 2 ** (len(self.channel_mults) - 1)
        require(
            shape[1] % factor == 0 and shape[2] % factor == 0,
            f"{prefix}.channel_mults",
            f"{len(self.channel_mults)} levels halve H and W {len(self.channel_mults) - 1} times, so both must "
            f"be divisible by {factor}; got {shape[1]}x{shape[2]}",
        )


def _groups(width: int) -> int:
    """GroupNorm groups: the largest divisor of `width` that is at most 8 (8 for the usual widths)."""
    return max(g for g in range(1, 9) if width % g == 0)


def _conv3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)


class TimeConditioning(nn.Module):
    """(t, cond) → (n, embed_dim) features that every block reads. `cond` (e.g. the latent z) is added to the
    time embedding before the MLP, so the blocks see t and z jointly, not just their sum."""

    def __init__(self, cfg: UNetConfig, cond_dim: int = 0):
        super().__init__()
        dim = cfg.embed_dim
        self.embed = EMBEDDINGS[cfg.embedding](dim)
        self.cond = nn.Linear(cond_dim, dim) if cond_dim > 0 else None
        act = ACTIVATIONS[cfg.activation]
        # Ends in act, so each block's Linear of it is DDPM's temb_proj(act(temb)) without recomputing the act.
        self.mlp = nn.Sequential(nn.Linear(dim, dim), act(), nn.Linear(dim, dim), act())
        self.time_scale, self.cond_dim = cfg.time_scale, cond_dim

    def forward(self, t: torch.Tensor | float, n: int, cond: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        emb = self.embed(batch_times(t, n).to(dtype) * self.time_scale)
        if self.cond is not None:
            if cond is None:
                raise ValueError(f"this net is conditioned on a ({n}, {self.cond_dim}) input; got cond=None")
            emb = emb + self.cond(cond.flatten(1))
        elif cond is not None and cond.flatten(1).shape[1] > 0:
            raise ValueError(f"this net takes no cond input, got one of shape {tuple(cond.shape)}")
        return self.mlp(emb)


class TimeResBlock(nn.Module):
    """skip(x) + conv(act(norm(conv(act(norm(x)))) + Linear(temb))), skip a 1×1 conv when the width changes.

    Why the time shift goes AFTER the second GroupNorm, not before it as in DDPM: a per-channel constant
    added before a norm whose groups hold one channel each (8 channels → 8 groups) is subtracted right back
    out, and the block would ignore t (and z). After the norm it survives for any group count (improved
    DDPM's scale-shift norm, shift only)."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int, activation: str):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_in), c_in), _conv3(c_in, c_out)
        self.time = nn.Linear(embed_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(c_out), c_out), _conv3(c_out, c_out)
        self.act1, self.act2 = ACTIVATIONS[activation](), ACTIVATIONS[activation]()  # PReLU: own slope each
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.norm2(self.conv1(self.act1(self.norm1(x)))) + self.time(temb)[:, :, None, None]
        return self.skip(x) + self.conv2(self.act2(h))


class UNet(nn.Module):
    """f(x, t, cond=None): (n, in_channels, H, W), (n,) or 0-d t, (n, cond_dim) → (n, out_channels, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig | None = None, cond_dim: int = 0):
        super().__init__()
        cfg = cfg or UNetConfig()
        widths = [cfg.channels * m for m in cfg.channel_mults]
        self.time = TimeConditioning(cfg, cond_dim)
        self.stem = _conv3(in_channels, widths[0])

        def blocks(c_in: int, c_out: int) -> nn.ModuleList:
            return nn.ModuleList(
                TimeResBlock(c_in if i == 0 else c_out, c_out, cfg.embed_dim, cfg.activation)
                for i in range(cfg.blocks_per_level)
            )

        self.down, self.downsample, w_in = nn.ModuleList(), nn.ModuleList(), widths[0]
        for i, w in enumerate(widths):
            self.down.append(blocks(w_in, w))
            if i < len(widths) - 1:
                self.downsample.append(_conv3(w, w, stride=2))  # halves H and W (DDPM's learned downsampling)
            w_in = w
        self.middle = TimeResBlock(w_in, w_in, cfg.embed_dim, cfg.activation)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(widths))):  # built deepest level first, the order forward runs them in
            self.up.append(blocks(w_in + widths[i], widths[i]))  # + the skip from the same level, concatenated
            if i > 0:
                self.upsample.append(_conv3(widths[i], widths[i]))  # after a nearest ×2 (no checkerboard artefacts)
            w_in = widths[i]
        self.out = nn.Sequential(
            nn.GroupNorm(_groups(w_in), w_in), ACTIVATIONS[cfg.activation](), _conv3(w_in, out_channels)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.time(t, len(x), cond)
        h, skips = self.stem(x), []
        for level, level_blocks in enumerate(self.down):
            for block in level_blocks:
                h = block(h, temb)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self.middle(h, temb)
        for level, level_blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in level_blocks:
                h = block(h, temb)
            if level < len(self.upsample):
                h = self.upsample[level](nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)


class UNetEnergy(nn.Module):
    """E(x, t) = ½‖x − f(x, t)‖², summed over all non-batch dims: (n, C, H, W), (n,) t → (n,).

    Sign: paper 001 writes the NEGATIVE energy −½‖x − f(x, t)‖² with density ∝ exp(E); this codebase uses
    density ∝ exp(−E), so E here is +½‖x − f(x, t)‖² (≥ 0)."""

    def __init__(self, shape: tuple[int, int, int], cfg: UNetConfig | None = None):
        super().__init__()
        self.f = UNet(shape[0], shape[0], cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return 0.5 * (x - self.f(x, t)).square().flatten(1).sum(1)


class UNetGenerator(nn.Module):
    """G(x_t, z, t) → prediction of x_0, shaped like x_t. z: (n, z_dim); z_dim = 0 is an unconditional net
    (z may then be None or an empty (n, 0) tensor)."""

    def __init__(self, shape: tuple[int, int, int], z_dim: int, cfg: UNetConfig | None = None):
        super().__init__()
        if z_dim < 0:
            raise ValueError(f"z_dim must be >= 0, got {z_dim}")
        self.unet = UNet(shape[0], shape[0], cfg, cond_dim=z_dim)
        self.z_dim = z_dim

    def forward(self, x_t: torch.Tensor, z: torch.Tensor | None, t: torch.Tensor | float) -> torch.Tensor:
        return self.unet(x_t, t, cond=z if self.z_dim > 0 else None)


class ConvEncoder(nn.Module):
    """q(z | x_{t−1}, x_t, t): two (n, C, H, W) images and (n,) t → (mean, log_var), each (n, z_dim)."""

    def __init__(self, shape: tuple[int, int, int], z_dim: int, cfg: UNetConfig | None = None):
        super().__init__()
        cfg = cfg or UNetConfig()
        if z_dim < 1:  # nothing to encode; the builder hands back a parameter-free stand-in instead
            raise ValueError(f"z_dim must be >= 1, got {z_dim}")
        widths = [cfg.channels * m for m in cfg.channel_mults]
        self.time = TimeConditioning(cfg)
        self.stem = _conv3(2 * shape[0], widths[0])  # x_{t−1} and x_t stacked on channels
        self.blocks, w_in = nn.ModuleList(), widths[0]
        for i, w in enumerate(widths):
            self.blocks.extend(
                TimeResBlock(w_in if j == 0 else w, w, cfg.embed_dim, cfg.activation)
                for j in range(cfg.blocks_per_level)
            )
            if i < len(widths) - 1:
                self.blocks.append(_conv3(w, w, stride=2))
            w_in = w
        self.norm, self.act = nn.GroupNorm(_groups(w_in), w_in), ACTIVATIONS[cfg.activation]()
        self.head = nn.Linear(w_in, 2 * z_dim)
        self.z_dim = z_dim

    def forward(
        self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        temb = self.time(t, len(x_t))
        h = self.stem(torch.cat([x_prev, x_t], dim=1))
        for block in self.blocks:
            h = block(h, temb) if isinstance(block, TimeResBlock) else block(h)
        out = self.head(self.act(self.norm(h)).mean((2, 3)))  # global average pool, then Linear
        return out[:, : self.z_dim], out[:, self.z_dim :]
