"""The training loop, one per worker, shared by the in-process path and TorchTrainer workers.

Ray and MLflow are injected through a `Session` (report / restore / tracker) so this file is plain PyTorch
and the same loop is driven by a Tune trial, a Train worker, a benchmark or a unit test. The hot path is
`method.train_step(batch)` plus one on-device accumulation; the host synchronises once per log interval.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from ebm_scale.config import EbmScaleConfig, to_container
from ebm_scale.data import load_dataset
from ebm_scale.engine.skips import SkippedSteps
from ebm_scale.engine.state import (
    evaluation_rng,
    gather_to_rank0,
    rng_state,
    save_state,
    seed_everything,
    set_rng_state,
)
from ebm_scale.methods import build_method
from ebm_scale.methods.backbone import save_backbone
from ebm_scale.metrics.chains import evaluate_chains
from ebm_scale.metrics.mcmc import plot_series
from ebm_scale.metrics.toy import evaluate_toy
from ebm_scale.samplers.precision import sampler_autocast


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifacts(self, paths: list, artifact_path: str) -> None: ...

    # Optional: set_tags(tags: dict[str, str]) (MLflow's tracker has it; a folder tracker need not).


class Session(Protocol):
    """What the loop needs from whoever runs it."""

    rank: int
    world_size: int
    local_rank: int
    tracker: Tracker | None  # rank 0 only

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...  # called by every rank
    def restore(self) -> dict | None: ...

    # Optional: `heartbeat(step, iters_per_s)` at most every `heartbeat_s` seconds between evaluations (a long
    # run shows it is alive); `stop_after(step) -> bool`: end the run at this step (an experiment's budget).


DATA_SOURCE_TAG = "ebm_scale.data_source"


class Diverged(RuntimeError):
    pass


class InjectedCrash(RuntimeError):
    """Raised by debug.crash_once_at_step to exercise retry-from-checkpoint."""


@dataclass
class RunSummary:
    step: int
    diverged: bool
    metrics: dict


class MetricAccumulator:
    """Collects per-step metric tensors; `pop()` averages them on the device and moves the means to the host
    in one transfer. `add` only appends references: per-step tensor arithmetic here would cost more than
    the bookkeeping it does (tiny per-step ops add up on a small-MLP iteration; docs/performance.md)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    @property
    def count(self) -> int:
        return len(self.steps)

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        # Held until the next pop: a tensor still attached to its graph would keep that graph alive.
        if any(v.requires_grad for v in metrics.values()):
            raise ValueError(
                f"train_step must return detached tensors; attached: "
                f"{sorted(k for k, v in metrics.items() if v.requires_grad)}"
            )
        self.steps.append(metrics)

    def pop(self) -> dict[str, float]:
        if not self.steps:
            return {}
        keys = list(dict.fromkeys(k for m in self.steps for k in m))  # first-seen order
        if not keys:  # every step since the last pop was skipped and reported nothing finite
            self.steps = []
            return {}
        means = torch.stack([torch.stack([m[k].float() for m in self.steps if k in m]).mean() for k in keys])
        self.steps = []
        return dict(zip(keys, means.tolist()))


def pick_device(setting: str, local_rank: int) -> torch.device:
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible to this worker")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    # NCCL's object collectives (evaluation gathers) run on the current device: make it this rank's.
    torch.cuda.set_device(device)
    return device


