"""Quadrature log-likelihood, Sinkhorn distance, and evaluate_toy end to end on CPU."""

import math

import pytest
import torch

from ebm_scale.data import DataConfig, load_dataset
from ebm_scale.data.toy import TOY_DATASETS
from ebm_scale.errors import ConfigError
from ebm_scale.metrics import (
    SINKHORN_COSTS,
    EvalConfig,
    evaluate_toy,
    log_density_grid,
    quadrature_log_likelihood,
    quadrature_log_likelihoods,
    sinkhorn_distance,
)
from ebm_scale.metrics.toy import mode_sample_metrics

MIXTURES = ["8gaussians", "25gaussians", "grid"]


def _data(name="8gaussians", n_test=2000):
    return load_dataset(DataConfig(name=name, n_train=10, n_test=n_test), seed=0)


# --- quadrature ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MIXTURES)
def test_exact_mixture_density_integrates_to_one(name):
    data = _data(name)
    report = quadrature_log_likelihood(data.log_prob, data.test, data.spec.bounds, grid_size=200)
    assert abs(report["log_z"]) < 1e-2
    assert report["log_likelihood"] == pytest.approx(float(data.log_prob(data.test).mean()), abs=1e-2)
    assert report["boundary_mass"] < 1e-4


def test_unnormalized_density_recovers_its_log_normalizer():
    data = _data()
    report = quadrature_log_likelihood(lambda x: data.log_prob(x) + 3.0, data.test, data.spec.bounds, grid_size=120)
    assert report["log_z"] == pytest.approx(3.0, abs=1e-2)
    assert report["log_likelihood"] == pytest.approx(float(data.log_prob(data.test).mean()), abs=1e-2)


def test_too_small_box_shows_up_as_boundary_mass():
    data = _data()
    report = quadrature_log_likelihood(data.log_prob, data.test, (-2.0, 2.0), grid_size=80)
    assert report["boundary_mass"] > 0.05


@pytest.mark.parametrize("std, grid_size, resolved", [(0.3, 200, True), (0.02, 100, False)])
def test_resolution_gap_flags_a_density_narrower_than_the_grid(std, grid_size, resolved):
    centre = torch.tensor([0.013, -0.021], dtype=torch.float64)  # off the grid's symmetry

    def log_prob(x):
        return -0.5 * (x - centre).pow(2).sum(1) / std**2 - math.log(2 * math.pi * std**2)

    x = centre + std * torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    report = quadrature_log_likelihood(log_prob, x, (-4.0, 4.0), grid_size=grid_size, no_grad=True)
    error = abs(report["log_z"])  # the density is normalized: any log Z ≠ 0 is quadrature error
    if resolved:
        assert report["resolution_gap"] < 1e-6 and error < 1e-6
    else:  # a cell of 0.08 against a std of 0.02: the error is real, and the gap says so without understating it
        assert error > 0.1 and report["resolution_gap"] > max(1.0, error)


def _mixture_log_prob(means, std, weights):
    def log_prob(x):
        sq = (x.double()[:, None, :] - means[None]).pow(2).sum(-1)
        return torch.logsumexp(weights.log() - 0.5 * sq / std**2 - math.log(2 * math.pi * std**2), dim=1)

    return log_prob


