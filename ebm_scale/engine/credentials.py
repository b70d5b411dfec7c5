"""AWS keys in the environment must not reach Ray's logs. Tune copies AWS_ACCESS_KEY_ID / _SECRET_ACCESS_KEY /
_SESSION_TOKEN from the driver's environment into every trial actor's runtime_env (ray.tune.execution.
class_cache), and Ray's runtime_env_agent.log, in a world-readable session folder, prints runtime envs whole.

The supported way around it is the AWS SDKs' own: credentials in a shared-credentials file instead of
variables. Before Ray starts, keys found in the environment move into a private file (mode 600, in a mode-700
folder, removed at exit) that AWS_SHARED_CREDENTIALS_FILE names; boto3, pyarrow's S3 (the AWS C++ SDK) and
MLflow read it through the standard chain, and processes of a local Ray inherit the file's path, not the keys.
Nodes of a remote cluster use their own credentials (instance profile, IAM role, credentials file).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# What the file holds for each variable (the AWS config-file key names).
KEYS = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token",
    "AWS_SECURITY_TOKEN": "aws_security_token",
}


def move_aws_keys_to_file() -> Path | None:
    """Move AWS keys from this process's environment into a private credentials file; the file's path, or None
    when the environment holds no keys. The profile written is the one the SDKs would use (AWS_PROFILE)."""
    found = {var: os.environ[var] for var in KEYS if os.environ.get(var)}
    if "AWS_ACCESS_KEY_ID" not in found or "AWS_SECRET_ACCESS_KEY" not in found:
        return None
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
    folder = Path(tempfile.mkdtemp(prefix="ebm_scale-aws-"))  # mkdtemp: mode 700, this user's only
    path = folder / "credentials"
    lines = [f"[{profile}]"] + [f"{KEYS[var]} = {value}" for var, value in found.items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    for var in KEYS:
        os.environ.pop(var, None)
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(path)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return path
