"""MLflow: one experiment per sweep, a parent run for the sweep, one nested run per trial (and one run per
`ebm-scale train`). Everything the engine writes to or reads from MLflow goes through the functions here.

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
from urllib.parse import urlparse

from ebm_scale.engine.outcomes import MLFLOW_STATUS
from ebm_scale.errors import ConfigError

TRIAL_TAG = "ebm_scale.trial_id"
SWEEP_TAG = "ebm_scale.sweep_path"
OUTCOME_TAG = "ebm_scale.outcome"
KIND_TAG = "ebm_scale.run_kind"
BACKBONE_TAG = "ebm_scale.backbone"  # the backbone reference a two-stage sweep and its trials stand on
CHECKPOINT_TAG = "ebm_scale.checkpoint"  # where the run's last checkpoint lies
ERROR_TAG = "ebm_scale.error"  # a failed trial's error, its last line (the whole traceback: artifact error.txt)
NODE_TAG_PREFIX = "ebm_scale.node.rank"  # + rank: "<host> <Ray node id>" of the node that rank ran on
PROGRESS_TAG = "ebm_scale.progress"  # "<step> <iterations/s>", refreshed by a running trial's heartbeat
# MLflow 3's UI reads this tag (its ExperimentKind enum) to tell training experiments from GenAI ones. 3.17's UI
# ignores it behind its GenAI / Model training switch: there only the address (`ui_page`) opens the runs table.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
UI_DEFAULT = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default

_MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call


_OPENED: set[str] = set()  # SQLite stores this process has opened (MLflow caches the store per URI)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:") and uri not in _OPENED:
        return _open_sqlite_store(uri)
    return MlflowClient(tracking_uri=uri)


def _open_sqlite_store(uri: str):
    """The first open of a SQLite store runs MLflow's schema migrations; two processes migrating one fresh file
    at once fail (alembic: "Online migration expected to match one row"). One opener at a time per file: a
    lock file per database (in the machine's temp folder, so every process finds the same one whatever its
    cache setting, and none is left beside the database), held while this process builds its store
    (MlflowClient builds it at once)."""
    import fcntl
    import hashlib
    import os
    import tempfile

    from mlflow.tracking import MlflowClient

    db = Path(urlparse(uri).path).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    locks = Path(tempfile.gettempdir()) / f"ebm_scale-locks-{os.getuid()}"
    locks.mkdir(mode=0o700, exist_ok=True)
    with open(locks / f"mlflow-{hashlib.sha256(str(db).encode()).hexdigest()[:16]}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _OPENED.add(uri)
    return client


def check_reachable(uri: str, timeout_s: float = 3.0, answer_s: float = 30.0) -> None:
    """An http(s) tracking server must answer before anything is launched: a quick connect, one clear line."""
    import socket

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError("tracking.uri", f"no MLflow server answers at {uri} ({err.strerror or err})") from None
    # Something listens: one real API call, without MLflow's retries (minutes of backoff), with the credentials
    # MLflow itself would send (MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN, ~/.mlflow/credentials).
    from mlflow.tracking._tracking_service.utils import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    try:
        response = http_request(
            creds,
            "/api/2.0/mlflow/experiments/search",
            "GET",
            max_retries=0,
            timeout=answer_s,  # a basic-auth server hashes the password per request: seconds on a busy host
            raise_on_status=False,
            params={"max_results": 1},
        )
    except Exception as err:  # noqa: BLE001 - any transport failure is the same answer for the user
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ConfigError("tracking.uri", f"the MLflow server at {uri} did not answer: {first}") from None
    if response.status_code in (401, 403):
        given = creds.username or creds.token
        raise ConfigError(
            "tracking.uri",
            f"the MLflow server at {uri} refused "
            + ("the credentials given" if given else "a request without credentials")
            + f" (HTTP {response.status_code}): export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(or write them to ~/.mlflow/credentials)",
        )
    if response.status_code != 200:
        raise ConfigError(
            "tracking.uri", f"{uri} answers, but not as an MLflow tracking server (HTTP {response.status_code})"
        )


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The experiment (created, or restored when deleted), tagged so MLflow's UI opens on its runs table.
    `artifact_location` applies to a new experiment only (MLflow fixes it at creation)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            experiment_id = client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except Exception:  # a concurrent creator won the race
            exp = client.get_experiment_by_name(name)
    if exp is not None:
        experiment_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag existed
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment_id


def find_experiment(uri: str, name: str) -> str | None:
    exp = _client(uri).get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else None


def create_run(uri: str, experiment_id: str, run_name: str | None = None, tags: dict[str, str] | None = None) -> str:
    return _client(uri).create_run(experiment_id, run_name=run_name, tags=tags or {}).info.run_id


def get_tag(uri: str, run_id: str, key: str) -> str | None:
    return _client(uri).get_run(run_id).data.tags.get(key)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    if tags:
        _client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    if metrics:
        _client(uri).log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def metric_history(uri: str, run_id: str, key: str) -> list:
    return _client(uri).get_metric_history(run_id, key)


def log_artifact(uri: str, run_id: str, path: str, artifact_path: str | None = None) -> None:
    _client(uri).log_artifact(run_id, str(path), artifact_path)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    _client(uri).log_text(run_id, text, artifact_file)


def log_dict(uri: str, run_id: str, data: dict, artifact_file: str) -> None:
    _client(uri).log_dict(run_id, data, artifact_file)


def list_artifacts(uri: str, run_id: str, path: str | None = None) -> list[str]:
    return [f.path for f in _client(uri).list_artifacts(run_id, path)]


def download_artifact(uri: str, run_id: str, artifact_path: str, dst: str) -> str:
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=artifact_path, dst_path=dst, tracking_uri=uri
    )


def running_trials_progress(uri: str, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """Trial id → its last heartbeat (PROGRESS_TAG), for the sweep's running trials: one query."""
    return {
        r.data.tags[TRIAL_TAG]: r.data.tags[PROGRESS_TAG]
        for r in _running_children(uri, experiment_id, parent_run_id)
        if TRIAL_TAG in r.data.tags and PROGRESS_TAG in r.data.tags
    }


