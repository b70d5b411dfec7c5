"""Two-stage runs: find (or first train) the backbone a stage-2 method stands on, once per sweep.

A reference is one of
    runs:/<run_id>/backbone        the `backbone` artifact a `vae` / `flow` run logs at its end (any MLflow store)
    s3://bucket/.../backbone.pt    or any other pyarrow filesystem URI
    /path/to/backbone.pt           or the folder holding it
The sweep process resolves and checks it before any trial starts (wrong kind or data shape → ConfigError on
`method.backbone`); each trial (and each TorchTrainer worker, which may be on another node) resolves it again
into a local cache, so trials share one download per machine. An empty reference makes the sweep pretrain the
backbone first as its own run in the same MLflow experiment (engine/run.py), then share that with every trial.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

from ebm_scale.config import EbmScaleConfig
from ebm_scale.errors import ConfigError
from ebm_scale.methods import METHODS
from ebm_scale.methods.backbone import FILE_NAME

CACHE = Path(os.environ.get("EBM_SCALE_CACHE", Path.home() / ".cache" / "ebm_scale")) / "backbones"


def backbone_kind(cfg: EbmScaleConfig) -> str | None:
    return METHODS[cfg.method.name].backbone_kind


def resolve_backbone(ref: str, tracking_uri: str) -> str:
    """A local path to the referenced backbone.pt (downloaded once into the cache when remote)."""
    if ref.startswith("runs:/"):
        key = ref[len("runs:/") :].strip("/")
        return _cached(key, lambda dst: _download_mlflow(ref, tracking_uri, dst))
    if "://" in ref and not ref.startswith("file://"):
        key = ref.split("://", 1)[1].strip("/")
        return _cached(key, lambda dst: _download_pyarrow(ref, dst))
    path = Path(ref.removeprefix("file://")).expanduser()
    return str(path / FILE_NAME if path.is_dir() else path)


def _cached(key: str, fetch) -> str:
    target = CACHE / key.replace(":", "_")
    found = _find_file(target)
    if found:
        return found
    CACHE.mkdir(parents=True, exist_ok=True)
    # Download next to the target, then rename: concurrent trials on one machine never see half a file.
    tmp = tempfile.mkdtemp(dir=CACHE)
    try:
        fetch(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another trial got there first; its copy is just as good
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = _find_file(target)
    if not found:
        raise ConfigError("method.backbone", f"nothing named {FILE_NAME} under the downloaded {key!r}")
    return found


def _find_file(root: Path) -> str | None:
    if root.is_file():
        return str(root)
    if root.is_dir():
        hits = sorted(root.rglob(FILE_NAME))
        return str(hits[0]) if hits else None
    return None


def _download_mlflow(ref: str, tracking_uri: str, dst: str) -> None:
    import mlflow

    try:
        mlflow.artifacts.download_artifacts(artifact_uri=ref, tracking_uri=tracking_uri, dst_path=dst)
    except Exception as err:  # MlflowException, missing run, missing artifact: say which reference failed
        raise ConfigError(
            "method.backbone", f"cannot fetch {ref!r} from the MLflow store {tracking_uri}: {str(err).splitlines()[0]}"
        ) from None


def _download_pyarrow(ref: str, dst: str) -> None:
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(ref)
        info = fs.get_file_info(path)
        if info.type == pyarrow.fs.FileType.Directory:
            path = path.rstrip("/") + "/" + FILE_NAME
        elif info.type == pyarrow.fs.FileType.NotFound:
            raise ConfigError("method.backbone", f"no backbone at {ref!r}")
        with fs.open_input_stream(path) as src, open(os.path.join(dst, FILE_NAME), "wb") as out:
            shutil.copyfileobj(src, out)
    except (OSError, ValueError) as err:  # unknown host, no such bucket, access denied: the store's one line
        raise ConfigError("method.backbone", f"cannot read {ref!r}: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def stage1_config(cfg: EbmScaleConfig) -> EbmScaleConfig:
    """The one-run config that trains `cfg`'s backbone: same data, seed, scaling and stores; the stage-1
    method built by the stage-2 method from its `pretrain` and architecture sections."""
    stage1 = copy.deepcopy(cfg)
    p = cfg.method.pretrain
    stage1.method = METHODS[cfg.method.name].backbone_method_config(cfg.method)
    stage1.name = f"{cfg.name}_backbone"
    stage1.tracking.experiment = cfg.tracking.experiment or cfg.name  # the same experiment as the trials
    stage1.train.iterations = p.iterations
    # Four evaluations, not one at the end: each prints a line and is a checkpoint.
    stage1.train.eval_every = max(1, -(-p.iterations // 4))
    stage1.train.batch_size = p.batch_size or cfg.train.batch_size
    stage1.search.space, stage1.search.num_samples = {}, 1
    stage1.search.scheduler.kind = "fifo"
    stage1.eval.mcmc.when = "never"
    return stage1
