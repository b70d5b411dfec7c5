"""Real servers for the cluster end-to-end tests, each on 127.0.0.1 and stopped by the test that started it:

- `mlflow_server(...)`: an `mlflow server` process (SQLite backend in a tmp folder; artifacts in a local folder
  or proxied to S3 with `--artifacts-destination s3://...`; optionally the `basic-auth` app), waited for on
  /health, stopped through its process group.
- `ray_cluster(...)`: a multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head with no CPU
  and a `trial_driver` resource, worker nodes with one CPU each), held by a helper process of its own so the
  test process never becomes a Ray driver; stopped with `Cluster.shutdown()` in that process.
- `ray_head(...)`: a real `ray start --head --block` with its dashboard (what `ray job submit` talks to),
  stopped by killing the processes it started (never `ray stop`: that stops every Ray on the machine).
- `ray_state(...)`: nodes, actors and jobs of a cluster, read through the State API in a subprocess.

Both Ray clusters use token authentication with a token of their own, passed in RAY_AUTH_TOKEN (nothing is
written to ~/.ray): every client needs `cluster.env` (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN, RAY_ADDRESS).

    python tests/servers.py ray-cluster <state.json> <spec.json>    the helper behind ray_cluster()
    python tests/servers.py ray-state <gcs address>                 prints nodes, actors and jobs as JSON
    python tests/servers.py job-probe                               (a job's entrypoint) what runs where
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = str(Path(__file__).resolve().parent)
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session), SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


# --- MLflow ----------------------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    uri: str  # http://127.0.0.1:<port>
    process: subprocess.Popen
    log: Path
    artifacts: str  # where the server puts artifacts (a folder, or s3://bucket/prefix)
    username: str | None = None
    password: str | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a client needs (MLflow reads the credentials from these variables)."""
        env = {"MLFLOW_TRACKING_URI": self.uri}
        if self.username:
            env |= {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password or ""}
        return env


def _wait_http(
    url: str, proc: subprocess.Popen, log: Path, timeout_s: float, headers: dict[str, str] | None = None
) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s:\n{_tail(log)}")


@contextlib.contextmanager
def mlflow_server(
    folder: str | os.PathLike,
    artifacts_destination: str | None = None,
    auth: bool = False,
    env: dict[str, str] | None = None,
    timeout_s: float = 180.0,
):
    """An `mlflow server` on 127.0.0.1 (free port), backend SQLite in `folder`; artifacts proxied to
    `artifacts_destination` (e.g. s3://bucket/mlflow; the server's environment must reach it: AWS_* and
    MLFLOW_S3_ENDPOINT_URL) or to `folder`/artifacts. `auth`: the basic-auth app, admin user `admin` with a
    random password (MLFLOW_AUTH_CONFIG_PATH points at an ini file in `folder`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    artifacts = artifacts_destination or str(folder / "artifacts")
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", artifacts,
    ]  # fmt: skip
    server_env = {**os.environ, **(env or {})}
    username = password = None
    if auth:
        username, password = "admin", secrets.token_hex(12)
        ini = folder / "basic_auth.ini"
        ini.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
            f"admin_username = {username}\n"
            f"admin_password = {password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # Each request's password check is a PBKDF2 hash: 6-12 s per request on a loaded 2-core box, past
            # the sweep's 9 s reachability check. A cached check (MLflow 3.17's basic_auth.ini option) once a minute.
            "auth_cache_ttl_seconds = 60\n"
        )
        server_env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        server_env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(16)  # required (CSRF) by the auth app
        cmd += ["--app-name", "basic-auth"]
    log = folder / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=folder, env=server_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = MlflowServer(f"http://127.0.0.1:{port}", proc, log, artifacts, username, password)
    try:
        _wait_http(f"{server.uri}/health", proc, log, timeout_s)
        if auth:  # the first password check is the slow one: done here, so the cache is warm for the clients
            import base64

            basic = base64.b64encode(f"{username}:{password}".encode()).decode()
            url = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
            _wait_http(url, proc, log, timeout_s, {"Authorization": f"Basic {basic}"})
        yield server
    finally:
        _stop_group(proc)


# --- Ray ---------------------------------------------------------------------------------------------------


def _short_tmp(prefix: str) -> Path:
    """Ray's sockets live under its temp dir; a Unix socket path may not exceed 107 bytes, which pytest's
    tmp_path plus Ray's session folder names can: a short folder under /tmp instead."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def auth_env(token: str) -> dict[str, str]:
    """Token auth with `token`, and every address on the loopback interface: a Ray client turns a 127.0.0.1
    address into this machine's network IP (services.resolve_ip_for_localhost), where nothing of these
    clusters listens, unless Ray believes multi-node clusters are off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0;
    it only changes that lookup and `ray start --address`, which these helpers never run)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass
class RayCluster:
    address: str  # the GCS address, what RAY_ADDRESS holds
    dashboard: str  # http://127.0.0.1:<port>
    temp_dir: Path
    token: str
    process: subprocess.Popen
    log: Path
    nodes: list[dict] = field(default_factory=list)  # [{node_id, head}] as started
    node_env: dict[str, str] = field(default_factory=dict)  # what was added to every Ray process's environment

    @property
    def env(self) -> dict[str, str]:
        """A client's environment: joins this cluster (RAY_ADDRESS) with its token."""
        return {**auth_env(self.token), "RAY_ADDRESS": self.address}


