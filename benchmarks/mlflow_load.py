"""Can one shared MLflow server take every trial's writes? A load test of a real `mlflow server` backed by SQLite
or by PostgreSQL, and (--real-trials) a real sweep logging into one.

    uv run python benchmarks/mlflow_load.py                                  # SQLite and PostgreSQL, 200 writers, 60 s
    uv run python benchmarks/mlflow_load.py --backend sqlite --writers 4 --duration 3   # smoke run (~1 min)
    uv run python benchmarks/mlflow_load.py --server-env MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=40 \
        --server-env MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=40 --pg-max-connections 400   # the pool a shared server needs
    uv run python benchmarks/mlflow_load.py --rate 0.2 --metrics 20 --out load.json  # another trial profile
    uv run python benchmarks/mlflow_load.py --real-trials                    # a real 8-trial sweep into one server

Synthetic mode, per backend: the benchmark starts the database (PostgreSQL: a throwaway cluster made with
`initdb` in a temp dir, listening on 127.0.0.1 and a socket in that dir only, run as the `postgres` user when we
are root, since initdb refuses root; stopped and deleted afterwards) and `mlflow server --workers N` in front of
it, creates one experiment, one parent run and W child runs tagged `mlflow.parentRunId` (as a sweep does), then W
writers each send `MlflowClient.log_batch` with M metrics at R batches/s for D seconds (defaults: 200 writers,
15 metrics, 1 batch/s, 60 s). Writers are threads, W/P in each of P client processes (default 4), each on a
fixed schedule: a writer whose batch comes back late sends the next one at once (catching up, never skipping),
and stops starting batches at D. A batch counts as acknowledged when log_batch returns, i.e. after MLflow's own
retries (the MLFLOW_HTTP_REQUEST_* settings used are in the output); an exception after those retries is a
failed write. Afterwards every (run, metric) history is read back with get_metric_history and compared with
what was acknowledged: lost = acknowledged (step) missing, duplicated = a step stored more than once,
extra = stored although its log_batch failed (written, but the client was told otherwise).

Is the client the bottleneck? The output gives the CPU the client processes, the server's processes and the
database used over the write window (in cores, out of the machine's), and the schedule lag: how late a batch
left against its schedule. Latency is measured around log_batch (it includes the client's own serialisation).

--real-trials: one SQLite-backed server and a real `ebm-scale sweep quickstart` (8 trials, all concurrent,
100 iterations, FIFO) logging into it over HTTP; then every trial's metric history is counted against what the
training loop logs: train/* keys at every step with step % log_every == 0, eval % eval_every == 0 or the final
step; eval/* and system/* keys at the evaluation steps (a key that exists only at the final evaluation, at
that step). Reports the trials' concurrency (most runs RUNNING at once, from their start/end times).

docs/mlflow_load.md has the measured figures and what the shipped clusters use because of them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
BIN = Path(sys.executable).parent  # the project's venv: its `mlflow` and `ebm-scale` scripts
REPO = Path(__file__).resolve().parent.parent
# MLflow's client retry settings, as its defaults are in 3.17 (mlflow/environment_variables.py); flags change them.
RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": 7, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 2,
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": 120}  # fmt: skip


_START = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - _START:6.1f} s] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and all their descendants, including the exited children they have
    reaped (PostgreSQL's connection backends come and go: their time is in the postmaster's children_* fields)."""
    import psutil

    total, seen = 0.0, set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
    return total


# ---------------------------------------------------------------------------------------------- the servers


