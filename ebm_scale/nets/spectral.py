"""Spectral regularization: Σ over layers of each weight's largest singular value (NVAE; VAEBM uses it on
its energy with weight 0.2 to keep the energy smooth, which keeps Langevin in its noise space stable).

σ_max is estimated by one power iteration per call with persistent vectors (Miyato et al. 2018): cheap,
and accurate after a few training steps because the weights move slowly. Convolution weights are taken as
(out, in·k·k) matrices — the usual proxy, not the operator norm of the convolution itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ebm_scale.nets.mlp import ScalarHead

_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, ScalarHead)


class SpectralPenalty:
    def __init__(self, module: nn.Module):
        self.layers = [m for m in module.modules() if isinstance(m, _LAYERS)]
        self.vectors: list[torch.Tensor | None] = [None] * len(self.layers)  # u per layer (output side)

    def __call__(self) -> torch.Tensor:
        if not self.layers:
            return torch.zeros(())
        # fp32 even under bf16 autocast: the penalty is on the weights themselves, and the persistent power-
        # iteration vectors must not turn bf16 (they are checkpointed and reused every step).
        with torch.autocast(self.layers[0].weight.device.type, enabled=False):
            return self._total()

    def _total(self) -> torch.Tensor:
        total = None
        for i, layer in enumerate(self.layers):
            w = layer.weight
            if w.dim() == 1:  # ScalarHead: a (1, width) matrix, whose only singular value is the norm
                sigma = torch.linalg.vector_norm(w)
            else:
                matrix = w.flatten(1)
                with torch.no_grad():
                    u = self.vectors[i]
                    if u is None:
                        u = F.normalize(torch.randn(matrix.shape[0], device=w.device, dtype=w.dtype), dim=0)
                    v = F.normalize(matrix.t() @ u, dim=0)
                    u = F.normalize(matrix @ v, dim=0)
                    self.vectors[i] = u
                sigma = u @ matrix @ v  # differentiable in the weight; u, v held fixed
            total = sigma if total is None else total + sigma
        return total if total is not None else torch.zeros(())

    def state_dict(self) -> dict:
        return {"vectors": [None if u is None else u.clone() for u in self.vectors]}

    def load_state_dict(self, state: dict) -> None:
        vectors = state.get("vectors", [])
        if len(vectors) == len(self.layers):
            self.vectors = [None if u is None else u.to(layer.weight.device) for u, layer in zip(vectors, self.layers)]
