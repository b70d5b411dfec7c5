"""Autocast inside samplers: off by default, so MCMC / ODE energy passes run in fp32 under a bf16 run.

A chain takes many small gradient steps; bf16's 8-bit mantissa in ∇E would add rounding to every one of
them. The loop enters `sampler_autocast(False)` inside its bf16 autocast region and the samplers' energy
evaluations go through `energy_autocast(x)`, which switches autocast off unless the run asked for bf16
chains (train.sampler_precision=bf16). A ContextVar, like torch's own autocast state, so a sampler's
signature stays the same (k-diffusion style: knobs explicit, precision is the run's setting).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch

_SAMPLER_BF16: ContextVar[bool] = ContextVar("ebm_scale_sampler_bf16", default=True)


@contextlib.contextmanager
def sampler_autocast(bf16: bool):
    """Within this block samplers keep the surrounding autocast (bf16=True) or turn it off (bf16=False)."""
    token = _SAMPLER_BF16.set(bf16)
    try:
        yield
    finally:
        _SAMPLER_BF16.reset(token)


def energy_autocast(x: torch.Tensor):
    """The context a sampler evaluates the energy in: autocast off when the run keeps chains in fp32."""
    if _SAMPLER_BF16.get() or not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)
