"""A sweep: assembles the Tuner — the trial driver (launch.py), Optuna (multivariate TPE) proposing, ASHA
stopping early, a callback recording outcomes in MLflow — and `--resume` through Tuner.restore.

Every trial ends with one outcome (outcomes.py), and that one outcome is what MLflow's run status, the
Optuna study and the printed summary all say. What needs the cluster (tracking server, resources, a given
backbone) is checked before the sweep's MLflow run is created.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray.tune import Callback

from ebm_scale.config import EbmScaleConfig, flatten, to_container
from ebm_scale.engine import leftovers, tracking
from ebm_scale.engine.backbones import backbone_kind
from ebm_scale.engine.launch import TrialContext, checkpoint_uri, how_many_fit, init_ray, run_trial
from ebm_scale.engine.outcomes import INTERRUPTED, OPTUNA_STATE, trial_outcome
from ebm_scale.engine.progress import HEARTBEAT_S, POLL_S, Clock, Printer, fmt, heartbeat_line
from ebm_scale.engine.run import preflight, prepare_backbone
from ebm_scale.engine.state import CHECKPOINTS_KEPT
from ebm_scale.errors import ConfigError

# What a trial's result says about the model and the run; the rest (pid, hostname, time_since_restore,
# training_iteration, ...) is Tune's bookkeeping and is not logged as the sweep's best metrics.
MODEL_METRIC_PREFIXES = ("train/", "eval/")


# --- the search space ---------------------------------------------------------------------------------


def tune_search_space(space: dict) -> dict:
    """YAML search space → Tune domains. `randint: [low, high]` includes high (as people read it)."""
    from ray import tune

    makers = {
        "uniform": lambda a: tune.uniform(a[0], a[1]),
        "loguniform": lambda a: tune.loguniform(a[0], a[1]),
        "randint": lambda a: tune.randint(a[0], a[1] + 1),
        "qrandint": lambda a: tune.qrandint(a[0], a[1], a[2]),
        "choice": lambda a: tune.choice(list(a)),
        "grid": lambda a: tune.grid_search(list(a)),
    }
    out = {}
    for key, spec in space.items():
        ((dist_name, args),) = spec.items()
        out[key] = makers[dist_name](args)
    return out


def _make_searcher(cfg: EbmScaleConfig):
    if cfg.search.algo == "random" or not cfg.search.space:
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=cfg.search.seed)
    return _prune_aware_optuna(cfg)


def _prune_aware_optuna(cfg: EbmScaleConfig):
    import optuna
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    iterations = cfg.train.iterations

    class PruneAwareOptunaSearch(OptunaSearch):
        """OptunaSearch that tells Optuna the truth: ASHA-stopped trials are PRUNED (with the intermediate
        values already reported), diverged and failed ones FAIL. Stock OptunaSearch records an early-stopped
        trial as COMPLETE with its low-fidelity value, which misleads TPE."""

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if math.isfinite(float(result.get(self.metric, math.nan))):
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            outcome = trial_outcome(result, iterations, error)
            if outcome == "finished" or trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return super().on_trial_complete(trial_id, result, error)
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr("outcome", outcome)
            self._ot_study.tell(ot_trial, state=TrialState[OPTUNA_STATE[outcome]])
            self._completed_trials.add(trial_id)

    sampler = optuna.samplers.TPESampler(
        seed=cfg.search.seed, multivariate=cfg.search.multivariate, n_startup_trials=cfg.search.n_startup_trials
    )
    return PruneAwareOptunaSearch(metric=cfg.search.metric, mode=cfg.search.mode, sampler=sampler)


def _quiet_optuna() -> None:
    """Optuna's INFO lines ("A new study created in memory", also when a restored searcher unpickles) would sit
    between the sweep's own progress lines."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _make_scheduler(cfg: EbmScaleConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = cfg.search.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    # time_attr "step" = training iterations, so grace_period and max_t read in the same unit as train.*
    return ASHAScheduler(
        time_attr="step",
        max_t=s.max_t or cfg.train.iterations,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


# --- Ray and resources --------------------------------------------------------------------------------


def max_concurrent_trials(
    cfg: EbmScaleConfig, cluster: dict[str, float], autoscaling: bool = False, printer: Printer = print
) -> int:
    """How many trials fit at once; a ConfigError naming the key if even one never fits. `autoscaling` (a
    cluster joined through RAY_ADDRESS, with search.max_concurrent_trials given): what the cluster lacks now,
    its autoscaler may add (GPU nodes with min_workers 0), so the given concurrency stands, with a note."""
    try:
        n = how_many_fit(cfg, cluster, cfg.scaling.trial_resources())
    except ConfigError as err:
        if not (autoscaling and cfg.search.max_concurrent_trials):
            raise
        printer(
            f"note: {err} now; waiting for the autoscaler to add nodes "
            f"({cfg.search.max_concurrent_trials} trial(s) at a time, search.max_concurrent_trials)"
        )
        return max(1, min(cfg.search.max_concurrent_trials, cfg.search.num_samples))
    if cfg.search.max_concurrent_trials:
        n = min(n, cfg.search.max_concurrent_trials)
    return max(1, min(n, cfg.search.num_samples))


# --- the Tune callback that decides and records outcomes ---------------------------------------------


class TrialOutcomes(Callback):
    """Runs in the sweep process: ends each trial's MLflow run with the outcome it really had."""

    def __init__(
        self,
        ctx: TrialContext,
        metric: str,
        iterations: int,
        printer: Printer = print,
        progress_every_s: float = HEARTBEAT_S,
    ):
        self.ctx, self.metric, self.iterations = ctx, metric, iterations
        self.clock = Clock()
        self.started: set[str] = set()
        self.printer = printer
        # A progress line per trial at most this often: long runs show they are alive, short sweeps stay quiet.
        self.progress_every_s = progress_every_s
        self.last_shown: dict[str, float] = {}
        self.poll_every_s = min(POLL_S, progress_every_s)
        self.last_poll = time.time()
        self.beats_seen: dict[str, str] = {}

    def __getstate__(self):  # Tune pickles callbacks into the sweep state; a printer need not survive
        return {k: v for k, v in self.__dict__.items() if k != "printer"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.printer = print

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id not in self.started:
            self.started.add(trial.trial_id)
            self.last_shown[trial.trial_id] = time.time()
            shown = ", ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in trial.config.items())
            self.printer(f"{self.clock} start    {trial.trial_id}  {shown}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """Progress: trials report at each evaluation; the last one is printed by on_trial_complete."""
        step, now = result.get("step", 0), time.time()
        if step < self.iterations and now - self.last_shown.get(trial.trial_id, self.clock.t0) >= self.progress_every_s:
            self.last_shown[trial.trial_id] = now
            self.printer(
                f"{self.clock} eval     {trial.trial_id}  step {step}/{self.iterations}  "
                f"{self.metric}={fmt(result.get(self.metric))}"
            )

    def on_step_end(self, iteration, trials, **info):
        """Heartbeats between evaluations: running trials tag their MLflow run (launch._beat); one query here
        every `poll_every_s` shows those not heard of for `progress_every_s`."""
        now = time.time()
        if self.ctx is None or now - self.last_poll < self.poll_every_s:
            return
        self.last_poll = now
        try:
            beats = tracking.running_trials_progress(
                self.ctx.tracking_uri, self.ctx.experiment_id, self.ctx.parent_run_id
            )
        except Exception:  # a busy store: the next poll will do
            return
        for trial_id, beat in beats.items():
            quiet = now - self.last_shown.get(trial_id, self.clock.t0) >= self.progress_every_s
            if beat != self.beats_seen.get(trial_id) and quiet:
                self.beats_seen[trial_id], self.last_shown[trial_id] = beat, now
                step, rate = beat.split()
                self.printer(heartbeat_line(self.clock, trial_id, int(step), self.iterations, float(rate)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, trial_outcome(trial.last_result, self.iterations, error=False))

    def on_trial_error(self, iteration, trials, trial, **info):
        error = getattr(trial, "error_file", None) or getattr(
            getattr(trial, "run_metadata", None), "error_filename", None
        )
        text = open(error).read().strip() if error and os.path.exists(error) else ""
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # Ray colours its error files for a terminal
        lines = [line for line in text.splitlines() if line.strip()]
        message = lines[-1].strip() if lines else "(no message)"
        # The error's last line on the run (a tag the runs table can show) and its whole traceback as an artifact.
        self._end(trial, "failed", {tracking.ERROR_TAG: message[:5000]}, traceback=text)
        self.printer("           " + message + (f"  [full traceback: {error}]" if error else ""))

    def _end(self, trial, outcome: str, extra_tags: dict | None = None, traceback: str = "") -> None:
        result = trial.last_result or {}
        tags = dict(extra_tags or {})
        location = checkpoint_uri(getattr(trial, "checkpoint", None)) or _on_storage(
            result.get("checkpoint_path"), self.ctx.storage_path
        )
        if location:
            tags[tracking.CHECKPOINT_TAG] = str(location)
        run_id = tracking.find_trial_run(self.ctx.tracking_uri, self.ctx.experiment_id, trial.trial_id)
        if run_id:
            if traceback:
                tracking.log_text(self.ctx.tracking_uri, run_id, traceback, "error.txt")
            tracking.end_run(self.ctx.tracking_uri, run_id, outcome, tags)
        self.printer(
            f"{self.clock} {outcome:8s} {trial.trial_id}  step {result.get('step', 0)}/{self.iterations}  "
            f"{self.metric}={fmt(result.get(self.metric))}"
        )


def _on_storage(path: str | None, storage: str) -> str | None:
    """A TorchTrainer trial's checkpoint path as TuneReportCallback reports it (relative to the storage's
    filesystem, `bucket/runs/...`) as a URI with the storage's scheme (`s3://bucket/runs/...`)."""
    if not path or "://" in path or "://" not in storage:
        return path
    return storage.split("://", 1)[0] + "://" + path.lstrip("/")


# --- the sweep ----------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    experiment: str
    parent_run_id: str
    tracking_uri: str
    best_config: dict | None
    best_metrics: dict | None
    best_run_id: str | None
    counts: dict
    seconds: float
    summary_figures: list
    interrupted: bool = False  # stopped before every trial ended: `--resume` continues it


def run_sweep(
    cfg: EbmScaleConfig, resume: bool = False, printer: Printer = print, extra_callbacks: list | None = None
) -> SweepResult:
    import ray
    from ray import tune

    t0 = time.perf_counter()
    uri = cfg.tracking.resolved_uri()
    storage = cfg.storage.resolved_path()
    experiment = cfg.tracking.experiment or cfg.name
    sweep_root = storage.rstrip("/") + "/" + cfg.name
    previous = _latest_run_dir(sweep_root) if resume else None
    # Each new sweep gets its own folder (and so its own MLflow parent run); --resume reuses the latest.
    run_name = previous or time.strftime("%Y%m%d-%H%M%S")
    sweep_path = f"{sweep_root}/{run_name}"

    preflight(cfg)  # tracking server, a given backbone: before Ray starts
    # Ray's start and MLflow's first open of a fresh SQLite store (schema migrations) take seconds each on a
    # small machine: do them side by side. Only the experiment is created before the resource check; the
    # sweep's run is created after it (and after the backbone is ready), so a rejected sweep leaves no run.
    with ThreadPoolExecutor(max_workers=1) as pool:
        store_ready = pool.submit(tracking.ensure_experiment, uri, experiment, cfg.tracking.artifact_location)
        init_ray()
        joined = bool(os.environ.get("RAY_ADDRESS"))  # an existing cluster, which may autoscale
        concurrency = max_concurrent_trials(cfg, ray.cluster_resources(), autoscaling=joined, printer=printer)
        store_ready.result()
    cfg = _with_backbone(cfg, uri, experiment, sweep_path, printer)
    experiment_id, parent_run_id = tracking.start_sweep_run(
        uri, experiment, sweep_path, f"sweep-{cfg.name}", tracking.provenance_tags(), cfg.tracking.artifact_location
    )
    if backbone_kind(cfg) is not None:
        tracking.set_tags(uri, parent_run_id, {tracking.BACKBONE_TAG: cfg.method.backbone})
    base = to_container(cfg)
    _log_sweep_inputs(uri, parent_run_id, cfg, base, concurrency)
    ctx = TrialContext(
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        storage_path=storage,
        async_logging=cfg.tracking.async_logging,
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, context=ctx), cfg.scaling.driver_bundle()
    )
    param_space = tune_search_space(cfg.search.space)
    callback = TrialOutcomes(ctx, cfg.search.metric, cfg.train.iterations, printer)
    printer(
        f"sweep {cfg.name}: {cfg.search.num_trials} trial(s) of {cfg.method.name} on {cfg.data.name}, "
        f"{concurrency} at a time, {cfg.train.iterations} iterations each "
        f"({'in-process' if cfg.scaling.num_workers == 0 else f'{cfg.scaling.num_workers}-worker TorchTrainer'})"
    )
    _quiet_optuna()
    if previous and tune.Tuner.can_restore(sweep_path):
        printer(f"resuming from {sweep_path}")
        tuner = tune.Tuner.restore(
            sweep_path, trainable=trainable, param_space=param_space, resume_unfinished=True, resume_errored=True
        )
    else:
        if resume:
            printer(f"nothing to resume at {sweep_path}: starting a new sweep")
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=cfg.search.metric,
                mode=cfg.search.mode,
                num_samples=cfg.search.num_samples,
                search_alg=_make_searcher(cfg),
                scheduler=_make_scheduler(cfg),
                max_concurrent_trials=concurrency,
                # One trial process serves trial after trial: no new process, no second import of torch,
                # MLflow and Hydra (seconds a trial on 2 cores). FunctionTrainable.reset_config supports it.
                reuse_actors=True,
                trial_name_creator=lambda t: f"{cfg.method.name}_{t.trial_id}",
                trial_dirname_creator=lambda t: f"{cfg.method.name}_{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=run_name,
                storage_path=sweep_root,
                callbacks=[callback, *(extra_callbacks or [])],
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=cfg.scaling.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            ),
        )
    leftovers.record_children()  # Ray's agents, started since ray.init
    try:
        with _InterruptWatch() as watch:
            results = tuner.fit()
    except BaseException:  # a second Ctrl-C (Tune handles the first), or Tune itself failing
        _record_interruption(uri, experiment_id, parent_run_id)
        raise
    # Ctrl-C / SIGTERM: Tune saves its state and returns, with trials unfinished or never started.
    if watch.interrupted or len(results) < cfg.search.num_trials:
        unfinished = _record_interruption(uri, experiment_id, parent_run_id)
        counts = _outcome_counts(results, cfg, unfinished)
        counts["not_started"] = cfg.search.num_trials - len(results)
        printer(
            f"{callback.clock} interrupted: {len(unfinished)} trial(s) unfinished (their checkpoints are kept), "
            f"{counts['not_started']} not started"
        )
        return SweepResult(
            experiment, parent_run_id, uri, None, None, None, counts, time.perf_counter() - t0, [], interrupted=True
        )
    _end_stale_runs(uri, experiment_id, parent_run_id, results, cfg)
    best = _best_result(results, cfg)
    best_run_id = None
    best_config = best_metrics = None
    if best is not None:
        best_config = {k: v for k, v in (best.config or {}).items()}
        best_metrics = {k: v for k, v in best.metrics.items() if _describes_the_model(k, v)}
        best_run_id = tracking.find_trial_run(uri, experiment_id, best.metrics.get("trial_id", ""))
    counts = _outcome_counts(results, cfg)
    figures = _summarize(uri, parent_run_id, cfg, results, best_config, best_metrics, best_run_id, counts, printer)
    tracking.end_run(uri, parent_run_id, "finished" if counts["finished"] else "failed")
    return SweepResult(
        experiment,
        parent_run_id,
        uri,
        best_config,
        best_metrics,
        best_run_id,
        counts,
        time.perf_counter() - t0,
        figures,
    )


