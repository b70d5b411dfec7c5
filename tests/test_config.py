"""Config composition and validation: bad input fails before anything launches, naming the key."""

import pytest

from ebm_scale.cli import main
from ebm_scale.config import compose, sweeps_dir
from ebm_scale.engine.sweep import max_concurrent_trials
from ebm_scale.errors import ConfigError


def test_quickstart_composes_with_the_issue_search_space():
    cfg = compose("quickstart")
    assert cfg.method.name == "mle" and cfg.data.name == "8gaussians"
    assert cfg.search.num_samples >= 12
    assert cfg.search.scheduler.kind == "asha"
    assert set(cfg.search.space) == {
        "method.sampler.step_size",
        "method.sampler.steps",
        "method.sampler.noise_scale",
        "method.loss.generator_weight",
    }


def test_every_named_sweep_and_group_option_composes():
    for sweep in sorted(p.stem for p in sweeps_dir().glob("*.yaml")):
        compose(sweep)
    for data in sorted(p.stem for p in (sweeps_dir() / "data").glob("*.yaml")):
        assert compose(None, [f"data={data}"]).data.name == data


def test_sweep_file_by_path(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("defaults:\n  - config\n  - override data: grid\n  - _self_\nname: mine\ntrain: {iterations: 7}\n")
    cfg = compose(str(f), ["seed=3"])
    assert (cfg.name, cfg.data.name, cfg.train.iterations, cfg.seed) == ("mine", "grid", 7, 3)


def test_overrides_reach_typed_fields():
    cfg = compose("quickstart", ["method.sampler.step_size=0.05", "method.sampler.rtol=1e-4", "train.threads=2"])
    assert cfg.method.sampler.step_size == 0.05 and cfg.method.sampler.rtol == 1e-4 and cfg.train.threads == 2


@pytest.mark.parametrize(
    "overrides, key, hint",
    [
        (["method=nope"], "method", "mle"),
        (["data=nope"], "data", "8gaussians"),
        (["data.name=nope"], "data.name", "8gaussians"),
        (["method.sampler.stepsize=0.1"], "method.sampler.stepsize", None),
        (["method.sampler.steps=many"], "method.sampler.steps", None),
        (["method.sampler.step_size=0"], "method.sampler.step_size", None),
        (["method.sampler.step_size=-1"], "method.sampler.step_size", None),
        (["method.sampler.steps=0"], "method.sampler.steps", None),
        (["method.sampler.kind=hmc"], "method.sampler.kind", "langevin"),
        (["train.iterations=0"], "train.iterations", None),
        (["scaling.num_workers=-1"], "scaling.num_workers", None),
        (["scaling.use_gpu=true"], "scaling.use_gpu", None),
        (["search.scheduler.kind=hyperband"], "search.scheduler.kind", "asha"),
        (["search.space.method.sampler.step_size={loguniform:[0,1]}"], "search.space.method.sampler.step_size", None),
    ],
)
def test_bad_values_are_rejected_naming_the_key(overrides, key, hint):
    with pytest.raises(ConfigError) as err:
        compose("quickstart", overrides)
    assert err.value.key == key, str(err.value)
    assert key in str(err.value)
    if hint:
        assert hint in str(err.value)


TRAIN_BAD = [
    ("iterations", 0),
    ("batch_size", 0),
    ("eval_every", 0),
    ("log_every", 0),
    ("device", "tpu"),
    ("threads", 0),
    ("max_consecutive_skips", 0),
]


@pytest.mark.parametrize("field, value", TRAIN_BAD)
def test_every_train_check_rejects_its_bad_value(field, value):
    with pytest.raises(ConfigError) as err:
        compose(None, [f"train.{field}={value}"])
    assert err.value.key == f"train.{field}", str(err.value)


def test_train_values_at_their_bounds_are_accepted():
    cfg = compose(
        None,
        [
            "train.iterations=1",
            "train.batch_size=1",
            "train.eval_every=1",
            "train.log_every=1",
            "train.threads=1",
            "train.device=cpu",
        ],
    )
    assert (cfg.train.iterations, cfg.train.batch_size, cfg.train.threads, cfg.train.device) == (1, 1, 1, "cpu")


@pytest.mark.parametrize("value", [0, 1, 1.5])
def test_vaebm_target_accept_must_be_a_probability_strictly_inside_0_1(value):
    with pytest.raises(ConfigError) as err:
        compose(None, ["method=vaebm", f"method.sampler.target_accept={value}"])
    assert err.value.key == "method.sampler.target_accept", str(err.value)


def test_vaebm_target_accept_inside_0_1_is_accepted():
    assert compose(None, ["method=vaebm", "method.sampler.target_accept=0.9"]).method.sampler.target_accept == 0.9


def test_search_space_keys_must_exist(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text(
        "defaults:\n  - quickstart\n  - _self_\nsearch:\n  space:\n"
        "    method.sampler.stepsize: {loguniform: [0.001, 1.0]}\n"
    )
    with pytest.raises(ConfigError) as err:
        compose(str(f))
    assert err.value.key == "search.space.method.sampler.stepsize"


def test_unknown_sweep_lists_the_named_sweeps():
    with pytest.raises(ConfigError, match="quickstart"):
        compose("no_such_sweep")


def test_more_workers_than_the_cluster_offers_is_rejected():
    cfg = compose("quickstart", ["scaling.num_workers=8", "scaling.cpus_per_worker=1"])
    with pytest.raises(ConfigError) as err:
        max_concurrent_trials(cfg, {"CPU": 4.0})
    assert err.value.key == "scaling.num_workers"
    gpu = compose("quickstart", ["scaling=gpu"])
    with pytest.raises(ConfigError) as err:
        max_concurrent_trials(gpu, {"CPU": 64.0})
    assert err.value.key == "scaling.use_gpu"


def test_a_joined_cluster_with_a_given_concurrency_waits_for_its_autoscaler():
    gpu = compose("quickstart", ["scaling=gpu", "search.max_concurrent_trials=3"])
    lines: list[str] = []
    assert max_concurrent_trials(gpu, {"CPU": 8.0}, autoscaling=True, printer=lines.append) == 3
    assert len(lines) == 1 and "autoscaler" in lines[0] and "scaling.use_gpu" in lines[0]
    with pytest.raises(ConfigError):  # a local Ray grows no GPUs
        max_concurrent_trials(gpu, {"CPU": 8.0}, autoscaling=False)
    with pytest.raises(ConfigError):  # without a given concurrency there is nothing to size the sweep by
        max_concurrent_trials(compose("quickstart", ["scaling=gpu"]), {"CPU": 8.0}, autoscaling=True)


def test_placement_and_driver_resources_reach_the_trial_and_the_fit_check():
    cfg = compose(
        "quickstart",
        ["scaling=cpu2", "scaling.placement_strategy=SPREAD", "scaling.driver_cpus=0",
         "scaling.driver_resources={trial_driver: 1}", "scaling.accelerator_type=A100"],
    )  # fmt: skip
    assert cfg.scaling.driver_bundle() == {"CPU": 0.0, "trial_driver": 1.0}
    need = cfg.scaling.trial_resources()
    assert need["trial_driver"] == 1.0 and need["accelerator_type:A100"] == pytest.approx(0.002)
    with pytest.raises(ConfigError) as err:
        max_concurrent_trials(cfg, {"CPU": 8.0, "accelerator_type:A100": 1.0})
    assert err.value.key == "scaling.driver_resources"
    with pytest.raises(ConfigError) as err:
        max_concurrent_trials(cfg, {"CPU": 8.0, "trial_driver": 4.0})
    assert err.value.key == "scaling.accelerator_type"
    assert max_concurrent_trials(cfg, {"CPU": 8.0, "trial_driver": 4.0, "accelerator_type:A100": 1.0}) == 4
    with pytest.raises(ConfigError) as err:
        compose("quickstart", ["scaling.placement_strategy=SPREAD"])  # in-process trials have no workers to place
    assert err.value.key == "scaling.placement_strategy"
    with pytest.raises(ConfigError) as err:
        compose("quickstart", ["scaling.driver_resources={GPU: 1}"])
    assert err.value.key == "scaling.driver_resources"


def test_concurrency_follows_resources():
    cfg = compose("quickstart")  # in-process trials, 1 CPU each
    assert max_concurrent_trials(cfg, {"CPU": 2.0}) == 2
    assert max_concurrent_trials(cfg, {"CPU": 64.0}) == cfg.search.num_samples
    two = compose("quickstart", ["scaling=cpu2"])
    assert max_concurrent_trials(two, {"CPU": 2.0}) == 1


def test_cli_validate(capsys):
    assert main(["validate", "quickstart"]) == 0
    assert "OK: quickstart is valid" in capsys.readouterr().out
    assert main(["validate", "quickstart", "method.sampler.step_size=-1"]) == 2
    assert "method.sampler.step_size" in capsys.readouterr().err


def test_single_run_keeps_the_sweeps_settings_and_drops_its_search():
    """`ebm-scale train <sweep>` trains the sweep's own settings, not a draw from its search space (a
    `search.space={}` override would merge into the space and keep every key)."""
    cfg = compose("nt_ebm_toy", ["train.iterations=10"], single_run=True)
    assert cfg.search.space == {} and cfg.search.num_samples == 1 and cfg.search.scheduler.kind == "fifo"
    swept = compose("nt_ebm_toy")
    assert swept.search.space and cfg.method.sampler == swept.method.sampler and cfg.train.iterations == 10


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.nope=1", "train.nope"),  # Hydra: "Could not override 'train.nope'"
        ("train.iterations=[1, 2]", "train.iterations"),  # Hydra: "Error merging override train.iterations=..."
        ("+train.iterations=5", "train.iterations"),  # Hydra: "Could not append to config. An item is already at"
    ],
)
def test_hydra_errors_without_structure_still_name_the_key(override, key):
    """Hydra gives no key for these, only English text (config._override_key reads it): an upgrade that
    rewords them fails here instead of silently naming 'overrides'."""
    with pytest.raises(ConfigError) as err:
        compose(None, [override])
    assert err.value.key == key, str(err.value)
