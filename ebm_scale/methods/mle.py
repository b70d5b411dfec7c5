"""`mle`: maximum-likelihood EBM training with short-run dynamics (docs/methods/mle.md, paper 000).

    L = mean E_θ(x_data) − mean E_θ(sg[x_neg]) + α·mean(E_pos² + E_neg²) + λ_gen·mean E_sg[θ](G_θ(x0))

x_neg = G_θ(x0) is K steps of (noisy or noise-free) Langevin, or the gradient-flow ODE, from the chain
initialisation. The first two terms give the usual contrastive ML gradient; the last is paper 000's
self-adversarial generator loss (eq. 12): it differentiates through the sampler only, not the outer energy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch.func import functional_call

from ebm_scale.methods.base import DataSpec, Method, OptimConfig
from ebm_scale.methods.registry import register_method
from ebm_scale.nets.energy import EnergyNetConfig, build_energy
from ebm_scale.samplers import (
    CHAIN_INITS,
    ODE_SOLVERS,
    ChainEnds,
    mean_grad_norm,
    ode_log_density,
    sample_euler,
    sample_langevin,
    sample_ode,
)
from ebm_scale.schema import Config, knob

# Short-run dynamics the generator loss can differentiate through (HMC's accept/reject cannot be).
MLE_SAMPLERS = ("langevin", "euler", "ode")


@dataclass
class MleSamplerConfig(Config):
    kind: str = knob("langevin", choices=MLE_SAMPLERS, noun="sampler")  # euler = langevin with noise 0
    step_size: float = knob(0.1, gt=0)  # η
    steps: int = knob(40, ge=1)  # K
    noise_scale: float = knob(0.1, ge=0)  # σ (langevin only)
    horizon: float = knob(0.2, gt=0)  # ODE T
    rtol: float = knob(1e-5, gt=0)
    atol: float = knob(1e-5, gt=0)
    solver: str = knob("dopri5", choices=ODE_SOLVERS, noun="adaptive ODE solver")
    init: str = knob("noise", choices=CHAIN_INITS, noun="chain init")
    buffer_size: int = knob(10000, ge=1)
    buffer_reinit_prob: float = knob(0.05, ge=0, le=1)
    sample_steps: int | None = knob(None, ge=1, note="or null = steps")  # sample(n) at evaluation

    def build(self, *, sampling: bool = False) -> Callable:
        """The configured sampler with its knobs bound (k-diffusion style: each sampler's knobs named
        explicitly); `sampling` = the evaluation chain, with `sample_steps`."""
        steps = self.sample_steps if sampling and self.sample_steps is not None else self.steps
        if self.kind == "langevin":
            return partial(sample_langevin, steps=steps, step_size=self.step_size, noise_scale=self.noise_scale)
        if self.kind == "euler":
            return partial(sample_euler, steps=steps, step_size=self.step_size)
        return partial(sample_ode, horizon=self.horizon, rtol=self.rtol, atol=self.atol, solver=self.solver)


@dataclass
class MleLossConfig(Config):
    generator_weight: float = knob(0.0, ge=0)  # λ_gen of paper eq. 12 (paper: 1 when used)
    energy_reg: float = knob(0.0, ge=0)  # α·(E_pos² + E_neg²), Du & Mordatch


@dataclass
class MleConfig(Config):
    PREFIX = "method"

    name: str = knob("mle", choices=("mle",), noun="method")
    # mlp (paper 000's 2D net: 5 Linear layers, 256 wide, Swish) | mle_conv (its Table 2, for images) | ...
    energy: EnergyNetConfig = field(default_factory=lambda: EnergyNetConfig(layers=5))
    sampler: MleSamplerConfig = field(default_factory=MleSamplerConfig)
    loss: MleLossConfig = field(default_factory=MleLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))


@register_method
class Mle(Method):
    name = "mle"
    config_class = MleConfig

    def __init__(self, cfg: MleConfig, spec: DataSpec, device):
        super().__init__(cfg, spec, device)
        energy = build_energy(spec.shape, cfg.energy).to(self.device)
        self.networks["energy"] = energy
        self.optimizers["energy"] = cfg.optim.build(energy.parameters())

        s = cfg.sampler
        self.sampler, self.eval_sampler = s.build(), s.build(sampling=True)
        chain_options = {"buffer": {"capacity": s.buffer_size, "reinit_prob": s.buffer_reinit_prob}}
        self.chain_init = CHAIN_INITS[s.init](spec.shape, self.device, **chain_options.get(s.init, {}))

    @property
    def nfe(self) -> int | None:
        """Energy gradients per sample at evaluation: one per Langevin / Euler step; None for the adaptive ODE."""
        s = self.cfg.sampler
        return None if s.kind == "ode" else (s.sample_steps or s.steps)

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
        x_chain = self.sampler(net, x0, create_graph=with_generator, callback=chain)
        x_neg = x_chain.detach()
        self.chain_init.update(x_neg)

        # One forward for both halves: on small nets the per-call overhead dominates. float(): under bf16
        # autocast the net's output is bf16; the loss is reduced in fp32.
        energies = net(torch.cat([x_pos, x_neg])).float()
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
            loss_gen = generator_weight * functional_call(net, frozen, (x_chain,)).float().mean()
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
        return self.eval_sampler(self.energy, x0).detach()

    @torch.no_grad()
    def log_density(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"ebm": −E(x)} and, for the ODE sampler, {"flow": exact log-density of the gradient flow} — the
        paper's point is that the flow's density matches the data far better than exp(−E)/Z."""
        x = x.to(self.device)
        densities = {"ebm": -self.energy(x).float()}
        if self.cfg.sampler.kind == "ode":
            s = self.cfg.sampler
            densities["flow"] = ode_log_density(
                self.energy, x, horizon=s.horizon, rtol=s.rtol, atol=s.atol, solver=s.solver
            )
        return densities

    def extra_state(self) -> dict:
        return {"chain_init": self.chain_init.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if state.get("chain_init"):  # empty for stateless inits (and for checkpoints of such runs)
            self.chain_init.load_state_dict(state["chain_init"])
