"""2D toy distributions, generated in memory from a `torch.Generator` (same generator state → same points).

Constructions and scales follow FFJORD (Grathwohl et al. 2019, `lib/toy_data.py`) wherever FFJORD defines the
dataset; each dataset's docstring states the scale used. Two deliberate departures from FFJORD's code, both
so that `sample(n)` is an i.i.d. draw for any n: class / ring / moon memberships are drawn at random instead
of split n // k per class, and moons / rings draw their angles uniformly instead of on a linspace.

`bounds` is the square box [low, high]^2 that quadrature and plots use. FFJORD draws its figures on
[-4, 4]^2; we pad that to [-4.5, 4.5]^2 so the box holds essentially all of every FFJORD-scale density
(the 8gaussians and pinwheel tails reach just past 4), which keeps the quadrature log Z honest.

The equal-weight isotropic Gaussian mixtures (8gaussians, 25gaussians, grid) also carry their exact
`log_prob`, so the engine can report the true test log-likelihood next to a model's.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Sampler = Callable[[int, "torch.Generator | None"], Tensor]
LogProb = Callable[[Tensor], Tensor]

FFJORD_BOX = (-4.5, 4.5)
GRID_BOX = (-8.0, 8.0)

# Generate in float64 (cheap at toy sizes) and hand out float32, the dtype networks train in.
_DTYPE = torch.float64


@dataclass(frozen=True)
class ToyDistribution:
    """A named 2D distribution: i.i.d. sampling, a box holding its mass and, where known, its exact log density."""

    name: str
    bounds: tuple[float, float]
    sampler: Sampler
    log_prob: LogProb | None = None
    description: str = ""
    modes: Tensor | None = None  # (K, 2) component means of a mixture: evaluation splits its log-likelihood by mode

    @property
    def has_log_prob(self) -> bool:
        return self.log_prob is not None

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n i.i.d. points as a float32 (n, 2) CPU tensor; `generator` makes the draw reproducible."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self.sampler(n, generator).to(torch.float32).contiguous()


# --- small random helpers: every draw goes through the caller's generator ---------------------------------
def _normal(n: int, generator, dim: int = 2) -> Tensor:
    return torch.randn(n, dim, generator=generator, dtype=_DTYPE)


def _uniform(n: int, generator, dim: int = 1) -> Tensor:
    return torch.rand(n, dim, generator=generator, dtype=_DTYPE)


def _choice(n: int, k: int, generator) -> Tensor:
    return torch.randint(k, (n,), generator=generator)


# --- Gaussian mixtures: exact sampling and log density ---------------------------------------------------
@dataclass(frozen=True)
class GaussianMixture:
    """Equal-weight mixture of isotropic 2D Gaussians N(mean_k, std^2 I)."""

    means: Tensor  # (K, 2)
    std: float

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        component = _choice(n, len(self.means), generator)
        return self.means[component] + self.std * _normal(n, generator)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log density of x (n, 2) → (n,): logsumexp over components of log N(x; mean_k, std^2 I) − log K."""
        means = self.means.to(device=x.device, dtype=x.dtype)
        sq_dist = (x[:, None, :] - means[None, :, :]).pow(2).sum(-1)  # (n, K)
        log_component = -0.5 * sq_dist / self.std**2 - math.log(2 * math.pi * self.std**2)
        return torch.logsumexp(log_component, dim=1) - math.log(len(self.means))


def eight_gaussians() -> GaussianMixture:
    """8gaussians (FFJORD): 8 equal modes on a circle of radius 4/1.414 ≈ 2.83, std 0.5/1.414 ≈ 0.354.

    FFJORD draws centre·4 + N(0, 0.5²) and divides everything by 1.414 (not exactly √2); we keep 1.414 so
    numbers compare with published ones. Box [-4.5, 4.5]^2 (4.7 std past the outermost centres).
    """
    angles = torch.arange(8, dtype=_DTYPE) * (math.pi / 4)
    means = torch.stack([angles.cos(), angles.sin()], dim=1) * 4.0 / 1.414
    return GaussianMixture(means, 0.5 / 1.414)


def twenty_five_gaussians() -> GaussianMixture:
    """25gaussians: 25 equal modes at {-4, -2, 0, 2, 4}^2, std 0.08 (our choice; FFJORD has no 25gaussians).

    The modes are 25 std apart, so the true test log-likelihood is essentially −log 25 − log(2πe·0.08²)
    ≈ −1.01 nats: the neighbourhood of VAEBM's reported −1.10 for its 25-Gaussians (std 0.084 would match it
    exactly; its construction is not given, so we kept a round std). Box [-4.5, 4.5]^2 (6 std past the outer modes).
    """
    ticks = torch.arange(-4.0, 4.5, 2.0, dtype=_DTYPE)
    return GaussianMixture(torch.cartesian_prod(ticks, ticks), 0.08)


def grid_gaussians() -> GaussianMixture:
    """grid (the DiffEBM paper's definition): 9 equal modes at {-5, 0, 5}^2, variance 0.3 (std ≈ 0.548) per
    coordinate. Larger than the FFJORD sets, so its box is [-8, 8]^2 (5.5 std past the outer modes)."""
    ticks = torch.tensor([-5.0, 0.0, 5.0], dtype=_DTYPE)
    return GaussianMixture(torch.cartesian_prod(ticks, ticks), math.sqrt(0.3))


