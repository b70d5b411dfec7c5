"""Normalizing flow with an exact log-determinant: the frozen backbone g_α of NT-EBM (paper 002).

Glow (Kingma & Dhariwal, 2018). Every step is actnorm → invertible linear mixing (a 1×1 convolution on
images) → coupling, written as in Glow in the normalizing direction x → z; the generative map g_α: z → x runs
the steps backwards. On images (arch conv) the flow is Glow's multi-scale architecture with `levels` levels:
each level squeezes (C, H, W) → (4C, H/2, W/2), runs `depth` steps, and — except the last — factors half of
its channels out as latent, so the next level works on the other half at half the resolution. Paper 002
(appendix A.3/A.4) uses n_levels = 3, depth 8–16, width 128–512, additive coupling, and disables Glow's
learned prior: every factored-out part is N(0, I) here too. The factored-out parts and the last level's
output are put back together by the inverse of the same squeeze/split permutation, so z always has the data's
shape and the base density is N(0, I) on all of it. `levels: 1` is a single scale (squeeze, steps, unsqueeze),
the only option for flat vectors (arch mlp, the 2D toys).

Every layer has `encode(h) -> (h, log|det ∂out/∂in|)` (x → z) and `decode(h)` (z → x), both per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ebm_scale.errors import require
from ebm_scale.schema import Config, Rule, knob

ARCHS = ("mlp", "conv")
COUPLINGS = ("affine", "additive")
# Affine couplings scale by exp(c·tanh(raw/c)): slope 1 at 0 (so it behaves like plain exp(raw) near the
# identity init) but every coupling scales by at most e^±c. Unbounded exp(raw) is what makes RealNVP/Glow
# training blow up: one coupling can learn a huge scale, the samples of g explode and the loss goes NaN.
# Glow's sigmoid(raw + 2) bounds too, but starts at 0.88 rather than 1, so a zero-initialised coupling
# would not be the identity.
LOG_SCALE_BOUND = 2.0


@dataclass
class FlowConfig(Config):
    # mlp (flat vectors, e.g. 2D toy data) | conv (images (C, H, W), H and W divisible by 2^levels)
    arch: str = knob("mlp", choices=ARCHS, noun="arch")
    # flow steps (per level); each = actnorm → invertible linear / 1×1-conv mixing → coupling
    depth: int = knob(8, ge=1)
    hidden: int = knob(128, ge=1)  # width of the coupling MLPs / channels of the coupling conv nets
    coupling_layers: int = knob(2, ge=1)  # hidden layers in each coupling net
    coupling: str = knob("affine", choices=COUPLINGS, noun="coupling")  # affine | additive (paper 002's Glow: additive)
    # conv: Glow's scales (paper 002: 3), half the channels factored out after each but the last; mlp: 1
    levels: int = knob(1, ge=1)

    def rules(self):
        yield Rule("levels", self.arch == "conv" or self.levels == 1, f"arch mlp has one level, got {self.levels}")

    def check_shape(self, shape: tuple[int, ...], prefix: str) -> None:
        """The data-dependent rules (the data's shape is known only next to the config, not inside it)."""
        if self.arch == "mlp":
            require(math.prod(shape) >= 2, f"{prefix}.arch", f"mlp needs at least 2 dimensions, got shape {shape}")
            return
        factor = 2**self.levels
        ok = len(shape) == 3 and shape[0] >= 1 and shape[1] % factor == 0 and shape[2] % factor == 0
        require(
            ok,
            f"{prefix}.levels",
            f"conv with {self.levels} level(s) squeezes H and W {self.levels} times, so it needs images (C, H, W) "
            f"with both divisible by {factor}; got shape {tuple(shape)}",
        )


def _per_channel(p: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(c,) → broadcastable against (n, c) vectors or (n, c, H, W) images."""
    return p.view(1, -1, *([1] * (h.dim() - 2)))


def _positions(h: torch.Tensor) -> int:
    """Pixels per channel: a per-channel map on images repeats its log|det| at each of them."""
    return h.shape[2:].numel()


class ActNorm(nn.Module):
    """encode: y = (x − loc) · exp(−log_scale), per channel (images) or per dimension (vectors).

    Data-dependent init (Glow): the first batch encoded in training mode sets loc and log_scale so that
    this layer's output has mean 0 and std 1 per channel, which keeps the deep stack's activations well
    scaled from the first step. `initialized` is a buffer so that a restored model does not initialise
    again. The generative direction never initialises: it sees latents, not data.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        # A host-side copy of `initialized` (kept in step by _initialize and _load_from_state_dict): reading
        # the buffer itself would sync the GPU on every call.
        self._ready = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        self.loc.copy_(x.mean(dims))
        self.log_scale.copy_(torch.log(x.std(dims, correction=0) + 1e-6))  # Glow's epsilon
        self.initialized.fill_(True)
        self._ready = True

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not self._ready:
            self._initialize(x)
        y = (x - _per_channel(self.loc, x)) * _per_channel(torch.exp(-self.log_scale), x)
        return y, (-self.log_scale.sum() * _positions(x)).expand(x.shape[0])

    def decode(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = y * _per_channel(torch.exp(self.log_scale), y) + _per_channel(self.loc, y)
        return x, (self.log_scale.sum() * _positions(y)).expand(y.shape[0])


class InvertibleMixing(nn.Module):
    """encode: y = W x with W = P · L · (U + diag(sign · exp(log_abs_s))), Glow's LU parameterisation.

    One module for vectors (a linear map) and images (the same matrix as a 1×1 convolution). The LU form
    makes log|det W| = Σ log_abs_s, O(c) instead of an O(c³) determinant, and W⁻¹ two triangular solves;
    W stays invertible whatever the optimiser does. P and the diagonal's signs are fixed buffers.
    Initialised from a random orthogonal matrix (Glow's choice): |det| = 1 and well conditioned.
    """

    def __init__(self, channels: int):
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        perm, lower, upper = torch.linalg.lu(w)
        s = upper.diagonal()
        dtype = torch.get_default_dtype()
        self.register_buffer("perm", perm.to(dtype))
        self.register_buffer("sign_s", s.sign().to(dtype))
        self.lower = nn.Parameter(lower.tril(-1).to(dtype))
        self.upper = nn.Parameter(upper.triu(1).to(dtype))
        self.log_abs_s = nn.Parameter(s.abs().log().to(dtype))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # tril/triu rather than stored masks: entries outside the triangles get zero gradient, never matter.
        eye = torch.eye(len(self.log_abs_s), dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower.tril(-1) + eye
        upper = self.upper.triu(1) + torch.diag(self.sign_s * torch.exp(self.log_abs_s))
        return lower, upper

    @staticmethod
    def _mix(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h @ w.T if h.dim() == 2 else F.conv2d(h, w[:, :, None, None])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lower, upper = self._factors()
        logdet = self.log_abs_s.sum() * _positions(x)
        return self._mix(self.perm @ lower @ upper, x), logdet.expand(x.shape[0])

    def decode(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lower, upper = self._factors()
        eye = torch.eye(len(lower), dtype=lower.dtype, device=lower.device)
        # W⁻¹ = U⁻¹ L⁻¹ Pᵀ straight from the factors: two triangular solves, no general inverse of W.
        lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        upper_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        logdet = -self.log_abs_s.sum() * _positions(y)
        return self._mix(upper_inv @ lower_inv @ self.perm.T, y), logdet.expand(y.shape[0])


def _coupling_net(c_in: int, c_out: int, cfg: FlowConfig) -> nn.Sequential:
    """MLP, or Glow's conv net (3×3 → 1×1 … → 3×3). SiLU, not Glow's ReLU: g_α stays smooth, so the
    latent-space HMC potential −f(g(z)) + ½|z|² has a continuous gradient, which leapfrog assumes."""
    if cfg.arch == "conv":
        first, middle = nn.Conv2d(c_in, cfg.hidden, 3, padding=1), lambda: nn.Conv2d(cfg.hidden, cfg.hidden, 1)
        last = nn.Conv2d(cfg.hidden, c_out, 3, padding=1)
    else:
        first, middle = nn.Linear(c_in, cfg.hidden), lambda: nn.Linear(cfg.hidden, cfg.hidden)
        last = nn.Linear(cfg.hidden, c_out)
    layers = [first, nn.SiLU()]
    for _ in range(cfg.coupling_layers - 1):
        layers += [middle(), nn.SiLU()]
    # Zero last layer: shift 0 and log-scale 0, so every coupling starts as the identity (Glow, RealNVP)
    # and the untrained flow is actnorm and rotations only.
    nn.init.zeros_(last.weight), nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class Coupling(nn.Module):
    """encode: (a, b) → (a, b · exp(log_scale(a)) + shift(a)); additive: log_scale ≡ 0 (log|det| = 0).

    The conditioning half is always the first one: the learned mixing before each coupling decides what
    that half contains, so no fixed alternation is needed (Glow).
    """

    def __init__(self, channels: int, cfg: FlowConfig):
        super().__init__()
        self.split = channels // 2
        self.affine = cfg.coupling == "affine"
        c_b = channels - self.split
        self.net = _coupling_net(self.split, 2 * c_b if self.affine else c_b, cfg)

    def _shift_log_scale(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.net(a)
        if not self.affine:
            return out, None
        shift, raw = out.chunk(2, dim=1)
        return shift, LOG_SCALE_BOUND * torch.tanh(raw / LOG_SCALE_BOUND)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x[:, : self.split], x[:, self.split :]
        shift, log_scale = self._shift_log_scale(a)
        if log_scale is None:
            return torch.cat([a, b + shift], 1), x.new_zeros(x.shape[0])
        return torch.cat([a, b * torch.exp(log_scale) + shift], 1), log_scale.flatten(1).sum(1)

    def decode(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = y[:, : self.split], y[:, self.split :]
        shift, log_scale = self._shift_log_scale(a)
        if log_scale is None:
            return torch.cat([a, b - shift], 1), y.new_zeros(y.shape[0])
        return torch.cat([a, (b - shift) * torch.exp(-log_scale)], 1), -log_scale.flatten(1).sum(1)


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) → (n, 4C, H/2, W/2): each 2×2 patch becomes 4 channels (a permutation, log|det| = 0)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c // 4, 2 * h, 2 * w)


class Flow(nn.Module):
    """x = g_α(z), z ~ N(0, I) of the data's shape; exact log q_α(x) by change of variables.

    `forward(z)` / `forward_with_logdet(z)`: latent → data (log|det ∂x/∂z|); `inverse(x)`: data → latent
    (log|det ∂z/∂x|); all per sample, differentiable w.r.t. their input in float32 and float64. Under bf16
    autocast the steps run in bf16 and the results come back in the input's dtype.
    """

    def __init__(self, shape: tuple[int, ...], cfg: FlowConfig | None = None):
        super().__init__()
        cfg = cfg or FlowConfig()  # validated at compose time; the shape checks below need the data
        self.shape, self.cfg = tuple(shape), cfg
        cfg.check_shape(self.shape, "method.flow")
        if cfg.arch == "conv":
            # level i: the squeeze quadruples the channels, the split before it halved them: 4C · 2^i
            widths = [4 * self.shape[0] * 2**i for i in range(cfg.levels)]
        else:
            widths = [math.prod(self.shape)]
        layers: list[nn.Module] = []
        for channels in widths:
            for _ in range(cfg.depth):
                layers += [ActNorm(channels), InvertibleMixing(channels), Coupling(channels, cfg)]
        # One flat list in the normalizing (x → z) order, `depth` steps (3 layers each) per level: a one-level
        # flow keeps the state_dict keys it always had.
        self.layers = nn.ModuleList(layers)
        per_level = 3 * cfg.depth  # plain lists of the same modules: no ModuleList slice built per call
        self._levels = [layers[i * per_level : (i + 1) * per_level] for i in range(len(widths))]

    def _run(self, x: torch.Tensor, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """encode (x → z) or decode (z → x) through every level; z and x both have the data's shape."""
        logdet = x.new_zeros(x.shape[0])
        if self.cfg.arch != "conv":
            h = x.flatten(1)
            layers = self.layers if direction == "encode" else reversed(self.layers)
            for layer in layers:
                h, step = getattr(layer, direction)(h)
                logdet = logdet + step
            return h.view(-1, *self.shape).to(x.dtype), logdet
        levels = self.cfg.levels
        if direction == "encode":
            h, parts = x, []
            for i in range(levels):
                h = squeeze(h)
                for layer in self._levels[i]:
                    h, step = layer.encode(h)
                    logdet = logdet + step
                if i < levels - 1:  # factor half the channels out as latent (Glow's split)
                    h, out = h.chunk(2, dim=1)
                    parts.append(out)
            return _assemble(h, parts).to(x.dtype), logdet
        h, parts = _disassemble(x, levels)
        for i in reversed(range(levels)):
            if i < levels - 1:
                h = torch.cat([h, parts[i].to(h.dtype)], dim=1)
            for layer in reversed(self._levels[i]):
                h, step = layer.decode(h)
                logdet = logdet + step
            h = unsqueeze(h)
        return h.to(x.dtype), logdet

    def forward_with_logdet(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(z, "decode")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward_with_logdet(z)[0]

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(x, "encode")

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, logdet = self.inverse(x)
        return -0.5 * (z.flatten(1).square().sum(1) + z[0].numel() * math.log(2 * math.pi)) + logdet

    def sample(self, n: int) -> torch.Tensor:
        p = next(self.parameters())
        return self(torch.randn(n, *self.shape, device=p.device, dtype=p.dtype))


def _assemble(last: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """The last level's output and the factored-out parts → one tensor of the data's shape: undo the squeezes
    and splits in reverse (a permutation, log|det| = 0; the inverse of _disassemble)."""
    h = last
    for part in reversed(parts):  # the level that factored `part` out: its output was [kept, part]
        h = torch.cat([unsqueeze(h), part.to(h.dtype)], dim=1)
    return unsqueeze(h)


def _disassemble(z: torch.Tensor, levels: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """z of the data's shape → (the last level's input, the factored-out parts in level order), each already
    squeezed to its level's resolution."""
    h, parts = z, []
    for i in range(levels):
        h = squeeze(h)
        if i < levels - 1:
            h, out = h.chunk(2, dim=1)
            parts.append(out)
    return h, parts
