"""Output folders written all-or-nothing, and content hashes.

``atomic_dir(out, marker, what)`` stages the folder beside ``out`` (same file system), yields it, and
only when the block succeeds swaps it into place (an existing ``out`` is replaced only if it holds
``marker``, i.e. it is an earlier output of the same kind); on any error the stage is removed, so a
failed command never leaves partial output.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from regc.errors import ConfigError

__all__ = ["atomic_dir", "sha256_file"]


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike[str], marker: str, what: str) -> Iterator[Path]:
    out = Path(out)
    if out.exists() and not (out / marker).is_file():
        raise ConfigError(f"{out} exists and is not a {what}; choose another -o or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        stage.chmod(0o755)  # mkdtemp makes it private; outputs are meant to be shared
        yield stage
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            stage.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
