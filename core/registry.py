"""The pass contract and registry.

A pass is a frozen config dataclass plus a function, registered under one stable name:

    @register_pass("fold_bn", FoldBnConfig, phase=Phase.CANONICALIZE, exact=True)
    def fold_bn(model: Model, config: FoldBnConfig, ctx: PassContext) -> PassResult: ...

The function may rewrite ``model`` in place and returns ``PassResult(model, modified, stats)``;
``stats`` feeds ``report.json``. ``exact`` passes must preserve outputs to fp32 tolerance (the
contract test checks it). Configs validate in ``__post_init__`` and raise ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from typing import Any, Callable

from regc.errors import ConfigError, PipelineError
from regc.ir import Model

__all__ = [
    "Phase",
    "PassResult",
    "PassContext",
    "PassInfo",
    "register_pass",
    "get_pass",
    "all_passes",
    "check_range",
    "check_choice",
]


class Phase(enum.IntEnum):
    """Legal order of pass families in a pipeline (non-decreasing)."""

    CANONICALIZE = 0
    REPARAM = 1
    REGULARIZE = 2
    PRUNE = 3
    LOWRANK = 4
    SPARSIFY = 5
    QUANT = 6
    LOWER = 7


@dataclasses.dataclass
class PassResult:
    model: Model
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassContext:
    """What a pass may use besides the model: calibration/training data, a training spec, a
    progress reporter and a seed. ``data`` is a ``regc.data.Dataset`` or None."""

    data: Any = None
    train: Any = None
    seed: int = 0
    progress: Any = None
    log: Callable[[str], None] = lambda msg: None

    def require_data(self, pass_name: str) -> Any:
        if self.data is None:
            raise ConfigError(
                f"pass '{pass_name}' needs calibration data: pass --data DATA.npz on the CLI "
                "(keys = model input names, optional 'labels') or data=... in Python"
            )
        return self.data


@dataclasses.dataclass(frozen=True)
class PassInfo:
    name: str
    config: type
    fn: Callable[[Model, Any, PassContext], PassResult]
    phase: Phase
    exact: bool
    aliases: tuple[str, ...] = ()
    needs_data: bool = False

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()

    def options(self) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, help) for each config field, help taken from the docstring."""
        hints = typing.get_type_hints(self.config)
        helps = _field_helps(self.config.__doc__ or "")
        return [
            (f.name, _type_name(hints[f.name]), f.default, helps.get(f.name, ""))
            for f in dataclasses.fields(self.config)
        ]

    def make_config(self, options: dict[str, Any]) -> Any:
        """Build the config from CLI-text or Python values, coercing strings by field type."""
        hints = typing.get_type_hints(self.config)
        names = [f.name for f in dataclasses.fields(self.config)]
        kwargs = {}
        for key, value in options.items():
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"{self.name}: unknown option '{key}'{hint} Options: {', '.join(names) or '(none)'}"
                )
            kwargs[key] = _coerce(self.name, key, value, hints[key])
        return self.config(**kwargs)


_REGISTRY: dict[str, PassInfo] = {}
_ALIASES: dict[str, str] = {}


def register_pass(
    name: str,
    config: type,
    *,
    phase: Phase,
    exact: bool,
    aliases: tuple[str, ...] = (),
    needs_data: bool = False,
) -> Callable[[Callable], Callable]:
    """Register ``fn(model, config, ctx) -> PassResult`` under ``name`` (and CLI ``aliases``)."""
    if not dataclasses.is_dataclass(config) or not config.__dataclass_params__.frozen:
        raise TypeError(f"pass '{name}': config {config.__name__} must be a frozen dataclass")
    for f in dataclasses.fields(config):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"pass '{name}': config field '{f.name}' needs a default")

    def deco(fn: Callable) -> Callable:
        for n in (name, *aliases):
            if n in _REGISTRY or n in _ALIASES:
                raise ValueError(f"pass name '{n}' is registered twice")
        _REGISTRY[name] = PassInfo(name, config, fn, phase, exact, tuple(aliases), needs_data)
        for a in aliases:
            _ALIASES[a] = name
        return fn

    return deco


def all_passes() -> dict[str, PassInfo]:
    from regc.plugins import load_plugins

    load_plugins()
    return dict(_REGISTRY)


def get_pass(name: str) -> PassInfo:
    passes = all_passes()
    name = _ALIASES.get(name, name)
    if name not in passes:
        known = sorted([*passes, *_ALIASES])
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise PipelineError(
            f"unknown pass '{name}'.{hint} Known passes: {', '.join(known)} (see 'regc passes')"
        )
    return passes[name]


def check_range(pass_name: str, field: str, value: float, lo: float, hi: float, *, lo_open=False,
                hi_open=False) -> None:
    """Raise ConfigError unless lo <= value <= hi (with open ends where asked)."""
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ConfigError(f"{pass_name}.{field} must be in {lb}{lo}, {hi}{rb}, got {value!r}")


def check_choice(pass_name: str, field: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{pass_name}.{field} must be one of {choices}, got {value!r}")


def _coerce(pass_name: str, key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        non_none = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        if len(non_none) == 1:
            return _coerce(pass_name, key, value, non_none[0])
        return value
    if origin is typing.Literal:
        v = value
        if isinstance(value, str) and all(isinstance(a, (int, float)) for a in args):
            v = _coerce(pass_name, key, value, type(args[0]))
        check_choice(pass_name, key, v, args)
        return v
    if origin in (tuple, list) or tp in (tuple, list):
        items = value.split(":") if isinstance(value, str) else list(value)
        item_tp = args[0] if args else str
        return tuple(_coerce(pass_name, key, i, item_tp) for i in items)
    if not isinstance(value, str):
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if tp in (int, float, bool, str) and not isinstance(value, tp):
            raise ConfigError(f"{pass_name}.{key} must be {tp.__name__}, got {value!r}")
        return value
    try:
        if tp is bool:
            low = value.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if tp in (int, float):
            return tp(value)
    except ValueError:
        raise ConfigError(f"{pass_name}.{key} must be {tp.__name__}, got {value!r}") from None
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _field_helps(doc: str) -> dict[str, str]:
    """Parse 'Attributes:' lines 'name: help' from a Google-style docstring."""
    helps: dict[str, str] = {}
    in_attrs = False
    current = None
    for line in doc.splitlines():
        s = line.strip()
        if s.startswith("Attributes:"):
            in_attrs = True
            continue
        if not in_attrs or not s:
            continue
        head, sep, rest = s.partition(":")
        if sep and head.isidentifier():
            current = head
            helps[current] = rest.strip()
        elif current:
            helps[current] += " " + s
    return helps
