"""How much does the engine cost? Per-iteration time of `mle` through ebm_scale's loop vs a bare PyTorch
loop doing the same math in the same process, plus trial start-up time (in-process and 2-worker TorchTrainer).

    uv run python benchmarks/engine_overhead.py            # full (~5 minutes on 2 cores)
    uv run python benchmarks/engine_overhead.py --quick    # smoke run
    uv run python benchmarks/engine_overhead.py --no-startup / --startup-only
    uv run python benchmarks/engine_overhead.py --method-only   # the method's train_step alone vs the bare loop
    uv run python benchmarks/engine_overhead.py --image --pairs 30   # conv energy on 32×32 Fashion-MNIST
    uv run python benchmarks/engine_overhead.py --image --set train.precision=bf16   # any override, both loops

Why interleaved chunks: on a shared 2-core VM the same loop's speed drifts by ±20 % over seconds, far more
than the 3 % being measured, so engine and bare runs timed one after the other cannot resolve it. Here the
bare loop runs *inside* the engine run: at every train-metric log (every `log_every` = 25 engine iterations)
the tracker below waits until MLflow has written the batch, then runs 25 bare iterations on its own timer.
Engine and bare chunks alternate every ~0.3 s and see the same machine; each pair gives one ratio, and a run
reports the median. The engine chunk is everything the loop does between two logs: batch draw, the method's
train_step with its diagnostics, metric accumulation, the finite check, the host sync and the MLflow batch.

The engine logs asynchronously: MLflow writes the batch (SQLite, real) on a background thread while training
goes on, competing with it for the GIL and the cores. So the benchmark reports two bounds on the overhead:
* write charged in full: the engine chunk's timer stops once the write has landed, as if it were synchronous;
* write not charged: the timer stops when the batch is queued, and the write lands before the bare chunk
  starts, on nobody's timer (no contention with either loop).
The engine's real overhead lies between the two.

`--image`: the same measurement for `mle` with paper 000's conv energy (`mle_conv`) on 32×32 Fashion-MNIST,
where the engine draws its batches through `ImageBatches` (a DataLoader over a DistributedSampler, with
`data.num_workers=0`: the loading happens on the engine's own timer; worker processes would prefetch while
the bare chunk runs and slow it down instead) and the bare loop indexes a preloaded tensor of the same
images. A chunk is `IMAGE.log_every` iterations (~1 s), so per-log costs are charged far more heavily than in
a real run (which logs every 100). `--set KEY=VALUE` (repeatable) is applied to both loops: the bare loop
follows train.precision (bf16 autocast around the training forward, fp32 chains, as train.sampler_precision
defaults to) and train.channels_last.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ebm_scale.config import compose
from ebm_scale.data import load_dataset
from ebm_scale.data.images import stack
from ebm_scale.engine import tracking
from ebm_scale.engine.loop import train


@dataclass
class Bench:
    """One benchmarked setup: its overrides, the chunk length (= train.log_every) and how to build the bare
    loop's network."""

    name: str
    overrides: list[str]
    log_every: int
    bare_net: object  # (cfg, data shape) -> nn.Module

    def compose(self, extra: list[str]):
        return compose(None, self.overrides + [f"train.log_every={self.log_every}"] + extra)


def bare_mlp(cfg, shape) -> nn.Module:
    """Swish MLP as `method.energy` (arch mlp) configures it."""
    h = cfg.method.energy.hidden
    layers = [nn.Linear(shape[0], h), nn.SiLU()]
    for _ in range(cfg.method.energy.layers - 2):
        layers += [nn.Linear(h, h), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(h, 1))


def bare_conv(cfg, shape) -> nn.Module:
    """Paper 000's Table 2 conv energy (what `mle_conv` builds), written out: 3×3 conv(n_f), stride-2 4×4
    convs down to 4×4 (widths 2·n_f constant or doubling), Swish after each, flatten, FC to a scalar."""
    nf, stages = cfg.method.energy.channels, shape[-1].bit_length() - 3  # log2(side) − 2
    mults = [2 ** (i + 1) if cfg.method.energy.growth == "doubling" else 2 for i in range(stages)]
    widths = [nf] + [nf * m for m in mults]
    layers = [nn.Conv2d(shape[0], nf, 3, padding=1), nn.SiLU()]
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(w_in, w_out, 4, stride=2, padding=1), nn.SiLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(widths[-1] * 16, 1))


