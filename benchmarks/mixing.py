"""Mixing of a trained MCMC model's chains: R̂, ESS and autocorrelation of its long runs, at several start
dispersions, from a trial's checkpoint (paper 002's contrast: NT-EBM's latent-space HMC vs data-space HMC).

    uv run python benchmarks/mixing.py <checkpoint dir> [--scales 1 2] [--chains 32 --length 1000 --burn-in 200]

The checkpoint dir is a trial's `checkpoint_*` folder (its path is the trial run's `ebm_scale.checkpoint` tag
in MLflow). Why several dispersions: Gelman–Rubin's R̂ assumes over-dispersed starts; chains started from a
distribution that already matches the target give R̂ ≈ 1 even when none of them ever leaves its mode, so
ESS and autocorrelation are the sharper contrast at scale 1.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--chains", type=int, default=32)
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--burn-in", type=int, default=200)
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: a temp folder, printed)")
    args = ap.parse_args()

    state = load_state(args.checkpoint)
    cfg = from_dictconfig(state["config"])
    if backbone_kind(cfg):
        cfg.method.backbone = resolve_backbone(cfg.method.backbone, cfg.tracking.resolved_uri())
    torch.manual_seed(cfg.seed)
    method = build_method(cfg.method, load_dataset(cfg.data, cfg.seed).spec, "cpu")
    method.load_state_dict(state["method"])
    method.train(False)
    out = args.out or tempfile.mkdtemp(prefix="ebm_scale_mixing_")
    print(f"{cfg.method.name} on {cfg.data.name}, step {state['step']}: {args.chains} chains × {args.length} "
          f"transitions, burn-in {args.burn_in}")
    for scale in args.scales:
        mcmc = McmcEvalConfig(chains=args.chains, length=args.length, burn_in=args.burn_in, init_scale=scale)
        metrics, plots = evaluate_chains(method, mcmc, f"{out}/scale_{scale:g}", state["step"], final=True)
        for label in sorted({k.split("/")[2] for k in metrics}):
            m = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith(f"eval/mcmc/{label}/")}
            lags = "  ".join(f"ρ({k.removeprefix('autocorr_lag')}) {m[k]:.3f}" for k in sorted(m) if k.startswith("autocorr"))
            print(f"  starts ×{scale:g}  {label:>12s}: R̂ mean {m['rhat_mean']:.3f} (max {m['rhat_max']:.3f})  "
                  f"ESS {m['ess_mean']:.0f} of {args.chains * (args.length - args.burn_in)}  {lags}")
    print(f"pictures: {out}")


if __name__ == "__main__":
    main()
