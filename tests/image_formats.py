"""Tiny image datasets written in the exact on-disk formats torchvision reads, for tests that must not
download anything. Pixels are random but deterministic: `pixels(name, split, n, shape)` regenerates what a
writer wrote, so a test can check a loader's output value by value.

    write_mnist(tmp_path)                          <root>/MNIST/raw/train-images-idx3-ubyte ... (torchvision)
    write_mnist(tmp_path / "fm", layout="flat_gz", fashion=True)   <root>/train-images-idx3-ubyte.gz ... (Debian)
    write_cifar10(tmp_path); write_svhn(tmp_path); write_celeba(tmp_path)

CIFAR-10, SVHN and CelebA files carry md5s in torchvision's code; tiny ones cannot match, so tests that load
them call `skip_md5_checks(monkeypatch)` (or use the `no_md5_checks` fixture), the way torchvision's own tests
patch `check_integrity`: a file must still exist, its checksum is not compared.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

CELEBA_SIZE = (178, 218)  # (width, height) of img_align_celeba


def pixels(name: str, split: str, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 array (n, *shape) a writer stores for `name`'s `split`: seeded by both names."""
    seed = zlib.crc32(f"{name}/{split}".encode())
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def labels(name: str, split: str, n: int, classes: int = 10) -> np.ndarray:
    seed = zlib.crc32(f"{name}/{split}/labels".encode())
    return np.random.default_rng(seed).integers(0, classes, size=n).astype(np.uint8)


# --- MNIST / Fashion-MNIST (IDX) -------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX: magic (0, 0, type 0x08 = ubyte, ndim), big-endian int32 dims, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(
    root,
    n_train: int = 64,
    n_test: int = 32,
    layout: str = "torchvision",
    size: int = 28,
    fashion: bool = False,
    test_split: bool = True,
) -> Path:
    """MNIST (or Fashion-MNIST) IDX files. layout="torchvision": uncompressed in <root>/MNIST/raw/ (or
    FashionMNIST/raw/); "flat_gz": gzipped directly in <root>, as Debian ships them. Returns the folder."""
    name = "fashion_mnist" if fashion else "mnist"
    if layout == "torchvision":
        folder = Path(root) / ("FashionMNIST" if fashion else "MNIST") / "raw"
    elif layout == "flat_gz":
        folder = Path(root)
    else:
        raise ValueError(f"layout must be 'torchvision' or 'flat_gz', got {layout!r}")
    folder.mkdir(parents=True, exist_ok=True)
    splits = [("train", "train", n_train)] + ([("t10k", "test", n_test)] if test_split else [])
    for prefix, split, n in splits:
        for kind, array in (
            ("images-idx3", pixels(name, split, n, (size, size))),
            ("labels-idx1", labels(name, split, n)),
        ):
            data = _idx_bytes(array)
            path = folder / f"{prefix}-{kind}-ubyte"
            if layout == "flat_gz":
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(data, mtime=0))
            else:
                path.write_bytes(data)
    return folder


# --- CIFAR-10 (python pickles) ---------------------------------------------------------------------------


def write_cifar10(root, n_train: int = 50, n_test: int = 20) -> Path:
    """<root>/cifar-10-batches-py/: data_batch_1..5 (n_train split over them), test_batch, batches.meta.
    Each image is stored as CIFAR does, a row of 3072 bytes: the R plane, then G, then B (32×32 each)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train, train_labels = pixels("cifar10", "train", n_train, (3, 32, 32)), labels("cifar10", "train", n_train)
    for i, chunk in enumerate(np.array_split(np.arange(n_train), 5)):
        _pickle(folder / f"data_batch_{i + 1}", train[chunk].reshape(len(chunk), -1), train_labels[chunk])
    test = pixels("cifar10", "test", n_test, (3, 32, 32))
    _pickle(folder / "test_batch", test.reshape(n_test, -1), labels("cifar10", "test", n_test))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072}, f)
    return folder


def _pickle(path: Path, data: np.ndarray, targets: np.ndarray) -> None:
    with open(path, "wb") as f:
        pickle.dump({"batch_label": path.name, "data": data, "labels": [int(t) for t in targets]}, f)


# --- SVHN (.mat) -----------------------------------------------------------------------------------------


def write_svhn(root, n_train: int = 40, n_test: int = 20) -> Path:
    """<root>/{train,test}_32x32.mat as SVHN ships them: X (32, 32, 3, N) uint8, y (N, 1) with 10 for digit 0.
    `pixels("svhn", split, n, (3, 32, 32))` is the (N, C, H, W) view of X."""
    import scipy.io

    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x = pixels("svhn", split, n, (3, 32, 32)).transpose(2, 3, 1, 0)  # N,C,H,W → H,W,C,N
        y = labels("svhn", split, n).astype(np.uint8)
        y[y == 0] = 10
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y[:, None]})
    return folder


# --- CelebA (aligned JPEGs + partition and annotation files) --------------------------------------------

_ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald"]


def write_celeba(root, n_train: int = 12, n_valid: int = 4, n_test: int = 6, size=CELEBA_SIZE) -> Path:
    """<root>/celeba/: img_align_celeba/000001.jpg ... (random noise, `size` = (width, height)), and the
    text files torchvision's CelebA reads (partition 0 train / 1 valid / 2 test, in that file order).
    JPEG is lossy: compare loaded images with `pixels` only approximately."""
    from PIL import Image

    folder = Path(root) / "celeba"
    images = folder / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    n = n_train + n_valid + n_test
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    partition = [0] * n_train + [1] * n_valid + [2] * n_test
    width, height = size
    for split, split_id in (("train", 0), ("valid", 1), ("test", 2)):
        chosen = [f for f, p in zip(files, partition) if p == split_id]
        for file, array in zip(chosen, pixels("celeba", split, len(chosen), (height, width, 3))):
            Image.fromarray(array).save(images / file, quality=95)
    _lines(folder / "list_eval_partition.txt", [f"{f} {p}" for f, p in zip(files, partition)])
    _lines(folder / "identity_CelebA.txt", [f"{f} {i % 7 + 1}" for i, f in enumerate(files)])
    _lines(
        folder / "list_attr_celeba.txt",
        [str(n), " ".join(_ATTRS)] + [f"{f} " + " ".join(["1", "-1"] * 2 + ["1"]) for f in files],
    )
    _lines(
        folder / "list_bbox_celeba.txt",
        [str(n), "image_id x_1 y_1 width height"] + [f"{f} 95 71 226 313" for f in files],
    )
    marks = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    _lines(
        folder / "list_landmarks_align_celeba.txt",
        [str(n), marks] + [f"{f} 69 109 106 113 77 142 73 152 108 154" for f in files],
    )
    return folder


def _lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


# --- torchvision's checksums -----------------------------------------------------------------------------


def skip_md5_checks(monkeypatch) -> None:
    """torchvision's check_integrity without the md5 comparison (the file must still exist), in every
    dataset module that checks one: what torchvision's own tests do for their fake data."""
    import torchvision.datasets.celeba
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn

    def exists(fpath, md5=None) -> bool:
        return os.path.isfile(fpath)

    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn, torchvision.datasets.celeba):
        monkeypatch.setattr(module, "check_integrity", exists)


@pytest.fixture(name="no_md5_checks")
def no_md5_checks_fixture(monkeypatch):
    skip_md5_checks(monkeypatch)
