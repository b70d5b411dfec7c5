"""One training run without Tune: `ebm-scale train`, stage-1 backbone pretraining.

num_workers == 0: `loop.train` in this process — no Ray started, none imported.
num_workers >= 1: the TorchTrainer job launched directly (local Ray, or the cluster in RAY_ADDRESS).
Either way the run is recorded in MLflow as a sweep's trial is (every config value a param, the same
metrics and pictures, the outcome tag and status, the checkpoint tag, provenance tags), and what the
cluster must offer (tracking server, resources, backbone) is checked before the run is created.
"""

from __future__ import annotations

import copy
import multiprocessing
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

from ebm_scale.config import EbmScaleConfig, flatten, to_container
from ebm_scale.data import dataset_spec, load_dataset
from ebm_scale.engine import leftovers, tracking
from ebm_scale.engine.backbones import backbone_kind, resolve_backbone, stage1_config
from ebm_scale.engine.jobs import check_job_stores
from ebm_scale.engine.loop import train
from ebm_scale.engine.outcomes import trial_outcome
from ebm_scale.engine.progress import HEARTBEAT_S, POLL_S, Clock, Printer, fmt, heartbeat_line
from ebm_scale.engine.state import CHECKPOINTS_KEPT
from ebm_scale.methods.backbone import check_backbone


@dataclass
class RunResult:
    experiment: str
    run_id: str
    tracking_uri: str
    outcome: str
    metrics: dict
    checkpoint: str | None
    seconds: float


class LocalSession:
    """The in-process run's session: prints each evaluation and a heartbeat, keeps the last checkpoints
    under the run's folder (storage.path/<name>/<run>/), restores nothing (a fresh run)."""

    rank, world_size, local_rank = 0, 1, 0
    heartbeat_s = HEARTBEAT_S

    def __init__(self, tracker, run_dir: str, cfg: EbmScaleConfig, printer: Printer):
        self.tracker, self.run_dir, self.printer = tracker, run_dir.rstrip("/"), printer
        self.iterations, self.metric = cfg.train.iterations, cfg.search.metric
        self.clock = Clock()
        self.last: dict = {}
        self.checkpoints: list[str] = []

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.last = dict(metrics)
        if checkpoint_dir:
            self._keep(checkpoint_dir, f"{self.run_dir}/checkpoint_{int(metrics['step']):06d}")
        if not metrics.get("diverged"):
            self.printer(
                f"{self.clock} eval     step {metrics['step']}/{self.iterations}  "
                f"{self.metric}={fmt(metrics.get(self.metric))}"
            )

    def restore(self) -> dict | None:
        return None

    def heartbeat(self, step: int, iters_per_s: float) -> None:
        self.printer(heartbeat_line(self.clock, "", step, self.iterations, iters_per_s))

    def _keep(self, local_dir: str, target: str) -> None:
        copy_dir(local_dir, target)
        self.checkpoints.append(target)
        while len(self.checkpoints) > CHECKPOINTS_KEPT:
            remove_dir(self.checkpoints.pop(0))


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri if "://" in uri else "file://" + uri)


def copy_dir(local_dir: str, target: str) -> None:
    """A local folder to `target` on local disk or any pyarrow filesystem (s3://...)."""
    import pyarrow.fs

    fs, path = _fs(target)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(local_dir, path, destination_filesystem=fs)


def remove_dir(target: str) -> None:
    fs, path = _fs(target)
    fs.delete_dir(path)


# --- two-stage methods: the backbone --------------------------------------------------------------------


def check_given_backbone(cfg: EbmScaleConfig) -> None:
    """A given backbone must exist and fit the method and the data (ConfigError on `method.backbone`)."""
    kind = backbone_kind(cfg)
    if kind is not None and cfg.method.backbone:
        shape = dataset_spec(cfg.data).shape
        check_backbone(resolve_backbone(cfg.method.backbone, cfg.tracking.resolved_uri()), kind, shape)


def prepare_backbone(cfg: EbmScaleConfig, printer: Printer = print) -> EbmScaleConfig:
    """Before any run of a two-stage method: pretrain when no backbone is given, then check the backbone fits
    the method and the data. Returns the config the runs get (with `method.backbone` filled in)."""
    kind = backbone_kind(cfg)
    if kind is None:
        return cfg
    if not cfg.method.backbone:
        cfg = copy.deepcopy(cfg)
        cfg.method.backbone = pretrain_backbone(cfg, printer)
    check_given_backbone(cfg)
    printer(f"backbone ({kind}): {cfg.method.backbone}")
    return cfg


