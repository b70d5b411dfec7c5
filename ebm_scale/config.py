"""Structured configuration: every knob has a type and a default, and is checked before anything launches.

Hydra composes the YAML tree in `sweeps/` (groups method/, data/, scaling/, search/, tracking/, storage/ plus
named sweeps); `compose()` then merges each section into its dataclass schema (wrong types and unknown keys
fail there, named by their dotted key) and `validate()` checks the values (impossible values fail there).
The method section's schema comes from the method registry, so a new method brings its own config class.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ebm_scale import schema
from ebm_scale.data import DataConfig
from ebm_scale.errors import ConfigError
from ebm_scale.methods import METHODS
from ebm_scale.metrics.toy import EvalConfig
from ebm_scale.schema import Config, Rule, knob

PACKAGE_DIR = Path(__file__).resolve().parent


def sweeps_dir() -> Path:
    """The config tree: shipped inside the wheel as ebm_scale/sweeps, or the repo's top-level sweeps/."""
    for candidate in (PACKAGE_DIR / "sweeps", PACKAGE_DIR.parent / "sweeps"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("cannot find the sweeps/ config tree next to the ebm_scale package")


@dataclass
class TrainConfig(Config):
    PREFIX = "train"

    iterations: int = knob(3000, ge=1)
    batch_size: int = knob(800, ge=1)
    eval_every: int = knob(500, ge=1)  # evaluate, checkpoint and report to Tune every this many iterations
    log_every: int = knob(50, ge=1)  # metrics to MLflow (batched, asynchronous) every this many iterations
    device: str = knob("auto", choices=("auto", "cpu", "cuda"), noun="device")
    threads: int = knob(1, ge=1)  # torch intra-op threads per process: concurrent trials share the cores
    # Methods that skip non-finite optimizer steps (paper 004): this many skipped iterations in a row end the
    # run as diverged, so a run that cannot recover stops instead of skipping forever.
    max_consecutive_skips: int = knob(50, ge=1)
    # GPU efficiency, the same code on CPU (CPU autocast is bf16 too, so the tests run this path).
    # bf16: network passes under torch.autocast; parameters, optimizer state and chain states stay fp32.
    # auto: bf16 on CUDA, fp32 on CPU (where bf16 autocast runs several times slower without native bf16).
    precision: str = knob("fp32", choices=("fp32", "bf16", "auto"), noun="precision")
    # MCMC / ODE energy evaluations inside samplers: fp32 by default even under precision=bf16, since a
    # chain's many small gradient steps accumulate bf16's rounding; bf16 trades that for speed.
    sampler_precision: str = knob("fp32", choices=("fp32", "bf16"), noun="sampler precision")
    channels_last: bool = False  # NHWC memory format for image networks and batches (faster convs on GPUs)
    # torch.compile each network's forward (in place: checkpoints keep their keys). Compiled graphs do not
    # support double backward, so methods that differentiate through their sampler cannot use it.
    compile: bool = False


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement-group strategies


@dataclass
class ScalingConfig(Config):
    """How one trial runs. num_workers 0 = in the Tune trial's own process; >= 1 = a TorchTrainer job."""

    PREFIX = "scaling"

    num_workers: int = knob(0, ge=0)
    use_gpu: bool = False
    cpus_per_worker: float = knob(1.0, gt=0)
    gpus_per_worker: float = knob(1.0, gt=0)  # used only with use_gpu
    driver_cpus: float = knob(1.0, ge=0)  # the Tune trial process (in-process: it does the training)
    backend: str = knob("auto", choices=("auto", "gloo", "nccl"), noun="backend")  # auto: nccl on GPU, else gloo
    collective_timeout_s: int = knob(600, ge=1)  # a hung all-reduce fails (and is retried) instead of blocking
    max_failures: int = knob(1, ge=0)  # retries of a crashed trial, from its last checkpoint
    # How a trial's workers spread over nodes: SPREAD puts them on different nodes where it can (STRICT_: must).
    placement_strategy: str = knob("PACK", choices=PLACEMENT_STRATEGIES, noun="placement strategy")
    accelerator_type: str | None = None  # e.g. A100, H100: only nodes with that accelerator take the workers
    # Custom Ray resources the trial's driver holds besides driver_cpus, e.g. {trial_driver: 1} to put drivers on
    # a head node started with CPU 0 and that resource (the shipped cluster configs): the head then trains nothing.
    driver_resources: Any = None  # None = {}

    def rules(self):
        yield Rule("backend", not (self.backend == "nccl" and not self.use_gpu), "nccl needs scaling.use_gpu=true")
        resources = self.driver_resources if self.driver_resources is not None else {}
        yield Rule(
            "driver_resources",
            isinstance(resources, dict)
            and all(
                isinstance(k, str) and k not in ("CPU", "GPU", "memory") and isinstance(v, (int, float)) and v >= 0
                for k, v in resources.items()
            ),
            "must map custom resource names to amounts >= 0, e.g. {trial_driver: 1} "
            f"(CPUs and GPUs have their own keys), got {resources!r}",
        )
        yield Rule(
            "placement_strategy",
            self.num_workers >= 1 or self.placement_strategy == "PACK",
            "places a TorchTrainer's workers: set scaling.num_workers >= 1",
        )
        yield Rule(
            "use_gpu",
            not (self.use_gpu and self.num_workers == 0),
            "GPU trials run as TorchTrainer jobs: set scaling.num_workers >= 1",
        )

    def driver_bundle(self) -> dict[str, float]:
        """What the trial's driver process holds (Tune's with_resources)."""
        cpus = max(self.driver_cpus, 1e-3) if self.num_workers == 0 else self.driver_cpus
        return {"CPU": cpus, **{k: float(v) for k, v in (self.driver_resources or {}).items()}}

    def trial_resources(self) -> dict[str, float]:
        """Logical resources one trial holds at once: its driver plus its workers."""
        need = self.driver_bundle()
        if self.num_workers == 0:
            return need
        gpus = self.num_workers * self.gpus_per_worker if self.use_gpu else 0.0
        need = {**need, "CPU": need["CPU"] + self.num_workers * self.cpus_per_worker, "GPU": gpus}
        if self.accelerator_type:  # Ray's own marker resource: each worker asks for 0.001 of it
            need[f"accelerator_type:{self.accelerator_type}"] = 0.001 * self.num_workers
        return need


SCHEDULERS = ("asha", "fifo")
SEARCH_ALGOS = ("optuna", "random")
# distribution → the numbers it takes ([low, high] or [low, high, q]); None: a list of values
DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "randint": 2, "qrandint": 3, "choice": None, "grid": None}
FLOAT_DISTRIBUTIONS = ("uniform", "loguniform")


