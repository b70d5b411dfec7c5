"""Embeddings of a scalar time (a diffusion step t ∈ {0..T} or a continuous t ∈ [0, 1]) into a vector.

Nets cannot use a raw scalar t well: a Linear of t is a single direction in feature space. Both embeddings
here map t to sines and cosines over many frequencies, so nearby and distant times are easy to tell apart.

* ``sinusoidal`` — the transformer's positional encoding (Vaswani et al.), as DDPM uses it: fixed
  geometric frequencies 1 .. 1/max_period. Made for integer steps; a t ∈ [0, 1] wants scaling up first
  (the nets' ``time_scale``), otherwise every frequency but the first few sees an almost constant input.
* ``fourier`` — random Fourier features (Tancik et al.; Song et al.'s GaussianFourierProjection, the PIS
  "Fourier MLP" of Zhang & Chen): frequencies drawn once from N(0, scale²). Made for t ∈ [0, 1].
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def batch_times(t: torch.Tensor | float | int, n: int) -> torch.Tensor:
    """t as an (n,) tensor: a 0-d tensor or a Python number is one time for the whole batch."""
    t = torch.as_tensor(t)
    if t.dim() == 0:
        return t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"times must have shape ({n},) or be a scalar, got {tuple(t.shape)}")
    return t


def _check_dim(dim: int) -> None:
    if dim < 2 or dim % 2:
        raise ValueError(f"embedding dim must be even and >= 2 (half sines, half cosines), got {dim}")


class SinusoidalEmbedding(nn.Module):
    """(n,) times → (n, dim) = [sin(t·f_k), cos(t·f_k)], f_k = max_period^(−k/(dim/2)), k = 0 .. dim/2 − 1."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        _check_dim(dim)
        half = dim // 2
        # A buffer so the frequencies follow .to(device/dtype); not persistent, because they are a pure
        # function of (dim, max_period) and checkpoints should not depend on them.
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs  # integer steps are cast to float here
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class FourierFeatures(nn.Module):
    """(n,) times → (n, dim) = [sin(2π t W), cos(2π t W)], W ~ N(0, scale²) of size dim/2, drawn once.

    W is a buffer, not a Parameter: it stays fixed (as in Song et al.) but is saved in the state_dict,
    because it was drawn from the global RNG and a reloaded net must see the same features."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        _check_dim(dim)
        self.register_buffer("weight", torch.randn(dim // 2) * scale)
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = (2 * math.pi) * t.to(self.weight.dtype)[:, None] * self.weight
        return torch.cat([angles.sin(), angles.cos()], dim=1)


EMBEDDINGS: dict[str, Callable[[int], nn.Module]] = {"sinusoidal": SinusoidalEmbedding, "fourier": FourierFeatures}
