"""Endless, resumable streams of training batches: `next(stream)` is a batch on the device, `state_dict()` /
`load_state_dict()` let a resumed run continue with exactly the batch the interrupted one would have drawn.

Toys index an on-device tensor with a seeded generator (the state is the generator's). Images go through a
DataLoader over a DistributedSampler, one code path for any world size; the state is (epoch, batches drawn
this epoch), and resuming slices the sampler's index list instead of loading and dropping images.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ToyBatches:
    """Uniform draws with replacement from `train`, moved to `device` once."""

    def __init__(self, train: Tensor, batch_size: int, seed: int, device: torch.device):
        self.train = train.to(device)
        self.batch_size = batch_size
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> Tensor:
        idx = torch.randint(len(self.train), (self.batch_size,), generator=self.generator).to(self.device)
        return self.train[idx]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class ResumableSampler(DistributedSampler):
    """A DistributedSampler whose next epoch can start `skip` indices into its shard."""

    skip: int = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ImageBatches:
    """Shuffled epochs of `dataset` (items are image tensors), this rank's shard of each, forever.

    Every rank must pass the same `seed`: the sampler permutes with seed + epoch and gives rank r every
    world_size-th index, so the shards are disjoint and cover the epoch (the tail that does not fill a
    batch on every rank is dropped)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device,
        num_workers: int = 0,
        pin_memory: bool = True,
    ):
        self.sampler = ResumableSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batches_per_epoch = self.sampler.num_samples // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"batch size {batch_size} exceeds this rank's share of the training set "
                f"({self.sampler.num_samples} of {len(dataset)} images over {world_size} ranks)"
            )
        self.batch_size = batch_size
        self.device = device
        self.non_blocking = pin_memory and device.type == "cuda"
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=self.non_blocking,
            persistent_workers=num_workers > 0,
            drop_last=True,
            # Its own generator: a loader without one draws worker seeds from the global RNG at every epoch,
            # which would shift the training process's random stream (and break exact resumption).
            generator=torch.Generator().manual_seed(seed),
        )
        self.epoch = 0
        self.batch = 0  # batches handed out in this epoch
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self) -> Tensor:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self.sampler.set_epoch(self.epoch)
            self.sampler.skip = self.batch * self.batch_size
            self._iterator = iter(self.loader)
        x = next(self._iterator)
        self.batch += 1
        return x.to(self.device, non_blocking=self.non_blocking)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state["batch_size"] != self.batch_size:
            raise ValueError(f"stream state is for batch size {state['batch_size']}, not {self.batch_size}")
        self.epoch, self.batch, self._iterator = state["epoch"], state["batch"], None
