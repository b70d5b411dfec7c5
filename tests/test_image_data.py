"""The image data layer on tiny datasets in torchvision's real on-disk formats (tests/image_formats.py), and
on Debian's Fashion-MNIST where it is installed."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from image_formats import labels, no_md5_checks_fixture, pixels, write_celeba, write_cifar10, write_mnist, write_svhn  # noqa: F401

from ebm_scale.data import DataConfig, dataset_spec, load_dataset, split_generators
from ebm_scale.errors import ConfigError

CPU = torch.device("cpu")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def cfg(root, name="mnist", **kw) -> DataConfig:
    c = DataConfig(name=name, root=str(root), num_workers=kw.pop("num_workers", 0), **kw)
    c.validate()
    return c


def scaled(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).float() / 255 * 2 - 1


@pytest.fixture
def mnist_root(tmp_path):
    write_mnist(tmp_path)
    return tmp_path


# --- each dataset on its own files ------------------------------------------------------------------------


def test_mnist_torchvision_layout_gives_the_written_pixels_in_minus_one_to_one(mnist_root):
    data = load_dataset(cfg(mnist_root), seed=0)
    assert data.spec.shape == (1, 28, 28) and data.spec.kind == "image" and data.spec.value_range == (-1.0, 1.0)
    assert (len(data.train_set), len(data.test_set)) == (64, 32)
    assert "torchvision layout" in data.source and str(mnist_root) in data.source
    assert data.log_prob is None and data.modes is None
    first = data.train_set[0]
    assert first.dtype == torch.float32 and first.shape == (1, 28, 28)
    torch.testing.assert_close(first[0], scaled(pixels("mnist", "train", 1, (28, 28))[0]))
    assert torch.equal(data.labels, torch.from_numpy(labels("mnist", "train", 64)).long())
    torch.testing.assert_close(data.test_set[3][0], scaled(pixels("mnist", "test", 4, (28, 28))[3]))


def test_flat_gzipped_idx_as_debian_ships_them(tmp_path):
    folder = write_mnist(tmp_path / "fashion-mnist", layout="flat_gz", fashion=True)
    data = load_dataset(cfg(folder, "fashion_mnist"), seed=0)
    assert "flat IDX" in data.source and (len(data.train_set), len(data.test_set)) == (64, 32)
    torch.testing.assert_close(data.train_set[5][0], scaled(pixels("fashion_mnist", "train", 6, (28, 28))[5]))
    # The same files are MNIST's names too: a folder named *fashion* is never read as MNIST.
    with pytest.raises(ConfigError, match="mnist not found"):
        load_dataset(cfg(folder, "mnist"), seed=0)
    # ...and Fashion-MNIST is found in <root>/fashion-mnist/ as well.
    assert "flat IDX" in load_dataset(cfg(tmp_path, "fashion_mnist"), seed=0).source


def test_cifar10_pickles_keep_the_channel_planes(tmp_path, no_md5_checks):
    write_cifar10(tmp_path)
    data = load_dataset(cfg(tmp_path, "cifar10"), seed=0)
    assert data.spec.shape == (3, 32, 32) and (len(data.train_set), len(data.test_set)) == (50, 20)
    torch.testing.assert_close(data.train_set[0], scaled(pixels("cifar10", "train", 1, (3, 32, 32))[0]))
    assert torch.equal(data.test_labels, torch.from_numpy(labels("cifar10", "test", 20)).long())


def test_cifar10_files_failing_torchvisions_md5_check_are_a_config_error(tmp_path):
    write_cifar10(tmp_path)  # tiny files cannot match the real md5s, and nothing patches the check here
    with pytest.raises(ConfigError, match="torchvision could not open it"):
        load_dataset(cfg(tmp_path, "cifar10"), seed=0)


def test_svhn_mat_files(tmp_path, no_md5_checks):
    write_svhn(tmp_path / "svhn")
    data = load_dataset(cfg(tmp_path, "svhn"), seed=0)
    assert data.spec.shape == (3, 32, 32) and (len(data.train_set), len(data.test_set)) == (40, 20)
    torch.testing.assert_close(data.test_set[2], scaled(pixels("svhn", "test", 3, (3, 32, 32))[2]))
    assert torch.equal(data.labels, torch.from_numpy(labels("svhn", "train", 40)).long())  # 10 read back as 0


def test_celeba_is_center_cropped_to_140_then_resized_to_64(tmp_path, no_md5_checks):
    from PIL import Image

    folder = write_celeba(tmp_path)
    data = load_dataset(cfg(tmp_path, "celeba"), seed=0)
    assert data.spec.shape == (3, 64, 64) and (len(data.train_set), len(data.test_set)) == (12, 6)
    x = data.test_images(6)
    assert x.shape == (6, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    # The first test image (file 17): white inside the central 140 × 140, black outside (lossless PNG
    # bytes: PIL reads by content). After the crop nothing black is left.
    square = np.zeros((218, 178, 3), dtype=np.uint8)
    top, left = (218 - 140) // 2, (178 - 140) // 2
    square[top : top + 140, left : left + 140] = 255
    Image.fromarray(square).save(folder / "img_align_celeba" / "000017.jpg", format="PNG")
    assert data.test_set[0].min() > 0.99
    assert load_dataset(cfg(tmp_path, "celeba", image_size=32), seed=0).test_set[0].shape == (3, 32, 32)


def test_image_size_resizes_and_dataset_spec_agrees_without_loading(mnist_root):
    data = load_dataset(cfg(mnist_root, image_size=32), seed=0)
    assert data.spec.shape == (1, 32, 32) and data.train_set[0].shape == (1, 32, 32)
    assert dataset_spec(cfg(mnist_root, image_size=32)) == data.spec
    assert dataset_spec(cfg(mnist_root, "stacked_mnist")).shape == (3, 28, 28)
    assert dataset_spec(DataConfig(name="grid")) == load_dataset(DataConfig(name="grid", n_train=2, n_test=2), 0).spec


def test_loading_is_deterministic_and_caps_are_seeded_subsets(mnist_root):
    a, b = (
        load_dataset(cfg(mnist_root, n_train=20, n_test=10), 3),
        load_dataset(cfg(mnist_root, n_train=20, n_test=10), 3),
    )
    assert len(a.train_set) == 20 and len(a.test_set) == 10
    assert torch.equal(a.train_set.indices, b.train_set.indices) and torch.equal(
        a.reference_images(8), b.reference_images(8)
    )
    assert torch.equal(a.test_images(5), b.test_images(5))
    other = load_dataset(cfg(mnist_root, n_train=20, n_test=10), 4)
    assert not torch.equal(a.train_set.indices, other.train_set.indices)
    rng_before = torch.get_rng_state()
    assert len(a.reference_images(1000)) == 20  # asking for more gives all there are
    assert torch.equal(torch.get_rng_state(), rng_before)  # evaluation draws leave the training RNG alone


def test_without_test_files_a_seeded_tenth_of_train_is_held_out(tmp_path):
    folder = write_mnist(tmp_path / "mnist", n_train=50, layout="flat_gz", test_split=False)
    data = load_dataset(cfg(folder), seed=1)
    assert "held out" in data.source and (len(data.train_set), len(data.test_set)) == (45, 5)
    train, test = set(data.train_set.indices.tolist()), set(data.test_set.indices.tolist())
    assert not train & test and len(train | test) == 50
    assert torch.equal(load_dataset(cfg(folder), seed=1).test_set.indices, data.test_set.indices)


# --- StackedMNIST ----------------------------------------------------------------------------------------


def test_stacked_mnist_channels_are_three_digits_and_the_label_is_their_number(mnist_root):
    data = load_dataset(cfg(mnist_root, "stacked_mnist", n_train=30), seed=0)
    assert data.spec.shape == (3, 28, 28) and data.num_modes == 1000 and len(data.train_set) == 30
    assert data.source.startswith("stacked from mnist")
    digit_labels = torch.from_numpy(labels("mnist", "train", 64)).long()
    for i in range(5):
        image, triple = data.train_set[i], data.train_set.triples[i]
        for c in range(3):
            torch.testing.assert_close(image[c], scaled(pixels("mnist", "train", 64, (28, 28))[int(triple[c])]))
        d = digit_labels[triple]
        assert data.labels[i] == 100 * d[0] + 10 * d[1] + d[2]
    assert len(data.test_set) == 32 and data.test_labels.max() < 1000
    digits, digit_y = data.digit_images(10)
    assert digits.shape == (10, 1, 28, 28) and digit_y.shape == (10,) and digit_y.max() < 10


def test_stacked_mnist_falls_back_to_fashion_mnist_and_says_so(tmp_path):
    write_mnist(tmp_path, fashion=True)
    data = load_dataset(cfg(tmp_path, "stacked_mnist", image_size=16), seed=0)
    assert data.source.startswith("stacked from fashion_mnist") and data.train_set[0].shape == (3, 16, 16)


# --- batches ---------------------------------------------------------------------------------------------


def test_toy_batches_reproduce_the_loops_indexing_and_resume():
    data = load_dataset(DataConfig(name="moons", n_train=500, n_test=10), seed=0)
    stream = data.batches(64, seed=7919 + 1, rank=1, world_size=2, device=CPU)
    batch_rng = torch.Generator().manual_seed(7919 + 1)
    for _ in range(3):
        idx = torch.randint(len(data.train), (64,), generator=batch_rng)
        assert torch.equal(next(stream), data.train[idx])
    state = stream.state_dict()
    expected = next(stream)
    stream.load_state_dict(state)
    assert torch.equal(next(stream), expected)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_image_stream_resumes_with_the_exact_next_batch_across_epochs(tmp_path, num_workers):
    write_mnist(tmp_path, n_train=40, size=8)
    data = load_dataset(cfg(tmp_path, num_workers=num_workers), seed=0)
    stream = data.batches(8, seed=0, rank=0, world_size=1, device=CPU)  # 5 batches an epoch
    seen = [next(stream) for _ in range(7)]
    assert stream.state_dict() == {"epoch": 1, "batch": 2, "batch_size": 8}
    assert not torch.equal(seen[0], seen[5])  # the next epoch is reshuffled
    assert torch.equal(
        torch.cat(seen[:5]).sort(0).values, torch.stack([data.train_set[i] for i in range(40)]).sort(0).values
    )
    state, following = stream.state_dict(), [next(stream) for _ in range(4)]
    fresh = data.batches(8, seed=0, rank=0, world_size=1, device=CPU)
    fresh.load_state_dict(state)
    for expected in following:
        assert torch.equal(next(fresh), expected)
    rng_before = torch.get_rng_state()
    next(data.batches(8, seed=0, rank=0, world_size=1, device=CPU))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is the training loop's alone


def test_two_ranks_read_disjoint_shards_that_cover_the_epoch(tmp_path):
    write_mnist(tmp_path, n_train=48, size=8)
    data = load_dataset(cfg(tmp_path), seed=0)
    flat = {tuple(data.train_set[i].flatten().tolist()): i for i in range(48)}
    assert len(flat) == 48
    shards = []
    for rank in range(2):
        stream = data.batches(6, seed=5, rank=rank, world_size=2, device=CPU)  # 4 batches of 6 per rank
        shards.append({flat[tuple(x.flatten().tolist())] for _ in range(4) for x in next(stream)})
    assert len(shards[0]) == len(shards[1]) == 24 and not shards[0] & shards[1] and len(shards[0] | shards[1]) == 48


def test_a_batch_larger_than_a_ranks_shard_is_an_error(mnist_root):
    with pytest.raises(ValueError, match="batch size 40 exceeds"):
        load_dataset(cfg(mnist_root), 0).batches(40, seed=0, rank=0, world_size=2, device=CPU)


# --- evaluation tensors and OOD sets ---------------------------------------------------------------------


def test_ood_sets_are_shaped_like_the_data_and_missing_ones_are_skipped(tmp_path, caplog, no_md5_checks):
    write_cifar10(tmp_path)
    write_mnist(tmp_path, size=28)
    ood = ("uniform", "constant", "flip", "mnist", "svhn")
    data = load_dataset(cfg(tmp_path, "cifar10", ood=ood), seed=0)
    with caplog.at_level(logging.WARNING):
        sets = data.ood_images(7)
    assert list(sets) == ["uniform", "constant", "flip", "mnist"] and "svhn" in caplog.text
    for name, x in sets.items():
        assert x.shape == (7, 3, 32, 32) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1, name
    assert torch.equal(sets["flip"], data.test_images(7).flip(-2))
    assert torch.equal(sets["mnist"][:, 0], sets["mnist"][:, 2])  # grey digits as RGB
    c = sets["constant"]
    assert torch.equal(c, c[:, :, :1, :1].expand_as(c))
    assert torch.equal(sets["uniform"], data.ood_images(7)["uniform"])


def test_ood_names_are_checked_when_composed():
    with pytest.raises(ConfigError, match="data.ood: unknown OOD set 'grid'"):
        DataConfig(name="mnist", ood=("grid",)).validate()
    with pytest.raises(ConfigError, match="training data itself"):
        DataConfig(name="mnist", ood=("mnist",)).validate()


# --- missing data ----------------------------------------------------------------------------------------


def test_a_missing_dataset_is_one_line_saying_where_and_how(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("download=false touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for name in ("mnist", "fashion_mnist", "cifar10", "svhn", "celeba", "stacked_mnist"):
        with pytest.raises(ConfigError) as err:
            load_dataset(cfg(tmp_path / "nothing", name), seed=0)
        text = str(err.value)
        assert "\n" not in text and text.startswith("data.root: ") and str(tmp_path / "nothing") in text, text
        assert "data.download=true" in text, text


def test_a_relative_root_is_reported_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=str(tmp_path / "data")):
        load_dataset(cfg("data"), seed=0)


# --- the real files --------------------------------------------------------------------------------------


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason=f"{DEBIAN_FASHION} is not installed")
def test_debian_fashion_mnist_loads_with_torchvisions_reader():
    data = load_dataset(cfg(DEBIAN_FASHION, "fashion_mnist", image_size=32), seed=0)
    assert (len(data.train_set), len(data.test_set)) == (60_000, 10_000) and data.spec.shape == (1, 32, 32)
    assert data.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # Fashion-MNIST's first training labels
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10
    x = data.test_images(64)
    assert x.shape == (64, 1, 32, 32) and x.min() == -1.0 and -0.9 < x.mean() < 0.0 and x.max() <= 1.0
    stacked = load_dataset(cfg(DEBIAN_FASHION, "stacked_mnist", n_train=100, n_test=10), seed=0)
    assert stacked.source.startswith("stacked from fashion_mnist") and stacked.train_set[0].shape == (3, 28, 28)


def test_split_generators_are_prefix_stable():
    a, b = split_generators(11, 2), split_generators(11, 6)
    assert all(torch.equal(torch.rand(3, generator=x), torch.rand(3, generator=y)) for x, y in zip(a, b))


# --- s3:// roots -----------------------------------------------------------------------------------------

try:
    from s3server import s3_fixture, s3_server_fixture  # noqa: F401

    import ebm_scale.remote  # noqa: F401

    HAVE_S3 = True
except ImportError:
    HAVE_S3 = False


@pytest.mark.skipif(not HAVE_S3, reason="ebm_scale.remote or tests/s3server.py is not there yet")
def test_an_s3_root_is_copied_to_the_node_cache_once_and_read_from_there(tmp_path, s3):
    write_mnist(tmp_path / "local" / "fashion-mnist", layout="flat_gz", fashion=True)
    uri = s3.upload_dir(tmp_path / "local" / "fashion-mnist", "sets/fashion-mnist")
    data = load_dataset(cfg(uri.rstrip("/"), "fashion_mnist"), seed=0)
    assert str(tmp_path / "cache") in data.source and len(data.train_set) == 64
    torch.testing.assert_close(data.train_set[1][0], scaled(pixels("fashion_mnist", "train", 2, (28, 28))[1]))
    with pytest.raises(ConfigError, match="data.root: cannot fetch s3://"):
        load_dataset(cfg(s3.uri("absent/"), "fashion_mnist"), seed=0)


def test_a_failed_download_is_a_config_error_naming_the_dataset(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(ConfigError, match=r"data.download: downloading mnist into .* failed"):
        load_dataset(cfg(tmp_path, download=True), seed=0)


@pytest.mark.parametrize("image_size", [32, 12])
def test_the_batched_in_memory_path_matches_torchvisions_pil_transform(tmp_path, no_md5_checks, image_size):
    from ebm_scale.data.images import ImageSet

    write_cifar10(tmp_path)
    train = load_dataset(cfg(tmp_path, "cifar10", image_size=image_size), seed=0).train_set
    assert train.pixels is not None
    per_image = ImageSet(train.base, train.indices)  # no pixels: each image through the PIL transform
    fast, slow = torch.stack(train.__getitems__(list(range(10)))), torch.stack([per_image[i] for i in range(10)])
    assert fast.shape == slow.shape == (10, 3, image_size, image_size)
    assert (fast - slow).abs().max() <= 1.01 / 127.5  # at most one grey level apart (rounding in the resize)
