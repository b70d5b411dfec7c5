"""The sweep's own pictures: Optuna's parameter importance, parallel coordinates of every trial, learning
curves of every trial coloured by outcome, and the best trial's samples.

The Optuna study is rebuilt from Tune's results (finished trials COMPLETE, ASHA-stopped ones PRUNED with
their intermediate values) so the same figures come out for a fresh and a resumed sweep.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ebm_scale.engine import tracking  # noqa: E402

OUTCOME_COLORS = {"finished": "tab:blue", "pruned": "tab:gray", "diverged": "tab:red", "failed": "black"}


def _distribution(spec: dict):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    ((name, args),) = spec.items()
    if name == "uniform":
        return FloatDistribution(args[0], args[1])
    if name == "loguniform":
        return FloatDistribution(args[0], args[1], log=True)
    if name == "randint":
        return IntDistribution(args[0], args[1])
    if name == "qrandint":
        return IntDistribution(args[0], args[1], step=args[2])
    return CategoricalDistribution(list(args))  # choice, grid


def study_from_results(cfg, results):
    import optuna
    from optuna.trial import TrialState, create_trial

    from ebm_scale.engine.outcomes import trial_outcome

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize" if cfg.search.mode == "min" else "maximize")
    distributions = {k: _distribution(v) for k, v in cfg.search.space.items()}
    for r in results:
        m, cfg_values = r.metrics or {}, r.config or {}
        if not set(distributions) <= set(cfg_values):
            continue
        outcome = trial_outcome(m, cfg.train.iterations, r.error is not None)
        value = m.get(cfg.search.metric)
        history = r.metrics_dataframe
        intermediate = {}
        if history is not None and cfg.search.metric in history:
            intermediate = {
                int(s): float(v)
                for s, v in zip(history["step"], history[cfg.search.metric], strict=True)
                if v is not None and math.isfinite(v)
            }
        finite = value is not None and math.isfinite(value)
        state = (
            TrialState.COMPLETE
            if outcome == "finished" and finite
            else (TrialState.PRUNED if outcome == "pruned" else TrialState.FAIL)
        )
        study.add_trial(
            create_trial(
                params={k: cfg_values[k] for k in distributions},
                distributions=distributions,
                value=value if state == TrialState.COMPLETE else None,
                state=state,
                intermediate_values=intermediate,
                user_attrs={"outcome": outcome},
            )
        )
    return study


def learning_curves(cfg, results, path: Path) -> Path:
    from ebm_scale.engine.outcomes import trial_outcome

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    seen = set()
    for r in results:
        history = r.metrics_dataframe
        if history is None or cfg.search.metric not in history:
            continue
        outcome = trial_outcome(r.metrics or {}, cfg.train.iterations, r.error is not None)
        ax.plot(
            history["step"],
            history[cfg.search.metric],
            marker="o",
            ms=3,
            lw=1.2,
            color=OUTCOME_COLORS[outcome],
            label=outcome if outcome not in seen else None,
            alpha=0.85,
        )
        seen.add(outcome)
    ax.set_xlabel("training iteration")
    ax.set_ylabel(cfg.search.metric)
    if cfg.search.metric.endswith("sinkhorn"):
        ax.set_yscale("log")
    ax.set_title(f"{cfg.name}: every trial's {cfg.search.metric} (ASHA-stopped trials in grey)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def importance_min_trials(n_params: int) -> int:
    """Finished trials below which parameter importance is not drawn: two per searched parameter (at least 4)."""
    # Optuna's importance (fANOVA) fits a random forest to the finished trials. With 4 parameters of which only
    # one mattered (value = x0 + noise), it ranked that one first in 15 of 40 random studies of 3 trials (about
    # chance), 31/40 of 6 and 39/40 of 8: below two trials per parameter the bars are mostly noise.
    return max(4, 2 * n_params)


def parallel_coordinate(cfg, study, path: Path) -> Path | None:
    """Every trial with a value, finished or stopped by ASHA (at its last intermediate value, so at an
    earlier step than the finished ones), through its parameters to its value. Optuna's own plot draws finished
    trials only, cuts names at 17 characters (method.sampler.step_size and .steps both read "method.sampler.st...")
    and colours the worst line white-blue on a light background, hence this one. None when no trial has a value."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    from ebm_scale.plots import ParallelAxis, plot_parallel_coordinates

    finished = [
        (t, t.value, "finished")
        for t in study.trials
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
    ]
    stopped = [
        (t, t.intermediate_values[max(t.intermediate_values)], "stopped early (last value)")
        for t in study.trials
        if t.state == TrialState.PRUNED and t.intermediate_values
    ]
    rows = finished + stopped  # finished first: the first group is drawn solid
    if not rows:
        return None
    axes = []
    for name, dist in rows[0][0].distributions.items():
        column = [t.params[name] for t, _, _ in rows]
        if isinstance(dist, CategoricalDistribution):
            axes.append(ParallelAxis(name, [dist.choices.index(v) for v in column], choices=dist.choices))
        else:
            axes.append(ParallelAxis(name, column, dist.low, dist.high, dist.log))
    counts = {g: sum(r[2] == g for r in rows) for g in ("finished", "stopped early (last value)")}
    title = (
        f"{cfg.name}: {len(rows)} trials, {counts['finished']} finished, "
        f"{counts['stopped early (last value)']} stopped by ASHA"
    )
    return plot_parallel_coordinates(
        axes,
        [v for _, v, _ in rows],
        [g for _, _, g in rows],
        path,
        cfg.search.metric,
        lower_is_better=cfg.search.mode == "min",
        log_values=cfg.search.metric.endswith("sinkhorn"),
        title=title,
    )


