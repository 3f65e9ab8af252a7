"""Single-file edge bundles: one executable that carries a whole bundle.

    regc export MODEL_OR_OUT -t aarch64 -o model.run --single-file
    ./model.run IN_DIR OUT_DIR                     # on the target: nothing else to copy

The file is the launcher ``regc_sfx`` (``runtime/regc_sfx.cc``, linked statically with the target's
g++) followed by every file of the bundle and a 24-byte trailer (layout in ``regc_sfx.cc``). Each run
extracts the bundle into a private temporary folder (``$REGC_TMPDIR``, else ``$TMPDIR``, else
``/tmp``; it must allow executables), runs its ``regc_run``, which checks every file against the
manifest's sha256, and removes the folder. Departure from a fully static executable: TVM's runtime
stays the shared ``lib/`` libraries of the bundle, loaded from the extracted folder, because the
apache-tvm wheels ship no static runtime and its source is not on the package index.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from regc.errors import ConfigError, ModelFormatError
from regc.runtime._bundle_native import build_launcher

__all__ = ["MAGIC", "check_output", "is_single_file", "pack_single_file", "read_manifest"]

MAGIC = b"REGCSFX1"
_TRAILER = struct.Struct("<QII8s")
_ENTRY = struct.Struct("<IQ")  # mode, size (after the u16 name length and the name)
_MANIFEST = "manifest.json"


def pack_single_file(bundle: Path, manifest: dict[str, Any], out: Path, cache: Path | None = None) -> Path:
    """Write ``bundle`` (a verified bundle folder and its ``manifest``) as one executable at ``out``,
    atomically. An existing ``out`` is replaced only when it is itself a single-file bundle."""
    check_output(out)
    launcher = build_launcher(manifest["arch"], cache)
    names = [_MANIFEST, *sorted(manifest["files"])]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(launcher.read_bytes())
            start = f.tell()
            for name in names:
                _write_entry(f, name, bundle / name)
            f.write(_TRAILER.pack(start, len(names), 0, MAGIC))
        tmp.chmod(0o755)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def check_output(out: Path) -> None:
    """Raise ``ConfigError`` when ``out`` exists and is not a single-file bundle (it is never replaced)."""
    if out.exists() and not is_single_file(out):
        raise ConfigError(f"{out} exists and is not a regc single-file bundle; "
                          "choose another -o or remove it")


def is_single_file(path: str | os.PathLike[str]) -> bool:
    path = Path(path)
    if not path.is_file() or path.stat().st_size < _TRAILER.size:
        return False
    with open(path, "rb") as f:
        f.seek(-_TRAILER.size, os.SEEK_END)
        return _TRAILER.unpack(f.read(_TRAILER.size))[3] == MAGIC


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest carried by the single-file bundle ``path`` (raises ``ModelFormatError`` when the
    file is not one or is truncated)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(size - _TRAILER.size)
            start, count, _, magic = _TRAILER.unpack(f.read(_TRAILER.size))
            if magic != MAGIC or count < 1 or start > size:
                raise ValueError("no single-file bundle trailer")
            f.seek(start)
            (name_len,) = struct.unpack("<H", f.read(2))
            name = f.read(name_len).decode()
            _, length = _ENTRY.unpack(f.read(_ENTRY.size))
            if name != _MANIFEST or f.tell() + length > size - _TRAILER.size:
                raise ValueError(f"first entry is {name!r}, not {_MANIFEST}")
            return json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as e:
        raise ModelFormatError(f"{path}: not a readable regc single-file bundle ({e}); re-export it") from e


def _write_entry(f: BinaryIO, name: str, src: Path) -> None:
    data = name.encode()
    mode = 0o755 if os.access(src, os.X_OK) else 0o644
    f.write(struct.pack("<H", len(data)) + data + _ENTRY.pack(mode, src.stat().st_size))
    with open(src, "rb") as g:
        while chunk := g.read(1 << 20):
            f.write(chunk)