@dataclass
class SchedulerConfig(Config):
    PREFIX = "search.scheduler"

    kind: str = knob("asha", choices=SCHEDULERS, noun="scheduler")
    grace_period: int = knob(500, ge=1)  # training iterations a trial gets before ASHA may stop it
    reduction_factor: float = knob(3.0, gt=1)
    max_t: int | None = knob(None, ge=1, note="or null = train.iterations")


@dataclass
class SearchConfig(Config):
    PREFIX = "search"

    algo: str = knob("optuna", choices=SEARCH_ALGOS, noun="search algorithm")  # optuna (TPE) | random
    metric: str = "eval/sinkhorn"
    mode: str = knob("min", choices=("min", "max"), noun="mode")
    num_samples: int = knob(1, ge=1)
    max_concurrent_trials: int | None = knob(None, ge=1, note="or null for automatic")  # null: what fits at once
    seed: int = 0
    multivariate: bool = True  # multivariate TPE: models interactions (step size × steps matters for EBMs)
    n_startup_trials: int = knob(4, ge=0)  # random trials before TPE starts modelling
    # dotted config key -> {distribution: [args]}. Typed Any so that a malformed space reaches the checks
    # below (which name the key) instead of failing inside OmegaConf's merge.
    space: Any = None  # None = {} (no search)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @property
    def num_trials(self) -> int:
        """Trials the sweep runs: Tune repeats every grid combination num_samples times."""
        n = self.num_samples
        for spec in self.space.values():
            ((name, args),) = spec.items()
            n *= len(args) if name == "grid" else 1
        return n

    def rules(self):
        yield Rule(
            "space",
            isinstance(self.space, dict),
            f"must be a mapping of dotted config keys to distributions, like "
            f"{{method.sampler.step_size: {{loguniform: [1e-3, 1.0]}}}}, got {type(self.space).__name__}",
        )
        for key, spec in self.space.items():  # a space that is no mapping stopped at the rule above
            where = f"space.{key}"
            one = isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS
            yield Rule(
                where, one, "must be one distribution and its arguments, like {loguniform: [1e-3, 1.0]}", DISTRIBUTIONS
            )
            ((name, args),) = spec.items()
            arity = DISTRIBUTIONS[name]
            form = "a list of values" if arity is None else "[low, high]" if arity == 2 else "[low, high, q]"
            fits = isinstance(args, list) and len(args) >= 1
            if arity is not None:
                fits = fits and len(args) == arity and _numbers(args) and args[0] < args[1]
            yield Rule(where, fits, f"{name} needs {form}" + (" with low < high" if arity else "") + f", got {args}")
            yield Rule(where, name != "loguniform" or args[0] > 0, f"loguniform needs low > 0, got {args[0]}")
            yield Rule(where, name != "qrandint" or args[2] >= 1, f"qrandint needs a step q >= 1, got {args[-1]}")
            yield Rule(
                where,
                name != "grid" or self.algo == "random",
                "grid runs every value (× num_samples) and needs search.algo=random",
            )


