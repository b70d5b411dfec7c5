"""What a method needs to know about its data (no torch: configs and methods both read it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSpec:
    """One example's shape; for 2D toys the plotting / quadrature box [low, high]^2, for images the range
    every pixel lies in."""

    shape: tuple[int, ...]
    kind: str = "toy2d"  # "toy2d" | "image"
    bounds: tuple[float, float] | None = None
    value_range: tuple[float, float] | None = None

    @property
    def dim(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n
