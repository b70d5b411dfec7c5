"""The lines a run or a sweep prints while it goes: a clock since the start, one value format, the heartbeat."""

from __future__ import annotations

import time
from typing import Callable

Printer = Callable[[str], None]

# A line at least this often from a long run, between its evaluations: alive, and how fast.
HEARTBEAT_S = 30.0
# A sweep's trial beats twice as often into its MLflow run, and the sweep polls every POLL_S: what it prints
# is then at most ~HEARTBEAT_S + POLL_S old instead of up to twice HEARTBEAT_S.
TRIAL_HEARTBEAT_S = HEARTBEAT_S / 2
POLL_S = 5.0


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Clock:
    def __init__(self):
        self.t0 = time.time()

    def __str__(self) -> str:
        return f"[{time.time() - self.t0:4.0f}s]"


def heartbeat_line(clock: Clock, who: str, step: int, iterations: int, iters_per_s: float) -> str:
    return f"{clock} running  {who + '  ' if who else ''}step {step}/{iterations}  {iters_per_s:.3g} it/s"