def _numbers(args: list) -> bool:
    return all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)


TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


@dataclass
class TrackingConfig(Config):
    PREFIX = "tracking"

    uri: str | None = None  # None = sqlite:///<absolute cwd>/mlflow.db, resolved once by the driver
    # tracking=server: a server's http(s) address is required (MLFLOW_TRACKING_URI or uri); never a local fallback.
    require_server: bool = False
    experiment: str | None = None  # None = the sweep's name
    async_logging: bool = True  # MLflow's asynchronous logging: a metric write never blocks a step
    # A new experiment's artifact root (e.g. s3://bucket/mlflow); None = the store's or server's default.
    artifact_location: str | None = None

    def rules(self):
        if self.uri is not None:
            yield Rule(
                "uri", _uri_problem(self.uri) is None, f"{_uri_problem(self.uri)}, got {self.uri!r}", TRACKING_SCHEMES
            )
        yield Rule(
            "uri",
            not self.require_server or (self.uri or "").startswith(("http://", "https://")),
            "tracking=server needs the server's address: export MLFLOW_TRACKING_URI=http://HOST:5000 or set "
            f"tracking.uri=http://HOST:5000 (got {self.uri!r})",
        )
        if self.artifact_location is not None:
            yield Rule(
                "artifact_location",
                "://" in self.artifact_location or self.artifact_location.startswith("/"),
                f"must be a URI such as s3://bucket/mlflow or an absolute path, got {self.artifact_location!r}",
            )

    def resolved_uri(self) -> str:
        if self.uri:
            if self.uri.startswith("sqlite:///") and not self.uri.startswith("sqlite:////"):
                # Relative SQLite paths mean different files in different working directories (Ray workers
                # run elsewhere): pin it to an absolute path once, here.
                return "sqlite:///" + str(Path(self.uri[len("sqlite:///") :]).resolve())
            return self.uri
        return "sqlite:///" + str(Path.cwd().resolve() / "mlflow.db")


def _uri_problem(uri: str) -> str | None:
    """Why `uri` is no MLflow tracking URI (well-formedness only; reachability is the sweep's check)."""
    parsed = urlparse(uri)
    if not parsed.scheme or any(c.isspace() for c in uri):
        return "must be a URI like sqlite:///mlflow.db or http://host:5000"
    if parsed.scheme not in TRACKING_SCHEMES and parsed.scheme.split("+")[0] not in TRACKING_SCHEMES:
        return f"unknown scheme {parsed.scheme!r}"
    if parsed.scheme in ("http", "https") and not parsed.hostname:
        return "an http(s) URI needs a host"
    if parsed.scheme == "sqlite" and not uri.startswith("sqlite:///"):
        return "a SQLite URI is sqlite:///relative/path.db or sqlite:////absolute/path.db"
    return None


