"""Helpers shared by the bench scripts (run as ``python bench/X.py``, which puts ``bench/`` on sys.path).

Latency belongs to ``regc.runtime.bench`` (``bench``/``compare``); this holds only the plumbing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import regc


def capture(z) -> regc.Model:
    """Capture a ``regc.zoo`` model with its input/output names and dynamic shapes."""
    return regc.capture(z.module, z.example_inputs, z.dynamic_shapes, input_names=z.input_names,
                        output_names=z.output_names)


def write_json(path: str | os.PathLike[str], result: dict, indent: int = 1) -> Path:
    """Write ``result`` as JSON to ``path``, creating its folder; return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=indent))
    return out
