import torch

import ebm_scale  # noqa: F401  (sets Ray's environment before any test imports ray)

# Tests measure behaviour, not speed, but 2-core CI machines thrash when torch spawns a thread per core in
# every process (pytest + Ray workers): one intra-op thread each.
torch.set_num_threads(1)
