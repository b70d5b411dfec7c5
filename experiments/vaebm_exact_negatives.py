"""What VAEBM's energy reaches when its negatives are (nearly) exact samples of the model: a diagnostic that
separates "the energy cannot represent the correction" from "the sampler cannot follow the energy".

    uv run python experiments/vaebm_exact_negatives.py 3000 vaebm_toy method.backbone=<vae backbone.pt> \
        [--every 500] [--pool 8192] [--out DIR]

Each iteration draws `--pool` fresh VAE samples x = T(ε), weights them by exp(−E(x)) and resamples a batch:
sampling-importance-resampling from h ∝ p_vae·exp(−E), exact as the pool grows (the effective pool size is
printed; it falls as E sharpens). The energy is then updated by the method's own `energy_step`, so loss,
regularizers and optimizer are those of the config. Evaluation is the usual one — including `sample(n)`,
which runs the config's chains on this energy: their Sinkhorn shows whether that sampler can follow it.
Possible only where the VAE's own samples cover the target, i.e. on 2D toy data; single-threaded, seed 0.
"""

from __future__ import annotations

import tempfile
import time

import torch

from ebm_scale.config import compose
from ebm_scale.data import load_dataset
from ebm_scale.experiments import curve_arguments
from ebm_scale.methods import build_method
from ebm_scale.metrics.toy import evaluate_toy


def main() -> None:
    ap = curve_arguments(__doc__, every=500)
    ap.add_argument("--pool", type=int, default=8192, help="VAE samples per iteration to resample from")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = compose(args.sweep, args.overrides)
    if cfg.method.name != "vaebm":
        raise SystemExit(f"{args.sweep} is a {cfg.method.name} config; this diagnostic is for vaebm")
    out = args.out or tempfile.mkdtemp(prefix="ebm_scale_vaebm_sir_")
    data = load_dataset(cfg.data, 0)
    method = build_method(cfg.method, data.spec, "cpu")
    batches = torch.Generator().manual_seed(0)
    started = time.time()
    for step in range(1, args.iterations + 1):
        method.train(True)
        x_pos = data.train[torch.randint(len(data.train), (cfg.train.batch_size,), generator=batches)]
        with torch.no_grad():
            pool = method.to_data(torch.randn(args.pool, method.space.dim))
            weights = torch.softmax(-method.energy(pool), dim=0)
            x_neg = pool[torch.multinomial(weights, len(x_pos), replacement=True)]
        out_step = method.energy_step(x_pos, x_neg)
        if step % 100 == 0:
            print(
                f"{step}: energy gap {float(out_step['energy_gap']):.3f}, effective pool "
                f"{float(1 / weights.square().sum()):.0f} / {args.pool}, {time.time() - started:.0f}s",
                flush=True,
            )
        if step % args.every == 0 or step == args.iterations:
            method.train(False)
            metrics, _ = evaluate_toy(method, data, cfg.eval, out, step)
            print(
                step,
                {k: round(v, 3) for k, v in metrics.items() if "test_ll" in k or k.startswith("eval/sinkhorn")},
                flush=True,
            )
    print(f"pictures: {out}")


if __name__ == "__main__":
    main()
