"""Where each image dataset lives on disk and how torchvision opens it.

`find_source(name, root)` looks for a dataset under a local folder in the layouts below, in this order, and
returns a `Found` that opens its splits as torchvision datasets (items `(PIL image, target)` before the
transform). Nothing here downloads unless asked (`download_source`).

    mnist           <root>/MNIST/raw/train-images-idx3-ubyte ...    (torchvision's layout)
                    <root>/mnist/train-images-idx3-ubyte[.gz] ...   (flat IDX, gzipped or not)
                    <root>/train-images-idx3-ubyte[.gz] ...         (flat, in a folder not named *fashion*)
    fashion_mnist   <root>/FashionMNIST/raw/...  <root>/fashion-mnist/...  <root>/... (folder named *fashion*)
    cifar10         <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    svhn            <root>/svhn/{train,test}_32x32.mat  or  <root>/{train,test}_32x32.mat
    celeba          <root>/celeba/img_align_celeba/*.jpg + list_eval_partition.txt, identity_CelebA.txt,
                    list_attr_celeba.txt, list_bbox_celeba.txt, list_landmarks_align_celeba.txt

Flat IDX files are what Debian's packages ship (/usr/share/datasets/fashion-mnist), recompressed so their
md5s are not torchvision's: they are read with torchvision's IDX reader, never through its md5 check. MNIST
and Fashion-MNIST files have the same names, so flat files directly in data.root are Fashion-MNIST exactly
when the folder's name says "fashion".
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.mnist import read_image_file, read_label_file

Transform = Callable


@dataclass(frozen=True)
class Found:
    """A dataset located on disk: `open(train, transform)` gives a split (None: the dataset has no such split)."""

    path: Path
    layout: str
    open: Callable[[bool, Transform], Dataset | None]

    def describe(self, name: str) -> str:
        return f"{name} at {self.path} ({self.layout})"


@dataclass(frozen=True)
class ImageSource:
    """One image dataset: its stored and produced size, where it may be, and how to fetch it."""

    name: str
    channels: int
    size: int  # native produced size (CelebA: after its crop)
    find: Callable[[Path], Found | None]
    expected: Callable[[Path], str]  # the layout to name in a "not found" message
    download: Callable[[Path], None]  # torchvision's download into root (network)
    crop: int | None = None  # center crop before any resize (CelebA-64: 140)


class SourceError(Exception):
    """A dataset found on disk that torchvision cannot open (e.g. failed its integrity check)."""


# --- MNIST-format IDX ------------------------------------------------------------------------------------

_IDX = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx(path: Path, reader: Callable[[str], Tensor]) -> Tensor:
    """torchvision's IDX reader on the file's decompressed bytes (it reads plain files only)."""
    if path.suffix != ".gz":
        return reader(str(path))
    with tempfile.NamedTemporaryFile(suffix=".idx") as tmp:
        with gzip.open(path, "rb") as src:
            shutil.copyfileobj(src, tmp)
        tmp.flush()
        return reader(tmp.name)


class FlatIDX(torchvision.datasets.MNIST):
    """torchvision's MNIST over IDX files sitting directly in `folder` (no `<Name>/raw/`), gzipped or not."""

    def __init__(self, folder: Path, train: bool = True, transform: Transform | None = None):
        self.folder = Path(folder)
        super().__init__(str(folder), train=train, transform=transform, download=False)

    @property
    def raw_folder(self) -> str:
        return str(self.folder)

    def _check_exists(self) -> bool:
        return all(_idx_file(self.folder, stem) for stem in _IDX[self.train])

    def _load_data(self):
        images, labels = (_idx_file(self.folder, stem) for stem in _IDX[self.train])
        return _read_idx(images, read_image_file), _read_idx(labels, read_label_file)


def _has_idx(folder: Path, train: bool) -> bool:
    return all(_idx_file(folder, stem) for stem in _IDX[train])


def _idx_finder(tv_class: type, flat_names: tuple[str, ...], fashion: bool) -> Callable[[Path], Found | None]:
    def find(root: Path) -> Found | None:
        raw = root / tv_class.__name__ / "raw"
        if all((raw / stem).is_file() for split in (True, False) for stem in _IDX[split]):
            return Found(raw, "torchvision layout", lambda train, t: tv_class(str(root), train=train, transform=t))
        folders = [root / n for n in flat_names]
        if ("fashion" in root.name.lower()) == fashion:
            folders.append(root)
        for folder in folders:
            if _has_idx(folder, True):
                has_test = _has_idx(folder, False)
                return Found(
                    folder,
                    "flat IDX files" + ("" if has_test else ", no t10k files"),
                    lambda train, t, f=folder, ok=has_test: FlatIDX(f, train, t) if train or ok else None,
                )
        return None

    return find


