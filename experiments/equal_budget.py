"""Methods compared at the same wall-clock training budget on 2D toy data (issue 4: DiffEBM vs the `mle`
noisy-Langevin baseline on 8gaussians and the 9-mode grid).

    uv run python experiments/equal_budget.py --budget 300 --data 8gaussians grid \
        --run diffebm=diffebm_toy --run mle=mle_toy [--seeds 0 1] [--set diffebm:method.eta=0.3]

Each `--run label=sweep` trains that named sweep's config (search dropped, data replaced) in this process,
through the engine's loop (ebm_scale.experiments), until `--budget` seconds of *training* have passed (the
loop's steps, evaluation excluded), then evaluates once with the sweep's eval settings (Sinkhorn n, grid),
overridden by `--eval-samples`. Prints one markdown
row per (data, run, seed), and with several seeds their means and a seed-by-seed comparison of the runs;
writes results.json and samples/density PNGs under --out. `--summarize a/results.json b/results.json`
prints that summary for earlier runs, pooled.

The budget is counted in this process's CPU time (`--clock cpu`, the default): single-threaded on an idle
core that is the wall-clock, and unlike the wall-clock it does not shrink when other work shares the
machine. `--clock wall` counts wall-clock seconds instead (then run nothing else meanwhile).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ebm_scale.config import compose
from ebm_scale.experiments import train_in_process

PROGRESS_EVERY = 200  # iterations between progress lines


def budget_spent(budget: float):
    """done(step, trained) for train_in_process: the budget, with a progress line every PROGRESS_EVERY steps."""

    def done(step: int, trained: float) -> bool:
        if step % PROGRESS_EVERY == 0:
            print(f"    {step} iterations, {trained:.0f}/{budget:.0f} s", flush=True)
        return trained >= budget

    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds per run")
    ap.add_argument("--data", nargs="+", default=["8gaussians", "grid"])
    ap.add_argument("--run", action="append", default=[], help="label=sweep_name (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="label:key=value override (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--summarize",
        nargs="+",
        metavar="RESULTS_JSON",
        help="train nothing: print the seed summary of earlier runs' results.json files, pooled",
    )
    args = ap.parse_args()
    if args.summarize:
        print(summarize([row for path in args.summarize for row in json.loads(Path(path).read_text())]))
        return
    if not args.run:
        ap.error("give at least one --run label=sweep (or --summarize)")
    out = Path(args.out or tempfile.mkdtemp(prefix="ebm_scale_budget_"))
    runs = dict(r.split("=", 1) for r in args.run)
    overrides = {label: [] for label in runs}
    for item in args.set:
        label, kv = item.split(":", 1)
        overrides[label].append(kv)

    rows = []
    print(
        f"budget: {args.budget:.0f} s of {args.clock} time per run\n"
        f"| data | run | seed | iterations | Sinkhorn (floor) | test LL ebm (true) |\n|---|---|---|---|---|---|"
    )
    for data in args.data:
        for label, sweep in runs.items():
            for seed in args.seeds:
                cfg = compose(
                    sweep,
                    [f"data={data}", f"seed={seed}", f"eval.n_samples={args.eval_samples}"] + overrides[label],
                    single_run=True,
                )
                print(f"  {label} ({sweep}) on {data}, seed {seed}: training {args.budget:.0f} s", flush=True)
                clock = time.process_time if args.clock == "cpu" else time.perf_counter
                result = train_in_process(
                    cfg, out / f"{data}_{label}_{seed}", clock=clock, done=budget_spent(args.budget)
                )
                rows.append({"data": data, "run": label, "sweep": sweep, "seed": seed, **result})
                ll = result.get("eval/test_ll/ebm", float("nan"))
                truth = result.get("eval/test_ll/true", float("nan"))
                print(
                    f"| {data} | {label} | {seed} | {result['iterations']} | {result['eval/sinkhorn']:.3f} "
                    f"({result['eval/sinkhorn_data_floor']:.3f}) | {ll:.3f} ({truth:.3f}) |",
                    flush=True,
                )
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    if len(args.seeds) > 1:
        print(summarize(rows))
    print(f"results and pictures: {out}")


def _mean_se(values: list[float]) -> str:
    n = len(values)
    mean = sum(values) / n
    se = (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
    return f"{mean:.3f} ± {se:.3f}"


def summarize(rows: list[dict]) -> str:
    """Means over seeds (± standard error) per data set and run, of the Sinkhorn and of its excess over the
    seed's data floor (what a perfect sampler scores on the same test points, so the part of the
    seed-to-seed spread that comes from the test draw cancels); then every pair of runs compared seed by
    seed on the same test points: the mean difference ± its standard error, and on how many seeds each run
    was lower."""
    lines = ["\n| data | run | seeds | Sinkhorn | Sinkhorn − floor | floor |", "|---|---|---|---|---|---|"]
    by_key: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        by_key.setdefault((r["data"], r["run"]), {})[r["seed"]] = r
    for (data, run), per_seed in by_key.items():
        sk = [r["eval/sinkhorn"] for r in per_seed.values()]
        floor = [r["eval/sinkhorn_data_floor"] for r in per_seed.values()]
        lines.append(
            f"| {data} | {run} | {len(sk)} | {_mean_se(sk)} | {_mean_se([a - b for a, b in zip(sk, floor)])} "
            f"| {_mean_se(floor)} |"
        )
    pairs = [(a, b) for a in by_key for b in by_key if a[0] == b[0] and a[1] < b[1]]
    if pairs:
        lines += [
            "\n| data | pair | seeds | mean difference (first − second) | first lower on |",
            "|---|---|---|---|---|",
        ]
    for (data, a), (_, b) in pairs:
        seeds = sorted(set(by_key[(data, a)]) & set(by_key[(data, b)]))
        diffs = [by_key[(data, a)][s]["eval/sinkhorn"] - by_key[(data, b)][s]["eval/sinkhorn"] for s in seeds]
        lines.append(
            f"| {data} | {a} − {b} | {len(seeds)} | {_mean_se(diffs)} | {sum(d < 0 for d in diffs)} of {len(seeds)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
