"""Image datasets as the training loop and the evaluation use them: torchvision underneath, every image a
float32 (C, H, W) tensor in [-1, 1].

`load_images(cfg, seed)` finds the dataset under `data.root` (ebm_scale.data.sources lists the layouts; an
s3:// root is first copied to a node-local cache), caps the splits at n_train / n_test (a seeded random
subset; null = the whole split) and returns an `ImageData`. The held-out split is the dataset's official
test split, or a seeded tenth of train where the files on disk have no test split.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms.functional import rgb_to_grayscale
from torchvision.transforms.v2.functional import resize

from ebm_scale.data.batches import ImageBatches
from ebm_scale.data.config import DataConfig
from ebm_scale.data.seeds import split_generators
from ebm_scale.data.sources import SOURCES, Found, ImageSource, SourceError, labels_of, open_split, pixels_of
from ebm_scale.data.spec import DataSpec
from ebm_scale.errors import ConfigError

log = logging.getLogger(__name__)

VALUE_RANGE = (-1.0, 1.0)
HELD_OUT_FRACTION = 0.1  # of train, where a dataset on disk has no test split
GATHER_BATCH = 256
# Streams of split_generators(seed, ...): capping train / test, holding out, then the evaluation's subsets.
CAP_TRAIN, CAP_TEST, HOLD_OUT, REFERENCE, TEST, OOD = range(6)


class Missing(Exception):
    """A dataset that is not under data.root; the message says where it looked and how to provide it."""


def image_transform(source: ImageSource, image_size: int | None) -> transforms.Compose:
    """PIL image → float32 (C, H, W) in [-1, 1]: the dataset's crop, a resize to image_size, then scaling."""
    steps = [transforms.CenterCrop(source.crop)] if source.crop else []
    size = image_size or source.size
    if source.crop or size != source.size:
        steps.append(transforms.Resize((size, size), antialias=True))
    half = [0.5] * source.channels
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(half, half)])


def resolve_root(root: str) -> Path:
    """data.root as a local folder: an s3:// prefix is copied to this node's cache once."""
    if not root.startswith("s3://"):
        return Path(root).expanduser().absolute()
    from ebm_scale.remote import RemoteError, fetch_to_cache  # lazily: boto3 only for s3:// roots

    try:
        return fetch_to_cache(root.rstrip("/") + "/", kind="data")
    except (RemoteError, FileNotFoundError) as err:
        raise ConfigError("data.root", f"cannot fetch {root}: {err}") from None


def find(name: str, root: Path, download: bool) -> Found:
    source = SOURCES[name]
    found = source.find(root)
    if found is None and download:
        try:
            source.download(root)
        except Exception as err:  # torchvision raises RuntimeError, URLError, OSError... for a failed download
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError("data.download", f"downloading {name} into {root} failed: {first_line}") from None
        found = source.find(root)
    if found is None:
        raise Missing(
            f"{name} not found under {root}: expected {source.expected(root)}; set data.download=true to let "
            f"torchvision download it there, or put the files there"
        )
    return found


class ImageSet(Dataset):
    """The images (not the targets) of a torchvision dataset, restricted to `indices`.

    Where torchvision holds the split in memory (`pixels`, uint8 N×C×H×W), a DataLoader's batch is
    transformed in one go (`__getitems__`: one tensor resize and scale instead of a PIL round trip per
    image, tens of times faster); otherwise each image goes through the dataset's own PIL transform."""

    def __init__(self, base: Dataset, indices: Tensor, pixels: Tensor | None = None, size: int | None = None):
        self.base, self.indices, self.pixels, self.size = base, indices, pixels, size
        self._resized: Tensor | None = None  # the split's pixels at `size`, made on first use

    def _split_pixels(self) -> Tensor:
        """This split's uint8 pixels at the configured size. Resized once, not per batch: the per-batch resize
        was over half of a batch's cost (docs/performance.md), and the resized split is small (60k × 32² = 61 MB)."""
        if self._resized is None:
            split = self.pixels[self.indices]
            if self.size is not None and split.shape[-1] != self.size:
                split = resize(split, [self.size, self.size], antialias=True)  # uint8 in, uint8 out, as PIL's
            self._resized = split
        return self._resized

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tensor:
        if self.pixels is not None:
            return self.__getitems__([i])[0]
        return self.base[int(self.indices[i])][0]

    def __getitems__(self, items: list[int]) -> list[Tensor]:
        if self.pixels is None:
            return [self[i] for i in items]
        batch = self._split_pixels()[torch.as_tensor(items, dtype=torch.long)]
        return list((batch.float() / 127.5 - 1.0).unbind(0))


