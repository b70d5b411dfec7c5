"""ebm_scale.remote against a real S3-compatible server (moto, 127.0.0.1): objects, prefixes, the node cache."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from s3server import s3_fixture, s3_server_fixture  # noqa: F401

from ebm_scale.remote import RemoteError, exists, fetch_to_cache


def dead_endpoint() -> str:
    """An address where nothing listens: any request sent there fails at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def tree(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def make_dir(root, sizes: dict[str, int]):
    for i, (name, size) in enumerate(sizes.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([i % 251]) * size + os.urandom(16))
    return root


def test_object_is_downloaded_into_the_cache(s3, tmp_path):
    uri = s3.put("models/backbone.pt", b"weights")
    path = fetch_to_cache(uri, kind="backbones")
    assert path == tmp_path / "cache" / "backbones" / s3.bucket / "models" / "backbone.pt"
    assert path.read_bytes() == b"weights"
    assert not list(path.parent.glob(".*.tmp-*"))  # the temporary was renamed, not left behind


def test_prefix_is_downloaded_as_a_folder(s3, tmp_path):
    local = make_dir(tmp_path / "src", {"train.bin": 100, "sub/test.bin": 50, "meta.json": 10})
    for uri in (s3.upload_dir(local, "data/set"), s3.uri("data/set")):  # with and without the trailing slash
        path = fetch_to_cache(uri, cache_dir=tmp_path / f"cache-{uri.endswith('/')}")
        assert path.is_dir() and path.name == "set"
        assert tree(path) == tree(local)


def test_second_call_is_a_cache_hit_with_no_request(s3, monkeypatch):
    uri = s3.put("x/blob", b"abc")
    first = fetch_to_cache(uri)
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead_endpoint())  # the store is gone: only the cache can answer
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert fetch_to_cache(uri) == first
    assert first.read_bytes() == b"abc"
    with pytest.raises(RemoteError, match="x/other"):  # ...and a request really would have failed
        fetch_to_cache(s3.uri("x/other"))


def test_missing_key_and_bucket_name_the_uri(s3):
    with pytest.raises(RemoteError, match=f"s3://{s3.bucket}/no/such/key: no such object"):
        fetch_to_cache(s3.uri("no/such/key"))
    with pytest.raises(RemoteError, match="s3://no-such-bucket-here/k: no such bucket"):
        fetch_to_cache("s3://no-such-bucket-here/k")
    assert not exists(s3.uri("no/such/key")) and not exists("s3://no-such-bucket-here/k")
    s3.put("dir/a", b"1")
    assert exists(s3.uri("dir/a")) and exists(s3.uri("dir")) and exists(s3.uri("dir/"))


def test_unreachable_endpoint_is_a_remote_error(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead_endpoint())
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(RemoteError, match=f"s3://{s3.bucket}/k: Could not connect"):
        fetch_to_cache(s3.uri("k"))


def test_local_paths_pass_through(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    assert fetch_to_cache(str(tmp_path / "d")) == tmp_path / "d"
    assert fetch_to_cache(f"file://{tmp_path}/d") == tmp_path / "d"
    monkeypatch.chdir(tmp_path)
    assert fetch_to_cache("d") == tmp_path / "d"  # relative: made absolute
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fetch_to_cache("~/d") == tmp_path / "d"
    with pytest.raises(FileNotFoundError, match="nope"):
        fetch_to_cache(str(tmp_path / "nope"))
    assert exists(tmp_path / "d") and not exists(tmp_path / "nope")


CHILD = textwrap.dedent(
    """
    import hashlib, json, logging, sys, time
    from pathlib import Path
    import boto3  # noqa: F401  (imported before the start signal, so the four race on the download itself)
    from ebm_scale.remote import fetch_to_cache
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
    logging.getLogger("ebm_scale.remote").setLevel(logging.INFO)
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.005)
    path = fetch_to_cache(sys.argv[1])
    files = sorted(p for p in path.rglob("*") if p.is_file())
    print(json.dumps({p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}))
    """
)


def test_concurrent_workers_download_once_and_see_complete_files(s3, tmp_path):
    # Big enough that the download takes a while: the other three arrive while it is in progress.
    local = make_dir(tmp_path / "src", {f"part-{i}.bin": 1 << 19 for i in range(4)})
    uri = s3.upload_dir(local, "shards")
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, uri, str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    time.sleep(0.5)  # let the interpreters start and import
    go.touch()
    results = [child.communicate(timeout=60) for child in children]
    assert [child.returncode for child in children] == [0] * 4, [err for _, err in results]
    expected = tree(local)
    for out, _ in results:
        assert json.loads(out) == expected
    downloads = sum(err.count("ebm_scale.remote downloading") for _, err in results)
    assert downloads == 1, [err for _, err in results]
