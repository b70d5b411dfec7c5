"""PNG pictures: written, non-empty, robust to NaNs, no figures left behind; density panels on one log scale,
sample and density pictures titled with the run and its searched values."""

import ast
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from ebm_scale.plots import plot_densities, plot_samples

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_samples_writes_a_png_and_drops_non_finite_points(tmp_path):
    samples = torch.randn(300, 2)
    samples[:10] = float("nan")
    samples[10, 0] = float("inf")
    path = plot_samples(
        samples,
        np.random.default_rng(0).normal(size=(500, 2)),
        tmp_path / "sub" / "s.png",
        title="samples",
        bounds=(-4.0, 4.0),
    )
    assert _is_png(path)


def test_plot_densities_draws_one_panel_per_name(tmp_path):
    xs = torch.linspace(-3, 3, 50)
    values = torch.exp(-0.5 * (xs[None, :] ** 2 + xs[:, None] ** 2))
    one = plot_densities({"ebm": (xs, xs, values)}, tmp_path / "one.png")
    three = plot_densities(
        {"ebm": (xs, xs, values), "flow": (xs, xs, values.T), "true": (xs, xs, values * float("nan"))},
        tmp_path / "three.png",
        title="densities",
    )
    assert _is_png(one) and _is_png(three)
    assert three.stat().st_size > one.stat().st_size


def _capture_figures(monkeypatch):
    """The figures ebm_scale.plots saves, kept for inspection."""
    import ebm_scale.plots as plots

    figures, save = [], plots._save
    monkeypatch.setattr(
        plots, "_save", lambda fig, *args, **kwargs: (figures.append(fig), save(fig, *args, **kwargs))[1]
    )
    return figures


def test_density_panels_share_one_log_density_scale_set_by_the_truth(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    xs = torch.linspace(-3, 3, 40)
    truth = -0.5 * (xs[None, :] ** 2 + xs[:, None] ** 2) - math.log(2 * math.pi)  # a standard normal's log density
    model = truth + 4.0 * xs[None, :]  # tilted: peaks far above the truth in one corner
    plot_densities({"ebm": (xs, xs, model), "true": (xs, xs, truth)}, tmp_path / "d.png", reference="true")
    images = [ax.images[0] for ax in figures[0].axes if ax.images]
    assert len(images) == 2
    top = float(truth.max())  # the truth's peak, not the model's (which is 12 nats higher)
    assert all(
        image.norm.vmax == pytest.approx(top) and image.norm.vmin == pytest.approx(top - 10.0) for image in images
    )
    np.testing.assert_allclose(images[0].get_array(), model.numpy(), rtol=1e-6)  # drawn as given: log-densities
    assert sum(ax.get_label() == "<colorbar>" for ax in figures[0].axes) == 1  # one colour bar for both panels


def test_density_scale_without_a_reference_tops_at_the_highest_panel(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    xs = torch.linspace(-1, 1, 10)
    low, high = torch.full((10, 10), -7.0), torch.full((10, 10), -2.0)
    high[0, 0] = float("nan")
    plot_densities({"a": (xs, xs, low), "b": (xs, xs, high)}, tmp_path / "d.png", log_range=4.0)
    norms = {(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in figures[0].axes if ax.images}
    assert norms == {(-6.0, -2.0)}


class _Truth:
    """A method whose samples and 'ebm' density are the data's own."""

    name = "exact"

    def __init__(self, data):
        self.data, self.device = data, torch.device("cpu")

    def sample(self, n):
        return self.data.test[:n]

    def log_density(self, x):
        return {"ebm": self.data.log_prob(x)}


@dataclass
class _Sampler:
    step_size: float = 0.0123
    steps: int = 12


def test_evaluate_toy_draws_log_densities_and_titles_pictures_with_the_run_and_its_searched_values(
    tmp_path, monkeypatch
):
    import ebm_scale.plots as plots
    from ebm_scale.data import DataConfig, load_dataset
    from ebm_scale.metrics.toy import EvalConfig, evaluate_toy

    calls = {}
    for name in ("plot_densities", "plot_samples"):
        original = getattr(plots, name)
        monkeypatch.setattr(
            plots, name, lambda *a, _o=original, _n=name, **k: (calls.setdefault(_n, (a, k)), _o(*a, **k))[1]
        )
    data = load_dataset(DataConfig(name="8gaussians", n_train=10, n_test=500), seed=0)
    run = SimpleNamespace(
        name="quickstart",
        method={"sampler": _Sampler()},
        search=SimpleNamespace(
            space={
                "method.sampler.step_size": {"loguniform": [1e-3, 1.0]},
                "method.sampler.steps": {"randint": [5, 25]},
            }
        ),
    )
    _, paths = evaluate_toy(_Truth(data), data, EvalConfig(n_samples=200, grid_size=60), tmp_path, step=50, run=run)
    assert [p.name for p in paths] == ["samples_000050.png", "density_000050.png"]

    (grids, _path), kwargs = calls["plot_densities"]
    assert kwargs["reference"] == "true"
    xs, ys, values = grids["true"]
    point = torch.tensor([[float(xs[7]), float(ys[3])]], dtype=torch.float64)
    assert float(values[3, 7]) == pytest.approx(float(data.log_prob(point)), abs=1e-3)  # the log density itself
    assert float(values.max()) < 0  # 8gaussians' peak density is below 1: an exp() scale would be positive
    for _, kwargs in calls.values():
        title = kwargs["title"]
        assert title.startswith("quickstart: exact on 8gaussians, step 50")
        assert "sampler.step_size=0.0123" in title and "sampler.steps=12" in title


def test_run_title_without_a_run_or_a_space():
    from ebm_scale.metrics.toy import run_title

    assert run_title(None, "mle on moons, step 5") == "mle on moons, step 5"
    run = SimpleNamespace(name="one", search=SimpleNamespace(space={}))
    assert run_title(run, "mle on moons, step 5") == "one: mle on moons, step 5"


def test_short_names_keep_keys_apart():
    from ebm_scale.plots import short_names

    assert short_names(["method.sampler.step_size", "method.sampler.steps", "method.loss.generator_weight"]) == [
        "sampler.step_size",
        "sampler.steps",
        "loss.generator_weight",
    ]
    assert short_names(["a.energy.lr", "b.energy.lr", "lr"]) == ["a.energy.lr", "b.energy.lr", "lr"]


def test_plot_densities_needs_a_grid(tmp_path):
    with pytest.raises(ValueError):
        plot_densities({}, tmp_path / "none.png")


def test_no_figures_are_left_open(tmp_path):
    before = plt.get_fignums()
    for i in range(3):
        plot_samples(torch.randn(20, 2), torch.randn(20, 2), tmp_path / f"{i}.png")
    assert plt.get_fignums() == before


FORBIDDEN = {"ray", "mlflow", "optuna", "hydra", "omegaconf"}


@pytest.mark.parametrize(
    "module",
    [
        "plots.py",
        "data/__init__.py",
        "data/toy.py",
        "metrics/__init__.py",
        "metrics/likelihood.py",
        "metrics/sinkhorn.py",
        "metrics/toy.py",
    ],
)
def test_plain_modules_import_no_tracking_or_sweep_stack(module):
    tree = ast.parse((Path(__file__).parents[1] / "ebm_scale" / module).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name.split(".")[0] for name in imported} & FORBIDDEN