@contextmanager
def postgres(max_connections: int = 100):
    """A throwaway PostgreSQL 15 cluster in a temp dir of its own: yields (SQLAlchemy URI, postmaster pid, dir)."""
    pg = Path(tempfile.mkdtemp(prefix="mlflow_load_pg_"))
    as_postgres = []
    if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to the `postgres` user
        shutil.chown(pg, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    run = lambda *cmd: subprocess.run(as_postgres + list(cmd), check=True, capture_output=True, text=True)
    data = pg / "data"
    try:
        run(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
        # TCP on loopback only, the socket in pg/; everything else as PostgreSQL ships it (fsync on)
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {pg} -c max_connections={max_connections}"
        run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(pg / "log"), "-w", "-o", opts, "start")
        try:
            run(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
            pid = int((data / "postmaster.pid").read_text().split()[0])
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow", pid, pg
        finally:
            run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(pg, ignore_errors=True)


@contextmanager
def mlflow_server(backend_uri: str, workdir: Path, workers: int, env: dict | None = None, timeout_s: float = 300):
    """`mlflow server` on 127.0.0.1 and a free port, in its own process group: yields (URL, pid). `env`: extra
    environment for the server (e.g. MLFLOW_SQLALCHEMYSTORE_POOL_SIZE)."""
    port = free_port()
    log = open(workdir / f"mlflow_server_{port}.log", "w")
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", backend_uri, "--default-artifact-root", str(workdir / "artifacts"),
           "--workers", str(workers)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True,
                            env={**os.environ, **(env or {})})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}): see {log.name}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"mlflow server did not answer in {timeout_s:.0f} s: see {log.name}")
            time.sleep(0.3)
        say(f"mlflow server up at {url} ({backend_uri.split(':')[0]}, {workers} workers)")
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn workers: our own process group
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


# ---------------------------------------------------------------------------------------------- the writers


def value_of(writer: int, step: int, metric: int) -> float:
    """Each point's value says whose it is: a mixed-up point cannot pass for a stored one."""
    return writer * 1_000_000.0 + step * 100.0 + metric


