"""The contract between a training method and the engine.

A method is plain PyTorch: it owns its networks, optimizers, one training step, sampling and (where it
defines one) an unnormalized log-density. The engine (engine/loop.py) drives it, evaluates it,
checkpoints it and reports for it; nothing here knows about Ray, Tune or MLflow.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ebm_scale.data.spec import DataSpec
from ebm_scale.schema import Config, Rule, knob

OPTIMIZERS = ("adam", "prodigy")


@dataclass
class OptimConfig(Config):
    """Optimizer settings shared by every method's optimizers."""

    # adam | prodigy (Mishchenko & Defazio's learning-rate-free Adam, paper 004's choice). Prodigy estimates
    # the step size itself; its lr is a multiplier on that estimate, and its authors recommend lr = 1.
    kind: str = knob("adam", choices=OPTIMIZERS, noun="optimizer")
    lr: float = knob(1e-3, gt=0)
    betas: tuple[float, float] = knob((0.9, 0.999), ge=0, lt=1)
    weight_decay: float = knob(0.0, ge=0)
    grad_clip: float = knob(0.0, ge=0, note="0 = off")  # max global grad norm
    # IGEBM-style (Du & Mordatch 2019, kept by VAEBM's public code): clip every gradient element to
    # ±(k·sqrt(v̂) + 0.1), v̂ = Adam's bias-corrected second moment, so one wild batch cannot move a weight
    # by more than k "typical" steps. 0 = off.
    clip_elementwise_std: float = knob(0.0, ge=0, note="0 = off")
    # Exponential learning-rate decay: lr halves every `lr_halflife` optimizer steps; 0 = constant. Lets an
    # adversarial pair that oscillates at a useful early lr settle later. Lives in the optimizer's
    # param_groups, so a checkpoint carries it and a resumed run continues the same schedule.
    lr_halflife: int = knob(0, ge=0, note="0 = off")

    def rules(self):
        yield Rule(
            "clip_elementwise_std",
            self.kind == "adam" or self.clip_elementwise_std == 0,
            "elementwise clipping reads Adam's second moment: use it with kind=adam only",
        )

    def build(self, params) -> torch.optim.Optimizer:
        if self.kind == "prodigy":
            from prodigyopt import Prodigy  # imported only when chosen

            return Prodigy(params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)


