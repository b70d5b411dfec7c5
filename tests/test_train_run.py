"""`ebm-scale train` without Tune: in this process, no Ray started or imported, recorded in MLflow as a
sweep's trial is (params, metrics, pictures, outcome tag and status, checkpoint, provenance); what needs the
cluster is checked before any run is created."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
from mlflow.tracking import MlflowClient

from ebm_scale.cli import main
from ebm_scale.engine import run as single
from ebm_scale.engine.state import STATE_FILE
from ebm_scale.engine.tracking import CHECKPOINT_TAG, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, KIND_TAG, OUTCOME_TAG

TINY = [
    "method=mle",
    "data=8gaussians",
    *tiny.MLE,
    "train.iterations=20",
    "train.eval_every=10",
]

IN_A_FRESH_PROCESS = """
import json, sys
from ebm_scale.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "ray_imported": "ray" in sys.modules}))
"""


def _stores(tmp_path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"storage.path={tmp_path}/runs"]


def _only_run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == 1
    return client, experiments, runs[0]


def test_train_runs_in_process_without_ray_and_is_recorded_as_a_trial_is(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", IN_A_FRESH_PROCESS, "train", *TINY, *_stores(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    *lines, last = proc.stdout.strip().splitlines()
    assert json.loads(last) == {"code": 0, "ray_imported": False}
    assert any(" eval " in line and "step 10/20" in line for line in lines)
    assert any(line.startswith("open it with:") for line in lines)

    client, experiments, run = _only_run(tmp_path)
    assert experiments[0].tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert run.info.status == "FINISHED" and run.data.tags[OUTCOME_TAG] == "finished"
    assert run.data.tags[KIND_TAG] == "run"
    assert {"ray_version", "torch_version"} <= set(run.data.tags)
    assert run.data.params["method.name"] == "mle" and run.data.params["train.iterations"] == "20"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [5, 10, 15, 20]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/sinkhorn")] == [10, 20]
    plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/samples_000020.png", "plots/density_000020.png"} <= plots
    checkpoint = Path(run.data.tags[CHECKPOINT_TAG])
    assert checkpoint.name == "checkpoint_000020" and (checkpoint / STATE_FILE).is_file()
    assert str(tmp_path / "runs" / "mle_8gaussians") in str(checkpoint)


def test_a_diverged_train_run_ends_failed_with_its_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(single.LocalSession, "heartbeat_s", 0.0)  # a heartbeat line at every step
    code = main(["train", *TINY, "debug.nan_at_step=12", *_stores(tmp_path)])
    assert code == 1
    out = capsys.readouterr().out
    assert "running  step 3/20" in out and "it/s" in out
    assert "diverged in" in out
    client, _, run = _only_run(tmp_path)
    assert run.info.status == "FAILED" and run.data.tags[OUTCOME_TAG] == "diverged"
    assert client.get_metric_history(run.info.run_id, "diverged_at_step")[0].value == 15.0
    assert Path(run.data.tags[CHECKPOINT_TAG]).name == "checkpoint_000010"  # the last good one is kept


@pytest.mark.parametrize("command", [["train", *TINY], ["sweep", "quickstart"]])
def test_an_unreachable_tracking_server_is_one_line_before_anything_is_created(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    code = main([*command, "tracking.uri=http://127.0.0.1:9", f"storage.path={tmp_path}/runs"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tracking.uri" in err[0] and "no MLflow server answers" in err[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    # Checked before Ray: no session was started for it.
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
