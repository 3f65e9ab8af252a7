"""Typed errors. Every user-facing failure is a ``RegcError`` subclass whose message names what is
wrong and what to do; the CLI prints it on one line and exits non-zero."""

from __future__ import annotations

__all__ = [
    "RegcError",
    "ConfigError",
    "PipelineError",
    "ModelFormatError",
    "UnsafePathError",
    "UnsupportedOpError",
    "UnsupportedDtypeError",
    "CaptureError",
    "VerifyError",
    "LoweringError",
    "InputMismatchError",
]


class RegcError(Exception):
    """Base of all regc errors. ``exit_code`` is what the CLI returns."""

    exit_code = 2


class ConfigError(RegcError, ValueError):
    """A pass option, CLI flag or recipe field has a bad value."""


class PipelineError(RegcError):
    """Pipeline text does not parse, names an unknown pass, or orders passes illegally."""


class ModelFormatError(RegcError):
    """A model file is missing, not ONNX, truncated, or otherwise unreadable."""


class UnsafePathError(ModelFormatError):
    """A model file points outside its folder (external data path traversal) or is not trusted."""


class UnsupportedOpError(RegcError):
    """The importer or a backend has no rule for an op. ``op`` names it."""

    def __init__(self, message: str, op: str | None = None):
        super().__init__(message)
        self.op = op


class UnsupportedDtypeError(RegcError):
    """A tensor has a dtype torch (or the backend) cannot hold, e.g. float8 or uint32 arithmetic."""


class CaptureError(RegcError):
    """torch.export could not capture a module."""


class VerifyError(RegcError):
    """The IR verifier found a malformed graph (a pass bug, not a user error)."""

    exit_code = 3


class LoweringError(RegcError):
    """A backend could not compile or export the model."""


class InputMismatchError(RegcError, ValueError):
    """Run-time inputs do not match the model's declared names, shapes or dtypes."""
