"""What the image end-to-end tests share: tiny datasets on disk for each named image sweep, a Ray started so
its worker processes skip torchvision's md5 comparison the way the test process does, and `shard_probe`, an
`mle` that remembers which training images it drew (in its per-rank checkpoint state).

    python tests/image_runs.py <sweep>_smoke <folder> [key=value ...]   writes <sweep>'s dataset into <folder>
                                                                        and runs the sweep there (its stores too)

Ray workers import this module through `worker_setup` (Ray's worker_process_setup_hook, with tests/ on the
workers' PYTHONPATH), which registers `shard_probe` there as well.
"""

from __future__ import annotations

import contextlib
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from image_formats import skip_md5_checks, write_celeba, write_cifar10, write_mnist, write_svhn

from ebm_scale.methods.mle import Mle, MleConfig
from ebm_scale.methods.registry import METHODS, register_method
from ebm_scale.schema import knob

TESTS = str(Path(__file__).parent)  # on the workers' PYTHONPATH, for the hook and image_formats
# The dataset each named image sweep trains on.
SWEEP_DATA = {
    "mle_fashion_mnist": "fashion_mnist",
    "mle_cifar10": "cifar10",
    "ddaebm_cifar10": "cifar10",
    "vaebm_cifar10": "cifar10",
    "nt_ebm_svhn": "svhn",
    "diffebm_mnist": "mnist",
}
# Datasets whose torchvision class compares md5s of its files (tiny fakes cannot match them).
MD5_CHECKED = {"cifar10", "svhn", "celeba"}


def write_dataset(name: str, root, n_train: int = 256, n_test: int = 64) -> Path:
    """`name`'s files in a real on-disk format under `root`; returns the folder to give as data.root."""
    root = Path(root)
    if name == "mnist":
        write_mnist(root, n_train=n_train, n_test=n_test)  # torchvision's MNIST/raw/: no md5 involved
    elif name == "fashion_mnist":  # Debian's flat gzipped IDX files: read without torchvision's md5 check
        write_mnist(root / "fashion-mnist", n_train=n_train, n_test=n_test, layout="flat_gz", fashion=True)
    elif name == "cifar10":
        write_cifar10(root, n_train=n_train, n_test=n_test)
    elif name == "svhn":
        write_svhn(root, n_train=n_train, n_test=n_test)
    elif name == "celeba":
        write_celeba(root, n_train=n_train, n_valid=4, n_test=n_test)
    else:
        raise ValueError(f"no writer for {name!r}")
    return root


def worker_setup() -> None:
    """Ray's worker_process_setup_hook: importing this module registered shard_probe; the md5 patch is the
    one image_formats applies in the test process, never undone (the worker ends with Ray)."""
    skip_md5_checks(pytest.MonkeyPatch())


@contextlib.contextmanager
def local_ray(num_cpus: int = 2, cache: str | os.PathLike | None = None):
    """A local Ray whose workers run `worker_setup` (with EBM_SCALE_CACHE = `cache` when given);
    `ebm-scale train/sweep` join it instead of starting one."""
    import ray

    env = {"PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))}
    if cache is not None:
        env["EBM_SCALE_CACHE"] = str(cache)

    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,  # Ray releases finished trials' placement groups through the State API
        logging_level="ERROR",
        log_to_driver=False,  # as ebm-scale's own Ray: a failed trial's error is printed by the sweep
        runtime_env={
            "worker_process_setup_hook": "image_runs.worker_setup",
            "env_vars": env,
        },
    )
    try:
        yield
    finally:
        ray.shutdown()


def fingerprint(images: torch.Tensor) -> list[int]:
    """One checksum per image (of its float32 bytes): random-pixel images never share one."""
    flat = images.detach().float().cpu().contiguous().flatten(1)
    return [zlib.crc32(row.numpy().tobytes()) for row in flat]


@dataclass
class ShardProbeConfig(MleConfig):
    name: str = knob("shard_probe", choices=("shard_probe",), noun="method")


class ShardProbe(Mle):
    """`mle`, remembering the fingerprint of every training image it was handed, kept in extra_state (so the
    loop's checkpoint holds each rank's list under per_rank[rank]["extra"]["seen"])."""

    name = "shard_probe"
    config_class = ShardProbeConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[int] = []

    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen += fingerprint(batch)
        return super().train_step(batch)

    def extra_state(self) -> dict:
        return {**super().extra_state(), "seen": list(self.seen)}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.seen = list(state.get("seen", []))


if ShardProbe.name not in METHODS:
    register_method(ShardProbe)


def main(argv: list[str]) -> int:
    """Write a smoke sweep's dataset into a folder and run the sweep there (for timing it by hand)."""
    from ebm_scale.cli import main as cli

    sweep, folder, *overrides = argv
    base = sweep.removesuffix("_smoke")
    root = write_dataset(SWEEP_DATA[base], Path(folder) / "data")
    os.chdir(folder)
    worker_setup()  # this process opens the dataset too (the sweep's checks before any trial)
    with local_ray():
        return cli(["sweep", sweep, f"data.root={root}", *overrides])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
