"""Long-run MCMC diagnostics of a method's own sampler, at evaluation (docs/methods/nt_ebm.md, "Diagnostics").

A method that runs Markov chains exposes `long_chains(m, length)` → {label: (m, length, dim) data-space
traces}; this runs them, reduces each label's traces to R̂ / ESS / autocorrelation (metrics.mcmc) and draws
the pictures. Labels let one method contrast samplers on the same model (NT-EBM: "latent" vs "data").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ebm_scale.errors import require

WHEN = ("final", "every", "never")


@dataclass
class McmcEvalConfig:
    chains: int = 64     # m (paper 002: 64)
    length: int = 2000   # transitions per chain (paper 002: 2000)
    burn_in: int = 400   # dropped before R̂ / ESS / autocorrelation (paper 002: 400)
    max_lag: int = 200   # autocorrelation curve length
    max_dims: int = 64   # coordinates analysed (a fixed random subset beyond this: ESS on 3072-D traces takes minutes)
    when: str = "final"  # final (last evaluation only: long chains are expensive) | every | never
    # Chains start from the method's own initial distribution with its noise scaled by this. R̂ assumes
    # over-dispersed starts (Gelman & Rubin 1992; paper 002 A.6): from a start that already matches the
    # target, chains that never leave their mode still give R̂ ≈ 1. 1 = the method's usual start.
    init_scale: float = 1.0

    def validate(self, prefix: str = "eval.mcmc") -> None:
        require(self.chains >= 2, f"{prefix}.chains", f"R̂ needs >= 2 chains, got {self.chains}")
        require(self.length >= 2, f"{prefix}.length", f"must be >= 2, got {self.length}")
        require(0 <= self.burn_in <= self.length - 2, f"{prefix}.burn_in",
                f"must be in [0, length - 2] = [0, {self.length - 2}], got {self.burn_in}")
        require(self.max_lag >= 1, f"{prefix}.max_lag", f"must be >= 1, got {self.max_lag}")
        require(self.max_dims >= 1, f"{prefix}.max_dims", f"must be >= 1, got {self.max_dims}")
        require(self.init_scale > 0, f"{prefix}.init_scale", f"must be > 0, got {self.init_scale}")
        require(self.when in WHEN, f"{prefix}.when", f"unknown setting {self.when!r}", allowed=WHEN)


def evaluate_chains(method, cfg: McmcEvalConfig, out_dir: Path | str | None, step: int, final: bool,
                    plots: bool = True) -> tuple[dict[str, float], list[Path]]:
    """eval/mcmc/<label>/<statistic> metrics and the R̂, autocorrelation and trace PNGs."""
    if cfg.when == "never" or (cfg.when == "final" and not final):
        return {}, []
    traces = method.long_chains(cfg.chains, cfg.length, cfg.init_scale)
    if not traces:
        return {}, []
    from ebm_scale.metrics import mcmc

    metrics: dict[str, float] = {}
    rhats, acfs = {}, {}
    kept = {label: _subset(t.detach().flatten(2).double().cpu()[:, cfg.burn_in:], cfg.max_dims)
            for label, t in traces.items()}
    lags = (1, 10, 100)
    for label, t in kept.items():
        # Each array once: the logged scalars and the pictures are both read off them.
        rhats[label] = mcmc.gelman_rubin(t)
        acfs[label] = mcmc.autocorrelation(t, min(max(cfg.max_lag, *lags), t.shape[1] - 1))
        summary = mcmc.summarize(t.shape, rhats[label], mcmc.effective_sample_size(t), acfs[label], lags)
        metrics.update({f"eval/mcmc/{label}/{k}": v for k, v in summary.items()})
        acfs[label] = acfs[label][:, :cfg.max_lag + 1]
    if out_dir is None or not plots:
        return metrics, []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [mcmc.plot_rhat(rhats, out / f"mcmc_rhat_{step:06d}.png"),
             mcmc.plot_autocorrelation(acfs, out / f"mcmc_autocorr_{step:06d}.png")]
    for label, t in traces.items():
        if t.flatten(2).shape[-1] == 2:  # trajectories are only drawable for 2D data
            paths.append(mcmc.plot_traces(t.detach().cpu(), out / f"mcmc_traces_{label}_{step:06d}.png"))
    return metrics, [Path(p) for p in paths]


def _subset(traces: torch.Tensor, max_dims: int) -> torch.Tensor:
    """The same coordinates for every label and every evaluation (fixed seed), so numbers stay comparable."""
    dims = traces.shape[-1]
    if dims <= max_dims:
        return traces
    keep = torch.randperm(dims, generator=torch.Generator().manual_seed(0))[:max_dims].sort().values
    return traces[..., keep]
