"""Pretrained backbones: the file a stage-1 run writes and a stage-2 method reads (plain PyTorch).

Two-stage methods (VAEBM on a VAE, NT-EBM on a flow) train their backbone once, by its own objective, as
its own run (methods `vae` and `flow`), then freeze it. The hand-over is one file, `backbone.pt`:

    {"kind": "vae" | "flow", "shape": data shape, "config": the network's config as a dict,
     "state_dict": the network's weights, "data": name of the dataset it was trained on}

Engine code turns a reference (an MLflow `runs:/<run_id>/backbone` URI or a storage path) into a local
file; this module only reads and writes that file and checks it fits the data, so a mismatch fails with
the key named before any training starts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ebm_scale.errors import ConfigError
from ebm_scale.schema import Config, knob

FILE_NAME = "backbone.pt"


@dataclass
class PretrainConfig(Config):
    """Stage 1, when a two-stage method is given no backbone: trained once by the engine (its own MLflow
    run), then shared by every trial."""

    iterations: int = knob(3000, ge=1)
    lr: float = knob(1e-3, gt=0)
    batch_size: int = knob(0, ge=0, note="0 = train.batch_size")


def _kinds() -> dict[str, tuple[type, type]]:
    # Imported here, not at module level: a method that never touches a backbone should not pay for them.
    from ebm_scale.nets.flow import Flow, FlowConfig
    from ebm_scale.nets.vae import VAE, VAEConfig

    return {"vae": (VAEConfig, VAE), "flow": (FlowConfig, Flow)}


def backbone_state(kind: str, shape: tuple[int, ...], cfg: Any, module: nn.Module, data: str = "") -> dict:
    """What a stage-1 method exports: enough to rebuild the network without its training config."""
    return {
        "kind": kind,
        "shape": list(shape),
        "config": dataclasses.asdict(cfg),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "data": data,
    }


def save_backbone(directory: str, state: dict) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, FILE_NAME)
    torch.save(state, path)
    return path


def _read(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, FILE_NAME)
    if not os.path.isfile(path):
        raise ConfigError(
            "method.backbone",
            f"no backbone file at {path!r} (expected a {FILE_NAME} written by a "
            "`vae` or `flow` run, or the folder holding it)",
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def check_backbone(path: str, kind: str, shape: tuple[int, ...], key: str = "method.backbone") -> dict:
    """Read a backbone file and check it is the right kind for this method and was trained on data of this
    shape. Returns the file's contents."""
    state = _read(path)
    if state.get("kind") != kind:
        raise ConfigError(
            key, f"{path!r} holds a {state.get('kind')!r} backbone; this method needs a {kind!r} one", allowed=[kind]
        )
    if tuple(state["shape"]) != tuple(shape):
        raise ConfigError(
            key,
            f"backbone was trained on data of shape {tuple(state['shape'])} "
            f"({state.get('data') or 'unknown dataset'}), but this run's data has shape {tuple(shape)}",
        )
    return state


def load_backbone(path: str, kind: str, shape: tuple[int, ...], device) -> nn.Module:
    """The frozen backbone network: eval mode, no gradients for its parameters (stage 2 never trains it)."""
    state = check_backbone(path, kind, shape)
    config_class, module_class = _kinds()[kind]
    field_names = {f.name for f in dataclasses.fields(config_class)}
    cfg = config_class(**{k: v for k, v in state["config"].items() if k in field_names})
    module = module_class(tuple(shape), cfg)
    module.load_state_dict(state["state_dict"])
    module.to(device).eval()
    module.requires_grad_(False)
    return module
