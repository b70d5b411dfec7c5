"""The engine's policy for skipped optimizer steps (engine/skips.py), and the shared step that skips them."""

from __future__ import annotations

import torch

from ebm_scale.engine.skips import SkippedSteps
from ebm_scale.methods.base import DataSpec, Method


class TwoOptimizers(Method):
    """A stand-in method with the skip flag and two optimizers."""

    name, config_class, skip_nonfinite = "two", object, True

    def __init__(self):
        super().__init__(None, DataSpec(shape=(1,)), "cpu")
        for k in ("a", "b"):
            self.networks[k] = torch.nn.Linear(1, 1)
            self.optimizers[k] = torch.optim.SGD(self.networks[k].parameters(), lr=0.1)

    def train_step(self, batch):
        losses = {k: self.networks[k](batch).mean() for k in ("a", "b")}
        norms = {k: self.optimizer_step(self.optimizers[k], losses[k]) for k in ("a", "b")}
        return {"loss": losses["a"].detach(), **{f"grad_norm/{k}": v for k, v in norms.items() if v is not None}}

    def sample(self, n):
        return torch.zeros(n, 1)


def test_a_non_finite_loss_is_skipped_and_named():
    method = TwoOptimizers()
    before = [p.detach().clone() for p in method.networks["a"].parameters()]
    method.train_step(torch.ones(4, 1))
    assert method.skipped_steps == [] and not all(
        torch.equal(a, b) for a, b in zip(before, method.networks["a"].parameters())
    )
    out = method.train_step(torch.full((4, 1), float("inf")))
    assert method.skipped_steps == ["a", "b"] and set(out) == {"loss"}


def test_skips_are_counted_filtered_and_end_the_run_when_they_do_not_stop():
    method, skips = TwoOptimizers(), SkippedSteps(limit=3)
    finite = skips.observe(method, method.train_step(torch.ones(4, 1)))
    assert skips.metrics(method) == {"train/skipped/a": 0.0, "train/skipped/b": 0.0}
    assert set(finite) == {"loss", "grad_norm/a", "grad_norm/b"}
    for _ in range(2):  # skipped steps report only their finite values: not divergence yet
        out = skips.observe(method, method.train_step(torch.full((4, 1), float("inf"))))
        assert out == {} and method.skipped_steps == []
    assert skips.metrics(method) == {"train/skipped/a": 2.0, "train/skipped/b": 2.0} and skips.in_a_row == 2
    out = skips.observe(method, method.train_step(torch.full((4, 1), float("inf"))))
    assert not torch.isfinite(out["loss"])  # the third in a row goes through: the loop then ends the run
    skips.observe(method, method.train_step(torch.ones(4, 1)))
    assert skips.in_a_row == 0 and skips.counts == {"a": 3, "b": 3}  # a good step resets the streak only


def test_skip_state_survives_a_checkpoint():
    method, skips = TwoOptimizers(), SkippedSteps(limit=5)
    skips.observe(method, method.train_step(torch.full((4, 1), float("nan"))))
    restored = SkippedSteps(limit=5)
    restored.load_state_dict(skips.state_dict())
    assert restored.counts == {"a": 1, "b": 1} and restored.in_a_row == 1


def test_methods_without_the_flag_never_skip_or_sync():
    method = TwoOptimizers()
    method.skip_nonfinite = False
    method.train_step(torch.full((4, 1), float("inf")))  # steps (into NaN weights) like any plain method
    assert method.skipped_steps == [] and SkippedSteps(3).metrics(method) == {}


class Recorder:
    """A session that keeps what the loop logs and reports."""

    rank, world_size, local_rank = 0, 1, 0

    def __init__(self):
        self.logged, self.reports, self.tracker = [], [], self

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def log_artifacts(self, paths, artifact_path):
        pass

    def report(self, metrics, checkpoint_dir):
        self.reports.append(dict(metrics))

    def restore(self):
        return None


DIFFEBM_TINY = [
    "method=diffebm",
    "method.energy.hidden=8",
    "method.control.hidden=8",
    "method.sde.steps=3",
    "train.batch_size=16",
    "train.log_every=5",
    "train.iterations=20",
    "train.eval_every=10",
    "eval.n_samples=50",
    "eval.grid_size=16",
    "eval.plots=false",
]


def test_the_loop_counts_skips_and_ends_a_run_that_keeps_skipping():
    from ebm_scale.config import compose
    from ebm_scale.engine.loop import train

    session = Recorder()
    summary = train(compose(None, DIFFEBM_TINY + ["debug.nan_at_step=2", "train.max_consecutive_skips=8"]), session)
    # From step 2 every loss is NaN. Steps 2-8 are skipped and report only their finite values, so the log at
    # step 5 is finite (4 skips so far); the 8th skip in a row (step 9) goes through, and the log at step 10
    # ends the run as diverged. Without the policy the run would end at step 5.
    logged = dict(session.logged)
    assert logged[5]["train/skipped/control"] == 4.0 and logged[5]["train/skipped/energy"] == 4.0
    assert summary.diverged and summary.step == 10
    assert session.reports[-1]["diverged"] == 1


def test_a_run_that_stops_skipping_trains_on_and_logs_its_skips():
    from ebm_scale.config import compose
    from ebm_scale.engine.loop import train

    session = Recorder()
    summary = train(compose(None, DIFFEBM_TINY), session)
    assert not summary.diverged and summary.step == 20
    logged = dict(session.logged)
    assert logged[5]["train/skipped/control"] == 0.0 and logged[5]["train/skipped/energy"] == 0.0
