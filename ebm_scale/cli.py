"""`ebm-scale`: train | sweep | validate. Thin: compose the config, hand it to the engine, print the outcome.

ebm-scale train method=mle data=8gaussians train.iterations=500     one run, recorded in MLflow
ebm-scale train vaebm_toy                                            one run with a named sweep's settings
ebm-scale sweep quickstart search.num_samples=24                     a Tune + Optuna + ASHA sweep
ebm-scale sweep sweeps/mle_toy.yaml --resume                         continue an interrupted sweep
ebm-scale validate mle_toy method.sampler.step_size=-1               check a config, launch nothing
"""

from __future__ import annotations

import argparse
import sys
import time

from ebm_scale.errors import ConfigError

DEFAULT_DB = "mlflow.db"
# A model density this many nats/point below the truth's on held-out data is worth a sentence.
DENSITY_GAP_NOTE = 1.0

SWEEP_ARG_HELP = "a named sweep (e.g. quickstart, mle_toy; see sweeps/) or the path of a sweep YAML file"
OVERRIDES_HELP = (
    "Hydra overrides, key=value or group=option, e.g. search.num_samples=24 method.sampler.step_size=0.05 scaling=cpu2"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ebm-scale",
        description="Train, sweep and compare energy-based models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="one training run: ebm-scale train [<sweep-name-or-path>] [key=value ...]",
        description="One training run without Tune, recorded in MLflow as a sweep's trial is. "
        "scaling.num_workers=0 trains in this process (no Ray); >= 1 launches a TorchTrainer job.",
    )
    t.add_argument(
        "overrides",
        nargs="*",
        metavar="[sweep] overrides",
        help=f"optionally first {SWEEP_ARG_HELP} (its settings, without its search); then Hydra "
        "overrides, key=value or group=option, e.g. method=mle data=8gaussians train.iterations=200",
    )
    s = sub.add_parser(
        "sweep",
        help="a hyperparameter sweep: ebm-scale sweep <name-or-path> [key=value ...]",
        description="A Ray Tune sweep (Optuna proposes, ASHA stops early), one MLflow run per trial "
        "nested under the sweep's run.",
    )
    s.add_argument("sweep", help=SWEEP_ARG_HELP)
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    s.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest interrupted run of this sweep "
        "(same name and storage.path): finished trials are kept, unfinished ones go on from their "
        "last checkpoint",
    )
    v = sub.add_parser(
        "validate",
        help="compose and check a sweep or config without running anything",
        description="Compose the config, check every key, type, range and the search space against "
        "the schema, print the composed config; launches nothing, writes nothing.",
    )
    v.add_argument("sweep", nargs="?", default=None, help=SWEEP_ARG_HELP + " (default: the base config)")
    v.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    return p


def _compose(name, overrides, single_run: bool = False):
    from ebm_scale.config import compose

    return compose(name, overrides, single_run=single_run)


def _how_to_look(uri: str, run_id: str, runs_table: bool) -> str:
    """For a local store, the command that serves it; then the page to open."""
    from pathlib import Path

    from ebm_scale.engine.tracking import ui_page

    page = ui_page(uri, run_id, runs_table)
    if uri == "sqlite:///" + str(Path.cwd().resolve() / DEFAULT_DB):
        uri = f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        return f"open it with:  uv run mlflow ui --backend-store-uri {uri}\n          then:  {page}"
    return f"open it at:  {page}"


def density_note(metrics: dict) -> str | None:
    """One line when a model's density is far below the truth's on held-out data (what a good-looking
    sample plot does not say)."""
    truth = metrics.get("eval/test_ll/true")
    if truth is None:
        return None
    gaps = {
        k.rsplit("/", 1)[1]: truth - v
        for k, v in metrics.items()
        if k.startswith("eval/test_ll/") and not k.endswith("/true")
    }
    far = {name: gap for name, gap in gaps.items() if gap > DENSITY_GAP_NOTE}
    if not far:
        return None
    name, gap = max(far.items(), key=lambda item: item[1])
    return (
        f"  note: the {name} density is {gap:.1f} nats/point below the true density on held-out data "
        f"(eval/test_ll/{name} vs eval/test_ll/true): the samples may be good while the density is not — "
        f"see eval/ll_gap/* (misweighted modes vs misshapen ones)"
    )


def _print_metrics(metrics: dict) -> None:
    shown = {
        k: metrics[k]
        for k in sorted(metrics)
        if k.startswith(("eval/test_ll", "eval/ll_gap", "eval/samples/", "eval/sinkhorn"))
    }
    for k, v in shown.items():
        print(f"  {k} = {v:.4f}")
    note = density_note(metrics)
    if note:
        print(note)


