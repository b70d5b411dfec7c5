"""Every method (and the stage-1 `vae` and `flow`) on images: built from an image DataSpec with the papers'
networks at tiny widths, a few train steps with finite losses, samples of the data's shape, log-densities,
and the same under CPU bf16 autocast with the chains' states kept fp32."""

import pytest
import torch

from ebm_scale.data.spec import DataSpec
from ebm_scale.methods import build_method
from ebm_scale.methods.backbone import save_backbone
from ebm_scale.methods.ddaebm import DdaebmConfig
from ebm_scale.methods.diffebm import DiffebmConfig, DiffebmSdeConfig
from ebm_scale.methods.flow import FlowMethodConfig
from ebm_scale.methods.mle import MleConfig, MleSamplerConfig
from ebm_scale.methods.nt_ebm import NtEbmConfig, NtEbmSamplerConfig
from ebm_scale.methods.vae import VaeConfig
from ebm_scale.methods.vaebm import VaebmConfig, VaebmSamplerConfig
from ebm_scale.nets.diffusion_nets import DiffusionNetConfig
from ebm_scale.nets.energy import EnergyNetConfig
from ebm_scale.nets.flow import FlowConfig
from ebm_scale.nets.vae import VAEConfig

SHAPES = [(1, 16, 16), (3, 16, 16)]


def mle(backbone_dir, shape, kind="langevin"):
    return MleConfig(
        energy=EnergyNetConfig(arch="mle_conv", channels=4),
        sampler=MleSamplerConfig(kind=kind, steps=3, step_size=0.1),
    )


def mle_ode(backbone_dir, shape):
    cfg = mle(backbone_dir, shape, kind="ode")  # the gradient-flow ODE and its density (Hutchinson's trace here)
    cfg.sampler.horizon, cfg.sampler.rtol, cfg.sampler.atol = 0.05, 1e-3, 1e-3
    return cfg


def mle_generator_loss(backbone_dir, shape):
    cfg = mle(backbone_dir, shape, kind="euler")
    cfg.loss.generator_weight = 1.0
    return cfg


def unet(**fields) -> DiffusionNetConfig:
    return DiffusionNetConfig(arch="unet", channels=8, channel_mults=(1, 2), embed_dim=16, activation="swish", **fields)


def diffebm(backbone_dir, shape):
    return DiffebmConfig(
        sde=DiffebmSdeConfig(steps=3),
        energy=EnergyNetConfig(arch="mle_conv", channels=4),
        control=unet(embedding="fourier"),
    )


def ddaebm(backbone_dir, shape):
    # Paper 001's image networks: E(x, t) = ½‖x − f(x, t)‖² with a U-Net f, a z-conditioned U-Net generator,
    # a conv encoder (the U-Net's down path).
    return DdaebmConfig(energy=unet(), generator=unet(), encoder=unet(), latent_dim=4)


def flow(backbone_dir, shape):
    # Paper 002's Glow, multi-scale: 2 levels of 2 steps on 16 px (the paper: 3 levels of 8-16 at 32-64 px).
    return FlowMethodConfig(flow=FlowConfig(arch="conv", levels=2, depth=2, hidden=8, coupling="additive"))


def vae(backbone_dir, shape):
    return VaeConfig(vae=VAEConfig(arch="conv", latent_dim=8, hidden=4, layers=2), iw_samples=4)


def stage1(kind, backbone_dir, shape) -> str:
    """A freshly built stage-1 method, one train step on image data, exported as the backbone file a stage-2
    method reads (what the engine does when `method.backbone` is empty)."""
    method = build_method(
        (flow if kind == "flow" else vae)(backbone_dir, shape), DataSpec(shape=shape, kind="image"), "cpu"
    )
    method.train_step(batch(shape, 8))
    return save_backbone(str(backbone_dir), method.export_backbone())


def nt_ebm(backbone_dir, shape, sampler_space="latent", **fields):
    return NtEbmConfig(
        backbone=stage1("flow", backbone_dir, shape),
        energy=EnergyNetConfig(arch="nt_ebm", channels=4),
        sampler=NtEbmSamplerConfig(space=sampler_space, steps=2, leapfrog_steps=2, sample_steps=2),
        **fields,
    )


def vaebm(backbone_dir, shape, kind="langevin"):
    return VaebmConfig(
        backbone=stage1("vae", backbone_dir, shape),
        energy=EnergyNetConfig(arch="vaebm_resnet", channels=4),
        sampler=VaebmSamplerConfig(kind=kind, steps=2, sample_steps=2),
        iw_samples=4,
    )


