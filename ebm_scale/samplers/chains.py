"""Where sampling chains start. One interface for every strategy:

    x0 = chain_init.init(n, data_batch)   # (n, *shape) on the init's device
    chain_init.update(x_final)            # remember where the chains ended (only the replay buffer cares)
    chain_init.state_dict() / load_state_dict(state)

Paper 000 always starts from fresh N(0, I) noise ("we do not use persistent sampling, as we want to
interpret the model as a generator with fixed prior"); the replay buffer is Du & Mordatch's (2019)
persistent variant, and data initialisation is contrastive divergence's.
"""

from __future__ import annotations

import torch


class ChainInit:
    """Base: fresh-noise helper, no-op update, no state."""

    def __init__(self, shape: tuple[int, ...], device: torch.device | str = "cpu"):
        self.shape = tuple(shape)
        self.device = torch.device(device)

    def noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, *self.shape, device=self.device)

    def init(self, n: int, data_batch: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def update(self, x_final: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoiseInit(ChainInit):
    """Fresh N(0, I) every call: the sampler is a generator with latent x0 (paper 000)."""

    def init(self, n: int, data_batch: torch.Tensor | None = None) -> torch.Tensor:
        return self.noise(n)


class DataInit(ChainInit):
    """Start from the current data batch (contrastive divergence). If n differs from the batch size,
    draw n batch rows with replacement."""

    def init(self, n: int, data_batch: torch.Tensor | None = None) -> torch.Tensor:
        if data_batch is None:
            raise ValueError("DataInit needs the data batch to start chains from")
        data_batch = data_batch.detach().to(self.device)
        if n != data_batch.shape[0]:
            data_batch = data_batch[torch.randint(data_batch.shape[0], (n,), device=self.device)]
        return data_batch.clone()


class ReplayBuffer(ChainInit):
    """Persistent chains (Du & Mordatch 2019): each chain restarts from noise with probability
    `reinit_prob`, otherwise from a uniformly drawn stored end point. Until anything is stored, all noise.

    Storage is a preallocated ring buffer; its fill level and write position are host integers, so
    init/update never synchronise with the device.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        device: torch.device | str = "cpu",
        *,
        capacity: int = 10000,
        reinit_prob: float = 0.05,
    ):
        super().__init__(shape, device)
        if capacity < 1:
            raise ValueError(f"ReplayBuffer capacity must be >= 1, got {capacity}")
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"ReplayBuffer reinit_prob must be in [0, 1], got {reinit_prob}")
        self.capacity = capacity
        self.reinit_prob = reinit_prob
        self.storage = torch.zeros(capacity, *self.shape, device=self.device)
        self.size = 0  # how many slots hold samples
        self.position = 0  # next slot to overwrite (oldest first once full)

    def __len__(self) -> int:
        return self.size

    def init(self, n: int, data_batch: torch.Tensor | None = None) -> torch.Tensor:
        fresh = self.noise(n)
        if self.size == 0:
            return fresh
        stored = self.storage[torch.randint(self.size, (n,), device=self.device)]
        restart = torch.rand(n, device=self.device) < self.reinit_prob
        return torch.where(restart.view(n, *([1] * len(self.shape))), fresh, stored)

    def update(self, x_final: torch.Tensor) -> None:
        x_final = x_final.detach().to(self.device)[-self.capacity :]  # more than fits: keep the newest
        n = x_final.shape[0]
        slots = (self.position + torch.arange(n, device=self.device)) % self.capacity
        self.storage[slots] = x_final.to(self.storage.dtype)
        self.position = (self.position + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    push = update

    def state_dict(self) -> dict:
        return {"samples": self.storage[: self.size].clone(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        samples = state["samples"]
        if samples.shape[0] > self.capacity or tuple(samples.shape[1:]) != self.shape:
            raise ValueError(
                f"replay buffer state of shape {tuple(samples.shape)} does not fit capacity "
                f"{self.capacity} and sample shape {self.shape}"
            )
        self.storage.zero_()
        self.size = samples.shape[0]
        self.storage[: self.size] = samples.to(self.device, self.storage.dtype)
        self.position = int(state["position"]) % self.capacity


CHAIN_INITS: dict[str, type[ChainInit]] = {
    "noise": NoiseInit,
    "buffer": ReplayBuffer,
    "data": DataInit,
}
