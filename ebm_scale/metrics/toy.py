"""Evaluation of a method on a 2D toy dataset: Sinkhorn distance of its samples, quadrature test
log-likelihood of each density it defines, and pictures of both."""

from __future__ import annotations

import hashlib
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ebm_scale.data import ToyData
from ebm_scale.metrics.config import EvalConfig  # re-exported: `from ebm_scale.metrics.toy import EvalConfig`
from ebm_scale.metrics.likelihood import (
    DensityGrid,
    log_density_grid,
    log_normalizer,
    quadrature_log_likelihoods,
    split_by_mode,
)
from ebm_scale.metrics.sinkhorn import sinkhorn_distance

TRUE_DENSITY = "true"  # the name the dataset's exact density is reported and drawn under

# quadrature report key → metric name, per named density
_DENSITY_METRICS = {
    "log_likelihood": "eval/test_ll/{}",
    "log_z": "eval/log_z/{}",
    "boundary_mass": "eval/boundary_mass/{}",
    "resolution_gap": "eval/resolution_gap/{}",
}


def evaluate_toy(
    method, data: ToyData, cfg: EvalConfig, out_dir: Path | str | None = None, step: int = 0, run=None
) -> tuple[dict[str, float], list[Path]]:
    """Metrics (flat names → floats) and, when out_dir is given and cfg.plots, the PNGs written there, titled
    with the run's name and searched parameters when `run` (the run's whole config) is given.

    `method` needs `sample(n)` and `log_density(x) -> {name: (n,) tensor}` (ebm_scale.methods.base.Method).
    The caller sets eval mode; samplers and densities may use autograd, so nothing here disables it.
    """
    device = getattr(method, "device", torch.device("cpu"))
    started = time.perf_counter()
    samples = method.sample(cfg.n_samples).detach()
    if samples.device.type == "cuda":
        torch.cuda.synchronize(samples.device)
    metrics = _sample_metrics(samples, data.test, cfg)
    if data.modes is not None:
        metrics.update(mode_sample_metrics(samples, data.test, data.modes))
    metrics["eval/sample_ms_per_sample"] = 1e3 * (time.perf_counter() - started) / cfg.n_samples
    if getattr(method, "nfe", None) is not None:
        metrics["eval/nfe"] = float(method.nfe)

    reports, grids = quadrature_log_likelihoods(
        method.log_density, data.test, data.spec.bounds, cfg.grid_size, modes=data.modes, device=device
    )
    for name, report in reports.items():
        metrics.update({pattern.format(name): report[key] for key, pattern in _DENSITY_METRICS.items()})
    truth_grid = None
    if data.log_prob is not None:
        truth_test = data.log_prob(data.test.double())
        metrics[_DENSITY_METRICS["log_likelihood"].format(TRUE_DENSITY)] = float(truth_test.mean())
        if data.modes is not None and reports:
            truth_grid = _truth_grid(data, cfg)
            metrics.update(_mode_gaps(reports, truth_grid, truth_test, data))

    if out_dir is None or not cfg.plots:
        return metrics, []
    if data.log_prob is not None:  # the picture's panel; the truth's log Z is 0 by construction
        grids[TRUE_DENSITY] = truth_grid if truth_grid is not None else _truth_grid(data, cfg)
    title = f"{getattr(method, 'name', type(method).__name__)} on {data.name}, step {step}"
    return metrics, _write_plots(Path(out_dir), step, samples, data, grids, title, run)


def _truth_grid(data: ToyData, cfg: EvalConfig) -> DensityGrid:
    return log_density_grid(lambda x: data.log_prob(x.double()), data.spec.bounds, cfg.grid_size, no_grad=True)


def _mode_gaps(
    reports: dict[str, dict[str, float]], truth_grid: DensityGrid, truth_test: Tensor, data: ToyData
) -> dict[str, float]:
    """How far each density's test log-likelihood falls short of the truth's, in two parts that sum to the
    whole shortfall (split_by_mode): across modes (misweighted modes) and within them (misshapen ones). The
    truth is split on the same grid, so the quadrature's own error cancels out of both parts."""
    truth_weights, truth_within = split_by_mode(
        truth_grid, log_normalizer(truth_grid)[0], truth_test, data.test, data.modes
    )
    gaps = {}
    for name, report in reports.items():
        gaps[f"eval/ll_gap/mode_weights/{name}"] = truth_weights - report["mode_weights_ll"]
        gaps[f"eval/ll_gap/within_modes/{name}"] = truth_within - report["within_mode_ll"]
    return gaps


