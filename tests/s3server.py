"""A real S3-compatible server (moto's server mode) on 127.0.0.1 for the s3:// tests.

Use it from a test module with

    from s3server import s3_fixture, s3_server_fixture  # noqa: F401

(fixtures are named apart from their functions, so a test's `s3` argument shadows no import) and a test
that takes `s3`: the server starts once per session; each test gets its own bucket, fake credentials,
`AWS_ENDPOINT_URL` pointing at the server and `EBM_SCALE_CACHE` in its tmp_path (all undone afterwards), so
boto3, pyarrow and subprocesses the test starts find the server through the standard environment.
"""

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
# Anything that could steer boto3 away from the fake credentials or the local endpoint.
CLEARED = ["AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN"]


@dataclass
class S3:
    endpoint: str  # http://127.0.0.1:<port>
    bucket: str
    client: object  # a boto3 S3 client bound to the server

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, body: bytes) -> str:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
        return self.uri(key)

    def upload_dir(self, local: str | os.PathLike, prefix: str) -> str:
        """Every file under `local` to `prefix/<relative path>`; returns the prefix's URI (with a trailing /)."""
        root = Path(local)
        prefix = prefix.strip("/")
        for path in sorted(root.rglob("*")):
            if path.is_file():
                self.client.upload_file(str(path), self.bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
        return self.uri(prefix + "/")


@pytest.fixture(name="s3_server", scope="session")
def s3_server_fixture():
    """(endpoint, client): the server, and a client with explicit fake credentials (no environment needed)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    yield endpoint, boto3.session.Session(**credentials).client("s3", endpoint_url=endpoint)
    server.stop()


@pytest.fixture(name="s3")
def s3_fixture(s3_server, monkeypatch, tmp_path):
    endpoint, client = s3_server
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    # No shared config or credentials files: a developer's real profile must never be read by a test.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("EBM_SCALE_CACHE", str(tmp_path / "cache"))
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return S3(endpoint=endpoint, bucket=bucket, client=client)
