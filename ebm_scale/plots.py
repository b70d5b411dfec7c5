"""Pictures of 2D samples and densities, written straight to PNG.

Figures are built with matplotlib's object API on an explicit Agg canvas, never through pyplot: no global
backend switch, no figure registry to leak into, safe in Ray workers and threads. Nothing to close.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
PANEL_INCHES = 4.0
DATA_COLOUR = "#c8c8c8"  # light grey: the data is the backdrop the samples are judged against
SAMPLE_COLOUR = "tab:blue"
CMAP = "viridis"


def plot_samples(samples, data, path: Path | str, title: str | None = None,
                 bounds: tuple[float, float] | None = None) -> Path:
    """Scatter of model samples (coloured) over data points (light grey), equal aspect. Non-finite samples are
    left out and counted in the legend. `bounds` fixes both axes to [low, high]."""
    samples, data = _points(samples), _points(data)
    finite = np.isfinite(samples).all(axis=1)
    fig, ax = _figure(1)
    ax = ax[0]
    ax.scatter(data[:, 0], data[:, 1], s=3, c=DATA_COLOUR, linewidths=0, label=f"data ({len(data)})")
    sample_label = f"samples ({finite.sum()})" + (f", {(~finite).sum()} non-finite dropped" if not finite.all() else "")
    ax.scatter(samples[finite, 0], samples[finite, 1], s=3, c=SAMPLE_COLOUR, alpha=0.6, linewidths=0, label=sample_label)
    if bounds is not None:
        ax.set_xlim(*bounds)
        ax.set_ylim(*bounds)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.legend(loc="upper right", markerscale=3, fontsize="small", framealpha=0.8)
    return _save(fig, path, title)


def plot_densities(grids: Mapping[str, Sequence], path: Path | str, title: str | None = None) -> Path:
    """Side-by-side heatmaps, one per name: grids[name] = (xs (G,), ys (G,), values (G, G)) with values[i, j]
    at (xs[j], ys[i]). Each panel has its own colour bar, since densities can differ by orders of magnitude."""
    if not grids:
        raise ValueError("plot_densities needs at least one grid")
    fig, axes = _figure(len(grids))
    for ax, (name, (xs, ys, values)) in zip(axes, grids.items()):
        xs, ys, values = _array(xs), _array(ys), _array(values)
        dx, dy = (xs[1] - xs[0]) / 2, (ys[1] - ys[0]) / 2  # cell centres → cell edges
        image = ax.imshow(values, origin="lower", cmap=CMAP, interpolation="nearest",
                          extent=(xs[0] - dx, xs[-1] + dx, ys[0] - dy, ys[-1] + dy))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(name)
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
    return _save(fig, path, title)


def _figure(panels: int):
    fig = Figure(figsize=(PANEL_INCHES * panels + 0.6 * (panels > 1), PANEL_INCHES + 0.4), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _save(fig: Figure, path: Path | str, title: str | None) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _array(x) -> np.ndarray:
    """Tensor or array-like → float numpy array on the host."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _points(x) -> np.ndarray:
    return _array(x).reshape(-1, 2)
