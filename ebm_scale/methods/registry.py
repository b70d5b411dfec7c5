"""Method registry: name → Method subclass (each carries its own config dataclass). A module of its own so
that method modules register themselves without importing the package that imports them."""

from __future__ import annotations

from ebm_scale.methods.base import DataSpec, Method

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: `@register_method class Mle(Method): name = "mle"; config_class = MleConfig`."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def build_method(cfg, spec: DataSpec, device) -> Method:
    return METHODS[cfg.name](cfg, spec, device)
