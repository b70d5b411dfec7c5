"""Every bad input a newcomer tried is one clear line: exit 2, the key named, no traceback, and nothing left
behind (no MLflow store, no run folder, no Ray session). Each case runs the real CLI entry point in a fresh
working directory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import ray

from ebm_scale.cli import main
from ebm_scale.config import compose
from ebm_scale.errors import ConfigError

SPACE_SWEEP = "defaults:\n  - config\n  - override search: asha\n  - _self_\nname: bad\nsearch:\n  space:\n    {}\n"
FILES = {
    "syntax.yaml": "defaults:\n  - config\n  - _self_\nname: bad\ntrain: {iterations: 10\n",
    "tab.yaml": "defaults:\n  - config\n  - _self_\nname: bad\ntrain:\n\titerations: 10\n",
    "space_list.yaml": SPACE_SWEEP.replace("  space:\n    {}\n", "  space: [1, 2]\n"),
    "float_on_int.yaml": SPACE_SWEEP.format("method.sampler.steps: {uniform: [-5, 25]}"),
    "str_on_float.yaml": SPACE_SWEEP.format("method.sampler.step_size: {choice: [abc, def]}"),
    "out_of_bounds.yaml": SPACE_SWEEP.format("method.sampler.noise_scale: {uniform: [-1.0, 1.0]}"),
    "bad_int_bound.yaml": SPACE_SWEEP.format("method.sampler.steps: {randint: [0, 25]}"),
}

# (argv after `ebm-scale`, the key the one line must name, a fragment it must say)
CASES = [
    (["sweep", "quickstart", "method=5"], "method", "allowed: ddaebm"),
    (["sweep", "quickstart", "=5"], "overrides", "names no key"),
    (["sweep", "quickstart", "data=9gaussians"], "data", "allowed: 25gaussians"),
    (["sweep", "{tmp}/syntax.yaml"], "config", "line 6, column 1"),
    (["sweep", "{tmp}/tab.yaml"], "config", "tabs"),
    (["sweep", "{tmp}/space_list.yaml"], "search.space", "got list"),
    (["sweep", "{tmp}/float_on_int.yaml"], "search.space.method.sampler.steps", "integer"),
    (["sweep", "{tmp}/str_on_float.yaml"], "search.space.method.sampler.step_size", "takes float"),
    (["sweep", "{tmp}/out_of_bounds.yaml"], "search.space.method.sampler.noise_scale", "must be >= 0"),
    (["sweep", "{tmp}/bad_int_bound.yaml"], "search.space.method.sampler.steps", "must be >= 1"),
    (["sweep", "config", "search=asha"], "search.space", "is empty"),
    (["sweep", "quickstart", "name=héllo"], "name", "must be quoted"),
    (["sweep", "quickstart", "name=" + "x" * 300], "name", "at most 100"),
    (["sweep", "quickstart", "storage.path=/proc/ebm/runs"], "storage.path", "cannot create"),
    (["sweep", "quickstart", "storage.path={tmp}/syntax.yaml/runs"], "storage.path", "is a file"),
    (["sweep", "quickstart", "tracking.uri=not a uri"], "tracking.uri", "must be a URI"),
    (["sweep", "quickstart", "tracking.uri=http://"], "tracking.uri", "needs a host"),
    (["sweep", "quickstart", "method.net.hidden=32"], "method.net", "renamed to method.energy"),
    (["sweep", "quickstart", "method.sampler.steps=abc"], "method.sampler.steps", "abc"),
    (["validate", "quickstart", "method.sampler.step_size=-1"], "method.sampler.step_size", "must be > 0"),
    (["train", "method=mle", "train.iterations=0"], "train.iterations", "must be >= 1"),
    (["sweep", "quickstart", "scaling=gpu", "train.iterations=100"], "scaling.use_gpu", "GPU"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    return tmp_path


@pytest.mark.parametrize("argv, key, fragment", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_one_line_naming_the_key(workdir, capsys, argv, key, fragment):
    argv = [a.replace("{tmp}", str(workdir)) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"ebm-scale: config error: {key}: "), err
    assert fragment in err[0], err
    assert "Traceback" not in err[0]
    left = {p.name for p in (workdir / "run").iterdir()}
    # Nothing but, for checks that need the cluster, the MLflow store the sweep opens while Ray starts
    # (side by side, to save start-up time): it must hold no run.
    assert left <= {"mlflow.db"}, left
    if left:
        assert _runs(workdir / "run" / "mlflow.db") == 0
    assert not ray.is_initialized()


def _runs(db) -> int:
    import sqlite3

    with sqlite3.connect(db) as con:
        return con.execute("select count(*) from runs").fetchone()[0]


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    """The same through a real process: what a user's shell sees."""
    out = subprocess.run(
        [sys.executable, "-m", "ebm_scale.cli", "sweep", "quickstart", "method=5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "ebm-scale: config error: method: names a config in sweeps/method/, got 5 "
        "(allowed: ddaebm, diffebm, flow, mle, nt_ebm, vae, vaebm)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_search_space_entries_can_be_set_from_the_command_line():
    cfg = compose(
        "quickstart",
        [
            "search.space.method.sampler.steps={randint: [3, 9]}",
            "+search.space.method.optim.lr={loguniform: [1.0e-4, 1.0e-2]}",
            "~search.space.method.loss.generator_weight",
        ],
    )
    assert cfg.search.space["method.sampler.steps"] == {"randint": [3, 9]}  # replaced, not merged
    assert cfg.search.space["method.optim.lr"] == {"loguniform": [1.0e-4, 1.0e-2]}
    assert "method.loss.generator_weight" not in cfg.search.space
    assert "method.sampler.step_size" in cfg.search.space  # the rest of the sweep's space stays
    whole = compose("quickstart", ["search.space={method.sampler.steps: {randint: [3, 9]}}"])
    assert whole.search.space == {"method.sampler.steps": {"randint": [3, 9]}}
    with pytest.raises(ConfigError) as err:
        compose("quickstart", ["~search.space.method.nope"])
    assert err.value.key == "search.space.method.nope"


def test_a_search_value_must_fit_the_field():
    ok = compose(
        "quickstart",
        [
            "search.space.method.sampler.steps={choice: [5, 10]}",
            "search.space.method.sampler.step_size={randint: [1, 3]}",
        ],
    )  # ints fit a float
    assert ok.search.space["method.sampler.steps"] == {"choice": [5, 10]}
    for space, key in [
        ("{method.sampler.steps: {choice: [5, 2.5]}}", "search.space.method.sampler.steps"),
        ("{method.sampler.kind: {choice: [langevin, hmc]}}", "search.space.method.sampler.kind"),
        ("{method.sampler: {choice: [1, 2]}}", "search.space.method.sampler"),
        ("{method.nope: {uniform: [0.0, 1.0]}}", "search.space.method.nope"),
        (
            "{method.sampler.buffer_reinit_prob: {uniform: [0.5, 1.5]}}",
            "search.space.method.sampler.buffer_reinit_prob",
        ),
    ]:
        with pytest.raises(ConfigError) as err:
            compose("quickstart", [f"search.space={space}"])
        assert err.value.key == key, (space, str(err.value))


def test_config_error_survives_pickling_as_it_does_from_a_ray_worker():
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("data.root", "fashion_mnist not found under /x", ["a", "b"])))
    assert isinstance(err, ConfigError) and err.key == "data.root" and err.allowed == ["a", "b"]
    assert str(err) == "data.root: fashion_mnist not found under /x (allowed: a, b)"
