"""The discretized VP diffusion of DDAEBM (paper 001, appendix eq. 47–48) with T steps.

    σ²(s) = 1 − exp(−β_min·s − ½(β_max − β_min)·s²),      s = t'(t) ∈ [0, 1]
    ᾱ_t  = 1 − σ²(t'(t)),   β_t = 1 − ᾱ_t / ᾱ_{t−1},   q(x_t | x_{t−1}) = N(√(1−β_t)·x_{t−1}, β_t·I)

so q(x_t | x_0) = N(√ᾱ_t·x_0, (1 − ᾱ_t)·I) is the continuous VP SDE's marginal at time t'(t), whatever T is.
With few steps and a small β range the chain does NOT reach N(0, I) at t = T: `terminal_kl_bound` says how
far off it is, so a sampler can refuse to start from N(0, I) when that would be wrong (docs/methods/ddaebm.md).

Time indices are integer tensors t ∈ {0, …, T}; every per-step coefficient is a (T+1,) table indexed by t
and broadcast over the data's trailing dimensions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ebm_scale.errors import require

TIME_SCHEDULES = ("equidistant", "drl")


def time_points(steps: int, schedule: str = "equidistant") -> Tensor:
    """t'(t) for t = 0..T as a float64 (T+1,) tensor.

    equidistant: t'(t) = t/T (paper 001's choice except on LSUN).
    drl:         t'(t) = t·⌊500/(T−1)⌋/999 for t < T and 1 at t = T — Gao et al.'s recovery-likelihood
                 schedule, which spends the steps on the first (low-noise) half of the diffusion. The paper's
                 appendix writes the first case as "t ≤ T", which contradicts its own second case; t < T is
                 the reading that gives t'(T) = 1.
    """
    require(steps >= 1, "T", f"must be >= 1, got {steps}")
    require(schedule in TIME_SCHEDULES, "time_schedule", f"unknown time schedule {schedule!r}", TIME_SCHEDULES)
    t = torch.arange(steps + 1, dtype=torch.float64)
    if schedule == "equidistant":
        return t / steps
    require(steps >= 2, "T", "the drl time schedule needs T >= 2 (its stride is ⌊500/(T−1)⌋)")
    require(steps <= 500, "T", f"the drl time schedule needs T <= 500 (stride ⌊500/(T−1)⌋ >= 1), got {steps}")
    points = t * (500 // (steps - 1)) / 999
    points[-1] = 1.0
    return points


def vp_sigma2(s: Tensor, beta_min: float, beta_max: float) -> Tensor:
    """σ²(s) of the VP SDE with linear β(s) = β_min + s(β_max − β_min)."""
    return -torch.expm1(-beta_min * s - 0.5 * (beta_max - beta_min) * s**2)


class DiscreteVPSchedule:
    """Coefficient tables of the T-step VP chain, and the operations both diffusion methods need on it."""

    def __init__(
        self,
        steps: int,
        beta_min: float,
        beta_max: float,
        time_schedule: str = "equidistant",
        device: torch.device | str | None = None,
    ):
        require(0 < beta_min <= beta_max, "beta_min", f"need 0 < beta_min <= beta_max, got ({beta_min}, {beta_max})")
        self.steps = steps
        self.beta_min, self.beta_max = beta_min, beta_max
        # Computed in float64, stored in float32: ᾱ_T can be ~1e-5 and the ratios below lose digits otherwise.
        s = time_points(steps, time_schedule)
        alpha_bar = 1.0 - vp_sigma2(s, beta_min, beta_max)
        betas = torch.zeros_like(s)
        betas[1:] = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
        prev = torch.cat([alpha_bar[:1], alpha_bar[:-1]])  # ᾱ_{t−1}, with ᾱ_{−1} := ᾱ_0 (t = 0 is never a step)
        denom = (1.0 - alpha_bar).clamp_min(1e-300)  # 1 − ᾱ_0 = 0: the t = 0 entries are unused
        tables = {
            "time": s,
            "alpha_bar": alpha_bar,
            "betas": betas,
            # DDPM posterior q(x_{t−1} | x_t, x_0) = N(c0·x_0 + ct·x_t, β̃_t)
            "posterior_coef_x0": prev.sqrt() * betas / denom,
            "posterior_coef_xt": (1.0 - betas).sqrt() * (1.0 - prev) / denom,
            "posterior_var": (1.0 - prev) * betas / denom,
        }
        for name, value in tables.items():
            setattr(self, name, value.to(device=device, dtype=torch.float32))

    # --- indexing ----------------------------------------------------------------------------------
    @staticmethod
    def _at(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """table[t] shaped (n, 1, …, 1) to broadcast against `like` (n, *shape)."""
        return table[t].reshape(-1, *([1] * (like.dim() - 1)))

    # --- forward process ---------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t ~ q(x_t | x_0)."""
        noise = torch.randn_like(x0) if noise is None else noise
        a = self._at(self.alpha_bar, t, x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def q_step(self, x_prev: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t ~ q(x_t | x_{t−1}), one forward step (t >= 1)."""
        noise = torch.randn_like(x_prev) if noise is None else noise
        b = self._at(self.betas, t, x_prev)
        return (1.0 - b).sqrt() * x_prev + b.sqrt() * noise

    def sample_pair(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_{t−1}, x_t) ~ q(x_{t−1}, x_t | x_0) for t >= 1: the real denoising pairs both methods train on."""
        x_prev = self.q_sample(x0, t - 1)
        return x_prev, self.q_step(x_prev, t)

    def log_q_step(self, x_t: Tensor, x_prev: Tensor, t: Tensor) -> Tensor:
        """log q(x_t | x_{t−1}) per sample, (n,). Differentiable in both arguments."""
        b = self._at(self.betas, t, x_prev)
        return gaussian_log_prob(x_t, (1.0 - b).sqrt() * x_prev, b)

    # --- posterior ---------------------------------------------------------------------------------
    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t−1} | x_t, x_0) (t >= 1). At t = 1 the variance is 0: x_0 is given."""
        mean = self._at(self.posterior_coef_x0, t, x0) * x0 + self._at(self.posterior_coef_xt, t, x_t) * x_t
        return mean, self._at(self.posterior_var, t, x0)

    def posterior_sample(
        self, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor | None = None, var_floor: float = 0.0
    ) -> Tensor:
        """x_{t−1} ~ q(x_{t−1} | x_t, x_0), reparameterized (differentiable in x0 and x_t); with `var_floor`, from
        the Gaussian with the variance floored as in `posterior_log_prob` (the model that log-density scores)."""
        mean, var = self.posterior(x0, x_t, t)
        noise = torch.randn_like(mean) if noise is None else noise
        if var_floor > 0:
            var = var.clamp_min(var_floor)
        return mean + var.sqrt() * noise

    def posterior_log_prob(self, x_prev: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, var_floor: float) -> Tensor:
        """log q(x_{t−1} | x_t, x_0) per sample, with the variance floored at `var_floor`: at t = 1 the true
        posterior is a point mass (β̃_1 = 0) and its log-density is not a number a loss can use."""
        mean, var = self.posterior(x0, x_t, t)
        return gaussian_log_prob(x_prev, mean, var.clamp_min(var_floor))

    # --- diagnostics -------------------------------------------------------------------------------
    def terminal_kl_bound(self, x0: Tensor) -> float:
        """An upper bound on KL(q(x_T) ‖ N(0, I)) in nats, from data samples x0 (n, *shape).

        q(x_T) is the mixture over x_0 of N(√ᾱ_T x_0, (1 − ᾱ_T) I); KL is jointly convex, so it is at most the
        mean over x_0 of the Gaussian KLs, ½·[ᾱ_T(‖x_0‖² − D) − D·log(1 − ᾱ_T)]. Near 0 → starting the
        sampler from N(0, I) is right; ~1 or more → it is not.
        """
        a = float(self.alpha_bar[-1])
        dim = x0[0].numel()
        sq = float(x0.detach().double().flatten(1).pow(2).sum(1).mean())
        return 0.5 * (a * (sq - dim) - dim * math.log1p(-a))

    def importance_weight(self, t: Tensor, w: float, w_mid: float) -> Tensor:
        """λ(t−1) = w·t'(t)^{log_{1/2}(w_mid/w)} (paper 001 eq. 21): the weight of the reverse-KL term at step
        t. λ = w at t'(t) = 1 and w_mid at t'(t) = ½; w = w_mid = 1 gives 1 everywhere."""
        exponent = math.log(w_mid / w) / math.log(0.5)
        return w * self.time[t].pow(exponent)


def gaussian_log_prob(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """Σ over non-batch dims of log N(x; mean, var), var per sample (broadcast) or per element."""
    var = var.expand_as(x)
    return (-0.5 * ((x - mean) ** 2 / var + var.log() + math.log(2 * math.pi))).flatten(1).sum(1)
