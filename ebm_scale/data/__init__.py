"""Datasets: name → loader. The 2D toys of ebm_scale.data.toy, generated in memory, and the image datasets
of ebm_scale.data.images (torchvision underneath), read from data.root.

A loader turns (DataConfig, seed) into a dataset object with a `spec`, a `name`, a `source` and
`batches(batch_size, seed, rank, world_size, device)`, an endless resumable stream of training batches
(ebm_scale.data.batches). The same seed always gives the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ebm_scale.data.batches import ImageBatches, ToyBatches
from ebm_scale.data.config import DATASETS, IMAGE_DATASETS, SYNTHETIC_OOD, DataConfig
from ebm_scale.data.images import DERIVED, ImageData, Missing, load_images
from ebm_scale.data.seeds import split_generators
from ebm_scale.data.sources import SOURCES
from ebm_scale.data.spec import DataSpec
from ebm_scale.data.stacked import StackedData
from ebm_scale.data.toy import TOY_DATASETS, ToyDistribution
from ebm_scale.errors import ConfigError

IMAGE_NAMES = (*SOURCES, *DERIVED)
TOY_N_TRAIN, TOY_N_TEST = 50_000, 10_000  # what n_train / n_test = null draw for a toy


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
    source: str = "generated in memory"

    def batches(self, batch_size: int, seed: int, rank: int, world_size: int, device: torch.device) -> ToyBatches:
        """Draws with replacement from train; `seed` already differs per rank (rank and world_size unused)."""
        return ToyBatches(self.train, batch_size, seed, torch.device(device))


def _toy_loader(dist: ToyDistribution) -> Callable[[DataConfig, int], ToyData]:
    def load(cfg: DataConfig, seed: int) -> ToyData:
        train_gen, test_gen = split_generators(seed)
        return ToyData(
            train=dist.sample(cfg.n_train or TOY_N_TRAIN, train_gen),
            test=dist.sample(cfg.n_test or TOY_N_TEST, test_gen),
            spec=DataSpec(shape=(2,), kind="toy2d", bounds=dist.bounds),
            log_prob=dist.log_prob,
            name=dist.name,
            modes=dist.modes,
        )

    return load


def _image_loader(cfg: DataConfig, seed: int) -> ImageData:
    try:
        return load_images(cfg, seed)
    except Missing as err:
        raise ConfigError("data.root", str(err)) from None


DATASETS.update({name: _toy_loader(d) for name, d in TOY_DATASETS.items()})
DATASETS.update({name: _image_loader for name in IMAGE_NAMES})
IMAGE_DATASETS.update(IMAGE_NAMES)


def load_dataset(cfg: DataConfig, seed: int) -> ToyData | ImageData:
    """The configured dataset (same seed → identical data). A missing image dataset is a ConfigError that
    says where it was looked for."""
    return DATASETS[cfg.name](cfg, seed)


def dataset_spec(cfg: DataConfig) -> DataSpec:
    """The DataSpec load_dataset would give, without reading any data."""
    if cfg.name in TOY_DATASETS:
        return DataSpec(shape=(2,), kind="toy2d", bounds=TOY_DATASETS[cfg.name].bounds)
    base = SOURCES["mnist" if cfg.name == "stacked_mnist" else cfg.name]
    size = cfg.image_size or base.size
    channels = 3 if cfg.name == "stacked_mnist" else base.channels
    return DataSpec(shape=(channels, size, size), kind="image", value_range=(-1.0, 1.0))


__all__ = [
    "DATASETS",
    "IMAGE_DATASETS",
    "SYNTHETIC_OOD",
    "TOY_DATASETS",
    "DataConfig",
    "DataSpec",
    "ImageBatches",
    "ImageData",
    "StackedData",
    "ToyBatches",
    "ToyData",
    "ToyDistribution",
    "dataset_spec",
    "load_dataset",
    "split_generators",
]
