"""Samplers: one calling convention (as in k-diffusion), diagnostics through a callback.

    x = sampler(energy_fn, x0, *, <its knobs>, create_graph=False, callback=None)

`energy_fn(x) -> (n,)` per-sample energies (density ∝ exp(−E)); `x0` the chains' starting points;
`create_graph=True` keeps the result differentiable w.r.t. the energy's parameters; `callback(dict)` is
called once per step with at least {"step", "x", "energy", "grad"}: the step's point, per-sample energies
and ∇E, detached and unreduced. The sampler computes nothing for the callback, so diagnostics cost only
what the consumer reduces (e.g. `mean_grad_norm` on the steps it cares about), and nothing syncs the host.
The knobs are keyword-only and named like the config fields that set them, so a method can fill them
from its config by name (see `sampler_knobs`).
"""

from __future__ import annotations

import inspect
from typing import Callable

from ebm_scale.samplers.chains import CHAIN_INITS, ChainInit, DataInit, NoiseInit, ReplayBuffer
from ebm_scale.samplers.hmc import HmcStats, sample_hmc
from ebm_scale.samplers.langevin import ChainEnds, mean_grad_norm, sample_euler, sample_langevin
from ebm_scale.samplers.ode import ODE_SOLVERS, ode_log_density, sample_ode

SAMPLERS: dict[str, Callable] = {
    "langevin": sample_langevin,
    "euler": sample_euler,
    "ode": sample_ode,
    "hmc": sample_hmc,
}

_CONVENTION_ARGS = {"energy_fn", "x0", "create_graph", "callback"}


def sampler_knobs(sampler: Callable) -> tuple[str, ...]:
    """The keyword-only knobs a sampler takes beyond the shared convention, e.g. ("steps", "step_size")."""
    return tuple(
        name
        for name, p in inspect.signature(sampler).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _CONVENTION_ARGS
    )


__all__ = [
    "CHAIN_INITS",
    "ChainEnds",
    "ChainInit",
    "DataInit",
    "HmcStats",
    "NoiseInit",
    "ODE_SOLVERS",
    "ReplayBuffer",
    "SAMPLERS",
    "mean_grad_norm",
    "ode_log_density",
    "sample_euler",
    "sample_langevin",
    "sample_ode",
    "sampler_knobs",
    "sample_hmc",
]
