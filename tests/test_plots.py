"""PNG pictures: written, non-empty, robust to NaNs, no figures left behind."""
import ast
from pathlib import Path

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
    path = plot_samples(samples, np.random.default_rng(0).normal(size=(500, 2)), tmp_path / "sub" / "s.png",
                        title="samples", bounds=(-4.0, 4.0))
    assert _is_png(path)


def test_plot_densities_draws_one_panel_per_name(tmp_path):
    xs = torch.linspace(-3, 3, 50)
    values = torch.exp(-0.5 * (xs[None, :] ** 2 + xs[:, None] ** 2))
    one = plot_densities({"ebm": (xs, xs, values)}, tmp_path / "one.png")
    three = plot_densities({"ebm": (xs, xs, values), "flow": (xs, xs, values.T), "true": (xs, xs, values * float("nan"))},
                           tmp_path / "three.png", title="densities")
    assert _is_png(one) and _is_png(three)
    assert three.stat().st_size > one.stat().st_size


def test_plot_densities_needs_a_grid(tmp_path):
    with pytest.raises(ValueError):
        plot_densities({}, tmp_path / "none.png")


def test_no_figures_are_left_open(tmp_path):
    before = plt.get_fignums()
    for i in range(3):
        plot_samples(torch.randn(20, 2), torch.randn(20, 2), tmp_path / f"{i}.png")
    assert plt.get_fignums() == before


FORBIDDEN = {"ray", "mlflow", "optuna", "hydra", "omegaconf"}


@pytest.mark.parametrize("module", ["plots.py", "data/__init__.py", "data/toy.py", "metrics/__init__.py",
                                    "metrics/likelihood.py", "metrics/sinkhorn.py", "metrics/toy.py"])
def test_plain_modules_import_no_tracking_or_sweep_stack(module):
    tree = ast.parse((Path(__file__).parents[1] / "ebm_scale" / module).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name.split(".")[0] for name in imported} & FORBIDDEN