def _running_children(uri: str, experiment_id: str, parent_run_id: str) -> list:
    return _client(uri).search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=10000,
    )


def _find_run(uri: str, experiment_id: str, tag: str, value: str):
    runs = _client(uri).search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1)
    return runs[0] if runs else None


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    client = _client(uri)
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])


def find_sweep_run(uri: str, experiment: str, sweep_path: str) -> str | None:
    """A sweep's parent run from an earlier start of the same sweep folder (--resume), without creating one."""
    experiment_id = find_experiment(uri, experiment)
    run = _find_run(uri, experiment_id, SWEEP_TAG, sweep_path) if experiment_id else None
    return run.info.run_id if run else None


def start_sweep_run(
    uri: str, experiment: str, sweep_path: str, run_name: str, tags: dict[str, str], artifact_location=None
) -> tuple[str, str]:
    """The sweep's parent run (found again on --resume by the sweep's storage path)."""
    experiment_id = ensure_experiment(uri, experiment, artifact_location)
    existing = _find_run(uri, experiment_id, SWEEP_TAG, sweep_path)
    if existing is not None:
        _client(uri).update_run(existing.info.run_id, status="RUNNING")
        return experiment_id, existing.info.run_id
    run = _client(uri).create_run(
        experiment_id, run_name=run_name, tags={SWEEP_TAG: sweep_path, KIND_TAG: "sweep", **tags}
    )
    return experiment_id, run.info.run_id


