"""Diffusion utilities shared by `ddaebm` and `diffebm`: plain PyTorch, no engine imports.

- schedule.py: the T-step discretized VP chain (β_t, ᾱ_t, DDPM posterior, forward pairs, terminal check)
- sde.py: continuous SDEs (abstract SDE, VPSDE) and the controlled generative SDE's Euler–Maruyama paths
- losses.py: denoising score matching of a control and the log-variance path divergence
- embeddings.py: sinusoidal and random-Fourier time embeddings
"""

from ebm_scale.diffusion.losses import denoising_score_matching, log_variance, path_log_rnd, running_cost
from ebm_scale.diffusion.schedule import TIME_SCHEDULES, DiscreteVPSchedule, gaussian_log_prob, time_points, vp_sigma2
from ebm_scale.diffusion.sde import SDE, VPSDE, Path, simulate_generative

__all__ = [
    "SDE",
    "TIME_SCHEDULES",
    "VPSDE",
    "DiscreteVPSchedule",
    "Path",
    "denoising_score_matching",
    "gaussian_log_prob",
    "log_variance",
    "path_log_rnd",
    "running_cost",
    "simulate_generative",
    "time_points",
    "vp_sigma2",
]
