"""`nt_ebm`: an energy tilting a frozen flow, sampled by HMC in the flow's latent space (paper 002,
docs/methods/nt_ebm.md). The paper writes the tilt as exp(f); here E = −f, as everywhere in ebm_scale.

    p(x) ∝ exp(−E(x)) · q_α(x),   x = g_α(z):   p(z) ∝ exp(−E(g_α(z))) · N(z; 0, I)   (no Jacobian)

Each iteration runs K HMC transitions (L leapfrog steps each, Metropolis–Hastings per chain, step size adapted
toward a target acceptance) on persistent latent chains, pushes them through g and takes a contrastive
maximum-likelihood step on E. `sampler.space=data` runs the same HMC on x directly against E(x) − log q_α(x):
the paper's contrast, which mixes far worse. `objective=nce` trains E instead by logistic regression of data
against flow samples with a learned bias (logit = b − E(x)). The flow is stage 1 (`flow`), never updated here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ebm_scale.methods.backbone import PretrainConfig, load_backbone
from ebm_scale.methods.base import DataSpec, Method, OptimConfig
from ebm_scale.methods.flow import FlowMethodConfig
from ebm_scale.methods.registry import register_method
from ebm_scale.nets.energy import EnergyNetConfig, build_energy
from ebm_scale.nets.flow import FlowConfig
from ebm_scale.samplers import HmcStats, mean_grad_norm, sample_hmc
from ebm_scale.schema import Config, knob

SPACES = ("latent", "data")
OBJECTIVES = ("mle", "nce")


@dataclass
class NtEbmSamplerConfig(Config):
    space: str = knob(
        "latent", choices=SPACES, noun="chain space"
    )  # latent (neural transport) | data (HMC on x: the paper's comparison)
    steps: int = knob(20, ge=1)  # K HMC transitions per training iteration (paper: 20)
    leapfrog_steps: int = knob(3, ge=1)  # L (paper: 3)
    step_size: float = knob(0.15, gt=0)  # initial ε (paper: 0.15), adapted from there
    target_accept: float = knob(0.651, gt=0, lt=1)  # Beskos et al. 2013, as in the paper
    adapt: bool = True
    adapt_rate: float = knob(0.02, gt=0)  # ε ← ε·(1 + rate) when acceptance is above target, ε/(1 + rate) below
    persistent: bool = True  # chains continue across iterations (paper); False = fresh from q_α each time
    sample_steps: int = knob(100, ge=1)  # transitions for sample(n), from fresh chains


@dataclass
class NtEbmConfig(Config):
    PREFIX = "method"

    name: str = knob("nt_ebm", choices=("nt_ebm",), noun="method")
    backbone: str = ""  # runs:/<run_id>/backbone | a path to backbone.pt (or its folder) | "" = pretrain
    flow: FlowConfig = field(default_factory=FlowConfig)  # used only when pretraining
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    energy: EnergyNetConfig = field(default_factory=EnergyNetConfig)
    sampler: NtEbmSamplerConfig = field(default_factory=NtEbmSamplerConfig)
    objective: str = knob(
        "mle", choices=OBJECTIVES, noun="objective"
    )  # mle (HMC negatives) | nce (flow samples as noise, learned bias)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, betas=(0.99, 0.999)))  # paper A.4


class NceBias(nn.Module):
    """The learned log-normalizer b of the NCE logit b − E(x)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(()))


