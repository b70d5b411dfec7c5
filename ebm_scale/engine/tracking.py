"""MLflow: one experiment per sweep, a parent run for the sweep, one nested run per trial.

Only the driver process of a trial creates or finds its run (idempotently, by the Tune trial id, so a
retried or resumed trial never gets a second run); rank 0 of that trial logs into it; the sweep process
sets its final status. Metric writes are batched per log interval and asynchronous (MLflow's own async
logging), so a SQLite write (docs/performance.md) never sits on the training step.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

TRIAL_TAG = "ebm_scale.trial_id"
SWEEP_TAG = "ebm_scale.sweep_path"
OUTCOME_TAG = "ebm_scale.outcome"
KIND_TAG = "ebm_scale.run_kind"
BACKBONE_TAG = "ebm_scale.backbone"  # the backbone reference a two-stage sweep and its trials stand on

# What happened to a trial → MLflow's run status (MLflow has no 'pruned'/'diverged': the tag says which).
OUTCOME_STATUS = {"finished": "FINISHED", "pruned": "KILLED", "diverged": "FAILED", "failed": "FAILED"}

_MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # a concurrent creator won the race
        return client.get_experiment_by_name(name).experiment_id


def _find_run(uri: str, experiment_id: str, tag: str, value: str):
    runs = _client(uri).search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1)
    return runs[0] if runs else None


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    client = _client(uri)
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + _MAX_PARAMS_PER_BATCH])


def start_sweep_run(uri: str, experiment: str, sweep_path: str, run_name: str, tags: dict[str, str]) -> tuple[str, str]:
    """The sweep's parent run (found again on --resume by the sweep's storage path)."""
    experiment_id = ensure_experiment(uri, experiment)
    existing = _find_run(uri, experiment_id, SWEEP_TAG, sweep_path)
    if existing is not None:
        _client(uri).update_run(existing.info.run_id, status="RUNNING")
        return experiment_id, existing.info.run_id
    run = _client(uri).create_run(experiment_id, run_name=run_name,
                                  tags={SWEEP_TAG: sweep_path, KIND_TAG: "sweep", **tags})
    return experiment_id, run.info.run_id


def open_trial_run(uri: str, experiment_id: str, parent_run_id: str, trial_id: str, trial_name: str,
                   params: dict[str, Any]) -> str:
    """Create the trial's nested run, or find it again when the trial is retried or the sweep resumed."""
    existing = _find_run(uri, experiment_id, TRIAL_TAG, trial_id)
    if existing is not None:
        _client(uri).update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    run = _client(uri).create_run(experiment_id, run_name=trial_name, tags={
        "mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id, KIND_TAG: "trial", OUTCOME_TAG: "running"})
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


def find_trial_run(uri: str, experiment_id: str, trial_id: str) -> str | None:
    run = _find_run(uri, experiment_id, TRIAL_TAG, trial_id)
    return run.info.run_id if run else None


def end_run(uri: str, run_id: str, outcome: str, extra_tags: dict[str, str] | None = None) -> None:
    client = _client(uri)
    client.set_tag(run_id, OUTCOME_TAG, outcome)
    for k, v in (extra_tags or {}).items():
        client.set_tag(run_id, k, v)
    client.set_terminated(run_id, status=OUTCOME_STATUS[outcome])


class MlflowTracker:
    """Rank 0's logger for one trial run. Metrics go through MLflow's async queue, one batch per call."""

    def __init__(self, uri: str, run_id: str, async_logging: bool = True):
        self.uri, self.run_id, self.synchronous = uri, run_id, not async_logging
        self.client = _client(uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=self.synchronous)

    def log_artifacts(self, paths: list, artifact_path: str) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def flush(self) -> None:
        """Wait until every batch logged so far is in the store. mlflow.flush_async_logging() would not do:
        it flushes the queue of the default tracking URI's store, and this run's batches queue in the store
        behind its own client (MLflow keeps one store, and one queue, per URI)."""
        self.client._tracking_client.store.flush_async_logging()


def provenance_tags() -> dict[str, str]:
    """Git commit and library versions, so a run can be traced to the code that produced it."""
    import ray
    import torch

    tags = {"ray_version": ray.__version__, "torch_version": torch.__version__}
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            tags["git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags
