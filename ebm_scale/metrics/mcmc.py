"""MCMC diagnostics over traces of m chains × n draws × d dimensions: R̂, autocorrelation, ESS, and pictures.

Traces are (m, n, d) torch tensors or arrays; (m, n) is one dimension and (m, n, ...) is flattened to d (an
image chain is d = C·H·W), so every statistic is per dimension. R̂ is the classic Gelman–Rubin statistic as
paper 002 (appendix A.6) defines it, written out here; ESS and autocorrelation come from arviz, imported
inside the functions: it takes seconds to import and training workers never need it.

Cost: arviz works on the host in float64 and loops over dimensions for ESS. 2D toys take milliseconds; image
chains (64 × 1600 × 3072) take minutes, so pass a subset of dimensions there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ebm_scale.plots import _array, _figure, _save

RHAT_THRESHOLD = 1.2  # Brooks & Gelman (1998): R̂ < 1.2 reads as approximate convergence (paper 002, §4.1)


def gelman_rubin(traces, burn_in: int = 0) -> np.ndarray:
    """R̂ per dimension, (d,). With s_w² the mean within-chain variance, s_b² = n/(m−1) Σ_i (X̄_i − X̄)² the
    between-chain variance and σ̂² = (n−1)/n s_w² + s_b²/n:  R̂ = sqrt(σ̂² / s_w²).

    This is arviz's `rhat(method="identity")` exactly (no chain splitting, no rank normalisation). A chain set
    that never moved (s_w² = 0) gives inf (or NaN if the chains also agree)."""
    x = _traces(traces, burn_in, min_chains=2)
    n = x.shape[1]
    s_w2 = x.var(axis=1, ddof=1).mean(axis=0)
    s_b2 = n * x.mean(axis=1).var(axis=0, ddof=1)
    sigma2 = (n - 1) / n * s_w2 + s_b2 / n
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(sigma2 / s_w2)


def autocorrelation(traces, max_lag: int, burn_in: int = 0) -> np.ndarray:
    """Normalised autocorrelation of each chain and dimension at lags 0..max_lag, (m, max_lag + 1, d), lag 0 = 1.

    arviz's FFT estimator (biased autocovariance, divided by n, as is usual for MCMC). A chain that never moved
    has no defined autocorrelation (0/0); it is reported as 1 at every lag — perfectly correlated, which is
    what a stuck chain is for the question these curves answer (does the chain forget where it was?)."""
    import arviz

    x = _traces(traces, burn_in)
    if not 0 <= max_lag < x.shape[1]:
        raise ValueError(f"max_lag must be in [0, {x.shape[1] - 1}] for {x.shape[1]} draws, got {max_lag}")
    acf = arviz.autocorr(x, axis=1)[:, : max_lag + 1]
    stuck = (x == x[:, :1]).all(axis=1)  # (m, d)
    return np.where(stuck[:, None, :], 1.0, acf)


def effective_sample_size(traces, burn_in: int = 0, method: str = "bulk") -> np.ndarray:
    """ESS per dimension, (d,), over all m·n draws together (iid draws: ≈ m·n). arviz's `ess`; the default
    "bulk" is the rank-normalised split-chain estimator of Vehtari et al. (2021); "mean" is the classic ESS
    of the mean."""
    import arviz

    x = _traces(traces, burn_in)
    return np.asarray(arviz.ess(arviz.convert_to_dataset(x), method=method)["x"].values, dtype=np.float64)


def mcmc_summary(traces, burn_in: int = 0, max_lags=(1, 10, 100)) -> dict[str, float]:
    """Scalars for logging: rhat_mean, rhat_max, rhat_converged (fraction of dimensions with R̂ < 1.2), ess_mean,
    ess_min, ess_per_draw (ess_mean / (m·n)), and autocorr_lag<k> (mean over chains and dimensions) for each k
    in max_lags that the trace is long enough to have."""
    x = _traces(traces, burn_in, min_chains=2)
    lags = [k for k in max_lags if k < x.shape[1]]
    acf = autocorrelation(x, max(lags)) if lags else None
    return summarize(x.shape, gelman_rubin(x), effective_sample_size(x), acf, max_lags)


def summarize(
    shape, rhat: np.ndarray, ess: np.ndarray, acf: np.ndarray | None, max_lags=(1, 10, 100)
) -> dict[str, float]:
    """mcmc_summary's scalars from already computed R̂ (d,), ESS (d,) and autocorrelation (m, L+1, d) of traces
    of `shape` (m, n, d): callers that also plot the arrays compute each once."""
    m, n = shape[0], shape[1]
    summary = {
        "rhat_mean": rhat.mean(),
        "rhat_max": rhat.max(),
        "rhat_converged": (rhat < RHAT_THRESHOLD).mean(),
        "ess_mean": ess.mean(),
        "ess_min": ess.min(),
        "ess_per_draw": ess.mean() / (m * n),
    }
    if acf is not None:
        summary.update({f"autocorr_lag{k}": acf[:, k].mean() for k in max_lags if k < min(n, acf.shape[1])})
    return {k: float(v) for k, v in summary.items()}


# --- pictures (object API on an Agg canvas, as ebm_scale.plots) --------------------------------------------------
def plot_rhat(rhat_values_by_label: Mapping[str, object], path: Path | str, title: str | None = None) -> Path:
    """One histogram of R̂ per label (e.g. latent- vs data-space chains, paper 002 Fig. 2a-b), 1.2 marked.
    Each panel has its own bins: converged and stuck samplers differ by orders of magnitude."""
    if not rhat_values_by_label:
        raise ValueError("plot_rhat needs at least one label")
    fig, axes = _figure(len(rhat_values_by_label))
    for ax, (label, values) in zip(axes, rhat_values_by_label.items()):
        values = _array(values).ravel()
        finite = values[np.isfinite(values)]
        if finite.size:
            ax.hist(finite, bins=30, color="tab:blue", alpha=0.8)
        ax.axvline(RHAT_THRESHOLD, color="tab:red", linestyle="--", label=f"$\\hat R$ = {RHAT_THRESHOLD}")
        dropped = f", {values.size - finite.size} non-finite" if finite.size < values.size else ""
        mean = f"{finite.mean():.3f}" if finite.size else "n/a"
        ax.set_title(f"{label}: mean $\\hat R$ {mean}{dropped}", fontsize="medium")
        ax.set_xlabel("$\\hat R$")
        ax.set_ylabel("dimensions")
        ax.legend(loc="upper right", fontsize="small")
    return _save(fig, path, title)


def plot_autocorrelation(acf_by_label: Mapping[str, object], path: Path | str, title: str | None = None) -> Path:
    """Autocorrelation against lag, one curve per label: mean over chains and dimensions as a line, min/max as a
    band (paper 002 Fig. 2c-d). acf_by_label[label] is `autocorrelation(...)`'s (m, L, d)."""
    if not acf_by_label:
        raise ValueError("plot_autocorrelation needs at least one label")
    fig, (ax,) = _figure(1)
    for colour, (label, acf) in zip(
        ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"), acf_by_label.items()
    ):
        acf = _array(acf)
        per_lag = np.moveaxis(acf.reshape(acf.shape[0], acf.shape[1], -1), 1, 0).reshape(acf.shape[1], -1)
        lags = np.arange(per_lag.shape[0])
        ax.plot(lags, per_lag.mean(1), color=colour, label=label)
        ax.fill_between(lags, per_lag.min(1), per_lag.max(1), color=colour, alpha=0.2, linewidth=0)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("lag $\\Delta t$")
    ax.set_ylabel("autocorrelation")
    ax.legend(loc="upper right", fontsize="small")
    return _save(fig, path, title)