@register_method
class NtEbm(Method):
    name = "nt_ebm"
    config_class = NtEbmConfig
    backbone_kind = "flow"
    curve_keys = ("mcmc/accept_rate", "mcmc/step_size")

    def __init__(self, cfg: NtEbmConfig, spec: DataSpec, device):
        super().__init__(cfg, spec, device)
        if not cfg.backbone:
            raise ValueError("nt_ebm needs method.backbone (the engine pretrains one and fills it in when empty)")
        self.flow = load_backbone(cfg.backbone, "flow", spec.shape, self.device)
        self.networks["energy"] = build_energy(spec.shape, cfg.energy).to(self.device)
        params = list(self.networks["energy"].parameters())
        if cfg.objective == "nce":
            self.networks["nce_bias"] = NceBias().to(self.device)
            params += list(self.networks["nce_bias"].parameters())
        self.optimizers["energy"] = cfg.optim.build(params)
        self.chains: torch.Tensor | None = None  # persistent chain states (latent z or data x)
        self.step_size = torch.tensor(cfg.sampler.step_size, device=self.device)

    @classmethod
    def backbone_method_config(cls, cfg: NtEbmConfig) -> FlowMethodConfig:
        return FlowMethodConfig(flow=cfg.flow, optim=OptimConfig(lr=cfg.pretrain.lr))

    @property
    def energy(self) -> nn.Module:
        return self.networks["energy"]

    # --- the two targets HMC can run on -------------------------------------------------------------------
    def latent_energy(self, z: torch.Tensor) -> torch.Tensor:
        """U(z) = E(g(z)) + ½‖z‖²."""
        return self.energy(self.flow(z)).float() + 0.5 * z.flatten(1).pow(2).sum(1)

    def data_energy(self, x: torch.Tensor) -> torch.Tensor:
        """U(x) = E(x) − log q_α(x)."""
        return self.energy(x).float() - self.flow.log_prob(x).float()

    def _fresh(self, n: int, space: str) -> torch.Tensor:
        """Chain starts drawn from q_α: z ~ N(0, I) in latent space, x = g(z) in data space."""
        z = torch.randn(n, *self.spec.shape, device=self.device)
        if space == "latent":
            return z
        with torch.no_grad():
            return self.flow(z)

    def hmc(self, energy_fn, x0: torch.Tensor, steps: int, step_size, callback=None) -> torch.Tensor:
        """This model's HMC (its L, target acceptance and adaptation) on any energy: `_target(space)`, or a
        reference density (experiments/mixing.py runs the data-space sampler on the exact one)."""
        s = self.cfg.sampler
        return sample_hmc(
            energy_fn,
            x0,
            steps=steps,
            leapfrog_steps=s.leapfrog_steps,
            step_size=step_size,
            target_accept=s.target_accept,
            adapt=s.adapt,
            adapt_rate=s.adapt_rate,
            callback=callback,
        )

    def _target(self, space: str):
        return self.latent_energy if space == "latent" else self.data_energy

    def _to_data(self, states: torch.Tensor, space: str) -> torch.Tensor:
        if space == "data":
            return states
        with torch.no_grad():
            return self.flow(states)

    # --- training ---------------------------------------------------------------------------------------------
    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        x_pos = batch.to(self.device, non_blocking=True)
        if self.cfg.objective == "nce":
            return self._nce_step(x_pos)
        n, s = x_pos.shape[0], self.cfg.sampler
        if self.chains is None or not s.persistent or self.chains.shape[0] != n:
            self.chains = self._fresh(n, s.space)
        stats = HmcStats()
        self.chains = self.hmc(self._target(s.space), self.chains, s.steps, self.step_size, callback=stats)
        self.step_size = stats.step_size
        x_neg = self._to_data(self.chains, s.space)

        energies = self.energy(torch.cat([x_pos, x_neg])).float()  # fp32 loss under bf16 autocast
        e_pos, e_neg = energies[:n].mean(), energies[n:].mean()
        loss = e_pos - e_neg
        grad_norm = self.optimizer_step(self.optimizers["energy"], loss, self.cfg.optim)
        loss = loss.detach()
        return {
            "loss": loss,
            "loss/ml": loss,
            "energy/pos": e_pos.detach(),
            "energy/neg": e_neg.detach(),
            "energy_gap": loss,
            "mcmc/accept_rate": stats.mean_accept(),
            "mcmc/step_size": stats.step_size,
            "chain/grad_norm_last": mean_grad_norm(stats.last),
            "grad_norm": grad_norm,
        }

    def _nce_step(self, x_pos: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logistic regression, data = 1 vs flow samples = 0, logit = b − E(x): at the optimum b − E(x) =
        log p(x) − log q_α(x), i.e. exactly the tilt with b = −log Z."""
        n = x_pos.shape[0]
        with torch.no_grad():
            x_noise = self.flow.sample(n)
        logits = self.networks["nce_bias"].b - self.energy(torch.cat([x_pos, x_noise])).float()
        loss_data, loss_noise = F.softplus(-logits[:n]).mean(), F.softplus(logits[n:]).mean()
        loss = loss_data + loss_noise
        grad_norm = self.optimizer_step(self.optimizers["energy"], loss, self.cfg.optim)
        e_pos, e_noise = (self.networks["nce_bias"].b.detach() - logits.detach()).split(n)
        return {
            "loss": loss.detach(),
            "loss/nce_data": loss_data.detach(),
            "loss/nce_noise": loss_noise.detach(),
            "energy/pos": e_pos.mean(),
            "energy/neg": e_noise.mean(),
            "energy_gap": e_pos.mean() - e_noise.mean(),
            "nce/bias": self.networks["nce_bias"].b.detach().clone(),
            "grad_norm": grad_norm,
        }

    # --- sampling, density, diagnostics ---------------------------------------------------------------------
    def sample(self, n: int) -> torch.Tensor:
        """Fresh chains from q_α, `sample_steps` HMC transitions (starting at the trained step size), in the
        configured space, returned as data."""
        space = self.cfg.sampler.space
        states = self.hmc(self._target(space), self._fresh(n, space), self.cfg.sampler.sample_steps, self.step_size)
        return self._to_data(states, space)

    @torch.no_grad()
    def log_density(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"nt_ebm": −E(x) + log q_α(x), "flow": log q_α(x)}: the tilted model beside its backbone alone."""
        x = x.to(self.device)
        log_q = self.flow.log_prob(x).float()
        return {"nt_ebm": log_q - self.energy(x).float(), "flow": log_q}

    def long_chains(self, chains: int, length: int, init_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """The paper's mixing contrast on the current model: HMC in latent space vs HMC in data space, both
        from the same independent starts (z, or x = g(z)), both recorded in data space."""
        traces = {}
        z0 = init_scale * torch.randn(chains, *self.spec.shape, device=self.device)
        for space in SPACES:
            states: list[torch.Tensor] = []
            start = self._to_data(z0, "latent") if space == "data" else z0  # the same points for both samplers
            self.hmc(
                self._target(space),
                start,
                length,
                self.cfg.sampler.step_size,
                callback=lambda info, space=space, states=states: states.append(self._to_data(info["x"], space)),
            )
            traces[space] = torch.stack(states, dim=1)
        return traces

    def extra_state(self) -> dict:
        return {"chains": None if self.chains is None else self.chains.clone(), "step_size": self.step_size.clone()}

    def load_extra_state(self, state: dict) -> None:
        if not state:
            return
        self.chains = None if state.get("chains") is None else state["chains"].to(self.device)
        if "step_size" in state:
            self.step_size = state["step_size"].to(self.device)
