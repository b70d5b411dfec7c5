"""Train one named sweep's config in this process and evaluate it every N iterations: a learning curve of
Sinkhorn and test log-likelihood without Ray or MLflow (how the 2D figures of docs/results were taken).

    uv run python experiments/train_curve.py 5000 ddaebm_toy method.diffusion.steps=1 [--every 1000] [--out DIR]

It runs the engine's loop (engine/loop.py, through ebm_scale.experiments), so a curve is what `ebm-scale
train` trains with the same config: the seed (`--seed`, default 0, sets `seed=`) draws the data, the network
init, the batches and the chains as it does there; `train.threads` and `train.device` apply. Prints the
metrics at every evaluation and writes the samples/density PNGs under --out/plots.

`--save-states` also writes the loop's checkpoint after each evaluation (DIR/states/step_NNNNNN.pt: networks,
optimizers, averages, every rank's RNGs and batch stream, the config). `--resume FILE` trains on from such a
state up to `iterations` in all, with whatever overrides are given now (a lowered penalty, say): with the
same overrides the continued run is the uninterrupted one, bit for bit.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ebm_scale.config import compose
from ebm_scale.experiments import curve_arguments, load_state_file, train_in_process

SHOWN = ("eval/test_ll", "eval/sinkhorn", "eval/ll_gap", "eval/resolution_gap", "eval/samples/")


def main() -> None:
    ap = curve_arguments(__doc__, every=1000)
    ap.add_argument("--seed", type=int, default=0, help="the config's seed: data draw, network init, batches")
    ap.add_argument("--save-states", action="store_true", help="write the training state at every evaluation")
    ap.add_argument("--resume", default=None, metavar="STATE_PT", help="train on from a --save-states file")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="ebm_scale_curve_")
    started = time.time()

    def show(step: int, metrics: dict) -> None:
        shown = {k: round(v, 3) for k, v in metrics.items() if k.startswith(SHOWN)}
        print(step, shown, f"{time.time() - started:.0f}s", flush=True)

    cfg = compose(args.sweep, args.overrides + [f"seed={args.seed}"], single_run=True)
    resume = None
    if args.resume:
        if not Path(args.resume).is_file():
            ap.error(f"--resume {args.resume}: no such file (it is written by --save-states, under OUT/states/)")
        resume = load_state_file(args.resume)
        trained = resume["config"]
        if trained["method"]["name"] != cfg.method.name:
            ap.error(
                f"{args.resume} holds a {trained['method']['name']!r} run; {args.sweep} trains {cfg.method.name!r}"
            )
        if trained["seed"] != args.seed:
            ap.error(f"{args.resume} was trained with --seed {trained['seed']} (the seed draws the data): pass it")
        if resume["step"] >= args.iterations:
            ap.error(f"{args.resume} is at iteration {resume['step']}; ask for more than that")
        print(f"resuming at iteration {resume['step']} from {args.resume}", flush=True)
    train_in_process(
        cfg,
        out,
        iterations=args.iterations,
        every=args.every,
        on_eval=show,
        save_states=args.save_states,
        resume=resume,
    )
    print(f"pictures: {Path(out) / 'plots'}" + (f", states: {Path(out) / 'states'}" if args.save_states else ""))


if __name__ == "__main__":
    main()
