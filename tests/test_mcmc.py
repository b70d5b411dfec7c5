import arviz
import numpy as np
import pytest
import torch

from ebm_scale.metrics.chains import McmcEvalConfig, evaluate_chains
from ebm_scale.metrics.mcmc import (
    autocorrelation,
    effective_sample_size,
    gelman_rubin,
    mcmc_summary,
    plot_autocorrelation,
    plot_rhat,
    plot_series,
    plot_traces,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def ar1(rho, m, n, d, seed=0):
    """m stationary AR(1) chains x_t = ρ x_{t−1} + sqrt(1 − ρ²) ε_t, unit variance, autocorrelation ρ^lag."""
    rng = np.random.default_rng(seed)
    x = np.empty((m, n, d))
    x[:, 0] = rng.normal(size=(m, d))
    noise = np.sqrt(1 - rho**2) * rng.normal(size=(m, n, d))
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + noise[:, t]
    return x


def paper_rhat(x):
    """Paper 002, appendix A.6, one dimension, written with loops over chains as printed."""
    m, n = x.shape
    means = [sum(x[i]) / n for i in range(m)]
    grand = sum(means) / m
    s_w2 = sum(sum((x[i, j] - means[i]) ** 2 for j in range(n)) / (n - 1) for i in range(m)) / m
    s_b2 = n / (m - 1) * sum((means[i] - grand) ** 2 for i in range(m))
    return np.sqrt(((n - 1) / n * s_w2 + s_b2 / n) / s_w2)


def test_rhat_is_one_for_mixed_chains_and_large_for_stuck_ones():
    rng = np.random.default_rng(0)
    mixed = rng.normal(size=(8, 1000, 5))
    assert (gelman_rubin(mixed) < 1.05).all()
    stuck = mixed + np.array([-3.0, 3.0] * 4)[:, None, None]  # half the chains in each of two modes
    assert (gelman_rubin(stuck) > 1.5).all()
    # burn_in drops the start: chains that begin far apart, then mix. (Left in, the transient inflates the
    # within-chain variance as much as the between-chain one: classic R̂ is blunt to it, ≈ 1.1 here.)
    start_apart = mixed.copy()
    start_apart[:, :400] += 5.0 * np.arange(8)[:, None, None]
    assert (gelman_rubin(start_apart) > 1.05).all() and (gelman_rubin(start_apart, burn_in=400) < 1.05).all()


def test_rhat_matches_the_papers_formula_and_arviz_identity():
    x = np.random.default_rng(1).normal(size=(4, 50, 3)) + np.array([0.0, 0.3, 0.1, -0.2])[:, None, None]
    ours = gelman_rubin(torch.from_numpy(x))  # torch input works too
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours, [paper_rhat(x[..., k]) for k in range(3)], rtol=1e-12)
    np.testing.assert_allclose(ours, [arviz.rhat(x[..., k], method="identity") for k in range(3)], rtol=1e-12)
    np.testing.assert_allclose(gelman_rubin(x, burn_in=10), [paper_rhat(x[:, 10:, k]) for k in range(3)], rtol=1e-12)


def test_autocorrelation_of_ar1_is_rho_to_the_lag():
    rho, max_lag = 0.7, 10
    acf = autocorrelation(torch.from_numpy(ar1(rho, 4, 20000, 2)), max_lag)
    assert acf.shape == (4, max_lag + 1, 2)
    np.testing.assert_allclose(acf[:, 0], 1.0)
    np.testing.assert_allclose(acf, np.broadcast_to(rho ** np.arange(max_lag + 1)[None, :, None], acf.shape), atol=0.05)
    with pytest.raises(ValueError):
        autocorrelation(ar1(rho, 2, 10, 1), 10)  # a lag as long as the trace


def test_a_stuck_chain_is_fully_autocorrelated():
    x = np.random.default_rng(0).normal(size=(3, 100, 2))
    x[1] = 0.5  # never moved
    acf = autocorrelation(x, 5)
    assert (acf[1] == 1.0).all() and np.isfinite(acf).all() and (np.abs(acf[0, 1:]) < 0.5).all()


def test_ess_of_iid_draws_is_the_draw_count_and_of_a_sticky_chain_much_less():
    m, n = 4, 1000
    iid = effective_sample_size(np.random.default_rng(0).normal(size=(m, n, 3)))
    assert iid.shape == (3,) and (np.abs(iid / (m * n) - 1) < 0.15).all()
    sticky = effective_sample_size(ar1(0.95, m, n, 3), method="mean")
    # AR(1): ESS = m·n·(1 − ρ)/(1 + ρ) ≈ 103 of 4000
    assert (sticky < 0.1 * m * n).all() and (np.abs(sticky / (m * n * 0.05 / 1.95) - 1) < 0.5).all()


def test_summary_holds_plain_floats_and_skips_lags_beyond_the_trace():
    summary = mcmc_summary(ar1(0.5, 4, 60, 2), burn_in=10)
    assert set(summary) == {
        "rhat_mean",
        "rhat_max",
        "rhat_converged",
        "ess_mean",
        "ess_min",
        "ess_per_draw",
        "autocorr_lag1",
        "autocorr_lag10",
    }  # 50 draws: no lag 100
    assert all(type(v) is float for v in summary.values())
    assert summary["rhat_max"] >= summary["rhat_mean"] and summary["ess_min"] <= summary["ess_mean"]
    assert summary["autocorr_lag1"] == pytest.approx(0.5, abs=0.2)