def _idx_expected(tv_class: type, flat: str, fashion: bool) -> Callable[[Path], str]:
    itself = "data.root itself when its name contains 'fashion'" if fashion else "data.root itself"
    return lambda root: (
        f"{root / tv_class.__name__ / 'raw'}/train-images-idx3-ubyte etc. (torchvision's layout), "
        f"or train-images-idx3-ubyte.gz etc. in {root / flat} or {itself}"
    )


def _tv_download(factory: Callable[[Path], object]) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        factory(root)

    return download


# --- CIFAR-10, SVHN, CelebA -----------------------------------------------------------------------------


def _find_cifar10(root: Path) -> Found | None:
    folder = root / "cifar-10-batches-py"
    if not (folder / "data_batch_1").is_file():
        return None
    return Found(
        folder, "torchvision layout", lambda train, t: torchvision.datasets.CIFAR10(str(root), train=train, transform=t)
    )


def _find_svhn(root: Path) -> Found | None:
    for folder in (root / "svhn", root):
        if (folder / "train_32x32.mat").is_file():
            has_test = (folder / "test_32x32.mat").is_file()

            def open_split(train, t, f=folder, ok=has_test):
                if not (train or ok):
                    return None
                return torchvision.datasets.SVHN(str(f), split="train" if train else "test", transform=t)

            return Found(folder, "torchvision's .mat files", open_split)
    return None


_CELEBA_FILES = (
    "list_eval_partition.txt",
    "identity_CelebA.txt",
    "list_attr_celeba.txt",
    "list_bbox_celeba.txt",
    "list_landmarks_align_celeba.txt",
)


def _find_celeba(root: Path) -> Found | None:
    folder = root / "celeba"
    if not (folder / "img_align_celeba").is_dir() or not all((folder / f).is_file() for f in _CELEBA_FILES):
        return None

    def open_split(train, t):
        return torchvision.datasets.CelebA(str(root), split="train" if train else "test", target_type=[], transform=t)

    return Found(folder, "torchvision layout", open_split)


SOURCES: dict[str, ImageSource] = {
    s.name: s
    for s in (
        ImageSource(
            "mnist",
            1,
            28,
            _idx_finder(torchvision.datasets.MNIST, ("mnist",), fashion=False),
            _idx_expected(torchvision.datasets.MNIST, "mnist", fashion=False),
            _tv_download(lambda r: torchvision.datasets.MNIST(str(r), download=True)),
        ),
        ImageSource(
            "fashion_mnist",
            1,
            28,
            _idx_finder(torchvision.datasets.FashionMNIST, ("fashion-mnist", "fashion_mnist"), fashion=True),
            _idx_expected(torchvision.datasets.FashionMNIST, "fashion-mnist", fashion=True),
            _tv_download(lambda r: torchvision.datasets.FashionMNIST(str(r), download=True)),
        ),
        ImageSource(
            "cifar10",
            3,
            32,
            _find_cifar10,
            lambda root: f"{root / 'cifar-10-batches-py'}/data_batch_1..5, test_batch, batches.meta (torchvision's)",
            _tv_download(lambda r: torchvision.datasets.CIFAR10(str(r), download=True)),
        ),
        ImageSource(
            "svhn",
            3,
            32,
            _find_svhn,
            lambda root: f"train_32x32.mat and test_32x32.mat in {root / 'svhn'} or {root}",
            _tv_download(
                lambda r: [
                    torchvision.datasets.SVHN(str(r / "svhn"), split=s, download=True) for s in ("train", "test")
                ]
            ),
        ),
        ImageSource(
            "celeba",
            3,
            64,
            _find_celeba,
            lambda root: f"{root / 'celeba'}/img_align_celeba/*.jpg and {', '.join(_CELEBA_FILES)}",
            _tv_download(lambda r: torchvision.datasets.CelebA(str(r), download=True)),
            crop=140,
        ),
    )
}


def open_split(found: Found, train: bool, transform: Transform, name: str) -> Dataset | None:
    """One split of a found dataset; torchvision's own refusals (a failed md5 check) become SourceError."""
    try:
        return found.open(train, transform)
    except RuntimeError as err:
        raise SourceError(f"{found.describe(name)}: torchvision could not open it: {err}") from None


def labels_of(dataset: Dataset) -> Tensor | None:
    """The class labels torchvision keeps alongside the images (MNIST, CIFAR-10: targets; SVHN: labels)."""
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr), dtype=torch.long)
    return None


def pixels_of(dataset: Dataset) -> Tensor | None:
    """The whole split as a uint8 (N, C, H, W) tensor where torchvision holds it in memory (MNIST, CIFAR-10,
    SVHN), else None (CelebA reads its files one by one). A view, not a copy, wherever the layout allows."""
    if isinstance(dataset, torchvision.datasets.MNIST):
        return dataset.data.unsqueeze(1)
    if isinstance(dataset, torchvision.datasets.CIFAR10):
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2)  # stored N, H, W, C
    if isinstance(dataset, torchvision.datasets.SVHN):
        return torch.from_numpy(dataset.data)  # already N, C, H, W
    return None