def _cluster_env(token: str, env: dict[str, str] | None) -> dict[str, str]:
    out = {**os.environ, **auth_env(token), **(env or {})}
    out.pop("RAY_ADDRESS", None)
    return out


@contextlib.contextmanager
def ray_cluster(
    worker_cpus: tuple[float, ...] = (1, 1),
    head_resources: dict[str, float] | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 240.0,
):
    """A Ray cluster of a head (no CPU; `head_resources`, default {trial_driver: 1}) and one worker node per
    entry of `worker_cpus`, with the dashboard on; `env` reaches every Ray process (e.g. PYTHONPATH with tests/
    when workers must import test code). Yields a RayCluster; shut down at exit."""
    temp_dir = _short_tmp("rc")
    token = secrets.token_hex(32)
    spec = {
        "temp_dir": str(temp_dir),
        "dashboard_port": free_port(),
        "dashboard_agent_listen_port": free_port(),
        "head_resources": head_resources if head_resources is not None else {"trial_driver": 1},
        "worker_cpus": list(worker_cpus),
    }
    state = temp_dir / "cluster.json"
    log = temp_dir / "cluster.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "ray-cluster", str(state), json.dumps(spec)],
            env=_cluster_env(token, env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + timeout_s
        while not state.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the Ray cluster's helper exited with {proc.returncode}:\n{_tail(log)}")
            if time.time() > deadline:
                raise TimeoutError(f"no Ray cluster within {timeout_s:.0f} s:\n{_tail(log)}")
            time.sleep(0.5)
        info = json.loads(state.read_text())
        yield RayCluster(info["address"], info["dashboard"], temp_dir, token, proc, log, info["nodes"], dict(env or {}))
    finally:
        # The helper shuts the cluster down on SIGTERM (Cluster.shutdown); its Ray processes share its group.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        _stop_group(proc, grace_s=5)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _serve_cluster(state_file: str, spec: dict) -> None:
    """The helper process: build the Cluster, write its address, wait for SIGTERM, shut it down."""
    import ray._common.utils
    import ray._private.utils

    # Cluster writes (and at shutdown deletes) /tmp/ray/ray_current_cluster, the file through which a plain
    # ray.init() or `ray start` on this machine finds "the" local cluster: nobody else's Ray may find this one,
    # nor lose theirs.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    ray._common.utils.reset_ray_address = lambda *args, **kwargs: None
    from ray.cluster_utils import Cluster

    common = {"temp_dir": spec["temp_dir"], "node_ip_address": "127.0.0.1"}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **common,
            "num_cpus": 0,
            "resources": spec["head_resources"],
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": spec["dashboard_port"],
            "dashboard_agent_listen_port": spec["dashboard_agent_listen_port"],
        },
        shutdown_at_exit=True,
    )
    for cpus in spec["worker_cpus"]:
        cluster.add_node(**common, num_cpus=cpus)
    cluster.wait_for_nodes()

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    nodes = [{"node_id": n.node_id, "head": n is cluster.head_node} for n in cluster.list_all_nodes()]
    info = {
        "address": cluster.address,
        "dashboard": f"http://127.0.0.1:{spec['dashboard_port']}",
        "nodes": nodes,
    }
    tmp = state_file + ".tmp"
    Path(tmp).write_text(json.dumps(info))
    os.rename(tmp, state_file)
    print("cluster up:", json.dumps(info), flush=True)
    while not stop:
        time.sleep(0.2)
    cluster.shutdown()
    print("cluster down", flush=True)


