"""`vaebm`: an energy correcting a frozen VAE, sampled by Langevin in the VAE's noise space (paper 003,
docs/methods/vaebm.md).

    h(x, z) ∝ p_vae(x, z) · exp(−E(x));  x = T(ε) = μ_x(ε_z) + σ_x(ε_z)·ε_x,  z = ε_z,  ε ~ N(0, I)

In ε-space the target is ∝ exp(−E(T(ε))) · N(ε; 0, I): every coordinate has unit scale, so one step size
serves z and x alike (the paper's point, its appendix B). Training is contrastive maximum likelihood on E
with negatives T(ε_K) from K Langevin steps, plus the spectral regularizer. The VAE is stage 1 (`vae`),
referenced by `backbone` and never updated here.

`sampler.kind: hmc` swaps the paper's fixed-step Langevin for Metropolis-corrected HMC in the same ε-space
with its step adapted toward a target acceptance (leapfrog_steps 1 = MALA) — not in the paper. Why it exists:
as E sharpens, U's curvature in ε-space is ~ Jᵀ∇²E J through the decoder's Jacobian J, so a step that was
stable early overshoots later; a fixed-step chain then scatters its negatives and the energy chases them
(on 25gaussians every Langevin setting tried ran away: docs/results/vaebm.md). The MH test keeps the chain exact
and the adaptation shrinks ε as the energy sharpens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ebm_scale.methods.backbone import PretrainConfig, load_backbone
from ebm_scale.methods.base import DataSpec, Method, OptimConfig
from ebm_scale.methods.registry import register_method
from ebm_scale.methods.vae import VaeConfig
from ebm_scale.nets.energy import EnergyNetConfig, build_energy
from ebm_scale.nets.spectral import SpectralPenalty
from ebm_scale.nets.vae import VAEConfig
from ebm_scale.samplers import ChainEnds, HmcStats, ReplayBuffer, mean_grad_norm, sample_hmc, sample_langevin
from ebm_scale.schema import Config, knob

SAMPLER_KINDS = ("langevin", "hmc")


@dataclass
class VaebmSamplerConfig(Config):
    kind: str = knob(
        "langevin", choices=SAMPLER_KINDS, noun="sampler"
    )  # langevin (the paper) | hmc (Metropolis-corrected, step adapted; see the docstring)
    step_size: float = knob(
        8e-5, gt=0
    )  # langevin: η, shared by ε_z and ε_x (paper Table 8, CIFAR-10); hmc: the initial
    # leapfrog ε (for L = 1 the proposal is a Langevin step with η = ε²)
    steps: int = knob(10, ge=1)  # K at training
    sample_steps: int = knob(16, ge=1)  # K at test time (paper: longer chains than training, 16 vs 10)
    noise_scale: float = knob(1.0, ge=0)  # σ in ε ← ε − η/2 ∇U + σ√η ω (1 = Langevin proper)
    buffer: bool = False  # persistent ε_z chains (ε_x always fresh)
    buffer_size: int = knob(10000, ge=1)
    buffer_max_prob: float = knob(0.6, ge=0, le=1)  # reuse probability p reached at the end of the ramp
    buffer_ramp_iters: int = knob(5000, ge=0)  # p rises linearly 0 → max over these iterations
    leapfrog_steps: int = knob(1, ge=1)  # hmc: L per transition (1 = MALA)
    target_accept: float = knob(
        0.651, gt=0, lt=1
    )  # hmc: ε·(1 + adapt_rate) above it, ε/(1 + adapt_rate) below (as nt_ebm)
    adapt_rate: float = knob(0.02, gt=0)


@dataclass
class VaePretrainConfig(PretrainConfig):
    kl_warmup: int = knob(
        0, ge=0, note="0 = no warm-up"
    )  # the stage-1 VAE's KL warm-up (`vae`'s kl_warmup): iterations of the 0 → 1 ramp


@dataclass
class VaebmConfig(Config):
    PREFIX = "method"

    name: str = knob("vaebm", choices=("vaebm",), noun="method")
    backbone: str = ""  # runs:/<run_id>/backbone | a path to backbone.pt (or its folder) | "" = pretrain
    vae: VAEConfig = field(default_factory=VAEConfig)  # used only when pretraining
    pretrain: VaePretrainConfig = field(default_factory=VaePretrainConfig)
    energy: EnergyNetConfig = field(default_factory=EnergyNetConfig)
    sampler: VaebmSamplerConfig = field(default_factory=VaebmSamplerConfig)
    spectral_weight: float = knob(0.2, ge=0)  # paper: 0.2
    energy_reg: float = knob(
        0.0, ge=0
    )  # α·mean(E_pos² + E_neg²) (Du & Mordatch 2019; not in paper 003): keeps E bounded
    iw_samples: int = knob(100, ge=1)  # importance samples for log p_vae in log_density (paper's 2D table: 10k)
    # Paper / public code: Adam β = (0.99, 0.999), weight decay 3e-5, IGEBM elementwise clipping at 3 std.
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=4e-5, betas=(0.99, 0.999), weight_decay=3e-5, clip_elementwise_std=3.0)
    )


class NoiseSpace:
    """Packs (ε_z, ε_x) into one flat vector per sample, so the shared samplers see a plain (n, D) tensor."""

    def __init__(self, latent_shape: tuple[int, ...], data_shape: tuple[int, ...]):
        self.latent_shape, self.data_shape = tuple(latent_shape), tuple(data_shape)
        self.latent_dim = math.prod(self.latent_shape)
        self.dim = self.latent_dim + math.prod(self.data_shape)

    def pack(self, eps_z: torch.Tensor, eps_x: torch.Tensor) -> torch.Tensor:
        return torch.cat([eps_z.flatten(1), eps_x.flatten(1)], dim=1)

    def unpack(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = eps.shape[0]
        return (
            eps[:, : self.latent_dim].reshape(n, *self.latent_shape),
            eps[:, self.latent_dim :].reshape(n, *self.data_shape),
        )


@register_method
class Vaebm(Method):
    name = "vaebm"
    config_class = VaebmConfig
    backbone_kind = "vae"
    curve_keys = ("mcmc/accept_rate", "mcmc/step_size")  # hmc only (langevin reports neither)

    def __init__(self, cfg: VaebmConfig, spec: DataSpec, device):
        super().__init__(cfg, spec, device)
        if not cfg.backbone:
            raise ValueError("vaebm needs method.backbone (the engine pretrains one and fills it in when empty)")
        self.vae = load_backbone(cfg.backbone, "vae", spec.shape, self.device)
        energy = build_energy(spec.shape, cfg.energy).to(self.device)
        self.networks["energy"] = energy
        self.optimizers["energy"] = cfg.optim.build(energy.parameters())
        self.spectral = SpectralPenalty(energy)
        self.space = NoiseSpace(self.vae.latent_shape, spec.shape)
        s = cfg.sampler
        self.buffer = (
            ReplayBuffer(self.vae.latent_shape, self.device, capacity=s.buffer_size, reinit_prob=1.0)
            if s.buffer
            else None
        )
        self.iteration = 0
        self.step_size = torch.tensor(s.step_size, device=self.device)  # hmc: the adapted ε, carried across iterations

    @classmethod
    def backbone_method_config(cls, cfg: VaebmConfig) -> VaeConfig:
        """Stage 1's method config when the engine pretrains the backbone."""
        return VaeConfig(
            vae=cfg.vae,
            iw_samples=cfg.iw_samples,
            kl_warmup=cfg.pretrain.kl_warmup,
            optim=OptimConfig(lr=cfg.pretrain.lr),
        )

    @property
    def energy(self) -> torch.nn.Module:
        return self.networks["energy"]

    def noise_energy(self, eps: torch.Tensor) -> torch.Tensor:
        """U(ε) = E(T(ε)) + ½‖ε‖²: the target's energy in noise space."""
        eps_z, eps_x = self.space.unpack(eps)
        x, _ = self.vae.transform(eps_z, eps_x)
        return self.energy(x).float() + 0.5 * eps.pow(2).sum(dim=1)

    def run_chains(self, eps0: torch.Tensor, steps: int, step_size=None, callback=None) -> torch.Tensor:
        """`steps` steps of the configured sampler on U from eps0. hmc starts at `step_size` (default: the ε
        adapted during training) and reports its adapted ε through the callback; langevin uses the fixed η."""
        s = self.cfg.sampler
        if s.kind == "hmc":
            return sample_hmc(
                self.noise_energy,
                eps0,
                steps=steps,
                leapfrog_steps=s.leapfrog_steps,
                step_size=self.step_size if step_size is None else step_size,
                target_accept=s.target_accept,
                adapt_rate=s.adapt_rate,
                callback=callback,
            )
        return sample_langevin(
            self.noise_energy, eps0, steps=steps, step_size=s.step_size, noise_scale=s.noise_scale, callback=callback
        )

    def to_data(self, eps: torch.Tensor) -> torch.Tensor:
        eps_z, eps_x = self.space.unpack(eps)
        with torch.no_grad():
            return self.vae.transform(eps_z, eps_x)[0]

    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.cfg.sampler
        x_pos = batch.to(self.device, non_blocking=True)
        n = x_pos.shape[0]
        if self.iteration == 0 and hasattr(self.energy, "data_init"):
            self._data_init(x_pos)
        self.iteration += 1
        eps_x = torch.randn(n, *self.spec.shape, device=self.device)
        if self.buffer is not None:
            ramp = min(1.0, self.iteration / s.buffer_ramp_iters) if s.buffer_ramp_iters else 1.0
            self.buffer.reinit_prob = 1.0 - s.buffer_max_prob * ramp
            eps_z = self.buffer.init(n)
        else:
            eps_z = torch.randn(n, *self.vae.latent_shape, device=self.device)
        ends = HmcStats() if s.kind == "hmc" else ChainEnds()
        eps = self.run_chains(self.space.pack(eps_z, eps_x), s.steps, callback=ends)
        chain_metrics = {
            "chain/grad_norm_first": mean_grad_norm(ends.first),
            "chain/grad_norm_last": mean_grad_norm(ends.last),
        }
        if s.kind == "hmc":
            self.step_size = ends.step_size
            chain_metrics.update({"mcmc/accept_rate": ends.mean_accept(), "mcmc/step_size": ends.step_size})
        if self.buffer is not None:
            self.buffer.update(self.space.unpack(eps)[0])
        return {**self.energy_step(x_pos, self.to_data(eps)), **chain_metrics}

    def _data_init(self, x_pos: torch.Tensor) -> None:
        """vaebm_resnet: weight norm's data-dependent init on the first batch (paper 003, appendix E), in fp32
        even under autocast (it sets scales from batch statistics); then every data-parallel rank takes rank
        0's values, as the flow's actnorm does. A restored run (iteration > 0) never re-initialises."""
        with torch.autocast(self.device.type, enabled=False):
            self.energy.data_init(x_pos.float())
        self.broadcast_parameters()

    def energy_step(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step on E: contrastive ML with negatives x_neg, plus the regularizers. Separate from the
        chains so an experiment can hand it negatives from elsewhere (experiments/vaebm_exact_negatives.py)."""
        cfg, n = self.cfg, x_pos.shape[0]
        energies = self.energy(torch.cat([x_pos, x_neg])).float()  # fp32 loss under bf16 autocast
        e_pos, e_neg = energies[:n].mean(), energies[n:].mean()
        loss_ml = e_pos - e_neg
        loss, metrics = loss_ml, {}
        if cfg.energy_reg > 0:
            loss_reg = cfg.energy_reg * energies.pow(2).mean()
            loss = loss + loss_reg
            metrics["loss/energy_reg"] = loss_reg.detach()
        if cfg.spectral_weight > 0:
            loss_spectral = cfg.spectral_weight * self.spectral()
            loss = loss + loss_spectral
            metrics["loss/spectral"] = loss_spectral.detach()
        grad_norm = self.optimizer_step(self.optimizers["energy"], loss, cfg.optim)
        loss_ml = loss_ml.detach()
        return {
            "loss": loss.detach(),
            "loss/ml": loss_ml,
            **metrics,
            "energy/pos": e_pos.detach(),
            "energy/neg": e_neg.detach(),
            "energy_gap": loss_ml,
            "grad_norm": grad_norm,
        }

    def sample(self, n: int) -> torch.Tensor:
        """Test-time chains: fresh ε ~ N(0, I), `sample_steps` sampler steps, pushed through T."""
        eps0 = torch.randn(n, self.space.dim, device=self.device)
        return self.to_data(self.run_chains(eps0, self.cfg.sampler.sample_steps))

    def log_density(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"vaebm": log p_vae(x) − E(x), "vae": log p_vae(x)} — the VAE alone, for the comparison the paper
        makes; log p_vae by the importance-weighted bound with `iw_samples` draws."""
        x = x.to(self.device)
        with torch.no_grad():
            log_vae = self.vae.log_likelihood(x, samples=self.cfg.iw_samples)
            return {"vaebm": log_vae - self.energy(x).float(), "vae": log_vae}

    def long_chains(self, chains: int, length: int, init_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """The configured sampler in ε-space from fresh noise (hmc from its initial ε, as nt_ebm's long chains),
        recorded as data-space points x = T(ε) at every step."""
        states: list[torch.Tensor] = []
        self.run_chains(
            init_scale * torch.randn(chains, self.space.dim, device=self.device),
            length,
            step_size=self.cfg.sampler.step_size,
            callback=lambda info: states.append(self.to_data(info["x"])),
        )
        return {f"eps_{self.cfg.sampler.kind}": torch.stack(states, dim=1)}

    def extra_state(self) -> dict:
        return {
            "iteration": self.iteration,
            "step_size": self.step_size.clone(),
            "spectral": self.spectral.state_dict(),
            "buffer": self.buffer.state_dict() if self.buffer is not None else {},
        }

    def load_extra_state(self, state: dict) -> None:
        if not state:
            return
        self.iteration = state.get("iteration", 0)
        if "step_size" in state:
            self.step_size = state["step_size"].to(self.device)
        self.spectral.load_state_dict(state.get("spectral", {}))
        if self.buffer is not None and state.get("buffer"):
            self.buffer.load_state_dict(state["buffer"])
