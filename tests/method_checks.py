"""Checks every method must pass, shared by the per-method test files."""

import copy

import torch


def assert_continues_exactly(build, batches: list[torch.Tensor], split: int = 2):
    """Train on batches[:split], snapshot (weights, optimizer, extra_state, RNG), train on the rest; a fresh
    method restored from the snapshot must reproduce the rest bit for bit. Returns both methods."""
    torch.manual_seed(1)
    original = build()
    for batch in batches[:split]:
        original.train_step(batch)
    # Deep copies: state_dict() holds references to live tensors, which the next steps would overwrite.
    state, extra, rng = (
        copy.deepcopy(original.state_dict()),
        copy.deepcopy(original.extra_state()),
        torch.get_rng_state(),
    )
    expected = [original.train_step(batch) for batch in batches[split:]]
    restored = build()
    restored.load_state_dict(state)
    restored.load_extra_state(extra)
    torch.set_rng_state(rng)
    got = [restored.train_step(batch) for batch in batches[split:]]
    for a, b in zip(expected, got):
        assert all(torch.equal(a[k], b[k]) for k in a), "a restored method drifted from the original"
    for name, net in original.networks.items():
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), restored.networks[name].parameters())), name
    return original, restored


def params(net: torch.nn.Module) -> list[torch.Tensor]:
    """Detached copies of a network's parameters, to compare after a step."""
    return [p.detach().clone() for p in net.parameters()]


def with_overrides(cfg, overrides: dict):
    """cfg with top-level fields replaced (a test's small config plus the knob under test)."""
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg
