"""Gaussian VAE: the frozen backbone p_θ(x, z) = N(z; 0, I) · N(x; μ_x(z), diag σ_x(z)²) of VAEBM (paper 003).

VAEBM needs three things from it: the ELBO to train it (stage 1), the reparameterisation
T(ε_z, ε_x) = (μ_x(z) + σ_x(z)·ε_x, z = ε_z) to run Langevin in noise space (stage 2), and an IWAE bound on
log p(x) to report the VAE's own test likelihood next to VAEBM's (section 5.4: IWAE with 10k samples).
Paper 003's 2D setup is the default: encoder and decoder MLPs with 4 hidden layers of 256, latent 20.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ebm_scale.errors import require
from ebm_scale.nets.mlp import ACTIVATIONS
from ebm_scale.schema import Config, knob

ARCHS = ("mlp", "conv", "linear")

# Every log σ (encoder and decoder) is clamped to this range, σ ∈ [1.2e-4, 20]. Unclamped, one bad Adam step
# that sends a raw output to ±50 makes exp() overflow and the ELBO inf/NaN, and the 1/σ² in the Gaussian
# log-density turns tiny σ into huge gradients. The range is wide for data scaled to O(1) (2D toys span ±4.5,
# images [-1, 1]), so a sane fit never sits on a bound (where the hard clamp's gradient is zero).
LOG_SIGMA_MIN, LOG_SIGMA_MAX = -9.0, 3.0
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class VAEConfig(Config):
    # mlp (flat vectors) | conv (images (C, H, W), H = W a power of 2 >= 8) | linear (PPCA-like)
    arch: str = knob("mlp", choices=ARCHS, noun="VAE architecture")
    latent_dim: int = knob(20, ge=1)
    # MLP width / conv channels of the first stage (doubled at every down-sampling; 32–64 for conv)
    hidden: int = knob(256, ge=1)
    # hidden layers of each MLP (encoder and decoder); conv: down/up-sampling stages; linear: unused
    layers: int = knob(4, ge=1)
    activation: str = knob("swish", choices=ACTIVATIONS, noun="activation")
    learn_sigma_x: bool = True  # decoder outputs log σ_x(z) per dimension; False: σ_x fixed to `sigma_x`
    # learn_sigma_x=False: the decoder's std, fixed. learn_sigma_x=True: a smooth floor, σ_x(z) = sigma_x + exp(raw).
    # Why a floor: a Gaussian decoder's likelihood is unbounded (μ_x(z) lands on a training point, σ_x → 0 sends
    # the density to infinity; Mattei & Frellsen 2018), and VAEBM's Langevin moves x by σ_x·Δε_x, so a collapsed
    # σ_x freezes x given z. As a floor it should sit below the data's own noise scale: 25gaussians' modes have
    # std 0.08, so the default 0.1 is too high there (use ~0.02).
    sigma_x: float = knob(
        0.1,
        ge=math.exp(LOG_SIGMA_MIN),
        lt=math.exp(LOG_SIGMA_MAX),
        note=f"exp of the log σ clamp [{LOG_SIGMA_MIN:g}, {LOG_SIGMA_MAX:g}]",
    )

    def check_shape(self, shape: tuple[int, ...], prefix: str) -> None:
        """The data-dependent rules (the data's shape is known only next to the config, not inside it)."""
        if self.arch != "conv":
            return
        ok = len(shape) == 3 and shape[1] == shape[2] and shape[1] >= 8 and shape[1] & (shape[1] - 1) == 0
        require(ok, f"{prefix}.arch", f"conv needs images (C, H, W) with H = W a power of 2 >= 8, got {tuple(shape)}")
        most = shape[1].bit_length() - 1
        require(
            self.layers <= most,
            f"{prefix}.layers",
            f"{self.layers} stride-2 stages do not fit a {shape[1]}x{shape[2]} image (at most {most})",
        )


class _Affine(nn.Module):
    """Linear mean and an input-independent log σ per output: with both encoder and decoder like this the
    VAE is factor analysis (PPCA), whose marginal p(x) = N(b, WWᵀ + diag σ_x²) is known in closed form."""

    def __init__(self, d_in: int, d_out: int, with_log_sigma: bool):
        super().__init__()
        self.mean = nn.Linear(d_in, d_out)
        self.log_sigma = nn.Parameter(torch.zeros(d_out)) if with_log_sigma else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mean = self.mean(h)
        return mean if self.log_sigma is None else torch.cat([mean, self.log_sigma.expand_as(mean)], dim=1)


def _mlp(d_in: int, d_out: int, cfg: VAEConfig) -> nn.Sequential:
    widths = [d_in] + [cfg.hidden] * cfg.layers
    blocks: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        blocks += [nn.Linear(width_in, width_out), ACTIVATIONS[cfg.activation]()]
    return nn.Sequential(*blocks, nn.Linear(widths[-1], d_out))


def _conv_encoder(shape: tuple[int, ...], d_out: int, cfg: VAEConfig) -> nn.Sequential:
    """DCGAN-style: 3x3 stem, `layers` stride-2 4x4 convs (channels doubling), flatten, linear."""
    channels = [cfg.hidden * 2**i for i in range(cfg.layers + 1)]
    blocks: list[nn.Module] = [nn.Conv2d(shape[0], channels[0], 3, padding=1)]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        blocks += [ACTIVATIONS[cfg.activation](), nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)]
    side = shape[1] >> cfg.layers
    return nn.Sequential(*blocks, ACTIVATIONS[cfg.activation](), nn.Flatten(), nn.Linear(channels[-1] * side**2, d_out))


