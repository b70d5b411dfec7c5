"""Backbone files (methods/backbone.py) and their references (engine/backbones.py): written by a stage-1
method, checked for kind and data shape, found again through a real MLflow store by `runs:/` URI."""

import pytest
import torch

from ebm_scale.engine import backbones, tracking
from ebm_scale.errors import ConfigError
from ebm_scale.methods import DataSpec, build_method
from ebm_scale.methods.backbone import FILE_NAME, check_backbone, load_backbone, save_backbone
from ebm_scale.methods.flow import FlowMethodConfig
from ebm_scale.methods.vae import VaeConfig
from ebm_scale.nets.flow import FlowConfig
from ebm_scale.nets.vae import VAEConfig

SPEC = DataSpec(shape=(2,), bounds=(-4.0, 4.0))


def small_flow_method():
    torch.manual_seed(0)
    return build_method(FlowMethodConfig(flow=FlowConfig(depth=2, hidden=16)), SPEC, "cpu")


def test_exported_backbone_round_trips_frozen(tmp_path):
    method = small_flow_method()
    method.train_step(torch.randn(64, 2))  # initialises actnorm, moves the weights
    path = save_backbone(str(tmp_path), method.export_backbone())
    flow = load_backbone(path, "flow", (2,), "cpu")
    x = torch.randn(16, 2)
    assert torch.allclose(flow.log_prob(x), method.networks["flow"].log_prob(x), atol=1e-6)
    assert not any(p.requires_grad for p in flow.parameters()) and not flow.training
    # The folder holding backbone.pt works as a reference too.
    assert load_backbone(str(tmp_path), "flow", (2,), "cpu") is not None


def test_wrong_kind_or_shape_is_rejected_naming_the_key(tmp_path):
    method = small_flow_method()
    path = save_backbone(str(tmp_path), method.export_backbone())
    with pytest.raises(ConfigError, match=r"method\.backbone.*'flow' backbone.*needs a 'vae'"):
        check_backbone(path, "vae", (2,))
    with pytest.raises(ConfigError, match=r"method\.backbone.*shape \(2,\).*shape \(3, 8, 8\)"):
        check_backbone(path, "flow", (3, 8, 8))
    with pytest.raises(ConfigError, match=r"method\.backbone.*no backbone file"):
        check_backbone(str(tmp_path / "missing"), "flow", (2,))


def test_runs_uri_resolves_through_a_real_mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "CACHE", tmp_path / "cache")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = tracking.ensure_experiment(uri, "backbones")
    run_id = tracking.create_run(uri, experiment_id)
    torch.manual_seed(0)
    vae = build_method(VaeConfig(vae=VAEConfig(hidden=16, layers=2, latent_dim=3)), SPEC, "cpu")
    local = save_backbone(str(tmp_path / "export"), vae.export_backbone())
    tracking.MlflowTracker(uri, run_id, async_logging=False).log_artifacts([local], "backbone")

    path = backbones.resolve_backbone(f"runs:/{run_id}/backbone", uri)
    assert path.endswith(FILE_NAME) and str(tmp_path / "cache") in path
    assert check_backbone(path, "vae", (2,))["kind"] == "vae"
    # A second resolution is served from the cache (same file, no second download folder).
    assert backbones.resolve_backbone(f"runs:/{run_id}/backbone", uri) == path
    with pytest.raises(ConfigError, match=r"method\.backbone.*cannot fetch"):
        backbones.resolve_backbone("runs:/0123456789abcdef/backbone", uri)