@dataclass
class StorageConfig(Config):
    PREFIX = "storage"

    path: str = "ebm_runs"  # local folder (relative to cwd) or s3://bucket/prefix

    def rules(self):
        yield Rule("path", _path_problem(self.path) is None, f"{_path_problem(self.path)}")

    def resolved_path(self) -> str:
        if "://" in self.path:
            return self.path
        return str(Path(self.path).expanduser().resolve())


def _path_problem(path: str) -> str | None:
    """A local storage folder must exist as a folder or be creatable; checked by creating (and removing) a
    scratch folder in its nearest existing parent, so nothing is left behind."""
    if not path:
        return "must not be empty"
    if "://" in path:
        return None  # remote stores are checked by the sweep, which can reach them
    target = Path(path).expanduser().resolve()
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"{existing} is a file, not a folder, so {path!r} cannot be created"
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".ebm_scale_check_", dir=existing))
    except OSError as err:
        return f"cannot create folders under {existing} ({err.strerror})"
    return None


@dataclass
class DebugConfig(Config):
    """Fault injection, so the failure paths can be exercised on purpose (tests, drills)."""

    PREFIX = "debug"

    nan_at_step: int | None = None  # poison the weights with NaN at this iteration → the trial diverges
    crash_once_at_step: int | None = None  # raise once at this iteration → the trial is retried from its checkpoint
    # The last rank stops answering once at this iteration (a hung collective on the others): scaling.
    # collective_timeout_s fails the step and the worker group restarts from its checkpoint. TorchTrainer only.
    hang_once_at_step: int | None = None


MAX_NAME = 100  # the name is a folder name (plus a timestamp) and an MLflow experiment name


@dataclass
class EbmScaleConfig(Config):
    name: str = "train"
    seed: int = knob(0, ge=0)
    method: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def rules(self):
        yield Rule("name", _name_problem(self.name) is None, str(_name_problem(self.name)))
        s = self.search
        yield Rule(
            "search.scheduler.grace_period",
            s.scheduler.kind != "asha" or s.scheduler.grace_period <= self.train.iterations,
            f"({s.scheduler.grace_period}) exceeds train.iterations ({self.train.iterations})",
        )
        # The FID metric's name follows its extractor: a sweep ranking on the other name would see no metric.
        fd = {"inception": "eval/fid", "random": "eval/fd_random"}
        other = {v: k for k, v in fd.items()}.get(s.metric)
        yield Rule(
            "search.metric",
            other is None or other == self.eval.fid.extractor,
            f"{s.metric} is what eval.fid.extractor={other} reports, but the extractor is "
            f"{self.eval.fid.extractor} (which reports {fd[self.eval.fid.extractor]})",
        )
        yield Rule(
            "debug.hang_once_at_step",
            self.debug.hang_once_at_step is None or self.scaling.num_workers >= 2,
            "hangs one rank of a TorchTrainer: it needs scaling.num_workers >= 2",
        )
        yield Rule(
            "search.space",
            bool(s.space) or s.num_samples == 1,
            f"is empty, so all {s.num_samples} trials would train the same config: add keys to search.space, "
            f"or use search=single for one run",
        )


def _name_problem(name: str) -> str | None:
    if not name or name in (".", ".."):
        return f"must be a non-empty name, got {name!r}"
    if len(name) > MAX_NAME:
        return f"must be at most {MAX_NAME} characters (it names folders and the MLflow experiment), got {len(name)}"
    if any(c in "/\\" or not c.isprintable() for c in name):
        return f"must be usable as a folder name (no '/', '\\' or control characters), got {name!r}"
    return None


