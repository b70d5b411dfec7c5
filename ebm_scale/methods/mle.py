"""`mle`: maximum-likelihood EBM training with short-run dynamics (docs/methods/mle.md, paper 000).

    L = mean E_θ(x_data) − mean E_θ(sg[x_neg]) + α·mean(E_pos² + E_neg²) + λ_gen·mean E_sg[θ](G_θ(x0))

x_neg = G_θ(x0) is K steps of (noisy or noise-free) Langevin, or the gradient-flow ODE, from the chain
initialisation. The first two terms give the usual contrastive ML gradient; the last is paper 000's
self-adversarial generator loss (eq. 12): it differentiates through the sampler only, not the outer energy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from ebm_scale.errors import require
from ebm_scale.methods import register_method
from ebm_scale.methods.base import DataSpec, Method, OptimConfig
from ebm_scale.nets.mlp import EnergyMLP, MLPConfig
from ebm_scale.samplers import CHAIN_INITS, ODE_SOLVERS, SAMPLERS, ChainEnds, mean_grad_norm, ode_log_density, sampler_knobs


# Short-run dynamics the generator loss can differentiate through (HMC's accept/reject cannot be).
MLE_SAMPLERS = ("langevin", "euler", "ode")


@dataclass
class MleSamplerConfig:
    kind: str = "langevin"        # langevin | euler (= langevin with noise 0) | ode
    step_size: float = 0.1        # η
    steps: int = 40               # K
    noise_scale: float = 0.1      # σ (ignored by euler/ode)
    horizon: float = 0.2          # ODE T
    rtol: float = 1e-5
    atol: float = 1e-5
    solver: str = "dopri5"
    init: str = "noise"           # noise | buffer | data
    buffer_size: int = 10000
    buffer_reinit_prob: float = 0.05
    sample_steps: int | None = None   # steps used by sample(n) at evaluation; None = same as training

    def validate(self, prefix: str) -> None:
        require(self.kind in MLE_SAMPLERS, f"{prefix}.kind", f"unknown sampler {self.kind!r}", allowed=MLE_SAMPLERS)
        require(self.step_size > 0, f"{prefix}.step_size", f"must be > 0, got {self.step_size}")
        require(self.steps >= 1, f"{prefix}.steps", f"must be >= 1, got {self.steps}")
        require(self.noise_scale >= 0, f"{prefix}.noise_scale", f"must be >= 0, got {self.noise_scale}")
        require(self.horizon > 0, f"{prefix}.horizon", f"must be > 0, got {self.horizon}")
        require(self.rtol > 0, f"{prefix}.rtol", f"must be > 0, got {self.rtol}")
        require(self.atol > 0, f"{prefix}.atol", f"must be > 0, got {self.atol}")
        require(self.solver in ODE_SOLVERS, f"{prefix}.solver", f"unknown adaptive ODE solver {self.solver!r}",
                allowed=ODE_SOLVERS)
        require(self.init in CHAIN_INITS, f"{prefix}.init", f"unknown chain init {self.init!r}",
                allowed=sorted(CHAIN_INITS))
        require(self.buffer_size >= 1, f"{prefix}.buffer_size", f"must be >= 1, got {self.buffer_size}")
        require(0 <= self.buffer_reinit_prob <= 1, f"{prefix}.buffer_reinit_prob",
                f"must be in [0, 1], got {self.buffer_reinit_prob}")
        require(self.sample_steps is None or self.sample_steps >= 1, f"{prefix}.sample_steps",
                f"must be >= 1 or null (= steps), got {self.sample_steps}")


@dataclass
class MleLossConfig:
    generator_weight: float = 0.0    # λ_gen of paper eq. 12 (paper: 1 when used)
    energy_reg: float = 0.0          # α·(E_pos² + E_neg²), Du & Mordatch

    def validate(self, prefix: str) -> None:
        require(self.generator_weight >= 0, f"{prefix}.generator_weight", f"must be >= 0, got {self.generator_weight}")
        require(self.energy_reg >= 0, f"{prefix}.energy_reg", f"must be >= 0, got {self.energy_reg}")


@dataclass
class MleConfig:
    name: str = "mle"
    net: MLPConfig = field(default_factory=MLPConfig)
    sampler: MleSamplerConfig = field(default_factory=MleSamplerConfig)
    loss: MleLossConfig = field(default_factory=MleLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))

    def validate(self, prefix: str = "method") -> None:
        require(self.name == "mle", f"{prefix}.name", f"MleConfig belongs to method 'mle', got {self.name!r}")
        self.net.validate(f"{prefix}.net")
        self.sampler.validate(f"{prefix}.sampler")
        self.loss.validate(f"{prefix}.loss")
        self.optim.validate(f"{prefix}.optim")


@register_method
class Mle(Method):
    name = "mle"
    config_class = MleConfig

    def __init__(self, cfg: MleConfig, spec: DataSpec, device):
        super().__init__(cfg, spec, device)
        cfg.validate()
        energy = EnergyMLP(spec.dim, cfg.net).to(self.device)
        self.networks["energy"] = energy
        self.optimizers["energy"] = cfg.optim.build(energy.parameters())

        s = cfg.sampler
        self.sampler = SAMPLERS[s.kind]
        # Knobs are filled from the config fields of the same name, so adding a sampler needs no code here.
        self.knobs = {name: getattr(s, name) for name in sampler_knobs(self.sampler)}
        self.sample_knobs = dict(self.knobs)
        if s.sample_steps is not None and "steps" in self.sample_knobs:  # the ODE has a horizon, not steps
            self.sample_knobs["steps"] = s.sample_steps
        chain_options = {"buffer": {"capacity": s.buffer_size, "reinit_prob": s.buffer_reinit_prob}}
        self.chain_init = CHAIN_INITS[s.init](spec.shape, self.device, **chain_options.get(s.init, {}))

    @property
    def energy(self) -> torch.nn.Module:
        return self.networks["energy"]

    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, net = self.cfg, self.energy
        x_pos = batch.to(self.device, non_blocking=True)
        n = x_pos.shape[0]
        generator_weight, energy_reg = cfg.loss.generator_weight, cfg.loss.energy_reg
        # Only the generator loss needs the chain to be differentiable; without it every step is detached
        # (the fast path: no double backward, no graph across steps).
        with_generator = generator_weight > 0

        x0 = self.chain_init.init(n, x_pos)
        chain = ChainEnds()
        x_chain = self.sampler(net, x0, **self.knobs, create_graph=with_generator, callback=chain)
        x_neg = x_chain.detach()
        self.chain_init.update(x_neg)

        # One forward for both halves: on small nets the per-call overhead dominates.
        energies = net(torch.cat([x_pos, x_neg]))
        e_pos, e_neg = energies[:n], energies[n:]
        e_pos_mean, e_neg_mean = e_pos.mean(), e_neg.mean()
        loss_ml = e_pos_mean - e_neg_mean  # also the energy gap, reported under its own name
        loss = loss_ml
        metrics = {}
        if energy_reg > 0:
            loss_reg = energy_reg * (e_pos.pow(2) + e_neg.pow(2)).mean()
            loss = loss + loss_reg
            metrics["loss/energy_reg"] = loss_reg.detach()
        if with_generator:
            # E_sg[θ](G_θ(x0)): the critic's parameters are detached, so θ is reached only through the
            # sampler's ∇E steps. Numerically this term equals mean E(x_neg); only its gradient differs.
            frozen = {name: p.detach() for name, p in net.named_parameters()}
            loss_gen = generator_weight * functional_call(net, frozen, (x_chain,)).mean()
            loss = loss + loss_gen
            metrics["loss/generator"] = loss_gen.detach()

        param_grad_norm = self.optimizer_step(self.optimizers["energy"], loss, cfg.optim)
        loss_ml = loss_ml.detach()
        # Loss terms as they enter `loss` (weighted), so loss = loss/ml + loss/generator + loss/energy_reg;
        # a term whose weight is 0 is not computed and not reported.
        return {
            "loss": loss.detach(),
            "loss/ml": loss_ml,
            **metrics,
            "energy/pos": e_pos_mean.detach(),
            "energy/neg": e_neg_mean.detach(),
            "energy_gap": loss_ml,
            "chain/grad_norm_first": mean_grad_norm(chain.first),
            "chain/grad_norm_last": mean_grad_norm(chain.last),
            "grad_norm": param_grad_norm,
        }

    def sample(self, n: int) -> torch.Tensor:
        """Fresh N(0, I) latents through the training dynamics (never the replay buffer: at evaluation the
        sampler is the generator)."""
        x0 = torch.randn(n, *self.spec.shape, device=self.device)
        return self.sampler(self.energy, x0, **self.sample_knobs).detach()

    @torch.no_grad()
    def log_density(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"ebm": −E(x)} and, for the ODE sampler, {"flow": exact log-density of the gradient flow} — the
        paper's point is that the flow's density matches the data far better than exp(−E)/Z."""
        x = x.to(self.device)
        densities = {"ebm": -self.energy(x)}
        if self.cfg.sampler.kind == "ode":
            s = self.cfg.sampler
            densities["flow"] = ode_log_density(self.energy, x, horizon=s.horizon, rtol=s.rtol, atol=s.atol,
                                                solver=s.solver)
        return densities

    def extra_state(self) -> dict:
        return {"chain_init": self.chain_init.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if state.get("chain_init"):  # empty for stateless inits (and for checkpoints of such runs)
            self.chain_init.load_state_dict(state["chain_init"])
