"""The trial's MLflow logger on a real SQLite store: batches go through MLflow's async queue, and flush()
must leave none of them behind (a trial's worker may exit, or its temporary store vanish, right after)."""
from ebm_scale.engine import tracking


def test_flush_waits_for_every_queued_batch(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking._client(uri).create_run(tracking.ensure_experiment(uri, "flush")).info.run_id
    tracker = tracking.MlflowTracker(uri, run_id, async_logging=True)
    for step in range(300):
        tracker.log_metrics({"loss": float(step), "energy_gap": -float(step)}, step)
    tracker.flush()
    history = tracking._client(uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(300))