TOY = Bench(
    "mle, toy MLP",
    [  # a small mle setup (what the quick start trains): the engine's share is largest on small nets
        "method.energy.hidden=128",
        "method.energy.layers=3",
        "method.sampler.kind=langevin",
        "method.sampler.steps=20",
        "method.sampler.step_size=0.1",
        "method.sampler.noise_scale=0.01",
        "train.batch_size=256",
        "eval.n_samples=200",
        "eval.grid_size=40",
        "eval.plots=false",
    ],
    25,
    bare_mlp,
)
IMAGE = Bench(
    "mle, conv energy on 32×32 Fashion-MNIST",
    [  # mle_fashion_mnist's net and sampler (K cut to 4 so a chunk is ~1 s on one CPU thread), batch 32
        "data=fashion_mnist",
        "data.root=/usr/share/datasets/fashion-mnist",
        "data.image_size=32",
        "data.num_workers=0",
        "method.energy.arch=mle_conv",
        "method.energy.channels=32",
        "method.energy.growth=constant",
        "method.sampler.kind=langevin",
        "method.sampler.steps=4",
        "method.sampler.step_size=0.1",
        "method.sampler.noise_scale=0.1",
        "method.optim.lr=5e-4",
        "train.batch_size=32",
        # evaluation runs once, after the last chunk, untimed: make it small
        "eval.fid.extractor=random",
        "eval.fid.n_samples=16",
        "eval.fid.n_reference=16",
        "eval.fid.batch_size=16",
        "eval.ood.n_images=0",
        "eval.grid_samples=4",
        "eval.plots=false",
    ],
    3,
    bare_conv,
)
_PRELOADED: dict[tuple, torch.Tensor] = {}


def preloaded_train(cfg) -> torch.Tensor:
    """The training split as one tensor (images: all of them decoded and resized once; cached per process)."""
    key = (cfg.data.name, cfg.data.root, cfg.data.image_size, cfg.data.n_train, cfg.seed)
    if key not in _PRELOADED:
        data = load_dataset(cfg.data, cfg.seed)
        train_set = getattr(data, "train_set", None)  # images: a Dataset; toys: the `train` tensor
        _PRELOADED[key] = data.train if train_set is None else stack(train_set, torch.arange(len(train_set)))
    return _PRELOADED[key]


class BareLoop:
    """The same math written out by hand: the energy (MLP or conv), Langevin chain from noise
    x ← x − η/2·∇E + σ√η·ω, contrastive loss, Adam; batches indexed from a preloaded tensor."""

    def __init__(self, cfg, bench: Bench):
        self.knobs, self.batch_size = cfg.method.sampler, cfg.train.batch_size
        self.data = preloaded_train(cfg)
        torch.manual_seed(1)
        self.net = bench.bare_net(cfg, tuple(self.data.shape[1:]))
        self.images = self.data.dim() == 4
        self.channels_last = cfg.train.channels_last and self.images
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.bf16 = cfg.train.precision == "bf16"  # the training forward under autocast; chains stay fp32
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.method.optim.lr)
        self.gen = torch.Generator().manual_seed(0)  # its own stream: the engine's run is not perturbed

    def run(self, iterations: int) -> float:
        net, s, n, gen = self.net, self.knobs, self.batch_size, self.gen
        t0 = time.perf_counter()
        for _ in range(iterations):
            x_pos = self.data[torch.randint(len(self.data), (n,), generator=gen)]
            if self.channels_last:
                x_pos = x_pos.contiguous(memory_format=torch.channels_last)
            x = torch.randn(x_pos.shape, generator=gen)
            for _ in range(s.steps):
                x = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(net(x).sum(), x)
                x = (
                    x
                    - 0.5 * s.step_size * grad
                    + s.noise_scale * s.step_size**0.5 * torch.randn(x.shape, generator=gen)
                )
            with torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext():
                energies = net(torch.cat([x_pos, x.detach()])).float()
            loss = energies[:n].mean() - energies[n:].mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return time.perf_counter() - t0


