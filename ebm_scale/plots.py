"""Pictures of 2D samples and densities, and parallel coordinates of a sweep's trials, written straight to PNG.

Figures are built with matplotlib's object API on an explicit Agg canvas, never through pyplot: no global
backend switch, no figure registry to leak into, safe in Ray workers and threads. Nothing to close.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, NullFormatter

DPI = 100
PANEL_INCHES = 4.0
DATA_COLOUR = "#c8c8c8"  # light grey: the data is the backdrop the samples are judged against
SAMPLE_COLOUR = "tab:blue"
CMAP = "viridis"  # dark to yellow: no end of it vanishes on a white background
LOG_DENSITY_RANGE = 10.0  # nats shown below the top of a log-density scale: e^-10 of the peak is background


def plot_samples(
    samples, data, path: Path | str, title: str | None = None, bounds: tuple[float, float] | None = None
) -> Path:
    """Scatter of model samples (coloured) over data points (light grey), equal aspect. Non-finite samples are
    left out and counted in the legend. `bounds` fixes both axes to [low, high]."""
    samples, data = _points(samples), _points(data)
    finite = np.isfinite(samples).all(axis=1)
    fig, ax = _figure(1, title)
    ax = ax[0]
    ax.scatter(data[:, 0], data[:, 1], s=3, c=DATA_COLOUR, linewidths=0, label=f"data ({len(data)})")
    sample_label = f"samples ({finite.sum()})" + (f", {(~finite).sum()} non-finite dropped" if not finite.all() else "")
    ax.scatter(
        samples[finite, 0], samples[finite, 1], s=3, c=SAMPLE_COLOUR, alpha=0.6, linewidths=0, label=sample_label
    )
    if bounds is not None:
        ax.set_xlim(*bounds)
        ax.set_ylim(*bounds)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.legend(loc="upper right", markerscale=3, fontsize="small", framealpha=0.8)
    return _save(fig, path, title)


def plot_densities(
    grids: Mapping[str, Sequence],
    path: Path | str,
    title: str | None = None,
    reference: str | None = None,
    log_range: float = LOG_DENSITY_RANGE,
) -> Path:
    """Side-by-side heatmaps of log-densities, one per name: grids[name] = (xs (G,), ys (G,), log_values (G, G))
    with log_values[i, j] at (xs[j], ys[i]).

    All panels share one colour scale, so a colour is the same density in every panel: its top is the highest
    value of the `reference` panel (the truth, when there is one: the scale then stays put from one evaluation
    to the next) or of all panels, and it spans `log_range` nats below that. A linear scale would show a density
    whose peak is far above the rest as one blob; values outside the range are drawn in the end colours."""
    if not grids:
        raise ValueError("plot_densities needs at least one grid")
    arrays = {name: tuple(_array(a) for a in grid) for name, grid in grids.items()}
    top = _finite_max(
        arrays[reference][2]
        if reference in arrays
        else np.concatenate([values.ravel() for _, _, values in arrays.values()])
    )
    norm = Normalize(vmin=top - log_range, vmax=top)
    fig, axes = _figure(len(grids), title)
    for ax, (name, (xs, ys, values)) in zip(axes, arrays.items(), strict=True):
        dx, dy = (xs[1] - xs[0]) / 2, (ys[1] - ys[0]) / 2  # cell centres → cell edges
        image = ax.imshow(
            values,
            origin="lower",
            cmap=CMAP,
            norm=norm,
            interpolation="nearest",
            extent=(xs[0] - dx, xs[-1] + dx, ys[0] - dy, ys[-1] + dy),
        )
        ax.set_title(name)
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
    fig.colorbar(
        image, ax=list(axes), fraction=0.04, pad=0.02, extend="both", label=f"log density (top {log_range:g} nats)"
    )
    return _save(fig, path, title)


@dataclass(frozen=True)
class ParallelAxis:
    """One vertical axis of a parallel-coordinates plot: a value per line. With `choices`, values index into
    them; otherwise the axis spans [low, high], log-spaced when `log`."""

    name: str
    values: Sequence[float]
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    choices: Sequence | None = None

    def positions(self) -> np.ndarray:
        """Each line's height on this axis, 0 (bottom) to 1 (top)."""
        values = np.asarray(self.values, dtype=np.float64)
        if self.choices is not None:
            return values / max(len(self.choices) - 1, 1) if len(self.choices) > 1 else np.full_like(values, 0.5)
        low, high = (np.log10(self.low), np.log10(self.high)) if self.log else (self.low, self.high)
        scaled = np.log10(values) if self.log else values
        return (scaled - low) / (high - low) if high > low else np.full_like(values, 0.5)

    def ticks(self) -> list[tuple[float, str]]:
        """(height, label) of each choice, or of the bottom, middle and top of the range."""
        if self.choices is not None:
            labels = [f"{c:g}" if isinstance(c, float) else str(c) for c in self.choices]
            at = ParallelAxis("", range(len(labels)), choices=labels)
        else:
            middle = np.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
            at = ParallelAxis("", [self.low, middle, self.high], self.low, self.high, self.log)
            labels = [f"{v:.3g}" for v in at.values]
        return list(zip(at.positions().tolist(), labels, strict=True))


