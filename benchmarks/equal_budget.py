"""Methods compared at the same wall-clock training budget on 2D toy data (issue 4: DiffEBM vs the `mle`
noisy-Langevin baseline on 8gaussians and the 9-mode grid).

    uv run python benchmarks/equal_budget.py --budget 300 --data 8gaussians grid \
        --run diffebm=diffebm_toy --run mle=mle_toy [--seeds 0 1] [--set diffebm:method.eta=0.3]

Each `--run label=sweep` trains that named sweep's config (search dropped, data replaced) in this process,
single-threaded, until `--budget` seconds of *training* have passed (evaluation excluded), then evaluates
once with the sweep's eval settings (Sinkhorn n, grid), overridden by `--eval-samples`. Prints one markdown
row per (data, run, seed) and writes samples/density PNGs under --out.

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

import torch

from ebm_scale.config import compose
from train_curve import train_in_process  # benchmarks/ is on sys.path when this script runs


def progress(budget: float):
    def show(step: int, trained: float, out: dict) -> None:
        if step % 200 == 0:
            print(f"    {step} iterations, {trained:.0f}/{budget:.0f} s, loss {float(out['loss']):.3f}", flush=True)
    return show


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds per run")
    ap.add_argument("--data", nargs="+", default=["8gaussians", "grid"])
    ap.add_argument("--run", action="append", required=True, help="label=sweep_name (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="label:key=value override (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="ebm_scale_budget_"))
    runs = dict(r.split("=", 1) for r in args.run)
    overrides = {label: [] for label in runs}
    for item in args.set:
        label, kv = item.split(":", 1)
        overrides[label].append(kv)

    rows = []
    print(f"budget: {args.budget:.0f} s of {args.clock} time per run\n"
          f"| data | run | seed | iterations | Sinkhorn (floor) | test LL ebm (true) |\n|---|---|---|---|---|---|")
    for data in args.data:
        for label, sweep in runs.items():
            for seed in args.seeds:
                cfg = compose(sweep, [f"data={data}", f"seed={seed}", f"eval.n_samples={args.eval_samples}"]
                              + overrides[label])
                print(f"  {label} ({sweep}) on {data}, seed {seed}: training {args.budget:.0f} s", flush=True)
                clock = time.process_time if args.clock == "cpu" else time.perf_counter
                result = train_in_process(cfg, seed, out / f"{data}_{label}_{seed}", clock=clock,
                                          done=lambda _, trained: trained >= args.budget,
                                          on_progress=progress(args.budget))
                rows.append({"data": data, "run": label, "sweep": sweep, "seed": seed, **result})
                ll = result.get("eval/test_ll/ebm", float("nan"))
                print(f"| {data} | {label} | {seed} | {result['iterations']} | {result['eval/sinkhorn']:.3f} "
                      f"({result['eval/sinkhorn_data_floor']:.3f}) | {ll:.3f} ({result.get('eval/test_ll/true', float('nan')):.3f}) |",
                      flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"results and pictures: {out}")


if __name__ == "__main__":
    main()
