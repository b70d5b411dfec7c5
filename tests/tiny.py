"""Overrides that shrink an `mle` run on a 2D toy to a second or two (shared by the end-to-end tests)."""

MLE = [
    "method.energy.hidden=32",
    "method.energy.layers=3",
    "method.sampler.steps=5",
    "method.sampler.kind=euler",
    "train.batch_size=64",
    "train.log_every=5",
    "eval.n_samples=200",
    "eval.grid_size=40",
]

# Ten iterations, one evaluation, small evaluation sets: a toy sweep's trial in seconds.
SHORT_RUN = [
    "train.iterations=10",
    "train.eval_every=10",
    "train.log_every=5",
    "train.batch_size=32",
    "eval.n_samples=100",
    "eval.grid_size=30",
]
