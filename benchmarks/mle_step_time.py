"""Wall-clock time of one `mle` training step at the paper's defaults (256×5 swish energy, noisy Langevin
K = 40) on a batch of 256 2D points, on the CPU. A timing, not a test: the unit suite checks what the step
computes (tests/test_mle.py), this says how long it takes.

    uv run python benchmarks/mle_step_time.py                 # 20 timed steps after 2 warm-up steps
    uv run python benchmarks/mle_step_time.py --steps 50 --threads 2

Prints the median and the spread (min, max) of the per-step times; on a shared machine the median is the
figure to quote, together with the machine's load (`uptime`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ebm_scale.data import DataSpec
from ebm_scale.methods import build_method
from ebm_scale.methods.mle import MleConfig


def two_modes(n: int) -> torch.Tensor:
    """Equal mixture of N((±2, 0), 0.2² I), as in tests/test_mle.py."""
    sign = torch.randint(0, 2, (n,)) * 2.0 - 1.0
    return torch.stack([2.0 * sign, torch.zeros(n)], 1) + 0.2 * torch.randn(n, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, lazy init)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    method = build_method(MleConfig(), DataSpec(shape=(2,), bounds=(-4.0, 4.0)), "cpu")
    batch = two_modes(args.batch)
    for _ in range(args.warmup):
        method.train_step(batch)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        method.train_step(batch)
        times.append(time.perf_counter() - start)
    print(
        f"mle train_step, paper defaults, batch {args.batch}, {args.threads} thread(s), {args.steps} steps: "
        f"median {1e3 * statistics.median(times):.1f} ms (min {1e3 * min(times):.1f}, max {1e3 * max(times):.1f})"
    )


if __name__ == "__main__":
    main()