def images_of(dataset: Dataset, items: list[int]) -> list[Tensor]:
    """dataset[i] for each of items, batched where the dataset can."""
    getitems = getattr(dataset, "__getitems__", None)
    return getitems(items) if getitems else [dataset[i] for i in items]


def subset_indices(n_total: int, cap: int | None, generator: torch.Generator) -> Tensor:
    """All of 0..n_total-1, or a seeded random `cap` of them in ascending order (reads stay sequential)."""
    if cap is None or cap >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=generator)[:cap].sort().values


def pick(n_total: int, n: int, generator: torch.Generator) -> Tensor:
    """The first n of a seeded permutation of 0..n_total-1 (all of them if fewer)."""
    return torch.randperm(n_total, generator=generator)[:n]


def stack(dataset: Dataset, order: Tensor, num_workers: int = 0) -> Tensor:
    """dataset[i] for i in order, as one tensor."""
    subset = torch.utils.data.Subset(dataset, order.tolist())
    workers = num_workers if len(subset) > 4 * GATHER_BATCH else 0  # starting workers costs more than a few batches
    # A generator of its own: without one a DataLoader draws its worker seed from the global RNG.
    loader = DataLoader(subset, batch_size=GATHER_BATCH, num_workers=workers, generator=torch.Generator())
    return torch.cat(list(loader))


def gather(dataset: Dataset, n: int, generator: torch.Generator, num_workers: int = 0) -> Tensor:
    """A seeded n images of `dataset` (all of them if fewer), as one tensor."""
    return stack(dataset, pick(len(dataset), n, generator), num_workers)


@dataclass
class Splits:
    """Train and held-out images of one dataset, with their labels where torchvision keeps them."""

    train: ImageSet
    test: ImageSet
    train_labels: Tensor | None
    test_labels: Tensor | None
    source: str


def open_splits(name: str, found: Found, image_size: int | None, cfg: DataConfig, seed: int) -> Splits:
    source = SOURCES[name]
    transform = image_transform(source, image_size)
    cap_train, cap_test, held_out = split_generators(seed, 3)  # CAP_TRAIN, CAP_TEST, HOLD_OUT
    try:
        train = open_split(found, True, transform, name)
        test = open_split(found, False, transform, name)
    except SourceError as err:
        raise ConfigError("data.root", str(err)) from None
    train_labels = labels_of(train)
    description = found.describe(name)
    if test is None:  # a seeded tenth of train is held out
        order = torch.randperm(len(train), generator=held_out)
        n_held = max(1, int(HELD_OUT_FRACTION * len(train)))
        test_idx, train_idx = order[:n_held].sort().values, order[n_held:].sort().values
        test, test_labels = train, train_labels
        description += f", held out a seeded {HELD_OUT_FRACTION:.0%} of train"
    else:
        train_idx, test_idx = torch.arange(len(train)), torch.arange(len(test))
        test_labels = labels_of(test)
    train_idx = train_idx[subset_indices(len(train_idx), cfg.n_train, cap_train)]
    test_idx = test_idx[subset_indices(len(test_idx), cfg.n_test, cap_test)]
    size = image_size or source.size
    return Splits(
        ImageSet(train, train_idx, pixels_of(train), size),
        ImageSet(test, test_idx, pixels_of(test), size),
        None if train_labels is None else train_labels[train_idx],
        None if test_labels is None else test_labels[test_idx],
        description,
    )


def adapt(images: Tensor, channels: int) -> Tensor:
    """Another dataset's images with this dataset's channel count (grey ↔ RGB)."""
    if images.shape[1] == channels:
        return images
    if channels == 1:
        return rgb_to_grayscale(images)
    return images.expand(-1, channels, -1, -1).contiguous()


