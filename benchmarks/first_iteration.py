"""How long until a command's first training iteration? Runs an `ebm-scale` command in a fresh process and
reports the seconds from launching it to the loop's first `train_step` (in whichever process runs it: this
one's child, a Ray trial actor or a Train worker); then stops it with SIGINT, as Ctrl-C would.

    uv run python benchmarks/first_iteration.py [--repeat 3] [--code DIR] -- \
        train method=mle data=8gaussians train.iterations=200

`--code DIR` runs the package found in DIR (e.g. an older commit's `git worktree`) with this venv, so two
versions are timed back to back on the same machine. `--as-sweep` runs the same `train` overrides the way
`ebm-scale train` ran them up to commit 757c589: a one-trial Tune sweep (engine.sweep.run_sweep). Each run
gets its own empty working directory (a fresh `mlflow.db`, no Ray session left over).

How: a `sitecustomize` on PYTHONPATH (inherited by Ray's workers) wraps `MetricAccumulator.add` when
`ebm_scale.engine.loop` is imported; its first call writes the wall-clock time to a file.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HOOK = textwrap.dedent("""
    import importlib.abc, importlib.util, os, sys, time

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "ebm_scale.engine.loop":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                add = module.MetricAccumulator.add

                def first(self, metrics):
                    try:  # O_EXCL: only the first iteration of the first process counts
                        fd = os.open(os.environ["EBM_SCALE_FIRST_STEP_FILE"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                        os.write(fd, repr(time.time()).encode())
                        os.close(fd)
                    except FileExistsError:
                        pass
                    module.MetricAccumulator.add = add
                    return add(self, metrics)

                module.MetricAccumulator.add = first
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Hook())
""")


# What `ebm-scale train <overrides>` did before it had a path of its own: a one-trial sweep.
AS_SWEEP = """import sys, ray
from ebm_scale.config import compose
from ebm_scale.engine.sweep import run_sweep
try:
    run_sweep(compose(None, sys.argv[1:], single_run=True))
finally:
    ray.shutdown()
"""


def time_once(command: list[str], code: str | None, timeout: float, as_sweep: bool = False) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="ebm_scale_first_") as tmp:
        hook_dir = Path(tmp) / "hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        marker = Path(tmp) / "first_step"
        env = {
            **os.environ,
            "EBM_SCALE_FIRST_STEP_FILE": str(marker),
            "PYTHONPATH": os.pathsep.join(p for p in (code, str(hook_dir)) if p),
        }
        work = Path(tmp) / "work"
        work.mkdir()
        started = time.time()
        argv = ["-c", AS_SWEEP, *command[1:]] if as_sweep else ["-m", "ebm_scale.cli", *command]
        proc = subprocess.Popen(
            [sys.executable, *argv], cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        while proc.poll() is None and not marker.exists() and time.time() - started < timeout:
            time.sleep(0.05)
        first = float(marker.read_text()) - started if marker.exists() else float("nan")
        if proc.poll() is None:  # what comes after the first iteration is not measured: stop it as Ctrl-C would
            proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate()
        if math.isnan(first):
            print(stderr[-2000:], file=sys.stderr)
        return first, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0, help="give up on a run after this many seconds")
    ap.add_argument("--code", default=None, help="a folder holding the ebm_scale package to run instead")
    ap.add_argument("--as-sweep", action="store_true", help="run `train` overrides as a one-trial sweep")
    ap.add_argument("command", nargs="+", help="the ebm-scale arguments, after --")
    args = ap.parse_args()
    firsts = []
    for i in range(args.repeat):
        first, rc = time_once(args.command, args.code, args.timeout, args.as_sweep)
        firsts.append(first)
        print(f"run {i + 1}: first iteration after {first:.2f} s (then stopped; rc {rc})", flush=True)
    print(
        f"median time to first iteration: {statistics.median(firsts):.2f} s "
        f"({args.code or 'this checkout'}{', as a one-trial sweep' if args.as_sweep else ''}; "
        f"load {os.getloadavg()[0]:.2f})"
    )


if __name__ == "__main__":
    main()
