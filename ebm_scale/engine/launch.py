"""Ray-facing pieces: joining the cluster, the resources a run needs, the TorchTrainer job, the Tune function
trainable ("driver") of a sweep's trial, and the sessions through which the loop talks to Ray.

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
from ebm_scale.engine import leftovers, tracking
from ebm_scale.engine.backbones import backbone_kind, resolve_backbone
from ebm_scale.engine.credentials import move_aws_keys_to_file
from ebm_scale.engine.loop import train
from ebm_scale.engine.progress import TRIAL_HEARTBEAT_S
from ebm_scale.engine.state import CHECKPOINTS_KEPT, load_state
from ebm_scale.errors import ConfigError


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS (e.g. after `ray up`), or start a local Ray."""
    import ray

    # Before Tune sees the environment (it copies AWS keys into every trial's runtime env, which Ray logs).
    move_aws_keys_to_file()
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:  # a local Ray of our own: first stop what a killed earlier run left of its own
        leftovers.stop_leftovers()
    # The dashboard stays on (Ray releases finished trials' placement groups through the State API).
    # Workers' own logs stay in Ray's session folder: a failed trial's error is printed by TrialOutcomes.
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except ConnectionError as err:
        if address is None:
            raise
        raise ConfigError("RAY_ADDRESS", _join_failure(address, err)) from None
    if address is None:
        leftovers.record_children()


def _join_failure(address: str, err: BaseException) -> str:
    """Why joining the cluster at RAY_ADDRESS failed, in one line: a refused token (Ray 2.60 turns token
    authentication on) or nothing answering there."""
    chain, seen = [], err
    while seen is not None:
        chain.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    text = " ".join(chain)
    if "AuthenticationError" in text or "InvalidAuthToken" in text or "auth token" in text.lower():
        return (
            f"the Ray cluster at {address} refused this client's token: export RAY_AUTH_MODE=token and the "
            "cluster's token (the head's ~/.ray/auth_token copied here, or RAY_AUTH_TOKEN)"
        )
    return f"no Ray cluster answers at {address} ({str(err).splitlines()[0] if str(err) else type(err).__name__})"


