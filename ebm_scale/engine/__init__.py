"""The engine adapts plain-PyTorch methods to Ray Train, Ray Tune + Optuna and MLflow. Layers, each importing
only those above it:

outcomes.py  what happened to a run (finished / pruned / diverged / failed) and what MLflow and Optuna call it
progress.py  the lines a run or a sweep prints (clock, value format, heartbeat)
state.py     checkpoint contents: models, optimizers, samplers' buffers, every RNG, the step
loop.py      the training loop every worker runs (no Ray, no MLflow: both are injected through a Session)
tracking.py  MLflow: experiments, runs, batched asynchronous metric logging, tags — the only MLflow client
backbones.py two-stage methods: backbone references resolved and cached; the stage-1 config
launch.py    Ray: joining the cluster, resources, the TorchTrainer job, a sweep's trial and its sessions
run.py       one run without Tune (`ebm-scale train`, backbone pretraining): in-process or a TorchTrainer
summary.py   the sweep's pictures
sweep.py     the sweep: Tuner + OptunaSearch + ASHA, the outcomes callback, resume, the sweep's summary
"""
