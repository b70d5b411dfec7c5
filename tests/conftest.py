import torch

import ebm_scale  # noqa: F401  (sets Ray's environment before any test imports ray)

# Tests measure behaviour, not speed, but 2-core CI machines thrash when torch spawns a thread per core in
# every process (pytest + Ray workers): one intra-op thread each.
torch.set_num_threads(1)
# (Small tensors on a shared 2-core box: OpenMP threads spinning for a busy core make elementwise ops
# up to 100x slower, so single-threaded is also the fast setting.)
