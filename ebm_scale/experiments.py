"""What the research drivers in experiments/ share: one run of engine/loop.py's `train` in this process,
without Ray or MLflow, that evaluates every N iterations, writes its pictures and (optionally) its states
to a folder, and may stop on a training-time budget instead of an iteration count.

It is the engine's loop, so seeding, batches, evaluation streams and checkpoints are those of `ebm-scale
train` and of every sweep trial: a figure made here is what those commands reproduce.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from ebm_scale.config import EbmScaleConfig
from ebm_scale.engine.loop import train
from ebm_scale.engine.state import STATE_FILE

NO_LIMIT = 10**12  # train.iterations when a budget, not a count, ends the run


class FolderTracker:
    """Pictures into a folder (out/plots/...); the latest logged train metrics kept for a progress line."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.latest = out_dir, {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.latest.update(metrics)

    def log_artifacts(self, paths: list, artifact_path: str) -> None:
        target = self.out_dir / artifact_path
        target.mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, target)


class ExperimentSession:
    """The loop's session for an experiment: collects each evaluation, keeps the states, counts training
    time (the loop's steps between two `stop_after` calls, evaluation excluded) on `clock`."""

    rank, world_size, local_rank = 0, 1, 0

    def __init__(
        self,
        out_dir: Path,
        *,
        done: Callable[[int, float], bool] | None,
        clock: Callable[[], float],
        on_eval: Callable[[int, dict], None] | None,
        save_states: bool,
        resume: dict | None,
    ):
        self.out_dir, self.done, self.clock, self.on_eval = out_dir, done, clock, on_eval
        self.save_states, self.resume = save_states, resume
        self.tracker = FolderTracker(out_dir)
        self.trained, self.t_last, self.evaluated = 0.0, None, {}

    def restore(self) -> dict | None:
        self.t_last = self.clock()  # training time starts here
        return self.resume

    def stop_after(self, step: int) -> bool:
        now = self.clock()
        self.trained += now - self.t_last
        self.t_last = now
        return self.done is not None and self.done(step, self.trained)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        step = int(metrics["step"])
        self.evaluated = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if self.on_eval is not None:
            self.on_eval(step, metrics)
        if self.save_states and checkpoint_dir:
            states = self.out_dir / "states"
            states.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(checkpoint_dir) / STATE_FILE, states / f"step_{step:06d}.pt")
        self.t_last = self.clock()  # the evaluation just done is not training time


def train_in_process(
    cfg: EbmScaleConfig,
    out_dir: Path | str,
    *,
    iterations: int | None = None,
    every: int | None = None,
    done: Callable[[int, float], bool] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    on_eval: Callable[[int, dict], None] | None = None,
    save_states: bool = False,
    resume: dict | None = None,
) -> dict:
    """Train `cfg` (seeded by cfg.seed) for `iterations` in all, or until done(step, training seconds)
    holds, evaluating every `every` iterations and at the end. `save_states` writes the loop's checkpoint
    after each evaluation to out_dir/states/step_NNNNNN.pt; `resume` (one such state, loaded) continues from
    it. Returns the last evaluation's metrics with the iterations and training seconds."""
    if iterations is None and done is None:
        raise ValueError("give iterations, done, or both")
    cfg = copy.deepcopy(cfg)
    cfg.train.iterations = iterations or NO_LIMIT
    cfg.train.eval_every = every or cfg.train.iterations
    out = Path(out_dir)
    session = ExperimentSession(out, done=done, clock=clock, on_eval=on_eval, save_states=save_states, resume=resume)
    summary = train(cfg, session)
    return {
        "iterations": summary.step,
        "train_seconds": session.trained,
        "diverged": summary.diverged,
        **session.evaluated,
    }


def load_state_file(path: str | Path) -> dict:
    # weights_only=False: the state holds numpy RNG tuples and config dicts, written by the loop itself.
    return torch.load(path, map_location="cpu", weights_only=False)


def curve_arguments(description: str | None, every: int) -> argparse.ArgumentParser:
    """The arguments every learning-curve driver takes: iterations, a sweep (its settings, search dropped),
    overrides, how often to evaluate and where the pictures go."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("iterations", type=int)
    ap.add_argument("sweep")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--every", type=int, default=every, help="evaluate every this many iterations")
    ap.add_argument("--out", default=None, help="folder for the pictures (default: a temporary one)")
    return ap
