"""One trial: the Tune function trainable ("driver") and the sessions through which the loop talks to Ray.

num_workers == 0: the driver runs `loop.train` itself and reports with `ray.tune.report`.
num_workers >= 1: the driver builds a TorchTrainer whose workers each run `loop.train`; rank 0's reports
reach Tune through TuneReportCallback (Ray 2.60 / Train V2: `Tuner(trainer)` is gone, a function trainable
wrapping `.fit()` is the supported way). The Train run is named `train-<trial_id>` so a retried trial or a
restored sweep finds its last checkpoint again.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

from ebm_scale.config import EbmScaleConfig, flatten, from_dictconfig, set_dotted, to_container
from ebm_scale.engine import tracking
from ebm_scale.engine.backbones import backbone_kind, resolve_backbone
from ebm_scale.engine.loop import train
from ebm_scale.engine.state import load_state


@dataclass
class TrialContext:
    """What the sweep hands every trial (resolved once in the sweep process)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage_path: str
    async_logging: bool = True


def _checkpoint_from(directory: str | None):
    import ray.tune

    return ray.tune.Checkpoint.from_directory(directory) if directory else None


def _load(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return load_state(d)


class TuneSession:
    """In-process trial: the loop reports straight to Tune."""

    rank, world_size, local_rank = 0, 1, 0

    def __init__(self, tracker):
        self.tracker = tracker

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=_checkpoint_from(checkpoint_dir))

    def restore(self) -> dict | None:
        import ray.tune

        return _load(ray.tune.get_checkpoint())


class TrainSession:
    """A TorchTrainer worker: every rank reports (Train requires it), rank 0 with the checkpoint."""

    def __init__(self, tracker):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        self.tracker = tracker if self.rank == 0 else None

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        ray.train.report(metrics if self.rank == 0 else {}, checkpoint=_checkpoint_from(checkpoint_dir))

    def restore(self) -> dict | None:
        import ray.train

        return _load(ray.train.get_checkpoint())


def trial_config(base: dict, sampled: dict) -> EbmScaleConfig:
    """The trial's config: the sweep's composed config with Tune's sampled values set at their dotted keys."""
    merged = copy.deepcopy(base)
    for key, value in sampled.items():
        set_dotted(merged, key, value)
    return from_dictconfig(merged)


def _tracker(ctx: TrialContext, run_id: str):
    return tracking.MlflowTracker(ctx.tracking_uri, run_id, ctx.async_logging)


def _localize_backbone(cfg: EbmScaleConfig, ctx: TrialContext) -> None:
    """Two-stage methods load their backbone from a local file: fetch the reference into this machine's cache."""
    if backbone_kind(cfg) is not None:
        cfg.method.backbone = resolve_backbone(cfg.method.backbone, ctx.tracking_uri)


def train_worker(loop_config: dict) -> None:
    """Entry point of every TorchTrainer worker."""
    cfg = from_dictconfig(loop_config["config"])
    ctx: TrialContext = loop_config["context"]
    _localize_backbone(cfg, ctx)  # this worker may be on another node than the trial's driver
    session = TrainSession(_tracker(ctx, loop_config["run_id"]))
    try:
        train(cfg, session)
    finally:
        if session.tracker is not None:
            session.tracker.flush()


def run_trial(sampled: dict, base: dict, context: TrialContext) -> None:
    """The Tune function trainable: one training run of one method."""
    import ray.tune

    tune_ctx = ray.tune.get_context()
    trial_id = tune_ctx.get_trial_id()
    cfg = trial_config(base, sampled)
    params = flatten(to_container(cfg))
    run_id = tracking.open_trial_run(context.tracking_uri, context.experiment_id, context.parent_run_id,
                                     trial_id, tune_ctx.get_trial_name(), params)
    if backbone_kind(cfg) is not None:
        tracking._client(context.tracking_uri).set_tag(run_id, tracking.BACKBONE_TAG, cfg.method.backbone)
    if cfg.scaling.num_workers == 0:
        _localize_backbone(cfg, context)
        tracker = _tracker(context, run_id)
        try:
            train(cfg, TuneSession(tracker))
        finally:
            tracker.flush()
        return
    _fit_torch_trainer(cfg, trial_id, run_id, context)


def _fit_torch_trainer(cfg: EbmScaleConfig, trial_id: str, run_id: str, context: TrialContext) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    sc = cfg.scaling
    backend = sc.backend if sc.backend != "auto" else ("nccl" if sc.use_gpu else "gloo")
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": to_container(cfg), "context": context, "run_id": run_id},
        torch_config=TorchConfig(backend=backend, timeout_s=sc.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"train-{trial_id}",
            storage_path=os.path.join(context.storage_path, "train_runs") if "://" not in context.storage_path
            else context.storage_path.rstrip("/") + "/train_runs",
            failure_config=FailureConfig(max_failures=sc.max_failures),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()
