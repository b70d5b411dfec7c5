"""The gradient-flow ODE x'(t) = −∇E(x(t)) (paper 000, eqs. 4–6), solved with torchdiffeq.

The flow is invertible, so besides sampling it has an exact density by the instantaneous change of
variables: along a trajectory, d/dt log p_t(x(t)) = −div f(x) with f = −∇E, i.e. +tr ∇²E(x). Hence
    log p_T(x_T) = log N(x_0; 0, I) + ∫_0^T tr ∇²E(x(t)) dt            (paper eq. 6)
and a data point is scored by integrating backwards from x at t = T to x_0 at t = 0.

Only adaptive solvers are offered: with a fixed-grid torchdiffeq solver and the time grid [0, T] the
integration would be one single step; fixed-step dynamics are the `euler` sampler instead.
Adaptive step control compares error norms on the host, so these solvers synchronise every step —
inherent to the method, and the reason the Langevin/Euler samplers are the fast path.
"""

from __future__ import annotations

import math

import torch

from ebm_scale.samplers.langevin import Callback, EnergyFn, energy_and_grad

ODE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")

# Up to this many dimensions the exact trace (one extra backward pass per dimension) is cheap enough;
# above it, Hutchinson's estimator costs one backward pass whatever the dimension.
EXACT_TRACE_MAX_DIM = 8


def _check_solver(solver: str) -> None:
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r} (allowed: {', '.join(ODE_SOLVERS)})")


def sample_ode(
    energy_fn: EnergyFn,
    x0: torch.Tensor,
    *,
    horizon: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "dopri5",
    create_graph: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """x(horizon) for x'(t) = −∇E(x), x(0) = x0. Returns detached unless create_graph.

    create_graph=True backpropagates through the solver's own operations (direct, not adjoint: memory grows
    with the number of steps). callback(dict) per vector-field evaluation — the solver exposes no other
    notion of a step, and dopri5 spends 6 evaluations per accepted step — with: step (evaluation index),
    t, x (the evaluation point), energy (per-sample E), grad (∇E); detached and unreduced.
    """
    _check_solver(solver)
    evaluations = 0

    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        nonlocal evaluations
        with torch.enable_grad():
            if not create_graph or not x.requires_grad:
                x = x.detach().requires_grad_(True)
            energy, grad = energy_and_grad(energy_fn, x, create_graph)
        if callback is not None:
            callback(
                {
                    "step": evaluations,
                    "t": t.detach(),
                    "x": x.detach(),
                    "energy": energy.detach(),
                    "grad": grad.detach(),
                }
            )
        evaluations += 1
        return -grad if create_graph else -grad.detach()

    times = torch.tensor([0.0, horizon], dtype=x0.dtype, device=x0.device)
    start = x0 if (create_graph and x0.requires_grad) else x0.detach()
    with torch.set_grad_enabled(create_graph):
        path = _odeint()(velocity, start, times, rtol=rtol, atol=atol, method=solver)
    return path[-1] if create_graph else path[-1].detach()


def ode_log_density(
    energy_fn: EnergyFn,
    x: torch.Tensor,
    *,
    horizon: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "dopri5",
    exact_trace: bool | None = None,
) -> torch.Tensor:
    """log p(x) (n,) of the distribution the flow pushes N(0, I) to at time `horizon` (detached).

    Integrates (x, ℓ) backwards from (x, 0) at t = T to t = 0 with dℓ/dt = tr ∇²E(x(t)), so that
    ℓ(0) = −∫_0^T tr ∇²E dt and log p(x) = log N(x(0); 0, I) − ℓ(0).
    exact_trace: None = exact when dim <= EXACT_TRACE_MAX_DIM, else Hutchinson with one Rademacher probe
    per sample, held fixed for the whole solve (a changing probe would make the ODE rough for the
    adaptive solver).
    """
    _check_solver(solver)
    dim = x[0].numel()
    use_exact = dim <= EXACT_TRACE_MAX_DIM if exact_trace is None else exact_trace
    probe = None if use_exact else torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1

    def augmented(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            y = state[0].detach().requires_grad_(True)
            _, grad = energy_and_grad(energy_fn, y, create_graph=True)
            trace = _hessian_trace(grad, y) if probe is None else _hutchinson_trace(grad, y, probe)
        return -grad.detach(), trace.detach()

    times = torch.tensor([horizon, 0.0], dtype=x.dtype, device=x.device)
    start = (x.detach(), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
    with torch.no_grad():
        xs, ells = _odeint()(augmented, start, times, rtol=rtol, atol=atol, method=solver)
    x_start, ell_start = xs[-1], ells[-1]
    log_prior = -0.5 * x_start.flatten(1).pow(2).sum(1) - 0.5 * dim * math.log(2 * math.pi)
    return log_prior - ell_start


def _hessian_trace(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_i ∂²E/∂x_i² per sample: one backward pass per dimension (samples are independent, so the
    gradient of the batch sum gives each sample's own row)."""
    flat_grad = grad.flatten(1)
    trace = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(flat_grad.shape[1]):
        (row,) = torch.autograd.grad(flat_grad[:, i].sum(), x, retain_graph=True)
        trace = trace + row.flatten(1)[:, i]
    return trace


def _hutchinson_trace(grad: torch.Tensor, x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """εᵀ ∇²E ε per sample, an unbiased estimate of tr ∇²E for Rademacher ε (exact when ∇²E is c·I,
    since εᵢ² = 1)."""
    (hvp,) = torch.autograd.grad((grad * probe).sum(), x)
    return (hvp * probe).flatten(1).sum(1)


def _odeint():
    """torchdiffeq (and the scipy it imports, ~1 s) is loaded only by runs that use the ODE sampler."""
    from torchdiffeq import odeint

    return odeint
