"""benchmarks/engine_overhead.py's bare loop must do the engine's math: its hand-written conv energy is
paper 000's net as `mle_conv` builds it (same layers, and the same energies once given the same weights)."""

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from ebm_scale.config import compose
from ebm_scale.nets.conv_energy import ConvEnergyConfig, MLEConvEnergy

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "engine_overhead.py"


@functools.cache
def _bench():
    spec = importlib.util.spec_from_file_location("engine_overhead", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@functools.cache
def _config(growth: str):
    return compose(None, ["method.energy.arch=mle_conv", "method.energy.channels=4", f"method.energy.growth={growth}"])


@pytest.mark.parametrize("growth", ["constant", "doubling"])
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 32)])
def test_bare_conv_is_mle_conv(growth, shape):
    torch.set_num_threads(1)
    bench = _bench()
    bare = bench.bare_conv(_config(growth), shape)
    engine = MLEConvEnergy(shape, ConvEnergyConfig(arch="mle_conv", channels=4, growth=growth))
    bare_params, engine_params = list(bare.parameters()), list(engine.parameters())
    assert [p.numel() for p in bare_params] == [p.numel() for p in engine_params]
    with torch.no_grad():
        for b, e in zip(bare_params, engine_params):
            b.copy_(e.reshape(b.shape))  # the head: Linear's (1, w) and (1,) against ScalarHead's (w,) and ()
        x = torch.randn(5, *shape)
        torch.testing.assert_close(bare(x)[:, 0], engine(x))


def test_image_bench_composes_with_the_papers_net():
    cfg = _bench().IMAGE.compose([])
    assert (cfg.method.energy.arch, cfg.data.name, cfg.data.image_size) == ("mle_conv", "fashion_mnist", 32)
    assert cfg.data.num_workers == 0 and cfg.eval.fid.extractor == "random"
