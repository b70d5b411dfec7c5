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
    """Frozen EMA copies of some named networks of a method, updated with the usual warm-up: the decay used at
    update k is min(decay, (1 + k) / (10 + k)). Without it an average that starts at the random init keeps
    ~exp(−k(1 − decay)) of that init for thousands of steps, which a short toy run never outgrows."""

    def __init__(self, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    @staticmethod
    def copy_of(live: nn.Module) -> nn.Module:
        """The average's starting point: a frozen deep copy of the live network."""
        return copy.deepcopy(live).requires_grad_(False)

    def step(self) -> None:
        """Count one training iteration (call once per iteration, before its update() calls)."""
        self.updates += 1

    @torch.no_grad()
    def update(self, ema: nn.Module, live: nn.Module) -> None:
        """Move `ema` toward `live` by the current (warmed-up) decay; buffers are copied as they are."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(ema.parameters()), list(live.parameters()), 1.0 - decay)
        for b_ema, b in zip(ema.buffers(), live.buffers()):
            b_ema.copy_(b)
