"""Independent random streams derived from one seed (no state of its own)."""

from __future__ import annotations

import numpy as np
import torch


def split_generators(seed: int, n_splits: int = 2) -> list[torch.Generator]:
    """Independent generators derived from one seed (train, test, ...).

    numpy's SeedSequence spawns statistically independent child seeds, so the test set is neither a
    continuation of nor correlated with the training stream, and changing n_train leaves test unchanged.
    The first k of n_splits streams are the same for every n_splits >= k.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    children = np.random.SeedSequence(seed).spawn(n_splits)
    return [torch.Generator().manual_seed(int(c.generate_state(1, dtype=np.uint64)[0] >> 1)) for c in children]