def _describes_the_model(key: str, value) -> bool:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return numeric and (key == "step" or key.startswith(MODEL_METRIC_PREFIXES))


def _with_backbone(cfg: EbmScaleConfig, uri: str, experiment: str, sweep_path: str, printer: Printer) -> EbmScaleConfig:
    """Two-stage methods: the backbone every trial shares — given, remembered by a resumed sweep's run, or
    trained now — checked against the method and data before the sweep's run is created."""
    if backbone_kind(cfg) is None:
        return cfg
    if not cfg.method.backbone:
        previous = tracking.find_sweep_run(uri, experiment, sweep_path)
        remembered = tracking.get_tag(uri, previous, tracking.BACKBONE_TAG) if previous else None
        if remembered:  # --resume: never pretrain twice
            cfg = copy.deepcopy(cfg)
            cfg.method.backbone = remembered
    return prepare_backbone(cfg, printer)


def _latest_run_dir(sweep_root: str) -> str | None:
    """Newest run folder of a sweep (local or S3), for --resume."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(sweep_root if "://" in sweep_root else "file://" + sweep_root)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except (OSError, FileNotFoundError):
        return None
    runs = sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)
    return runs[-1] if runs else None


def _log_sweep_inputs(uri: str, run_id: str, cfg: EbmScaleConfig, base: dict, concurrency: int) -> None:
    tracking.log_text(uri, run_id, yaml.safe_dump(base, sort_keys=False), "config/composed.yaml")
    tracking.log_dict(uri, run_id, cfg.search.space, "config/search_space.json")
    params = {k: v for k, v in flatten(base).items() if k not in cfg.search.space}
    params["sweep.max_concurrent_trials"] = concurrency
    try:
        tracking.log_params(uri, run_id, params)
    except Exception:  # --resume: params already logged (MLflow forbids changing them)
        pass


def _trial_rows(results, cfg: EbmScaleConfig) -> list[dict]:
    rows = []
    for r in results:
        m = r.metrics or {}
        rows.append(
            {
                "result": r,
                "outcome": trial_outcome(m, cfg.train.iterations, r.error is not None),
                "value": m.get(cfg.search.metric),
            }
        )
    return rows


def _outcome_counts(results, cfg, unfinished: dict | None = None) -> dict:
    counts = {"finished": 0, "pruned": 0, "diverged": 0, "failed": 0, INTERRUPTED: 0}
    for row in _trial_rows(results, cfg):
        counts[INTERRUPTED if _trial_id(row["result"]) in (unfinished or {}) else row["outcome"]] += 1
    return counts


def _trial_id(result) -> str:
    """A result's Tune trial id: from its metrics, or (a trial that never reported) its folder's name."""
    return (result.metrics or {}).get("trial_id") or Path(str(result.path)).name.rsplit("_", 1)[-1]


class _InterruptWatch:
    """Whether Tune's SIGINT handler fired during fit: Tune installs it over the handler it finds and puts that
    one back when a signal comes, so a sentinel installed before fit is back in place exactly then. (Tune's
    trial statuses do not say it: its cleanup after an interruption ends the running trials.)
    SIGTERM (`kill`, a scheduler's preemption) is made a SIGINT meanwhile: Tune saves its state and the runs
    are marked interrupted, where Ray's own handler, installed by ray.init, would abort the process."""

    def __enter__(self):
        import signal
        import threading

        self.interrupted, self.active = False, threading.current_thread() is threading.main_thread()
        if self.active:  # Tune catches signals only on the main thread too
            self.previous = signal.getsignal(signal.SIGINT)
            self.previous_term = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGINT, self._sentinel)
            signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
        return self

    @staticmethod
    def _sentinel(signum, frame):  # a second Ctrl-C, after Tune's handler gave way: stop now
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        import signal

        if self.active:
            self.interrupted = signal.getsignal(signal.SIGINT) is self._sentinel and exc[0] is None
            signal.signal(signal.SIGINT, self.previous)
            signal.signal(signal.SIGTERM, self.previous_term)
        return False


