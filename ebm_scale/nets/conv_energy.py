"""Convolutional energy networks for square images whose side is a power of two (8, 16, 32, 64, ...).

Three architectures, each as its paper specifies it, generalised to any side 2^k ≥ 8:

* ``mle_conv`` — paper 000's energy (appendix A, Table 2): 3×3 conv(n_f) stride 1 → S stride-2 4×4 convs →
  flatten → FC → scalar, Swish after every conv. Widths of the stride-2 convs: ``growth: doubling`` is the
  CIFAR-10 / CelebA columns (2, 4, 8[, 16] × n_f), ``growth: constant`` the MNIST / Fashion-MNIST column
  (2, 2, 2 × n_f). Paper: n_f = 32 (MNIST, Fashion-MNIST, CelebA), 64 (CIFAR-10).

* ``nt_ebm`` — the NT-EBM ConvNet (paper 002, appendix A.3, Tables 4 and 5; Xavier init per A.4):
  3×3 conv(n_f) → S stride-2 4×4 convs → 4×4 conv(1) on the final 4×4 map, LipSwish after every conv
  but the last.
* ``vaebm_resnet`` — the VAEBM energy (paper 003, appendix E, Table 7; after Du & Mordatch 2019): a
  3×3 conv stem then S stages of [ResBlock down, ``blocks_per_stage`` × ResBlock], Swish activations,
  weight normalisation on every conv, global sum pooling, FC → scalar.

S = log2(side) − 2 stride-2 stages, so the last feature map is 4×4 as in paper 000's Table 2 (3 stages at
32 px, 4 at CelebA's 64 px) and paper 002/003's Tables 4, 5 and 7. mle_conv's doubling has no cap (Table 2
reaches 16×). Channel rule of the other two (multipliers of ``channels``): each stage doubles the previous
stage's width, except that the LAST stage repeats it — Table 4 is 1 | 2, 4, 4 and Table 5 is 1 | 2, 4, 8, 8
— and no width exceeds 8× (the largest either paper uses). NT-EBM's stride-2 convs double from the stem
(2, 4, ..); VAEBM's first stage keeps the stem width (Table 7: "3×3 conv2d, 128 → ResBlock down 128").

Sign: the nets output one unnormalised scalar per sample. Paper 002's f is a NEGATIVE energy (p ∝ exp f),
ours is E with p ∝ exp(−E); which sign the scalar carries is a convention the training method applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ebm_scale.errors import require
from ebm_scale.nets.mlp import ACTIVATIONS, LipSwish, ScalarHead
from ebm_scale.schema import Config, knob

# arch name → module class; filled below the classes (the config's `arch` choices read it when checking)
CONV_ENERGIES: dict[str, Callable[..., nn.Module]] = {}
GROWTHS = ("doubling", "constant")


@dataclass
class ConvEnergyConfig(Config):
    arch: str = knob("nt_ebm", choices=CONV_ENERGIES, noun="conv energy")  # mle_conv | nt_ebm | vaebm_resnet
    # n_f (mle_conv: 32 MNIST/Fashion/CelebA, 64 CIFAR-10; NT-EBM: 32 in all of paper 002's runs) / stem width
    # (VAEBM: 128 CIFAR-10, 64 at 64 px)
    channels: int = knob(32, ge=1)
    # VAEBM: plain ResBlocks after each ResBlock down (Table 7: 1); the others ignore it
    blocks_per_stage: int = knob(1, ge=0)
    # mle_conv: stride-2 widths doubling from 2·n_f (CIFAR-10, CelebA) or constant 2·n_f (MNIST, Fashion-MNIST)
    growth: str = knob("doubling", choices=GROWTHS, noun="width growth")


def _num_stages(shape: tuple[int, ...], arch: str, prefix: str) -> int:
    """Stride-2 stages taking a (C, 2^k, 2^k) image down to 4×4; rejects every other shape."""
    side = shape[-1] if len(shape) == 3 else 0
    ok = len(shape) == 3 and shape[0] >= 1 and shape[1] == side and side >= 8 and side & (side - 1) == 0
    require(
        ok,
        f"{prefix}.arch",
        f"{arch} needs (C, H, W) images with H == W a power of two >= 8 "
        f"(8, 16, 32, 64, ...), got shape {tuple(shape)}; resize/pad the data or use an MLP energy",
    )
    return int(math.log2(side)) - 2


def _stage_mults(stages: int, first: int) -> list[int]:
    """Width multipliers of the stride-2 stages (module docstring): the last stage repeats, capped at 8."""
    return [2 ** max(0, min(first + i, first + stages - 2, 3)) for i in range(stages)]


class MLEConvEnergy(nn.Module):
    """Paper 000, Table 2: (n, C, 2^k, 2^k) → (n,). 32×32, n_f = 64, doubling (CIFAR-10):
    64@32² → 128@16² → 256@8² → 512@4² → flatten → FC; constant (MNIST): 32@32² → 64@16² → 64@8² → 64@4²."""

    def __init__(self, shape: tuple[int, int, int], cfg: ConvEnergyConfig, prefix: str = "net"):
        super().__init__()
        stages = _num_stages(shape, "mle_conv", prefix)
        mults = [2 ** (i + 1) if cfg.growth == "doubling" else 2 for i in range(stages)]
        widths = [cfg.channels] + [cfg.channels * m for m in mults]
        act = ACTIVATIONS["swish"]
        layers = [nn.Conv2d(shape[0], widths[0], 3, padding=1), act()]
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(w_in, w_out, 4, stride=2, padding=1), act()]  # halves the side
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = ScalarHead(widths[-1] * 16)  # the 4×4 map, flattened (Table 2: "Flatten, FC layer to scalar")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class NTEBMEnergy(nn.Module):
    """Paper 002, Tables 4/5: (n, C, 2^k, 2^k) → (n,).
    32×32 with n_f = 32: 32@32² → 64@16² → 128@8² → 128@4² → 1@1²."""

    def __init__(self, shape: tuple[int, int, int], cfg: ConvEnergyConfig, prefix: str = "net"):
        super().__init__()
        widths = [cfg.channels] + [cfg.channels * m for m in _stage_mults(_num_stages(shape, "nt_ebm", prefix), 1)]
        layers = [nn.Conv2d(shape[0], widths[0], 3, padding=1), LipSwish()]
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(w_in, w_out, 4, stride=2, padding=1), LipSwish()]  # halves the side
        # A 4×4 valid conv(1) on the 4×4 map, as in the tables (it is a Linear on the flattened map; a conv
        # net is not overhead-bound, so keep the paper's layer and its Xavier fan-out).
        layers.append(nn.Conv2d(widths[-1], 1, 4))
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Conv2d):  # A.4: "initialized with Xavier" (Glorot's uniform rule), zero biases
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(len(x))  # (n, 1, 1, 1) → (n,)


def _wn_conv(c_in: int, c_out: int, kernel: int, bias: bool = True) -> nn.Conv2d:
    # Weight norm (Salimans & Kingma): weight = g · v / ‖v‖ per output channel, g and v the parameters.
    return weight_norm(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=bias))


class ResBlock(nn.Module):
    """Du & Mordatch's block as VAEBM uses it: act(avgpool?(conv(act(conv(x))) + skip(x))).

    The skip is a 1×1 conv whenever the block changes width or resolution (as in the reference code);
    downsampling averages AFTER the convs, so a "ResBlock down" computes at its input resolution."""

    def __init__(self, c_in: int, c_out: int, down: bool):
        super().__init__()
        self.conv1, self.conv2 = _wn_conv(c_in, c_out, 3), _wn_conv(c_out, c_out, 3)
        self.skip = _wn_conv(c_in, c_out, 1, bias=False) if down or c_in != c_out else nn.Identity()
        self.act = ACTIVATIONS["swish"]()  # Table 7's text: Swish instead of Du & Mordatch's LeakyReLU
        self.down = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.act(self.conv1(x))) + self.skip(x)
        return self.act(nn.functional.avg_pool2d(h, 2) if self.down else h)


class VAEBMResNetEnergy(nn.Module):
    """Paper 003, Table 7: (n, C, 2^k, 2^k) → (n,). For 32×32 with channels=128, blocks_per_stage=1 this is
    the CIFAR-10 column: conv 128, RB down 128, RB 128, RB down 256, RB 256, RB down 256, RB 256, sum pool, FC.

    Weights are recomputed from (g, v) on every forward; a sampler that never updates the parameters can
    wrap its chain in ``torch.nn.utils.parametrize.cached()`` to skip that."""

    def __init__(self, shape: tuple[int, int, int], cfg: ConvEnergyConfig, prefix: str = "net"):
        super().__init__()
        widths = [cfg.channels * m for m in _stage_mults(_num_stages(shape, "vaebm_resnet", prefix), 0)]
        self.stem, self.act = _wn_conv(shape[0], cfg.channels, 3), ACTIVATIONS["swish"]()
        blocks, w_in = [], cfg.channels
        for w in widths:  # the down block changes the width (Table 7's CIFAR-10 column)
            blocks += [ResBlock(w_in, w, down=True)] + [ResBlock(w, w, down=False) for _ in range(cfg.blocks_per_stage)]
            w_in = w
        self.blocks = nn.Sequential(*blocks)
        self.head = ScalarHead(widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.act(self.stem(x)))
        return self.head(h.sum((2, 3)))  # global SUM pooling (Table 7), then FC → scalar

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        """Weight norm's data-dependent init (Salimans & Kingma, §3; VAEBM uses it): one forward pass over a
        batch in which each conv, in execution order, rescales g (and shifts its bias) so that its output on
        this batch has zero mean (where it has a bias) and unit std per channel. Call once, before training."""

        def normalise(conv: nn.Conv2d, inputs, out: torch.Tensor) -> torch.Tensor:
            mean, std = out.mean((0, 2, 3)), out.std((0, 2, 3)) + 1e-6
            if conv.bias is None:
                mean = torch.zeros_like(mean)
            else:
                conv.bias.sub_(mean).div_(std)
            g = conv.parametrizations.weight.original0  # (c_out, 1, 1, 1)
            g.div_(std.view_as(g))
            return (out - mean[:, None, None]) / std[:, None, None]  # what the conv now outputs: later layers see it

        handles = [m.register_forward_hook(normalise) for m in self.modules() if isinstance(m, nn.Conv2d)]
        try:
            self(x)
        finally:
            for handle in handles:
                handle.remove()


CONV_ENERGIES.update(mle_conv=MLEConvEnergy, nt_ebm=NTEBMEnergy, vaebm_resnet=VAEBMResNetEnergy)


def build_conv_energy(shape: tuple[int, int, int], cfg: ConvEnergyConfig, prefix: str = "net") -> nn.Module:
    """The energy for (C, H, W) data: a module mapping (n, C, H, W) → (n,). Shape errors name `prefix`'s keys;
    the config itself was validated at compose time."""
    _num_stages(tuple(shape), cfg.arch, prefix)  # reject the data's shape before building anything
    return CONV_ENERGIES[cfg.arch](tuple(shape), cfg, prefix)
