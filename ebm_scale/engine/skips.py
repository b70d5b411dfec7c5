"""Skipped optimizer steps are the engine's business: a method with `skip_nonfinite` only declines to take a
step whose loss is not finite (Method.optimizer_step); the loop counts the skips, keeps a skipped step's
non-finite values out of the logged averages, and lets a run that keeps skipping end as diverged."""

from __future__ import annotations

import torch


class SkippedSteps:
    def __init__(self, limit: int):
        self.limit = limit  # skipped iterations in a row after which the run is diverged (train.max_consecutive_skips)
        self.counts: dict[str, int] = {}
        self.in_a_row = 0

    def observe(self, method, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This step's metrics as they should be accumulated. A skipped step reports only its finite values,
        so one bad batch is not mistaken for divergence; once `limit` steps in a row were skipped its
        non-finite values go through, and the loop's finiteness check ends the run as diverged."""
        if not method.skipped_steps:
            self.in_a_row = 0
            return metrics
        for name in method.skipped_steps:
            self.counts[name] = self.counts.get(name, 0) + 1
        method.skipped_steps.clear()
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            return metrics
        return {k: v for k, v in metrics.items() if bool(torch.isfinite(v).all())}

    def metrics(self, method) -> dict[str, float]:
        """train/skipped/<optimizer>: skips so far (for methods that may skip, zeros included)."""
        if not method.skip_nonfinite:
            return {}
        return {f"train/skipped/{name}": float(self.counts.get(name, 0)) for name in method.optimizers}

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.counts, self.in_a_row = dict(state["counts"]), state["in_a_row"]