def _all_finite(values: dict[str, float], world_size: int) -> bool:
    ok = all(math.isfinite(v) for v in values.values())
    if world_size > 1:  # every rank must take the same branch, or the next collective hangs
        flag = torch.tensor([1.0 if ok else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item() > 0)
    return ok


def train(cfg: EbmScaleConfig, session: Session) -> RunSummary:
    torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device, session.local_rank)
    seed_everything(cfg.seed)  # same network init on every rank (and broadcast below, to be sure)
    data = load_dataset(cfg.data, cfg.seed)
    method = build_method(cfg.method, data.spec, device)
    method.broadcast_parameters()
    images = data.spec.kind == "image"
    if images:  # this worker may be on a node without the weights: fail now, not at the first evaluation
        from ebm_scale.metrics.images import check_fid_weights

        check_fid_weights(cfg)
    _adapt_networks(cfg.train, method, images)
    precision = Precision(cfg.train, device)
    # Per-rank streams from here on: ranks draw different batches and chains.
    seed_everything(cfg.seed * 1009 + session.rank)
    # Toys: each rank draws its own random indices; images: one sampler seed, each rank reads its own shard.
    batches = data.batches(
        cfg.train.batch_size,
        seed=cfg.seed if images else cfg.seed * 7919 + session.rank,
        rank=session.rank,
        world_size=session.world_size,
        device=device,
    )

    skips = SkippedSteps(cfg.train.max_consecutive_skips)
    start, restored = 0, session.restore()
    if restored is not None:
        method.load_state_dict(restored["method"])
        start = restored["step"]
        per_rank = restored["per_rank"]
        if len(per_rank) == session.world_size:
            mine = per_rank[session.rank]
            set_rng_state(mine["rng"])
            batches.load_state_dict(mine["batches"])
            method.load_extra_state(mine["extra"])
            skips.load_state_dict(mine.get("skips"))
        if session.tracker is not None:
            session.tracker.log_metrics({"resumed_from_step": float(start)}, start)

    if images and session.tracker is not None and hasattr(session.tracker, "set_tags"):
        # Where the images came from (files, split, e.g. "stacked from fashion_mnist at …"): shown with the run.
        session.tracker.set_tags({DATA_SOURCE_TAG: data.source})

    accumulator = MetricAccumulator()
    curves: dict[str, tuple[list, list]] = {k: ([], []) for k in method.curve_keys}  # for the curves PNG
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    t_log = time.perf_counter()
    heartbeat = Heartbeat(session, start)
    stop_after = getattr(session, "stop_after", None)
    method.train()
    step = start  # a run restored at its last step trains no further
    for step in range(start + 1, cfg.train.iterations + 1):
        _debug_faults(cfg, method, step, restored is not None, session)
        batch = next(batches)
        if cfg.train.channels_last and images:
            batch = batch.contiguous(memory_format=torch.channels_last)
        try:
            with precision.train():
                accumulator.add(skips.observe(method, method.train_step(batch)))
        except (AssertionError, RuntimeError) as err:
            # An adaptive ODE solver meeting NaNs fails with "underflow in dt" rather than returning NaN:
            # that is divergence too, but only when the weights really went non-finite.
            if isinstance(err, InjectedCrash) or _weights_finite(method):
                raise
            return _end_diverged(cfg, session, step, {"train/error": float("nan")}, last_eval)

        heartbeat.tick(step)
        final = step == cfg.train.iterations or (stop_after is not None and stop_after(step))
        is_eval = step % cfg.train.eval_every == 0 or final
        if step % cfg.train.log_every == 0 or is_eval:
            n_steps = accumulator.count
            last_train = {f"train/{k}": v for k, v in accumulator.pop().items()} | skips.metrics(method)
            if not _all_finite(last_train, session.world_size):
                return _end_diverged(cfg, session, step, last_train, last_eval)
            now = time.perf_counter()
            last_train["train/sec_per_iter"] = (now - t_log) / max(n_steps, 1)
            if images:  # every rank trains on its own batch
                last_train["train/images_per_s"] = (
                    cfg.train.batch_size * session.world_size / last_train["train/sec_per_iter"]
                )
            t_log = now
            if session.tracker is not None:
                session.tracker.log_metrics(last_train, step)
            for key, (steps, values) in curves.items():
                if f"train/{key}" in last_train:
                    steps.append(step), values.append(last_train[f"train/{key}"])

        if is_eval:
            last_eval = _evaluate_and_checkpoint(
                cfg, session, method, data, step, batches, skips, last_train, curves, final, precision
            )
            t_log = time.perf_counter()  # evaluation time is not training time
            heartbeat.reset(step)
        if final:
            break
    return RunSummary(step=step, diverged=False, metrics={**last_train, **last_eval})


class Heartbeat:
    """Calls `session.heartbeat(step, iterations/s)` at most every `session.heartbeat_s` seconds; a no-op for a
    session without one. One clock read per step: ~0.1 µs, nothing next to a training step."""

    def __init__(self, session, step: int):
        self.beat, self.every = getattr(session, "heartbeat", None), getattr(session, "heartbeat_s", None)
        self.reset(step)

    def reset(self, step: int) -> None:
        self.t, self.step = time.perf_counter(), step

    def tick(self, step: int) -> None:
        if self.beat is None or self.every is None:
            return
        now = time.perf_counter()
        if now - self.t >= self.every:
            self.beat(step, (step - self.step) / (now - self.t))
            self.reset(step)


class Precision:
    """train.precision / train.sampler_precision as context managers around the method's calls. bf16 runs
    network passes under autocast; weights, optimizer state and chain states stay fp32 (the methods cast
    network outputs that feed a chain or a loss), and samplers turn autocast off for their energy passes
    unless sampler_precision is bf16 too."""

    def __init__(self, cfg, device: torch.device):
        self.device_type = device.type
        self.enabled = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        self.sampler_bf16 = cfg.sampler_precision == "bf16"

    def train(self):
        if not self.enabled:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device_type, dtype=torch.bfloat16))
        stack.enter_context(sampler_autocast(self.sampler_bf16))
        return stack


def _adapt_networks(cfg, method, images: bool) -> None:
    """channels_last and torch.compile, applied in place so state_dict keys (checkpoints) are unchanged."""
    for net in method.networks.values():
        if cfg.channels_last and images:
            net.to(memory_format=torch.channels_last)
        if cfg.compile:
            net.compile()


