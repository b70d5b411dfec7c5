"""StackedMNIST mode coverage (paper 003, Table 5; the protocol of Lin et al. 2018, PacGAN).

A StackedMNIST image stacks three MNIST digits as its R, G, B channels, so the data has 1000 equally likely
modes, `100·d_R + 10·d_G + d_B`. A digit classifier labels each channel of each generated sample; the metrics are
the number of distinct modes hit (`eval/modes_covered`, of 1000) and the reverse KL from the generated mode
histogram to the uniform data distribution, KL(p_gen ‖ U) = Σ_m p_gen(m) log(1000·p_gen(m)) with 0·log 0 = 0
(`eval/kl_uniform`, nats; log 1000 ≈ 6.91 for a single mode). Prior work draws 26,000 samples (N_SAMPLES): even
a perfect sampler then scores KL ≈ 999 / (2·26,000) ≈ 0.02 from sampling noise alone.

The classifier is a small CNN trained here, once per data set, and cached on disk (`digit_classifier`).
"""

import logging
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ebm_scale.remote import cache_root, node_lock
from ebm_scale.schema import Config, knob

log = logging.getLogger(__name__)

N_MODES = 1000
N_SAMPLES = 26_000  # the sample count of the prior StackedMNIST evaluations


@dataclass
class ClassifierTraining(Config):
    """A short, fixed budget: about 1.6 epochs of MNIST's 60k images at the defaults."""

    steps: int = knob(1500, ge=1)
    batch_size: int = knob(64, ge=1)
    lr: float = knob(2e-3, gt=0)
    width: int = knob(16, ge=1, note="channels of the first conv layer")
    seed: int = knob(0)


class DigitClassifier(nn.Module):
    """Two conv + pool stages and an MLP head on (n, 1, H, W) images in [-1, 1]; logits over 10 digits."""

    def __init__(self, image_size: tuple[int, int], width: int = 16, classes: int = 10):
        super().__init__()
        self.image_size = tuple(image_size)
        self.width = width
        height, breadth = self.image_size
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (height // 4) * (breadth // 4), 128),
            nn.ReLU(),
            nn.Linear(128, classes),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def train_digit_classifier(
    images: Tensor, labels: Tensor, training: ClassifierTraining | None = None
) -> DigitClassifier:
    """A classifier trained with Adam (cosine-decayed) on minibatches drawn with a seeded generator."""
    training = training or ClassifierTraining()
    device = images.device
    generator = torch.Generator(device="cpu").manual_seed(training.seed)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(training.seed)
        model = DigitClassifier(images.shape[-2:], training.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=training.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, training.steps)
    labels = labels.to(device=device, dtype=torch.long)
    model.train()
    for _ in range(training.steps):
        index = torch.randint(len(images), (training.batch_size,), generator=generator).to(device)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predict_digits(classifier: DigitClassifier, images: Tensor, batch_size: int = 2048) -> Tensor:
    """Digit labels of (n, 1, H, W) images in [-1, 1], resized to the classifier's input size when they differ."""
    device = next(classifier.parameters()).device
    out = []
    for batch in images.split(batch_size):
        batch = batch.to(device=device, dtype=torch.float32)
        if tuple(batch.shape[-2:]) != classifier.image_size:
            batch = F.interpolate(batch, size=classifier.image_size, mode="bilinear", antialias=True)
        out.append(classifier(batch).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(classifier: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    return (predict_digits(classifier, images) == labels.cpu()).float().mean().item()


def digit_classifier(
    images: Tensor,
    labels: Tensor,
    cache_key: str,
    cache_dir: str | os.PathLike | None = None,
    training: ClassifierTraining | None = None,
) -> DigitClassifier:
    """The classifier for `cache_key`: loaded from `<cache>/classifiers/<cache_key>.pt`, else trained and saved.

    A cached file trained with other settings or on data of another shape or labelling is retrained over. The node
    lock makes concurrent callers (several workers of one node) train once; the write is atomic.
    """
    training = training or ClassifierTraining()
    path = cache_root(cache_dir) / "classifiers" / f"{cache_key}.pt"
    identity = {"training": asdict(training), "shape": list(images.shape), "labels": _label_fingerprint(labels)}
    with node_lock(path):
        saved = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
        if saved is not None and saved["identity"] == identity:
            model = DigitClassifier(saved["image_size"], saved["width"])
            model.load_state_dict(saved["state"])
            return model.to(images.device).eval()
        start = time.perf_counter()
        log.info("training digit classifier %s on %d images", cache_key, len(images))
        model = train_digit_classifier(images, labels, training)
        log.info("trained digit classifier %s in %.1f s", cache_key, time.perf_counter() - start)
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(
            {"identity": identity, "image_size": list(model.image_size), "width": model.width, "state": state}, temp
        )
        os.replace(temp, path)
    return model


def _label_fingerprint(labels: Tensor) -> list[int]:
    """Per-class counts and a position-weighted checksum: cheap, and differs for a reshuffled or other label set."""
    labels = labels.cpu().long()
    weights = torch.arange(1, len(labels) + 1, dtype=torch.long) % 1_000_003
    return torch.bincount(labels, minlength=10).tolist() + [int((labels * weights).sum() % 2**61)]


def mode_labels(digits: Tensor) -> Tensor:
    """(n, 3) channel digits (R, G, B) -> modes 100·R + 10·G + B in [0, 1000)."""
    return digits[:, 0] * 100 + digits[:, 1] * 10 + digits[:, 2]


def mode_metrics(modes: Tensor) -> dict[str, float]:
    """Modes covered and KL(p_gen ‖ uniform over 1000) of a tensor of mode labels."""
    counts = torch.bincount(modes.long().flatten(), minlength=N_MODES).double()
    p = counts[counts > 0] / counts.sum()
    return {
        "eval/modes_covered": float((counts > 0).sum()),
        "eval/kl_uniform": float((p * (p * N_MODES).log()).sum()),
    }


def sample_modes(samples: Tensor, classifier: DigitClassifier) -> Tensor:
    """The mode (0..999) of each (n, 3, H, W) sample in [-1, 1]: its three channels' digits."""
    if samples.ndim != 4 or samples.shape[1] != 3:
        raise ValueError(f"StackedMNIST samples are (n, 3, H, W); got {tuple(samples.shape)}")
    n, _, height, breadth = samples.shape
    return mode_labels(predict_digits(classifier, samples.reshape(n * 3, 1, height, breadth)).reshape(n, 3))


def stacked_mnist_metrics(samples: Tensor, classifier: DigitClassifier) -> dict[str, float]:
    """`eval/modes_covered` and `eval/kl_uniform` of (n, 3, H, W) samples in [-1, 1] (N_SAMPLES of them, ideally)."""
    return mode_metrics(sample_modes(samples, classifier))


def stack_digits(
    images: Tensor, labels: Tensor, count: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """`count` StackedMNIST images from (n, 1, H, W) digits: three drawn independently and uniformly per image.

    Returns the (count, 3, H, W) images and their modes.
    """
    index = torch.randint(len(images), (count, 3), generator=generator)
    stacked = images[index.flatten()].reshape(count, 3, *images.shape[-2:])
    return stacked, mode_labels(labels[index])
