"""The `ray up` configs validate against Ray's own autoscaler schema (offline), and start Ray from the
project's venv so workers import the same code."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
RAY_UP_CONFIGS = ["ray_cluster.yaml", "clusters/gcp.yaml", "clusters/onprem.yaml"]


@pytest.mark.parametrize("name", RAY_UP_CONFIGS)
def test_ray_up_config_is_valid(name):
    config = yaml.safe_load((ROOT / name).read_text())
    validate_config(prepare_config(config))  # raises on schema violations
    starts = config.get("head_start_ray_commands", []) + config.get("worker_start_ray_commands", [])
    assert all("uv run ray" in c for c in starts if "ray st" in c), "Ray must be started from the project's venv"
    assert any("uv sync --locked" in c for c in config["setup_commands"])


def test_docker_images_match_locked_ray():
    import ray

    for name in ("ray_cluster.yaml", "clusters/gcp.yaml"):
        image = yaml.safe_load((ROOT / name).read_text())["docker"]["image"]
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311"), image


def test_kuberay_manifest_parses_and_pins_ray():
    import ray

    manifest = yaml.safe_load((ROOT / "clusters/kuberay.yaml").read_text())
    assert manifest["kind"] == "RayCluster"
    assert manifest["spec"]["rayVersion"] == ray.__version__
