"""A cluster on this machine, end to end through the real CLI: a 2-node Ray cluster (tests/servers.py), a real
`mlflow server` with artifacts proxied to S3 (moto, tests/s3server.py), checkpoints on S3, `ray job submit`
against a real `ray start --head`. Everything but the store check of a Ray job (engine/jobs.py) is slow.

Every Ray these tests start listens on 127.0.0.1 only, uses a token of its own and is stopped by the test
that started it (never `ray stop`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import servers
import tiny
from s3server import ENVIRONMENT, s3_fixture, s3_server_fixture  # noqa: F401

from ebm_scale.engine.jobs import JOB_ENV_VAR, check_job_stores, in_ray_job, job_working_dir
from ebm_scale.engine.tracking import BACKBONE_TAG, CHECKPOINT_TAG, KIND_TAG, NODE_TAG_PREFIX, OUTCOME_TAG
from ebm_scale.errors import ConfigError

ROOT = servers.ROOT
# One trial of the tiny mle as a 2-worker TorchTrainer whose workers go to different nodes, its driver to the
# head (the only node with `trial_driver`).
TWO_NODES = [
    "scaling.num_workers=2",
    "scaling.placement_strategy=SPREAD",
    "scaling.cpus_per_worker=1",
    "scaling.driver_cpus=0",
    "scaling.driver_resources={trial_driver:1}",
]


# --- the one fast test: the store check of a Ray job ------------------------------------------------------


def test_a_ray_job_refuses_stores_in_its_temporary_working_dir(tmp_path, monkeypatch):
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (copy / "sub").mkdir(parents=True)
    shared = tmp_path / "shared"
    monkeypatch.chdir(copy)
    monkeypatch.delenv(JOB_ENV_VAR, raising=False)
    assert not in_ray_job() and job_working_dir() is None
    check_job_stores(f"sqlite:///{copy}/mlflow.db", "ebm_runs")  # not a job: anything goes

    monkeypatch.setenv(JOB_ENV_VAR, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123abcd.zip"}}))
    assert in_ray_job() and job_working_dir() == copy.resolve()
    refused = {
        "tracking.uri": [f"sqlite:///{copy}/mlflow.db", "sqlite:///mlflow.db", "./mlruns", f"file://{copy}/mlruns"],
        "storage.path": [str(copy / "ebm_runs"), "ebm_runs", "file://" + str(copy / "runs")],
    }
    for key, locations in refused.items():
        for location in locations:
            uri, path = (location, "s3://b/runs") if key == "tracking.uri" else ("http://mlflow:5000", location)
            with pytest.raises(ConfigError) as err:
                check_job_stores(uri, path)
            assert err.value.key == key, location
            text = str(err.value)
            assert "\n" not in text and "working directory" in text and "deletes" in text, text
    monkeypatch.chdir(copy / "sub")  # a subfolder of the copy is still the copy
    with pytest.raises(ConfigError):
        check_job_stores("sqlite:///../mlflow.db", "s3://b/runs")
    # Stores outside the copy are the user's business.
    for uri, path in [
        ("http://127.0.0.1:5000", "s3://bucket/runs"),
        ("https://mlflow.example.com", str(shared / "runs")),
        (f"sqlite:///{shared}/mlflow.db", "file://" + str(shared / "runs")),
        ("postgresql://u:p@db:5432/mlflow", "gs://bucket/runs"),
    ]:
        check_job_stores(uri, path)
    # A job without a working_dir (cwd elsewhere) has no temporary copy to protect.
    monkeypatch.chdir(tmp_path)
    assert job_working_dir() is None
    check_job_stores("sqlite:///mlflow.db", "ebm_runs")
    # No Ray at import: the in-process path must not import it.
    probe = "import sys, ebm_scale.engine.jobs; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


# --- helpers ------------------------------------------------------------------------------------------------


def cli(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 900) -> subprocess.CompletedProcess:
    """`uv run ebm-scale ...` in a fresh process (the project's venv as it is: UV_NO_SYNC)."""
    return subprocess.run(
        ["uv", "run", "--project", str(ROOT), "ebm-scale", *args],
        cwd=cwd,
        env={**os.environ, "UV_NO_SYNC": "1", **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _show(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def keys(s3, prefix: str) -> list[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def runs_of(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """A head (no CPU, one `trial_driver`) and two 1-CPU worker nodes; every node reaches the moto S3 through
    the standard AWS variables (as a real cluster's nodes reach S3 through their instance credentials)."""
    endpoint, _ = s3_server
    cache = tmp_path_factory.mktemp("ebm_cache")
    env = {**ENVIRONMENT, "AWS_ENDPOINT_URL": endpoint, "EBM_SCALE_CACHE": str(cache)}
    with servers.ray_cluster(worker_cpus=(1, 1), head_resources={"trial_driver": 1}, env=env) as c:
        yield c


@pytest.fixture
def mlflow_s3(s3, tmp_path):
    """An MLflow server whose artifacts go to s3://<bucket>/mlflow (the server alone talks to S3)."""
    with servers.mlflow_server(
        tmp_path / "mlflow", artifacts_destination=s3.uri("mlflow"), env={"MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
    ) as server:
        yield server


# --- a 2-worker trial over two nodes, stores on S3 and an MLflow server -------------------------------------


@pytest.mark.slow
def test_a_two_worker_trial_spreads_over_two_nodes_with_s3_checkpoints_and_an_mlflow_server(
    cluster, s3, mlflow_s3, tmp_path
):
    t0 = time.time()
    proc = cli(
        [
            "sweep",
            "quickstart",
            *tiny.MLE,
            *tiny.SHORT_RUN,
            "name=two_nodes",
            "search.num_samples=1",
            "search.scheduler.kind=fifo",
            *TWO_NODES,
            f"storage.path={s3.uri('runs')}",
            f"tracking.uri={mlflow_s3.uri}",
        ],
        env=cluster.env,
        cwd=tmp_path,
    )
    print(f"sweep took {time.time() - t0:.0f} s")
    assert proc.returncode == 0, _show(proc)
    assert "done in" in proc.stdout and "1 finished" in proc.stdout, _show(proc)

    # The sweep joined the cluster: its driver is a job of this cluster, and the trial's actors ran in it.
    state = servers.ray_state(cluster.address, cluster.env)
    drivers = [j for j in state["jobs"] if "ebm-scale" in (j["entrypoint"] or "") and "sweep" in j["entrypoint"]]
    assert len(drivers) == 1, state["jobs"]
    workers = [a for a in state["actors"] if a["class_name"] == "RayTrainWorker"]
    head = next(n["node_id"] for n in state["nodes"] if n["is_head"])
    worker_nodes = {n["node_id"] for n in state["nodes"] if not n["is_head"]}
    assert len(workers) == 2, state["actors"]
    assert {w["node_id"] for w in workers} == worker_nodes, (workers, state["nodes"])
    trial_drivers = [a for a in state["actors"] if a["class_name"].startswith(("ImplicitFunc", "run_trial"))]
    assert trial_drivers and all(a["node_id"] == head for a in trial_drivers), state["actors"]

    # Checkpoints and MLflow's artifacts are in the bucket.
    stored = keys(s3, "runs/")
    assert any("/checkpoint_" in k for k in stored), stored
    artifacts = keys(s3, "mlflow/")
    assert any(k.endswith(".png") and "/plots/" in k for k in artifacts), artifacts

    # The server holds the sweep's run and its trial, nested.
    runs = runs_of(mlflow_s3.uri, "two_nodes")
    sweep = [r for r in runs if r.data.tags.get(KIND_TAG) == "sweep"]
    trials = [r for r in runs if r.data.tags.get(KIND_TAG) == "trial"]
    assert len(sweep) == 1 and len(trials) == 1, [r.data.tags for r in runs]
    (trial,) = trials
    assert trial.data.tags["mlflow.parentRunId"] == sweep[0].info.run_id
    assert trial.info.status == "FINISHED" and trial.data.tags[OUTCOME_TAG] == "finished"
    assert trial.data.params["scaling.num_workers"] == "2"
    assert trial.info.artifact_uri.startswith("mlflow-artifacts:"), trial.info.artifact_uri
    # Each rank tags the node it ran on ("<host> <Ray node id>"): the two worker nodes.
    ranks = {k: v.split()[-1] for k, v in trial.data.tags.items() if k.startswith(NODE_TAG_PREFIX)}
    assert set(ranks) == {f"{NODE_TAG_PREFIX}0", f"{NODE_TAG_PREFIX}1"}, trial.data.tags
    assert set(ranks.values()) == worker_nodes, (ranks, worker_nodes)
    # Ray's Checkpoint.path has no scheme: the tag must be a URI that can be opened again.
    assert trial.data.tags[CHECKPOINT_TAG].startswith("s3://"), trial.data.tags[CHECKPOINT_TAG]


def _workers_on_both_worker_nodes(cluster) -> None:
    state = servers.ray_state(cluster.address, cluster.env)
    worker_nodes = {n["node_id"] for n in state["nodes"] if not n["is_head"]}
    workers = [a for a in state["actors"] if a["class_name"] == "RayTrainWorker"]
    assert {w["node_id"] for w in workers} == worker_nodes, (workers, state["nodes"])


# --- a two-stage method whose backbone is on S3 -------------------------------------------------------------

NT_EBM_TINY = [
    "method.flow.depth=2",
    "method.flow.hidden=16",
    "method.energy.hidden=16",
    "method.energy.layers=3",
    "method.sampler.steps=2",
    "method.sampler.sample_steps=3",
    *tiny.SHORT_RUN,
    "eval.mcmc.chains=4",
    "eval.mcmc.length=20",
    "eval.mcmc.burn_in=5",
]


@pytest.mark.slow
def test_a_two_stage_sweep_on_two_nodes_takes_its_backbone_from_s3(cluster, s3, mlflow_s3, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ebm_scale.cli import main
    from ebm_scale.methods.backbone import FILE_NAME

    # Stage 1 in this process (no Ray): a tiny flow, its backbone file then put on S3 by hand.
    monkeypatch.chdir(tmp_path)
    local = f"sqlite:///{tmp_path}/stage1.db"
    flow = ["method=flow", "data=8gaussians", "method.flow.depth=2", "method.flow.hidden=16", *tiny.SHORT_RUN]
    assert main(["train", *flow, "name=flow_stage1", f"tracking.uri={local}", f"storage.path={tmp_path}/runs"]) == 0
    (run,) = runs_of(local, "flow_stage1")
    downloaded = Path(MlflowClient(local).download_artifacts(run.info.run_id, "backbone", str(tmp_path / "dl")))
    reference = s3.put(f"backbones/flow/{FILE_NAME}", (downloaded / FILE_NAME).read_bytes())

    proc = cli(
        [
            "sweep",
            "nt_ebm_toy",
            *NT_EBM_TINY,
            "name=two_stage_s3",
            "search.num_samples=1",
            "search.scheduler.kind=fifo",
            *TWO_NODES,
            f"method.backbone={reference}",
            f"storage.path={s3.uri('runs')}",
            f"tracking.uri={mlflow_s3.uri}",
        ],
        env=cluster.env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, _show(proc)
    assert "1 finished" in proc.stdout and "training the flow backbone first" not in proc.stdout, _show(proc)
    _workers_on_both_worker_nodes(cluster)
    runs = runs_of(mlflow_s3.uri, "two_stage_s3")
    trials = [r for r in runs if r.data.tags.get(KIND_TAG) == "trial"]
    assert len(trials) == 1 and trials[0].data.tags[OUTCOME_TAG] == "finished", [r.data.tags for r in runs]
    assert trials[0].data.tags[BACKBONE_TAG] == reference == trials[0].data.params["method.backbone"]
    # The workers fetched it from S3 into their node's cache (the nodes' EBM_SCALE_CACHE, not the driver's).
    cached = list((Path(cluster.node_env["EBM_SCALE_CACHE"]) / "backbones").rglob(FILE_NAME))
    assert cached and s3.bucket in str(cached[0]), cached


@pytest.mark.slow
def test_a_missing_s3_backbone_is_one_config_line_before_any_trial(cluster, s3, mlflow_s3, tmp_path):
    missing = s3.uri("nowhere/backbone.pt")
    proc = cli(
        [
            "sweep",
            "nt_ebm_toy",
            *NT_EBM_TINY,
            "name=missing_backbone",
            "search.scheduler.kind=fifo",
            *TWO_NODES,
            f"method.backbone={missing}",
            f"storage.path={s3.uri('runs')}",
            f"tracking.uri={mlflow_s3.uri}",
        ],
        env=cluster.env,
        cwd=tmp_path,
        timeout_s=300,
    )
    assert proc.returncode == 2, _show(proc)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith("ebm-scale: config error: method.backbone:") and missing in errors[-1], _show(proc)
    assert " start " not in proc.stdout and "training the flow backbone" not in proc.stdout, _show(proc)
    assert not [r for r in runs_of(mlflow_s3.uri, "missing_backbone") if r.info.status == "RUNNING"]
    assert not keys(s3, "runs/")


@pytest.mark.slow
def test_a_wrong_ray_token_is_one_config_line(cluster, tmp_path):
    env = {**cluster.env, "RAY_AUTH_TOKEN": "0" * 64}
    proc = cli(["sweep", "quickstart", "name=wrong_token", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
               env=env, cwd=tmp_path, timeout_s=300)  # fmt: skip
    assert proc.returncode == 2, _show(proc)
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("ebm-scale: config error: RAY_ADDRESS: the Ray cluster at"), _show(proc)
    assert "refused this client's token" in last and "RAY_AUTH_MODE=token" in last, _show(proc)
    assert "Traceback" not in proc.stderr, _show(proc)


# --- `ray job submit` against a real `ray start --head` ------------------------------------------------------


@pytest.fixture(scope="module")
def head(s3_server):
    """`ray start --head` (2 CPUs, dashboard, token auth) whose jobs run `uv run` on the project's existing
    venv (UV_PROJECT_ENVIRONMENT, UV_NO_SYNC: no venv is built inside the job's working-dir copy)."""
    endpoint, _ = s3_server
    env = {
        **ENVIRONMENT,
        "AWS_ENDPOINT_URL": endpoint,
        "UV_PROJECT_ENVIRONMENT": str(ROOT / ".venv"),
        "UV_NO_SYNC": "1",
    }
    with servers.ray_head(num_cpus=2, env=env) as h:
        yield h


def job_source(folder: Path) -> Path:
    """What `ray job submit --working-dir .` packages from the repo root — the files git tracks or does not
    ignore (Ray honours .gitignore) — copied once: others edit the repo while these tests run, and a folder
    that changes while Ray zips it can break the upload."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            dst = folder / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return folder


def submit(head, source: Path, entrypoint: list[str], cwd: Path, runtime_env: dict | None = None, timeout_s=900):
    """`uv run ray job submit --working-dir <source> -- <entrypoint>`; returns (process, submission id)."""
    sid = f"ebm-{uuid.uuid4().hex[:8]}"
    extra = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
    proc = subprocess.run(
        ["uv", "run", "--project", str(ROOT), "ray", "job", "submit", "--address", head.dashboard]
        + ["--working-dir", str(source), "--submission-id", sid, *extra, "--", *entrypoint],
        cwd=cwd,
        env={**os.environ, "UV_NO_SYNC": "1", **head.client_env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return proc, sid


def job_log(head, sid: str) -> str:
    return (head.session_dir() / "logs" / f"job-driver-{sid}.log").read_text(errors="replace")


@pytest.mark.slow
def test_ray_job_submit_runs_a_sweep_on_the_cluster_with_the_nodes_venv(head, s3, tmp_path):
    source = job_source(tmp_path / "src")
    with servers.mlflow_server(
        tmp_path / "mlflow",
        artifacts_destination=s3.uri("mlflow"),
        auth=True,
        env={"MLFLOW_S3_ENDPOINT_URL": s3.endpoint},
    ) as mlflow:
        # What runs where: the entrypoint knows it is a job and where its working-dir copy is.
        probe, sid = submit(head, source, ["uv", "run", "python", "tests/servers.py", "job-probe"], tmp_path)
        assert probe.returncode == 0, _show(probe)
        (line,) = [ln for ln in job_log(head, sid).splitlines() if ln.startswith("PROBE ")]
        seen = json.loads(line[len("PROBE ") :])
        print("job probe:", json.dumps(seen, indent=1))
        runtime = head.session_dir() / "runtime_resources" / "working_dir_files"
        assert seen["in_job"] and Path(seen["working_dir"]).parent == runtime, seen
        assert Path(seen["cwd"]) == Path(seen["working_dir"]), seen
        # The code shipped with --working-dir is what the driver and the job's tasks import (Ray puts the copy
        # first on their PYTHONPATH); only the dependencies come from the node's venv.
        shipped = str(Path(seen["working_dir"]) / "ebm_scale" / "__init__.py")
        assert seen["driver_code"] == shipped and seen["task"]["code"] == shipped, seen

        t0 = time.time()
        proc, sid = submit(
            head,
            source,
            ["uv", "run", "ebm-scale", "sweep", "quickstart", *tiny.MLE, *tiny.SHORT_RUN]
            + ["name=job_sweep", "search.num_samples=2", "search.scheduler.kind=fifo"]
            + [f"tracking.uri={mlflow.uri}", f"storage.path={s3.uri('runs')}"],
            tmp_path,
            # The MLflow credentials reach the job's driver and every trial process, on every node.
            runtime_env={"env_vars": {k: v for k, v in mlflow.env.items() if k != "MLFLOW_TRACKING_URI"}},
        )
        print(f"job took {time.time() - t0:.0f} s")
        assert proc.returncode == 0, _show(proc)
        log = job_log(head, sid)
        assert "done in" in log and "2 finished" in log, log[-4000:]

        with pytest.MonkeyPatch.context() as mp:  # this process reads the server as the same admin user
            for k, v in mlflow.env.items():
                mp.setenv(k, v)
            runs = runs_of(mlflow.uri, "job_sweep")
        sweep = [r for r in runs if r.data.tags.get(KIND_TAG) == "sweep"]
        trials = [r for r in runs if r.data.tags.get(KIND_TAG) == "trial"]
        assert len(sweep) == 1 and len(trials) == 2, [r.data.tags for r in runs]
        assert all(t.data.tags["mlflow.parentRunId"] == sweep[0].info.run_id for t in trials)
        assert all(t.info.status == "FINISHED" for t in trials)
        assert any("/checkpoint_" in k for k in keys(s3, "runs/job_sweep/"))

    # `uv run` in the job used the nodes' venv: nothing was installed into the working-dir copy.
    copies = [p for p in runtime.iterdir() if p.name.startswith("_ray_pkg_")]
    assert copies, list(runtime.iterdir())
    assert not [p for c in copies for p in c.rglob(".venv")], copies
    # The sweep joined the head's Ray (the job's RAY_ADDRESS): its trials ran there, as actors of the job.
    state = servers.ray_state(head.address, head.client_env)
    (job,) = [j for j in state["jobs"] if j["submission_id"] == sid]
    assert job["status"].endswith("SUCCEEDED"), job
    assert [a for a in state["actors"] if a["class_name"].startswith("ImplicitFunc")], state["actors"]


@pytest.mark.slow
def test_a_sweep_in_a_ray_job_refuses_the_default_local_stores(head, tmp_path):
    source = job_source(tmp_path / "src")
    proc, sid = submit(
        head,
        source,
        ["uv", "run", "ebm-scale", "sweep", "quickstart", *tiny.MLE, *tiny.SHORT_RUN]
        + ["search.num_samples=1", "search.scheduler.kind=fifo"],
        tmp_path,
        timeout_s=600,
    )
    log = job_log(head, sid)
    assert proc.returncode == 1, _show(proc)  # `ray job submit` exits 1 when the job fails
    errors = [line for line in log.splitlines() if line.strip()]
    assert errors[-1].startswith("ebm-scale: config error: tracking.uri: ") and "working directory" in errors[-1], log
    assert "sweep quickstart:" not in log, log  # refused before the sweep began
    assert "exit code 2" in proc.stdout + proc.stderr, _show(proc)
