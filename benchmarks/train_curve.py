"""Train one named sweep's config in this process and evaluate it every N iterations: a learning curve of
Sinkhorn and test log-likelihood without Ray or MLflow (how the 2D figures of issues 3–4 were taken).

    uv run python benchmarks/train_curve.py 5000 ddaebm_toy method.diffusion.steps=1 [--every 1000] [--out DIR]

Seeds are fixed (network init, batches and data from --seed, default 0), single-threaded; prints the metrics
at every checkpoint and writes samples/density PNGs to --out. `train_in_process` is the loop the other
in-process benchmark (equal_budget.py) shares.

`--save-states` also writes the full training state after each evaluation (DIR/states/step_NNNNNN.pt:
networks, optimizers, averages, RNGs, the batch stream). `--resume FILE` trains on from such a state up to
`iterations` in all, with whatever overrides are given now (a lowered penalty, say): with the same
overrides the continued run is the uninterrupted one, bit for bit.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from ebm_scale.config import compose
from ebm_scale.data import load_dataset
from ebm_scale.engine.state import evaluation_rng, rng_state, set_rng_state
from ebm_scale.methods import build_method
from ebm_scale.metrics.toy import evaluate_toy


def train_in_process(cfg, seed: int, out_dir: Path | str, *, done: Callable[[int, float], bool],
                     every: int | None = None, clock: Callable[[], float] = time.perf_counter,
                     on_eval: Callable[[int, dict], None] | None = None,
                     on_progress: Callable[[int, float, dict], None] | None = None,
                     save_states: bool = False, resume: dict | None = None) -> dict:
    """Train `cfg` (seeded by `seed`) until done(steps, training seconds by `clock`) holds, evaluating every
    `every` steps and at the end. Evaluation time is not training time. Returns the last evaluation's
    metrics with the iterations and training seconds. `save_states` writes the training state after each
    evaluation to out_dir/states/; `resume` (one such state, loaded) continues from it."""
    torch.manual_seed(seed)
    data = load_dataset(cfg.data, seed)
    method = build_method(cfg.method, data.spec, "cpu")
    batches = torch.Generator().manual_seed(seed)
    trained, step, metrics = 0.0, 0, {}
    if resume is not None:
        method.load_state_dict(resume["method"])
        batches.set_state(resume["batches"])
        set_rng_state(resume["rng"])
        trained, step = resume["train_seconds"], resume["step"]
    while not done(step, trained):
        method.train(True)
        idx = torch.randint(len(data.train), (cfg.train.batch_size,), generator=batches)
        started = clock()
        out = method.train_step(data.train[idx])
        trained += clock() - started
        step += 1
        if on_progress is not None:
            on_progress(step, trained, out)
        if (every and step % every == 0) or done(step, trained):
            method.train(False)
            with evaluation_rng(seed, step):  # training goes on as if nothing had been evaluated
                metrics, _ = evaluate_toy(method, data, cfg.eval, out_dir, step)
            if on_eval is not None:
                on_eval(step, metrics)
            if save_states:
                # The training RNGs, untouched by the evaluation: where the run goes on from.
                states = Path(out_dir) / "states"
                states.mkdir(parents=True, exist_ok=True)
                torch.save({"step": step, "train_seconds": trained, "seed": seed, "method_name": cfg.method.name,
                            "method": method.state_dict(),
                            "batches": batches.get_state(), "rng": rng_state()}, states / f"step_{step:06d}.pt")
    return {"iterations": step, "train_seconds": trained, **metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("iterations", type=int)
    ap.add_argument("sweep")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=0, help="network init, batches and data draw")
    ap.add_argument("--save-states", action="store_true", help="write the training state at every evaluation")
    ap.add_argument("--resume", default=None, metavar="STATE_PT", help="train on from a --save-states file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.out or tempfile.mkdtemp(prefix="ebm_scale_curve_")
    started = time.time()

    def show(step: int, metrics: dict) -> None:
        shown = {k: round(v, 3) for k, v in metrics.items()
                 if k.startswith(("eval/test_ll", "eval/sinkhorn", "eval/ll_gap", "eval/resolution_gap", "eval/samples/"))}
        print(step, shown, f"{time.time() - started:.0f}s", flush=True)

    cfg = compose(args.sweep, args.overrides)
    resume = None
    if args.resume:
        if not Path(args.resume).is_file():
            ap.error(f"--resume {args.resume}: no such file (it is written by --save-states, under OUT/states/)")
        # weights_only=False: the file holds RNG states (numpy tuples) that this script itself wrote.
        resume = torch.load(args.resume, map_location="cpu", weights_only=False)
        if resume["method_name"] != cfg.method.name:
            ap.error(f"{args.resume} holds a {resume['method_name']!r} run; {args.sweep} trains {cfg.method.name!r}")
        if resume["seed"] != args.seed:
            ap.error(f"{args.resume} was trained with --seed {resume['seed']} (the seed draws the data): pass it")
        if resume["step"] >= args.iterations:
            ap.error(f"{args.resume} is at iteration {resume['step']}; ask for more than that")
        print(f"resuming at iteration {resume['step']} from {args.resume}", flush=True)
    train_in_process(cfg, args.seed, out, done=lambda step, _: step >= args.iterations,
                     every=args.every, on_eval=show, save_states=args.save_states, resume=resume)
    print(f"pictures: {out}" + (f", states: {Path(out) / 'states'}" if args.save_states else ""))


if __name__ == "__main__":
    main()
