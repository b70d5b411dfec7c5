"""End to end on a real local Ray and a real MLflow store (SQLite): sweeps, TorchTrainer trials, resume
after a crash, divergence, and `ebm-scale train` on a TorchTrainer. Everything below runs the same code path
as `ebm-scale sweep` / `ebm-scale train`."""

from __future__ import annotations

import pytest
import ray
import tiny
from mlflow.tracking import MlflowClient

from ebm_scale.cli import main
from ebm_scale.config import compose
from ebm_scale.engine.sweep import run_sweep
from ebm_scale.engine.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, KIND_TAG, OUTCOME_TAG

TINY = tiny.MLE  # small enough that a trial trains in a second or two


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR")
    yield
    ray.shutdown()


def _sweep(tmp_path, name, overrides, space: str | None = None):
    """Run a sweep extending quickstart; `space` (YAML flow mapping) replaces its search space."""
    config = "quickstart"
    if space is not None:
        config = str(tmp_path / f"{name}.yaml")
        with open(config, "w") as f:
            f.write(f"defaults:\n  - quickstart\n  - _self_\nsearch:\n  space: {space}\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose(config, TINY + [f"name={name}", f"tracking.uri={uri}", f"storage.path={tmp_path}/runs"] + overrides)
    lines: list[str] = []
    result = run_sweep(cfg, printer=lines.append)
    return result, MlflowClient(uri), lines


def _children(client, result):
    exp = client.get_experiment_by_name(result.experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'trial'")


def test_two_trial_sweep_is_recorded_in_mlflow(tmp_path):
    result, client, lines = _sweep(
        tmp_path,
        "e2e",
        ["search.num_samples=2", "search.scheduler.kind=fifo", "train.iterations=20", "train.eval_every=10"],
    )
    assert result.counts["finished"] == 2
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags[KIND_TAG] == "sweep" and parent.info.status == "FINISHED"
    assert "ray_version" in parent.data.tags and "torch_version" in parent.data.tags
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id, "config")} | {
        f.path for f in client.list_artifacts(parent.info.run_id, "summary")
    }
    assert {"config/composed.yaml", "summary/learning_curves.png", "summary/best.json"} <= parent_files
    assert any(k.startswith("best/eval/sinkhorn") for k in parent.data.metrics)
    # Only what describes the model and the run: no Tune bookkeeping (pid, timestamps, iterations, hosts).
    best = [k for k in parent.data.metrics if k.startswith("best/")]
    assert best and all(k.startswith(("best/train/", "best/eval/")) for k in best), best
    assert parent.data.tags["best.step"] == "20"
    assert client.get_experiment_by_name(result.experiment).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    children = _children(client, result)
    assert len(children) == 2
    sampled = set()
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert run.info.status == "FINISHED" and run.data.tags[OUTCOME_TAG] == "finished"
        assert "ebm_scale.checkpoint" in run.data.tags
        params = run.data.params
        assert params["method.name"] == "mle" and params["data.name"] == "8gaussians"
        sampled.add(params["method.sampler.step_size"])
        loss = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in loss] == [5, 10, 15, 20]
        sinkhorn = client.get_metric_history(run.info.run_id, "eval/sinkhorn")
        assert [m.step for m in sinkhorn] == [10, 20]
        plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
        assert {"plots/samples_000020.png", "plots/density_000020.png"} <= plots
    assert len(sampled) == 2, "the two trials should have sampled different step sizes"
    assert any("finished" in line for line in lines)


def test_torch_trainer_trial_reports_to_tune_and_mlflow(tmp_path):
    result, client, _ = _sweep(
        tmp_path,
        "ddp",
        [
            "scaling=cpu2",
            "search.num_samples=1",
            "search.scheduler.kind=fifo",
            "train.iterations=10",
            "train.eval_every=5",
        ],
        space="{}",
    )
    assert result.counts["finished"] == 1
    assert result.best_metrics["step"] == 10 and result.best_metrics["eval/sinkhorn"] > 0  # reached Tune
    (run,) = _children(client, result)
    assert run.data.params["scaling.num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/sinkhorn")] == [5, 10]
    assert "train_runs" in run.data.tags["ebm_scale.checkpoint"]


