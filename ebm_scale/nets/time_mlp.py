"""Time-conditioned MLPs for flat (2D toy) data: f(x, t) → vector and E(x, t) → scalar.

Conditioning as in the DDGAN / DDAEBM toy MLPs: t is embedded (ebm_scale/diffusion/embeddings.py), and
every hidden layer gets a Linear of the embedding ADDED to its pre-activation,

    h_{l+1} = act(W_l h_l + b_l + A_l emb(t · time_scale)).

Why per layer rather than concatenating t to the input: the time signal reaches every layer directly
instead of having to survive the first layer's mixing (with one input feature among hundreds it fades).

The inputs may be several tensors, concatenated (each flattened) along dim 1: the DDAEBM generator
G(x_t, z, t) is ``TimeMLP(dim + z_dim, dim)`` called on ``(x_t, z)``, its encoder q(z | x_{t-1}, x_t, t)
is ``TimeMLP(2 * dim, 2 * z_dim)`` called on ``(x_prev, x_t)``; z may be an empty (n, 0) tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

from ebm_scale.diffusion.embeddings import EMBEDDINGS, batch_times
from ebm_scale.nets.mlp import ACTIVATIONS, ScalarHead
from ebm_scale.schema import Config, Rule, knob

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass
class TimeMLPConfig(Config):
    hidden: int = knob(300, ge=1)
    # Linear layers in total, output layer included (so layers − 1 time-conditioned hidden layers). One Linear
    # layer has no hidden layer to condition on t, and is linear in x.
    layers: int = knob(3, ge=2, note="Linear layers in total")
    activation: str = knob("prelu", choices=ACTIVATIONS, noun="activation")
    # sinusoidal (integer steps) | fourier (t ∈ [0, 1])
    embedding: str = knob("sinusoidal", choices=EMBEDDINGS, noun="time embedding")
    embed_dim: int = knob(64, ge=2, note="half sines, half cosines")  # and even: rules()
    # t is multiplied by this before embedding: integer steps t ∈ {0..T} embed fine as they are (1.0), a
    # continuous t ∈ [0, 1] wants ~1000 for the sinusoidal embedding (its frequencies are made for steps).
    time_scale: float = knob(1.0, gt=0)

    def rules(self):
        yield even_embed_dim(self.embed_dim)


def even_embed_dim(embed_dim: int) -> Rule:
    """Half sines, half cosines: the time embedding's width must be even (TimeMLPConfig and UNetConfig)."""
    return Rule("embed_dim", embed_dim % 2 == 0, f"must be even (half sines, half cosines), got {embed_dim}")


def flat_inputs(x: Inputs) -> torch.Tensor:
    """One (n, d) tensor from a tensor or a sequence of tensors (n, ...), each flattened, joined on dim 1."""
    parts = list(x) if isinstance(x, (tuple, list)) else [x]
    # Not reshape(n, -1): an empty (n, 0) latent has no elements to infer the -1 from.
    parts = [p if p.dim() == 2 else p.unsqueeze(1) if p.dim() == 1 else p.flatten(1) for p in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class TimeTrunk(nn.Module):
    """The shared body: (inputs, t) → (n, hidden) features of the last hidden layer."""

    def __init__(self, in_dim: int, cfg: TimeMLPConfig):
        super().__init__()
        widths = [in_dim] + [cfg.hidden] * (cfg.layers - 1)
        self.linears = nn.ModuleList(nn.Linear(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.acts = nn.ModuleList(ACTIVATIONS[cfg.activation]() for _ in self.linears)  # PReLU: own slope each
        self.embed = EMBEDDINGS[cfg.embedding](cfg.embed_dim)
        # The per-layer time Linears A_l, fused into one (same init: each has fan-in embed_dim): one matmul per
        # call instead of one per layer; samplers evaluate these nets many times per training step.
        self.time_proj = nn.Linear(cfg.embed_dim, cfg.hidden * len(self.linears))
        self.time_scale = cfg.time_scale
        self.in_dim, self.width = in_dim, cfg.hidden

    def forward(self, x: Inputs, t: torch.Tensor | float) -> torch.Tensor:
        h = flat_inputs(x)
        t = batch_times(t, len(h)).to(self.time_proj.weight.dtype) * self.time_scale
        shifts = self.time_proj(self.embed(t)).chunk(len(self.linears), dim=1)
        for linear, act, shift in zip(self.linears, self.acts, shifts):
            h = act(linear(h) + shift)
        return h


class TimeMLP(nn.Module):
    """f(x, t): (n, in_dim) (or a sequence of tensors totalling in_dim features), (n,) or 0-d t → (n, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, cfg: TimeMLPConfig | None = None):
        super().__init__()
        cfg = cfg or TimeMLPConfig()
        if out_dim < 1:  # a zero-width Linear warns at init; a caller with nothing to predict needs no net
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        self.trunk = TimeTrunk(in_dim, cfg)
        self.out = nn.Linear(cfg.hidden, out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Inputs, t: torch.Tensor | float) -> torch.Tensor:
        return self.out(self.trunk(x, t))


class TimeEnergyMLP(nn.Module):
    """E(x, t): (n, *shape) with prod(shape) == in_dim, (n,) or 0-d t → (n,) energies."""

    def __init__(self, in_dim: int, cfg: TimeMLPConfig | None = None):
        super().__init__()
        cfg = cfg or TimeMLPConfig()
        self.trunk = TimeTrunk(in_dim, cfg)
        self.head = ScalarHead(cfg.hidden)
        self.in_dim = in_dim

    def forward(self, x: Inputs, t: torch.Tensor | float) -> torch.Tensor:
        return self.head(self.trunk(x, t))
