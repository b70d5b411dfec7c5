"""Exponential moving averages of network weights, for methods that sample or read densities off an average
of their recent networks rather than the latest one (ddaebm, diffebm).

Why: a network trained against a moving partner (an adversarial energy, a control chasing an energy) carries
step-to-step noise in its weights; samples and densities read off one step inherit it, the average much less.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverages:
    """Frozen EMA copies of some of a method's networks, kept in its `networks` dict as "<name>_ema" (so
    checkpoints, device moves and rank broadcasts cover them like any other network), updated with the usual
    warm-up: the decay used at update k is min(decay, (1 + k) / (10 + k)). Without it an average that starts
    at the random init keeps ~exp(−k(1 − decay)) of that init for thousands of steps, which a short toy run
    never outgrows. decay = 0: no copies, and `network(name)` is the live network."""

    def __init__(self, decay: float, networks: dict[str, nn.Module], names: tuple[str, ...]):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.networks, self.updates = decay, networks, 0
        if decay > 0:
            for name in names:
                networks[f"{name}_ema"] = copy.deepcopy(networks[name]).requires_grad_(False)

    def step(self) -> None:
        """Count one training iteration (once per iteration, before its update() calls)."""
        self.updates += 1

    @torch.no_grad()
    def update(self, *names: str) -> None:
        """Move each named average toward its live network by the current (warmed-up) decay; buffers are
        copied as they are."""
        if self.decay == 0:
            return
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name in names:
            ema, live = self.networks[f"{name}_ema"], self.networks[name]
            torch._foreach_lerp_(list(ema.parameters()), list(live.parameters()), 1.0 - decay)
            for b_ema, b in zip(ema.buffers(), live.buffers()):
                b_ema.copy_(b)

    def network(self, name: str) -> nn.Module:
        """The averaged network where there is one, else the live one."""
        return self.networks.get(f"{name}_ema", self.networks[name])