def how_many_fit(cfg: EbmScaleConfig, cluster: dict[str, float], need: dict[str, float]) -> int:
    """How many runs needing `need` fit in `cluster` at once; a ConfigError naming the key if none ever fits.
    GPUs first: without any, `scaling.use_gpu` is what to change, whatever else is short."""
    fits = []
    for resource in sorted(need, key=lambda r: r != "GPU"):
        amount, have = need[resource], cluster.get(resource, 0.0)
        if amount <= 0:
            continue
        if have + 1e-9 < amount:
            if resource.startswith("accelerator_type:"):
                raise ConfigError(
                    "scaling.accelerator_type",
                    f"no node of the Ray cluster has a {resource.split(':', 1)[1]} accelerator",
                )
            if resource in (cfg.scaling.driver_resources or {}):
                key = "scaling.driver_resources"
            else:
                key = "scaling.use_gpu" if resource == "GPU" and have == 0 else "scaling.num_workers"
            raise ConfigError(
                key,
                f"one run needs {amount:g} {resource} (driver {cfg.scaling.driver_cpus:g} CPU + "
                f"{cfg.scaling.num_workers} worker(s)), but the Ray cluster has {have:g} {resource}",
            )
        fits.append(int(have // amount + 1e-9))
    return min(fits) if fits else 1


@dataclass
class TrialContext:
    """What the sweep hands every trial (resolved once in the sweep process)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage_path: str
    async_logging: bool = True


_SCHEMES = {"s3": "s3://", "gcs": "gs://", "hdfs": "hdfs://", "abfs": "abfs://"}  # pyarrow type_name → URI scheme


def checkpoint_uri(checkpoint) -> str | None:
    """Where a Ray checkpoint lies, as a URI a user can pass on: Ray's `.path` is relative to its filesystem
    and drops the scheme (`bucket/runs/...` for `s3://bucket/runs/...`)."""
    if checkpoint is None:
        return None
    fs = getattr(checkpoint, "filesystem", None)
    scheme = _SCHEMES.get(getattr(fs, "type_name", "local"), "")
    path = str(checkpoint.path)
    return path if not scheme or "://" in path else scheme + path.lstrip("/")


def _checkpoint_from(directory: str | None):
    import ray.tune

    return ray.tune.Checkpoint.from_directory(directory) if directory else None


def _load(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return load_state(d)


def _beat(tracker, step: int, iters_per_s: float) -> None:
    """A running trial's heartbeat: a tag on its MLflow run, which the sweep's printer polls. Not a Tune report:
    ASHA (time_attr `step`) and Optuna would read a report without fresh metrics as a result."""
    tracker.set_tags({tracking.PROGRESS_TAG: f"{step} {iters_per_s:.4g}"})


class TuneSession:
    """In-process trial: the loop reports straight to Tune."""

    rank, world_size, local_rank = 0, 1, 0
    heartbeat_s = TRIAL_HEARTBEAT_S

    def __init__(self, tracker):
        self.tracker = tracker

    def heartbeat(self, step: int, iters_per_s: float) -> None:
        _beat(self.tracker, step, iters_per_s)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=_checkpoint_from(checkpoint_dir))

    def restore(self) -> dict | None:
        import ray.tune

        return _load(ray.tune.get_checkpoint())


class TrainSession:
    """A TorchTrainer worker: every rank reports (Train requires it), rank 0 with the checkpoint."""

    heartbeat_s = TRIAL_HEARTBEAT_S

    def __init__(self, tracker):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        self.tracker = tracker if self.rank == 0 else None

    def heartbeat(self, step: int, iters_per_s: float) -> None:
        if self.tracker is not None:
            _beat(self.tracker, step, iters_per_s)

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


def _tag_node(ctx: TrialContext, run_id: str) -> None:
    """Which node each rank ran on (`ebm_scale.node.rank<r>`: host and Ray node id), so a run says where its
    workers were placed (scaling.placement_strategy) and which machine to look at when one rank misbehaves."""
    import socket

    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    node = ray.get_runtime_context().get_node_id()
    tracking.set_tags(ctx.tracking_uri, run_id, {f"{tracking.NODE_TAG_PREFIX}{rank}": f"{socket.gethostname()} {node}"})


def train_worker(loop_config: dict) -> None:
    """Entry point of every TorchTrainer worker."""
    cfg = from_dictconfig(loop_config["config"])
    ctx: TrialContext = loop_config["context"]
    _localize_backbone(cfg, ctx)  # this worker may be on another node than the trial's driver
    _tag_node(ctx, loop_config["run_id"])
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
    run_id = tracking.open_trial_run(
        context.tracking_uri, context.experiment_id, context.parent_run_id, trial_id, tune_ctx.get_trial_name(), params
    )
    if backbone_kind(cfg) is not None:
        tracking.set_tags(context.tracking_uri, run_id, {tracking.BACKBONE_TAG: cfg.method.backbone})
    if cfg.scaling.num_workers == 0:
        _localize_backbone(cfg, context)
        tracker = _tracker(context, run_id)
        try:
            train(cfg, TuneSession(tracker))
        finally:
            tracker.flush()
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    torch_trainer(cfg, f"train-{trial_id}", run_id, context, [TuneReportCallback()]).fit()


def torch_trainer(cfg: EbmScaleConfig, name: str, run_id: str, context: TrialContext, callbacks: list):
    """The TorchTrainer job of one run: `cfg.scaling.num_workers` workers each running `train_worker`.
    `name` is deterministic, so a retried run finds its last checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    sc = cfg.scaling
    backend = sc.backend if sc.backend != "auto" else ("nccl" if sc.use_gpu else "gloo")
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": to_container(cfg), "context": context, "run_id": run_id},
        torch_config=TorchConfig(backend=backend, timeout_s=sc.collective_timeout_s),
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=resources,
            placement_strategy=sc.placement_strategy,
            accelerator_type=sc.accelerator_type,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=os.path.join(context.storage_path, "train_runs")
            if "://" not in context.storage_path
            else context.storage_path.rstrip("/") + "/train_runs",
            failure_config=FailureConfig(max_failures=sc.max_failures),
            # As many as every other run keeps: Train alone would keep every one.
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            callbacks=callbacks,
        ),
    )