def _conv_decoder(latent_dim: int, shape: tuple[int, ...], c_out: int, cfg: VAEConfig) -> nn.Sequential:
    """The encoder mirrored: linear, reshape, `layers` stride-2 4x4 transposed convs (channels halving), 3x3 head."""
    channels = [cfg.hidden * 2**i for i in range(cfg.layers, -1, -1)]
    side = shape[1] >> cfg.layers
    blocks: list[nn.Module] = [nn.Linear(latent_dim, channels[0] * side**2), nn.Unflatten(1, (channels[0], side, side))]
    for c_in, c_next in zip(channels[:-1], channels[1:]):
        blocks += [ACTIVATIONS[cfg.activation](), nn.ConvTranspose2d(c_in, c_next, 4, stride=2, padding=1)]
    return nn.Sequential(*blocks, ACTIVATIONS[cfg.activation](), nn.Conv2d(channels[-1], c_out, 3, padding=1))


def _log_normal(x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """log N(x; μ, diag σ²) for x (n, *shape), summed over `shape`. μ and log σ may carry extra leading
    (sample) dimensions, e.g. (k, n, *shape) in the IWAE bound: x broadcasts instead of being copied k times."""
    elementwise = -0.5 * ((x - mu) * torch.exp(-log_sigma)) ** 2 - log_sigma - 0.5 * _LOG_2PI
    return elementwise.flatten(elementwise.dim() - (x.dim() - 1)).sum(-1)


class VAE(nn.Module):
    """q_φ(z|x) = N(μ_z(x), diag σ_z(x)²), p(z) = N(0, I), p_θ(x|z) = N(μ_x(z), diag σ_x(z)²).

    x is (n, *shape) (shape (2,) for 2D toys, (C, H, W) for conv); z is (n, latent_dim). All densities are in
    nats per example, summed over dimensions.
    """

    def __init__(self, shape: tuple[int, ...], cfg: VAEConfig | None = None):
        super().__init__()
        cfg = cfg or VAEConfig()
        cfg.check_shape(tuple(shape), "vae")  # the config itself was validated at compose time
        self.shape, self.cfg = tuple(shape), cfg
        self.latent_shape = (cfg.latent_dim,)
        dim, latent = math.prod(self.shape), cfg.latent_dim
        x_heads = 2 if cfg.learn_sigma_x else 1  # μ_x, and log σ_x(z) when learned
        if cfg.arch == "mlp":
            self.encoder, self.decoder = _mlp(dim, 2 * latent, cfg), _mlp(latent, x_heads * dim, cfg)
        elif cfg.arch == "conv":
            self.encoder = _conv_encoder(self.shape, 2 * latent, cfg)
            self.decoder = _conv_decoder(latent, self.shape, x_heads * self.shape[0], cfg)
        else:
            self.encoder, self.decoder = _Affine(dim, latent, True), _Affine(latent, dim, cfg.learn_sigma_x)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_φ(z|x) → (μ_z, log σ_z), each (n, latent_dim)."""
        # In x's dtype: under bf16 autocast the nets run in bf16, the ELBO's terms are summed in fp32.
        out = self.encoder(x if self.cfg.arch == "conv" else x.flatten(1)).to(x.dtype)
        mu, log_sigma = out.chunk(2, dim=1)
        return mu, log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p_θ(x|z) → (μ_x, log σ_x), each (n, *shape) (the fixed log σ_x is an expanded view: no memory)."""
        out = self.decoder(z).to(z.dtype)  # z's dtype (fp32) under bf16 autocast, as in encode
        n = z.shape[0]
        if not self.cfg.learn_sigma_x:
            mu = out.reshape(n, *self.shape)
            return mu, mu.new_tensor(math.log(self.cfg.sigma_x)).expand_as(mu)
        mu, raw = (h.reshape(n, *self.shape) for h in out.chunk(2, dim=1))  # conv: channel halves; flat: vector halves
        # log(σ_floor + exp(raw)): a floor that keeps its gradient (≈ raw when σ_x ≫ floor), then the upper clamp.
        log_sigma = torch.logaddexp(raw, raw.new_tensor(math.log(self.cfg.sigma_x)))
        return mu, log_sigma.clamp(max=LOG_SIGMA_MAX)

    def transform(self, eps_z: torch.Tensor, eps_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAEBM's T(ε) → (x, z): z = ε_z (the prior is N(0, I), so paper 003's T_z = μ_z + σ_z·ε_z is the
        identity), x = μ_x(z) + σ_x(z)·ε_x. With ε ~ N(0, I) this is ancestral sampling; it is differentiable in
        both ε's, because VAEBM's Langevin chains run there."""
        mu, log_sigma = self.decode(eps_z)
        return mu + torch.exp(log_sigma) * eps_x, eps_z

    def noise(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε_z, ε_x) ~ N(0, I) on the VAE's device and dtype: the starting point of VAEBM's chains."""
        p = next(self.parameters())
        return (
            torch.randn(n, *self.latent_shape, device=p.device, dtype=p.dtype),
            torch.randn(n, *self.shape, device=p.device, dtype=p.dtype),
        )

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Ancestral samples x ~ p_θ(x) (with decoder noise), (n, *shape)."""
        return self.transform(*self.noise(n))[0]

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """E_q[log p(x|z)] − KL(q(z|x) ‖ N(0, I)), one reparameterised z, the KL in closed form: (n,) nats."""
        reconstruction, kl = self.elbo_terms(x)
        return reconstruction - kl

    def elbo_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ELBO's two terms, (n,) each: the one-sample reconstruction log p(x|z), z ~ q(z|x), and the KL."""
        mu_z, log_sigma_z = self.encode(x)
        z = mu_z + torch.exp(log_sigma_z) * torch.randn_like(mu_z)
        reconstruction = _log_normal(x, *self.decode(z))
        kl = 0.5 * (mu_z**2 + torch.exp(2 * log_sigma_z) - 1 - 2 * log_sigma_z).sum(1)
        return reconstruction, kl

    def log_likelihood(self, x: torch.Tensor, samples: int = 1000, chunk: int | None = None) -> torch.Tensor:
        """IWAE bound (Burda et al. 2016) log (1/K) Σ_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x), K = `samples`: (n,) nats.

        A lower bound on log p(x) in expectation that tightens with K. The K samples are drawn `chunk` at a
        time and combined by one logsumexp over the per-chunk ones. Memory goes as chunk · n decoder rows, so
        the default keeps that at 2^16 rows whatever n is (64 MB per 256-wide float32 activation).
        Differentiable; wrap it in torch.no_grad() for evaluation.
        """
        n = x.shape[0]
        chunk = chunk or max(1, 2**16 // max(n, 1))
        if samples < 1 or chunk < 1:
            raise ValueError(f"samples and chunk must be >= 1, got {samples} and {chunk}")
        mu_z, log_sigma_z = self.encode(x)
        partial = []
        for start in range(0, samples, chunk):
            k = min(chunk, samples - start)
            eps = torch.randn(k, *mu_z.shape, device=mu_z.device, dtype=mu_z.dtype)
            z = mu_z + torch.exp(log_sigma_z) * eps  # (k, n, latent)
            mu_x, log_sigma_x = self.decode(z.reshape(k * n, -1))
            log_px_z = _log_normal(x, mu_x.reshape(k, *x.shape), log_sigma_x.reshape(k, *x.shape))
            log_pz = (-0.5 * z**2 - 0.5 * _LOG_2PI).sum(-1)
            log_qz = (-0.5 * eps**2 - log_sigma_z - 0.5 * _LOG_2PI).sum(-1)
            partial.append(torch.logsumexp(log_px_z + log_pz - log_qz, dim=0))
        return torch.logsumexp(torch.stack(partial), dim=0) - math.log(samples)
