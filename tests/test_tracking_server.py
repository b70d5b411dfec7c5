"""A shared MLflow server for real: a `mlflow server` process on 127.0.0.1 with MLflow's basic-auth app and its
artifacts proxied to a local S3 server (moto), a sweep whose storage is on that S3, and credentials that
must stay secret (fake AWS keys and the MLflow password, each a unique string): they reach no MLflow param,
tag or artifact, no object of the sweep's storage, nothing the CLI prints and no file of Ray's session
folder. A server that refuses the credentials is one line before any run."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import tiny
from mlflow.tracking import MlflowClient
from s3server import s3_fixture, s3_server_fixture  # noqa: F401
from servers import mlflow_server

from ebm_scale.engine import tracking

EBM_SCALE = str(Path(sys.executable).parent / "ebm-scale")


@pytest.fixture(scope="module")
def shared(s3_server, tmp_path_factory):
    """(server, bucket, AWS environment): one basic-auth server for the module, artifacts in a fresh bucket,
    keys no other test uses (moto takes any)."""
    endpoint, client = s3_server
    bucket = f"shared-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    aws = {
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": "fake-secret-" + secrets.token_hex(16),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }
    folder = tmp_path_factory.mktemp("server")
    with mlflow_server(folder, artifacts_destination=f"s3://{bucket}/mlflow", auth=True, env=aws) as server:
        yield server, bucket, client, aws


def _run(args: list[str], env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([EBM_SCALE, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _client_env(tmp_path: Path, server, aws: dict, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    return {**env, **aws, **server.env, "EBM_SCALE_CACHE": str(tmp_path / "cache"), **extra}


def _as_admin(monkeypatch, server) -> MlflowClient:
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    return MlflowClient(server.uri)


@pytest.mark.slow
def test_a_sweep_on_a_shared_server_and_s3_keeps_every_secret_out(shared, tmp_path, monkeypatch):
    server, bucket, s3, aws = shared
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths must stay short
    env = _client_env(tmp_path, server, aws, RAY_TMPDIR=ray_tmp)
    env.pop("MLFLOW_TRACKING_URI")  # tracking=server must be given the address
    args = [
        "sweep", "quickstart", *tiny.MLE, *tiny.SHORT_RUN, "name=secrets", "search.num_samples=2",
        "search.scheduler.kind=fifo", f"tracking.uri={server.uri}", f"storage.path=s3://{bucket}/runs",
    ]  # fmt: skip
    try:
        done = _run(args, env, tmp_path)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-4000:]

        client = _as_admin(monkeypatch, server)
        experiment = client.get_experiment_by_name("secrets")
        runs = client.search_runs([experiment.experiment_id])
        parent = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) == "sweep"]
        trials = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) == "trial"]
        assert len(parent) == 1 and len(trials) == 2
        assert all(t.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for t in trials)
        for t in trials:
            assert t.data.tags[tracking.CHECKPOINT_TAG].startswith(f"s3://{bucket}/runs/"), t.data.tags
        keys = [
            o["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])
        ]
        assert any(k.startswith("runs/secrets/") and "checkpoint_" in k for k in keys), keys[:20]
        assert any(k.startswith("mlflow/") and k.endswith(".png") for k in keys), "artifacts proxied to S3"

        secret_values = [aws["AWS_ACCESS_KEY_ID"], aws["AWS_SECRET_ACCESS_KEY"], server.password]
        places: dict[str, str] = {"the CLI's output": out}
        for r in runs:
            places[f"run {r.info.run_name} params/tags"] = repr(r.data.params) + repr(r.data.tags)
        for key in keys:  # the sweep's storage (checkpoints, Tune state) and every MLflow artifact
            places[f"s3://{bucket}/{key}"] = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode("latin-1")
        session_files = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_symlink()]
        assert any(p.name == "runtime_env_agent.log" for p in session_files), "Ray's logs were not where expected"
        for p in session_files:
            try:
                places[str(p)] = p.read_bytes().decode("latin-1")
            except OSError:
                pass
        leaks = [(where, v[:6] + "…") for where, text in places.items() for v in secret_values if v in text]
        assert not leaks, leaks

        # --resume finds the sweep's state on S3: nothing reruns, the same parent run.
        again = _run([*args, "--resume"], env, tmp_path)
        assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
        assert f"resuming from s3://{bucket}/runs/secrets/" in again.stdout, again.stdout
        assert "2 finished" in again.stdout and " start " not in again.stdout, again.stdout
        runs_after = client.search_runs([experiment.experiment_id])
        assert sorted(r.info.run_id for r in runs_after) == sorted(r.info.run_id for r in runs)
    finally:
        subprocess.run(["rm", "-rf", ray_tmp])


@pytest.mark.slow
def test_refused_credentials_are_one_line_before_any_run(shared, tmp_path, monkeypatch):
    server, bucket, _, aws = shared
    for password in (None, "wrong-password"):
        env = _client_env(tmp_path, server, aws)
        env.pop("MLFLOW_TRACKING_PASSWORD")
        if password is None:
            env.pop("MLFLOW_TRACKING_USERNAME")
        else:
            env["MLFLOW_TRACKING_PASSWORD"] = password
        done = _run(["sweep", "quickstart", "name=refused", f"tracking.uri={server.uri}"], env, tmp_path, timeout=120)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1, done.stderr
        assert err[0].startswith("ebm-scale: config error: tracking.uri: the MLflow server at"), err
        assert ("the credentials given" if password else "without credentials") in err[0]
    client = _as_admin(monkeypatch, server)
    assert client.get_experiment_by_name("refused") is None, "nothing was recorded"


def test_artifact_location_puts_a_new_experiments_artifacts_on_s3(s3, tmp_path):
    """tracking.artifact_location with a local store: MLflow's own S3 client writes the artifacts (it finds the
    endpoint through AWS_ENDPOINT_URL, as boto3 does)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = tracking.ensure_experiment(uri, "s3-artifacts", artifact_location=s3.uri("mlflow"))
    run_id = tracking.create_run(uri, experiment_id)
    tracking.log_text(uri, run_id, "hello", "notes/hello.txt")
    keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])]
    assert keys == [f"mlflow/{run_id}/artifacts/notes/hello.txt"], keys
    assert tracking.list_artifacts(uri, run_id, "notes") == ["notes/hello.txt"]
