"""`flow`: stage 1 of NT-EBM (paper 002) — a normalizing flow trained by exact maximum likelihood. Its final
network is exported as a backbone file for `nt_ebm` (`method.backbone=runs:/<run_id>/backbone`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ebm_scale.methods.backbone import backbone_state
from ebm_scale.methods.base import DataSpec, Method, OptimConfig
from ebm_scale.methods.registry import register_method
from ebm_scale.nets.flow import Flow, FlowConfig
from ebm_scale.schema import Config, knob


@dataclass
class FlowMethodConfig(Config):
    PREFIX = "method"

    name: str = knob("flow", choices=("flow",), noun="method")
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))


@register_method
class FlowMethod(Method):
    name = "flow"
    config_class = FlowMethodConfig

    def __init__(self, cfg: FlowMethodConfig, spec: DataSpec, device):
        super().__init__(cfg, spec, device)
        self.networks["flow"] = Flow(spec.shape, cfg.flow).to(self.device)
        self.optimizers["flow"] = cfg.optim.build(self.networks["flow"].parameters())
        self.initialized = False

    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        x = batch.to(self.device, non_blocking=True)
        if not self.initialized:
            # ActNorm initialises itself from the first batch it sees; data-parallel ranks see different
            # batches, so initialise first (no graph), then make every rank take rank 0's values.
            with torch.no_grad():
                self.networks["flow"].log_prob(x)
            self.broadcast_parameters()
            self.initialized = True
        log_prob = self.networks["flow"].log_prob(x).mean()
        grad_norm = self.optimizer_step(self.optimizers["flow"], -log_prob, self.cfg.optim)
        return {"loss": -log_prob.detach(), "log_prob": log_prob.detach(), "grad_norm": grad_norm}

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        return self.networks["flow"].sample(n)

    @torch.no_grad()
    def log_density(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"flow": self.networks["flow"].log_prob(x.to(self.device))}

    def export_backbone(self) -> dict:
        return backbone_state("flow", self.spec.shape, self.cfg.flow, self.networks["flow"])
