"""Faults survived, with real signals, a real local Ray and a real MLflow store (SQLite):

- a sweep driver stopped by SIGINT (Ctrl-C) or killed by SIGKILL, then `--resume`: the interruption is said,
  the exit status is non-zero, no run is left RUNNING, the `--resume` command is printed; the resumed sweep
  reuses its parent run, every trial appears exactly once, counts add up, no metric step is logged twice, and
  what the killed driver left running is stopped and named;
- a TorchTrainer worker killed mid-trial: the worker group restarts from the newest checkpoint, the trial
  ends at its last step in one run, each step logged once;
- two sweeps started together on one fresh mlflow.db both finish (MLflow's schema migration is serialized);
- the pieces underneath, fast: the migration lock, the retried run's step high-water mark, leftover
  processes, AWS keys kept out of the environment Tune copies.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import tiny
from mlflow.tracking import MlflowClient

from ebm_scale.engine import credentials, leftovers, tracking

ROOT = Path(__file__).resolve().parents[1]
EBM_SCALE = str(Path(sys.executable).parent / "ebm-scale")
# A sweep of three short in-process trials, one at a time (so one is mid-run when the signal comes).
SWEEP = [
    "quickstart",
    *tiny.MLE,
    "search.num_samples=3",
    "search.max_concurrent_trials=1",
    "search.scheduler.kind=fifo",
    "train.iterations=200",
    "train.eval_every=50",
]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "EBM_SCALE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


def _sweep_args(tmp_path: Path, name: str, extra: list[str] = ()) -> tuple[list[str], str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return [*SWEEP, f"name={name}", f"tracking.uri={uri}", f"storage.path={tmp_path}/runs", *extra], uri


def _runs(uri: str, name: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _steps(uri: str, run_id: str, key: str = "train/loss") -> list[int]:
    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


def _start_and_wait(cmd: list[str], cwd: Path, env: dict, starts: int, timeout_s: float = 400):
    """Start the sweep; return (process, output so far) once `starts` trials have started and a few seconds
    of the last one have run."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines, seen, deadline = [], 0, time.time() + timeout_s
    for line in proc.stdout:
        lines.append(line)
        seen += " start " in line
        if seen >= starts or time.time() > deadline:
            break
    assert seen >= starts, "".join(lines)
    time.sleep(6)  # the trial is training (past its first checkpoint at step 50 on an idle machine)
    return proc, lines


