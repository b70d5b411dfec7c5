"""How much does the engine cost? Per-iteration time of `mle` through ebm_scale's loop vs a bare PyTorch
loop doing the same math in the same process, plus trial start-up time (in-process and 2-worker TorchTrainer).

    uv run python benchmarks/engine_overhead.py            # full (a few minutes on 2 cores)
    uv run python benchmarks/engine_overhead.py --quick    # smoke run

Per-iteration time is differential: T(2N iterations) − T(N iterations), divided by N, so set-up, the one
evaluation at the end and process warm-up cancel; repeated, engine and bare runs interleaved, median reported.
The engine run is the real one: MLflow tracking into SQLite (asynchronous batched logging) included.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ebm_scale.config import compose
from ebm_scale.data import load_dataset
from ebm_scale.engine import tracking
from ebm_scale.engine.loop import train

OVERRIDES = [  # a small mle setup (what the quick start trains), euler: the engine's share is largest here
    "method.net.hidden=128", "method.net.layers=3", "method.sampler.kind=langevin",
    "method.sampler.steps=20", "method.sampler.step_size=0.1", "method.sampler.noise_scale=0.01",
    "train.batch_size=256", "train.log_every=25", "eval.n_samples=200", "eval.grid_size=40", "eval.plots=false",
]


class BenchSession:
    rank, world_size, local_rank = 0, 1, 0

    def __init__(self, tracker):
        self.tracker = tracker

    def report(self, metrics, checkpoint_dir):
        pass

    def restore(self):
        return None


def engine_seconds(iterations: int, uri: str, run_id: str) -> float:
    cfg = compose(None, OVERRIDES + [f"train.iterations={iterations}", f"train.eval_every={iterations}"])
    tracker = tracking.MlflowTracker(uri, run_id, async_logging=True)
    t0 = time.perf_counter()
    train(cfg, BenchSession(tracker))
    tracker.flush()
    return time.perf_counter() - t0


def bare_seconds(iterations: int) -> float:
    """The same math written out by hand: Swish MLP energy, Langevin chain, contrastive loss, Adam."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = compose(None, OVERRIDES)
    data = load_dataset(cfg.data, cfg.seed).train
    h, s = cfg.method.net.hidden, cfg.method.sampler
    layers = [nn.Linear(2, h), nn.SiLU()]
    for _ in range(cfg.method.net.layers - 2):
        layers += [nn.Linear(h, h), nn.SiLU()]
    net = nn.Sequential(*layers, nn.Linear(h, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(iterations):
        x_pos = data[torch.randint(len(data), (cfg.train.batch_size,), generator=gen)]
        x = torch.randn_like(x_pos)
        for _ in range(s.steps):
            x = x.detach().requires_grad_(True)
            grad, = torch.autograd.grad(net(x).sum(), x)
            x = x - 0.5 * s.step_size * grad + s.noise_scale * s.step_size ** 0.5 * torch.randn_like(x)
        loss = net(x_pos).mean() - net(x.detach()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def per_iteration(fn, n: int, *args) -> float:
    return (fn(2 * n, *args) - fn(n, *args)) / n


def startup_seconds(num_workers: int, storage: str, uri: str) -> float:
    """Wall time from a trial's start to its first report to Tune (1 training iteration)."""
    from ray.tune import Callback

    from ebm_scale.engine.sweep import run_sweep

    marks: dict[str, float] = {}

    class Marks(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            marks.setdefault("start", time.perf_counter())

        def on_trial_result(self, iteration, trials, trial, result, **info):
            marks.setdefault("first_result", time.perf_counter())

    extra = [f"scaling.num_workers={num_workers}"]
    if num_workers:
        extra += ["scaling.cpus_per_worker=0.5", "scaling.driver_cpus=0.5"]
    cfg = compose(None, OVERRIDES + ["train.iterations=1", "train.eval_every=1", f"storage.path={storage}",
                                     f"tracking.uri={uri}", f"name=startup_{num_workers}"] + extra)
    run_sweep(cfg, printer=lambda *_: None, extra_callbacks=[Marks()])
    return marks["first_result"] - marks["start"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iterations", type=int, default=300)
    args = ap.parse_args()
    repeats, n = (2, 40) if args.quick else (args.repeats, args.iterations)

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        exp = tracking.ensure_experiment(uri, "benchmark")
        run_id = tracking._client(uri).create_run(exp).info.run_id
        engine, bare = [], []
        for r in range(repeats):  # interleaved, so drift in machine load hits both alike
            bare.append(per_iteration(bare_seconds, n))
            engine.append(per_iteration(engine_seconds, n, uri, run_id))
            print(f"  repeat {r + 1}/{repeats}: bare {bare[-1] * 1e3:.2f} ms/it, engine {engine[-1] * 1e3:.2f} ms/it", flush=True)
        e, b = statistics.median(engine), statistics.median(bare)
        print(f"\nmle per-iteration (median of {repeats}, {n}→{2 * n} iterations, 1 thread):")
        print(f"  bare PyTorch loop : {b * 1e3:.2f} ms")
        print(f"  ebm_scale engine  : {e * 1e3:.2f} ms")
        print(f"  engine overhead   : {(e / b - 1) * 100:+.1f} %")

        import ray

        try:
            for workers in (0, 2):
                times = [startup_seconds(workers, str(Path(tmp) / "runs"), uri) for _ in range(1 if args.quick else 3)]
                label = "in-process trial" if workers == 0 else "2-worker TorchTrainer trial"
                print(f"  start-up, {label}: median {statistics.median(times):.1f} s over {len(times)} "
                      f"({', '.join(f'{t:.1f}' for t in times)})")
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
