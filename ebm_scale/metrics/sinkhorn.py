"""Sinkhorn distance between two point clouds (uniform weights): the transport cost <P, C> of the entropic plan.

Why not POT's solvers: at the regularisation this project uses (reg = 0.05 against squared distances up to
~100) POT 0.9's `sinkhorn_stabilized` / `sinkhorn_epsilon_scaling` return a near-empty plan (cost ≈ 1e-8)
once n ≳ 1000 and NaN for far-apart clouds, plain `sinkhorn` underflows, and `sinkhorn_log` is correct but
does a full exp of the n×m matrix per iteration (slow: docs/performance.md). The
solver below is the standard remedy (Schmitzer 2019): ε-scaling — anneal ε from the cost scale down to reg,
warm-starting the dual potentials — with the scalings absorbed into the potentials, so the inner loop is two
mat-vecs per iteration and nothing underflows. Why not even `ot.dist` for the cost: `import ot` takes seconds
(it pulls in sklearn, networkx, scipy) in every training worker, for what is one torch.cdist here.
tests/test_metrics.py checks cost and plan against `ot.dist` + `ot.sinkhorn2(method="sinkhorn_log")`.

Everything runs in float64 on the inputs' device with a fixed sequence of operations: deterministic.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor


def _euclidean(x: Tensor, y: Tensor) -> Tensor:
    # Direct differences rather than the |x|² + |y|² − 2x·y expansion: exact (no cancellation) and cheap in 2D.
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


# name → cost matrix (n, m); the names and definitions are POT's `ot.dist` metrics of the same names.
SINKHORN_COSTS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sqeuclidean": lambda x, y: _euclidean(x, y).square(),
    "euclidean": _euclidean,
}

_CHECK_EVERY = 10  # iterations between convergence checks (each costs one extra mat-vec)
_ABSORB_AT = 50.0  # |log scaling| beyond which the scalings are folded into the potentials (e^50 ≪ float64 max)
# Kernel entries below e^-200 are set to exactly 0. Near the optimum every row and column holds entries ≳ e^-30,
# so this changes no sum in float64; left in, exp() makes subnormal numbers, which slow the mat-vecs
# several-fold (docs/performance.md).
_KERNEL_FLOOR = -200.0


def sinkhorn_distance(
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    reg: float = 0.05,
    cost: str = "sqeuclidean",
    num_iter: int = 1000,
    tol: float = 1e-6,
) -> float:
    """<P, C> for the entropic OT plan P between the uniform empirical measures on x (n, d) and y (m, d).

    C = SINKHORN_COSTS[cost](x, y), equal to ot.dist(x, y, metric=cost); `reg` is the entropic ε in the units
    of C. `num_iter` caps the Sinkhorn iterations at the target ε (ε-scaling adds ~10 per halving of ε before
    that); iteration stops early once the marginals are met to `tol` in L1. Non-finite points make the distance
    infinite (returned, not raised).
    """
    if cost not in SINKHORN_COSTS:
        raise ValueError(f"unknown Sinkhorn cost {cost!r}; allowed: {', '.join(SINKHORN_COSTS)}")
    if reg <= 0:
        raise ValueError(f"reg must be > 0, got {reg}")
    x = torch.as_tensor(x).detach().to(torch.float64)
    y = torch.as_tensor(y).detach().to(device=x.device, dtype=torch.float64)
    if len(x) == 0 or len(y) == 0:
        raise ValueError("sinkhorn_distance needs at least one point on each side")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return math.inf
    cost_matrix = SINKHORN_COSTS[cost](x, y)
    plan = entropic_plan(cost_matrix, reg, num_iter=num_iter, tol=tol)
    return float((plan * cost_matrix).sum())


def entropic_plan(
    cost_matrix: Tensor, reg: float, num_iter: int = 1000, tol: float = 1e-6, scaling: float = 0.5, stage_iter: int = 10
) -> Tensor:
    """Entropic OT plan between uniform weights by ε-scaling Sinkhorn with absorption.

    ε goes cost_max·scaling, cost_max·scaling², ... down to reg, with `stage_iter` iterations per annealing
    stage (enough to carry the potentials along) and up to `num_iter` at ε = reg.
    """
    n, m = cost_matrix.shape
    a = cost_matrix.new_full((n,), 1.0 / n)
    b = cost_matrix.new_full((m,), 1.0 / m)
    f, g = cost_matrix.new_zeros(n), cost_matrix.new_zeros(m)
    eps = max(float(cost_matrix.max()), reg)
    while True:
        eps = max(eps * scaling, reg)
        final = eps == reg
        f, g = _sinkhorn_stage(cost_matrix, a, b, f, g, eps, num_iter if final else stage_iter, tol if final else 0.0)
        if final:
            return _gibbs(cost_matrix, f, g, eps)


def _gibbs(cost_matrix: Tensor, f: Tensor, g: Tensor, eps: float) -> Tensor:
    """exp((f_i + g_j − C_ij) / ε): the plan for dual potentials (f, g); ≲ 1 entrywise near the optimum."""
    exponent = (f[:, None] + g[None, :] - cost_matrix) / eps
    return exponent.masked_fill_(exponent < _KERNEL_FLOOR, -math.inf).exp_()


def _sinkhorn_stage(cost_matrix, a, b, f, g, eps: float, iters: int, tol: float) -> tuple[Tensor, Tensor]:
    """Sinkhorn iterations at one ε starting from potentials (f, g); returns the updated potentials."""
    kernel = _gibbs(cost_matrix, f, g, eps)
    u, v = torch.ones_like(a), torch.ones_like(b)
    for it in range(1, iters + 1):
        u = a / (kernel @ v)
        v = b / (kernel.T @ u)
        if it % _CHECK_EVERY and it != iters:
            continue
        # After the v-update the column marginals are exact; the row marginals measure convergence.
        if tol > 0 and float((u * (kernel @ v) - a).abs().sum()) < tol:
            break
        if max(float(u.log().abs().max()), float(v.log().abs().max())) > _ABSORB_AT:
            f, g = f + eps * u.log(), g + eps * v.log()
            kernel = _gibbs(cost_matrix, f, g, eps)
            u, v = torch.ones_like(a), torch.ones_like(b)
    return f + eps * u.log(), g + eps * v.log()
