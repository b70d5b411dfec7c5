"""Processes a killed `ebm-scale` leaves behind. A sweep that starts its own local Ray owns that Ray's
processes; killed with SIGKILL it cannot stop them, and Ray's dashboard and runtime-env agents outlive it
(their parent, the raylet, dies; they are re-parented to init and keep running). `ebm-scale train` leaves its
MLflow helper process the same way.

So a run writes down the processes it started (pid and start time, which together name one process for
good) in a file of its own under the cache; a clean exit removes the file. The next `ebm-scale` run finds
the files of owners that are gone, stops what is still running of theirs and says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STOP_WAIT_S = 3.0  # SIGTERM first; Ray's agents ignore it, so SIGKILL after this long


def _registry() -> Path:
    from ebm_scale.remote import cache_root

    return cache_root() / "children"


def _record_file(pid: int) -> Path:
    return _registry() / f"{pid}.json"


def record_children() -> None:
    """Write down this process's children (a local Ray it started, its MLflow helper), to be found if this
    process is killed. Called again later, it adds what was started since (Ray's agents start after `ray.init`
    returns)."""
    import psutil

    me = psutil.Process()
    children = {str(c.pid): c.create_time() for c in _children(me)}
    path = _record_file(me.pid)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text())["children"] if path.exists() else {}
    record = {"owner": me.pid, "owner_started": me.create_time(), "children": {**previous, **children}}
    path.write_text(json.dumps(record))


def forget_children() -> None:
    """A clean exit: what this process started has ended, nothing to clean up after it."""
    _record_file(os.getpid()).unlink(missing_ok=True)


def stop_leftovers(printer=print) -> list[str]:
    """Stop the processes that killed `ebm-scale` runs left running; one line per killed run. Returns the
    stopped processes' descriptions."""
    import psutil

    root = _registry()
    stopped: list[str] = []
    for path in sorted(root.glob("*.json")) if root.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        if _alive(record["owner"], record["owner_started"]):
            continue  # another ebm-scale, still running: its Ray is its own
        alive = [p for pid, t in record["children"].items() if (p := _alive(int(pid), t))]
        names = [f"{p.pid} {_name(p)}" for p in alive]
        for p in alive:
            _terminate(p)
        _, survivors = psutil.wait_procs(alive, timeout=STOP_WAIT_S)
        for p in survivors:
            _kill(p)
        path.unlink(missing_ok=True)
        if names:
            printer(
                f"stopped {len(names)} process(es) left running by a killed ebm-scale (pid {record['owner']}): "
                + ", ".join(names)
            )
            stopped += names
    return stopped


def _children(process):
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _alive(pid: int, started: float):
    """The process `pid` if it is still the one that started at `started` (pids are reused), else None."""
    import psutil

    try:
        p = psutil.Process(pid)
        return p if abs(p.create_time() - started) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


def _name(p) -> str:
    try:
        return (p.cmdline() or [p.name()])[0][:60]
    except Exception:  # noqa: BLE001 - gone, or not ours to read: the pid is enough
        return "?"


def _terminate(p) -> None:
    try:
        p.terminate()
    except Exception:  # noqa: BLE001 - already gone
        pass


def _kill(p) -> None:
    try:
        p.kill()
    except Exception:  # noqa: BLE001 - already gone
        pass