def test_crashed_trial_resumes_from_its_checkpoint_without_a_second_run(tmp_path):
    result, client, _ = _sweep(
        tmp_path,
        "crash",
        [
            "search.num_samples=1",
            "search.scheduler.kind=fifo",
            "scaling.max_failures=1",
            "train.iterations=30",
            "train.eval_every=10",
            "debug.crash_once_at_step=25",
        ],
        space="{}",
    )
    assert result.counts["finished"] == 1 and result.best_metrics["step"] == 30
    (run,) = _children(client, result)  # one MLflow run, not two
    resumed = client.get_metric_history(run.info.run_id, "resumed_from_step")
    assert [m.value for m in resumed] == [20.0]
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == 30


def test_a_trials_error_reaches_the_terminal_and_its_mlflow_run(tmp_path):
    result, client, lines = _sweep(
        tmp_path,
        "error",
        [
            "search.num_samples=1",
            "search.scheduler.kind=fifo",
            "scaling.max_failures=0",
            "train.iterations=10",
            "train.eval_every=10",
            "debug.crash_once_at_step=5",
        ],
        space="{}",
    )
    assert result.counts["failed"] == 1
    shown = [line for line in lines if "injected crash" in line]
    assert shown and "debug.crash_once_at_step=5" in shown[0], lines
    (run,) = _children(client, result)
    assert (
        run.info.status == "FAILED" and "debug.crash_once_at_step=5: injected crash" in run.data.tags["ebm_scale.error"]
    )
    traceback = open(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))).read()
    assert "ebm_scale.engine.loop.InjectedCrash" in traceback and "\x1b[" not in traceback  # no terminal colours


def test_injected_nan_ends_one_trial_as_diverged_and_the_sweep_goes_on(tmp_path):
    result, client, lines = _sweep(
        tmp_path,
        "nan",
        [
            "search.algo=random",
            "search.num_samples=1",
            "search.scheduler.kind=fifo",
            "train.iterations=20",
            "train.eval_every=5",
        ],
        space="{debug.nan_at_step: {grid: [7, 1000]}}",
    )
    assert result.counts == {"finished": 1, "pruned": 0, "diverged": 1, "failed": 0, "interrupted": 0}
    by_outcome = {r.data.tags[OUTCOME_TAG]: r for r in _children(client, result)}
    bad = by_outcome["diverged"]
    assert bad.info.status == "FAILED"
    assert client.get_metric_history(bad.info.run_id, "diverged_at_step")[0].value == 10.0
    assert bad.data.tags["ebm_scale.checkpoint"]  # the last good checkpoint (step 5) is kept
    assert by_outcome["finished"].info.status == "FINISHED"
    assert result.best_config["debug.nan_at_step"] == 1000
    assert any("] diverged " in line for line in lines)


def test_cli_rejects_more_workers_than_the_cluster_has(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["sweep", "quickstart", "scaling.num_workers=64"])
    assert code == 2
    err = capsys.readouterr().err
    assert "scaling.num_workers" in err and "Ray cluster has" in err
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")  # rejected before the sweep's run was created
    exp = client.get_experiment_by_name("quickstart")
    assert exp is None or not client.search_runs([exp.experiment_id])


