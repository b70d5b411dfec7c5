"""`diffebm`: an EBM trained jointly with a diffusion sampler, no MCMC (docs/methods/diffebm.md, paper 004).

A control u_φ(x, t) defines the generative SDE from the prior N(0, I) to data (diffusion/sde.py); an energy
E_θ(x) defines the model density ∝ exp(−E_θ). One iteration, on a batch of n paths simulated with the
current control *detached* (no backpropagation through the solver):

  control (φ):  (1 − η)·DSM(φ) + η·Var_paths[A_φ + log p_prior(Y_0) + sg[E_θ(Y_1)]] / dim
  energy (θ):   (1 − α)·(mean E_θ(x_data) − mean E_θ(Y_1)) + α·Var_paths[sg[A] + log p_prior(Y_0) + E_θ(Y_1)] / dim

with A = Σ u·(u_ref − ½u)·Δs + u·ΔW the running cost of the log Radon–Nikodym derivative (diffusion/losses.py).
Both log-variance terms use the same path; the energy's negatives Y_1 are that path's end points, drawn from
the control as it was at the start of the iteration (one optimizer step stale), which saves simulating twice.
A step whose loss is not finite is skipped (paper 004: `skip_nonfinite`); the engine counts the skips
(`train/skipped/control`, `train/skipped/energy`) and ends a run that keeps skipping as diverged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ebm_scale.diffusion import (
    VPSDE,
    denoising_score_matching,
    log_variance,
    path_log_rnd,
    running_cost,
    simulate_generative,
)
from ebm_scale.methods.base import DataSpec, Method, OptimConfig, fp32_outputs
from ebm_scale.methods.registry import register_method
from ebm_scale.nets.diffusion_nets import DiffusionNetConfig, build_control
from ebm_scale.nets.ema import WeightAverages
from ebm_scale.nets.energy import EnergyNetConfig, build_energy
from ebm_scale.schema import Config, Rule, knob


@dataclass
class DiffebmSdeConfig(Config):
    beta_min: float = knob(0.1, gt=0)  # paper: β(t) = β_min + t(β_max − β_min), (0.1, 10) for every problem
    beta_max: float = 10.0
    steps: int = knob(100, ge=1)  # Euler–Maruyama steps of the training paths
    sample_steps: int | None = knob(None, ge=1, note="or null = steps")  # steps of sample(n) (its NFE)
    t_min: float = knob(1e-3, gt=0, lt=1)  # DSM draws t ~ U(t_min, 1): the data score is singular at t = 0

    def rules(self):
        yield Rule(
            "beta_max", self.beta_max >= self.beta_min, f"must be >= beta_min ({self.beta_min}), got {self.beta_max}"
        )


@dataclass
class DiffebmConfig(Config):
    PREFIX = "method"

    name: str = knob("diffebm", choices=("diffebm",), noun="method")
    sde: DiffebmSdeConfig = field(default_factory=DiffebmSdeConfig)
    # Paper: "three 1×1-conv layers with SiLU" applied per point = a 3-layer MLP. Images (not in the paper): any
    # conv energy of nets/energy.py (mle_conv, nt_ebm, vaebm_resnet).
    energy: EnergyNetConfig = field(default_factory=lambda: EnergyNetConfig(hidden=128, layers=3, activation="silu"))
    # Paper: a Fourier-feature MLP (Zhang & Chen's PIS) — random Fourier features of t, an MLP on (x, t).
    # Images: arch unet (u(x, t) shaped like x).
    control: DiffusionNetConfig = field(
        default_factory=lambda: DiffusionNetConfig(
            hidden=128, layers=3, activation="silu", embedding="fourier", embed_dim=64
        )
    )
    eta: float = knob(0.5, ge=0, le=1)  # control: (1 − η)·DSM + η·log-variance
    alpha: float = knob(0.5, ge=0, le=1)  # energy: (1 − α)·MLE + α·log-variance
    # EMA of the control (used by sample()) and of the energy (used by log_density()); training paths use the
    # live control, which is what the log-variance loss is about. 0 = off (paper 004 does not say).
    ema_decay: float = knob(0.0, ge=0, lt=1)
    optim_energy: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    optim_control: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))


@register_method
class Diffebm(Method):
    name = "diffebm"
    config_class = DiffebmConfig
    skip_nonfinite = True

    def __init__(self, cfg: DiffebmConfig, spec: DataSpec, device):
        super().__init__(cfg, spec, device)
        self.sde = VPSDE(cfg.sde.beta_min, cfg.sde.beta_max)
        self.networks["energy"] = build_energy(spec.shape, cfg.energy).to(self.device)
        self.networks["control"] = build_control(spec.shape, cfg.control, "method.control").to(self.device)
        self.optimizers["energy"] = cfg.optim_energy.build(self.networks["energy"].parameters())
        self.optimizers["control"] = cfg.optim_control.build(self.networks["control"].parameters())
        self.averages = WeightAverages(cfg.ema_decay, self.networks, ("control", "energy"))

    @property
    def nfe(self) -> int:
        return self.cfg.sde.sample_steps or self.cfg.sde.steps

    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, sde = self.cfg, self.sde
        # fp32 outputs: under bf16 autocast the SDE state, running cost and log-RNDs stay fp32.
        energy, control = fp32_outputs(self.networks["energy"]), fp32_outputs(self.networks["control"])
        x_data = batch.to(self.device, non_blocking=True)
        n, dim = x_data.shape[0], self.spec.dim
        path = simulate_generative(
            sde,
            control,
            sde.prior_sample((n, *self.spec.shape), device=self.device),
            steps=cfg.sde.steps,
            keep_path=True,
        )
        start, end = path.xs[0], path.xs[-1]
        log_prior = sde.prior_log_prob(start)
        # Data and path ends in one energy forward (the energy is per-point). The control step below leaves θ
        # untouched, so the same values serve it (detached) and the energy step.
        e_pos, e_neg = energy(torch.cat([x_data, end])).split(n)
        metrics: dict[str, torch.Tensor] = {}

        # --- control: fit the data (DSM) and the current energy (log-variance against sg[E]) ---------------
        loss_c = torch.zeros((), device=self.device)
        if cfg.eta < 1:
            dsm = denoising_score_matching(sde, control, x_data, cfg.sde.t_min)
            loss_c = loss_c + (1 - cfg.eta) * dsm
            metrics["loss/dsm"] = dsm.detach()
        running = None
        if cfg.eta > 0 or cfg.alpha > 0:
            with torch.set_grad_enabled(cfg.eta > 0):
                running = running_cost(control, path)
        if cfg.eta > 0:
            lv_c = log_variance(path_log_rnd(running, log_prior, -e_neg.detach())) / dim
            loss_c = loss_c + cfg.eta * lv_c
            metrics["loss/lv_control"] = lv_c.detach()
        grad_norm_c = self.optimizer_step(self.optimizers["control"], loss_c, cfg.optim_control)

        # --- energy: MLE against the generated samples + log-variance against sg[A] ----------------------
        e_pos_mean, e_neg_mean = e_pos.mean(), e_neg.mean()
        mle = e_pos_mean - e_neg_mean
        loss_e = (1 - cfg.alpha) * mle
        if cfg.alpha > 0:
            lv_e = log_variance(path_log_rnd(running.detach(), log_prior, -e_neg)) / dim
            loss_e = loss_e + cfg.alpha * lv_e
            metrics["loss/lv_energy"] = lv_e.detach()
        grad_norm_e = self.optimizer_step(self.optimizers["energy"], loss_e, cfg.optim_energy)
        self.averages.step()
        self.averages.update("control", "energy")

        out = {
            "loss": loss_e.detach(),
            "loss/energy": loss_e.detach(),
            "loss/control": loss_c.detach(),
            "loss/mle": mle.detach(),
            **metrics,
            "energy/pos": e_pos_mean.detach(),
            "energy/neg": e_neg_mean.detach(),
            "energy_gap": mle.detach(),
            "grad_norm/energy": grad_norm_e,
            "grad_norm/control": grad_norm_c,
        }
        return {k: v for k, v in out.items() if v is not None}  # a skipped step has no gradient norm

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        x_start = self.sde.prior_sample((n, *self.spec.shape), device=self.device)
        return simulate_generative(self.sde, fp32_outputs(self.averages.network("control")), x_start, steps=self.nfe)

    def log_density(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ebm": -self.averages.network("energy")(x.to(self.device)).float()}

    def extra_state(self) -> dict:
        return {"ema_updates": self.averages.updates}

    def load_extra_state(self, state: dict) -> None:
        if state:
            self.averages.updates = state.get("ema_updates", 0)
