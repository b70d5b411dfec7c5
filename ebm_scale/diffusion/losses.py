"""Losses on the controlled generative SDE (sde.py): denoising score matching of the control, and the
log-variance divergence between generative and target path measures (Richter & Berner 2024; paper 004 §3.3).

The log Radon–Nikodym derivative of the generative path measure P_u against the time reversal of the
noising process started at the target ρ/Z, on a path simulated with a *reference* control u_ref, is

    log dP_u/dP_target = log p_prior(Y_0) − log ρ(Y_1) + Σ_k [u·(u_ref − ½u)·Δs + u·ΔW_k] + const,

(const = log Z plus the drift divergence ∫∇·f, the same for every path of a VP SDE). Its variance over
paths is ≥ 0 and is 0 exactly when P_u = P_target; the variance ignores the constant, so Z is never needed.
With u_ref = sg(u) the loss's gradient is that of the log-variance divergence and no gradient flows through
the solver: the control is re-evaluated, with gradients, on the stored (detached) path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ebm_scale.diffusion.sde import SDE, Control, Path


def denoising_score_matching(sde: SDE, control: Control, x0: Tensor, t_min: float = 1e-3) -> Tensor:
    """Mean over the batch of ‖s(t)·u(x_t, t)/g(t) + ε‖² / dim with x_t = m(t)x_0 + s(t)ε, t ~ U(t_min, 1).

    The control is read as a score, u/g (sde.py); weighting the score error by s(t)² is the usual
    ε-prediction form, finite as t → 0. Divided by the data dimension like the log-variance term, so η
    trades the two on the same per-dimension scale.
    """
    n = x0.shape[0]
    t = t_min + (1.0 - t_min) * torch.rand(n, device=x0.device, dtype=x0.dtype)
    noise = torch.randn_like(x0)
    x_t = sde.perturb(x0, t, noise)
    _, std = sde.marginal(t)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    score = control(x_t, t) / sde.diffusion(t).reshape(shape)
    residual = std.reshape(shape) * score + noise
    return residual.flatten(1).pow(2).sum(1).mean() / x0[0].numel()


def running_cost(control: Control, path: Path) -> Tensor:
    """Σ_k u·(u_ref − ½u)·Δs + u·ΔW_k per path, (n,), with u re-evaluated on the path (differentiable in
    the control's parameters) and u_ref the control the path was simulated with."""
    steps, n = path.controls.shape[:2]
    shape = path.controls.shape[2:]
    points = path.xs[:-1].reshape(steps * n, *shape)
    times = path.times.repeat_interleave(n)
    u = control(points, times).reshape(steps, n, *shape)
    per_step = (u * (path.controls - 0.5 * u)).flatten(2).sum(2) * path.dt + (u * path.noise_increments).flatten(2).sum(
        2
    )
    return per_step.sum(0)


def path_log_rnd(running: Tensor, log_prior_start: Tensor, log_target_end: Tensor) -> Tensor:
    """log dP_u/dP_target per path, up to the path-independent constant (module docstring)."""
    return running + log_prior_start - log_target_end


def log_variance(log_rnd: Tensor) -> Tensor:
    """The log-variance divergence: the (biased) batch variance of the per-path log-RNDs. A non-finite path
    makes it non-finite; the caller skips such steps (paper 004) rather than silently dropping paths."""
    return log_rnd.var(unbiased=False)
