"""train.precision / train.sampler_precision: what runs in bf16 and what stays fp32 (CPU autocast is bf16 too)."""

import torch
from torch import nn

from ebm_scale.engine.loop import Precision
from ebm_scale.samplers import sample_langevin
from ebm_scale.samplers.langevin import energy_and_grad
from ebm_scale.samplers.precision import sampler_autocast


class Recording(nn.Module):
    """A conv energy that records the dtype its conv computed in."""

    def __init__(self):
        super().__init__()
        self.conv, self.seen = nn.Conv2d(1, 4, 3, padding=1), []

    def forward(self, x):
        h = self.conv(x)
        self.seen.append(h.dtype)
        return h.flatten(1).pow(2).sum(1)


class Settings:
    def __init__(self, precision, sampler_precision):
        self.precision, self.sampler_precision = precision, sampler_precision


def _chain(precision: Precision):
    net, x0 = Recording(), torch.randn(3, 1, 8, 8)
    with precision.train():
        net(x0)  # a network pass outside the sampler (the loss's)
        x = sample_langevin(net, x0, steps=2, step_size=0.1, noise_scale=0.1)
    return net.seen[1:], net.seen[0], x


def test_bf16_runs_network_passes_in_bf16_but_sampler_energies_in_fp32_by_default():
    sampler_dtypes, loss_pass, x = _chain(Precision(Settings("bf16", "fp32"), torch.device("cpu")))
    assert loss_pass == torch.bfloat16 and x.dtype == torch.float32
    assert sampler_dtypes == [torch.float32, torch.float32]


def test_sampler_precision_bf16_lets_the_chain_energies_autocast():
    sampler_dtypes, _, x = _chain(Precision(Settings("bf16", "bf16"), torch.device("cpu")))
    assert sampler_dtypes == [torch.bfloat16, torch.bfloat16] and x.dtype == torch.float32


def test_fp32_run_has_no_autocast_anywhere():
    sampler_dtypes, loss_pass, _ = _chain(Precision(Settings("fp32", "bf16"), torch.device("cpu")))
    assert loss_pass == torch.float32 and sampler_dtypes == [torch.float32, torch.float32]


def test_energy_and_grad_gives_energies_in_the_chains_dtype():
    net, x = Recording(), torch.randn(2, 1, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), sampler_autocast(True):
        energy, grad = energy_and_grad(net, x, create_graph=False)
    assert net.seen == [torch.bfloat16] and energy.dtype == torch.float32 and grad.dtype == torch.float32


def test_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert not Precision(Settings("auto", "fp32"), torch.device("cpu")).enabled
    assert Precision(Settings("auto", "fp32"), torch.device("cuda", 0)).enabled