def plot_parallel_coordinates(
    axes: Sequence[ParallelAxis],
    values: Sequence[float],
    groups: Sequence[str],
    path: Path | str,
    value_name: str,
    lower_is_better: bool = True,
    log_values: bool = False,
    title: str | None = None,
) -> Path:
    """One line per trial through its parameters (`axes`) to its value (the last axis), coloured by value.
    Lines of the first group to appear in `groups` are solid, the other groups' dashed or dotted (legend: each
    group and its count); better lines are drawn on top, the best one thicker. Axis names are shortened to the
    fewest trailing dotted parts (at least two) that keep them distinct, and slanted so long ones stay readable."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        raise ValueError("plot_parallel_coordinates needs at least one line")
    log_values = log_values and bool((values > 0).all())
    low, high = float(values.min()), float(values.max())
    if high == low:
        low, high = (low / 2, high * 2) if log_values else (low - 0.5, high + 0.5)
    objective = ParallelAxis(value_name, values, low, high, log_values)
    columns = [*axes, objective]
    heights = np.stack([column.positions() for column in columns], axis=1)  # (lines, axes)
    norm = LogNorm(low, high) if log_values else Normalize(low, high)
    cmap = CMAP if lower_is_better else CMAP + "_r"  # the best lines dark, the worst yellow
    names = list(dict.fromkeys(groups))
    styles = dict(zip(names, ["-", "--", ":", "-."] * len(names), strict=False))

    fig = Figure(figsize=(max(7.0, 1.7 * len(columns) + 2), 4.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    order = np.argsort(-values if lower_is_better else values, kind="stable")  # worst first: the best on top
    colours = matplotlib.colormaps[cmap]
    for rank, i in enumerate(order):
        best = rank == len(order) - 1
        ax.plot(
            range(len(columns)),
            heights[i],
            color=colours(norm(values[i])),
            ls=styles[groups[i]],
            lw=2.6 if best else 1.4,
            alpha=1.0 if best else 0.85,
            zorder=3 + rank,
            gid=groups[i],
        )
    for j, column in enumerate(columns):
        ax.axvline(j, color="black", lw=0.8, zorder=1)
        for height, text in column.ticks():
            ax.text(
                j + 0.04,
                height,
                text,
                fontsize=7,
                va="center",
                ha="left",
                zorder=2,
                bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7},
            )
    ax.set_xticks(range(len(columns)), short_names([c.name for c in axes]) + [value_name], rotation=20, ha="right")
    ax.set_xlim(-0.1, len(columns) - 0.6)
    ax.set_ylim(-0.05, 1.05)
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    bar = fig.colorbar(
        ScalarMappable(norm=norm, cmap=cmap),
        ax=ax,
        fraction=0.04,
        pad=0.02,
        label=f"{value_name} ({'lower' if lower_is_better else 'higher'} is better)",
    )
    bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    # a log scale within one decade has no major tick to label: label its minor ones then, never both
    bar.ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g") if high < 10 * low else NullFormatter())
    counts = {name: sum(g == name for g in groups) for name in names}
    ax.legend(
        [Line2D([], [], color="black", ls=styles[n]) for n in names],
        [f"{n} ({counts[n]})" for n in names],
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncols=len(names),
        fontsize="small",
        frameon=False,
    )
    return _save(fig, path, title)


def short_names(keys: Sequence[str], min_parts: int = 2) -> list[str]:
    """The fewest trailing dotted parts of each key (at least `min_parts`) that tell all keys apart:
    method.sampler.step_size, method.sampler.steps → sampler.step_size, sampler.steps."""
    parts = [key.split(".") for key in keys]
    for n in range(min_parts, max((len(p) for p in parts), default=0) + 1):
        names = [".".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return list(keys)


def _figure(panels: int, title: str | None = None):
    height = PANEL_INCHES + 0.4 + 0.2 * (title or "").count("\n")  # each further title line
    fig = Figure(
        figsize=(PANEL_INCHES * panels + 0.6 * (panels > 1), height), dpi=DPI, layout="constrained"
    )  # makes room for a title of several lines and for colour bars
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _save(fig: Figure, path: Path | str, title: str | None) -> Path:
    if title:
        fig.suptitle(title, fontsize="medium" if "\n" in title else "large")
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


def _finite_max(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else 0.0