def _check_resumed(uri: str, name: str, parent_before: str, lines: str) -> None:
    runs = _runs(uri, name)
    parents = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) == "sweep"]
    trials = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) == "trial"]
    assert [p.info.run_id for p in parents] == [parent_before], "the resumed sweep reuses its parent run"
    assert len(trials) == 3 and len({t.data.tags[tracking.TRIAL_TAG] for t in trials}) == 3, lines
    assert all(t.data.tags["mlflow.parentRunId"] == parent_before for t in trials)
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED", "FAILED"}, "no run left RUNNING"
    done = [ln for ln in lines.splitlines() if ln.startswith("done in")]
    assert done, lines
    counts = [int(w) for w in done[0].replace(",", "").split() if w.isdigit()]
    assert sum(counts[1:]) == 3, done[0]  # finished + pruned + diverged + failed = every trial, once
    for t in trials:
        steps = _steps(uri, t.info.run_id)
        assert steps and len(steps) == len(set(steps)), f"{t.info.run_name}: a step logged twice: {steps}"
        assert steps == sorted(steps) and steps[-1] == 200, steps


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_sigint_or_sigterm_of_the_sweep_then_resume(tmp_path, stop):
    args, uri = _sweep_args(tmp_path, "sigint")
    env = _env(tmp_path)
    proc, lines = _start_and_wait([EBM_SCALE, "sweep", *args], tmp_path, env, starts=2)
    proc.send_signal(stop)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(120) == 130, out
    assert "interrupted" in out and "done in" not in out, out
    assert f"ebm-scale sweep {args[0]}" in out and "--resume" in out, out
    runs = _runs(uri, "sigint")
    assert "RUNNING" not in {r.info.status for r in runs}, [(r.info.run_name, r.info.status) for r in runs]
    interrupted = [r for r in runs if r.data.tags.get(tracking.OUTCOME_TAG) == "interrupted"]
    assert {r.data.tags[tracking.KIND_TAG] for r in interrupted} == {"sweep", "trial"}, out
    parent = next(r.info.run_id for r in runs if r.data.tags.get(tracking.KIND_TAG) == "sweep")

    resumed = subprocess.run(
        [EBM_SCALE, "sweep", *args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout
    assert "A new study created" not in resumed.stderr  # Optuna's INFO lines stay out of the output
    _check_resumed(uri, "sigint", parent, resumed.stdout)


@pytest.mark.slow
def test_sigkill_of_the_sweep_then_resume_stops_its_leftovers(tmp_path):
    args, uri = _sweep_args(tmp_path, "sigkill")
    env = _env(tmp_path)
    proc, lines = _start_and_wait([EBM_SCALE, "sweep", *args], tmp_path, env, starts=2)
    descendants = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait(30)
    time.sleep(3)
    orphans = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert orphans, "Ray left nothing running: the leftover cleanup below tests nothing"

    resumed = subprocess.run(
        [EBM_SCALE, "sweep", *args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out
    assert f"left running by a killed ebm-scale (pid {proc.pid})" in out, out
    time.sleep(1)
    assert not [p for p in orphans if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], out
    parent = next(r.info.run_id for r in _runs(uri, "sigkill") if r.data.tags.get(tracking.KIND_TAG) == "sweep")
    _check_resumed(uri, "sigkill", parent, resumed.stdout)


@pytest.mark.slow
def test_a_killed_train_worker_resumes_from_the_newest_checkpoint(tmp_path):
    """A 2-worker TorchTrainer trial; one worker gets SIGKILL after the step-100 checkpoint."""
    args, uri = _sweep_args(
        tmp_path,
        "workerkill",
        ["search.num_samples=1", "scaling=cpu2", "train.iterations=400", "train.eval_every=50"],
    )
    env = _env(tmp_path)
    proc = subprocess.Popen(
        [EBM_SCALE, "sweep", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    deadline, newest = time.time() + 400, 0
    while time.time() < deadline and proc.poll() is None and newest < 100:
        time.sleep(0.5)
        newest = _newest_complete_checkpoint(tmp_path / "runs" / "train_runs")
    assert newest >= 100, proc.stdout.read() if proc.poll() is not None else "timed out"
    (trial,) = [r for r in _runs(uri, "workerkill") if r.data.tags.get(tracking.KIND_TAG) == "trial"]
    workers = [
        p for p in psutil.Process(proc.pid).children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())
    ]
    assert len(workers) == 2, [" ".join(p.cmdline())[:80] for p in psutil.Process(proc.pid).children(recursive=True)]
    workers[-1].kill()
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    assert "1 finished" in out, out

    runs = [r for r in _runs(uri, "workerkill") if r.data.tags.get(tracking.KIND_TAG) == "trial"]
    assert len(runs) == 1, "the restarted worker group logs into the same run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags[tracking.OUTCOME_TAG] == "finished"
    steps = _steps(uri, run.info.run_id)
    assert len(steps) == len(set(steps)) and steps[-1] == 400, steps
    resumed_from = _steps_and_values(uri, run.info.run_id, "resumed_from_step")
    assert resumed_from, "the worker group was never restored from a checkpoint"
    assert resumed_from[0][1] >= newest, f"restored step {resumed_from[0][1]}, newest complete checkpoint {newest}"
    kept = [p for p in (tmp_path / "runs" / "train_runs").glob("train-*/checkpoint_*") if p.is_dir()]
    # Its 2 newest, plus at most the one the killed attempt was writing (never registered, so never pruned).
    assert len(kept) <= 3, f"a TorchTrainer run keeps its 2 newest checkpoints, found {len(kept)}"
    ranks = {k: v for k, v in run.data.tags.items() if k.startswith(tracking.NODE_TAG_PREFIX)}
    assert set(ranks) == {f"{tracking.NODE_TAG_PREFIX}0", f"{tracking.NODE_TAG_PREFIX}1"}, ranks


@pytest.mark.slow
def test_a_hung_collective_times_out_and_the_trial_resumes(tmp_path):
    """One rank stops answering at step 30: the other's all-reduce fails after scaling.collective_timeout_s,
    the worker group restarts from the step-20 checkpoint and the trial finishes."""
    args, uri = _sweep_args(
        tmp_path,
        "hang",
        [
            "search.num_samples=1",
            "scaling=cpu2",
            "scaling.collective_timeout_s=10",
            "train.iterations=60",
            "train.eval_every=20",
            "debug.hang_once_at_step=30",
        ],
    )
    done = subprocess.run(
        [EBM_SCALE, "sweep", *args], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0 and "1 finished" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    # Restored from step 20: the group was restarted (a hang that merely ended would have restored nothing).
    (run,) = [r for r in _runs(uri, "hang") if r.data.tags.get(tracking.KIND_TAG) == "trial"]
    assert [v for _, v in _steps_and_values(uri, run.info.run_id, "resumed_from_step")] == [20.0]
    steps = _steps(uri, run.info.run_id)
    assert len(steps) == len(set(steps)) and steps[-1] == 60, steps


def _newest_complete_checkpoint(train_runs: Path) -> int:
    """The step of the newest checkpoint Ray Train has registered (all ranks reported it; its snapshot file),
    0 if none: a checkpoint folder that exists but is not registered yet is not complete."""
    import json

    steps = [0]
    for snapshot in train_runs.glob("train-*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            continue  # being rewritten
        steps += [int(r["metrics"].get("step", 0)) for r in results]
    return max(steps)


def _steps_and_values(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


@pytest.mark.slow
def test_two_sweeps_started_together_on_a_fresh_store_both_finish(tmp_path):
    env = _env(tmp_path)
    procs = []
    for name in ("first", "second"):
        args, uri = _sweep_args(tmp_path, name, ["search.num_samples=1", "train.iterations=20", "train.eval_every=10"])
        procs.append(
            subprocess.Popen([EBM_SCALE, "sweep", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        )  # fmt: skip
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert all("1 finished" in o for o in outs)


# --- fast: the pieces -------------------------------------------------------------------------------------

_OPEN = "import sys; from ebm_scale.engine import tracking; tracking.ensure_experiment(sys.argv[1], sys.argv[2])"


def test_processes_opening_one_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    """Without the lock, three processes migrating one fresh file fail nearly every time (alembic's "Online
    migration expected to match one row")."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = [
        subprocess.Popen([sys.executable, "-c", _OPEN, uri, f"e{i}"], stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-800:] for e in errors)
    assert {e.name for e in MlflowClient(uri).search_experiments()} >= {"e0", "e1", "e2"}


def test_a_retried_run_logs_each_step_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = tracking.ensure_experiment(uri, "retry")
    run_id = tracking.create_run(uri, experiment_id)
    first = tracking.MlflowTracker(uri, run_id, async_logging=False)
    for step in range(1, 11):  # the first attempt logged to step 10, checkpointed at 5, then died
        first.log_metrics({"train/loss": float(step)}, step)
    first.log_metrics({"eval/x": 1.0}, 5)
    retry = tracking.MlflowTracker(uri, run_id, async_logging=False)
    for step in range(6, 16):  # the retry trains again from step 5
        retry.log_metrics({"train/loss": 100.0 + step}, step)
    retry.log_metrics({"eval/x": 2.0}, 10)
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 16))
    assert [m.value for m in history][9:11] == [10.0, 111.0]  # steps up to the high-water mark keep the first
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "eval/x")] == [5, 10]


_OWNER = """
import subprocess, sys, time
from ebm_scale.engine import leftovers
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
leftovers.record_children()
print(child.pid, flush=True)
time.sleep(600)
"""


def test_what_a_killed_run_left_running_is_stopped_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("EBM_SCALE_CACHE", str(tmp_path / "cache"))
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(owner.stdout.readline()))
    assert leftovers.stop_leftovers(printer=lambda line: None) == [], "a running owner's children are its own"
    assert child.is_running()
    owner.kill()
    owner.wait()
    lines: list[str] = []
    stopped = leftovers.stop_leftovers(printer=lines.append)
    assert len(stopped) == 1 and stopped[0].startswith(f"{child.pid} ")
    assert lines == [lines[0]] and f"(pid {owner.pid})" in lines[0]
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert leftovers.stop_leftovers(printer=lines.append) == [], "the record is gone with what it named"


def test_aws_keys_move_from_the_environment_to_a_private_credentials_file(monkeypatch, tmp_path):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKE1234")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret-" + tmp_path.name)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    path = credentials.move_aws_keys_to_file()
    assert path is not None and "AWS_ACCESS_KEY_ID" not in os.environ and "AWS_SECRET_ACCESS_KEY" not in os.environ
    assert os.environ["AWS_SHARED_CREDENTIALS_FILE"] == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    found = boto3.session.Session().get_credentials()
    assert (found.access_key, found.secret_key) == ("AKIAFAKEFAKEFAKE1234", "not-a-real-secret-" + tmp_path.name)
    assert credentials.move_aws_keys_to_file() is None  # nothing left to move


def test_tracking_server_without_an_address_is_a_config_error(monkeypatch):
    from ebm_scale.config import compose
    from ebm_scale.errors import ConfigError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="tracking.uri: tracking=server needs the server's address"):
        compose("quickstart", ["tracking=server"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert compose("quickstart", ["tracking=server"]).tracking.resolved_uri() == "http://127.0.0.1:5999"


def test_checkpoint_uris_keep_their_scheme():
    import pyarrow.fs
    from ray.train import Checkpoint

    from ebm_scale.engine.launch import checkpoint_uri

    s3 = pyarrow.fs.S3FileSystem(endpoint_override="http://127.0.0.1:1", region="us-east-1")
    assert checkpoint_uri(Checkpoint("bucket/runs/ckpt", filesystem=s3)) == "s3://bucket/runs/ckpt"
    assert checkpoint_uri(Checkpoint("/tmp/runs/ckpt")) == "/tmp/runs/ckpt"
    assert checkpoint_uri(None) is None
    from ebm_scale.engine.sweep import _on_storage

    assert _on_storage("bucket/runs/x/checkpoint_000002", "s3://bucket/runs") == "s3://bucket/runs/x/checkpoint_000002"
    assert _on_storage("/tmp/runs/x", "/tmp/runs") == "/tmp/runs/x"
    assert _on_storage(None, "s3://b") is None