def _record_interruption(uri, experiment_id, parent_run_id) -> dict[str, str]:
    """Every run of the sweep still RUNNING (the unfinished trials', the sweep's own) becomes KILLED with outcome
    'interrupted': none is left RUNNING, and `--resume` reopens them (open_trial_run / start_sweep_run).
    Returns the unfinished trials (trial id → run id)."""
    try:
        running = tracking.running_children(uri, experiment_id, parent_run_id)
        for run_id in running.values():
            tracking.end_run(uri, run_id, INTERRUPTED)
        tracking.end_run(uri, parent_run_id, INTERRUPTED)
        return running
    except Exception as err:  # noqa: BLE001 - the store may be what failed; say so, keep the real error
        print(f"could not mark the sweep's runs interrupted in MLflow ({type(err).__name__}: {err})")
        return {}


def _end_stale_runs(uri, experiment_id, parent_run_id, results, cfg) -> None:
    """Runs still RUNNING although Tune has ended their trial: the driver was killed after the trial ended but
    before its outcome was recorded (SIGKILL), and a resumed Tune does not report that trial again."""
    running = tracking.running_children(uri, experiment_id, parent_run_id)
    for row in _trial_rows(results, cfg):
        run_id = running.get(_trial_id(row["result"]))
        if run_id:
            tracking.end_run(uri, run_id, row["outcome"])