def open_single_run(uri: str, experiment_id: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """An `ebm-scale train` run: like a trial's, without a parent."""
    run_id = create_run(uri, experiment_id, run_name, {KIND_TAG: "run", OUTCOME_TAG: "running", **tags})
    log_params(uri, run_id, params)
    return run_id


def start_single_run(
    uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str], artifact_location=None
) -> tuple[str, str]:
    """The experiment (created if new) and a new `ebm-scale train` run in it: (experiment id, run id)."""
    experiment_id = ensure_experiment(uri, experiment, artifact_location)
    return experiment_id, open_single_run(uri, experiment_id, run_name, params, tags)


def open_trial_run(
    uri: str, experiment_id: str, parent_run_id: str, trial_id: str, trial_name: str, params: dict[str, Any]
) -> str:
    """Create the trial's nested run, or find it again when the trial is retried or the sweep resumed."""
    existing = _find_run(uri, experiment_id, TRIAL_TAG, trial_id)
    if existing is not None:
        _client(uri).update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    run = _client(uri).create_run(
        experiment_id,
        run_name=trial_name,
        tags={"mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id, KIND_TAG: "trial", OUTCOME_TAG: "running"},
    )
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


def running_children(uri: str, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """Trial id (or run id, for a run without one) → run id, for the sweep's runs still marked RUNNING."""
    runs = _running_children(uri, experiment_id, parent_run_id)
    return {r.data.tags.get(TRIAL_TAG, r.info.run_id): r.info.run_id for r in runs}


def find_trial_run(uri: str, experiment_id: str, trial_id: str) -> str | None:
    run = _find_run(uri, experiment_id, TRIAL_TAG, trial_id)
    return run.info.run_id if run else None


def end_run(uri: str, run_id: str, outcome: str, extra_tags: dict[str, str] | None = None) -> None:
    set_tags(uri, run_id, {OUTCOME_TAG: outcome, **(extra_tags or {})})
    _client(uri).set_terminated(run_id, status=MLFLOW_STATUS[outcome])


class MlflowTracker:
    """Rank 0's logger for one trial run. Metrics go through MLflow's async queue, one batch per call."""

    def __init__(self, uri: str, run_id: str, async_logging: bool = True):
        self.uri, self.run_id, self.synchronous = uri, run_id, not async_logging
        self.client = _client(uri)
        # A retried or resumed run trains again from its checkpoint the steps it had already logged before it
        # died: each metric's newest stored step is its high-water mark, and steps up to it are not logged
        # twice (the first attempt's points stay). A fresh run has none.
        self.logged = {m.key: m.step for m in self.client.get_run(run_id).data._metric_objs}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items() if step > self.logged.get(k, -1)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=self.synchronous)

    def log_artifacts(self, paths: list, artifact_path: str) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        set_tags(self.uri, self.run_id, tags)

    def flush(self) -> None:
        """Wait until every batch logged so far is in the store. mlflow.flush_async_logging() would not do:
        it flushes the queue of the default tracking URI's store, and this run's batches queue in the store
        behind its own client (MLflow keeps one store, and one queue, per URI)."""
        self.client._tracking_client.store.flush_async_logging()


def provenance_tags() -> dict[str, str]:
    """Git commit and library versions, so a run can be traced to the code that produced it."""
    from importlib.metadata import version

    import torch

    # Ray's version from its package metadata: `ebm-scale train` in-process never imports Ray.
    tags = {"ray_version": version("ray"), "torch_version": torch.__version__}
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


def ui_page(uri: str, run_id: str, runs_table: bool) -> str:
    """The MLflow UI page of a run (or, `runs_table`, of its experiment's runs table) in the UI's Model training
    view: 3.17 opens every experiment in its GenAI view (traces, token usage) unless the address says
    `workflowType=machine_learning`."""
    experiment_id = _client(uri).get_run(run_id).info.experiment_id
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_DEFAULT
    page = f"{base}/#/experiments/{experiment_id}/runs" + ("" if runs_table else f"/{run_id}")
    return page + "?workflowType=machine_learning"
