"""What a checkpoint holds, so that a restarted run continues exactly where it stopped."""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINTS_KEPT = 2  # per run (in-process, a Tune trial, a TorchTrainer job): the newest and the one before

STATE_FILE = "state.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def evaluation_rng(seed: int, step: int):
    """Evaluation draws (samples, chains, Sinkhorn) from streams of its own, seeded by (seed, step), and hands
    the training streams back where they were. Without this, every sample drawn for a metric shifts what the
    training draws next: how often a run evaluates, or how many samples it scores, would change the trained
    model itself, and an adversarial run's trajectory is sensitive to every such shift."""
    training = rng_state()
    seed_everything(seed * 1_000_003 + step)
    try:
        yield
    finally:
        set_rng_state(training)


def gather_to_rank0(obj):
    """Per-rank state (RNGs, replay buffers differ by rank) collected on rank 0; a list there, None elsewhere."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def save_state(directory: str | Path, state: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    torch.save(state, path)
    return path


def load_state(directory: str | Path) -> dict:
    # weights_only=False: the state holds numpy RNG tuples and config dicts, all written by us.
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
