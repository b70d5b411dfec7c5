"""`vae`: stage 1 of VAEBM (paper 003) — a VAE trained by its ELBO. Its final network is exported as a
backbone file for `vaebm` (`method.backbone=runs:/<run_id>/backbone`).

log_density is the importance-weighted bound (IWAE, `iw_samples` draws): on 2D data the platform normalises
it by quadrature, which gives the VAE's own test log-likelihood — the number VAEBM must beat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ebm_scale.methods.backbone import backbone_state
from ebm_scale.methods.base import DataSpec, Method, OptimConfig
from ebm_scale.methods.registry import register_method
from ebm_scale.nets.vae import VAE, VAEConfig
from ebm_scale.schema import Config, knob


@dataclass
class VaeConfig(Config):
    PREFIX = "method"

    name: str = knob("vae", choices=("vae",), noun="method")
    vae: VAEConfig = field(default_factory=VAEConfig)
    iw_samples: int = knob(100, ge=1)  # importance samples per point in log_density (paper 003's 2D table: 10k)
    # KL warm-up (NVAE, VAEBM's backbone): the KL term's weight ramps linearly 0 → 1 over this many
    # iterations, so the decoder learns to use z before the KL can pull q(z|x) onto the prior (posterior
    # collapse). 0 = the plain ELBO from the start.
    kl_warmup: int = knob(0, ge=0, note="0 = no warm-up")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))


@register_method
class Vae(Method):
    name = "vae"
    config_class = VaeConfig

    def __init__(self, cfg: VaeConfig, spec: DataSpec, device):
        super().__init__(cfg, spec, device)
        cfg.vae.check_shape(spec.shape, "method.vae")  # names the key when the data cannot fit the architecture
        self.networks["vae"] = VAE(spec.shape, cfg.vae).to(self.device)
        self.optimizers["vae"] = cfg.optim.build(self.networks["vae"].parameters())
        self.iteration = 0

    def kl_weight(self) -> float:
        """The KL term's weight at the current iteration (1 once the warm-up is over)."""
        warmup = self.cfg.kl_warmup
        return min(1.0, self.iteration / warmup) if warmup else 1.0

    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.iteration += 1
        reconstruction, kl = self.networks["vae"].elbo_terms(batch.to(self.device, non_blocking=True))
        reconstruction, kl = reconstruction.mean(), kl.mean()
        loss = -(reconstruction - self.kl_weight() * kl)
        grad_norm = self.optimizer_step(self.optimizers["vae"], loss, self.cfg.optim)
        # "elbo" is always the true bound (weight 1), so curves stay comparable across warm-up settings.
        # (The KL weight itself is not logged: it is kl_weight() of the step, known from the config.)
        return {
            "loss": loss.detach(),
            "elbo": (reconstruction - kl).detach(),
            "kl": kl.detach(),
            "grad_norm": grad_norm,
        }

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        return self.networks["vae"].sample(n)

    @torch.no_grad()
    def log_density(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"vae": self.networks["vae"].log_likelihood(x.to(self.device), samples=self.cfg.iw_samples)}

    def extra_state(self) -> dict:
        return {"iteration": self.iteration}

    def load_extra_state(self, state: dict) -> None:
        self.iteration = state.get("iteration", 0) if state else 0

    def export_backbone(self) -> dict:
        return backbone_state("vae", self.spec.shape, self.cfg.vae, self.networks["vae"])
