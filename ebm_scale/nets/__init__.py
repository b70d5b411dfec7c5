"""Networks: plain nn.Modules, each with a dataclass config that validates itself."""

from ebm_scale.nets.conv_energy import CONV_ENERGIES, ConvEnergyConfig, build_conv_energy
from ebm_scale.nets.energy import ENERGY_ARCHS, EnergyNetConfig, build_energy
from ebm_scale.nets.flow import Flow, FlowConfig
from ebm_scale.nets.mlp import ACTIVATIONS, EnergyMLP, LipSwish, MLPConfig, ScalarHead
from ebm_scale.nets.spectral import SpectralPenalty
from ebm_scale.nets.vae import VAE, VAEConfig

__all__ = [
    "ACTIVATIONS",
    "CONV_ENERGIES",
    "ENERGY_ARCHS",
    "ConvEnergyConfig",
    "EnergyMLP",
    "EnergyNetConfig",
    "Flow",
    "FlowConfig",
    "LipSwish",
    "MLPConfig",
    "ScalarHead",
    "SpectralPenalty",
    "VAE",
    "VAEConfig",
    "build_conv_energy",
    "build_energy",
]
