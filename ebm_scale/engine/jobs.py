"""Runs inside `ray job submit`: stores that would vanish with the job are refused before anything starts.

`ray job submit --working-dir .` runs the entrypoint in a temporary copy of the folder, under the head's Ray
session (<temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/), which Ray deletes when
it no longer needs it, and which no other node sees. A store resolved inside it — the default
`sqlite:///mlflow.db` or `storage.path=ebm_runs`, both relative to the working directory — would lose the
sweep's runs and checkpoints. `check_job_stores` says so in one line naming the key.

Ray's job supervisor starts the entrypoint with RAY_JOB_CONFIG_JSON_ENV_VAR set (the job's runtime_env and
metadata; dashboard/modules/job/job_supervisor.py `_get_driver_env_vars`), for the driver only, not its
tasks and actors. No Ray import here: the in-process path must not import Ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from ebm_scale.errors import ConfigError

JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in the entrypoint's environment


def in_ray_job() -> bool:
    """Whether this process is the entrypoint of a Ray job (`ray job submit` / the Jobs API)."""
    return JOB_ENV_VAR in os.environ


def job_working_dir() -> Path | None:
    """The temporary copy of the job's working_dir this process runs in (the folder holding the cwd whose
    parent is Ray's runtime_resources/working_dir_files), or None outside a job or without a working_dir."""
    if not in_ray_job():
        return None
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if folder.parent.name == "working_dir_files" and folder.parent.parent.name == "runtime_resources":
            return folder
    return None


def _local_path(location: str, tracking: bool) -> Path | None:
    """The local file or folder a store location names (resolved against the cwd), or None if remote."""
    parsed = urlparse(location)
    if tracking and parsed.scheme == "sqlite":
        rest = location[len("sqlite:///") :] if location.startswith("sqlite:///") else ""
        if not rest or rest.startswith(":memory:"):
            return None
        path = Path(unquote(rest.split("?", 1)[0]))
    elif parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # http(s)://, s3://, postgresql://, databricks, ...
        return None
    else:  # a plain path (a one-letter "scheme" is a Windows drive)
        path = Path(location)
    return Path(os.path.abspath(path.expanduser())).resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_job_stores(tracking_uri: str, storage_path: str) -> None:
    """Inside a Ray job: a ConfigError (on `tracking.uri` or `storage.path`) when the store lies in the job's
    temporary working directory. Outside a job, or for remote stores, nothing."""
    folder = job_working_dir()
    if folder is None:
        return
    checks = (
        ("tracking.uri", tracking_uri, True, "an MLflow server, e.g. tracking.uri=http://<mlflow host>:5000"),
        ("storage.path", storage_path, False, "shared storage, e.g. storage.path=s3://<bucket>/<prefix>"),
    )
    for key, location, tracking, instead in checks:
        path = _local_path(location, tracking) if location else None
        if path is not None and _inside(path, folder):
            raise ConfigError(
                key,
                f"{location} lies in this Ray job's working directory ({folder}), a temporary copy that Ray "
                f"deletes after the job and that other nodes cannot see; use {instead}",
            )
