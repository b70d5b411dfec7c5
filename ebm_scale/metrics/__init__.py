"""Evaluation metrics: quadrature log-likelihood (2D), Sinkhorn distance, and the toy-data evaluation."""

from ebm_scale.metrics.likelihood import (
    DensityGrid,
    evaluate_in_chunks,
    log_density_grid,
    log_density_grids,
    log_normalizer,
    quadrature_log_likelihood,
    quadrature_log_likelihoods,
    split_by_mode,
)
from ebm_scale.metrics.sinkhorn import SINKHORN_COSTS, entropic_plan, sinkhorn_distance
from ebm_scale.metrics.toy import EvalConfig, evaluate_toy

__all__ = [
    "SINKHORN_COSTS",
    "DensityGrid",
    "EvalConfig",
    "entropic_plan",
    "evaluate_in_chunks",
    "evaluate_toy",
    "log_density_grid",
    "log_density_grids",
    "log_normalizer",
    "quadrature_log_likelihood",
    "quadrature_log_likelihoods",
    "sinkhorn_distance",
    "split_by_mode",
]