def pretrain_backbone(cfg: EbmScaleConfig, printer: Printer = print) -> str:
    """Train `cfg`'s stage-1 backbone as one run of its own (same MLflow experiment); its reference."""
    stage1 = stage1_config(cfg)
    printer(
        f"no method.backbone given: training the {stage1.method.name} backbone first "
        f"({stage1.train.iterations} iterations, its own MLflow run)"
    )
    result = run_single(stage1, printer=lambda line: printer("  [backbone] " + line))
    if result.outcome != "finished":
        raise RuntimeError(
            f"pretraining the backbone {result.outcome} (MLflow experiment {result.experiment!r}, "
            f"run {result.run_id}); see that run for the error"
        )
    return f"runs:/{result.run_id}/backbone"


# --- the run -----------------------------------------------------------------------------------------


def preflight(cfg: EbmScaleConfig) -> None:
    """What can fail before anything is recorded: stores a Ray job would delete, the tracking server, an image
    dataset that is not where data.root says, FID weights that are missing, a given backbone."""
    check_job_stores(cfg.tracking.resolved_uri(), cfg.storage.resolved_path())  # inside `ray job submit`
    tracking.check_reachable(cfg.tracking.resolved_uri())
    if dataset_spec(cfg.data).kind == "image":
        from ebm_scale.metrics.images import check_fid_weights

        load_dataset(cfg.data, cfg.seed)  # finds (and for s3:// roots caches) the files, reads the index only
        check_fid_weights(cfg)
    check_given_backbone(cfg)


def run_single(cfg: EbmScaleConfig, printer: Printer = print) -> RunResult:
    t0 = time.perf_counter()
    uri = cfg.tracking.resolved_uri()
    preflight(cfg)
    if cfg.scaling.num_workers > 0:
        _join_cluster(cfg)
    cfg = prepare_backbone(cfg, printer)
    experiment = cfg.tracking.experiment or cfg.name
    run_dir = f"{cfg.storage.resolved_path().rstrip('/')}/{cfg.name}/{time.strftime('%Y%m%d-%H%M%S')}"
    where = "in this process" if cfg.scaling.num_workers == 0 else f"{cfg.scaling.num_workers}-worker TorchTrainer"
    printer(f"train {cfg.name}: {cfg.method.name} on {cfg.data.name}, {cfg.train.iterations} iterations ({where})")
    # Opening the run (importing MLflow, a fresh SQLite store's schema migrations: seconds of Python) goes on
    # in a child process, on another core, while this one builds the data and the model; a thread would
    # share the GIL with the build. The loop's first log waits for it. `spawn`: no fork of a torch process.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        opening = pool.submit(
            tracking.start_single_run,
            uri,
            experiment,
            f"train-{cfg.name}",
            flatten(to_container(cfg)),
            _run_tags(cfg, run_dir),
            cfg.tracking.artifact_location,
        )
        leftovers.record_children()  # the spawned opener (and its resource tracker) outlive a killed run
        try:
            if cfg.scaling.num_workers == 0:
                metrics, checkpoint, error = _in_process(cfg, uri, opening, run_dir, printer)
            else:
                experiment_id, run_id = opening.result()
                metrics, checkpoint, error = _torch_trainer(cfg, uri, experiment_id, run_id, run_dir, printer)
        except BaseException:  # Ctrl-C: the run ends as failed, not RUNNING forever
            tracking.end_run(uri, opening.result()[1], "failed")
            raise
    _, run_id = opening.result()
    outcome = trial_outcome(metrics, cfg.train.iterations, error is not None)
    tracking.end_run(uri, run_id, outcome, {tracking.CHECKPOINT_TAG: checkpoint} if checkpoint else None)
    if error is not None:
        printer(f"failed: {type(error).__name__}: {error}")
    return RunResult(experiment, run_id, uri, outcome, metrics, checkpoint, time.perf_counter() - t0)


def _run_tags(cfg: EbmScaleConfig, run_dir: str) -> dict[str, str]:
    tags = {**tracking.provenance_tags(), tracking.SWEEP_TAG: run_dir}
    if backbone_kind(cfg) is not None:
        tags[tracking.BACKBONE_TAG] = cfg.method.backbone
    return tags


