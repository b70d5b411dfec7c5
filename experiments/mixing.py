"""Mixing of a trained MCMC model's chains: R̂, ESS and autocorrelation of its long runs, at several start
dispersions, from a trial's checkpoint (paper 002's contrast: NT-EBM's latent-space HMC vs data-space HMC).

    uv run python experiments/mixing.py <checkpoint dir> [--scales 1 2] [--chains 32 --length 1000 --burn-in 200]
                                       [--reference]

The checkpoint dir is a trial's `checkpoint_*` folder (its path is the trial run's `ebm_scale.checkpoint` tag
in MLflow). Why several dispersions: Gelman–Rubin's R̂ assumes over-dispersed starts; chains started from a
distribution that already matches the target give R̂ ≈ 1 even when none of them ever leaves its mode, so
ESS and autocorrelation are the sharper contrast at scale 1.

--reference (datasets with an exact density, HMC methods): the same data-space HMC — leapfrog steps, initial
step size, adaptation — run on the dataset's *true* log-density from the same kind of starts, labelled
"true_density". It says how well data-space HMC can mix on this data at this chain length at all, which a
learned model's figure should be read against.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from ebm_scale.config import from_dictconfig
from ebm_scale.data import load_dataset
from ebm_scale.engine.backbones import backbone_kind, resolve_backbone
from ebm_scale.engine.state import load_state
from ebm_scale.methods import build_method
from ebm_scale.metrics.chains import McmcEvalConfig, evaluate_chains


class TrueDensityHmc:
    """A stand-in "method" whose long chains are a trained HMC method's data-space sampler run on the exact
    data density instead of the model (same settings; starts drawn as the method's data-space chains are)."""

    def __init__(self, method, log_prob):
        self.method, self.log_prob = method, log_prob

    def long_chains(self, chains: int, length: int, init_scale: float = 1.0) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            start = self.method.flow(init_scale * torch.randn(chains, *self.method.spec.shape))
        states: list[torch.Tensor] = []
        self.method.hmc(
            lambda x: -self.log_prob(x),
            start,
            length,
            self.method.cfg.sampler.step_size,
            callback=lambda info: states.append(info["x"]),
        )
        return {"true_density": torch.stack(states, dim=1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--chains", type=int, default=32)
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--burn-in", type=int, default=200)
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: a temp folder, printed)")
    ap.add_argument(
        "--reference",
        action="store_true",
        help="also run the data-space HMC on the dataset's exact density (see above)",
    )
    args = ap.parse_args()

    state = load_state(args.checkpoint)
    cfg = from_dictconfig(state["config"])
    if backbone_kind(cfg):
        cfg.method.backbone = resolve_backbone(cfg.method.backbone, cfg.tracking.resolved_uri())
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, cfg.seed)
    method = build_method(cfg.method, data.spec, "cpu")
    method.load_state_dict(state["method"])
    method.train(False)
    out = args.out or tempfile.mkdtemp(prefix="ebm_scale_mixing_")
    print(
        f"{cfg.method.name} on {cfg.data.name}, step {state['step']}: {args.chains} chains × {args.length} "
        f"transitions, burn-in {args.burn_in}"
    )
    if args.reference and (data.log_prob is None or not hasattr(method, "hmc")):
        raise SystemExit(
            f"--reference needs an HMC method on a flow (nt_ebm) and data with an exact density; "
            f"got {cfg.method.name} on {cfg.data.name}"
        )
    for scale in args.scales:
        mcmc = McmcEvalConfig(chains=args.chains, length=args.length, burn_in=args.burn_in, init_scale=scale)
        metrics, plots = evaluate_chains(method, mcmc, f"{out}/scale_{scale:g}", state["step"], final=True)
        if args.reference:
            reference, _ = evaluate_chains(
                TrueDensityHmc(method, data.log_prob),
                mcmc,
                f"{out}/scale_{scale:g}/reference",
                state["step"],
                final=True,
            )
            metrics.update(reference)
        for label in sorted({k.split("/")[2] for k in metrics}):
            m = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith(f"eval/mcmc/{label}/")}
            lags = "  ".join(
                f"ρ({k.removeprefix('autocorr_lag')}) {m[k]:.3f}" for k in sorted(m) if k.startswith("autocorr")
            )
            print(
                f"  starts ×{scale:g}  {label:>12s}: R̂ mean {m['rhat_mean']:.3f} (max {m['rhat_max']:.3f})  "
                f"ESS {m['ess_mean']:.0f} of {args.chains * (args.length - args.burn_in)}  {lags}"
            )
    print(f"pictures: {out}")


if __name__ == "__main__":
    main()
