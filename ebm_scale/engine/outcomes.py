"""What happened to a run: one of finished, pruned (stopped early by ASHA), diverged (non-finite loss or
energy) or failed (an exception), decided from its last report — and what MLflow and Optuna call each.

A sweep's trial and a single `ebm-scale train` run use the same rule, so their MLflow runs read alike.
"""

from __future__ import annotations

OUTCOMES = ("finished", "pruned", "diverged", "failed")

# MLflow has no 'pruned'/'diverged' status: the run's outcome tag says which.
MLFLOW_STATUS = {"finished": "FINISHED", "pruned": "KILLED", "diverged": "FAILED", "failed": "FAILED"}
# A sweep stopped by Ctrl-C, SIGTERM or a killed driver: its unfinished trials (and the sweep's own run) are
# "interrupted" until `--resume` takes them up again. Never an Optuna state: the trial is not over.
INTERRUPTED = "interrupted"
MLFLOW_STATUS[INTERRUPTED] = "KILLED"

# Optuna's trial state per outcome (names of optuna.trial.TrialState, so this module imports nothing).
OPTUNA_STATE = {"finished": "COMPLETE", "pruned": "PRUNED", "diverged": "FAIL", "failed": "FAIL"}


def trial_outcome(result: dict | None, iterations: int, error: bool) -> str:
    if error:
        return "failed"
    if not result:
        return "pruned"
    if result.get("diverged"):
        return "diverged"
    return "finished" if result.get("step", 0) >= iterations else "pruned"
