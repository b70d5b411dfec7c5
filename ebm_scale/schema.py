"""Config constraints declared once, next to each field, and one checker that knows the dotted path.

    @dataclass
    class SamplerConfig(Config):
        kind: str = knob("langevin", choices=SAMPLERS, noun="sampler")
        step_size: float = knob(0.1, gt=0)
        sample_steps: int | None = knob(None, ge=1, note="or null = steps")

        def rules(self):                       # what one field cannot say alone
            yield Rule("beta_max", self.beta_max >= self.beta_min, f"must be >= beta_min ({self.beta_min}), ...")

`Config.validate(prefix)` walks the fields (nested configs included), then `rules()`; the first violation is a
ConfigError naming the full dotted key. The same declarations check a search space at compose time
(`check_search_value`): a sampled value must fit the field's type and bounds before any trial runs.
No third-party imports: methods and nets declare their configs with this too.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ebm_scale.errors import ConfigError


@dataclass(frozen=True)
class Spec:
    """What one field accepts. Bounds apply to numbers (and to each element of a tuple); `choices` is a
    collection or a registry dict, read when checking so that registries filled later count."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: Any = None
    noun: str = "value"
    note: str = ""  # said after the bound, e.g. "0 = off"
    nonempty: bool = False  # tuples / strings

    def allowed(self) -> list | None:
        if self.choices is None:
            return None
        return sorted(self.choices) if isinstance(self.choices, Mapping) else list(self.choices)

    def problem(self, value: Any) -> tuple[str, list | None] | None:
        """Why `value` is not acceptable (message, allowed values), or None."""
        if value is None:
            return None  # only Optional fields hold None: OmegaConf has checked the type
        if self.choices is not None and value not in self.choices:
            return f"unknown {self.noun} {value!r}", self.allowed()
        if self.nonempty and len(value) == 0:
            return "must not be empty", None
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            bound = self._bound_violated(v)
            if bound:
                got = value if isinstance(value, (tuple, list)) else v
                what = "each must be" if isinstance(value, (tuple, list)) else "must be"
                note = f" ({self.note})" if self.note else ""
                return f"{what} {bound}{note}, got {got}", None
        return None

    def _bound_violated(self, v: float) -> str | None:
        lo_ok = (self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
        hi_ok = (self.le is None or v <= self.le) and (self.lt is None or v < self.lt)
        if lo_ok and hi_ok:
            return None
        lo = f"[{self.ge:.4g}" if self.ge is not None else f"({self.gt:.4g}" if self.gt is not None else None
        hi = f"{self.le:.4g}]" if self.le is not None else f"{self.lt:.4g})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f">= {self.ge:.4g}" if self.ge is not None else f"> {self.gt:.4g}"
        return f"<= {self.le:.4g}" if self.le is not None else f"< {self.lt:.4g}"


def knob(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **spec) -> Any:
    """A dataclass field with its constraint (Spec's keywords: gt, ge, lt, le, choices, noun, note, nonempty)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"spec": Spec(**spec)})


@dataclass(frozen=True)
class Rule:
    """A cross-field rule's verdict on one field (named relative to the config that yields it)."""

    field: str
    ok: bool
    message: str
    allowed: Any = None


class Config:
    """Base of every config dataclass: `validate(prefix)` checks the declared constraints, then `rules()`.
    PREFIX is where the section sits in the full config (e.g. "method"), the default for `validate()`."""

    PREFIX: ClassVar[str] = ""

    def rules(self) -> Iterator[Rule | Config]:
        """Rules no single field can state. Yield Rule(...) verdicts, or another Config to validate at this
        prefix (a view of this config, e.g. the MLP part of an energy-network config)."""
        return iter(())

    def validate(self, prefix: str | None = None) -> None:
        validate(self, self.PREFIX if prefix is None else prefix)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def validate(cfg: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first violated constraint of `cfg` (recursively), named by its dotted key."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = _join(prefix, f.name)
        spec = f.metadata.get("spec")
        if spec is not None:
            found = spec.problem(value)
            if found:
                raise ConfigError(key, found[0], found[1])
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate(value, key)
    for rule in cfg.rules() if isinstance(cfg, Config) else ():
        if isinstance(rule, Rule):
            if not rule.ok:
                allowed = rule.allowed
                if isinstance(allowed, Mapping):
                    allowed = sorted(allowed)
                raise ConfigError(_join(prefix, rule.field), rule.message, allowed)
        else:
            validate(rule, prefix)


# --- search spaces against the schema -----------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_at(cfg: Any, dotted: str) -> tuple[Any, dataclasses.Field, Any] | None:
    """(owning config, field, declared type) of a dotted key, or None when it is no config key."""
    node, parts = cfg, dotted.split(".")
    for i, part in enumerate(parts):
        if not (dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}):
            return None
        f = next(f for f in dataclasses.fields(node) if f.name == part)
        if i == len(parts) - 1:
            return node, f, _hints(type(node)).get(part, Any)
        node = getattr(node, part)
    return None


def _scalar_types(declared: Any) -> set[type]:
    """int | None → {int, NoneType}; tuple[...] → {tuple}; Any → {object}."""
    origin = typing.get_origin(declared)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return set().union(*(_scalar_types(a) for a in typing.get_args(declared)))
    if origin is not None:
        return {origin}
    return {declared if isinstance(declared, type) else object}


def coerce(value: Any, declared: Any) -> tuple[bool, Any]:
    """(fits, value as the field would hold it): an int fits a float field, a float never fits an int one,
    and a bool is only a bool."""
    types = _scalar_types(declared)
    if object in types or type(value) in types:
        return True, value
    if value is None:
        return type(None) in types, value
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return True, float(value)
    if tuple in types and isinstance(value, list):
        return True, tuple(value)
    return False, value


def type_name(declared: Any) -> str:
    names = sorted(t.__name__ for t in _scalar_types(declared) if t is not type(None))
    return " or ".join(names) + (" or null" if type(None) in _scalar_types(declared) else "")


def check_search_value(cfg: Any, dotted: str, value: Any, where: str) -> None:
    """A value a search may give `dotted` must be one the config accepts: the field's type, then the whole
    config validated with the value in place (its bounds, and the rules and views that involve it)."""
    found = field_at(cfg, dotted)
    if found is None:
        raise ConfigError(where, "is not a config key (search keys are dotted paths like method.sampler.step_size)")
    _, f, declared = found
    if dataclasses.is_dataclass(getattr(found[0], f.name)):
        raise ConfigError(where, f"{dotted} is a config section, not a value: search one of its keys")
    fits, value = coerce(value, declared)
    if not fits:
        raise ConfigError(where, f"{value!r} does not fit {dotted}, which takes {type_name(declared)}")
    trial = copy.deepcopy(cfg)
    node = trial
    for part in dotted.split(".")[:-1]:
        node = getattr(node, part)
    setattr(node, f.name, value)
    try:
        validate(trial)
    except ConfigError as err:
        raise ConfigError(where, f"{value!r} is outside what the config accepts: {err}", err.allowed) from None


def is_integer_field(cfg: Any, dotted: str) -> bool:
    found = field_at(cfg, dotted)
    return found is not None and _scalar_types(found[2]) - {type(None)} == {int}
