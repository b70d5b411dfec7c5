"""Engine pieces without a Ray cluster: exact resume through the loop's checkpoints, outcome rules, and
Optuna being told the truth about early-stopped trials (real OptunaSearch, real Optuna study)."""

import math

import pytest
import torch
from optuna.trial import TrialState

from ebm_scale.config import compose
from ebm_scale.engine.loop import MetricAccumulator, train
from ebm_scale.engine.state import load_state
from ebm_scale.engine.sweep import _prune_aware_optuna, trial_outcome, tune_search_space

TINY = [
    "method.energy.hidden=16",
    "method.energy.layers=3",
    "method.sampler.steps=3",
    "train.batch_size=32",
    "train.log_every=5",
    "eval.n_samples=50",
    "eval.grid_size=16",
    "eval.plots=false",
    "search.scheduler.kind=fifo",
    "method.sampler.init=buffer",
    "method.sampler.noise_scale=0.1",
]


class MemorySession:
    """Keeps the checkpoints the loop reports (the loop deletes its temp folder after reporting)."""

    rank, world_size, local_rank, tracker = 0, 1, 0, None

    def __init__(self, restore_from=None):
        self.checkpoints, self.metrics, self._restore = {}, [], restore_from

    def report(self, metrics, checkpoint_dir):
        self.metrics.append(dict(metrics))
        if checkpoint_dir:
            self.checkpoints[metrics["step"]] = load_state(checkpoint_dir)

    def restore(self):
        return self._restore


def test_resumed_run_continues_exactly():
    cfg = compose(None, TINY + ["train.iterations=20", "train.eval_every=10"])
    straight = MemorySession()
    train(cfg, straight)
    resumed = MemorySession(restore_from=straight.checkpoints[10])
    summary = train(cfg, resumed)
    assert summary.step == 20 and [m["step"] for m in resumed.metrics] == [20]
    a = straight.checkpoints[20]["method"]
    b = resumed.checkpoints[20]["method"]
    for name, tensor in a["networks"]["energy"].items():
        assert torch.equal(tensor, b["networks"]["energy"][name]), name
    buffer_a, buffer_b = a["extra"]["chain_init"], b["extra"]["chain_init"]
    assert buffer_a["position"] == buffer_b["position"] and torch.equal(buffer_a["samples"], buffer_b["samples"])
    assert straight.metrics[-1]["eval/sinkhorn"] == resumed.metrics[-1]["eval/sinkhorn"]


def test_how_often_a_run_evaluates_does_not_change_its_training():
    """Evaluation draws samples and chains from its own RNG streams, so the weights after 20 steps are the
    same whether the run evaluated at 5, 10, 15 and 20 or at 20 only — and so is the step-20 evaluation."""
    ends = []
    for every in (5, 20):
        session = MemorySession()
        train(compose(None, TINY + ["train.iterations=20", f"train.eval_every={every}"]), session)
        ends.append((session.checkpoints[20]["method"]["networks"]["energy"], session.metrics[-1]))
    (often, often_eval), (once, once_eval) = ends
    for name, tensor in often.items():
        assert torch.equal(tensor, once[name]), name
    assert often_eval["eval/sinkhorn"] == once_eval["eval/sinkhorn"]


def test_nan_in_the_weights_ends_the_run_as_diverged():
    cfg = compose(None, TINY + ["train.iterations=20", "train.eval_every=10", "debug.nan_at_step=12"])
    session = MemorySession()
    summary = train(cfg, session)
    assert summary.diverged and summary.step == 15  # detected at the next log point, not later
    assert session.metrics[-1]["diverged"] == 1 and math.isinf(session.metrics[-1]["eval/sinkhorn"])
    assert set(session.checkpoints) == {10}  # the last good checkpoint is the one kept


def test_one_non_finite_metric_ends_the_run_as_diverged(monkeypatch):
    """Divergence is any metric going non-finite, not all of them at once: here only energy/neg turns NaN
    from step 12 on while the loss stays finite."""
    from ebm_scale.engine import loop

    build = loop.build_method

    def build_with_one_nan_metric(*args, **kwargs):
        method = build(*args, **kwargs)
        step, calls = method.train_step, []

        def train_step(batch):
            calls.append(1)
            out = step(batch)
            return {**out, "energy/neg": torch.tensor(float("nan"))} if len(calls) >= 12 else out

        method.train_step = train_step
        return method

    monkeypatch.setattr(loop, "build_method", build_with_one_nan_metric)
    session = MemorySession()
    summary = train(compose(None, TINY + ["train.iterations=20", "train.eval_every=10"]), session)
    assert summary.diverged and summary.step == 15
    assert math.isnan(summary.metrics["train/energy/neg"]) and math.isfinite(summary.metrics["train/loss"])
    assert session.metrics[-1]["diverged"] == 1 and set(session.checkpoints) == {10}


