"""One config for "the energy network" of the two-stage methods: an MLP for flat (2D) data, or one of the
papers' convolutional energies for images. Hydra needs one concrete dataclass per config node, so the fields
of every architecture live side by side and `arch` picks which ones matter."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ebm_scale.nets.mlp import EnergyMLP, MLPConfig
from ebm_scale.schema import Config, knob

ENERGY_ARCHS = ("mlp", "mle_conv", "nt_ebm", "vaebm_resnet")


@dataclass
class EnergyNetConfig(Config):
    # mlp | mle_conv (paper 000 Table 2) | nt_ebm (paper 002 Tables 4/5) | vaebm_resnet (paper 003 Table 7)
    arch: str = knob("mlp", choices=ENERGY_ARCHS, noun="energy network")
    # The other fields are checked through the chosen arch's own config (rules): only its fields matter.
    hidden: int = 256  # mlp width
    layers: int = 4  # mlp Linear layers (paper 003's 2D energy: 4 × 256)
    activation: str = "swish"  # mlp activation
    channels: int = 32  # conv archs: n_f / base channels
    blocks_per_stage: int = 1  # vaebm_resnet residual blocks per resolution
    growth: str = "doubling"  # mle_conv: doubling (CIFAR-10, CelebA) | constant (MNIST, Fashion-MNIST)

    def rules(self):
        yield self._mlp() if self.arch == "mlp" else self._conv()

    def _mlp(self) -> MLPConfig:
        return MLPConfig(hidden=self.hidden, layers=self.layers, activation=self.activation)

    def _conv(self):
        from ebm_scale.nets.conv_energy import ConvEnergyConfig

        return ConvEnergyConfig(
            arch=self.arch, channels=self.channels, blocks_per_stage=self.blocks_per_stage, growth=self.growth
        )


def build_energy(shape: tuple[int, ...], cfg: EnergyNetConfig) -> nn.Module:
    """(n, *shape) → (n,) energies."""
    if cfg.arch == "mlp":
        dim = 1
        for s in shape:
            dim *= s
        return EnergyMLP(dim, cfg._mlp())
    from ebm_scale.nets.conv_energy import build_conv_energy

    return build_conv_energy(tuple(shape), cfg._conv(), prefix="method.energy")
