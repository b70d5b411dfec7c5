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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ebm-scale", description="Train, sweep and compare energy-based models.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="one training run: ebm-scale train [<sweep-name-or-path>] [key=value ...]")
    t.add_argument("overrides", nargs="*", help="an optional named sweep / YAML path first (its settings, no "
                   "search), then Hydra overrides")
    s = sub.add_parser("sweep", help="a hyperparameter sweep: ebm-scale sweep <name-or-path> [key=value ...]")
    s.add_argument("sweep")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--resume", action="store_true", help="continue the latest interrupted run of this sweep")
    v = sub.add_parser("validate", help="compose and check a sweep or config without running anything")
    v.add_argument("sweep", nargs="?", default=None, help="a named sweep or YAML path (default: the base config)")
    v.add_argument("overrides", nargs="*")
    return p


def _compose(name, overrides, single_run: bool = False):
    from ebm_scale.config import compose

    return compose(name, overrides, single_run=single_run)


def _mlflow_ui_command(uri: str) -> str:
    from pathlib import Path

    if uri == "sqlite:///" + str(Path.cwd().resolve() / DEFAULT_DB):
        uri = f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        return f"uv run mlflow ui --backend-store-uri {uri}"
    return f"open {uri} in a browser"


def _print_result(result, cfg) -> None:
    c = result.counts
    print(f"\ndone in {result.seconds:.0f} s: {c['finished']} finished, {c['pruned']} pruned (ASHA), "
          f"{c['diverged']} diverged, {c['failed']} failed")
    if result.best_metrics:
        m = result.best_metrics
        print(f"best trial ({cfg.search.metric} = {m.get(cfg.search.metric):.4g} at step {m.get('step')}):")
        for k, v in (result.best_config or {}).items():
            print(f"  {k} = {v:.4g}" if isinstance(v, float) else f"  {k} = {v}")
        extra = {k: m[k] for k in sorted(m) if k.startswith(("eval/test_ll", "eval/ll_gap", "eval/samples/"))}
        for k, v in extra.items():
            print(f"  {k} = {v:.4f}")
    else:
        print("no trial produced a usable result — see the failed/diverged runs in MLflow")
    print(f"MLflow experiment '{result.experiment}', sweep run {result.parent_run_id}"
          + (f", best trial run {result.best_run_id}" if result.best_run_id else ""))
    if result.summary_figures:
        print(f"  summary pictures on the sweep run: {', '.join(result.summary_figures)}")
    print(f"open it with:  {_mlflow_ui_command(result.tracking_uri)}")


def _run(cfg, resume: bool) -> int:
    import ray

    from ebm_scale.engine.sweep import run_sweep

    started_here = not ray.is_initialized()
    try:
        result = run_sweep(cfg, resume=resume)
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
    _print_result(result, cfg)
    return 0 if result.counts["finished"] or result.counts["pruned"] else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.command == "validate":
            from ebm_scale.config import to_container

            import yaml

            cfg = _compose(args.sweep, args.overrides)
            print(yaml.safe_dump(to_container(cfg), sort_keys=False).rstrip())
            print(f"\nOK: {args.sweep or 'config'} is valid ({cfg.search.num_samples} trial(s) of "
                  f"{cfg.method.name} on {cfg.data.name}; {time.perf_counter() - t0:.1f} s to check)")
            return 0
        if args.command == "train":
            # A first argument without '=' names a sweep whose settings to train with (its search is dropped).
            name = args.overrides[0] if args.overrides and "=" not in args.overrides[0] else None
            # One run: no search, no early stopping — the same engine path as a sweep's trial.
            cfg = _compose(name, args.overrides[1:] if name else args.overrides, single_run=True)
            return _run(cfg, resume=False)
        cfg = _compose(args.sweep, args.overrides)
        return _run(cfg, resume=args.resume)
    except ConfigError as err:
        print(f"ebm-scale: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: continue with the same command plus --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