def _writer_process(url, runs, n_metrics, rate, duration, n_writers, go, t0_box, ready, results):
    """One client process: a thread per (writer index, run id) in `runs`, all from the shared t0."""
    import resource

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    client.get_run(runs[0][1])  # imports, session and connection warmed up before the clock starts
    ready.put(os.getpid())
    go.wait()
    t0 = t0_box.value
    time.sleep(max(0.0, t0 - time.time()))
    end = t0 + duration
    period = 1.0 / rate
    out = {}

    def writer(idx: int, run_id: str):
        acked, failed, latencies, lags = [], [], [], []
        next_t = t0 + period * idx / n_writers  # writers spread evenly over one period
        step = 0
        while next_t < end:
            now = time.time()
            if now >= end:
                break
            if now < next_t:
                time.sleep(next_t - now)
            lags.append(time.time() - next_t)
            ts = int(time.time() * 1000)
            batch = [Metric(f"m{j:02d}", value_of(idx, step, j), ts, step) for j in range(n_metrics)]
            t = time.perf_counter()
            try:
                client.log_batch(run_id, metrics=batch)
                acked.append(step)
            except Exception as err:  # after MLflow's own retries
                failed.append((step, f"{type(err).__name__}: {str(err)[:300]}"))
            latencies.append(time.perf_counter() - t)
            step += 1
            next_t += period
        out[idx] = {"run_id": run_id, "acked": acked, "failed": failed, "latencies": latencies, "lags": lags,
                    "finished": time.time()}  # fmt: skip

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    cpu0 = cpu()
    threads = [threading.Thread(target=writer, args=(i, r), daemon=True) for i, r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put({"pid": os.getpid(), "cpu_s": cpu() - cpu0, "writers": out})


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def load_test(backend: str, args, workdir: Path) -> dict:
    import multiprocessing as mp

    import psutil
    from mlflow.tracking import MlflowClient

    with _backend(backend, workdir, args.pg_max_connections) as (store_uri, db_pid, store_path):
        with mlflow_server(store_uri, workdir, args.server_workers, args.server_env) as (url, server_pid):
            client = MlflowClient(tracking_uri=url)
            exp = client.create_experiment(f"load-{backend}")
            parent = client.create_run(exp, run_name="sweep-load", tags={"ebm_scale.run_kind": "sweep"}).info.run_id
            t = time.perf_counter()
            tags = lambda i: {"mlflow.parentRunId": parent, "ebm_scale.run_kind": "trial", "ebm_scale.trial_id": str(i)}
            new_run = lambda i: client.create_run(exp, run_name=f"trial_{i:04d}", tags=tags(i)).info.run_id
            with ThreadPoolExecutor(16) as pool:  # 16 trials starting at once
                runs = list(pool.map(new_run, range(args.writers)))
            create_s = time.perf_counter() - t
            warm_up(client, exp, args.metrics, server_pid)

            ctx = mp.get_context("spawn")
            go, ready, results = ctx.Event(), ctx.Queue(), ctx.Queue()
            t0_box = ctx.Value("d", 0.0)
            n_procs = max(1, min(args.procs, args.writers))
            shares = [[(i, runs[i]) for i in range(args.writers) if i % n_procs == p] for p in range(n_procs)]
            procs = [ctx.Process(target=_writer_process,
                                 args=(url, share, args.metrics, args.rate, args.duration, args.writers,
                                       go, t0_box, ready, results)) for share in shares]  # fmt: skip
            for p in procs:
                p.start()
            for _ in procs:
                ready.get(timeout=300)
            say(f"{args.writers} runs created in {create_s:.1f} s; {n_procs} client processes ready; writing")
            t0 = t0_box.value = time.time() + 1.0
            go.set()
            time.sleep(max(0.0, t0 - time.time()))
            cpu_server0 = _cpu_seconds([server_pid])
            cpu_db0 = _cpu_seconds([db_pid]) if db_pid else 0.0
            machine0, load0 = psutil.cpu_times(), os.getloadavg()[0]
            per_proc = [results.get(timeout=args.duration + 3600) for _ in procs]
            cpu_server = _cpu_seconds([server_pid]) - cpu_server0
            cpu_db = (_cpu_seconds([db_pid]) - cpu_db0) if db_pid else 0.0
            machine1 = psutil.cpu_times()
            cpu_window = time.time() - t0  # what the CPU figures are divided by
            t_end = max(w["finished"] for r in per_proc for w in r["writers"].values())
            window = t_end - t0  # first scheduled batch to the last acknowledgement
            for p in procs:
                p.join()
            say(f"written; reading back {args.writers} × {args.metrics} metric histories")

            writers = {i: w for r in per_proc for i, w in r["writers"].items()}
            t = time.perf_counter()
            readback = read_back(url, writers, args.metrics)
            readback_s = time.perf_counter() - t

    # Linux counts guest time inside user time already; steal is time other VMs took from ours.
    busy = lambda c: sum(getattr(c, f) for f in c._fields if f not in ("idle", "iowait", "guest", "guest_nice"))
    machine_busy = (busy(machine1) - busy(machine0)) / cpu_window
    lat = [x for w in writers.values() for x in w["latencies"]]
    lags = [x for w in writers.values() for x in w["lags"]]
    acked = sum(len(w["acked"]) for w in writers.values())
    failed = sum(len(w["failed"]) for w in writers.values())
    errors = sorted({msg for w in writers.values() for _, msg in w["failed"]})[:5]
    scheduled = args.writers * args.duration * args.rate
    res = {
        "backend": backend,
        "writers": args.writers,
        "client_processes": n_procs,
        "metrics_per_batch": args.metrics,
        "rate_per_writer": args.rate,
        "duration_s": args.duration,
        "server_workers": args.server_workers,
        "server_env": args.server_env,
        "pg_max_connections": args.pg_max_connections if backend == "postgres" else None,
        "store": str(store_path),  # the SQLite file (kept with --workdir) or the PostgreSQL cluster (removed)
        "run_create_s": round(create_s, 2),
        "window_s": round(window, 2),
        "offered_batches_per_s": round(scheduled / args.duration, 1),
        "batches_sent": acked + failed,
        "batches_acked": acked,
        "batches_failed": failed,
        "failed_errors": errors,
        "points_acked": acked * args.metrics,
        "batches_per_s": round(acked / window, 1),
        "points_per_s": round(acked * args.metrics / window, 1),
        "latency_ms": {k: round(1000 * percentile(lat, q), 1) for k, q in (("p50", 50), ("p99", 99), ("max", 100))},
        "schedule_lag_ms": {k: round(1000 * percentile(lags, q), 1) for k, q in (("p50", 50), ("p99", 99))},
        "cpu_cores": {
            "client": round(sum(r["cpu_s"] for r in per_proc) / cpu_window, 2),
            "mlflow_server": round(cpu_server / cpu_window, 2),
            "postgres": round(cpu_db / cpu_window, 2),
            "machine_busy": round(machine_busy, 2),
            # everything else on the machine meanwhile (other users of a shared box, the kernel)
            "others": round(machine_busy - (sum(r["cpu_s"] for r in per_proc) + cpu_server + cpu_db) / cpu_window, 2),
            "machine_total": psutil.cpu_count(),
        },
        "loadavg_1min_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "readback_s": round(readback_s, 1),
        **readback["totals"],
        "per_writer": readback["per_writer"],
    }
    return res


def warm_up(client, exp: str, n_metrics: int, server_pid: int) -> None:
    """Every uvicorn worker imports its handlers at its first requests (seconds of CPU each): send some, into a
    run of their own, and wait until the server is quiet, so that start-up is not charged to the first writes."""
    from mlflow.entities import Metric

    run_id = client.create_run(exp, run_name="warm-up").info.run_id
    batch = lambda k: [Metric(f"w{j}", 0.0, int(time.time() * 1000), k) for j in range(n_metrics)]

    def send(k):
        try:
            client.log_batch(run_id, metrics=batch(k))
        except Exception as err:  # not measured; the load phase will meet the same
            say(f"warm-up write failed: {type(err).__name__}: {str(err)[:200]}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, range(32)))
    deadline = time.time() + 30
    while time.time() < deadline:
        c0 = _cpu_seconds([server_pid])
        time.sleep(1.0)
        if _cpu_seconds([server_pid]) - c0 < 0.2:
            break


@contextmanager
def _backend(backend: str, workdir: Path, pg_max_connections: int):
    if backend == "sqlite":
        yield f"sqlite:///{workdir / 'mlflow.db'}", None, workdir / "mlflow.db"
    elif backend == "postgres":
        with postgres(pg_max_connections) as (uri, pid, pg):
            yield uri, pid, pg
    else:
        raise ValueError(backend)


def read_back(url: str, writers: dict, n_metrics: int) -> dict:
    """Every writer's every metric history against what it was told was written."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    jobs = [(i, j) for i in writers for j in range(n_metrics)]
    with ThreadPoolExecutor(8) as pool:
        hist = dict(zip(jobs, pool.map(lambda ij: client.get_metric_history(writers[ij[0]]["run_id"], f"m{ij[1]:02d}"),
                                       jobs)))  # fmt: skip
    counts = ("points_read", "lost", "duplicated", "extra", "never_sent", "wrong_value")
    per_writer, totals = {}, dict.fromkeys(counts, 0)
    for i, w in sorted(writers.items()):
        acked = set(w["acked"])
        failed = {s for s, _ in w["failed"]}
        row = {"run_id": w["run_id"], "acked_batches": len(w["acked"]), "failed_batches": len(w["failed"]),
               **dict.fromkeys(counts, 0)}  # fmt: skip
        for j in range(n_metrics):
            points = hist[(i, j)]
            steps = [p.step for p in points]
            row["points_read"] += len(points)
            row["duplicated"] += len(steps) - len(set(steps))
            row["lost"] += len(acked - set(steps))
            row["extra"] += len((set(steps) - acked) & failed)  # stored, but its log_batch raised
            row["never_sent"] += len(set(steps) - acked - failed)  # cannot happen: would be a bug here
            row["wrong_value"] += sum(p.value != value_of(i, p.step, j) for p in points)
        per_writer[str(i)] = row
        for k in totals:
            totals[k] += row[k]
    return {"per_writer": per_writer, "totals": totals}


# ---------------------------------------------------------------------------------------------- real trials


REAL_OVERRIDES = ["search.num_samples=8", "search.max_concurrent_trials=8", "scaling.driver_cpus=0.25",
                  "train.iterations=100", "search.scheduler.kind=fifo"]  # fmt: skip


def real_trials(args, workdir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from ebm_scale.config import compose

    overrides = REAL_OVERRIDES + args.set
    cfg = compose("quickstart", overrides)
    n_iter, log_every, eval_every = cfg.train.iterations, cfg.train.log_every, cfg.train.eval_every
    store_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    with mlflow_server(store_uri, workdir, args.server_workers, args.server_env) as (url, server_pid):
        cmd = [str(BIN / "ebm-scale"), "sweep", "quickstart", f"tracking.uri={url}",
               f"storage.path={workdir / 'runs'}", *overrides]  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        t = time.perf_counter()
        with open(workdir / "sweep.log", "w") as log:
            sweep = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, timeout=args.sweep_timeout)
        sweep_s = time.perf_counter() - t
        client = MlflowClient(tracking_uri=url)
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, filter_string="tags.`ebm_scale.run_kind` = 'trial'", max_results=1000)
        trials = []
        for r in runs:
            keys = sorted(r.data.metrics)
            hist = {k: [m.step for m in client.get_metric_history(r.info.run_id, k)] for k in keys}
            trials.append(check_trial(r, hist, n_iter, log_every, eval_every))
    intervals = [(r.info.start_time, r.info.end_time or r.info.start_time) for r in runs]
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, d in events:
        running += d
        peak = max(peak, running)
    totals = {k: sum(t[k] for t in trials) for k in ("points_read", "points_expected", "lost", "duplicated", "extra")}
    return {
        "mode": "real_trials",
        "command": "ebm-scale sweep quickstart tracking.uri=<server> storage.path=<tmp>/runs " + " ".join(overrides),
        "sweep_returncode": sweep.returncode,
        "sweep_s": round(sweep_s, 1),
        "iterations": n_iter,
        "log_every": log_every,
        "eval_every": eval_every,
        "trials": len(trials),
        "trials_finished": sum(t["status"] == "FINISHED" for t in trials),
        "peak_concurrent_trials": peak,
        **totals,
        "per_trial": trials,
    }


def check_trial(run, hist: dict[str, list[int]], n_iter: int, log_every: int, eval_every: int) -> dict:
    """A trial's histories against the loop's schedule (engine/loop.py), up to the step it stopped at."""
    last = max((max(s) for s in hist.values() if s), default=0)
    if "diverged_at_step" not in hist and run.info.status == "FINISHED":
        last = n_iter  # a finished trial must have reached the end
    eval_steps = {s for s in range(1, last + 1) if s % eval_every == 0 or s == n_iter}
    train_steps = {s for s in range(1, last + 1) if s % log_every == 0} | eval_steps
    row = {"run_id": run.info.run_id, "status": run.info.status, "last_step": last, "keys": len(hist),
           "points_read": 0, "points_expected": 0, "lost": 0, "duplicated": 0, "extra": 0, "problems": []}  # fmt: skip
    for key, steps in hist.items():
        if key.startswith("train/"):
            expected = train_steps
        elif key.startswith(("eval/", "system/")):
            final_only = set(steps) <= {last} and last in eval_steps
            expected = {last} if final_only else eval_steps
        else:  # resumed_from_step, diverged_at_step: one point each, not on a schedule
            expected = set(steps)
        lost, extra = expected - set(steps), set(steps) - expected
        row["points_read"] += len(steps)
        row["points_expected"] += len(expected)
        row["lost"] += len(lost)
        row["extra"] += len(extra)
        row["duplicated"] += len(steps) - len(set(steps))
        if lost or extra or len(steps) != len(set(steps)):
            row["problems"].append(f"{key}: lost {sorted(lost)[:5]} extra {sorted(extra)[:5]}")
    return row


# ---------------------------------------------------------------------------------------------- report


def print_table(results: list[dict]) -> None:
    head = (f"{'backend':<9}{'writers':>8}{'offered/s':>10}{'batches/s':>10}{'points/s':>10}{'p50 ms':>8}"
            f"{'p99 ms':>8}{'max ms':>8}{'lag p99':>8}{'failed':>7}{'lost':>6}{'dup':>5}{'extra':>6}"
            f"{'cores cli/srv/db/other':>24}")  # fmt: skip
    print(head)
    for r in results:
        c, lat = r["cpu_cores"], r["latency_ms"]
        cpu = f"{c['client']:.2f}/{c['mlflow_server']:.2f}/{c['postgres']:.2f}/{c['others']:.2f}"
        print(f"{r['backend']:<9}{r['writers']:>8}{r['offered_batches_per_s']:>10}{r['batches_per_s']:>10}"
              f"{r['points_per_s']:>10}{lat['p50']:>8}{lat['p99']:>8}{lat['max']:>8}{r['schedule_lag_ms']['p99']:>8}"
              f"{r['batches_failed']:>7}{r['lost']:>6}{r['duplicated']:>5}{r['extra']:>6}{cpu:>24}")  # fmt: skip
        if r["failed_errors"]:
            print("   failures:", *r["failed_errors"], sep="\n     ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"])
    ap.add_argument("--writers", type=int, default=200, help="concurrent trial writers (one run each)")
    ap.add_argument("--duration", type=float, default=60, help="seconds of writing")
    ap.add_argument("--rate", type=float, default=1.0, help="log_batch calls per second per writer")
    ap.add_argument("--metrics", type=int, default=15, help="metrics per batch")
    ap.add_argument("--procs", type=int, default=4, help="client processes the writer threads are spread over")
    ap.add_argument("--server-workers", type=int, default=4, help="mlflow server --workers (uvicorn processes)")
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the mlflow server, e.g. MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=40",
    )
    ap.add_argument("--pg-max-connections", type=int, default=100, help="PostgreSQL max_connections (its default)")
    ap.add_argument("--max-retries", type=int, default=RETRY_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    ap.add_argument("--backoff-factor", type=int, default=RETRY_DEFAULTS["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    ap.add_argument("--request-timeout", type=int, default=RETRY_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    ap.add_argument("--real-trials", action="store_true", help="a real sweep into one SQLite-backed server instead")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="--real-trials: extra override")
    ap.add_argument("--sweep-timeout", type=float, default=1800)
    ap.add_argument("--workdir", type=Path, help="keep servers' stores and logs here (default: a temp dir, deleted)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    args.server_env = dict(kv.split("=", 1) for kv in args.server_env)

    client_env = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(args.max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(args.backoff_factor),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(args.request_timeout),
        # one pooled connection per writer thread, as each trial process has its own (MLflow's default pool is 10)
        "MLFLOW_HTTP_POOL_MAXSIZE": str(max(10, -(-args.writers // max(1, args.procs)))),
    }
    os.environ.update(client_env)  # the spawned writer processes and the sweep inherit them
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    import mlflow

    meta = {"commit": commit.stdout.strip(), "mlflow": mlflow.__version__, "cpus": os.cpu_count(),
            "client_env": client_env, "server_env": args.server_env, "argv": sys.argv[1:]}  # fmt: skip
    keep = args.workdir is not None
    root = args.workdir or Path(tempfile.mkdtemp(prefix="mlflow_load_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if args.real_trials:
            workdir = root / "real_trials"
            workdir.mkdir()
            res = real_trials(args, workdir)
            out = {**meta, **res}
            print(
                f"sweep: rc {res['sweep_returncode']}, {res['sweep_s']} s; {res['trials']} trials "
                f"({res['trials_finished']} finished), at most {res['peak_concurrent_trials']} running at once"
            )
            print(f"points: read {res['points_read']}, expected {res['points_expected']}, lost {res['lost']}, "
                  f"duplicated {res['duplicated']}, extra {res['extra']}")  # fmt: skip
            for t in res["per_trial"]:
                for p in t["problems"]:
                    print(f"  {t['run_id']}: {p}")
        else:
            results = []
            for backend in args.backend:
                workdir = root / backend
                workdir.mkdir()
                say(
                    f"--- {backend}: {args.writers} writers × {args.rate:g} batch/s × {args.metrics} metrics, "
                    f"{args.duration:g} s"
                )
                results.append(load_test(backend, args, workdir))
            out = {**meta, "results": results}
            print_table(results)
            print("client env:", " ".join(f"{k}={v}" for k, v in client_env.items()))
            print("server env:", " ".join(f"{k}={v}" for k, v in args.server_env.items()) or "(MLflow's defaults)")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1))
            print("wrote", args.out)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
