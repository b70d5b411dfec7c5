"""Method registry: name → Method subclass (each carries its own config dataclass)."""

from __future__ import annotations

from ebm_scale.methods.base import DataSpec, Method, OptimConfig

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: `@register_method class Mle(Method): name = "mle"; config_class = MleConfig`."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def build_method(cfg, spec: DataSpec, device) -> Method:
    return METHODS[cfg.name](cfg, spec, device)


# Importing the modules registers them.
from ebm_scale.methods import ddaebm, diffebm, flow, mle, nt_ebm, vae, vaebm  # noqa: E402,F401

__all__ = ["METHODS", "DataSpec", "Method", "OptimConfig", "build_method", "register_method"]
