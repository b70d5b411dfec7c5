"""The data section of the config and the dataset registry its `name` is checked against (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ebm_scale.schema import Config, Rule, knob

# name → loader of (DataConfig, seed); filled by ebm_scale.data. DataConfig.name's choices are this registry
# itself, so a dataset registered later is a valid name too.
DATASETS: dict[str, Callable[[DataConfig, int], Any]] = {}
# The subset of DATASETS that are image datasets (and so can also serve as an OOD set of another).
IMAGE_DATASETS: set[str] = set()
# OOD sets made from nothing but the in-distribution data's shape: uniform noise, one constant colour per
# image, and the held-out images flipped upside down.
SYNTHETIC_OOD = ("uniform", "constant", "flip")


@dataclass
class DataConfig(Config):
    PREFIX = "data"

    name: str = knob("8gaussians", choices=DATASETS, noun="dataset")
    # Toys: points drawn (null = 50,000 train / 10,000 test). Images: a cap on the split, a seeded random
    # subset of it (null = the whole split).
    n_train: int | None = knob(None, ge=1, note="null = toys 50000, images the whole split")
    n_test: int | None = knob(None, ge=1, note="null = toys 10000, images the whole split")
    # Images: a local folder, or s3://bucket/prefix, copied whole to a node-local cache once (so name the
    # prefix that holds this dataset and its OOD sets, not a bucket of everything).
    root: str = "data"
    download: bool = False  # images: let torchvision download a missing dataset into root (never otherwise)
    image_size: int | None = knob(None, ge=1, note="null = the dataset's native size")
    num_workers: int = knob(2, ge=0)  # DataLoader worker processes per rank (0 = load in the training process)
    pin_memory: bool = True  # page-locked host batches (used only when training on CUDA)
    ood: tuple[str, ...] = SYNTHETIC_OOD  # OOD sets for AUROC (eval.ood.n_images each): synthetic, or dataset names

    def __post_init__(self):
        self.ood = tuple(self.ood)  # OmegaConf hands tuples over as lists

    def rules(self):
        allowed = sorted(SYNTHETIC_OOD) + sorted(IMAGE_DATASETS)
        for name in self.ood:
            yield Rule("ood", name in allowed, f"unknown OOD set {name!r}", allowed)
            yield Rule("ood", name != self.name, f"{name!r} is the training data itself")
        yield Rule("ood", len(set(self.ood)) == len(self.ood), f"lists a set twice: {list(self.ood)}")