def _best_result(results, cfg: EbmScaleConfig):
    """Best finished trial (a pruned trial's early value is not comparable with a full run's)."""
    sign = 1 if cfg.search.mode == "min" else -1
    rows = [
        r
        for r in _trial_rows(results, cfg)
        if r["value"] is not None and math.isfinite(r["value"]) and r["outcome"] in ("finished", "pruned")
    ]
    finished = [r for r in rows if r["outcome"] == "finished"] or rows
    if not finished:
        return None
    return min(finished, key=lambda r: sign * r["value"])["result"]


def _summarize(uri, parent_run_id, cfg, results, best_config, best_metrics, best_run_id, counts, printer) -> list[str]:
    """Best trial's params/metrics and the sweep's pictures on the parent run."""
    tracking.log_metrics(uri, parent_run_id, {f"trials/{name}": n for name, n in counts.items()})
    if best_config:
        tracking.set_tags(
            uri,
            parent_run_id,
            {**{f"best.{k}": str(v) for k, v in best_config.items()}, "best.run_id": best_run_id or ""},
        )
    if best_metrics:
        # The step the best trial reached is a tag beside its params: as a metric it was a one-point chart
        # ahead of the model's own.
        tracking.set_tags(uri, parent_run_id, {"best.step": str(best_metrics.get("step", ""))})
        tracking.log_metrics(
            uri,
            parent_run_id,
            {f"best/{k}": v for k, v in best_metrics.items() if k != "step" and math.isfinite(float(v))},
        )
    figures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        from ebm_scale.engine import summary

        figures = summary.sweep_figures(cfg, results, tmp, printer)
        for path in figures:
            tracking.log_artifact(uri, parent_run_id, path, "summary")
        if best_run_id:
            best_png = summary.copy_best_samples(uri, best_run_id, tmp)
            if best_png:
                tracking.log_artifact(uri, parent_run_id, best_png, "summary")
                figures.append(best_png)
        tracking.log_text(
            uri,
            parent_run_id,
            json.dumps(
                {"best_config": best_config, "best_metrics": best_metrics, "counts": counts}, indent=2, default=str
            ),
            "summary/best.json",
        )
    return [Path(f).name for f in figures]
