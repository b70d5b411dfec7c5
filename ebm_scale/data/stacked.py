"""StackedMNIST: three digits as the R, G, B channels of one image, label 100·d1 + 10·d2 + d3 (1000 modes),
the mode-coverage benchmark of VEEGAN / PacGAN. Built from MNIST, or from Fashion-MNIST (its ten classes as
"digits") where MNIST is not under data.root; `source` says which.

The triples are drawn with replacement from the digits' train split (as many images as it has, or n_train)
and, for the held-out set, from its test split (or n_test), seeded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ebm_scale.data.config import DataConfig
from ebm_scale.data.images import DERIVED, VALUE_RANGE, ImageData, Missing, find, images_of, open_splits, pick, stack
from ebm_scale.data.seeds import split_generators
from ebm_scale.data.sources import SOURCES
from ebm_scale.data.spec import DataSpec

NUM_MODES = 1000
BASES = ("mnist", "fashion_mnist")  # in order of preference
# Streams of split_generators(seed, ...) after those ebm_scale.data.images uses (0..5, then the OOD sets).
STACK_TRAIN, STACK_TEST, DIGITS = 100, 101, 102


class StackedDigits(Dataset):
    """Image i is digits[triples[i, 0]], digits[triples[i, 1]], digits[triples[i, 2]] as channels."""

    def __init__(self, digits: Dataset, triples: Tensor):
        self.digits, self.triples = digits, triples

    def __len__(self) -> int:
        return len(self.triples)

    def __getitem__(self, i: int) -> Tensor:
        return self.__getitems__([i])[0]

    def __getitems__(self, items: list[int]) -> list[Tensor]:
        digits = images_of(self.digits, self.triples[torch.as_tensor(items, dtype=torch.long)].flatten().tolist())
        return [torch.cat(digits[3 * k : 3 * k + 3], dim=0) for k in range(len(items))]


def stacked_labels(digit_labels: Tensor, triples: Tensor) -> Tensor:
    d = digit_labels[triples]
    return 100 * d[:, 0] + 10 * d[:, 1] + d[:, 2]


@dataclass
class StackedData(ImageData):
    """ImageData plus the single-channel digits it is built from (to train a mode classifier)."""

    digits_train: Dataset | None = None
    digits_test: Dataset | None = None
    digit_labels: Tensor | None = None
    digit_test_labels: Tensor | None = None

    def digit_images(self, n: int, split: str = "train") -> tuple[Tensor, Tensor]:
        """A fixed n single-channel digits of the source dataset and their labels 0..9."""
        digits, labels = (
            (self.digits_train, self.digit_labels) if split == "train" else (self.digits_test, self.digit_test_labels)
        )
        order = pick(len(digits), n, self._generator(DIGITS if split == "train" else DIGITS + 1))
        return stack(digits, order, self.cfg.num_workers), labels[order]


def _find_base(root: Path, download: bool):
    for name in BASES:
        try:
            return name, find(name, root, download=False)
        except Missing:
            pass
    if download:
        return "mnist", find("mnist", root, download=True)
    raise Missing(
        f"stacked_mnist needs MNIST or Fashion-MNIST, neither found under {root}: expected "
        f"{SOURCES['mnist'].expected(root)} (or Fashion-MNIST's likewise); set data.download=true to let "
        f"torchvision download MNIST there, or put the files there"
    )


def load_stacked(cfg: DataConfig, seed: int, root: Path) -> StackedData:
    base, found = _find_base(root, cfg.download)
    digits = open_splits(base, found, cfg.image_size, dataclasses.replace(cfg, n_train=None, n_test=None), seed)
    gens = split_generators(seed, STACK_TEST + 1)
    n_train, n_test = cfg.n_train or len(digits.train), cfg.n_test or len(digits.test)
    train_triples = torch.randint(len(digits.train), (n_train, 3), generator=gens[STACK_TRAIN])
    test_triples = torch.randint(len(digits.test), (n_test, 3), generator=gens[STACK_TEST])
    size = cfg.image_size or SOURCES[base].size
    return StackedData(
        name=cfg.name,
        spec=DataSpec(shape=(3, size, size), kind="image", value_range=VALUE_RANGE),
        source=f"stacked from {digits.source}",
        train_set=StackedDigits(digits.train, train_triples),
        test_set=StackedDigits(digits.test, test_triples),
        cfg=cfg,
        seed=seed,
        root=root,
        labels=stacked_labels(digits.train_labels, train_triples),
        test_labels=stacked_labels(digits.test_labels, test_triples),
        num_modes=NUM_MODES,
        digits_train=digits.train,
        digits_test=digits.test,
        digit_labels=digits.train_labels,
        digit_test_labels=digits.test_labels,
    )


DERIVED["stacked_mnist"] = load_stacked
