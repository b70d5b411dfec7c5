"""The in-process benchmark loop (benchmarks/train_curve.py), whose saved states let a long 2D run be
continued — under changed settings, or unchanged, when it must reproduce the uninterrupted run exactly."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ebm_scale.config import compose

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from train_curve import train_in_process  # noqa: E402

SMALL_EVAL = ["train.batch_size=32", "eval.n_samples=64", "eval.grid_size=40", "eval.plots=false",
              "eval.mcmc.when=never"]
SMALL_NETS = {"ddaebm_toy": ["method.energy.hidden=16", "method.generator.hidden=16", "method.encoder.hidden=16"],
              "diffebm_toy": ["method.energy.hidden=16", "method.control.hidden=16", "method.sde.steps=10"]}


@pytest.mark.parametrize("sweep", sorted(SMALL_NETS))
def test_resumed_run_is_the_uninterrupted_one(tmp_path, sweep):
    cfg = compose(sweep, SMALL_NETS[sweep] + SMALL_EVAL)
    until = lambda n: (lambda step, _: step >= n)  # noqa: E731
    whole = train_in_process(cfg, 0, tmp_path / "whole", done=until(6), every=3, save_states=True)
    states = sorted((tmp_path / "whole" / "states").glob("step_*.pt"))
    assert [p.name for p in states] == ["step_000003.pt", "step_000006.pt"]

    state = torch.load(states[0], weights_only=False)
    resumed = train_in_process(cfg, 0, tmp_path / "resumed", done=until(6), every=3, save_states=True, resume=state)
    assert resumed["iterations"] == 6
    for key in ("eval/sinkhorn", "eval/test_ll/ebm"):
        assert resumed[key] == whole[key]
    end_whole = torch.load(states[1], weights_only=False)["method"]
    end_resumed = torch.load(tmp_path / "resumed" / "states" / "step_000006.pt", weights_only=False)["method"]
    # Evaluating only at the end trains the same weights: evaluation draws from its own RNG streams.
    train_in_process(cfg, 0, tmp_path / "once", done=until(6), every=6, save_states=True)
    end_once = torch.load(tmp_path / "once" / "states" / "step_000006.pt", weights_only=False)["method"]
    for name, weights in end_whole["networks"].items():
        for key, value in weights.items():
            assert torch.equal(value, end_resumed["networks"][name][key]), f"{name}.{key} differs after resuming"
            assert torch.equal(value, end_once["networks"][name][key]), f"{name}.{key} depends on the evaluations"