@pytest.mark.parametrize(
    "weights, std, weights_gap, within_gap",
    [
        # misweighted, right shape: the gap is E_truth[log ¼ − log w_k] = ¼ Σ log(¼ / w_k), all across the modes
        ((0.4, 0.3, 0.2, 0.1), 0.1, 0.25 * sum(math.log(0.25 / w) for w in (0.4, 0.3, 0.2, 0.1)), 0.0),
        # right weights, 1.5× too broad: the 2D Gaussian cross-entropy excess 2(log r + 1/(2r²) − ½), all within
        ((0.25,) * 4, 0.15, 0.0, 2 * (math.log(1.5) + 1 / (2 * 1.5**2) - 0.5)),
    ],
)
def test_split_by_mode_tells_misweighted_modes_from_misshapen_ones(weights, std, weights_gap, within_gap):
    means = torch.tensor([[-1.5, -1.5], [-1.5, 1.5], [1.5, -1.5], [1.5, 1.5]], dtype=torch.float64)
    truth = _mixture_log_prob(means, 0.1, torch.full((4,), 0.25, dtype=torch.float64))
    model = _mixture_log_prob(means, std, torch.tensor(weights, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    centres = means[torch.randint(4, (20000,), generator=gen)]  # the centres, then the noise
    x = centres + 0.1 * torch.randn(20000, 2, dtype=torch.float64, generator=gen)
    bounds = (-3.0, 3.0)
    reports, _ = quadrature_log_likelihoods(
        lambda p: {"truth": truth(p), "model": model(p)}, x, bounds, 240, modes=means, no_grad=True
    )
    for report in reports.values():  # the two parts always sum to the log-likelihood
        assert report["mode_weights_ll"] + report["within_mode_ll"] == pytest.approx(report["log_likelihood"], abs=1e-9)
    t, m = reports["truth"], reports["model"]
    assert t["mode_weights_ll"] == pytest.approx(math.log(0.25), abs=0.02)  # the sample's own mode counts
    assert t["mode_weights_ll"] - m["mode_weights_ll"] == pytest.approx(weights_gap, abs=0.02)
    assert t["within_mode_ll"] - m["within_mode_ll"] == pytest.approx(within_gap, abs=0.02)


def test_grid_layout_rows_are_y_and_columns_are_x():
    xs, ys, values = log_density_grid(lambda x: x[:, 0] + 10 * x[:, 1], (-1.0, 1.0), 4, no_grad=True)
    assert values.shape == (4, 4)
    assert float(values[0, 3]) == pytest.approx(float(xs[3] + 10 * ys[0]), abs=1e-5)


def test_log_density_may_use_autograd_inside():
    def via_score(x):  # log p̃ = −|x|²/2, computed from its gradient as a flow or an energy might
        x = x.detach().requires_grad_(True)
        energy = 0.5 * (x**2).sum()
        (grad,) = torch.autograd.grad(energy, x)
        return -0.5 * (grad * x).sum(dim=1)

    with torch.no_grad():  # even when the caller evaluates without grad
        report = quadrature_log_likelihood(via_score, torch.zeros(5, 2), (-6.0, 6.0), grid_size=100)
    assert report["log_z"] == pytest.approx(math.log(2 * math.pi), abs=1e-3)


def test_log_density_of_the_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        log_density_grid(lambda x: x[:, :1], (-1.0, 1.0), 8)


# --- Sinkhorn --------------------------------------------------------------------------------------------
def _points(n=300, seed=0, name="8gaussians"):
    return TOY_DATASETS[name].sample(n, torch.Generator().manual_seed(seed))


def test_sinkhorn_of_a_sample_with_itself_is_only_the_entropic_blur():
    x = _points()
    assert 0 <= sinkhorn_distance(x, x) < 0.1


def test_sinkhorn_grows_with_a_shift_and_is_deterministic():
    x, y = _points(seed=0), _points(seed=1)
    near = sinkhorn_distance(x, y)
    shifted = sinkhorn_distance(x, y + torch.tensor([1.0, 0.0]))
    assert near < shifted
    assert shifted == pytest.approx(1.0 + near, abs=0.3)  # translation adds |shift|² to the transport cost
    assert sinkhorn_distance(x, y) == near


def test_sinkhorn_euclidean_cost():
    x = _points()
    assert sinkhorn_distance(x, x + torch.tensor([0.0, 2.0]), cost="euclidean") == pytest.approx(2.0, abs=0.05)


def _log_domain_sinkhorn(x, y, reg, iters):
    """Textbook log-domain Sinkhorn (uniform weights), independent of the solver under test."""
    cost = torch.cdist(x, y) ** 2
    log_a, log_b = torch.full((len(x),), -math.log(len(x))), torch.full((len(y),), -math.log(len(y)))
    f, g = torch.zeros(len(x)), torch.zeros(len(y))
    for _ in range(iters):
        f = reg * (log_a - torch.logsumexp((g[None, :] - cost) / reg, dim=1))
        g = reg * (log_b - torch.logsumexp((f[:, None] - cost) / reg, dim=0))
    return float((torch.exp((f[:, None] + g[None, :] - cost) / reg) * cost).sum())


def test_sinkhorn_matches_a_textbook_log_domain_solver_at_convergence():
    x, y = _points(60, seed=2).double(), _points(60, seed=3).double()
    reference = _log_domain_sinkhorn(x, y, reg=0.2, iters=3000)
    assert sinkhorn_distance(x, y, reg=0.2, num_iter=20_000, tol=1e-12) == pytest.approx(reference, rel=1e-6)


def test_sinkhorn_stays_finite_for_far_apart_clouds_and_sees_mode_collapse():
    x = _points(200)
    # Exact OT of a translation is the translation itself: |(20, 20)|² = 800. At this distance exp(−C/reg)
    # underflows for every pair, so a solver without ε-scaling would return NaN.
    assert sinkhorn_distance(x, x + 20.0) == pytest.approx(800.0, rel=1e-3)
    collapsed = x[:1].repeat(200, 1)  # every sample on one point of one mode
    assert sinkhorn_distance(collapsed, x) > 20 * sinkhorn_distance(_points(200, seed=5), x)


# POT cross-checks, in the default suite: `import ot` takes ~3 s once per session, and 60 points keep POT's
# log-domain solver under half a second (150 took ~2.5 s and checked nothing more).
@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
def test_cost_matrices_are_pots(cost):
    import ot

    x, y = _points(40, seed=0).double(), _points(30, seed=1).double()
    assert torch.allclose(SINKHORN_COSTS[cost](x, y), ot.dist(x, y, metric=cost), atol=1e-10)


def test_sinkhorn_matches_pot_log_domain_solver_and_exact_ot():
    import ot

    x, y = _points(60, seed=2).double(), _points(60, seed=3).double()
    a = torch.full((60,), 1 / 60, dtype=torch.float64)
    reference = float(ot.sinkhorn2(a, a, ot.dist(x, y), 0.1, method="sinkhorn_log", numItermax=20_000, stopThr=1e-12))
    assert sinkhorn_distance(x, y, reg=0.1, num_iter=20_000, tol=1e-10) == pytest.approx(reference, rel=1e-6)
    far = y + torch.tensor([15.0, -3.0])
    assert sinkhorn_distance(x, far) == pytest.approx(float(ot.emd2(a, a, ot.dist(x, far))), rel=1e-3)


def test_sinkhorn_of_non_finite_points_is_infinite():
    x = _points(50)
    y = x.clone()
    y[3, 1] = float("nan")
    assert sinkhorn_distance(x, y) == math.inf


def test_sinkhorn_rejects_unknown_cost():
    with pytest.raises(ValueError, match="cost"):
        sinkhorn_distance(_points(10), _points(10), cost="cosine")


# --- evaluate_toy ----------------------------------------------------------------------------------------
class ExactMethod:
    """Test double of a Method: samples the true distribution; its 'ebm' density is the truth + 1.5."""

    name = "exact"

    def __init__(self, data, shift=0.0, nan_fraction=0.0, densities=True):
        self.data, self.shift, self.nan_fraction, self.densities = data, shift, nan_fraction, densities
        self.generator = torch.Generator().manual_seed(123)
        self.device = torch.device("cpu")

    def sample(self, n):
        x = TOY_DATASETS[self.data.name].sample(n, self.generator) + self.shift
        x[: int(self.nan_fraction * n)] = float("nan")
        return x

    def log_density(self, x):
        return {"ebm": self.data.log_prob(x) + 1.5} if self.densities else {}


SMALL = EvalConfig(n_samples=200, grid_size=80)


def test_evaluate_toy_reports_sensible_metrics_and_writes_plots(tmp_path):
    data = _data()
    metrics, paths = evaluate_toy(ExactMethod(data), data, SMALL, tmp_path, step=7)
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["eval/nonfinite_samples"] == 0.0
    assert metrics["eval/test_ll/ebm"] == pytest.approx(metrics["eval/test_ll/true"], abs=1e-2)
    assert metrics["eval/log_z/ebm"] == pytest.approx(1.5, abs=1e-2)
    assert metrics["eval/boundary_mass/ebm"] < 1e-3
    # the truth shifted by a constant: nothing is lost across or within the modes
    assert metrics["eval/ll_gap/mode_weights/ebm"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval/ll_gap/within_modes/ebm"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < metrics["eval/sinkhorn_data_floor"] < 1 and 0 < metrics["eval/sinkhorn"] < 1
    assert metrics["eval/samples/spread"] == pytest.approx(1.0, abs=0.3)
    assert metrics["eval/samples/off_mode"] < 0.05 and metrics["eval/samples/modes_covered"] == 1.0
    assert [p.name for p in paths] == ["samples_000007.png", "density_000007.png"]
    assert all(p.stat().st_size > 1000 for p in paths)

    shifted, _ = evaluate_toy(ExactMethod(data, shift=1.0), data, SMALL, None, step=7)
    assert shifted["eval/sinkhorn"] > metrics["eval/sinkhorn"] + 0.5


def test_mode_sample_metrics_see_broad_modes_stray_samples_and_missing_modes():
    data = _data()
    mixture = TOY_DATASETS[data.name]
    g = torch.Generator().manual_seed(5)
    exact = mode_sample_metrics(mixture.sample(4000, g), data.test, data.modes)
    assert exact["eval/samples/spread"] == pytest.approx(1.0, abs=0.1)
    assert exact["eval/samples/off_mode"] == pytest.approx(0.01, abs=0.01)
    assert exact["eval/samples/modes_covered"] == 1.0
    # every mode twice as wide: squared distances ×4, and far more samples past the data's 99th percentile
    component = torch.randint(len(data.modes), (4000,), generator=g)
    wide = data.modes[component] + 2 * (0.5 / 1.414) * torch.randn(4000, 2, generator=g)  # 8gaussians: std 0.5/1.414
    broad = mode_sample_metrics(wide, data.test, data.modes)
    assert broad["eval/samples/spread"] == pytest.approx(4.0, rel=0.15) and broad["eval/samples/off_mode"] > 0.2
    # a quarter of the samples between the modes: the median ignores them, off_mode counts them
    stray = mixture.sample(4000, g)
    stray[:1000] = 0.0  # the centre of the circle, 2.8 from every mode
    between = mode_sample_metrics(stray, data.test, data.modes)
    assert between["eval/samples/off_mode"] == pytest.approx(0.26, abs=0.03)
    # all samples on one mode (and a NaN, which is dropped)
    one = data.modes[:1].repeat(100, 1) + 0.01 * torch.randn(100, 2, generator=g)
    one[0] = float("nan")
    collapsed = mode_sample_metrics(one, data.test, data.modes)
    assert collapsed["eval/samples/modes_covered"] == pytest.approx(1 / len(data.modes))


def test_evaluate_toy_survives_non_finite_samples(tmp_path):
    data = _data()
    metrics, paths = evaluate_toy(ExactMethod(data, nan_fraction=0.25), data, SMALL, tmp_path, step=1)
    assert metrics["eval/sinkhorn"] == math.inf
    assert metrics["eval/nonfinite_samples"] == pytest.approx(0.25)
    assert math.isfinite(metrics["eval/sinkhorn_data_floor"])
    assert len(paths) == 2


def test_evaluate_toy_without_densities_or_truth_or_plots(tmp_path):
    data = _data("moons", n_test=500)
    method = ExactMethod(data, densities=False)
    metrics, paths = evaluate_toy(method, data, EvalConfig(n_samples=100, grid_size=40, plots=False), tmp_path, step=0)
    assert not any(k.startswith(("eval/test_ll", "eval/log_z", "eval/boundary_mass", "eval/ll_gap")) for k in metrics)
    assert paths == [] and not any(tmp_path.iterdir())
    _, paths = evaluate_toy(method, data, EvalConfig(n_samples=100, grid_size=40), tmp_path, step=0)
    assert [p.name for p in paths] == ["samples_000000.png"]  # no density to draw


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_samples", 0), ("sinkhorn_reg", 0.0), ("sinkhorn_cost", "cosine"), ("sinkhorn_iters", 0), ("grid_size", 2)],
)
def test_eval_config_validation_names_the_key(field, value):
    with pytest.raises(ConfigError, match=f"eval.{field}"):
        EvalConfig(**{field: value}).validate("eval")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("chains", 1),
        ("length", 1),
        ("burn_in", -1),
        ("burn_in", 1999),
        ("max_lag", 0),
        ("max_dims", 0),
        ("init_scale", 0.0),
        ("when", "often"),
    ],
)
def test_mcmc_eval_config_is_checked_as_part_of_eval(field, value):
    from ebm_scale.metrics.chains import McmcEvalConfig

    with pytest.raises(ConfigError) as err:  # burn_in 1999 > length − 2 = 1998: the cross-field rule
        EvalConfig(mcmc=McmcEvalConfig(**{field: value})).validate("eval")
    assert err.value.key == f"eval.mcmc.{field}"
