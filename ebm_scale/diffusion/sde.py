"""Continuous-time diffusions (score_sde style: an abstract SDE, one concrete VP SDE) and the controlled
generative SDE of DiffEBM (paper 004 eq. 8) simulated by Euler–Maruyama.

Time t runs from data (t = 0) to noise (t = 1) for the forward/noising process
    dX = f(X, t) dt + g(t) dW.
The generative process runs the other way, from the prior at t = 1 to data at t = 0. Written in its own
forward time s = 1 − t it is
    dY = [−f(Y, t) + g(t)·u(Y, t)] ds + g(t) dW_s,
so u = g·∇log p_t is the exact time reversal (the score, scaled by g).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ebm_scale.errors import require

Control = Callable[[Tensor, Tensor], Tensor]  # u(x, t) with t of shape (n,) → same shape as x
Callback = Callable[[dict], None]


class SDE(abc.ABC):
    """A forward (noising) SDE dX = f dt + g dW on t ∈ [0, 1] with a Gaussian marginal given x_0."""

    @abc.abstractmethod
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """f(x, t); t is (n,) or 0-d."""

    @abc.abstractmethod
    def diffusion(self, t: Tensor) -> Tensor:
        """g(t), same shape as t."""

    @abc.abstractmethod
    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(mean coefficient m(t), std s(t)) with X_t | X_0 ~ N(m·X_0, s²·I)."""

    def prior_sample(self, shape: tuple[int, ...], device=None, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(shape, device=device, generator=generator)

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """log N(x; 0, I) per sample, (n,)."""
        flat = x.flatten(1)
        return -0.5 * (flat.pow(2).sum(1) + flat.shape[1] * math.log(2 * math.pi))

    def perturb(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """X_t ~ q(X_t | X_0 = x0) for per-sample times t (n,)."""
        noise = torch.randn_like(x0) if noise is None else noise
        mean, std = self.marginal(t)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return mean.reshape(shape) * x0 + std.reshape(shape) * noise


class VPSDE(SDE):
    """Variance-preserving SDE, β(t) = β_min + t(β_max − β_min): f = −½β(t)x, g = √β(t)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 10.0):
        require(0 < beta_min <= beta_max, "beta_min", f"need 0 < beta_min <= beta_max, got ({beta_min}, {beta_max})")
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        beta = self.beta(t)
        return -0.5 * beta.reshape((-1,) + (1,) * (x.dim() - 1)) * x if beta.dim() else -0.5 * beta * x

    def diffusion(self, t: Tensor) -> Tensor:
        return self.beta(t).sqrt()

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_mean = -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return log_mean.exp(), (-torch.expm1(2.0 * log_mean)).sqrt()


@dataclass
class Path:
    """An Euler–Maruyama path of the generative SDE, every tensor detached.

    xs: (steps+1, n, *shape), xs[0] ~ prior, xs[-1] the generated sample; times: (steps,) the forward-process
    time t at each step's start; controls: (steps, n, *shape) the control the path was simulated with;
    noise_increments: (steps, n, *shape) the Brownian increments dW; dt: the step length (in s = 1 − t).
    """

    xs: Tensor
    times: Tensor
    controls: Tensor
    noise_increments: Tensor
    dt: float


@torch.no_grad()
def simulate_generative(
    sde: SDE,
    control: Control,
    x_start: Tensor,
    *,
    steps: int,
    keep_path: bool = False,
    callback: Callback | None = None,
) -> Tensor | Path:
    """Simulate dY = [−f + g·u] ds + g dW from Y_0 = x_start (the prior) over s ∈ [0, 1] in `steps` equal
    Euler–Maruyama steps; the control sees forward time t = 1 − s at each step's start (never t = 0, where
    a data score is singular). Returns the end point, or the whole detached `Path` with keep_path=True.

    No autograd through the solver by design (paper 004): losses re-evaluate the control on the stored path.
    callback({"step", "x", "t", "control"}) after each step.
    """
    require(steps >= 1, "steps", f"must be >= 1, got {steps}")
    n = x_start.shape[0]
    dt = 1.0 / steps
    x = x_start
    xs, times, controls, increments = [x], [], [], []
    for k in range(steps):
        t = torch.full((n,), 1.0 - k * dt, device=x.device, dtype=x.dtype)
        u = control(x, t)
        g = sde.diffusion(t).reshape((-1,) + (1,) * (x.dim() - 1))
        dw = torch.randn_like(x) * math.sqrt(dt)
        x = x + (-sde.drift(x, t) + g * u) * dt + g * dw
        if keep_path:
            xs.append(x), times.append(t[0]), controls.append(u), increments.append(dw)
        if callback is not None:
            callback({"step": k, "x": x, "t": t, "control": u})
    if not keep_path:
        return x
    return Path(
        xs=torch.stack(xs),
        times=torch.stack(times),
        controls=torch.stack(controls),
        noise_increments=torch.stack(increments),
        dt=dt,
    )