def _print_result(result, cfg) -> None:
    c = result.counts
    print(
        f"\ndone in {result.seconds:.0f} s: {c['finished']} finished, {c['pruned']} pruned (ASHA), "
        f"{c['diverged']} diverged, {c['failed']} failed"
    )
    if result.best_metrics:
        m = result.best_metrics
        print(f"best trial ({cfg.search.metric} = {m.get(cfg.search.metric):.4g} at step {m.get('step')}):")
        for k, v in (result.best_config or {}).items():
            print(f"  {k} = {v:.4g}" if isinstance(v, float) else f"  {k} = {v}")
        _print_metrics(m)
    else:
        print("no trial produced a usable result — see the failed/diverged runs in MLflow")
    print(
        f"MLflow experiment '{result.experiment}', sweep run {result.parent_run_id}"
        + (f", best trial run {result.best_run_id}" if result.best_run_id else "")
    )
    if result.summary_figures:
        print(f"  summary pictures on the sweep run: {', '.join(result.summary_figures)}")
    print(_how_to_look(result.tracking_uri, result.parent_run_id, runs_table=True))


def _print_run(result, cfg) -> None:
    m = result.metrics
    print(
        f"\n{result.outcome} in {result.seconds:.0f} s at step {m.get('step', 0)}/{cfg.train.iterations}"
        + (f" ({cfg.search.metric} = {m[cfg.search.metric]:.4g})" if cfg.search.metric in m else "")
    )
    _print_metrics(m)
    print(
        f"MLflow experiment '{result.experiment}', run {result.run_id}"
        + (f"; checkpoint {result.checkpoint}" if result.checkpoint else "")
    )
    print(_how_to_look(result.tracking_uri, result.run_id, runs_table=False))


def _train(cfg) -> int:
    from ebm_scale.engine import leftovers
    from ebm_scale.engine.run import run_single

    leftovers.stop_leftovers()
    if cfg.scaling.num_workers == 0:
        result = run_single(cfg)
    else:  # a TorchTrainer job: Ray started here is stopped here
        import ray

        started_here = not ray.is_initialized()
        try:
            result = run_single(cfg)
        finally:
            if started_here and ray.is_initialized():
                ray.shutdown()
    leftovers.forget_children()
    _print_run(result, cfg)
    return 0 if result.outcome == "finished" else 1


def _run(cfg, resume: bool) -> int:
    import ray

    from ebm_scale.engine import leftovers
    from ebm_scale.engine.sweep import run_sweep

    started_here = not ray.is_initialized()
    try:
        result = run_sweep(cfg, resume=resume)
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
            leftovers.forget_children()
    if result.interrupted:
        c = result.counts
        print(
            f"\ninterrupted after {result.seconds:.0f} s: {c['interrupted']} trial(s) unfinished, "
            f"{c['not_started']} not started ({c['finished']} finished, {c['pruned']} pruned, "
            f"{c['diverged']} diverged, {c['failed']} failed so far)",
            file=sys.stderr,
        )
        raise KeyboardInterrupt
    _print_result(result, cfg)
    return 0 if result.counts["finished"] or result.counts["pruned"] else 1


def _resume_command(argv: list[str]) -> str:
    """The command that continues an interrupted sweep: the same arguments plus --resume."""
    import shlex

    args = [a for a in argv if a != "--resume"]
    return "uv run ebm-scale " + shlex.join(args) + " --resume"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.command == "validate":
            import yaml

            from ebm_scale.config import to_container

            cfg = _compose(args.sweep, args.overrides)
            print(yaml.safe_dump(to_container(cfg), sort_keys=False).rstrip())
            print(
                f"\nOK: {args.sweep or 'config'} is valid ({cfg.search.num_trials} trial(s) of "
                f"{cfg.method.name} on {cfg.data.name}; {time.perf_counter() - t0:.1f} s to check)"
            )
            return 0
        if args.command == "train":
            # A first argument without '=' names a sweep whose settings to train with (its search is dropped).
            name = args.overrides[0] if args.overrides and "=" not in args.overrides[0] else None
            # One run: no search, no early stopping — the same loop, recorded as a sweep's trial is.
            cfg = _compose(name, args.overrides[1:] if name else args.overrides, single_run=True)
            return _train(cfg)
        cfg = _compose(args.sweep, args.overrides)
        return _run(cfg, resume=args.resume)
    except ConfigError as err:
        print(f"ebm-scale: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "sweep":
            print(f"interrupted: continue the sweep with\n  {_resume_command(argv)}", file=sys.stderr)
        else:
            print("\ninterrupted: the run is marked failed in MLflow", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