@dataclass
class RayHead:
    address: str  # GCS address
    dashboard: str  # http://127.0.0.1:<port>, what `ray job submit --address` takes
    temp_dir: Path
    token: str
    process: subprocess.Popen
    log: Path
    env: dict[str, str]  # what the head was started with (beyond os.environ)

    @property
    def client_env(self) -> dict[str, str]:
        """What `ray job submit --address <dashboard>` needs."""
        return auth_env(self.token)

    def session_dir(self) -> Path:
        return (self.temp_dir / "session_latest").resolve()


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, env: dict[str, str] | None = None, timeout_s: float = 240.0):
    """`ray start --head --block` on 127.0.0.1 with every listening port chosen free (none of Ray's fixed
    defaults, which another Ray on this machine may hold), token auth with a token of its own, its own temp
    dir. `env` is added to the head's environment (a job's entrypoint inherits it). Stopped by killing the
    `ray start` process's group and every process it started."""
    import psutil

    temp_dir = _short_tmp("rh")
    token = secrets.token_hex(32)
    gcs_port, dashboard_port = free_port(), free_port()
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1",
        "--port", str(gcs_port),
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port),
        "--dashboard-agent-listen-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
        "--num-cpus", str(num_cpus),
        "--temp-dir", str(temp_dir),
        "--disable-usage-stats",
    ]  # fmt: skip
    head_env = _cluster_env(token, env)
    log = temp_dir / "ray_start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=head_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", temp_dir, token, proc, log, env or {})
    try:
        # With token auth the dashboard answers 401 to anyone without the token.
        _wait_http(f"{head.dashboard}/api/version", proc, log, timeout_s, {"Authorization": f"Bearer {token}"})
        yield head
    finally:
        started = []
        with contextlib.suppress(psutil.NoSuchProcess):
            started = psutil.Process(proc.pid).children(recursive=True)
        _stop_group(proc, grace_s=15)
        for p in started:  # anything that left the group (job drivers get a group of their own)
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_state(address: str, env: dict[str, str], timeout_s: float = 120.0) -> dict:
    """{"nodes": [...], "actors": [...], "jobs": [...]} of the cluster at `address`, read by a subprocess
    (the test process stays out of Ray)."""
    proc = subprocess.run(
        [sys.executable, __file__, "ray-state", address],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ray-state failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_state(address: str) -> None:
    import ray
    from ray.util.state import list_actors, list_jobs, list_nodes

    # The State API finds its cluster through RAY_ADDRESS; without it, it gives up when this machine runs
    # more than one Ray ("Found multiple active Ray instances").
    os.environ["RAY_ADDRESS"] = address
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        nodes = [
            {"node_id": n.node_id, "is_head": n.is_head_node, "resources": n.resources_total}
            for n in list_nodes(detail=True)
        ]
        actors = [
            {"class_name": a.class_name, "node_id": a.node_id, "state": a.state, "pid": a.pid, "name": a.name}
            for a in list_actors(detail=True, limit=10000)
        ]
        jobs = [
            {
                "type": str(j.type),
                "entrypoint": j.entrypoint,
                "status": str(j.status),
                "submission_id": j.submission_id,
                "job_id": j.job_id,
            }
            for j in list_jobs()
        ]
    finally:
        ray.shutdown()
    print(json.dumps({"nodes": nodes, "actors": actors, "jobs": jobs}, default=str))


def _job_probe() -> None:
    """Run as a Ray job's entrypoint: prints one `PROBE {json}` line — whether the engine sees a job, its
    working-dir copy, and which ebm_scale the driver and a task of the job import."""
    import ebm_scale
    from ebm_scale.engine.jobs import in_ray_job, job_working_dir

    driver_code = ebm_scale.__file__  # ebm_scale first: it sets Ray's environment (uv hook off) before ray loads
    import ray

    ray.init(logging_level="ERROR", log_to_driver=False)

    @ray.remote(num_cpus=0)
    def where():
        import ebm_scale

        return {"code": ebm_scale.__file__, "cwd": os.getcwd()}

    seen = {
        "in_job": in_ray_job(),
        "working_dir": str(job_working_dir()),
        "cwd": os.getcwd(),
        "driver_code": driver_code,
        "task": ray.get(where.remote()),
        "ray_address": os.environ.get("RAY_ADDRESS"),
    }
    ray.shutdown()
    print("PROBE " + json.dumps(seen), flush=True)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "ray-cluster":
        _serve_cluster(args[0], json.loads(args[1]))
    elif command == "ray-state":
        _print_state(args[0])
    elif command == "job-probe":
        _job_probe()
    else:
        raise SystemExit(f"unknown command {command!r}")