class PendingTracker:
    """The tracker of a run still being opened: its first call waits for the run, then logs as usual."""

    def __init__(self, uri: str, opening: Future, async_logging: bool):
        self.uri, self.opening, self.async_logging = uri, opening, async_logging
        self._tracker = None
        self._tags: dict[str, str] = {}

    def _ready(self) -> tracking.MlflowTracker:
        if self._tracker is None:
            self._tracker = tracking.MlflowTracker(self.uri, self.opening.result()[1], self.async_logging)
            if self._tags:
                self._tracker.set_tags(self._tags)
        return self._tracker

    def set_tags(self, tags: dict[str, str]) -> None:
        """Held until the run is open (the loop sets tags before its first step: it must not wait for MLflow)."""
        if self._tracker is None:
            self._tags.update(tags)
        else:
            self._tracker.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._ready().log_metrics(metrics, step)

    def log_artifacts(self, paths: list, artifact_path: str) -> None:
        self._ready().log_artifacts(paths, artifact_path)

    def flush(self) -> None:
        self._ready().flush()


def _join_cluster(cfg: EbmScaleConfig) -> None:
    """Workers need Ray; the job's workers (no Tune driver here) must fit the cluster."""
    import ray

    from ebm_scale.engine.launch import how_many_fit, init_ray

    init_ray()
    driver = cfg.scaling.driver_bundle()
    need = {k: v for k, v in cfg.scaling.trial_resources().items() if k == "CPU" or k not in driver}
    need["CPU"] -= driver["CPU"]
    how_many_fit(cfg, ray.cluster_resources(), need)


def _in_process(cfg, uri, opening: Future, run_dir, printer):
    tracker = PendingTracker(uri, opening, cfg.tracking.async_logging)
    session = LocalSession(tracker, run_dir, cfg, printer)
    error = None
    try:
        # The loop loads a backbone from a local file; the run's params keep the reference (runs:/…, s3://…).
        train(_with_local_backbone(cfg, uri), session)
    except Exception as err:  # recorded as the run's outcome, as a trial's exception is
        error = err
    finally:
        tracker.flush()
    return session.last, (session.checkpoints[-1] if session.checkpoints else None), error


def _with_local_backbone(cfg: EbmScaleConfig, uri: str) -> EbmScaleConfig:
    if backbone_kind(cfg) is None or not cfg.method.backbone:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.method.backbone = resolve_backbone(cfg.method.backbone, uri)
    return cfg


class RunWatcher:
    """Prints a TorchTrainer run's evaluations and heartbeats as the in-process run does, read from its MLflow
    run (rank 0 logs there; the workers' own output stays in Ray's logs): a poll every `poll_s`, and a last
    one when the job ends."""

    poll_s = POLL_S

    def __init__(self, uri: str, run_id: str, cfg: EbmScaleConfig, printer: Printer):
        self.uri, self.run_id, self.printer = uri, run_id, printer
        self.iterations, self.metric = cfg.train.iterations, cfg.search.metric
        self.clock, self.stop = Clock(), threading.Event()
        self.shown_step, self.shown_beat, self.shown_at = 0, None, 0.0
        self.thread = threading.Thread(target=self._watch, name="ebm_scale-run-watcher", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _watch(self) -> None:
        while not self.stop.wait(self.poll_s):
            self._poll()
        self._poll()

    def _poll(self) -> None:
        try:
            evals = tracking.metric_history(self.uri, self.run_id, self.metric)
            beat = tracking.get_tag(self.uri, self.run_id, tracking.PROGRESS_TAG)
        except Exception:  # a busy store: the next poll will do
            return
        for m in sorted(evals, key=lambda m: m.step):
            if m.step > self.shown_step:
                self.shown_step = m.step
                self.shown_at = time.time()
                self.printer(f"{self.clock} eval     step {m.step}/{self.iterations}  {self.metric}={fmt(m.value)}")
        quiet = time.time() - self.shown_at >= HEARTBEAT_S  # rank 0 beats every TRIAL_HEARTBEAT_S
        if beat and beat != self.shown_beat and quiet:
            self.shown_beat = beat
            step, rate = beat.split()
            if int(step) > self.shown_step:
                self.shown_at = time.time()
                self.printer(heartbeat_line(self.clock, "", int(step), self.iterations, float(rate)))


def _torch_trainer(cfg, uri, experiment_id, run_id, run_dir, printer):
    from ebm_scale.engine.launch import TrialContext, checkpoint_uri, torch_trainer

    context = TrialContext(
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id="",
        storage_path=run_dir,
        async_logging=cfg.tracking.async_logging,
    )
    try:
        with RunWatcher(uri, run_id, cfg, printer):
            result = torch_trainer(cfg, f"train-{run_id}", run_id, context, []).fit()
    except Exception as err:  # Train V2 raises TrainingFailedError once its retries are spent
        return {}, None, err
    checkpoint = checkpoint_uri(result.checkpoint)
    return result.metrics or {}, checkpoint, result.error
