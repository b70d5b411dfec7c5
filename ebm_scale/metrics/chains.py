"""Long-run MCMC diagnostics of a method's own sampler, at evaluation (docs/methods/nt_ebm.md, "Diagnostics").

A method that runs Markov chains exposes `long_chains(m, length)` → {label: (m, length, dim) data-space
traces}; this runs them, reduces each label's traces to R̂ / ESS / autocorrelation (metrics.mcmc) and draws
the pictures. Labels let one method contrast samplers on the same model (NT-EBM: "latent" vs "data").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ebm_scale.schema import Config, Rule, knob

WHEN = ("final", "every", "never")


@dataclass
class McmcEvalConfig(Config):
    PREFIX = "eval.mcmc"

    chains: int = knob(64, ge=2, note="R̂ compares chains")  # m (paper 002: 64)
    length: int = knob(2000, ge=2)  # transitions per chain (paper 002: 2000)
    burn_in: int = knob(400, ge=0)  # dropped before R̂ / ESS / autocorrelation (paper 002: 400); <= length - 2
    max_lag: int = knob(200, ge=1)  # autocorrelation curve length
    # coordinates analysed (a fixed random subset beyond this: ESS on 3072-D traces takes minutes)
    max_dims: int = knob(64, ge=1)
    # final (last evaluation only: long chains are expensive) | every | never
    when: str = knob("final", choices=WHEN, noun="setting")
    # Chains start from the method's own initial distribution with its noise scaled by this. R̂ assumes
    # over-dispersed starts (Gelman & Rubin 1992; paper 002 A.6): from a start that already matches the
    # target, chains that never leave their mode still give R̂ ≈ 1. 1 = the method's usual start.
    init_scale: float = knob(1.0, gt=0)

    def rules(self):
        yield Rule(
            "burn_in",
            self.burn_in <= self.length - 2,
            f"must be in [0, length - 2] = [0, {self.length - 2}], got {self.burn_in}",
        )


def evaluate_chains(
    method, cfg: McmcEvalConfig, out_dir: Path | str | None, step: int, final: bool, plots: bool = True
) -> tuple[dict[str, float], list[Path]]:
    """eval/mcmc/<label>/<statistic> metrics and the R̂, autocorrelation and trace PNGs."""
    if cfg.when == "never" or (cfg.when == "final" and not final):
        return {}, []
    traces = method.long_chains(cfg.chains, cfg.length, cfg.init_scale)
    if not traces:
        return {}, []
    from ebm_scale.metrics import mcmc

    metrics: dict[str, float] = {}
    rhats, acfs = {}, {}
    kept = {
        label: _subset(t.detach().flatten(2).double().cpu()[:, cfg.burn_in :], cfg.max_dims)
        for label, t in traces.items()
    }
    lags = (1, 10, 100)
    for label, t in kept.items():
        # Each array once: the logged scalars and the pictures are both read off them.
        rhats[label] = mcmc.gelman_rubin(t)
        acfs[label] = mcmc.autocorrelation(t, min(max(cfg.max_lag, *lags), t.shape[1] - 1))
        summary = mcmc.summarize(t.shape, rhats[label], mcmc.effective_sample_size(t), acfs[label], lags)
        metrics.update({f"eval/mcmc/{label}/{k}": v for k, v in summary.items()})
        acfs[label] = acfs[label][:, : cfg.max_lag + 1]
    if out_dir is None or not plots:
        return metrics, []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        mcmc.plot_rhat(rhats, out / f"mcmc_rhat_{step:06d}.png"),
        mcmc.plot_autocorrelation(acfs, out / f"mcmc_autocorr_{step:06d}.png"),
    ]
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