def test_ess_method_reaches_arviz():
    """Each ESS estimator is arviz's, per dimension; on skewed, sticky draws the bulk (rank-normalised) and
    mean estimators differ, so passing the method matters."""
    x = ar1(0.8, 4, 200, 2, seed=3) ** 3
    estimates = {}
    for method in ("bulk", "mean", "tail"):
        estimates[method] = effective_sample_size(x, method=method)
        reference = [arviz.ess(x[..., k], method=method) for k in range(2)]
        np.testing.assert_allclose(estimates[method], reference, rtol=1e-10)
    assert (np.abs(estimates["mean"] / estimates["bulk"] - 1) > 0.05).all()
    after_burn_in = [arviz.ess(x[:, 50:, k]) for k in range(2)]
    np.testing.assert_allclose(effective_sample_size(x, burn_in=50), after_burn_in, rtol=1e-10)


def hand_autocorrelation(x, lag):
    """Mean over chains and dimensions of Σ_t (x_t − x̄)(x_{t+lag} − x̄) / Σ_t (x_t − x̄)², per chain."""
    c = x - x.mean(axis=1, keepdims=True)
    return float(((c[:, :-lag] * c[:, lag:]).sum(1) / (c * c).sum(1)).mean()) if lag else 1.0


class FixedChains:
    """A method whose long chains are given traces: chains that start 4 apart and meet after `burn_in` draws."""

    def __init__(self, m=4, n=300, burn_in=100):
        x = ar1(0.6, m, n, 2, seed=5)
        x[:, :burn_in] += 4.0 * np.arange(m)[:, None, None]
        self.traces, self.calls = torch.from_numpy(x).float(), []

    def long_chains(self, chains, length, init_scale=1.0):
        self.calls.append((chains, length, init_scale))
        return {"data": self.traces}


def test_evaluate_chains_summarises_the_draws_after_burn_in(tmp_path):
    method, m, n, burn_in = FixedChains(), 4, 300, 100
    cfg = McmcEvalConfig(chains=m, length=n, burn_in=burn_in, max_lag=20, when="every", init_scale=2.0)
    metrics, paths = evaluate_chains(method, cfg, tmp_path, step=7, final=False, plots=False)
    assert method.calls == [(m, n, 2.0)] and paths == []
    kept = method.traces.double().numpy()[:, burn_in:]
    rhat = np.array([arviz.rhat(kept[..., k], method="identity") for k in range(2)])
    ess = np.array([arviz.ess(kept[..., k], method="bulk") for k in range(2)])
    expected = {
        "rhat_mean": rhat.mean(),
        "rhat_max": rhat.max(),
        "rhat_converged": (rhat < 1.2).mean(),
        "ess_mean": ess.mean(),
        "ess_min": ess.min(),
        "ess_per_draw": ess.mean() / (m * (n - burn_in)),
        **{f"autocorr_lag{k}": hand_autocorrelation(kept, k) for k in (1, 10, 100)},
    }
    assert set(metrics) == {f"eval/mcmc/data/{k}" for k in expected}
    for key, value in expected.items():
        assert metrics[f"eval/mcmc/data/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # After burn-in the chains have met (R̂ ≈ 1); with the start kept they have not.
    everything = method.traces.double().numpy()
    assert rhat.max() < 1.1 < min(arviz.rhat(everything[..., k], method="identity") for k in range(2))


def test_evaluate_chains_runs_when_asked():
    method, cfg = FixedChains(), McmcEvalConfig(chains=4, length=300, burn_in=100, when="final")
    assert evaluate_chains(method, cfg, None, step=1, final=False) == ({}, []) and method.calls == []
    assert evaluate_chains(method, cfg, None, step=2, final=True)[0] and len(method.calls) == 1
    cfg.when = "never"
    assert evaluate_chains(method, cfg, None, step=3, final=True) == ({}, []) and len(method.calls) == 1


def _is_png(path):
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    rhat = {"latent": 1 + 0.05 * rng.random(200), "data": np.append(1 + 3 * rng.random(200), np.inf)}
    acf = {
        "latent": autocorrelation(ar1(0.3, 3, 300, 2), 50),
        "data": torch.from_numpy(autocorrelation(ar1(0.95, 3, 300, 2), 50)),
    }
    steps = np.arange(100)
    paths = [
        plot_rhat(rhat, tmp_path / "rhat.png", title="R-hat"),
        plot_autocorrelation(acf, tmp_path / "acf.png"),
        plot_series(
            {
                "accept rate": (steps, 0.65 + 0.05 * rng.normal(size=100)),
                "step size": (torch.arange(100), torch.linspace(0.15, 0.3, 100)),
            },
            tmp_path / "sub" / "s.png",
            title="HMC",
        ),
        plot_traces(torch.from_numpy(ar1(0.9, 8, 200, 2)), tmp_path / "traces.png"),
    ]
    assert all(_is_png(p) for p in paths)
    with pytest.raises(ValueError):
        plot_traces(ar1(0.9, 2, 20, 3), tmp_path / "bad.png")