def check_search_space(cfg: EbmScaleConfig) -> None:
    """Every value the search can give a key must be one that key accepts (type and declared bounds), so a
    bad space fails here, not in every trial."""
    for key, spec in cfg.search.space.items():
        where = f"search.space.{key}"
        ((dist_name, args),) = spec.items()
        if dist_name in FLOAT_DISTRIBUTIONS and schema.is_integer_field(cfg, key):
            raise ConfigError(where, f"{dist_name} draws floats, but {key} is an integer: use randint or qrandint")
        values = list(args[:2]) if dist_name in ("uniform", "loguniform", "randint", "qrandint") else list(args)
        for value in values:
            schema.check_search_value(cfg, key, value, where)


# --- from Hydra's DictConfig to checked dataclasses -----------------------------------------------------


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
        if isinstance(err, ConfigKeyError):
            allowed = sorted(schema_cls.__dataclass_fields__)
            parent = full.rsplit(".", 1)[0] if "." in full else prefix
            raise ConfigError(full, f"unknown key under {parent or 'the config'}: {msg}", allowed) from None
        raise ConfigError(full, msg) from None


# Keys that were renamed: using the old name is an error that says the new one.
RENAMED = {"net": "method.energy (ddaebm: method.energy, method.generator, method.encoder)"}


def _check_renamed(method_section: Any, space: Any) -> None:
    keys = [f"method.{k}" for k in method_section] + [k for k in (space or {}) if isinstance(k, str)]
    for key in keys:
        parts = key.split(".")
        if len(parts) >= 2 and parts[0] == "method" and parts[1] in RENAMED:
            raise ConfigError(f"method.{parts[1]}", f"was renamed to {RENAMED[parts[1]]}")


