"""Datasets: name → loader. Today the 2D toys of ebm_scale.data.toy; image datasets register here later.

A loader turns (DataConfig, seed) into train/test tensors plus the DataSpec a method is built from. The
same seed always gives the same tensors, and train and test come from independent random streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ebm_scale.data.spec import DataSpec
from ebm_scale.data.toy import TOY_DATASETS, ToyDistribution
from ebm_scale.schema import Config, knob

# name → loader of (DataConfig, seed); filled below. DataConfig.name's choices are this registry itself, so a
# dataset registered later is a valid name too.
DATASETS: dict[str, Callable[[DataConfig, int], ToyData]] = {}


@dataclass
class DataConfig(Config):
    PREFIX = "data"

    name: str = knob("8gaussians", choices=DATASETS, noun="dataset")
    n_train: int = knob(50_000, ge=1)
    n_test: int = knob(10_000, ge=1)


@dataclass
class ToyData:
    """A loaded 2D toy dataset. `log_prob` is the exact log density where the dataset has one, else None;
    `modes` the component means where the dataset is a Gaussian mixture, else None."""

    train: Tensor
    test: Tensor
    spec: DataSpec
    log_prob: Callable[[Tensor], Tensor] | None
    name: str
    modes: Tensor | None = None


def split_generators(seed: int, n_splits: int = 2) -> list[torch.Generator]:
    """Independent generators derived from one seed (train, test, ...).

    numpy's SeedSequence spawns statistically independent child seeds, so the test set is neither a
    continuation of nor correlated with the training stream, and changing n_train leaves test unchanged.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    children = np.random.SeedSequence(seed).spawn(n_splits)
    return [torch.Generator().manual_seed(int(c.generate_state(1, dtype=np.uint64)[0] >> 1)) for c in children]


def _toy_loader(dist: ToyDistribution) -> Callable[[DataConfig, int], ToyData]:
    def load(cfg: DataConfig, seed: int) -> ToyData:
        train_gen, test_gen = split_generators(seed)
        return ToyData(
            train=dist.sample(cfg.n_train, train_gen),
            test=dist.sample(cfg.n_test, test_gen),
            spec=DataSpec(shape=(2,), kind="toy2d", bounds=dist.bounds),
            log_prob=dist.log_prob,
            name=dist.name,
            modes=dist.modes,
        )

    return load


DATASETS.update({name: _toy_loader(d) for name, d in TOY_DATASETS.items()})


def load_dataset(cfg: DataConfig, seed: int) -> ToyData:
    """Seeded train/test splits of the configured dataset (same seed → identical tensors)."""
    return DATASETS[cfg.name](cfg, seed)


__all__ = [
    "DATASETS",
    "DataSpec",
    "TOY_DATASETS",
    "DataConfig",
    "ToyData",
    "ToyDistribution",
    "load_dataset",
    "split_generators",
]
