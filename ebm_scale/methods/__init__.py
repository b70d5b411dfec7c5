"""Every registered method, importable from one place: `from ebm_scale.methods import METHODS, build_method`."""

from __future__ import annotations

# Importing the modules registers them.
from ebm_scale.methods import ddaebm, diffebm, flow, mle, nt_ebm, vae, vaebm  # noqa: F401
from ebm_scale.methods.base import DataSpec, Method, OptimConfig
from ebm_scale.methods.registry import METHODS, build_method, register_method

__all__ = ["METHODS", "DataSpec", "Method", "OptimConfig", "build_method", "register_method"]
