"""ebm_scale: train, sweep and compare energy-based models on Ray Train + Ray Tune/Optuna + MLflow."""

import os

# Under `uv run`, Ray would by default re-launch every worker through `uv run` in the driver's working
# directory (and refuse to start from any other directory). Workers already share the driver's venv
# locally, and cluster nodes start Ray from their own locked venv, so the hook only costs start-up time.
# Must be set before `ray` is first imported (Ray reads it at import).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# ebm-scale prints its own one-line-per-trial progress; Tune's tables and MLflow's download bars would bury it.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

__version__ = "0.1.0"