class InterleavingTracker:
    """The engine's tracker for the benchmark: forwards to the real MlflowTracker, and at each train-metric
    log closes an engine chunk (after MLflow's write has landed) and runs one bare chunk."""

    def __init__(self, real: tracking.MlflowTracker, bare: BareLoop, log_every: int):
        self.real, self.bare, self.log_every = real, bare, log_every
        self.engine_chunks: list[float] = []  # until the write has landed
        self.engine_queued_chunks: list[float] = []  # until the batch is queued
        self.bare_chunks: list[float] = []
        self.resumed_at: float | None = None  # None until the first log: the first chunk includes set-up

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.real.log_metrics(metrics, step)
        if not any(k.startswith("train/") for k in metrics):  # evaluation metrics: not a training chunk
            return
        queued = time.perf_counter()
        self.real.flush()
        landed = time.perf_counter()
        if self.resumed_at is not None:
            self.engine_chunks.append(landed - self.resumed_at)
            self.engine_queued_chunks.append(queued - self.resumed_at)
            self.bare_chunks.append(self.bare.run(self.log_every))
        else:
            self.bare.run(self.log_every)  # warm-up for the bare loop too
        self.resumed_at = time.perf_counter()

    def log_artifacts(self, paths, artifact_path):
        self.real.log_artifacts(paths, artifact_path)


class BenchSession:
    rank, world_size, local_rank = 0, 1, 0

    def __init__(self, tracker):
        self.tracker = tracker

    def report(self, metrics, checkpoint_dir):
        pass

    def restore(self):
        return None


def interleaved_run(
    bench: Bench, pairs: int, uri: str, run_id: str, extra: list[str]
) -> tuple[list[float], list[float], list[float]]:
    """One engine run of (pairs + 1) chunks with a bare chunk after each; returns per-iteration seconds of the
    engine (write charged), the engine (write not charged) and the bare loop."""
    iterations = bench.log_every * (pairs + 1)
    cfg = bench.compose(extra + [f"train.iterations={iterations}", f"train.eval_every={iterations}"])
    real = tracking.MlflowTracker(uri, run_id, async_logging=True)
    tracker = InterleavingTracker(real, BareLoop(cfg, bench), bench.log_every)
    train(cfg, BenchSession(tracker))
    tracker.real.flush()  # the last (evaluation) batch lands before the temp store goes away
    return tuple(
        [t / bench.log_every for t in chunks]
        for chunks in (tracker.engine_chunks, tracker.engine_queued_chunks, tracker.bare_chunks)
    )


