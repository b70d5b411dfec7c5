"""The engine's MLflow layer on a real SQLite store: batches go through MLflow's async queue, and flush()
must leave none of them behind (a trial's worker may exit, or its temporary store vanish, right after);
experiments open on the runs table; running trials' heartbeats reach the sweep's printer."""

from mlflow.tracking import MlflowClient

from ebm_scale.engine import tracking
from ebm_scale.engine.launch import TrialContext, TuneSession
from ebm_scale.engine.sweep import TrialOutcomes


def test_flush_waits_for_every_queued_batch(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.create_run(uri, tracking.ensure_experiment(uri, "flush"))
    tracker = tracking.MlflowTracker(uri, run_id, async_logging=True)
    for step in range(300):
        tracker.log_metrics({"loss": float(step), "energy_gap": -float(step)}, step)
    tracker.flush()
    history = tracking.metric_history(uri, run_id, "loss")
    assert sorted(m.step for m in history) == list(range(300))


def test_experiments_say_they_train_models_also_when_they_existed_before(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    old = client.create_experiment("made_before_the_tag")  # as an earlier ebm_scale created it
    assert tracking.ensure_experiment(uri, "made_before_the_tag") == old
    new = tracking.ensure_experiment(uri, "new")
    for experiment_id in (old, new):
        tags = client.get_experiment(experiment_id).tags
        assert tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND == "custom_model_development"


def test_a_running_trials_heartbeat_is_printed_by_the_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = tracking.ensure_experiment(uri, "beats")
    parent = tracking.create_run(uri, experiment_id, "sweep")
    run_id = tracking.open_trial_run(uri, experiment_id, parent, "t1", "mle_t1", {"seed": 0})
    finished = tracking.open_trial_run(uri, experiment_id, parent, "t2", "mle_t2", {"seed": 1})
    session = TuneSession(tracking.MlflowTracker(uri, run_id, async_logging=False))
    session.heartbeat(120, 41.5)
    TuneSession(tracking.MlflowTracker(uri, finished, async_logging=False)).heartbeat(300, 50.0)
    tracking.end_run(uri, finished, "finished")

    lines: list[str] = []
    ctx = TrialContext(tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent, storage_path=str(tmp_path))
    outcomes = TrialOutcomes(ctx, "eval/sinkhorn", 300, lines.append, progress_every_s=0.0)
    outcomes.on_step_end(0, [])
    assert len(lines) == 1 and "running  t1  step 120/300  41.5 it/s" in lines[0]  # not the finished t2
    outcomes.on_step_end(0, [])  # nothing new since
    assert len(lines) == 1
    session.heartbeat(180, 40.0)
    quiet = TrialOutcomes(ctx, "eval/sinkhorn", 300, lines.append, progress_every_s=3600.0)
    quiet.on_step_end(0, [])  # polls at most every hour: not yet
    assert len(lines) == 1


def test_a_torch_trainer_runs_evaluations_and_heartbeats_are_printed_from_its_mlflow_run(tmp_path):
    from ebm_scale.config import compose
    from ebm_scale.engine.run import RunWatcher

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.create_run(uri, tracking.ensure_experiment(uri, "watch"))
    lines: list[str] = []
    watcher = RunWatcher(uri, run_id, compose(None, ["train.iterations=300"], single_run=True), lines.append)
    tracker = tracking.MlflowTracker(uri, run_id, async_logging=False)
    tracker.log_metrics({"eval/sinkhorn": 0.5}, 100)
    tracker.set_tags({tracking.PROGRESS_TAG: "160 42.5"})  # what rank 0's heartbeat writes
    watcher._poll()
    assert len(lines) == 1 and "eval     step 100/300  eval/sinkhorn=0.5" in lines[0]  # a line just now: no beat
    watcher.shown_at -= 30.0  # as if HEARTBEAT_S had passed
    watcher._poll()
    watcher._poll()  # nothing new: nothing printed twice
    assert len(lines) == 2 and "running  step 160/300  42.5 it/s" in lines[1]


def test_the_printed_page_opens_the_model_training_view(tmp_path):
    """MLflow 3.17's UI opens experiments in its GenAI view whatever their tags; the address must ask for the
    Model training view (workflowType), on the runs table or the run itself."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = tracking.ensure_experiment(uri, "pages")
    run_id = tracking.create_run(uri, experiment_id)
    table = tracking.ui_page(uri, run_id, runs_table=True)
    assert table == f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    run = tracking.ui_page(uri, run_id, runs_table=False)
    assert run == f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
