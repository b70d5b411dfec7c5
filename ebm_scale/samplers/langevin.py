"""Langevin dynamics and its noise-free limit (gradient descent on the energy).

Paper 000, eq. (3):  x ← x − (η/2)·∇E(x) + σ·sqrt(η)·ω,  ω ~ N(0, I).
σ = 1 is the discretized Langevin SDE dx = −½∇E dt + dW (stationary density ∝ exp(−E)); σ < 1 is the
"reduced noise" everyone uses in practice; σ = 0 is eq. (7), the forward Euler solver of the gradient flow
x' = −∇E with step η/2 — a deterministic generator G_θ(x0).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ebm_scale.samplers.precision import energy_autocast

EnergyFn = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]


def energy_and_grad(energy_fn: EnergyFn, x: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample energies E(x) (n,) and ∇_x E (shape of x). `x` must require grad.

    Samples are independent, so ∇ of the summed energy is each sample's own gradient. With create_graph the
    gradient is itself differentiable (w.r.t. x and the energy's parameters) — what the generator loss and
    the exact/Hutchinson trace need.
    """
    # In x's dtype: under bf16 autocast the network returns bf16, but chain states, energies and the MH / loss
    # arithmetic on them stay in the chain's own precision (the gradient w.r.t. x already has x's dtype).
    with energy_autocast(x):  # off under a bf16 run unless train.sampler_precision=bf16
        energy = energy_fn(x).to(x.dtype)
    (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)
    return energy, grad


def mean_grad_norm(grad: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ‖∇E‖ as a detached 0-d tensor (stays on device: no host sync)."""
    return torch.linalg.vector_norm(grad.detach().flatten(1), dim=1).mean()


class ChainEnds:
    """Callback keeping ∇E at a chain's first and last step. Methods report ‖∇E‖ there only: reducing every
    step's gradient costs a visible share of a small-MLP iteration (docs/performance.md), and the two ends say
    what matters (how steep the start is, whether the chain has settled)."""

    def __init__(self):
        self.first: torch.Tensor | None = None
        self.last: torch.Tensor | None = None

    def __call__(self, info: dict) -> None:
        if self.first is None:
            self.first = info["grad"]
        self.last = info["grad"]


def sample_langevin(
    energy_fn: EnergyFn,
    x0: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    noise_scale: float,
    create_graph: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """`steps` Langevin steps from x0. Returns x_K (detached unless create_graph).

    create_graph=False: every step starts from a detached leaf, so no graph outlives a step (cheap).
    create_graph=True: the whole chain stays differentiable w.r.t. the energy's parameters (and x0, if it
    requires grad) — the self-adversarial generator loss backpropagates through it.

    callback(dict) after each step i with: step, x (= x_{i+1}), energy (per-sample E(x_i)), grad (∇E(x_i));
    tensors detached and unreduced, nothing synchronised with the host.
    """
    noise_std = noise_scale * math.sqrt(step_size)
    # The caller may be evaluating under torch.no_grad(); the dynamics need ∇_x E regardless.
    with torch.enable_grad():
        x = x0 if (create_graph and x0.requires_grad) else x0.detach()
        for i in range(steps):
            if not create_graph or not x.requires_grad:
                x = x.detach().requires_grad_(True)
            energy, grad = energy_and_grad(energy_fn, x, create_graph)
            if create_graph:
                x = _langevin_update(x, grad, step_size, noise_std)
            else:
                with torch.no_grad():  # the update itself needs no graph on the cheap path
                    x = _langevin_update(x, grad, step_size, noise_std)
            if callback is not None:
                callback({"step": i, "x": x.detach(), "energy": energy.detach(), "grad": grad.detach()})
    return x if create_graph else x.detach()


def _langevin_update(x: torch.Tensor, grad: torch.Tensor, step_size: float, noise_std: float) -> torch.Tensor:
    x = x - 0.5 * step_size * grad
    if noise_std > 0:  # σ = 0 skips drawing noise altogether (and keeps the RNG stream untouched)
        x = x + noise_std * torch.randn_like(x)
    return x


def sample_euler(
    energy_fn: EnergyFn,
    x0: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    create_graph: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Noise-free dynamics, paper eq. (7): Langevin with σ = 0 (forward Euler on x' = −∇E, step η/2)."""
    return sample_langevin(
        energy_fn, x0, steps=steps, step_size=step_size, noise_scale=0.0, create_graph=create_graph, callback=callback
    )