def test_metric_accumulator_averages_per_key_and_refuses_attached_tensors():
    acc = MetricAccumulator()
    acc.add({"loss": torch.tensor(1.0), "gap": torch.tensor(2.0)})
    acc.add({"loss": torch.tensor(3.0)})  # a key may be missing on some steps (a method's optional term)
    assert acc.count == 2
    assert acc.pop() == {"loss": 2.0, "gap": 2.0}
    assert acc.count == 0 and acc.pop() == {}
    with pytest.raises(ValueError, match="detached.*loss"):
        acc.add({"loss": torch.ones((), requires_grad=True) * 2})


def test_trial_outcome_rules():
    assert trial_outcome({"step": 300}, 300, error=False) == "finished"
    assert trial_outcome({"step": 50}, 300, error=False) == "pruned"
    assert trial_outcome({"step": 20, "diverged": 1}, 300, error=False) == "diverged"
    assert trial_outcome({"step": 300}, 300, error=True) == "failed"
    assert trial_outcome(None, 300, error=False) == "pruned"


def test_optuna_records_early_stopped_trials_as_pruned():
    cfg = compose("quickstart")
    searcher = _prune_aware_optuna(cfg)
    assert searcher.set_search_properties(cfg.search.metric, cfg.search.mode, tune_search_space(cfg.search.space))
    metric, full = cfg.search.metric, cfg.train.iterations
    for trial_id in ("stopped", "full", "diverged"):
        assert searcher.suggest(trial_id) is not None
    searcher.on_trial_result("stopped", {metric: 2.5, "training_iteration": 1, "step": 50})
    searcher.on_trial_complete("stopped", {metric: 2.5, "training_iteration": 1, "step": 50})
    for i, step in enumerate(range(50, full + 1, 50), start=1):
        searcher.on_trial_result("full", {metric: 1.0 / i, "training_iteration": i, "step": step})
    searcher.on_trial_complete("full", {metric: 1.0 / i, "training_iteration": i, "step": full})
    searcher.on_trial_complete("diverged", {metric: math.inf, "step": 20, "diverged": 1})
    states = {t.number: t.state for t in searcher._ot_study.trials}
    assert states == {0: TrialState.PRUNED, 1: TrialState.COMPLETE, 2: TrialState.FAIL}
    pruned = searcher._ot_study.trials[0]
    assert pruned.intermediate_values == {1: 2.5} and pruned.user_attrs["outcome"] == "pruned"


def test_progress_lines_are_printed_per_evaluation_at_most_every_interval():
    from types import SimpleNamespace

    from ebm_scale.engine.sweep import TrialOutcomes

    for every, expected in ((0.0, 2), (3600.0, 0)):
        lines: list[str] = []
        outcomes = TrialOutcomes(None, "eval/sinkhorn", 30, lines.append, progress_every_s=every)
        trial = SimpleNamespace(trial_id="abc", config={})
        outcomes.on_trial_start(0, [], trial)
        for step in (10, 20, 30):  # the last report is the final one: on_trial_complete prints it
            outcomes.on_trial_result(0, [], trial, {"step": step, "eval/sinkhorn": 0.5})
        progress = [line for line in lines if " eval " in line]
        assert len(progress) == expected
        if expected:
            assert "step 10/30" in progress[0] and "eval/sinkhorn=0.5" in progress[0]


def test_the_loop_beats_between_evaluations_only_for_a_session_that_asks():
    cfg = compose(None, TINY + ["train.iterations=12", "train.eval_every=6"])

    class Beating(MemorySession):
        heartbeat_s = 0.0  # every step

        def __init__(self):
            super().__init__()
            self.beats = []

        def heartbeat(self, step, iters_per_s):
            self.beats.append(step)
            assert iters_per_s > 0

    session = Beating()
    train(cfg, session)
    assert session.beats == list(range(1, 13))
    train(cfg, MemorySession())  # no heartbeat attribute: the loop does not ask for one


def test_a_gpu_run_on_a_cluster_without_gpus_names_use_gpu():
    from ebm_scale.engine.sweep import max_concurrent_trials
    from ebm_scale.errors import ConfigError

    gpu = compose("quickstart", ["scaling=gpu"])  # short of CPUs too: the GPU is what to change
    with pytest.raises(ConfigError) as err:
        max_concurrent_trials(gpu, {"CPU": 2.0})
    assert err.value.key == "scaling.use_gpu"


def test_the_sweep_logs_only_what_describes_the_model_as_best_metrics():
    from ebm_scale.engine.sweep import _describes_the_model

    tune_result = {
        "eval/sinkhorn": 0.2,
        "train/loss": 1.0,
        "step": 300,
        "pid": 123,
        "time_since_restore": 4.0,
        "timestamp": 1.7e9,
        "training_iteration": 6,
        "node_ip": "10.0.0.1",
        "done": True,
    }
    assert {k for k, v in tune_result.items() if _describes_the_model(k, v)} == {"eval/sinkhorn", "train/loss", "step"}
