"""Edge bundles: a folder that runs a compiled model on a target machine without Python.

    regc export MODEL_OR_OUT --target aarch64 -o BUNDLE     # build it on this machine
    regc run BUNDLE --inputs in.npz --outputs out.npz       # run it (under qemu when BUNDLE is foreign)

    BUNDLE/
      manifest.json   inputs/outputs/params (name, shape, dtype), target, versions, sha256 of every file
      model.so        kernels + Relax VM bytecode, no weights (TVM, weights detached)
      model.params    weights in TVM's tensor-list format, keyed by name
      regc_run        the C++ runner (runtime/regc_run.cc) built for the target architecture
      lib/            libtvm_runtime.so, libtvm_ffi.so for the target architecture

With ``--single-file`` the bundle is written as one executable instead (``regc.runtime._bundle_sfx``):
``FILE IN_DIR OUT_DIR`` on the target.

On the target, ``BUNDLE/regc_run BUNDLE IN_DIR OUT_DIR`` reads input i from ``IN_DIR/<i>.npy`` and
writes output i to ``OUT_DIR/<i>.npy`` (i = position in the manifest's ``inputs``/``outputs``; .npy is
numpy's format, little-endian, C order). ``regc_run`` checks every listed file against the manifest's
sha256 before loading anything; ``regc run`` does too, and also rejects unlisted files. On x86-64
hosts an aarch64 bundle runs under ``qemu-aarch64-static -L /usr/aarch64-linux-gnu``: its timings
are emulation cost, not device speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from regc.backends.tvm_backend import META_FILE, PARAMS_FILE, SO_FILE, ArtifactMeta, TensorSpec, TvmArtifact
from regc.errors import ConfigError, LoweringError, ModelFormatError
from regc.files import atomic_dir, sha256_file
from regc.plugins import Command
from regc.runtime._bundle_native import ARCHES, native_parts
from regc.runtime._bundle_sfx import check_output, is_single_file, pack_single_file, read_manifest
from regc.runtime.artifact import Runner

__all__ = [
    "BUNDLE_FORMAT",
    "MANIFEST_FILE",
    "RUNNER_FILE",
    "BundleRunner",
    "EXPORT_COMMAND",
    "SingleFileRunner",
    "export_bundle",
    "is_bundle",
    "is_single_file",
    "verify_bundle",
]

BUNDLE_FORMAT = 1
MANIFEST_FILE = "manifest.json"
RUNNER_FILE = "regc_run"
RUNNER_USAGE = "regc_run BUNDLE_DIR IN_DIR OUT_DIR: input i from IN_DIR/<i>.npy, output i to OUT_DIR/<i>.npy"


def export_bundle(
    source: Any, target: str, out: str | os.PathLike[str], *, single_file: bool = False,
    cache: Path | None = None,
) -> Path:
    """Write an edge bundle for ``target`` (``x86_64`` or ``aarch64``) to ``out``, atomically: a folder,
    or with ``single_file`` one executable that carries it (``regc.runtime._bundle_sfx``).

    ``source``: a ``regc.Model`` (lowered here), a ``TvmArtifact`` built for ``target``, a folder it
    was saved to (``regc compile -t TARGET`` writes ``OUT/TARGET/``), or such an ``OUT`` folder.
    Raises ``ConfigError`` for an unknown target or a source built for another one, and
    ``LoweringError`` when the target's g++ is missing or its TVM wheels cannot be fetched.
    """
    if target not in ARCHES:
        raise ConfigError(f"bundle target '{target}' is not supported; choose one of {', '.join(ARCHES)}")
    out = Path(out)
    if single_file:
        check_output(out)  # before lowering: fail fast
        with tempfile.TemporaryDirectory(prefix="regc-bundle-") as tmp:
            folder = export_bundle(source, target, Path(tmp) / "bundle", cache=cache)
            manifest = json.loads((folder / MANIFEST_FILE).read_text())  # just written: no re-hash
            return pack_single_file(folder, manifest, out, cache)
    parts = native_parts(target, cache)  # before lowering: a missing compiler fails fast
    with atomic_dir(out, MANIFEST_FILE, "regc bundle") as stage:
        meta = _place_model(source, target, stage)
        shutil.copy2(parts.runner, stage / RUNNER_FILE)
        (stage / "lib").mkdir()
        for lib in parts.libs:
            shutil.copy2(lib, stage / "lib" / lib.name)
        files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        manifest = {
            "format": "regc-bundle",
            "format_version": BUNDLE_FORMAT,
            "target": target,
            "arch": meta.arch,
            "tvm_target": meta.target,
            "runner": RUNNER_USAGE,
            "inputs": [s.to_json() for s in meta.inputs],
            "outputs": [s.to_json() for s in meta.outputs],
            "params": [s.to_json() for s in meta.params],
            "tuning": meta.tuning,
            "versions": meta.versions,
            "files": {f: sha256_file(stage / f) for f in files},
        }
        (stage / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def is_bundle(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def verify_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed manifest, after checking that every file it lists is there with its sha256 and that
    nothing else is. Raises ``ModelFormatError`` naming the first file that differs."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        files: dict[str, str] = manifest["files"]
        if manifest.get("format_version") != BUNDLE_FORMAT:
            raise ModelFormatError(
                f"{path}: bundle format_version {manifest.get('format_version')!r}, this regc reads "
                f"{BUNDLE_FORMAT}; re-export it with 'regc export'"
            )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFormatError(f"{path / MANIFEST_FILE}: unreadable or malformed ({e}); re-export it") from e
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise ModelFormatError(f"{path}: {name} is missing; copy the whole bundle folder")
        if sha256_file(f) != digest:
            raise ModelFormatError(f"{f}: sha256 differs from {MANIFEST_FILE} (corrupt or tampered)")
    extra = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if p.is_file() and p.name != MANIFEST_FILE and p.relative_to(path).as_posix() not in files)
    if extra:
        raise ModelFormatError(f"{path}: files not listed in {MANIFEST_FILE}: {extra}; re-export the bundle")
    return manifest


class BundleRunner(Runner):
    """Runs a bundle's ``regc_run`` in a subprocess (under qemu when the bundle's arch is foreign).

    ``threads`` sets ``TVM_NUM_THREADS`` for the runner. The bundle is verified here when opened
    (every listed file's sha256, no unlisted file); each run, ``regc_run`` checks the listed files
    itself before loading them, so the runner does not hash them a second time per call.
    """

    def __init__(self, path: Path, threads: int = 1):
        self.path = path
        self.manifest = self._manifest()
        self.threads = threads
        self.input_specs = [TensorSpec.from_json(s) for s in self.manifest["inputs"]]
        self.output_names = [s["name"] for s in self.manifest["outputs"]]
        self.prefix = _emulator(self.manifest["arch"])

    def _manifest(self) -> dict[str, Any]:
        return verify_bundle(self.path)

    def _command(self, in_dir: Path, out_dir: Path) -> tuple[list[str], dict[str, str]]:
        """The command line that runs the model on ``in_dir`` into ``out_dir``, and its extra environment."""
        return [*self.prefix, str(self.path / RUNNER_FILE), str(self.path), str(in_dir), str(out_dir)], {}

    def _run(self, arrays: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        with tempfile.TemporaryDirectory(prefix="regc-run-") as tmp:
            in_dir, out_dir = Path(tmp, "in"), Path(tmp, "out")
            in_dir.mkdir()
            out_dir.mkdir()
            for i, a in enumerate(arrays):
                np.save(in_dir / f"{i}.npy", np.ascontiguousarray(a))
            cmd, extra_env = self._command(in_dir, out_dir)
            env = {**os.environ, **extra_env, "TVM_NUM_THREADS": str(self.threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                detail = proc.stderr.strip() or f"exit status {proc.returncode}"
                raise ModelFormatError(f"{self.path}: {Path(cmd[len(self.prefix)]).name} failed: {detail}")
            return tuple(np.load(out_dir / f"{i}.npy") for i in range(len(self.output_names)))


class SingleFileRunner(BundleRunner):
    """Runs a single-file bundle; under qemu when its arch is foreign, the runner it extracts too
    (``REGC_EXEC_PREFIX``). Its ``regc_run`` verifies the extracted files against the manifest."""

    def _manifest(self) -> dict[str, Any]:
        return read_manifest(self.path)

    def _command(self, in_dir: Path, out_dir: Path) -> tuple[list[str], dict[str, str]]:
        return ([*self.prefix, str(self.path.resolve()), str(in_dir), str(out_dir)],
                {"REGC_EXEC_PREFIX": " ".join(self.prefix)})


# ---- the `regc export` command -----------------------------------------------------------------
def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="MODEL (.onnx or MODULE:FUNCTION, lowered here), or a 'regc compile -t "
                                  "TARGET' output folder (OUT or OUT/TARGET)")
    p.add_argument("-t", "--target", required=True, choices=sorted(ARCHES), help="the target's CPU")
    p.add_argument("-o", "--output", required=True, help="bundle folder, or file with --single-file "
                                                         "(written atomically)")
    p.add_argument("--single-file", action="store_true",
                   help="write one executable that carries the bundle (extracts itself to $TMPDIR per run)")


def _export_cmd(args: argparse.Namespace) -> int:
    source: Any = Path(args.source)
    if not source.is_dir():
        from regc.cli import load_model_spec

        source = load_model_spec(args.source)
    out = export_bundle(source, args.target, args.output, single_file=args.single_file)
    if args.single_file:
        print(f"{out}: {args.target} single-file bundle, {out.stat().st_size / 1e6:.1f} MB; "
              f"run on the target: {out} IN_DIR OUT_DIR")
        return 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    size = sum((out / f).stat().st_size for f in manifest["files"])
    print(f"{out}: {args.target} bundle, {len(manifest['files'])} files, {size / 1e6:.1f} MB; "
          f"run on the target: {out}/{RUNNER_FILE} {out} IN_DIR OUT_DIR")
    return 0


EXPORT_COMMAND = Command("export", "build an edge bundle (model.so, weights, C++ runner, TVM runtime libs)",
                         _configure, _export_cmd)


# ---- helpers -----------------------------------------------------------------------------------
def _place_model(source: Any, target: str, stage: Path) -> ArtifactMeta:
    """Put ``model.so`` and ``model.params`` for ``target`` into ``stage``; return their metadata."""
    import regc

    if isinstance(source, regc.Model):
        source = regc.lower(source, target)
    if isinstance(source, TvmArtifact):
        _check_preset(source.meta, target, "the artifact")
        source.save(stage)
        meta = ArtifactMeta.read(stage)
        (stage / META_FILE).unlink()
        return meta
    folder = Path(source)
    if not (folder / META_FILE).is_file() and (folder / target / META_FILE).is_file():
        folder = folder / target
    if not (folder / META_FILE).is_file():
        raise ConfigError(
            f"{source}: not a compiled TVM folder (no {META_FILE}, nor {target}/{META_FILE}); pass a model, "
            f"or run 'regc compile ... -t {target}' first"
        )
    meta = ArtifactMeta.read(folder)
    _check_preset(meta, target, str(folder))
    for name in (SO_FILE, PARAMS_FILE):
        if not (folder / name).is_file():
            raise ModelFormatError(f"{folder}: {name} is missing; re-run 'regc compile -t {target}'")
        shutil.copy2(folder / name, stage / name)
    if sha256_file(stage / SO_FILE) != meta.so_sha256:
        raise ModelFormatError(f"{folder / SO_FILE}: sha256 differs from {META_FILE} (corrupt or replaced)")
    return meta


def _check_preset(meta: ArtifactMeta, target: str, what: str) -> None:
    if meta.preset != target:
        raise ConfigError(f"{what} was compiled for '{meta.preset}', not '{target}'; use -t {target}")


def _emulator(arch: str) -> list[str]:
    """The command prefix that runs ``arch`` executables here: none, or qemu with the target sysroot."""
    if arch == platform.machine():
        return []
    a = ARCHES.get(arch)
    if a is None or a.qemu is None:
        raise LoweringError(f"this {platform.machine()} machine cannot run an {arch} bundle; run it there")
    exe, package = a.qemu
    if shutil.which(exe) is None:
        raise LoweringError(f"running an {arch} bundle on {platform.machine()} needs {exe}: "
                            f"apt-get install {package}")
    if a.sysroot is None or not Path(a.sysroot).is_dir():
        raise LoweringError(f"running an {arch} bundle needs its C++ runtime in {a.sysroot}: "
                            f"apt-get install {a.cxx_package}")
    return [exe, "-L", a.sysroot]