def plot_series(series: Mapping[str, tuple], path: Path | str, title: str | None = None) -> Path:
    """One panel per name: series[name] = (steps, values), e.g. MH acceptance rate and step size over training
    (paper 002 Fig. 7)."""
    if not series:
        raise ValueError("plot_series needs at least one series")
    fig, axes = _figure(len(series))
    for ax, (name, (steps, values)) in zip(axes, series.items()):
        ax.plot(_array(steps).ravel(), _array(values).ravel(), color="tab:blue", linewidth=1.0)
        ax.set_title(name)
        ax.set_xlabel("step")
    return _save(fig, path, title)


def plot_traces(traces, path: Path | str, chains: int = 4, title: str | None = None) -> Path:
    """The 2D trajectories of the first `chains` chains of (m, n, 2) traces, start marked with a dot."""
    x = _array(traces)
    x = x.reshape(x.shape[0], x.shape[1], -1)
    if x.shape[-1] != 2:
        raise ValueError(f"plot_traces draws 2D chains, got {x.shape[-1]} dimensions")
    fig, (ax,) = _figure(1)
    for i in range(min(chains, x.shape[0])):
        (line,) = ax.plot(x[i, :, 0], x[i, :, 1], linewidth=0.6, alpha=0.8, label=f"chain {i}")
        ax.plot(x[i, 0, 0], x[i, 0, 1], "o", color=line.get_color(), markersize=5)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.legend(loc="upper right", fontsize="small")
    return _save(fig, path, title)


def _traces(traces, burn_in: int = 0, min_chains: int = 1) -> np.ndarray:
    """(m, n, ...) tensor or array → float64 (m, n − burn_in, d) on the host."""
    x = _array(traces)
    if x.ndim < 2:
        raise ValueError(f"traces must be (chains, draws, ...), got shape {x.shape}")
    x = x.reshape(x.shape[0], x.shape[1], -1)[:, burn_in:]
    if x.shape[0] < min_chains or x.shape[1] < 4:  # arviz refuses fewer than 4 draws
        raise ValueError(f"need >= {min_chains} chains and >= 4 draws after burn-in {burn_in}, got {x.shape[:2]}")
    return x
