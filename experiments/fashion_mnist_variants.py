"""Paper 000's image comparison on the real Fashion-MNIST at one CPU budget: noisy Langevin vs noise-free
dynamics vs noise-free + the self-adversarial generator loss (the paper's Table 1: FID 61.7 > 50.1 > 40.6).

    uv run python experiments/fashion_mnist_variants.py --root /usr/share/datasets/fashion-mnist   # train + summarise
    uv run python experiments/fashion_mnist_variants.py --summarise-only --tracking sqlite:////tmp/fm/mlflow.db

Each variant is one `ebm-scale train mle_fashion_mnist …` run (the product's own path, recorded in MLflow),
the three side by side; FID (Inception, `eval.fid.n_samples` model samples against `n_reference` training
images) at every evaluation. The summary reads MLflow back: a markdown table of FID per evaluation, a figure
of FID and energy gap over training, and each run's last sample grid, written to --out.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VARIANTS = {  # name → the overrides that make it (paper 000: σ = 0.1 noisy, 0 noise-free; λ_gen = 1 with the loss)
    "noisy": ["method.sampler.noise_scale=0.1", "method.loss.generator_weight=0"],
    "noise_free": ["method.sampler.noise_scale=0.0", "method.loss.generator_weight=0"],
    "generator": ["method.sampler.noise_scale=0.0", "method.loss.generator_weight=1"],
}
PAPER_FID = {"noisy": 61.7, "noise_free": 50.1, "generator": 40.6}

# The CPU budget: the paper's 32×32 inputs, Langevin η = 0.1, Adam 5e-4; a narrower net (nf 16 for 32), half the
# chain (K 20 for 40), half the batch and 400 of its 8000 iterations, so all three fit in an hour on 2 cores.
BUDGET = [
    "scaling=local",
    "train.device=cpu",
    "train.precision=fp32",  # CPU bf16 autocast is slower than fp32 on this machine
    "train.channels_last=false",
    "train.threads=1",
    "data.num_workers=0",
    "method.energy.channels=16",
    "method.sampler.steps=20",
    "train.batch_size=32",
    "train.log_every=20",
    "train.iterations=400",
    "train.eval_every=200",
    "eval.fid.n_samples=300",
    "eval.fid.n_reference=1000",
    "eval.fid.batch_size=50",
    "eval.ood.n_images=500",
    "eval.grid_samples=64",
]


def train_all(root: str, workdir: Path) -> None:
    """The three runs at once (one thread each), into workdir/mlflow.db."""
    procs = []
    for name, overrides in VARIANTS.items():
        cmd = ["ebm-scale", "train", "mle_fashion_mnist", f"data.root={root}", *BUDGET, f"name=fm_{name}", *overrides]
        log = open(workdir / f"{name}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT))
        print("started:", " ".join(cmd), flush=True)
    if any(p.wait() for p in procs):
        sys.exit("a run failed: see its log in " + str(workdir))


def summarise(uri: str, out: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax_fid, ax_gap) = plt.subplots(1, 2, figsize=(10, 3.6))
    rows = []
    for name in VARIANTS:
        experiment = client.get_experiment_by_name(f"fm_{name}")
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
        run = runs[0]
        fid = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/fid"))
        gap = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/energy_gap"))
        ax_fid.plot(*zip(*fid), marker="o", label=name)
        ax_gap.plot(*zip(*gap), label=name)
        sec = run.data.metrics.get("train/sec_per_iter", float("nan"))
        rows.append(
            f"| {name} | {' / '.join(f'{v:.1f} (step {s})' for s, v in fid)} | {PAPER_FID[name]} | "
            f"{run.data.metrics.get('eval/auroc/ebm/flip', float('nan')):.3f} | {sec:.2f} | {run.info.run_id[:8]} |"
        )
        grids = sorted(p for p in _artifacts(client, run.info.run_id, "plots") if "samples_" in p)
        if grids:
            with tempfile.TemporaryDirectory() as tmp:
                local = client.download_artifacts(run.info.run_id, grids[-1], tmp)
                shutil.copy(local, out / f"{name}_{Path(grids[-1]).name}")
    ax_fid.set(xlabel="iteration", ylabel="FID (300 samples vs 1000 training images)", title="FID")
    ax_gap.set(xlabel="iteration", ylabel="mean E(data) − mean E(negatives)", title="energy gap (symlog)")
    ax_gap.set_yscale("symlog")  # a diverging run's gap is orders of magnitude beyond a stable one's
    for ax in (ax_fid, ax_gap):
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fid_and_energy_gap.png", dpi=110)
    print("| variant | FID at each evaluation | paper 000 (8000 it., 50k samples) | AUROC vs flipped | s/iter | run |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


def _artifacts(client, run_id: str, path: str) -> list[str]:
    return [f.path for f in client.list_artifacts(run_id, path)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="data.root of Fashion-MNIST")
    parser.add_argument("--workdir", default="fashion_mnist_variants", help="where the runs write mlflow.db")
    parser.add_argument("--tracking", help="MLflow URI to summarise (default: <workdir>/mlflow.db)")
    parser.add_argument("--out", default="docs/results/fashion_mnist", help="where the table's pictures go")
    parser.add_argument("--summarise-only", action="store_true", help="read finished runs, train nothing")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    if not args.summarise_only:
        workdir.mkdir(parents=True, exist_ok=True)
        train_all(args.root, workdir)
    summarise(args.tracking or f"sqlite:///{workdir}/mlflow.db", Path(args.out))


if __name__ == "__main__":
    main()
