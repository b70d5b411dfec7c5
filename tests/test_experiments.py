"""The experiments' in-process runs (ebm_scale.experiments, the engine's loop): saved states let a long 2D
run be continued — under changed settings, or unchanged, when it must reproduce the uninterrupted run
exactly — and a training-time budget ends a run at the step it is spent."""

from __future__ import annotations

import pytest
import torch

from ebm_scale.config import compose
from ebm_scale.experiments import load_state_file, train_in_process

SMALL_EVAL = [
    "train.batch_size=32",
    "eval.n_samples=64",
    "eval.grid_size=40",
    "eval.plots=false",
    "eval.mcmc.when=never",
]
SMALL_NETS = {
    "ddaebm_toy": ["method.energy.hidden=16", "method.generator.hidden=16", "method.encoder.hidden=16"],
    "diffebm_toy": ["method.energy.hidden=16", "method.control.hidden=16", "method.sde.steps=10"],
}


def _weights(path) -> dict:
    return load_state_file(path)["method"]["networks"]


@pytest.mark.parametrize("sweep", sorted(SMALL_NETS))
def test_resumed_run_is_the_uninterrupted_one(tmp_path, sweep):
    cfg = compose(sweep, SMALL_NETS[sweep] + SMALL_EVAL, single_run=True)
    whole = train_in_process(cfg, tmp_path / "whole", iterations=6, every=3, save_states=True)
    states = sorted((tmp_path / "whole" / "states").glob("step_*.pt"))
    assert [p.name for p in states] == ["step_000003.pt", "step_000006.pt"]

    resumed = train_in_process(
        cfg, tmp_path / "resumed", iterations=6, every=3, save_states=True, resume=load_state_file(states[0])
    )
    assert resumed["iterations"] == 6
    for key in ("eval/sinkhorn", "eval/test_ll/ebm"):
        assert resumed[key] == whole[key]
    end_whole, end_resumed = _weights(states[1]), _weights(tmp_path / "resumed" / "states" / "step_000006.pt")
    # Evaluating only at the end trains the same weights: evaluation draws from its own RNG streams.
    train_in_process(cfg, tmp_path / "once", iterations=6, every=6, save_states=True)
    end_once = _weights(tmp_path / "once" / "states" / "step_000006.pt")
    for name, weights in end_whole.items():
        for key, value in weights.items():
            assert torch.equal(value, end_resumed[name][key]), f"{name}.{key} differs after resuming"
            assert torch.equal(value, end_once[name][key]), f"{name}.{key} depends on the evaluations"


def test_a_budget_ends_the_run_where_it_is_spent_and_evaluates_there(tmp_path):
    cfg = compose("quickstart", ["method.energy.hidden=16", "method.sampler.steps=3"] + SMALL_EVAL, single_run=True)
    ticks = iter(range(10**6))  # a clock that advances one "second" per reading
    seen: list[int] = []
    result = train_in_process(
        cfg,
        tmp_path,
        done=lambda step, trained: trained >= 7,
        clock=lambda: next(ticks),
        on_eval=lambda step, metrics: seen.append(step),
    )
    # One reading when training starts, one per step: the budget of 7 is spent at step 7, evaluated there.
    assert result["iterations"] == 7 and result["train_seconds"] == 7 and seen == [7]
    assert result["eval/sinkhorn"] > 0