CONFIGS = {
    "mle": mle,
    "mle_generator_loss": mle_generator_loss,
    "mle_ode": mle_ode,
    "diffebm": diffebm,
    "ddaebm": ddaebm,
    "flow": flow,
    "vae": vae,
    "nt_ebm": nt_ebm,
    "nt_ebm_nce": lambda backbone_dir, shape: nt_ebm(backbone_dir, shape, objective="nce"),
    "nt_ebm_data_space": lambda backbone_dir, shape: nt_ebm(backbone_dir, shape, sampler_space="data"),
    "vaebm": vaebm,
    "vaebm_hmc": lambda backbone_dir, shape: vaebm(backbone_dir, shape, kind="hmc"),
}


def batch(shape, n=4):
    return torch.rand(n, *shape) * 2 - 1  # images in [-1, 1]


def run_method(name, shape, tmp_path, steps=2):
    torch.manual_seed(0)
    method = build_method(CONFIGS[name](tmp_path / "backbone", shape), DataSpec(shape=shape, kind="image"), "cpu")
    outs = [method.train_step(batch(shape)) for _ in range(steps)]
    return method, outs


def _tensors(state, prefix="extra"):
    """(path, tensor) for every tensor in a nested extra_state."""
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from _tensors(value, f"{prefix}.{key}")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from _tensors(value, f"{prefix}[{i}]")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}ch")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trains_samples_and_scores_images(name, shape, tmp_path):
    method, outs = run_method(name, shape, tmp_path)
    for out in outs:
        for key, value in out.items():
            assert value.dim() == 0 and torch.isfinite(value), (key, value)
    samples = method.sample(3)
    assert samples.shape == (3, *shape) and samples.dtype == torch.float32 and torch.isfinite(samples).all()
    for key, density in method.log_density(batch(shape, 3)).items():
        assert density.shape == (3,) and torch.isfinite(density).all(), key


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_autocast_keeps_losses_finite_and_chains_fp32(name, tmp_path):
    shape = (3, 16, 16)
    torch.manual_seed(0)
    method = build_method(CONFIGS[name](tmp_path / "backbone", shape), DataSpec(shape=shape, kind="image"), "cpu")
    seen = set()  # the dtypes the networks' convs and linears computed in: autocast must really be on
    hooks = [
        m.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
        for net in method.networks.values()
        for m in net.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [method.train_step(batch(shape)) for _ in range(2)]
        samples = method.sample(3)
    for hook in hooks:
        hook.remove()
    assert torch.bfloat16 in seen
    for out in outs:
        for key, value in out.items():
            assert torch.isfinite(value), (key, value)
            assert value.dtype in (torch.float32, torch.int64), (key, value.dtype)  # fp32 reductions
    assert samples.dtype == torch.float32 and samples.shape == (3, *shape) and torch.isfinite(samples).all()
    for key, value in _tensors(method.extra_state()):  # chains, adapted step sizes, buffers, pools, EMA ...
        assert not value.is_floating_point() or value.dtype == torch.float32, (key, value.dtype)
    for net in method.networks.values():  # autocast never touches the stored weights
        assert all(p.dtype == torch.float32 for p in net.parameters())


def test_vaebm_resnet_gets_its_data_dependent_init_on_the_first_batch(tmp_path):
    # Paper 003 (appendix E): weight normalisation with data-dependent initialisation. After it, each conv's
    # output over the first batch has zero mean and unit std per channel; lr 0 keeps the optimizer out of it.
    shape = (3, 16, 16)
    torch.manual_seed(0)
    cfg = vaebm(tmp_path, shape)
    cfg.optim.lr, cfg.sampler.steps = 0.0, 1
    method = build_method(cfg, DataSpec(shape=shape, kind="image"), "cpu")
    x = batch(shape, 16)
    with torch.no_grad():
        before = method.energy.stem(x)
    assert not torch.allclose(before.std((0, 2, 3)), torch.ones(4), atol=0.1)
    method.train_step(x)
    with torch.no_grad():
        after = method.energy.stem(x)
    assert torch.allclose(after.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(after.std((0, 2, 3)), torch.ones(4), atol=1e-3)
    g = method.energy.stem.parametrizations.weight.original0.clone()
    method.train_step(batch(shape, 16))  # only the first batch initialises
    assert torch.equal(g, method.energy.stem.parametrizations.weight.original0)
