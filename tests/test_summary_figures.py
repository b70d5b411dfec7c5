"""The sweep's summary pictures, from Tune-like results: parallel coordinates of every trial with a value
(ASHA-stopped ones too, drawn apart), axis names that tell keys apart, parameter importance only from
enough finished trials and saying from how many."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from ebm_scale.engine import summary

SPACE = {
    "method.sampler.step_size": {"loguniform": [1e-3, 1.0]},
    "method.sampler.steps": {"randint": [5, 25]},
    "method.sampler.noise_scale": {"choice": [0.0, 0.01, 0.1]},
    "method.loss.generator_weight": {"uniform": [0.0, 1.0]},
}
CFG = SimpleNamespace(
    name="probe",
    train=SimpleNamespace(iterations=300),
    search=SimpleNamespace(mode="min", metric="eval/sinkhorn", space=SPACE),
)


def _results(finished: int, pruned: int, failed: int = 1):
    """Trials stopped at step 50 by ASHA (first, as Tune may list them), trials that ran 300 iterations, and
    failed ones (no value)."""
    rng = np.random.default_rng(0)
    results = []
    for i in range(finished + pruned + failed):
        config = {
            "method.sampler.step_size": float(10 ** rng.uniform(-3, 0)),
            "method.sampler.steps": int(rng.integers(5, 26)),
            "method.sampler.noise_scale": float(rng.choice([0.0, 0.01, 0.1])),
            "method.loss.generator_weight": float(rng.uniform()),
        }
        last = 50 if i < pruned else 300
        steps = list(range(50, last + 1, 50))
        values = [1.0 + i + 1 / s for s in steps]
        failed_trial = i >= finished + pruned
        results.append(
            SimpleNamespace(
                config=config,
                error=RuntimeError("boom") if failed_trial else None,
                metrics=None if failed_trial else {"step": last, "diverged": 0, "eval/sinkhorn": values[-1]},
                metrics_dataframe=None if failed_trial else pd.DataFrame({"step": steps, "eval/sinkhorn": values}),
            )
        )
    return results


@pytest.fixture
def saved_figures(monkeypatch):
    import ebm_scale.plots as plots

    figures, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    return figures


def test_parallel_coordinates_draw_pruned_trials_apart_with_distinct_axis_names(tmp_path, saved_figures):
    results = _results(finished=3, pruned=5)
    study = summary.study_from_results(CFG, results)
    assert summary.parallel_coordinate(CFG, study, tmp_path / "pc.png") == tmp_path / "pc.png"
    ax = saved_figures[0].axes[0]
    lines = [line for line in ax.get_lines() if line.get_gid()]
    assert len(lines) == 8  # 3 finished + 5 stopped by ASHA; the failed trial has no value
    finished = [line for line in lines if line.get_gid() == "finished"]
    stopped = [line for line in lines if line.get_gid() != "finished"]
    assert len(finished) == 3 and len(stopped) == 5
    assert {line.get_linestyle() for line in finished} == {"-"} and "-" not in {
        line.get_linestyle() for line in stopped
    }
    # the objective axis (log-scaled for a Sinkhorn) holds each trial's last value, a pruned one's at step 50
    values = np.log10([1 + i + 1 / (50 if i < 5 else 300) for i in range(8)])
    expected = (values - values.min()) / (values.max() - values.min())
    assert sorted(line.get_ydata()[-1] for line in lines) == pytest.approx(sorted(expected))
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [
        "sampler.step_size",
        "sampler.steps",
        "sampler.noise_scale",
        "loss.generator_weight",
        "eval/sinkhorn",
    ]
    # no line in a colour that vanishes on white: every colour has some channel well below 1
    assert all(min(line.get_color()[:3]) < 0.8 for line in lines)
    assert "3 finished" in saved_figures[0].get_suptitle() and "5 stopped" in saved_figures[0].get_suptitle()


def test_sweep_figures_skip_importance_below_two_finished_trials_per_parameter(tmp_path):
    printed = []
    paths = summary.sweep_figures(CFG, _results(finished=3, pruned=9), str(tmp_path), printed.append)
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["learning_curves.png", "parallel_coordinate.png"]
    assert any(
        "param_importances.png" in line and "3 trials ran to the end" in line and "at least 8" in line
        for line in printed
    )


def test_importance_title_says_how_many_finished_trials_it_is_from(tmp_path, monkeypatch):
    from optuna.visualization import matplotlib as ovm

    axes, plot = [], ovm.plot_param_importances
    monkeypatch.setattr(ovm, "plot_param_importances", lambda study: (axes.append(plot(study)), axes[-1])[1])
    paths = summary.sweep_figures(CFG, _results(finished=9, pruned=2), str(tmp_path), print)
    assert str(tmp_path / "param_importances.png") in paths
    assert "from 9 finished trials" in axes[0].get_title(loc="left")
