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
    "register_capture",
    "capture_fn",
    "register_exporter",
    "register_target",
    "register_artifact_runner",
    "loader_for",
    "exporter_for",
    "target",
    "targets",
    "artifact_runner_for",
    "Target",
]

_LOADERS: dict[str, Callable[..., Any]] = {}
_EXPORTERS: dict[str, Callable[..., Any]] = {}
_TARGETS: dict[str, "Target"] = {}
_RUNNERS: list[tuple[Callable[[Path], bool], Callable[[Path], Any]]] = []
_CAPTURE: list[Callable[..., Any]] = []
_loaded = False


@dataclasses.dataclass(frozen=True)
class Target:
    """A named compile preset: ``lower(model, **options) -> artifact`` with ``artifact.save(dir)``."""

    name: str
    description: str
    lower: Callable[..., Any]


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in importlib.metadata.entry_points(group="regc.plugins"):
        importlib.import_module(ep.value)


def register_loader(suffix: str, fn: Callable[..., Any]) -> None:
    _LOADERS[suffix.lower()] = fn


def register_capture(fn: Callable[..., Any]) -> None:
    _CAPTURE[:] = [fn]


def capture_fn() -> Callable[..., Any]:
    load_plugins()
    return _CAPTURE[0]


def register_exporter(suffix: str, fn: Callable[..., Any]) -> None:
    _EXPORTERS[suffix.lower()] = fn


def register_target(t: Target) -> None:
    if t.name in _TARGETS:
        raise ValueError(f"target '{t.name}' is registered twice")
    _TARGETS[t.name] = t


def register_artifact_runner(matches: Callable[[Path], bool], open_fn: Callable[[Path], Any]) -> None:
    _RUNNERS.append((matches, open_fn))


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


def artifact_runner_for(path: Path) -> Callable[[Path], Any]:
    load_plugins()
    for matches, open_fn in _RUNNERS:
        if matches(path):
            return open_fn
    raise ModelFormatError(
        f"{path}: not a runnable artifact (expected an .onnx file or a compiled target folder "
        "with meta.json written by 'regc compile -t TARGET')"
    )