def test_two_stage_sweep_trains_the_backbone_once_and_every_trial_refers_to_it(tmp_path, monkeypatch):
    from ebm_scale.engine import backbones
    from ebm_scale.engine.tracking import BACKBONE_TAG

    monkeypatch.setattr(backbones, "CACHE", tmp_path / "cache")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose(
        "nt_ebm_toy",
        [
            "name=two_stage",
            f"tracking.uri={uri}",
            f"storage.path={tmp_path}/runs",
            "method.flow.depth=2",
            "method.flow.hidden=16",
            "method.pretrain.iterations=20",
            "method.energy.hidden=16",
            "method.energy.layers=3",
            "method.sampler.steps=2",
            "method.sampler.sample_steps=3",
            "train.iterations=10",
            "train.eval_every=10",
            "train.log_every=5",
            "train.batch_size=64",
            "eval.n_samples=100",
            "eval.grid_size=30",
            "eval.mcmc.chains=4",
            "eval.mcmc.length=20",
            "eval.mcmc.burn_in=5",
            "search.num_samples=2",
            "search.scheduler.kind=fifo",
        ],
    )
    lines: list[str] = []
    result = run_sweep(cfg, printer=lines.append)
    assert result.counts["finished"] == 2
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(result.experiment)
    runs = client.search_runs([exp.experiment_id])
    sweeps = [r for r in runs if r.data.tags[KIND_TAG] == "sweep"]
    trials = [r for r in runs if r.data.tags[KIND_TAG] == "trial"]
    # One stage-1 run (the single-run path, no Tune) plus the nt_ebm sweep with its two trials, in one experiment.
    assert [r.info.run_name for r in sweeps] == ["sweep-two_stage"]
    flow_trials = [r for r in runs if r.data.tags[KIND_TAG] == "run"]
    ebm_trials = [r for r in trials if r.data.params["method.name"] == "nt_ebm"]
    assert len(flow_trials) == 1 and flow_trials[0].data.params["method.name"] == "flow" and len(ebm_trials) == 2
    assert flow_trials[0].info.status == "FINISHED" and flow_trials[0].data.tags[OUTCOME_TAG] == "finished"
    reference = f"runs:/{flow_trials[0].info.run_id}/backbone"
    assert [a.path for a in client.list_artifacts(flow_trials[0].info.run_id, "backbone")] == ["backbone/backbone.pt"]
    assert client.get_run(result.parent_run_id).data.tags[BACKBONE_TAG] == reference
    for run in ebm_trials:
        assert run.data.tags[BACKBONE_TAG] == reference and run.data.params["method.backbone"] == reference
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        # The tilted model beside its flow, and the latent-vs-data mixing diagnostics, are in every trial.
        assert {
            "eval/test_ll/nt_ebm",
            "eval/test_ll/flow",
            "eval/mcmc/latent/rhat_mean",
            "eval/mcmc/data/rhat_mean",
        } <= set(run.data.metrics)
        # HMC runs during training only for the mle objective (nce trains against flow samples).
        assert ("train/mcmc/accept_rate" in run.data.metrics) == (run.data.params["method.objective"] == "mle")
        plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
        assert {"plots/mcmc_rhat_000010.png", "plots/mcmc_autocorr_000010.png"} <= plots
        assert ("plots/curves_000010.png" in plots) == (run.data.params["method.objective"] == "mle")
    assert sum("training the flow backbone first" in line for line in lines) == 1


@pytest.mark.slow  # ~35 s: the shipped toy sweeps end to end (their methods are unit-tested in the default run)
def test_vaebm_toy_as_shipped_pretrains_its_vae_and_trains_with_hmc(tmp_path, monkeypatch):
    """`ebm-scale train vaebm_toy`, shrunk: the VAE is trained first, then the trial runs ε-space HMC and
    logs its acceptance, step size and their curves beside the tilted model's and the VAE's test LL."""
    from ebm_scale.engine import backbones

    monkeypatch.setattr(backbones, "CACHE", tmp_path / "cache")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose(
        "vaebm_toy",
        [
            "name=vaebm_e2e",
            f"tracking.uri={uri}",
            f"storage.path={tmp_path}/runs",
            "method.vae.hidden=16",
            "method.vae.layers=2",
            "method.vae.latent_dim=3",
            "method.pretrain.iterations=10",
            "method.pretrain.kl_warmup=5",
            "method.energy.hidden=16",
            "method.energy.layers=3",
            "method.iw_samples=4",
            "method.sampler.steps=2",
            "method.sampler.sample_steps=3",
            *tiny.SHORT_RUN,
            "eval.mcmc.chains=4",
            "eval.mcmc.length=20",
            "eval.mcmc.burn_in=5",
        ],
        single_run=True,
    )
    assert cfg.method.sampler.kind == "hmc"
    result = run_sweep(cfg, printer=lambda _: None)
    assert result.counts["finished"] == 1
    client = MlflowClient(uri)
    trials = [r for r in _children(client, result) if r.data.params["method.name"] == "vaebm"]
    assert len(trials) == 1
    metrics = trials[0].data.metrics
    assert {
        "train/mcmc/accept_rate",
        "train/mcmc/step_size",
        "eval/test_ll/vaebm",
        "eval/test_ll/vae",
        "eval/mcmc/eps_hmc/rhat_mean",
    } <= set(metrics)
    assert 0 <= metrics["train/mcmc/accept_rate"] <= 1
    plots = {f.path for f in client.list_artifacts(trials[0].info.run_id, "plots")}
    assert "plots/curves_000010.png" in plots


