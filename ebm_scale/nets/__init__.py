"""Networks: plain nn.Modules, each with a dataclass config that validates itself."""
from ebm_scale.nets.mlp import ACTIVATIONS, EnergyMLP, LipSwish, MLPConfig, ScalarHead

__all__ = ["ACTIVATIONS", "EnergyMLP", "LipSwish", "MLPConfig", "ScalarHead"]
