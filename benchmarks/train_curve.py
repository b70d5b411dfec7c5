"""Train one named sweep's config in this process and evaluate it every N iterations: a learning curve of
Sinkhorn and test log-likelihood without Ray or MLflow (how the 2D figures of issues 3–4 were taken).

    uv run python benchmarks/train_curve.py 5000 ddaebm_toy method.diffusion.steps=1 [--every 1000] [--out DIR]

Seeds are fixed (network init 0, batches 0, data seed 0), single-threaded; prints the evaluation metrics
at every checkpoint and writes samples/density PNGs to --out.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from ebm_scale.config import compose
from ebm_scale.data import load_dataset
from ebm_scale.methods import build_method
from ebm_scale.metrics.toy import evaluate_toy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("iterations", type=int)
    ap.add_argument("sweep")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.out or tempfile.mkdtemp(prefix="ebm_scale_curve_")
    cfg = compose(args.sweep, args.overrides)
    data = load_dataset(cfg.data, 0)
    torch.manual_seed(0)
    method = build_method(cfg.method, data.spec, "cpu")
    batches = torch.Generator().manual_seed(0)
    started = time.time()
    for step in range(1, args.iterations + 1):
        method.train(True)
        idx = torch.randint(len(data.train), (cfg.train.batch_size,), generator=batches)
        method.train_step(data.train[idx])
        if step % args.every == 0 or step == args.iterations:
            method.train(False)
            metrics, _ = evaluate_toy(method, data, cfg.eval, out, step)
            shown = {k: round(v, 3) for k, v in metrics.items() if "test_ll" in k or k.startswith("eval/sinkhorn")}
            print(step, shown, f"{time.time() - started:.0f}s", flush=True)
    print(f"pictures: {out}")


if __name__ == "__main__":
    main()