def test_cli_rejects_a_backbone_of_the_wrong_kind_before_any_trial(capsys, tmp_path):
    from ebm_scale.methods.backbone import backbone_state, save_backbone
    from ebm_scale.nets.flow import Flow, FlowConfig

    flow = Flow((2,), FlowConfig(depth=1, hidden=8))
    path = save_backbone(str(tmp_path / "flow"), backbone_state("flow", (2,), flow.cfg, flow))
    code = main(
        [
            "train",
            "method=vaebm",
            f"method.backbone={path}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"storage.path={tmp_path}/runs",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "method.backbone" in err and "'flow' backbone" in err and "needs a 'vae'" in err
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])  # checked before any run


def test_cli_train_with_workers_runs_a_torch_trainer_without_tune(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = main(
        [
            "train",
            "method=mle",
            "data=8gaussians",
            *TINY,
            "scaling=cpu2",
            "train.iterations=10",
            "train.eval_every=5",
            f"tracking.uri={uri}",
            f"storage.path={tmp_path}/runs",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out  # the workers' evaluations, printed by the driver from the MLflow run
    assert "eval     step 5/10" in out and "eval     step 10/10" in out and "finished in" in out
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags[KIND_TAG] == "run" and run.data.tags[OUTCOME_TAG] == "finished"
    assert run.info.status == "FINISHED" and run.data.params["scaling.num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/sinkhorn")] == [5, 10]
    assert "train_runs" in run.data.tags["ebm_scale.checkpoint"]
    assert {"plots/samples_000010.png"} <= {f.path for f in client.list_artifacts(run.info.run_id, "plots")}


def test_cli_names_use_gpu_when_the_cluster_has_no_gpu(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "quickstart", "scaling=gpu"]) == 2
    err = capsys.readouterr().err
    assert "scaling.use_gpu" in err and "0 GPU" in err
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])  # checked before any run


@pytest.mark.parametrize(
    "sweep,shrink",
    [
        (
            "ddaebm_toy",
            [
                "method.energy.hidden=16",
                "method.generator.hidden=16",
                "method.encoder.hidden=16",
                "method.diffusion.steps=2",
            ],
        ),
        (
            "diffebm_toy",
            ["method.energy.hidden=16", "method.control.hidden=16", "method.sde.steps=4", "method.sde.sample_steps=4"],
        ),
    ],
)
@pytest.mark.slow  # ~20 s each, as above
def test_diffusion_toy_sweeps_run_end_to_end(tmp_path, sweep, shrink):
    """The issue-4 toy sweeps as shipped (their search spaces included), shrunk to seconds: trials in MLflow
    with the sampler's NFE and wall-clock per sample."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose(
        sweep,
        shrink
        + [
            f"name={sweep}_e2e",
            f"tracking.uri={uri}",
            f"storage.path={tmp_path}/runs",
            *tiny.SHORT_RUN,
            "search.num_samples=2",
            "search.scheduler.kind=fifo",
        ],
    )
    result = run_sweep(cfg, printer=lambda _: None)
    assert result.counts["finished"] == 2
    client = MlflowClient(uri)
    trials = _children(client, result)
    assert len(trials) == 2
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        metrics = run.data.metrics
        assert {
            "eval/sinkhorn",
            "eval/test_ll/ebm",
            "eval/nfe",
            "eval/sample_ms_per_sample",
            "train/energy_gap",
        } <= set(metrics)
        steps_key = "method.diffusion.steps" if sweep == "ddaebm_toy" else "method.sde.sample_steps"
        assert metrics["eval/nfe"] == float(run.data.params[steps_key])