@dataclass
class ImageData:
    """A loaded image dataset: batches for training, fixed tensors for evaluation.

    `labels` / `test_labels` are the class labels of train_set / test_set where the dataset has them.
    `log_prob` and `modes` are None (only toys have them)."""

    name: str
    spec: DataSpec
    source: str
    train_set: Dataset
    test_set: Dataset
    cfg: DataConfig
    seed: int
    root: Path
    labels: Tensor | None = None
    test_labels: Tensor | None = None
    num_modes: int | None = None
    log_prob: None = None
    modes: None = None

    def _generator(self, stream: int) -> torch.Generator:
        return split_generators(self.seed, stream + 1)[stream]

    def batches(self, batch_size: int, seed: int, rank: int, world_size: int, device: torch.device) -> ImageBatches:
        """This rank's endless stream of training batches; pass the same `seed` on every rank."""
        return ImageBatches(
            self.train_set,
            batch_size,
            seed,
            rank,
            world_size,
            torch.device(device),
            num_workers=self.cfg.num_workers,
            pin_memory=self.cfg.pin_memory,
        )

    def reference_images(self, n: int) -> Tensor:
        """A fixed n training images (all of them if fewer), e.g. FID's reference statistics. Drawn with a
        fixed seed, not the run's: trials with different seeds score against the same reference (and its
        statistics, cached under `reference_key`, are computed once)."""
        return gather(self.train_set, n, split_generators(0, REFERENCE + 1)[REFERENCE], self.cfg.num_workers)

    @property
    def reference_key(self) -> str:
        """What the training split (and so the reference set) depends on: the files, the size, the cap and,
        when the split is a seeded subset (n_train, or a held-out tenth of train), the seed."""
        seeded = self.cfg.n_train is not None or "held out" in self.source
        parts = f"{self.source}|{self.spec.shape}|n_train={self.cfg.n_train}|seed={self.seed if seeded else '-'}"
        return hashlib.sha1(parts.encode()).hexdigest()[:10]

    def test_images(self, n: int) -> Tensor:
        """A fixed n held-out images (all of them if fewer)."""
        return gather(self.test_set, n, self._generator(TEST), self.cfg.num_workers)

    def ood_images(self, n: int) -> dict[str, Tensor]:
        """n images of each configured OOD set, shaped like this dataset's. A dataset name whose files are
        not under data.root is skipped with a warning."""
        channels, size = self.spec.shape[0], self.spec.shape[-1]
        out: dict[str, Tensor] = {}
        for i, name in enumerate(self.cfg.ood):
            gen = self._generator(OOD + i)
            if name == "uniform":
                out[name] = torch.rand((n, *self.spec.shape), generator=gen) * 2 - 1
            elif name == "constant":
                colour = torch.rand((n, channels, 1, 1), generator=gen) * 2 - 1
                out[name] = colour.expand(n, *self.spec.shape).contiguous()
            elif name == "flip":
                out[name] = self.test_images(n).flip(-2)
            else:
                images = self._other_dataset(name, n, size, gen)
                if images is not None:
                    out[name] = adapt(images, channels)
        return out

    def _other_dataset(self, name: str, n: int, size: int, gen: torch.Generator) -> Tensor | None:
        other = DataConfig(name=name, root=str(self.root), image_size=size, num_workers=self.cfg.num_workers)
        try:
            data = load_images(other, self.seed, resolved_root=self.root)
        except Missing as err:
            log.warning("OOD set %s skipped: %s", name, err)
            return None
        return gather(data.test_set, n, gen, self.cfg.num_workers)


# Image datasets that are not one torchvision source (StackedMNIST): name → loader of (cfg, seed, root),
# registered by their modules.
DERIVED: dict = {}


def load_images(cfg: DataConfig, seed: int, resolved_root: Path | None = None) -> ImageData:
    """The configured image dataset; raises `Missing` when it is not under data.root."""
    root = resolved_root or resolve_root(cfg.root)
    if cfg.name in DERIVED:
        return DERIVED[cfg.name](cfg, seed, root)
    splits = open_splits(cfg.name, find(cfg.name, root, cfg.download), cfg.image_size, cfg, seed)
    source = SOURCES[cfg.name]
    size = cfg.image_size or source.size
    return ImageData(
        name=cfg.name,
        spec=DataSpec(shape=(source.channels, size, size), kind="image", value_range=VALUE_RANGE),
        source=splits.source,
        train_set=splits.train,
        test_set=splits.test,
        cfg=cfg,
        seed=seed,
        root=root,
        labels=splits.train_labels,
        test_labels=splits.test_labels,
    )