def from_dictconfig(raw: DictConfig | dict) -> EbmScaleConfig:
    """Typed, validated config from a composed DictConfig (or plain dict)."""
    raw = OmegaConf.create(OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else raw)
    raw_method = raw.get("method") or {}
    method_name = raw_method.get("name") if isinstance(raw_method, (dict, DictConfig)) else None
    if method_name not in METHODS:
        raise ConfigError("method.name", f"unknown method {method_name!r}", sorted(METHODS))
    _check_renamed(raw_method, (raw.get("search") or {}).get("space"))
    method = _merge_into(METHODS[method_name].config_class, raw_method, "method")
    rest = {k: v for k, v in raw.items() if k != "method"}
    unknown = set(rest) - set(EbmScaleConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown top-level key", sorted(EbmScaleConfig.__dataclass_fields__))
    cfg = _merge_into(EbmScaleConfig, rest, "")
    cfg.method = method
    if cfg.search.space is None:
        cfg.search.space = {}
    cfg.validate()
    check_search_space(cfg)
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
    dropped before validation (so a grace period longer than a shortened run is no error).

    `search.space` overrides are applied here, after Hydra: a space entry's key has dots of its own, and
    Hydra would merge a new distribution into the old one instead of replacing it.
        search.space={method.sampler.steps: {randint: [5, 25]}}     the whole space
        search.space.method.sampler.steps={randint: [5, 25]}        one entry (set or replace)
        ~search.space.method.sampler.steps                          drop one entry"""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException

    base = sweeps_dir()
    hydra_overrides, space_edits = _split_overrides(list(overrides or []), base)
    if single_run:
        hydra_overrides += ["search.num_samples=1", "search.scheduler.kind=fifo"]
    config_dir, config_name = str(base), "config"
    if config:
        as_path = Path(config)
        if as_path.suffix in (".yaml", ".yml") or os.sep in config:
            if not as_path.is_file():
                raise ConfigError("config", f"no such sweep file: {config}")
            config_dir, config_name = str(as_path.resolve().parent), as_path.stem
            if Path(config_dir) != base:
                hydra_overrides.append(f"hydra.searchpath=[file://{base}]")
        else:
            config_name = config
            if not (base / f"{config}.yaml").is_file():
                named = sorted(p.stem for p in base.glob("*.yaml"))
                raise ConfigError("sweep", f"unknown sweep {config!r}", named)
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            raw = hydra_compose(config_name=config_name, overrides=hydra_overrides)
    except yaml.YAMLError as err:
        raise _yaml_error(err) from None
    except MissingConfigException as err:  # a defaults list naming a config that does not exist
        group = Path(err.missing_cfg_file or "").parent.name or "config"
        raise ConfigError(
            group, _first_line(str(err)), list(err.options) if err.options else _group_options(base, group)
        ) from None
    except HydraException as err:
        if isinstance(err.__cause__, yaml.YAMLError):
            raise _yaml_error(err.__cause__) from None
        text = str(err)
        detail = _first_line(str(err.__cause__)) if err.__cause__ is not None else ""
        message = _first_line(text) + (f": {detail}" if detail else "")
        raise ConfigError(_override_key(text), message) from None
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.set_struct(raw, False)
    if single_run:
        raw.search.space = {}
    else:
        _apply_space_edits(raw, space_edits)
    return from_dictconfig(raw)


def _split_overrides(overrides: list[str], base: Path) -> tuple[list[str], list]:
    """Parse the overrides with Hydra's own parser (not its messages): config-group choices are checked here
    against the files in sweeps/<group>/, and search.space edits are taken out for `_apply_space_edits`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    parser = OverridesParser.create()
    groups = {p.name for p in base.iterdir() if p.is_dir()}
    keep, space_edits = [], []
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~")
        try:
            parsed = parser.parse_override(text)
        except HydraException as err:  # OverrideParseException, or the lexer's own error
            detail = err.message if isinstance(err, OverrideParseException) else str(err)
            if not text.isascii():
                detail = "a value with non-ASCII characters must be quoted, e.g. name='héllo'"
            raise ConfigError(
                key or "overrides", f"cannot parse the override {text!r}: {_first_line(detail)}"
            ) from None
        key = parsed.key_or_group
        parts = key.split(".")
        if len(parts) >= 2 and parts[0] == "method" and parts[1] in RENAMED:
            raise ConfigError(f"method.{parts[1]}", f"was renamed to {RENAMED[parts[1]]}")
        if not key:
            raise ConfigError("overrides", f"{text!r} names no key: write key=value, e.g. train.iterations=500")
        if key == "search.space" or key.startswith("search.space."):
            space_edits.append((key[len("search.space.") :] if key != "search.space" else None, parsed))
            continue
        if key in groups and not parsed.is_delete():
            value = parsed.value()
            options = _group_options(base, key)
            if not isinstance(value, str):
                raise ConfigError(key, f"names a config in sweeps/{key}/, got {value!r}", options)
            if value not in options:
                raise ConfigError(key, f"unknown {key} config {value!r}", options)
        keep.append(text)
    return keep, space_edits


def _apply_space_edits(raw: DictConfig, edits: list) -> None:
    for entry, parsed in edits:
        value = None if parsed.is_delete() else parsed.value()
        if entry is None:
            raw.search.space = {} if value is None else value
        elif parsed.is_delete():
            if entry not in raw.search.space:
                raise ConfigError(
                    f"search.space.{entry}",
                    "is not in the search space, so it cannot be removed",
                    sorted(raw.search.space),
                )
            del raw.search.space[entry]
        else:
            if not isinstance(raw.search.space, DictConfig):
                raise ConfigError("search.space", "must be a mapping before entries can be set in it")
            raw.search.space[entry] = value


def _yaml_error(err: Exception) -> ConfigError:
    """A YAML syntax error as one line: file, line, column and what the parser found (from its marks)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or _first_line(str(err))
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "a sweep file"
    if "\\t" in problem:  # the parser names the tab as an escape
        problem += " (indent YAML with spaces, not tabs)"
    return ConfigError("config", f"YAML syntax error in {where}: {problem}")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _override_key(message: str) -> str:
    """The dotted key a Hydra composition error is about. Hydra gives no structured key for these; the
    patterns are pinned by tests/test_config.py, so a Hydra upgrade that changes them fails loudly."""
    for pattern in (
        r"full_key: ([\w.]+)",
        r"Could not override '([\w.]+)'",
        r"Error merging override ([\w.]+)=",
        r"Could not append to config\. An item is already at '([\w.]+)'",
    ):
        found = re.search(pattern, message)
        if found:
            return found.group(1)
    return "overrides"


def _group_options(base: Path, group: str) -> list[str] | None:
    folder = base / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else None
