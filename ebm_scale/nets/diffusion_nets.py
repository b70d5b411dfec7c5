"""One config for the time-conditioned nets of the diffusion methods (ddaebm, diffebm), and their builders.

An MLP for any data shape (flattened; the 2D toys) or a U-Net for images (C, H, W). Hydra needs one concrete
dataclass per config node, so the fields of both archs live side by side and `arch` picks which ones matter
(as in energy.py's EnergyNetConfig). `activation`, `embedding`, `embed_dim` and `time_scale` are shared:
image configs should set `activation: swish` (the prelu default is the DDGAN/DDAEBM toy MLPs').

Every built module takes t as an (n,) tensor (integer steps or floats) or a 0-d one for the whole batch:

* build_time_energy: E(x, t)            (n, *shape), t → (n,)
* build_generator:   G(x_t, z, t)       (n, *shape), (n, z_dim), t → x_0 prediction (n, *shape)
* build_encoder:     q(x_prev, x_t, t)  (n, *shape) ×2, t → (mean, log_var), each (n, z_dim)
* build_control:     u(x, t)            (n, *shape), t → (n, *shape)   (DiffEBM's control; mlp: use fourier)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ebm_scale.nets.time_mlp import TimeEnergyMLP, TimeMLP, TimeMLPConfig
from ebm_scale.nets.unet import ConvEncoder, UNet, UNetConfig, UNetEnergy, UNetGenerator
from ebm_scale.schema import Config, knob

DIFFUSION_ARCHS = ("mlp", "unet")


@dataclass
class DiffusionNetConfig(Config):
    # mlp (any shape, flattened) | unet (images (C, H, W))
    arch: str = knob("mlp", choices=DIFFUSION_ARCHS, noun="diffusion network")
    # The other fields are checked through the chosen arch's own config (rules): only its fields matter.
    hidden: int = 300  # mlp width
    layers: int = 3  # mlp Linear layers in total, output included
    activation: str = "prelu"  # both archs (images: swish)
    embedding: str = "sinusoidal"  # both archs: sinusoidal (integer steps) | fourier (t ∈ [0, 1])
    embed_dim: int = 64  # both archs
    time_scale: float = 1.0  # both archs: t · time_scale is embedded (t ∈ [0, 1] + sinusoidal: ~1000)
    channels: int = 32  # unet base width
    channel_mults: tuple[int, ...] = (1, 2)  # unet: one level each; H and W divisible by 2^(len − 1)
    blocks_per_level: int = 1  # unet residual blocks per level

    def rules(self):
        yield self._mlp() if self.arch == "mlp" else self._unet()

    def check_shape(self, shape: tuple[int, ...], prefix: str) -> None:
        """The data-dependent rules: the mlp takes any shape, the unet needs images it can halve."""
        if self.arch == "unet":
            self._unet().check_shape(tuple(shape), prefix)

    def _mlp(self) -> TimeMLPConfig:
        return TimeMLPConfig(
            hidden=self.hidden,
            layers=self.layers,
            activation=self.activation,
            embedding=self.embedding,
            embed_dim=self.embed_dim,
            time_scale=self.time_scale,
        )

    def _unet(self) -> UNetConfig:
        return UNetConfig(
            channels=self.channels,
            channel_mults=tuple(self.channel_mults),
            blocks_per_level=self.blocks_per_level,
            embed_dim=self.embed_dim,
            activation=self.activation,
            embedding=self.embedding,
            time_scale=self.time_scale,
        )


def _checked(shape: tuple[int, ...], cfg: DiffusionNetConfig, prefix: str) -> tuple[int, ...]:
    # The config itself was validated at compose time; the data's shape is known only here.
    cfg.check_shape(tuple(shape), prefix)  # reject the data's shape before building anything
    return tuple(shape)


class FlatGenerator(nn.Module):
    """mlp G(x_t, z, t): TimeMLP(dim + z_dim → dim) on (x_t, z) flattened, reshaped back like x_t."""

    def __init__(self, shape: tuple[int, ...], z_dim: int, cfg: TimeMLPConfig):
        super().__init__()
        dim = math.prod(shape)
        self.net = TimeMLP(dim + z_dim, dim, cfg)
        self.z_dim = z_dim

    def forward(self, x_t: torch.Tensor, z: torch.Tensor | None, t: torch.Tensor | float) -> torch.Tensor:
        inputs = (x_t, z) if self.z_dim > 0 else (x_t,)
        return self.net(inputs, t).view(x_t.shape)


class FlatEncoder(nn.Module):
    """mlp q(z | x_prev, x_t, t): TimeMLP(2·dim → 2·z_dim) on (x_prev, x_t) → (mean, log_var)."""

    def __init__(self, shape: tuple[int, ...], z_dim: int, cfg: TimeMLPConfig):
        super().__init__()
        self.net = TimeMLP(2 * math.prod(shape), 2 * z_dim, cfg)
        self.z_dim = z_dim

    def forward(
        self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net((x_prev, x_t), t)
        return out[:, : self.z_dim], out[:, self.z_dim :]


class NoLatentEncoder(nn.Module):
    """The encoder when z_dim = 0: empty (n, 0) mean and log_var, no parameters (nothing to infer)."""

    def forward(
        self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        empty = x_t.new_zeros(len(x_t), 0)
        return empty, empty


class FlatControl(nn.Module):
    """mlp u(x, t): TimeMLP(dim → dim), reshaped back like x."""

    def __init__(self, shape: tuple[int, ...], cfg: TimeMLPConfig):
        super().__init__()
        dim = math.prod(shape)
        self.net = TimeMLP(dim, dim, cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return self.net(x, t).view(x.shape)


class UNetControl(nn.Module):
    """unet u(x, t): the U-Net itself, without a cond input."""

    def __init__(self, shape: tuple[int, int, int], cfg: UNetConfig):
        super().__init__()
        self.unet = UNet(shape[0], shape[0], cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return self.unet(x, t)


def build_time_energy(shape: tuple[int, ...], cfg: DiffusionNetConfig, prefix: str = "net") -> nn.Module:
    """E(x, t): (n, *shape), (n,) t → (n,) energies. Errors name `prefix`'s keys."""
    shape = _checked(shape, cfg, prefix)
    if cfg.arch == "mlp":
        return TimeEnergyMLP(math.prod(shape), cfg._mlp())
    return UNetEnergy(shape, cfg._unet())


