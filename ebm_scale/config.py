"""Structured configuration: every knob has a type and a default, and is checked before anything launches.

Hydra composes the YAML tree in `sweeps/` (groups method/, data/, scaling/, search/, tracking/, storage/ plus
named sweeps); `compose()` then merges each section into its dataclass schema (wrong types and unknown keys
fail there, named by their dotted key) and `validate()` checks the values (impossible values fail there).
The method section's schema comes from the method registry, so a new method brings its own config class.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ebm_scale.data import DATASETS, DataConfig
from ebm_scale.errors import ConfigError, require
from ebm_scale.methods import METHODS
from ebm_scale.metrics.toy import EvalConfig

PACKAGE_DIR = Path(__file__).resolve().parent


def sweeps_dir() -> Path:
    """The config tree: shipped inside the wheel as ebm_scale/sweeps, or the repo's top-level sweeps/."""
    for candidate in (PACKAGE_DIR / "sweeps", PACKAGE_DIR.parent / "sweeps"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("cannot find the sweeps/ config tree next to the ebm_scale package")


@dataclass
class TrainConfig:
    iterations: int = 3000
    batch_size: int = 800
    eval_every: int = 500        # evaluate, checkpoint and report to Tune every this many iterations
    log_every: int = 50          # metrics to MLflow (batched, asynchronous) every this many iterations
    device: str = "auto"         # auto | cpu | cuda
    threads: int = 1             # torch intra-op threads per process: concurrent trials share the cores

    def validate(self) -> None:
        require(self.iterations >= 1, "train.iterations", f"must be >= 1, got {self.iterations}")
        require(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.eval_every >= 1, "train.eval_every", f"must be >= 1, got {self.eval_every}")
        require(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        require(self.device in ("auto", "cpu", "cuda"), "train.device", f"unknown device {self.device!r}", ["auto", "cpu", "cuda"])
        require(self.threads >= 1, "train.threads", f"must be >= 1, got {self.threads}")


@dataclass
class ScalingConfig:
    """How one trial runs. num_workers 0 = in the Tune trial's own process; >= 1 = a TorchTrainer job."""

    num_workers: int = 0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0     # used only with use_gpu
    driver_cpus: float = 1.0         # the Tune trial process (in-process: it does the training)
    backend: str = "auto"            # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    collective_timeout_s: int = 600  # a hung all-reduce fails (and is retried) instead of blocking forever
    max_failures: int = 1            # retries of a crashed trial, from its last checkpoint

    def validate(self) -> None:
        require(self.num_workers >= 0, "scaling.num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.cpus_per_worker > 0, "scaling.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        require(self.gpus_per_worker > 0, "scaling.gpus_per_worker", f"must be > 0, got {self.gpus_per_worker}")
        require(self.driver_cpus >= 0, "scaling.driver_cpus", f"must be >= 0, got {self.driver_cpus}")
        require(self.backend in ("auto", "gloo", "nccl"), "scaling.backend", f"unknown backend {self.backend!r}", ["auto", "gloo", "nccl"])
        require(not (self.backend == "nccl" and not self.use_gpu), "scaling.backend", "nccl needs scaling.use_gpu=true")
        require(not (self.use_gpu and self.num_workers == 0), "scaling.use_gpu",
                "GPU trials run as TorchTrainer jobs: set scaling.num_workers >= 1")
        require(self.collective_timeout_s >= 1, "scaling.collective_timeout_s", "must be >= 1")
        require(self.max_failures >= 0, "scaling.max_failures", "must be >= 0")

    def trial_resources(self) -> dict[str, float]:
        """Logical resources one trial holds at once: its driver plus its workers."""
        if self.num_workers == 0:
            return {"CPU": max(self.driver_cpus, 1e-3)}
        gpus = self.num_workers * self.gpus_per_worker if self.use_gpu else 0.0
        return {"CPU": self.driver_cpus + self.num_workers * self.cpus_per_worker, "GPU": gpus}


SCHEDULERS = ("asha", "fifo")
SEARCH_ALGOS = ("optuna", "random")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "qrandint", "choice", "grid")


@dataclass
class SchedulerConfig:
    kind: str = "asha"
    grace_period: int = 500          # training iterations a trial gets before ASHA may stop it
    reduction_factor: float = 3.0
    max_t: int | None = None         # None = train.iterations

    def validate(self) -> None:
        require(self.kind in SCHEDULERS, "search.scheduler.kind", f"unknown scheduler {self.kind!r}", SCHEDULERS)
        require(self.grace_period >= 1, "search.scheduler.grace_period", f"must be >= 1, got {self.grace_period}")
        require(self.reduction_factor > 1, "search.scheduler.reduction_factor", f"must be > 1, got {self.reduction_factor}")
        require(self.max_t is None or self.max_t >= 1, "search.scheduler.max_t", "must be >= 1")


@dataclass
class SearchConfig:
    algo: str = "optuna"             # optuna (TPE) | random
    metric: str = "eval/sinkhorn"
    mode: str = "min"
    num_samples: int = 1
    max_concurrent_trials: int | None = None   # None = as many as the cluster can hold at once
    seed: int = 0
    multivariate: bool = True        # multivariate TPE: models interactions (step size × steps matters for EBMs)
    n_startup_trials: int = 4        # random trials before TPE starts modelling
    space: dict[str, Any] = field(default_factory=dict)  # dotted config key -> {distribution: [args]}
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def validate(self) -> None:
        require(self.algo in SEARCH_ALGOS, "search.algo", f"unknown search algorithm {self.algo!r}", SEARCH_ALGOS)
        require(self.mode in ("min", "max"), "search.mode", f"unknown mode {self.mode!r}", ["min", "max"])
        require(self.num_samples >= 1, "search.num_samples", f"must be >= 1, got {self.num_samples}")
        require(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
                "search.max_concurrent_trials", "must be >= 1 (or null for automatic)")
        require(self.n_startup_trials >= 0, "search.n_startup_trials", "must be >= 0")
        for key, spec in self.space.items():
            where = f"search.space.{key}"
            require(isinstance(spec, dict) and len(spec) == 1, where,
                    "must be a one-entry mapping like {loguniform: [1e-3, 1.0]}", DISTRIBUTIONS)
            (dist_name, args), = spec.items()
            require(dist_name in DISTRIBUTIONS, where, f"unknown distribution {dist_name!r}", DISTRIBUTIONS)
            require(isinstance(args, list) and len(args) >= 1, where, "needs a list of arguments")
            if dist_name in ("uniform", "loguniform", "randint"):
                require(len(args) == 2 and args[0] < args[1], where, f"needs [low, high] with low < high, got {args}")
            if dist_name == "loguniform":
                require(args[0] > 0, where, f"loguniform needs low > 0, got {args[0]}")
            if dist_name == "grid":
                require(self.algo == "random", where, "grid runs every value (× num_samples) and needs search.algo=random")
            if dist_name == "qrandint":
                require(len(args) == 3 and args[0] < args[1] and args[2] >= 1, where, "needs [low, high, q]")
        self.scheduler.validate()


@dataclass
class TrackingConfig:
    uri: str | None = None           # None = sqlite:///<absolute cwd>/mlflow.db, resolved once by the driver
    experiment: str | None = None    # None = the sweep's name
    async_logging: bool = True       # MLflow's asynchronous logging: a metric write never blocks a step

    def resolved_uri(self) -> str:
        if self.uri:
            if self.uri.startswith("sqlite:///") and not self.uri.startswith("sqlite:////"):
                # Relative SQLite paths mean different files in different working directories (Ray workers
                # run elsewhere): pin it to an absolute path once, here.
                return "sqlite:///" + str(Path(self.uri[len("sqlite:///"):]).resolve())
            return self.uri
        return "sqlite:///" + str(Path.cwd().resolve() / "mlflow.db")


@dataclass
class StorageConfig:
    path: str = "ebm_runs"           # local folder (relative to cwd) or s3://bucket/prefix

    def resolved_path(self) -> str:
        if "://" in self.path:
            return self.path
        return str(Path(self.path).expanduser().resolve())


@dataclass
class DebugConfig:
    """Fault injection, so the failure paths can be exercised on purpose (tests, drills)."""

    nan_at_step: int | None = None       # poison the weights with NaN at this iteration → the trial diverges
    crash_once_at_step: int | None = None  # raise once at this iteration → the trial is retried from its checkpoint


@dataclass
class EbmScaleConfig:
    name: str = "train"
    seed: int = 0
    method: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self) -> None:
        require(bool(self.name) and "/" not in self.name, "name", f"must be a non-empty name without '/', got {self.name!r}")
        self.method.validate("method")
        self.data.validate("data")
        self.train.validate()
        self.eval.validate("eval")
        self.scaling.validate()
        self.search.validate()
        require(self.search.scheduler.kind != "asha" or self.search.scheduler.grace_period <= self.train.iterations,
                "search.scheduler.grace_period",
                f"({self.search.scheduler.grace_period}) exceeds train.iterations ({self.train.iterations})")
        for key in self.search.space:
            require(_has_key(self, key), f"search.space.{key}", "is not a config key (search keys are dotted paths like method.sampler.step_size)")


# --- from Hydra's DictConfig to checked dataclasses -----------------------------------------------------

def _has_key(cfg: EbmScaleConfig, dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        if isinstance(node, dict):
            if part not in node:
                return False
            node = node[part]
        elif hasattr(node, "__dataclass_fields__") and part in node.__dataclass_fields__:
            node = getattr(node, part)
        else:
            return False
    return True


def _merge_into(schema_cls: type, section: Any, prefix: str):
    """Merge a raw config section into its dataclass schema, turning OmegaConf's errors into ConfigErrors
    that name the full dotted key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema_cls), section if section is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        full = f"{prefix}.{key}" if prefix and key else (prefix or key)
        msg = str(err).splitlines()[0]
        if "not in struct" in msg or "Key '" in msg and "not in" in msg:
            allowed = sorted(schema_cls.__dataclass_fields__)
            parent = full.rsplit(".", 1)[0] if "." in full else prefix
            raise ConfigError(full, f"unknown key under {parent or 'the config'}: {msg}", allowed) from None
        raise ConfigError(full, msg) from None


def from_dictconfig(raw: DictConfig | dict) -> EbmScaleConfig:
    """Typed, validated config from a composed DictConfig (or plain dict)."""
    raw = OmegaConf.create(OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else raw)
    raw_method = raw.get("method") or {}
    method_name = raw_method.get("name") if isinstance(raw_method, (dict, DictConfig)) else None
    require(method_name in METHODS, "method.name", f"unknown method {method_name!r}", sorted(METHODS))
    method = _merge_into(METHODS[method_name].config_class, raw_method, "method")
    rest = {k: v for k, v in raw.items() if k != "method"}
    unknown = set(rest) - set(EbmScaleConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown top-level key", sorted(EbmScaleConfig.__dataclass_fields__))
    cfg = _merge_into(EbmScaleConfig, rest, "")
    cfg.method = method
    data_name = cfg.data.name
    require(data_name in DATASETS, "data.name", f"unknown dataset {data_name!r}", sorted(DATASETS))
    cfg.validate()
    return cfg


def to_container(cfg: EbmScaleConfig) -> dict:
    """Plain nested dict (for YAML artifacts, Ray object transfer, MLflow params)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "space":
            out.update(flatten(v, key + "."))
        elif k == "space":
            continue  # the search space itself is logged as an artifact, not as params
        else:
            out[key] = v
    return out


def set_dotted(container: dict, dotted: str, value: Any) -> None:
    node = container
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


# --- composing with Hydra ------------------------------------------------------------------------------

def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore: `config.yaml` extends `ebm_scale_schema`, and each
    `method/<name>.yaml` extends `method/<name>_schema`, so every key can be overridden from the command
    line even when the YAML does not spell it out."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="ebm_scale_schema", node=EbmScaleConfig)
    for name, cls in METHODS.items():
        store.store(group="method", name=f"{name}_schema", node=cls.config_class)


def compose(config: str | None, overrides: list[str] | None = None, *, single_run: bool = False) -> EbmScaleConfig:
    """Compose a named sweep (`quickstart`), a YAML path, or (None) the base `config.yaml`, apply overrides,
    and return the checked config. Raises ConfigError for anything wrong.

    single_run: one run with the sweep's settings — its search space, trial count and early stopping are
    dropped before validation (so a grace period longer than a shortened run is no error). Done here, not by
    a `search.space={}` override: Hydra merges a dict override into the sweep's space and keeps every key."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = list(overrides or [])
    if single_run:
        overrides += ["search.num_samples=1", "search.scheduler.kind=fifo"]
    base = sweeps_dir()
    config_dir, config_name = str(base), "config"
    if config:
        as_path = Path(config)
        if as_path.suffix in (".yaml", ".yml") or os.sep in config:
            if not as_path.is_file():
                raise ConfigError("config", f"no such sweep file: {config}")
            config_dir, config_name = str(as_path.resolve().parent), as_path.stem
            if Path(config_dir) != base:
                overrides.append(f"hydra.searchpath=[file://{base}]")
        else:
            config_name = config
            if not (base / f"{config}.yaml").is_file():
                named = sorted(p.stem for p in base.glob("*.yaml"))
                raise ConfigError("sweep", f"unknown sweep {config!r}", named)
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            raw = hydra_compose(config_name=config_name, overrides=overrides)
    except HydraException as err:
        text = str(err)
        detail = _first_line(str(err.__cause__)) if err.__cause__ is not None else ""
        message = _first_line(text) + (f": {detail}" if detail else "")
        raise ConfigError(_override_key(text), message, _group_options(base, text)) from None
    finally:
        GlobalHydra.instance().clear()
    if single_run:
        raw.search.space = {}
    return from_dictconfig(raw)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0]


def _override_key(message: str) -> str:
    """The dotted key (or config group) a Hydra error is about."""
    for pattern in (r"full_key: ([\w.]+)", r"Could not override '([\w.]+)'", r"Error merging override ([\w.]+)=", r"Could not append to config\. An item is already at '([\w.]+)'",
                    r"Could not find '(\w+)/", r"In '(\w+)/"):
        found = re.search(pattern, message)
        if found:
            return found.group(1)
    return "overrides"


def _group_options(base: Path, message: str):
    group = _override_key(message).split(".")[0]
    if not re.search(r"Could not find '\w+/", message):
        return None
    folder = base / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else None

