"""Read-only inputs that may live in S3 (data sets, stage-1 backbones, classifier weights): one local copy per node.

`fetch_to_cache("s3://bucket/key")` downloads an object (or, for `s3://bucket/prefix/`, every object under the
prefix) once into `<cache>/<kind>/<bucket>/<key>` and returns that local path; a local path or `file://` URI is
returned as it is. The cache root is `$EBM_SCALE_CACHE`, else `~/.cache/ebm_scale`.

Several workers of one node may ask for the same URI at the same moment: a `flock` on a lock file next to the
target lets one of them download while the others wait, the download goes to a temporary name that is renamed
into place, and a completion marker written after the rename is what every caller checks, so no reader ever
sees a partial file. The cache is keyed by URI only: inputs are treated as immutable (a changed object under the
same key needs a new key, or the cached copy deleted).

Credentials and endpoints come from boto3's (botocore's) standard chain only (environment, shared files, instance roles;
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` for S3-compatible stores, read by botocore itself since 1.31).
"""

import fcntl
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

DEFAULT_CACHE = "~/.cache/ebm_scale"
_LOADER = None


class RemoteError(RuntimeError):
    """A remote input that cannot be read: missing bucket or key, no access, unreachable endpoint. Names the URI."""


def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key"); the key keeps a trailing slash (it marks a prefix)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise RemoteError(f"{uri}: not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get("EBM_SCALE_CACHE") or DEFAULT_CACHE).expanduser().absolute()


def local_path(uri: str | os.PathLike) -> Path:
    """A local path or file:// URI, expanded and absolute; FileNotFoundError naming it when it is missing."""
    text = str(uri)
    if text.startswith("file://"):
        text = unquote(urlparse(text).path)
    path = Path(text).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"{uri}: no such file or directory ({path})")
    return path


def fetch_to_cache(uri: str | os.PathLike, kind: str = "data", cache_dir: str | os.PathLike | None = None) -> Path:
    """The local path of `uri`: itself when local, else the node's cached copy (downloaded on first use).

    `s3://bucket/key` names an object, or a prefix when it ends in `/` or no object has that exact key (then the
    cached path is a folder mirroring the objects under `key/`).
    """
    if not is_remote(str(uri)):
        return local_path(uri)
    uri = str(uri)
    bucket, key = split_s3(uri)
    target = cache_root(cache_dir) / kind / bucket / (key.strip("/") or "_bucket")
    marker = target.parent / f".{target.name}.complete"
    if marker.exists():  # the common case on every call after the first: no lock, no request
        return target
    with node_lock(target):
        if not marker.exists():  # another process may have finished while we waited
            _download(uri, bucket, key, target)
            marker.touch()
    return target


@contextmanager
def node_lock(target: Path):
    """Exclusive among this node's processes for `target` (a lock file beside it); others wait here."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if the holder dies mid-download
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def exists(uri: str | os.PathLike) -> bool:
    """Whether `uri` names an existing local path, S3 object or non-empty S3 prefix (one request, no download)."""
    if not is_remote(str(uri)):
        try:
            local_path(uri)
        except FileNotFoundError:
            return False
        return True
    bucket, key = split_s3(str(uri))
    client = _client()
    with _errors(str(uri), missing_ok=True):
        if key and not key.endswith("/"):
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except _client_error() as error:
                if _status(error) != 404:
                    raise
        prefix = key.rstrip("/") + "/" if key else ""
        return client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0) > 0
    return False  # only reached when the bucket itself is missing


def _download(uri: str, bucket: str, key: str, target: Path) -> None:
    client = _client()
    temp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    # We hold the lock: any temporary left here was abandoned by a process that died mid-download.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    _remove(target)  # a copy without a marker is incomplete
    from boto3.s3.transfer import S3Transfer

    with _errors(uri), S3Transfer(client) as transfer:
        if key and not key.endswith("/") and _is_object(client, bucket, key):
            log.info("downloading %s to %s", uri, target)
            transfer.download_file(bucket, key, str(temp))
        else:
            prefix = key.rstrip("/") + "/" if key else ""
            objects = [
                item["Key"]
                for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for item in page.get("Contents", [])
                if not item["Key"].endswith("/")  # folder placeholders some tools create
            ]
            if not objects:
                raise RemoteError(f"{uri}: no such object or prefix")
            log.info("downloading %s (%d objects) to %s", uri, len(objects), target)
            for name in objects:
                relative = Path(name[len(prefix) :])
                if relative.is_absolute() or ".." in relative.parts:  # a key must not write outside the cache
                    raise RemoteError(f"{uri}: object key {name!r} leaves the prefix")
                destination = temp / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                transfer.download_file(bucket, name, str(destination))
    os.replace(temp, target)


def _is_object(client, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
    except _client_error() as error:
        if _status(error) == 404:
            return False
        raise
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _client():
    import botocore.loaders
    import botocore.session

    global _LOADER
    # A fresh session per call reads the environment as it is now (credentials, AWS_ENDPOINT_URL*); the shared
    # loader keeps the parsed S3 service model, which costs ~0.4 s to load per session otherwise.
    _LOADER = _LOADER or botocore.loaders.create_loader()
    session = botocore.session.Session()
    session.register_component("data_loader", _LOADER)
    return session.create_client("s3")


def _client_error():
    from botocore.exceptions import ClientError

    return ClientError


def _status(error) -> int | None:
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


class _errors:
    """Turns botocore's exceptions into RemoteError naming the URI (message and error code, never credentials)."""

    def __init__(self, uri: str, missing_ok: bool = False):
        self.uri = uri
        self.missing_ok = missing_ok

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(error, ClientError):
            code = error.response.get("Error", {}).get("Code", "")
            if self.missing_ok and code == "NoSuchBucket":
                return True
            reason = {"404": "no such object", "NoSuchKey": "no such object", "NoSuchBucket": "no such bucket"}
            raise RemoteError(f"{self.uri}: {reason.get(code, error)}") from error
        if isinstance(error, BotoCoreError | Boto3Error):  # unreachable endpoint, no credentials, bad config
            raise RemoteError(f"{self.uri}: {error}") from error
        return False