def _sample_metrics(samples: Tensor, test: Tensor, cfg: EvalConfig) -> dict[str, float]:
    """Sinkhorn of samples vs the first n test points; the same statistic between two disjoint test halves of
    that n (what a perfect sampler would score: entropic bias plus finite-sample noise); the share of
    non-finite samples (any makes the Sinkhorn infinite instead of crashing the evaluation)."""
    n = min(len(samples), len(test))
    half = min(n, len(test) // 2)
    return {
        "eval/sinkhorn": _sinkhorn(samples, test[:n].to(samples.device), cfg),
        "eval/sinkhorn_data_floor": _data_floor(test[:half], test[half : 2 * half], cfg) if half else float("nan"),
        "eval/nonfinite_samples": 1.0 - float(torch.isfinite(samples).all(dim=1).float().mean()),
    }


def mode_sample_metrics(samples: Tensor, test: Tensor, modes: Tensor) -> dict[str, float]:
    """What a sampler does around a mixture's modes, each sample counted to its nearest mode, measured
    against the test data counted the same way (so no mode width is assumed):
    * eval/samples/spread: median squared distance to the nearest mode, over the test data's (1 = the
      modes' width; 4 = twice as wide). The median, so stray points between the modes do not set it;
    * eval/samples/off_mode: the share of samples farther from every mode than 99 % of the test points
      (the data itself: 0.01), i.e. the mass a sampler leaves between the modes;
    * eval/samples/modes_covered: the share of modes that get at least a quarter of an equal share of the
      samples."""
    finite = samples[torch.isfinite(samples).all(dim=1)].double()
    if len(finite) == 0:
        return {"eval/samples/spread": float("nan"), "eval/samples/off_mode": 1.0, "eval/samples/modes_covered": 0.0}
    modes, test = modes.double().to(finite.device), test.double().to(finite.device)
    sample_d2, nearest = torch.cdist(finite, modes).pow(2).min(dim=1)
    test_d2 = torch.cdist(test, modes).pow(2).min(dim=1).values
    counts = torch.bincount(nearest, minlength=len(modes)).double()
    return {
        "eval/samples/spread": float(sample_d2.median() / test_d2.median()),
        "eval/samples/off_mode": float((sample_d2 > torch.quantile(test_d2, 0.99)).double().mean()),
        "eval/samples/modes_covered": float((counts >= len(finite) / (4 * len(modes))).double().mean()),
    }


def _sinkhorn(x: Tensor, y: Tensor, cfg: EvalConfig) -> float:
    return sinkhorn_distance(x, y, reg=cfg.sinkhorn_reg, cost=cfg.sinkhorn_cost, num_iter=cfg.sinkhorn_iters)


_FLOOR_CACHE: dict[tuple, float] = {}
_FLOOR_CACHE_SIZE = 16


def _data_floor(x: Tensor, y: Tensor, cfg: EvalConfig) -> float:
    """Sinkhorn between two halves of the test set. It depends on the data only, yet costs as much as the
    model's Sinkhorn, so it is remembered across evaluations, keyed by the exact bytes of both halves and the
    settings (a different test set or setting can never hit a stale value)."""
    key = (_digest(x), _digest(y), cfg.sinkhorn_reg, cfg.sinkhorn_cost, cfg.sinkhorn_iters)
    if key not in _FLOOR_CACHE:
        if len(_FLOOR_CACHE) >= _FLOOR_CACHE_SIZE:
            _FLOOR_CACHE.pop(next(iter(_FLOOR_CACHE)))  # oldest first: dicts keep insertion order
        _FLOOR_CACHE[key] = _sinkhorn(x, y, cfg)
    return _FLOOR_CACHE[key]


def _digest(x: Tensor) -> str:
    x = x.detach().cpu().contiguous()
    return f"{hashlib.sha1(x.numpy().tobytes()).hexdigest()}:{tuple(x.shape)}:{x.dtype}"


def _write_plots(
    out_dir: Path, step: int, samples: Tensor, data: ToyData, grids: dict[str, DensityGrid], title: str, run=None
) -> list[Path]:
    """samples_{step}.png always; density_{step}.png when there is a density to draw: each panel's log-density
    normalized by its own quadrature log Z, on the truth's colour scale when the truth is drawn."""
    # Imported here, not at the top: matplotlib costs seconds to import, and every training worker imports
    # this module while only the evaluating rank with plots on draws anything.
    from ebm_scale.plots import plot_densities, plot_samples

    title = run_title(run, title)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_samples(samples, data.test, out_dir / f"samples_{step:06d}.png", title=title, bounds=data.spec.bounds)
    ]
    if grids:
        normalized = {name: (g.xs, g.ys, g.values - log_normalizer(g)[0]) for name, g in grids.items()}
        paths.append(
            plot_densities(
                normalized,
                out_dir / f"density_{step:06d}.png",
                title=title,
                reference=TRUE_DENSITY if TRUE_DENSITY in grids else None,
            )
        )
    return paths


def run_title(run, title: str, width: int = 44) -> str:
    """`title` headed by the run's name and followed by the values of its searched parameters (the keys of
    run.search.space, looked up in the run's own config), wrapped to lines of about `width` characters."""
    if run is None:
        return title
    from ebm_scale.plots import short_names

    keys = list(getattr(getattr(run, "search", None), "space", None) or {})
    values = [_config_value(run, key) for key in keys]
    searched = [
        f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
        for name, value in zip(short_names(keys), values, strict=True)
    ]
    return "\n".join([f"{run.name}: {title}", *textwrap.wrap(", ".join(searched), width, break_on_hyphens=False)])


def _config_value(config, dotted: str):
    for part in dotted.split("."):
        config = config[part] if isinstance(config, Mapping) else getattr(config, part)
    return config