def _peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _evaluate_and_checkpoint(
    cfg, session, method, data, step, batches, skips, last_train, curves, final, precision
) -> dict:
    with tempfile.TemporaryDirectory(prefix="ebm_scale_ckpt_") as tmp:
        metrics: dict[str, float] = {"step": step, "diverged": 0}
        artifacts: list = []
        images = data.spec.kind == "image"
        if images:  # every rank samples its share and extracts its features; rank 0 gets the metrics
            method.train(False)
            # Per-rank evaluation streams: ranks must draw different samples (rank 0's stream is the one
            # a single-worker run draws).
            with evaluation_rng(cfg.seed + 7_777_777 * session.rank, step), precision.train():
                from ebm_scale.metrics.images import evaluate_images

                eval_metrics, artifacts = evaluate_images(
                    method,
                    data,
                    cfg.eval,
                    tmp + "/plots",
                    step,
                    run=cfg,
                    rank=session.rank,
                    world_size=session.world_size,
                )
            method.train(True)
            peaks = gather_to_rank0(_peak_memory_gb(method.device))
            if session.rank == 0:
                for rank, peak in enumerate(peaks):
                    if peak is not None:
                        eval_metrics[f"system/peak_gpu_mem_gb/rank{rank}"] = peak
                metrics.update(eval_metrics)
                metrics.update(last_train)
        elif session.rank == 0:
            method.train(False)
            with evaluation_rng(cfg.seed, step):
                eval_metrics, artifacts = evaluate_toy(method, data, cfg.eval, tmp + "/plots", step, run=cfg)
                chain_metrics, chain_plots = evaluate_chains(
                    method, cfg.eval.mcmc, tmp + "/plots", step, final, cfg.eval.plots
                )
            method.train(True)
            eval_metrics.update(chain_metrics)
            artifacts += chain_plots
            metrics.update(eval_metrics)
            metrics.update(last_train)
        if session.rank == 0 and cfg.eval.plots and any(steps for steps, _ in curves.values()):
            artifacts.append(
                plot_series(
                    curves,
                    f"{tmp}/plots/curves_{step:06d}.png",
                    f"{cfg.method.name} on {cfg.data.name}: over training",
                )
            )
        # Evaluation drew from its own streams (evaluation_rng), so these are the training streams as the
        # next step finds them: a resumed run continues exactly. Every rank's own state is kept.
        per_rank = gather_to_rank0(
            {
                "rng": rng_state(),
                "batches": batches.state_dict(),
                "extra": method.extra_state(),
                "skips": skips.state_dict(),
            }
        )
        eval_only = {k: v for k, v in metrics.items() if k.startswith(("eval/", "system/"))}
        checkpoint_dir = None
        if session.rank == 0:
            if session.tracker is not None:
                session.tracker.log_metrics(eval_only, step)
                session.tracker.log_artifacts(artifacts, "plots")
                backbone = method.export_backbone() if final else None
                if backbone is not None:  # a stage-1 run: its network, ready for `method.backbone=runs:/<id>/backbone`
                    backbone["data"] = cfg.data.name
                    session.tracker.log_artifacts([save_backbone(tmp + "/backbone", backbone)], "backbone")
            state = {"method": method.state_dict(), "step": step, "per_rank": per_rank, "config": to_container(cfg)}
            checkpoint_dir = tmp + "/checkpoint"
            save_state(checkpoint_dir, state)
        session.report(metrics, checkpoint_dir)
    return eval_only


def _weights_finite(method) -> bool:
    return all(torch.isfinite(p).all() for net in method.networks.values() for p in net.parameters())


def _end_diverged(cfg, session, step, last_train, last_eval) -> RunSummary:
    """Non-finite loss or energy: the run ends here, reported as diverged; its last good checkpoint stays."""
    worst = math.inf if cfg.search.mode == "min" else -math.inf
    metrics = {
        **last_eval,
        **{k: v for k, v in last_train.items()},
        "step": step,
        "diverged": 1,
        cfg.search.metric: worst,
    }
    if session.tracker is not None:
        session.tracker.log_metrics({"diverged_at_step": float(step)}, step)
    session.report(metrics, None)
    return RunSummary(step=step, diverged=True, metrics=metrics)


def _debug_faults(cfg, method, step: int, restored: bool, session) -> None:
    if cfg.debug.nan_at_step == step:
        with torch.no_grad():
            for net in method.networks.values():
                for p in net.parameters():
                    p.fill_(float("nan"))
    if cfg.debug.crash_once_at_step == step and not restored:
        raise InjectedCrash(f"debug.crash_once_at_step={step}: injected crash (the retry resumes from the checkpoint)")
    last_rank = session.world_size > 1 and session.rank == session.world_size - 1
    if cfg.debug.hang_once_at_step == step and not restored and last_rank:
        time.sleep(10 * cfg.scaling.collective_timeout_s)  # the other ranks' next all-reduce times out first
