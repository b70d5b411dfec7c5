"""`nt_ebm`: HMC in the flow's latent space vs data space, both objectives, densities, long-chain traces and
exact continuation (persistent chains and adapted step size included)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_continues_exactly

from ebm_scale.methods import DataSpec, build_method
from ebm_scale.methods.backbone import backbone_state, save_backbone
from ebm_scale.methods.nt_ebm import NtEbmConfig, NtEbmSamplerConfig
from ebm_scale.nets.energy import EnergyNetConfig
from ebm_scale.nets.flow import Flow, FlowConfig

SPEC = DataSpec(shape=(2,), bounds=(-4.0, 4.0))


def flow_backbone(tmp_path) -> str:
    torch.manual_seed(0)
    flow = Flow((2,), FlowConfig(depth=2, hidden=16))
    flow.log_prob(torch.randn(64, 2))  # data-dependent actnorm init, as a trained flow would have
    return save_backbone(str(tmp_path), backbone_state("flow", (2,), flow.cfg, flow))


def small_config(backbone, objective="mle", **sampler):
    return NtEbmConfig(
        backbone=backbone,
        objective=objective,
        energy=EnergyNetConfig(hidden=16, layers=3),
        sampler=NtEbmSamplerConfig(steps=3, leapfrog_steps=2, sample_steps=4, **sampler),
    )


@pytest.mark.parametrize("space", ["latent", "data"])
def test_mle_step_runs_hmc_and_reports_acceptance_and_step_size(tmp_path, space):
    method = build_method(small_config(flow_backbone(tmp_path), space=space), SPEC, "cpu")
    flow_before = copy.deepcopy(method.flow.state_dict())
    out = method.train_step(torch.randn(32, 2))
    for key, value in out.items():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), key
    assert 0 <= out["mcmc/accept_rate"] <= 1
    # Adaptation moved the step size by (1 + rate)^±1 per transition, and it persists into the next call.
    ratio = (out["mcmc/step_size"] / 0.15).log() / torch.log(torch.tensor(1.02))
    assert abs(ratio.round() - ratio) < 1e-4 and abs(ratio) <= 3
    assert torch.equal(method.step_size, out["mcmc/step_size"])
    chains = method.chains.clone()
    method.train_step(torch.randn(32, 2))
    assert not torch.equal(chains, method.chains)  # persistent chains moved on
    assert all(torch.equal(v, flow_before[k]) for k, v in method.flow.state_dict().items())


def test_nce_objective_trains_a_bias_and_runs_no_chain(tmp_path):
    method = build_method(small_config(flow_backbone(tmp_path), objective="nce"), SPEC, "cpu")
    out = method.train_step(torch.randn(32, 2))
    assert {"loss/nce_data", "loss/nce_noise", "nce/bias"} <= set(out) and method.chains is None
    assert torch.allclose(out["loss"], out["loss/nce_data"] + out["loss/nce_noise"])
    assert out["nce/bias"] != 0  # the bias is in the optimizer and moved


def test_nce_loss_is_the_logistic_loss_with_data_one_and_noise_zero(tmp_path):
    """loss/nce_data and loss/nce_noise are torch's binary cross-entropy of the logit b − E(x) against label 1
    on the data and 0 on the flow's samples, and the step descends their sum (energy and bias alike)."""
    method = build_method(small_config(flow_backbone(tmp_path), objective="nce"), SPEC, "cpu")
    with torch.no_grad():
        method.networks["nce_bias"].b.fill_(0.7)
    torch.manual_seed(1)
    x_data, x_noise = torch.randn(32, 2) + 1.0, 2.0 * torch.randn(32, 2)
    method.flow.sample = lambda n: x_noise[:n]  # fixed noise samples, so the reference sees the same ones
    energy, bias = copy.deepcopy(method.energy), method.networks["nce_bias"].b.detach().clone().requires_grad_()
    out = method.train_step(x_data)

    ref_data = F.binary_cross_entropy_with_logits(bias - energy(x_data), torch.ones(32))
    ref_noise = F.binary_cross_entropy_with_logits(bias - energy(x_noise), torch.zeros(32))
    swapped = F.binary_cross_entropy_with_logits(bias - energy(x_data), torch.zeros(32))
    assert abs(float((ref_data - swapped).detach())) > 0.05  # the labels matter on these inputs
    assert torch.allclose(out["loss/nce_data"], ref_data.detach(), atol=1e-6)
    assert torch.allclose(out["loss/nce_noise"], ref_noise.detach(), atol=1e-6)
    expected = torch.autograd.grad(ref_data + ref_noise, [bias, *energy.parameters()])
    got = [method.networks["nce_bias"].b.grad, *(p.grad for p in method.energy.parameters())]
    for g, e in zip(got, expected, strict=True):  # Adam has stepped; .grad still holds this step's gradient
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-7)


def test_density_is_the_flow_tilted_by_the_energy(tmp_path):
    method = build_method(small_config(flow_backbone(tmp_path)), SPEC, "cpu")
    x = torch.randn(6, 2)
    d = method.log_density(x)
    assert torch.allclose(d["nt_ebm"], d["flow"] - method.energy(x).detach(), atol=1e-6)
    assert torch.allclose(d["flow"], method.flow.log_prob(x), atol=1e-6)
    # U(z) and U(x) are the same target seen through the flow: U(x) = U(g⁻¹(x)) + log|det ∂g/∂z| + const.
    z = torch.randn(6, 2)
    x, logdet = method.flow.forward_with_logdet(z)
    gap = method.data_energy(x) - method.latent_energy(z) - logdet
    assert torch.allclose(gap, gap[0].expand(6), atol=1e-4)


def test_long_chains_for_both_spaces_and_samples(tmp_path):
    method = build_method(small_config(flow_backbone(tmp_path)), SPEC, "cpu")
    traces = method.long_chains(4, 6)
    assert set(traces) == {"latent", "data"} and all(t.shape == (4, 6, 2) for t in traces.values())
    assert method.sample(9).shape == (9, 2)


def test_continues_exactly_from_its_state(tmp_path):
    cfg = small_config(flow_backbone(tmp_path))
    a, b = assert_continues_exactly(lambda: build_method(cfg, SPEC, "cpu"), [torch.randn(16, 2) for _ in range(4)])
    assert torch.equal(a.chains, b.chains)  # the persistent chains too
