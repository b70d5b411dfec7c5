"""2D toy datasets: shapes, determinism, mass inside the box, exact mixture densities, config validation."""

import math

import pytest
import torch

from ebm_scale.config import compose
from ebm_scale.data import DATASETS, DataConfig, load_dataset
from ebm_scale.data.toy import TOY_DATASETS
from ebm_scale.errors import ConfigError

ALL_NAMES = ["swissroll", "8gaussians", "25gaussians", "grid", "pinwheel", "checkerboard", "2spirals", "rings", "moons"]
MIXTURES = ["8gaussians", "25gaussians", "grid"]


def _sample(name, n=10_000, seed=0):
    return TOY_DATASETS[name].sample(n, torch.Generator().manual_seed(seed))


def test_registry_names_are_exactly_the_documented_ones():
    assert sorted(TOY_DATASETS) == sorted(ALL_NAMES)
    assert set(DATASETS) >= set(ALL_NAMES)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_samples_are_finite_float32_inside_the_box(name):
    x = _sample(name)
    assert x.shape == (10_000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    low, high = TOY_DATASETS[name].bounds
    inside = ((x >= low) & (x <= high)).all(dim=1).float().mean()
    assert inside >= 0.999
    assert TOY_DATASETS[name].description  # each dataset documents its scale


@pytest.mark.parametrize("name", ALL_NAMES)
def test_sampling_is_deterministic_given_the_seed(name):
    assert torch.equal(_sample(name, 500, seed=3), _sample(name, 500, seed=3))
    assert not torch.equal(_sample(name, 500, seed=3), _sample(name, 500, seed=4))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_odd_sizes_work(name):
    assert _sample(name, 7).shape == (7, 2) and _sample(name, 0).shape == (0, 2)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_only_the_mixtures_have_an_exact_log_prob(name):
    dist = TOY_DATASETS[name]
    assert dist.has_log_prob == (name in MIXTURES)


def test_8gaussians_has_ffjord_scale():
    radius = _sample("8gaussians").double().norm(dim=1)
    assert abs(radius.mean() - 4 / 1.414) < 0.05


def test_checkerboard_fills_only_the_checker_squares():
    # Squares of side 2: the occupied ones are those whose integer coordinates have an even sum.
    cells = torch.floor(_sample("checkerboard").double() / 2)
    assert ((cells.sum(dim=1) % 2) == 0).all()


def _mixture_density_by_hand(x, means, std):
    """Independent check: (1/K) Σ_k exp(−|x − μ_k|² / 2σ²) / (2πσ²), in plain Python."""
    total = sum(
        math.exp(-((x[0] - mx) ** 2 + (x[1] - my) ** 2) / (2 * std**2)) / (2 * math.pi * std**2) for mx, my in means
    )
    return math.log(total / len(means))


@pytest.mark.parametrize(
    ("name", "means", "std", "point"),
    [
        (
            "8gaussians",
            [(4 / 1.414 * math.cos(k * math.pi / 4), 4 / 1.414 * math.sin(k * math.pi / 4)) for k in range(8)],
            0.5 / 1.414,
            (2.5, 0.4),
        ),
        ("25gaussians", [(i, j) for i in (-4, -2, 0, 2, 4) for j in (-4, -2, 0, 2, 4)], 0.08, (2.03, -3.9)),
        ("grid", [(i, j) for i in (-5, 0, 5) for j in (-5, 0, 5)], math.sqrt(0.3), (4.2, 0.7)),
    ],
)
def test_mixture_log_prob_matches_a_hand_computation(name, means, std, point):
    got = TOY_DATASETS[name].log_prob(torch.tensor([point], dtype=torch.float64))
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(_mixture_density_by_hand(point, means, std), abs=1e-9)


def test_load_dataset_is_seeded_with_independent_train_and_test_streams():
    cfg = DataConfig(name="moons", n_train=300, n_test=200)
    a, b = load_dataset(cfg, seed=5), load_dataset(cfg, seed=5)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.equal(a.train[:200], a.test)
    assert not torch.equal(a.train, load_dataset(cfg, seed=6).train)
    # Independent streams: the test set does not depend on how much training data was drawn.
    bigger = load_dataset(DataConfig(name="moons", n_train=1000, n_test=200), seed=5)
    assert torch.equal(bigger.test, a.test)


def test_load_dataset_fills_spec_and_log_prob():
    data = load_dataset(DataConfig(name="grid", n_train=10, n_test=20), seed=0)
    assert data.train.shape == (10, 2) and data.test.shape == (20, 2) and data.name == "grid"
    assert data.spec.shape == (2,) and data.spec.kind == "toy2d" and data.spec.bounds == TOY_DATASETS["grid"].bounds
    assert data.log_prob is not None
    assert load_dataset(DataConfig(name="rings", n_train=10, n_test=10), seed=0).log_prob is None


def test_unknown_dataset_names_the_key_and_the_choices():
    with pytest.raises(ConfigError) as err:
        DataConfig(name="nope").validate()
    assert "data.name" in str(err.value) and "8gaussians" in str(err.value)
    with pytest.raises(ConfigError, match="data.name"):  # checked when composed, before anything loads
        compose(None, ["data.name=nope"])


@pytest.mark.parametrize("field", ["n_train", "n_test"])
def test_sizes_must_be_positive(field):
    with pytest.raises(ConfigError, match=f"mydata.{field}"):
        DataConfig(**{field: 0}).validate("mydata")
