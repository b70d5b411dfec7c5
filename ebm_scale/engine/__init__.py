"""The engine adapts plain-PyTorch methods to Ray Train, Ray Tune + Optuna and MLflow.

loop.py      the training loop every worker runs (no Ray, no MLflow: both are injected)
state.py     checkpoint contents: models, optimizers, samplers' buffers, every RNG, the step
tracking.py  MLflow: sweep parent run, nested trial runs, batched asynchronous metric logging
launch.py    one trial: in-process or as a TorchTrainer job; the Ray-facing sessions
sweep.py     the sweep: Tuner + OptunaSearch + ASHA, outcomes, resume, summary
"""
