"""benchmarks/mlflow_load.py in its smallest mode: a real `mlflow server`, 4 writers for 3 s. Its JSON must add up,
and (SQLite) the store itself, read with sqlite3 behind the benchmark's back, must hold exactly the points the
benchmark says were acknowledged, each once."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "mlflow_load.py"
WRITERS, DURATION, RATE, METRICS = 4, 3, 1.0, 5


def _run(tmp_path: Path, backend: str) -> dict:
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(BENCH), "--backend", backend, "--writers", str(WRITERS), "--duration", str(DURATION),
           "--rate", str(RATE), "--metrics", str(METRICS), "--procs", "1", "--server-workers", "1",
           # no job runner: its huey consumer processes (8 seen here) each import MLflow at start-up
           "--server-env", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false",
           "--workdir", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    return result


def _check_consistent(r: dict) -> None:
    writers = r["per_writer"]
    assert len(writers) == WRITERS
    acked = sum(w["acked_batches"] for w in writers.values())
    assert acked == r["batches_acked"] > 0
    assert r["batches_sent"] <= WRITERS * DURATION * RATE  # never more than the schedule
    assert r["batches_failed"] == 0 and r["failed_errors"] == []
    assert r["points_acked"] == acked * METRICS
    assert r["points_read"] == sum(w["points_read"] for w in writers.values()) == acked * METRICS
    for w in writers.values():
        assert w["points_read"] == w["acked_batches"] * METRICS
    for key in ("lost", "duplicated", "extra", "never_sent", "wrong_value"):
        assert r[key] == 0, key
    assert r["batches_per_s"] > 0 and r["points_per_s"] > 0
    assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p99"] <= r["latency_ms"]["max"]


def test_sqlite_tiny_load_loses_nothing(tmp_path):
    r = _run(tmp_path, "sqlite")
    _check_consistent(r)
    # The store, counted without MLflow: the metric rows of the parent's child runs, per run.
    db = sqlite3.connect(tmp_path / "work" / "sqlite" / "mlflow.db")
    rows = db.execute(
        "SELECT m.run_uuid, COUNT(*), COUNT(DISTINCT m.key || '@' || m.step) FROM metrics m "
        "JOIN tags t ON t.run_uuid = m.run_uuid AND t.key = 'mlflow.parentRunId' GROUP BY m.run_uuid"
    ).fetchall()
    db.close()
    stored = {run: (n, distinct) for run, n, distinct in rows}
    expected = {w["run_id"]: w["acked_batches"] * METRICS for w in r["per_writer"].values()}
    assert {run: n for run, (n, _) in stored.items()} == expected
    assert all(n == distinct for n, distinct in stored.values())  # no (key, step) twice
    assert sum(expected.values()) == r["points_acked"]


@pytest.mark.slow
def test_postgres_tiny_load_loses_nothing(tmp_path):
    r = _run(tmp_path, "postgres")
    _check_consistent(r)
    assert r["cpu_cores"]["postgres"] > 0  # the writes did reach the cluster the benchmark started
    assert not Path(r["store"]).exists()  # the throwaway cluster is gone
