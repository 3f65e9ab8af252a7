"""Plug-in registries that keep ``regc`` core free of imports of its plug-in folders.

``frontend``, ``backends`` and ``runtime`` register loaders, exporters, targets and artifact
runners here when imported; ``load_plugins()`` imports them through the ``regc.plugins`` entry
points declared in ``pyproject.toml`` (so a third-party package can add its own).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
from pathlib import Path
from typing import Any, Callable

from regc.errors import ConfigError, ModelFormatError

__all__ = [
    "load_plugins",
    "register_loader",

    "register_exporter",
    "register_target",
    "provide",
    "require",
    "loader_for",
    "exporter_for",
    "target",
    "targets",
    "Target",
    "register_onnx_translation",
    "onnx_translations",
    "register_command",
    "commands",
    "Command",
]

_LOADERS: dict[str, Callable[..., Any]] = {}
_EXPORTERS: dict[str, Callable[..., Any]] = {}
_TARGETS: dict[str, "Target"] = {}
_SERVICES: dict[str, Any] = {}
_ONNX_TRANSLATIONS: dict[Any, Callable[..., Any]] = {}
_ONNX_FUNCTIONS: dict[tuple[str, str], Any] = {}
_COMMANDS: dict[str, "Command"] = {}
_loaded = False


@dataclasses.dataclass(frozen=True)
class Target:
    """A named compile preset: ``lower(model, **options) -> artifact`` with ``artifact.save(dir)``."""

    name: str
    description: str
    lower: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Command:
    """A ``regc`` subcommand contributed by a plug-in: ``configure(parser)`` adds its arguments,
    ``run(args) -> exit code`` does the work (raise a ``RegcError`` for bad input)."""

    name: str
    help: str
    configure: Callable[[Any], None]
    run: Callable[[Any], int]


def register_command(cmd: Command) -> None:
    if cmd.name in _COMMANDS:
        raise ValueError(f"regc command {cmd.name!r} is registered twice")
    _COMMANDS[cmd.name] = cmd


def commands() -> dict[str, Command]:
    load_plugins()
    return dict(_COMMANDS)


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in importlib.metadata.entry_points(group="regc.plugins"):
        importlib.import_module(ep.value)


def register_loader(suffix: str, fn: Callable[..., Any]) -> None:
    _LOADERS[suffix.lower()] = fn


def provide(name: str, obj: Any) -> None:
    """Offer a named service to core (e.g. "capture", "open_artifact", "bench")."""
    _SERVICES[name] = obj


def require(name: str) -> Any:
    load_plugins()
    if name not in _SERVICES:
        raise RuntimeError(f"regc is installed without the plug-in that provides '{name}'; reinstall regc")
    return _SERVICES[name]


def register_onnx_translation(op: Any, fn: Callable[..., Any], functions: tuple[Any, ...] = ()) -> None:
    """Teach the ONNX exporter a custom torch op: ``fn`` is its onnxscript translation, ``functions``
    the ``onnx.FunctionProto`` bodies of the custom-domain ONNX ops it emits (attached when used)."""
    _ONNX_TRANSLATIONS[op] = fn
    for f in functions:
        _ONNX_FUNCTIONS[(f.domain, f.name)] = f


def onnx_translations() -> tuple[dict[Any, Callable[..., Any]], dict[tuple[str, str], Any]]:
    """(custom translation table, function bodies by (domain, name)) registered so far."""
    return dict(_ONNX_TRANSLATIONS), dict(_ONNX_FUNCTIONS)


def register_exporter(suffix: str, fn: Callable[..., Any]) -> None:
    _EXPORTERS[suffix.lower()] = fn


def register_target(t: Target) -> None:
    if t.name in _TARGETS:
        raise ValueError(f"target '{t.name}' is registered twice")
    _TARGETS[t.name] = t


def loader_for(path: str) -> Callable[..., Any]:
    load_plugins()
    suffix = Path(path).suffix.lower()
    if suffix not in _LOADERS:
        raise ModelFormatError(
            f"{path}: no loader for '{suffix or '(no suffix)'}' files; regc loads {sorted(_LOADERS)} "
            "(or capture a torch module with regc.capture / MODULE:FUNCTION on the CLI)"
        )
    return _LOADERS[suffix]


def exporter_for(path: str) -> Callable[..., Any]:
    load_plugins()
    suffix = Path(path).suffix.lower()
    if suffix not in _EXPORTERS:
        raise ConfigError(f"{path}: cannot save '{suffix}' files; regc writes {sorted(_EXPORTERS)}")
    return _EXPORTERS[suffix]


def targets() -> dict[str, Target]:
    load_plugins()
    return dict(_TARGETS)


def target(name: str) -> Target:
    load_plugins()
    if name not in _TARGETS:
        close = difflib.get_close_matches(name, list(_TARGETS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown target '{name}'{hint} Known targets: {', '.join(sorted(_TARGETS))}")
    return _TARGETS[name]
