"""`ddaebm`: Denoising Diffusion Adversarial EBM (docs/methods/ddaebm.md, paper 001).

A T-step VP diffusion; at each step a conditional EBM p_θ(x_{t−1} | x_t) ∝ exp(−E_θ(x_{t−1}, t−1))·q(x_t | x_{t−1})
is matched adversarially by a generator distribution p_φ(x_{t−1} | x_t) = ∫ p(z) q(x_{t−1} | x_t, G_φ(x_t, z, t)) dz.
No MCMC anywhere: sampling is T generator steps (NFE = T) and the density is exp(−E_θ(x, 0)).

Paper 001 writes the *negative* energy (density ∝ exp(E)); this code uses density ∝ exp(−E) like every
other method here, so every E in the paper's equations appears here with its sign flipped.

One iteration, t ~ U{1..T}, real pairs (x_{t−1}, x_t) ~ q:
  generator + encoder (φ, ψ):  L1 + w_L2·λ(t−1)·L2                              (eq. 17 and 19)
      L1 = E(x̃, t−1) − log q(x_t | x̃) − log q_ψ(z | x̃, x_t, t),  x̃ ~ p_φ(· | x_t) with its z
      L2 = KL(q_ψ(z | x_{t−1}, x_t, t) ‖ N(0, I)) − log q(x_{t−1} | x_t, x_0 = G(x_t, z, t)),  z ~ q_ψ
  energy (θ):  E(x_{t−1}, t−1) − w_fake·E(sg[x̃], t−1) + γ/2·‖∇_{x_{t−1}}[E(x_{t−1}, t−1) − log q(x_t | x_{t−1})]‖²
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ebm_scale.diffusion import TIME_SCHEDULES, DiscreteVPSchedule, gaussian_log_prob
from ebm_scale.errors import require
from ebm_scale.methods.base import DataSpec, Method, OptimConfig, fp32_outputs
from ebm_scale.methods.registry import register_method
from ebm_scale.nets.diffusion_nets import DiffusionNetConfig, build_encoder, build_generator, build_time_energy
from ebm_scale.nets.ema import WeightAverages
from ebm_scale.schema import Config, Rule, knob

TERMINAL_STARTS = ("auto", "gaussian", "data")


@dataclass
class DiffusionChainConfig(Config):
    steps: int = knob(4, ge=1)  # T (paper: 4; T = 1 is the unstable ablation)
    beta_min: float = knob(0.1, gt=0)
    beta_max: float = 20.0  # paper: (0.1, 20) for images, (0.1, 10) MNIST
    time_schedule: str = knob("equidistant", choices=TIME_SCHEDULES, noun="time schedule")
    # Where sampling starts. q(x_T) is only ≈ N(0, I) when the β range is wide enough for the data's scale
    # (docs/methods/ddaebm.md). auto: N(0, I) if the measured bound on KL(q(x_T) ‖ N(0, I)) is below `terminal_kl_tol`
    # nats, else the true marginal, √ᾱ_T·x_0 + √(1 − ᾱ_T)·ε with x_0 from a pool of seen training points.
    terminal: str = knob("auto", choices=TERMINAL_STARTS, noun="start")
    terminal_kl_tol: float = knob(0.05, gt=0)
    terminal_pool: int = knob(4096, ge=1)  # training points kept for the `data` start

    def rules(self):
        yield Rule(
            "beta_max", self.beta_max >= self.beta_min, f"must be >= beta_min ({self.beta_min}), got {self.beta_max}"
        )
        yield Rule(
            "steps",
            self.time_schedule != "drl" or 2 <= self.steps <= 500,
            f"the drl time schedule needs 2 <= steps <= 500, got {self.steps}",
        )

    def build(self, device) -> DiscreteVPSchedule:
        return DiscreteVPSchedule(self.steps, self.beta_min, self.beta_max, self.time_schedule, device)


@dataclass
class DdaebmConfig(Config):
    PREFIX = "method"

    name: str = knob("ddaebm", choices=("ddaebm",), noun="method")
    diffusion: DiffusionChainConfig = field(default_factory=DiffusionChainConfig)
    energy: DiffusionNetConfig = field(default_factory=DiffusionNetConfig)  # E(x, t)
    generator: DiffusionNetConfig = field(default_factory=DiffusionNetConfig)  # G(x_t, z, t)
    encoder: DiffusionNetConfig = field(default_factory=DiffusionNetConfig)  # q(z | x_{t−1}, x_t, t)
    latent_dim: int = knob(2, ge=0)  # d of z; 0 = the "no latent z" ablation (deterministic G)
    gradient_penalty: float = knob(0.02, ge=0)  # γ (public code's value)
    # γ's multiplier on the pairs with t = 1, whose x_{t−1} is clean data: the energy there is the density.
    # A gradient penalty on data favours flat energies, so it broadens every peak narrower than ~√γ.
    gradient_penalty_at_data: float = knob(1.0, ge=0)
    fake_weight: float = knob(1.0, ge=0)  # weight of the generated term in the energy loss (paper's NICE run: 0.1)
    reverse_kl_weight: float = knob(1.0, ge=0)  # weight of L2; 0 = the "KL only" ablation
    encoder_term: bool = True  # −log q_ψ(z | …) in L1; false = the "no encoder term" ablation
    w: float = knob(1.0, gt=0)  # λ(t−1) = w·t'(t)^{log_½(w_mid/w)} (eq. 21)
    w_mid: float = knob(1.0, gt=0)
    # log q(x_{t−1} | x_t, x_0) in L2 uses max(β̃_t, floor): at t = 1 the posterior is a point mass (β̃_1 = 0).
    # The floor is then L2's reconstruction scale at t = 1 (its gradient ∝ 1/floor), not a numerical epsilon:
    # at 1e-4 it outweighs the adversarial L1 ~1e4×, G(·, ·, 1) turns into a plain regressor that never
    # visits the spurious minima of E(·, 0), and the density at t = 0 is left uncorrected there (2D toy:
    # mass piled in the box corners). Sampling stays deterministic at t = 1 whatever the floor, unless
    # sample_with_floor (below).
    posterior_var_floor: float = knob(
        1e-2, gt=0
    )  # small floors pile the density in the box corners (docs/results/ddaebm.md)
    # Generate x_{t−1} from that floored Gaussian too, so p_φ(x_{t−1} | x_t) is the model L2 scores. Without it,
    # at t = 1 x̃_0 = G(x_1, z) is deterministic: the joint (x̃_0, z) is degenerate, and L1's encoder term is then
    # no bound on the generator's entropy (eq. 16 drops H[p_φ(x_{t−1}, z | x_t)] as a constant, which it only is
    # with noise). On the 2D toy it did not improve the density (docs/results/ddaebm.md).
    sample_with_floor: bool = False
    ema_decay: float = knob(
        0.999, ge=0, lt=1
    )  # EMA of G (sampling) and E (density); 0 = off (paper: 0.9999 on CIFAR-10)
    optim_energy: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.0, 0.9)))
    optim_generator: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.0, 0.9)))


@register_method
class Ddaebm(Method):
    name = "ddaebm"
    config_class = DdaebmConfig

    def __init__(self, cfg: DdaebmConfig, spec: DataSpec, device):
        super().__init__(cfg, spec, device)
        self.schedule = cfg.diffusion.build(self.device)
        shape, d = spec.shape, cfg.latent_dim
        self.networks["energy"] = build_time_energy(shape, cfg.energy, "method.energy").to(self.device)
        self.networks["generator"] = build_generator(shape, d, cfg.generator, "method.generator").to(self.device)
        generator_params = list(self.networks["generator"].parameters())
        if d > 0:  # without z the generator's distribution is a known Gaussian: no encoder needed
            self.networks["encoder"] = build_encoder(shape, d, cfg.encoder, "method.encoder").to(self.device)
            generator_params += list(self.networks["encoder"].parameters())
        # EMA of G (sampling) and E (density): the adversarial game makes the energy's relative levels at
        # different modes oscillate from step to step; a density read off one step's energy inherits that.
        self.averages = WeightAverages(cfg.ema_decay, self.networks, ("generator", "energy"))
        self.optimizers["energy"] = cfg.optim_energy.build(self.networks["energy"].parameters())
        self.optimizers["generator"] = cfg.optim_generator.build(generator_params)
        # Decided on the first batch (terminal="auto" measures the data), then kept: see DiffusionChainConfig.
        self.start_from_data: bool | None = (
            None if cfg.diffusion.terminal == "auto" else cfg.diffusion.terminal == "data"
        )
        self.terminal_kl_value: float | None = None
        self.terminal_kl = torch.tensor(float("nan"), device=self.device)
        self.pool = torch.empty(0, *shape, device=self.device)
        self.pool_seen = 0

    @property
    def sample_var_floor(self) -> float:
        return self.cfg.posterior_var_floor if self.cfg.sample_with_floor else 0.0

    @property
    def nfe(self) -> int:
        return self.cfg.diffusion.steps

    # --- training ----------------------------------------------------------------------------------
    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, sched = self.cfg, self.schedule
        x0 = batch.to(self.device, non_blocking=True)
        self._remember(x0)
        n = x0.shape[0]
        t = torch.randint(1, cfg.diffusion.steps + 1, (n,), device=self.device)
        x_prev, x_t = sched.sample_pair(x0, t)
        energy, generator = self.networks["energy"], self.networks["generator"]
        # fp32 outputs: under bf16 autocast the schedule's arithmetic and the losses stay fp32.
        energy_fn, generator_fn = fp32_outputs(energy), fp32_outputs(generator)

        # Generator + encoder: the energy is a fixed critic here, so its parameters take no gradient.
        energy.requires_grad_(False)
        z = torch.randn(n, cfg.latent_dim, device=self.device)
        x_fake = sched.posterior_sample(generator_fn(x_t, z, t), x_t, t, var_floor=self.sample_var_floor)
        l1 = energy_fn(x_fake, t - 1) - sched.log_q_step(x_t, x_fake, t)
        metrics: dict[str, torch.Tensor] = {}
        if cfg.encoder_term and cfg.latent_dim > 0:
            # −log q_ψ(z | x̃, x_t): the variational bound on the generator's conditional entropy (eq. 16)
            mean, log_var = fp32_outputs(self.networks["encoder"])(x_fake, x_t, t)
            l1 = l1 - gaussian_log_prob(z, mean, log_var.exp())
        loss_g = l1.mean()
        if cfg.reverse_kl_weight > 0:
            l2 = self._reverse_kl_bound(x_prev, x_t, t, metrics)
            weight = sched.importance_weight(t, cfg.w, cfg.w_mid)
            loss_g = loss_g + cfg.reverse_kl_weight * (weight * l2).mean()
            metrics["loss/l2"] = l2.mean().detach()
        grad_norm_g = self.optimizer_step(self.optimizers["generator"], loss_g, cfg.optim_generator)
        energy.requires_grad_(True)
        self.averages.step()
        self.averages.update("generator")

        # Energy: real pairs down, generated ones up, gradient penalty on the real x_{t−1} (eq. 22–23).
        x_real = x_prev.detach().requires_grad_(True)
        # One forward for both halves (every energy net here is per-sample: no batch statistics to mix).
        e_real, e_fake = energy_fn(torch.cat([x_real, x_fake.detach()]), torch.cat([t - 1, t - 1])).split(n)
        e_real_mean, e_fake_mean = e_real.mean(), e_fake.mean()
        loss_e = e_real_mean - cfg.fake_weight * e_fake_mean
        if cfg.gradient_penalty > 0:
            conditional = e_real - sched.log_q_step(x_t, x_real, t)  # −log of p_θ(x_{t−1} | x_t)'s numerator
            (grad,) = torch.autograd.grad(conditional.sum(), x_real, create_graph=True)
            per_pair = grad.flatten(1).pow(2).sum(1)
            if cfg.gradient_penalty_at_data != 1.0:
                per_pair = per_pair * torch.where(t == 1, cfg.gradient_penalty_at_data, 1.0)
            penalty = 0.5 * cfg.gradient_penalty * per_pair.mean()
            loss_e = loss_e + penalty
            metrics["gradient_penalty"] = penalty.detach()
        grad_norm_e = self.optimizer_step(self.optimizers["energy"], loss_e, cfg.optim_energy)
        self.averages.update("energy")

        return {
            "loss": loss_e.detach(),
            "loss/energy": loss_e.detach(),
            "loss/generator": loss_g.detach(),
            "loss/l1": l1.mean().detach(),
            **metrics,
            "energy/real": e_real_mean.detach(),
            "energy/fake": e_fake_mean.detach(),
            "energy_gap": (e_real_mean - e_fake_mean).detach(),
            "grad_norm/energy": grad_norm_e,
            "grad_norm/generator": grad_norm_g,
            "terminal_kl_bound": self.terminal_kl,
        }

    def _reverse_kl_bound(self, x_prev, x_t, t, metrics) -> torch.Tensor:
        """L2 per sample (eq. 19) on real pairs: the negative ELBO of x_{t−1} under p_φ(· | x_t)."""
        cfg = self.cfg
        if cfg.latent_dim > 0:
            mean, log_var = fp32_outputs(self.networks["encoder"])(x_prev, x_t, t)
            z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
            kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(1)
            metrics["encoder/kl"] = kl.mean().detach()
        else:
            z, kl = torch.empty(len(x_t), 0, device=self.device), 0.0
        x0_hat = fp32_outputs(self.networks["generator"])(x_t, z, t)
        return kl - self.schedule.posterior_log_prob(x_prev, x0_hat, x_t, t, cfg.posterior_var_floor)

    @torch.no_grad()
    def _remember(self, x0: torch.Tensor) -> None:
        """Decide the sampler's start on the first batch; keep a reservoir of training points if it needs them."""
        if self.terminal_kl_value is None:  # a Python float, so later steps never sync the host to check
            self.terminal_kl_value = self.schedule.terminal_kl_bound(x0)
            self.terminal_kl = torch.tensor(self.terminal_kl_value, device=self.device)
            if self.start_from_data is None:
                self.start_from_data = self.terminal_kl_value > self.cfg.diffusion.terminal_kl_tol
        if not self.start_from_data:
            return
        # Reservoir sampling (Vitter's algorithm R), so every point seen so far is equally likely to be in the
        # pool: fill it first; then the point at stream position j (1-based) takes a uniform slot in 0..j−1,
        # and replaces that pool entry if the slot is inside the pool.
        n, capacity = len(x0), self.cfg.diffusion.terminal_pool
        fill = min(max(capacity - len(self.pool), 0), n)
        self.pool = torch.cat([self.pool, x0[:fill]])
        position = self.pool_seen + torch.arange(fill + 1, n + 1, device=self.device)
        slot = (torch.rand(n - fill, device=self.device) * position).long()
        replace = slot < capacity
        self.pool[slot[replace]] = x0[fill:][replace]
        self.pool_seen += n

    # --- sampling and density ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        generator = fp32_outputs(self.averages.network("generator"))
        sched, steps = self.schedule, self.cfg.diffusion.steps
        x = torch.randn(n, *self.spec.shape, device=self.device)
        if self.start_from_data:
            require(len(self.pool) > 0, "method.diffusion.terminal", "the data start needs training batches first")
            x0 = self.pool[torch.randint(len(self.pool), (n,), device=self.device)]
            x = sched.q_sample(x0, torch.full((n,), steps, device=self.device), x)
        for step in range(steps, 0, -1):
            t = torch.full((n,), step, device=self.device)
            z = torch.randn(n, self.cfg.latent_dim, device=self.device)
            x = sched.posterior_sample(generator(x, z, t), x, t, var_floor=self.sample_var_floor)
        return x

    def log_density(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(self.device)
        energy = self.averages.network("energy")
        return {"ebm": -energy(x, torch.zeros(len(x), dtype=torch.long, device=self.device)).float()}

    def extra_state(self) -> dict:
        return {
            "start_from_data": self.start_from_data,
            "terminal_kl": self.terminal_kl_value,
            "pool": self.pool,
            "pool_seen": self.pool_seen,
            "ema_updates": self.averages.updates,
        }

    def load_extra_state(self, state: dict) -> None:
        if state:
            self.start_from_data = state["start_from_data"]
            self.terminal_kl_value = state["terminal_kl"]
            if self.terminal_kl_value is not None:
                self.terminal_kl = torch.tensor(self.terminal_kl_value, device=self.device)
            self.pool = state["pool"].to(self.device)
            self.pool_seen = state["pool_seen"]
            self.averages.updates = state["ema_updates"]
