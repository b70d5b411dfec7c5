"""Hamiltonian Monte Carlo with a multiplicatively adapted step size (paper 002, §3 and appendix A.4).

One transition: draw p ~ N(0, I), run L leapfrog steps on H(x, p) = E(x) + ½|p|², accept the end point with
probability min(1, exp(−ΔH)) — per chain (each row of x is its own chain). The Metropolis–Hastings test makes
the chain exact whatever the step size: ε only trades acceptance against distance travelled.

Step size: one scalar shared by all chains, adapted after every transition by the "simple adaptive policy"
(Andrieu & Thoms 2008; TFP's SimpleStepSizeAdaptation): ε·(1 + rate) if the mean acceptance probability
over chains exceeds the target, else ε/(1 + rate). Paper 002 targets 0.651 (Beskos et al. 2013, optimal
for HMC as the dimension grows). ε lives in a 0-d tensor on x's device and the choice is a torch.where, so
adapting never synchronises with the host. Adapting forever makes the chain only approximately invariant;
once ε has settled its ±rate jitter is harmless, and persistent training chains need ε to follow a moving
energy anyway.
"""

from __future__ import annotations

import torch

from ebm_scale.samplers.langevin import Callback, ChainEnds, EnergyFn, energy_and_grad


def sample_hmc(
    energy_fn: EnergyFn,
    x0: torch.Tensor,
    *,
    steps: int,
    leapfrog_steps: int,
    step_size: float | torch.Tensor,
    target_accept: float = 0.651,
    adapt: bool = True,
    adapt_rate: float = 0.02,
    create_graph: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """`steps` HMC transitions of `leapfrog_steps` leapfrog steps each from x0 (any shape (n, ...)); returns x.

    `step_size` may be a float or the 0-d tensor a previous call reported, so persistent chains carry their
    adapted step size across calls. callback(dict) after each transition i with: step, x (the chain state
    after accept/reject), energy (per-sample E(x)), grad (∇E(x)), accept_prob (per chain, min(1, exp(−ΔH))),
    accepted (per chain, bool) and step_size (0-d tensor, the ε the NEXT transition uses); all detached and
    unreduced, nothing synchronised with the host.
    """
    if leapfrog_steps < 1:
        raise ValueError(f"sample_hmc needs leapfrog_steps >= 1, got {leapfrog_steps}")
    if create_graph:
        raise ValueError(
            "sample_hmc cannot run with create_graph=True: the Metropolis–Hastings accept/reject "
            "step is not differentiable; use a gradient-based sampler (langevin) for that"
        )
    x = x0.detach()
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    x = x.to(dtype)
    eps = torch.as_tensor(step_size, dtype=dtype, device=x.device).detach().clone()
    grow, shrink = eps.new_tensor(1 + adapt_rate), eps.new_tensor(1 / (1 + adapt_rate))
    row = (-1,) + (1,) * (x.dim() - 1)  # broadcasts a per-chain (n,) value over a chain's state
    energy, grad = _energy_and_grad(energy_fn, x)  # carried along: each transition costs L evaluations, not L+1
    for i in range(steps):
        p = torch.randn_like(x)
        x_new, p_new, energy_new, grad_new = _leapfrog(energy_fn, x, p, grad, eps, leapfrog_steps)
        delta_h = (energy_new - energy) + 0.5 * (_sq_norm(p_new) - _sq_norm(p))
        # A diverged trajectory (non-finite energy or position) is not a proposal to take: reject it. A NaN ΔH
        # (e.g. a NaN momentum) gives probability 0 too; a chain stuck at E = +inf accepts any finite proposal.
        finite = torch.isfinite(energy_new) & torch.isfinite(x_new.flatten(1)).all(1)
        accept_prob = torch.where(finite, torch.exp(-delta_h.clamp(min=0)), 0.0).nan_to_num(nan=0.0)
        accepted = torch.rand_like(accept_prob) < accept_prob  # rand ∈ [0, 1): prob 0 never, prob 1 always
        x = torch.where(accepted.view(row), x_new, x)
        energy = torch.where(accepted, energy_new, energy)
        grad = torch.where(accepted.view(row), grad_new, grad)
        if adapt:
            eps = eps * torch.where(accept_prob.mean() > target_accept, grow, shrink)
        if callback is not None:
            callback(
                {
                    "step": i,
                    "x": x,
                    "energy": energy,
                    "grad": grad,
                    "accept_prob": accept_prob,
                    "accepted": accepted,
                    "step_size": eps,
                }
            )
    return x


def _leapfrog(energy_fn, x, p, grad, eps, n_steps):
    """Störmer–Verlet: half momentum step, (n_steps − 1) full position/momentum steps, half momentum step.
    Volume-preserving and reversible, which is what lets the MH test use ΔH alone."""
    p = p - 0.5 * eps * grad
    for k in range(n_steps):
        x = x + eps * p
        energy, grad = _energy_and_grad(energy_fn, x)
        p = p - (eps if k < n_steps - 1 else 0.5 * eps) * grad
    return x, p, energy, grad


def _energy_and_grad(energy_fn: EnergyFn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The caller may be under torch.no_grad(); the dynamics need ∇_x E regardless. Each evaluation starts from
    # a detached leaf, so no graph outlives it (and nothing reaches the energy's parameters' .grad).
    with torch.enable_grad():
        energy, grad = energy_and_grad(energy_fn, x.detach().requires_grad_(True), create_graph=False)
    return energy.detach().to(x.dtype), grad.detach()


def _sq_norm(p: torch.Tensor) -> torch.Tensor:
    return p.flatten(1).pow(2).sum(1)


class HmcStats(ChainEnds):
    """sample_hmc callback: ∇E at the first and last transition (ChainEnds), the mean acceptance probability
    over transitions and the step size the next transition would use — all left on device (no host sync)."""

    def __init__(self):
        super().__init__()
        self.accept_sum: torch.Tensor | None = None
        self.count = 0
        self.step_size: torch.Tensor | None = None

    def __call__(self, info: dict) -> None:
        super().__call__(info)
        accept = info["accept_prob"].mean()
        self.accept_sum = accept if self.accept_sum is None else self.accept_sum + accept
        self.count += 1
        self.step_size = info["step_size"]

    def mean_accept(self) -> torch.Tensor:
        return self.accept_sum / self.count
