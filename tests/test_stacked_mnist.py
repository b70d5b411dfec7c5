"""StackedMNIST mode coverage: the digit classifier, its on-disk cache, and the mode count and KL to uniform."""

import gzip
import logging
import math
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ebm_scale.metrics.stacked_mnist import (
    N_MODES,
    ClassifierTraining,
    accuracy,
    digit_classifier,
    mode_metrics,
    stack_digits,
    stacked_mnist_metrics,
    train_digit_classifier,
)

TINY = ClassifierTraining(steps=60, batch_size=32, lr=1e-2, width=4)


def templates(size: int = 8) -> torch.Tensor:
    """Ten fixed random ±1 patterns, one per "digit": far apart, so a few steps of training separate them."""
    return torch.randn(10, 1, size, size, generator=torch.Generator().manual_seed(1)).sign()


def noisy_digits(n: int, seed: int, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(10, (n,), generator=generator)
    images = templates()[labels] + noise * torch.randn(n, 1, 8, 8, generator=generator)
    return images.clamp(-1, 1), labels


@pytest.fixture(scope="module")
def classifier():
    return train_digit_classifier(*noisy_digits(2000, seed=0), TINY)


def test_classifier_learns_separable_digits(classifier):
    assert accuracy(classifier, *noisy_digits(1000, seed=1)) == 1.0


def test_training_is_seeded_and_leaves_the_global_rng_alone():
    images, labels = noisy_digits(256, seed=0)
    settings = ClassifierTraining(steps=3, batch_size=16, width=2)
    state = torch.random.get_rng_state()
    first, second = (train_digit_classifier(images, labels, settings) for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_mode_metrics_of_known_histograms():
    every = mode_metrics(torch.arange(N_MODES).repeat(3))
    assert every == {"eval/modes_covered": 1000.0, "eval/kl_uniform": pytest.approx(0.0, abs=1e-12)}
    single = mode_metrics(torch.full((500,), 417))
    assert single == {"eval/modes_covered": 1.0, "eval/kl_uniform": pytest.approx(math.log(1000))}
    half = mode_metrics(torch.arange(0, N_MODES, 2))
    assert half == {"eval/modes_covered": 500.0, "eval/kl_uniform": pytest.approx(math.log(2))}
    # Uneven: p = (3/4, 1/4) on two modes.
    uneven = mode_metrics(torch.tensor([5, 5, 5, 9]))
    assert uneven["eval/kl_uniform"] == pytest.approx(0.75 * math.log(750) + 0.25 * math.log(250))


def test_a_perfect_sampler_of_26k_scores_the_sampling_noise_floor():
    modes = torch.randint(N_MODES, (26_000,), generator=torch.Generator().manual_seed(0))
    metrics = mode_metrics(modes)
    assert metrics["eval/modes_covered"] == 1000.0
    assert 0.01 < metrics["eval/kl_uniform"] < 0.03  # ≈ 999 / (2 · 26,000) ≈ 0.019


def test_stacked_samples_of_known_digits(classifier):
    images, labels = noisy_digits(500, seed=2)
    stacked, modes = stack_digits(images, labels, 3000, torch.Generator().manual_seed(3))
    assert stacked.shape == (3000, 3, 8, 8)
    assert stacked_mnist_metrics(stacked, classifier) == mode_metrics(modes)
    # One image repeated: one mode, whatever its digits.
    assert stacked_mnist_metrics(stacked[:1].repeat(50, 1, 1, 1), classifier) == {
        "eval/modes_covered": 1.0,
        "eval/kl_uniform": pytest.approx(math.log(1000)),
    }


def test_stack_digits_puts_red_green_blue_in_hundreds_tens_units():
    images = templates()
    labels = torch.arange(10)
    stacked, modes = stack_digits(images, labels, 200, torch.Generator().manual_seed(0))
    for image, mode in zip(stacked, modes):
        digits = [int(mode) // 100, int(mode) // 10 % 10, int(mode) % 10]
        assert all(torch.equal(image[c], images[d, 0]) for c, d in enumerate(digits))


def test_samples_of_another_size_are_resized(classifier):
    # Each pixel made a 2x2 block: antialiased bilinear resizing back to 8x8 averages the blocks, recovering it.
    stacked, modes = stack_digits(templates(), torch.arange(10), 400, torch.Generator().manual_seed(4))
    large = F.interpolate(stacked, scale_factor=2, mode="nearest")
    assert large.shape[-1] == 16
    assert stacked_mnist_metrics(large, classifier) == mode_metrics(modes)


def test_samples_must_have_three_channels(classifier):
    with pytest.raises(ValueError, match=r"\(n, 3, H, W\)"):
        stacked_mnist_metrics(torch.zeros(4, 1, 8, 8), classifier)


def test_classifier_is_trained_once_and_cached(tmp_path, caplog):
    images, labels = noisy_digits(500, seed=0)
    settings = ClassifierTraining(steps=20, batch_size=32, width=2)
    caplog.set_level(logging.INFO, logger="ebm_scale.metrics.stacked_mnist")

    def trainings():
        return sum("training digit classifier" in r.getMessage() for r in caplog.records)

    first = digit_classifier(images, labels, "toy", cache_dir=tmp_path, training=settings)
    path = tmp_path / "classifiers" / "toy.pt"
    written = path.stat().st_mtime_ns
    second = digit_classifier(images, labels, "toy", cache_dir=tmp_path, training=settings)
    assert trainings() == 1 and path.stat().st_mtime_ns == written
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not second.training
    assert not list(path.parent.glob(".*.tmp-*"))
    # Other settings or other labels under the same key: the cached weights do not fit, so it trains again.
    digit_classifier(images, labels, "toy", cache_dir=tmp_path, training=ClassifierTraining(steps=21, width=2))
    digit_classifier(images, labels.roll(1), "toy", cache_dir=tmp_path, training=settings)
    assert trainings() == 3


def test_cache_lives_under_ebm_scale_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EBM_SCALE_CACHE", str(tmp_path))
    digit_classifier(*noisy_digits(64, seed=0), "env", training=ClassifierTraining(steps=1, width=2))
    assert (tmp_path / "classifiers" / "env.pt").is_file()


FASHION = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path, reader):
    with tempfile.NamedTemporaryFile() as file:  # torchvision's IDX readers take a path, not bytes
        file.write(gzip.decompress(path.read_bytes()))
        file.flush()
        return reader(file.name)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason=f"no Fashion-MNIST at {FASHION}")
def test_default_budget_on_real_fashion_mnist():
    from torchvision.datasets.mnist import read_image_file, read_label_file

    def split(prefix):
        images = read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz", read_image_file)
        labels = read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz", read_label_file)
        return images.unsqueeze(1).float() / 127.5 - 1, labels

    start = time.perf_counter()
    model = train_digit_classifier(*split("train"))
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, *split("t10k"))
    print(f"Fashion-MNIST: test accuracy {test_accuracy:.4f} after {seconds:.1f} s of training")
    assert test_accuracy > 0.85  # Fashion-MNIST is harder than digits: ~0.89 at the default budget