def sweep_figures(cfg, results, out_dir: str, printer=print) -> list[str]:
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as ovm

    out = Path(out_dir)
    paths = [str(learning_curves(cfg, results, out / "learning_curves.png"))]
    if not cfg.search.space:
        return paths
    study = study_from_results(cfg, results)
    if parallel_coordinate(cfg, study, out / "parallel_coordinate.png") is not None:
        paths.append(str(out / "parallel_coordinate.png"))
    else:
        printer("  (skipping parallel_coordinate.png: no trial reported a value)")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    needed = importance_min_trials(len(cfg.search.space))
    if len(complete) < needed:
        printer(
            f"  (skipping param_importances.png: {len(complete)} trials ran to the end, and importance over "
            f"{len(cfg.search.space)} parameters needs at least {needed})"
        )
        return paths
    try:
        # Optuna marks its matplotlib backend "experimental" on every call, and switches the whole process to
        # its ggplot style: rc_context keeps that to this figure.
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore", ExperimentalWarning)
            ax = ovm.plot_param_importances(study)
            fig = ax.figure
            ax.set_title(
                f"{cfg.name}: importance for {cfg.search.metric}\nfrom {len(complete)} finished trials", loc="left"
            )  # where Optuna puts its own title, which this replaces
            if ax.get_legend() is not None:  # one objective: its name is in the title
                ax.get_legend().remove()
            fig.set_size_inches(8, 4.5)
            fig.tight_layout()
            fig.savefig(out / "param_importances.png", dpi=100)
        plt.close(fig)
        paths.append(str(out / "param_importances.png"))
    except (ValueError, RuntimeError) as err:  # e.g. importance needs parameter variation
        printer(f"  (skipping param_importances.png: {err})")
    return paths


def copy_best_samples(uri: str, run_id: str, out_dir: str) -> str | None:
    """Download the best trial's last samples picture, to show it on the sweep's parent run."""
    files = [f for f in tracking.list_artifacts(uri, run_id, "plots") if Path(f).name.startswith("samples_")]
    if not files:
        return None
    local = tracking.download_artifact(uri, run_id, sorted(files)[-1], out_dir)
    target = Path(out_dir) / "best_trial_samples.png"
    Path(local).rename(target)
    return str(target)