# --- sample-only datasets (FFJORD constructions) ---------------------------------------------------------
def swissroll(n: int, generator=None) -> Tensor:
    """swissroll (FFJORD: sklearn's make_swiss_roll(noise=1.0), columns [x, z], divided by 5).

    t ~ U[1.5π, 4.5π]; point = (t cos t, t sin t)/5 + N(0, 0.2²): a spiral out to radius ≈ 2.83. Box [-4.5, 4.5]^2.
    """
    t = 1.5 * math.pi * (1 + 2 * _uniform(n, generator))
    return (torch.cat([t * t.cos(), t * t.sin()], dim=1) + _normal(n, generator)) / 5


def pinwheel(n: int, generator=None) -> Tensor:
    """pinwheel (FFJORD): 5 arms; radial N(1, 0.3²), tangential N(0, 0.1²), twisted by angle 0.25·exp(radial),
    then ×2 (arms reach radius ≈ 4). Box [-4.5, 4.5]^2."""
    arm = _choice(n, 5, generator)
    features = _normal(n, generator) * torch.tensor([0.3, 0.1], dtype=_DTYPE)
    features[:, 0] += 1.0
    angles = arm.to(_DTYPE) * (2 * math.pi / 5) + 0.25 * features[:, 0].exp()
    cos, sin = angles.cos(), angles.sin()
    # FFJORD's einsum("ti,tij->tj") with rotation [[cos, -sin], [sin, cos]], written out.
    x = features[:, 0] * cos + features[:, 1] * sin
    y = -features[:, 0] * sin + features[:, 1] * cos
    return 2 * torch.stack([x, y], dim=1)


def two_spirals(n: int, generator=None) -> Tensor:
    """2spirals (FFJORD): r = √U·3π (540°), arm (−r cos r, r sin r) + U[0, 0.5)² jitter, mirrored for the
    second spiral (random sign per point), divided by 3, + N(0, 0.1²). Radius ≈ 3.3. Box [-4.5, 4.5]^2."""
    r = _uniform(n, generator).sqrt() * 3 * math.pi
    arm = torch.cat([-r.cos() * r, r.sin() * r], dim=1) + 0.5 * _uniform(n, generator, dim=2)
    sign = 2.0 * _choice(n, 2, generator).to(_DTYPE)[:, None] - 1.0
    return sign * arm / 3 + 0.1 * _normal(n, generator)


def checkerboard(n: int, generator=None) -> Tensor:
    """checkerboard (FFJORD): uniform on 8 of the 16 unit squares of [-2, 2]^2 in a checker pattern, ×2, so
    the support is exactly [-4, 4]^2 in squares of side 2. Box [-4.5, 4.5]^2."""
    x1 = 4 * _uniform(n, generator) - 2
    x2 = _uniform(n, generator) - 2.0 * _choice(n, 2, generator).to(_DTYPE)[:, None]
    x2 = x2 + torch.floor(x1) % 2  # shift every other column up by one square
    return 2 * torch.cat([x1, x2], dim=1)


def rings(n: int, generator=None) -> Tensor:
    """rings (FFJORD): 4 concentric circles of radius 3, 2.25, 1.5, 0.75 (equal mass, uniform angle)
    + N(0, 0.08²). Box [-4.5, 4.5]^2."""
    radius = 0.75 * (1 + _choice(n, 4, generator).to(_DTYPE))[:, None]
    angle = 2 * math.pi * _uniform(n, generator)
    return radius * torch.cat([angle.cos(), angle.sin()], dim=1) + 0.08 * _normal(n, generator)


def moons(n: int, generator=None) -> Tensor:
    """moons (FFJORD's sklearn make_moons(noise=0.1), written out): two interleaved unit half circles,
    upper (cos θ, sin θ) and lower (1 − cos θ, 0.5 − sin θ), θ ~ U[0, π], + N(0, 0.1²), then ×2 + (−1, −0.2):
    x ∈ ≈[-3, 3], y ∈ ≈[-1.2, 1.8]. Box [-4.5, 4.5]^2."""
    theta = math.pi * _uniform(n, generator)
    upper = torch.cat([theta.cos(), theta.sin()], dim=1)
    lower = torch.cat([1 - theta.cos(), 0.5 - theta.sin()], dim=1)
    is_lower = _choice(n, 2, generator).bool()[:, None]
    points = torch.where(is_lower, lower, upper) + 0.1 * _normal(n, generator)
    return points * 2 + torch.tensor([-1.0, -0.2], dtype=_DTYPE)


# --- registry ----------------------------------------------------------------------------------------------
def _sampled(name: str, sampler: Sampler, bounds=FFJORD_BOX) -> ToyDistribution:
    return ToyDistribution(name, bounds, sampler, None, inspect.getdoc(sampler) or "")


def _mixture(name: str, factory: Callable[[], GaussianMixture], bounds=FFJORD_BOX) -> ToyDistribution:
    mixture = factory()
    return ToyDistribution(
        name, bounds, mixture.sample, mixture.log_prob, inspect.getdoc(factory) or "", modes=mixture.means
    )


TOY_DATASETS: dict[str, ToyDistribution] = {
    d.name: d
    for d in (
        _sampled("swissroll", swissroll),
        _mixture("8gaussians", eight_gaussians),
        _mixture("25gaussians", twenty_five_gaussians),
        _mixture("grid", grid_gaussians, bounds=GRID_BOX),
        _sampled("pinwheel", pinwheel),
        _sampled("checkerboard", checkerboard),
        _sampled("2spirals", two_spirals),
        _sampled("rings", rings),
        _sampled("moons", moons),
    )
}