def method_only_ratio(bench: Bench, pairs: int, extra: list[str]) -> float:
    """The method's train_step alone (no loop, no logging, batches indexed from the preloaded tensor) against
    the bare loop, in alternating chunks of log_every iterations: how much of the engine's overhead is the
    method's own work. Precision and channels_last are not applied here (the loop applies them)."""
    from ebm_scale.methods import build_method

    cfg = bench.compose(extra)
    data = load_dataset(cfg.data, cfg.seed)
    method = build_method(cfg.method, data.spec, "cpu")
    method.train(True)
    bare, gen = BareLoop(cfg, bench), torch.Generator().manual_seed(0)
    train_data = bare.data
    ratios = []
    for pair in range(pairs + 5):
        t0 = time.perf_counter()
        for _ in range(bench.log_every):
            method.train_step(train_data[torch.randint(len(train_data), (cfg.train.batch_size,), generator=gen)])
        method_seconds = time.perf_counter() - t0
        bare_seconds = bare.run(bench.log_every)
        if pair >= 5:  # the first chunks warm up both
            ratios.append(method_seconds / bare_seconds)
    return statistics.median(ratios)


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
    cfg = TOY.compose(
        [
            "train.iterations=1",
            "train.eval_every=1",
            f"storage.path={storage}",
            f"tracking.uri={uri}",
            f"name=startup_{num_workers}",
        ]
        + extra,
    )
    run_sweep(cfg, printer=lambda *_: None, extra_callbacks=[Marks()])
    return marks["first_result"] - marks["start"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3, help="independent engine runs (fresh model, fresh process state)")
    ap.add_argument("--pairs", type=int, default=40, help="engine/bare chunk pairs per run (log_every iterations each)")
    ap.add_argument(
        "--image", action="store_true", help="the conv energy on 32×32 Fashion-MNIST (implies --no-startup)"
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for both loops")
    ap.add_argument("--no-startup", action="store_true", help="skip the trial start-up measurements")
    ap.add_argument("--startup-only", action="store_true", help="only the trial start-up measurements")
    ap.add_argument(
        "--method-only",
        action="store_true",
        help="only the method's train_step against the bare loop (no engine loop, no MLflow)",
    )
    args = ap.parse_args()
    bench, extra = (IMAGE if args.image else TOY), args.set
    if args.method_only:
        torch.set_num_threads(1)  # as the engine loop does (train.threads = 1)
        ratio = method_only_ratio(bench, 6 if args.quick else (args.pairs if args.image else 60), extra)
        print(f"{bench.name}: train_step alone vs the bare loop: {(ratio - 1) * 100:+.1f} % (median pair ratio)")
        return
    runs, pairs = (1, 6) if args.quick else (args.runs, args.pairs)
    if args.startup_only:
        runs = 0

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        exp = tracking.ensure_experiment(uri, "benchmark")
        medians: dict[str, list[float]] = {"charged": [], "queued": []}
        engine_all, queued_all, bare_all = [], [], []
        for r in range(runs):
            run_id = tracking.create_run(uri, exp)
            engine, queued, bare = interleaved_run(bench, pairs, uri, run_id, extra)
            for key, chunks in (("charged", engine), ("queued", queued)):
                medians[key].append(statistics.median(e / b for e, b in zip(chunks, bare)))
            engine_all, queued_all, bare_all = engine_all + engine, queued_all + queued, bare_all + bare
            print(
                f"  run {r + 1}/{runs}: {len(bare)} pairs, engine/bare median {medians['charged'][-1]:.3f} "
                f"(write charged), {medians['queued'][-1]:.3f} (not charged); bare "
                f"{statistics.median(bare) * 1e3:.2f} ms/it, engine {statistics.median(engine) * 1e3:.2f} ms/it",
                flush=True,
            )
        if runs:
            chunk = f"{runs} runs × {pairs} interleaved pairs of {bench.log_every} iterations, 1 thread"
            print(f"\n{bench.name}{' with ' + ' '.join(extra) if extra else ''}, per iteration ({chunk}):")
            print(f"  bare PyTorch loop : {statistics.median(bare_all) * 1e3:.2f} ms (median chunk)")
            print(
                f"  ebm_scale engine  : {statistics.median(engine_all) * 1e3:.2f} ms with the MLflow write, "
                f"{statistics.median(queued_all) * 1e3:.2f} ms without (median chunk)"
            )
            if args.image:
                n = bench.compose(extra).train.batch_size
                print(
                    f"  training images/s : bare {n / statistics.median(bare_all):.1f}, engine "
                    f"{n / statistics.median(engine_all):.1f} (write charged), {n / statistics.median(queued_all):.1f} "
                    f"(not charged); batch {n}, median chunk"
                )
            for key, label in (("charged", "write charged in full"), ("queued", "write not charged")):
                runs_text = ", ".join(f"{(m - 1) * 100:+.1f} %" for m in medians[key])
                print(
                    f"  engine overhead, {label}: {(statistics.median(medians[key]) - 1) * 100:+.1f} % "
                    f"(median over runs of each run's median pair ratio; runs: {runs_text})"
                )
        if args.no_startup or args.image:
            return

        import ray

        try:
            for workers in (0, 2):
                times = [startup_seconds(workers, str(Path(tmp) / "runs"), uri) for _ in range(1 if args.quick else 3)]
                label = "in-process trial" if workers == 0 else "2-worker TorchTrainer trial"
                print(
                    f"  start-up, {label}: median {statistics.median(times):.1f} s over {len(times)} "
                    f"({', '.join(f'{t:.1f}' for t in times)})"
                )
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