class Method(abc.ABC):
    """Base class of every registered method.

    Subclasses set `config_class` (a dataclass deriving from ebm_scale.schema.Config, registered with Hydra
    by ebm_scale.config and validated once when the config is composed) and fill `self.networks` /
    `self.optimizers` in __init__; checkpointing and gradient synchronisation then come for free.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    # Two-stage methods: the kind of pretrained backbone they stand on ("vae" | "flow"); their config then
    # has `backbone` (a reference the engine resolves to a local file) and a `pretrain` section.
    backbone_kind: ClassVar[str | None] = None
    # Train metrics worth a picture over training (drawn at every evaluation), e.g. MCMC acceptance rate.
    curve_keys: ClassVar[tuple[str, ...]] = ()
    # Network evaluations per generated sample, where the method has a fixed number (diffusion samplers:
    # T generator steps, or the SDE's steps); logged as eval/nfe. None = not a fixed number. A method may
    # override it with a property computed from its config.
    nfe: int | None = None
    # Paper 004: an optimizer step whose loss is not finite is skipped, not taken, so one overflowing batch
    # cannot poison the weights. `optimizer_step` then returns None and names the optimizer in
    # `skipped_steps`; the engine counts skips and ends a run that keeps skipping as diverged.
    skip_nonfinite: ClassVar[bool] = False

    @classmethod
    def backbone_method_config(cls, cfg: Any) -> Any:
        """Two-stage methods: the config of the stage-1 method (`vae` / `flow`) that trains this method's
        backbone, built from its `pretrain` and architecture sections. The engine calls it only when
        `backbone_kind` is set."""
        raise NotImplementedError(f"{cls.__name__} has no backbone (backbone_kind is None)")

    def __init__(self, cfg: Any, spec: DataSpec, device: torch.device):
        self.cfg = cfg
        self.spec = spec
        self.device = torch.device(device)
        self.networks: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.skipped_steps: list[str] = []  # optimizers that skipped a step since the engine last looked

    # --- what each method implements -------------------------------------------------------------
    @abc.abstractmethod
    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training iteration on a batch of data. Returns detached 0-d tensors (no .item(): the engine
        decides when to synchronise). Every method reports `loss` and its separate loss terms."""

    @abc.abstractmethod
    def sample(self, n: int) -> torch.Tensor:
        """n samples from what the method itself generates (a tensor on self.device)."""

    def log_density(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named unnormalized log-densities of x, e.g. {"ebm": -E(x)}; {} where the method defines none."""
        return {}

    def export_backbone(self) -> dict | None:
        """Stage-1 methods (`vae`, `flow`): the trained network as a backbone file's contents
        (methods.backbone.backbone_state). None for everything else."""
        return None

    def long_chains(self, chains: int, length: int, init_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """MCMC methods: `chains` long runs of the method's own sampler from fresh starts (their initial noise
        scaled by `init_scale`), as data-space traces (chains, length, dim), keyed by a label ("latent",
        "data", ...). Used for R̂, autocorrelation and ESS at evaluation. {} where the method runs no chain."""
        return {}

    def extra_state(self) -> dict:
        """State beyond networks/optimizers needed to continue exactly (replay buffers, adapted step sizes)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # --- shared machinery --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "networks": {k: m.state_dict() for k, m in self.networks.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        for k, m in self.networks.items():
            m.load_state_dict(state["networks"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.load_extra_state(state.get("extra", {}))

    def train(self, mode: bool = True) -> "Method":
        for m in self.networks.values():
            m.train(mode)
        return self

    def broadcast_parameters(self) -> None:
        """Make every data-parallel rank start from rank 0's weights (no-op outside torch.distributed)."""
        if _world_size() > 1:
            for m in self.networks.values():
                for t in list(m.parameters()) + list(m.buffers()):
                    dist.broadcast(t.data, src=0)

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, settings: OptimConfig | None = None
    ) -> torch.Tensor | None:
        """zero_grad → backward → average gradients over ranks → clip (per `settings`) → step. Returns the
        pre-clip grad norm, or None for a step skipped under `skip_nonfinite`.

        Data parallelism is done here, with one bucketed all-reduce of the gradients, rather than by
        wrapping networks in DistributedDataParallel: EBM samplers call the energy many times per step and
        differentiate through those calls (create_graph=True), which DDP's forward/backward hooks do not
        support. The arithmetic is the same as DDP's (mean of per-rank gradients).
        """
        if self.skip_nonfinite and not _finite_on_every_rank(loss):
            self.skipped_steps.append(next(k for k, o in self.optimizers.items() if o is optimizer))
            return None
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if _world_size() > 1 and params:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= _world_size()
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
        if settings is not None and settings.clip_elementwise_std > 0:
            _clip_to_adam_std(optimizer, settings.clip_elementwise_std)
        if settings is not None and settings.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        optimizer.step()
        if settings is not None and settings.lr_halflife > 0:
            for group in optimizer.param_groups:
                group["lr"] *= 0.5 ** (1.0 / settings.lr_halflife)
        return norm.detach()


def fp32_outputs(net: nn.Module):
    """`net` called with its floating outputs (a tensor or a tuple of them) cast to fp32. Under bf16 autocast
    the network runs in bf16 while what its outputs feed — chain and SDE states, schedule arithmetic,
    log-density accumulators, losses — stays fp32 (a no-op without autocast)."""

    def call(*args, **kwargs):
        out = net(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.float() if o.is_floating_point() else o for o in out)
        return out.float() if out.is_floating_point() else out

    return call


@torch.no_grad()
def _clip_to_adam_std(optimizer: torch.optim.Optimizer, k: float) -> None:
    """Clamp each gradient element to ±(k·sqrt(v̂) + 0.1) (see OptimConfig.clip_elementwise_std). Before
    Adam's first step there is no second moment yet, so the first gradient passes unclipped."""
    for group in optimizer.param_groups:
        beta2 = group["betas"][1]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if p.grad is None or not state or "exp_avg_sq" not in state:
                continue
            step = float(state["step"])
            bound = state["exp_avg_sq"].div(1 - beta2**step).sqrt_().mul_(k).add_(0.1)
            torch.maximum(torch.minimum(p.grad, bound), -bound, out=p.grad)


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    """One host sync per step (only for skip_nonfinite methods). Under DDP every rank must skip together, or
    the ranks that step would wait forever in the gradient all-reduce."""
    ok = torch.isfinite(loss.detach()).all().float().reshape(1)
    if _world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