def build_generator(shape: tuple[int, ...], z_dim: int, cfg: DiffusionNetConfig, prefix: str = "net") -> nn.Module:
    """G(x_t, z, t) → x_0 prediction (n, *shape); z (n, z_dim), z_dim = 0 for an unconditional generator."""
    shape = _checked(shape, cfg, prefix)
    if z_dim < 0:
        raise ValueError(f"z_dim must be >= 0, got {z_dim}")
    if cfg.arch == "mlp":
        return FlatGenerator(shape, z_dim, cfg._mlp())
    return UNetGenerator(shape, z_dim, cfg._unet())


def build_encoder(shape: tuple[int, ...], z_dim: int, cfg: DiffusionNetConfig, prefix: str = "net") -> nn.Module:
    """q(z | x_prev, x_t, t) → (mean, log_var), each (n, z_dim). z_dim = 0: a parameter-free empty encoder."""
    shape = _checked(shape, cfg, prefix)
    if z_dim < 0:
        raise ValueError(f"z_dim must be >= 0, got {z_dim}")
    if z_dim == 0:
        return NoLatentEncoder()
    if cfg.arch == "mlp":
        return FlatEncoder(shape, z_dim, cfg._mlp())
    return ConvEncoder(shape, z_dim, cfg._unet())


def build_control(shape: tuple[int, ...], cfg: DiffusionNetConfig, prefix: str = "net") -> nn.Module:
    """u(x, t): (n, *shape), (n,) t → (n, *shape). DiffEBM's control; with t ∈ [0, 1] use embedding=fourier
    (or sinusoidal with time_scale ~1000)."""
    shape = _checked(shape, cfg, prefix)
    if cfg.arch == "mlp":
        return FlatControl(shape, cfg._mlp())
    return UNetControl(shape, cfg._unet())
