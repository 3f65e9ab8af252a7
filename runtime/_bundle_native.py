"""The native pieces of an edge bundle for one CPU architecture: TVM's runtime libraries and the
``regc_run`` executable built against them.

For the host architecture the libraries come from the installed ``apache-tvm``/``apache-tvm-ffi``
packages; for another one from the same versions' wheels for that platform, fetched once with
``pip download --no-deps --only-binary=:all: --platform PLATFORM`` into ``~/.cache/regc/wheels-ARCH``
(``$XDG_CACHE_HOME`` is honoured) and unpacked next to them. ``regc_run`` is compiled with the
architecture's g++ against the ``tvm/ffi`` headers only (the wheel's ``tvm/runtime`` headers include
one it does not ship) and linked to ``libtvm_runtime.so`` (it registers the ``.so`` module loader and
the Relax VM), with ``$ORIGIN/lib`` as its library path. The single-file launcher (``regc_sfx.cc``)
is linked statically and needs no TVM. Built executables are cached by a hash of the source, the
compiler, the flags and the libraries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from regc.errors import LoweringError
from regc.files import sha256_file

__all__ = ["ARCHES", "Arch", "NativeParts", "build_launcher", "cache_dir", "fetch_wheels", "native_parts"]

RUNNER_SOURCE = Path(__file__).with_name("regc_run.cc")
LAUNCHER_SOURCE = Path(__file__).with_name("regc_sfx.cc")
LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
_DISTS = ("apache-tvm", "apache-tvm-ffi")


@dataclasses.dataclass(frozen=True)
class Arch:
    """A CPU architecture a bundle can target.

    Attributes:
        name: ``platform.machine()`` on that architecture.
        cxx: the g++ that builds ``regc_run`` for it on this (x86-64 or same-arch) host.
        cxx_package: the Debian package that provides ``cxx`` (and the target's libstdc++).
        wheel_platform: the pip ``--platform`` tag of its TVM wheels.
        qemu: the user-mode emulator that runs its executables on other hosts, and its package.
        sysroot: the target's libc/libstdc++ for ``qemu -L``.
    """

    name: str
    cxx: str
    cxx_package: str
    wheel_platform: str
    qemu: tuple[str, str] | None = None
    sysroot: str | None = None


ARCHES = {
    a.name: a
    for a in [
        Arch("x86_64", "g++", "g++", "manylinux_2_28_x86_64"),
        Arch("aarch64", "aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu", "manylinux_2_28_aarch64",
             qemu=("qemu-aarch64-static", "qemu-user-static"), sysroot="/usr/aarch64-linux-gnu"),
    ]
}


@dataclasses.dataclass(frozen=True)
class NativeParts:
    """``runner``: a built ``regc_run``; ``libs``: the runtime libraries it loads from ``lib/``."""

    runner: Path
    libs: tuple[Path, ...]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "regc"


def native_parts(arch: str, cache: Path | None = None) -> NativeParts:
    """The runtime libraries and a built ``regc_run`` for ``arch`` (built or fetched when missing).

    Raises ``LoweringError`` naming the apt package when the compiler is missing, or what to do when
    the wheels cannot be downloaded.
    """
    a = ARCHES[arch]
    cache = cache or cache_dir()
    cxx = _compiler(a, "regc_run")
    include, libs = _installed_tree() if arch == platform.machine() else _wheel_tree(a, cache)
    return NativeParts(_build_runner(a, cxx, include, libs, cache), libs)


def fetch_wheels(a: Arch, cache: Path) -> list[Path]:
    """The ``apache-tvm`` and ``apache-tvm-ffi`` wheels for ``a``, at the installed versions, in
    ``cache/wheels-ARCH`` (downloaded from the package index when missing)."""
    folder = cache / f"wheels-{a.name}"
    wanted = {d: importlib.metadata.version(d) for d in _DISTS}
    found = {d: _find_wheel(folder, d, v) for d, v in wanted.items()}
    missing = [f"{d}=={v}" for d, v in wanted.items() if found[d] is None]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform",
               a.wheel_platform, "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
               "-d", str(folder), *missing]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise LoweringError(
                f"could not download the {a.name} TVM runtime wheels {', '.join(missing)} ({last}); "
                f"connect to PyPI, or put the wheels in {folder}"
            )
        found = {d: _find_wheel(folder, d, v) for d, v in wanted.items()}
        if any(w is None for w in found.values()):
            raise LoweringError(f"pip download put no {a.wheel_platform} wheel for {missing} in {folder}")
    return [w for w in found.values() if w is not None]


# ---- helpers -----------------------------------------------------------------------------------
def _find_wheel(folder: Path, dist: str, version: str) -> Path | None:
    stem = f"{dist.replace('-', '_')}-{version}-"
    hits = sorted(folder.glob(f"{stem}*.whl")) if folder.is_dir() else []
    return hits[0] if hits else None


def _installed_tree() -> tuple[Path, tuple[Path, ...]]:
    import tvm
    import tvm_ffi

    ffi_dir, tvm_dir = Path(tvm_ffi.__file__).parent, Path(tvm.__file__).parent
    return ffi_dir / "include", (tvm_dir / "lib" / LIBS[0], ffi_dir / "lib" / LIBS[1])


def _wheel_tree(a: Arch, cache: Path) -> tuple[Path, tuple[Path, ...]]:
    """Unpack the headers and runtime libraries of ``a``'s wheels (once) and return their paths."""
    wheels = fetch_wheels(a, cache)
    root = cache / f"wheels-{a.name}" / ("unpacked-" + _digest(*(w.name for w in wheels))[:16])
    if not (root / "done").exists():
        staging = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                for name in z.namelist():
                    if name.startswith("tvm_ffi/include/") or name.endswith(tuple("lib/" + n for n in LIBS)):
                        z.extract(name, staging)
        (staging / "done").touch()
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    libs = (root / "tvm" / "lib" / LIBS[0], root / "tvm_ffi" / "lib" / LIBS[1])
    for lib in libs:
        if not lib.is_file():
            raise LoweringError(f"{lib}: not in the {a.name} TVM wheels; delete {root.parent} and retry")
    return root / "tvm_ffi" / "include", libs


def _build_runner(a: Arch, cxx: str, include: Path, libs: tuple[Path, ...], cache: Path) -> Path:
    """Compile ``regc_run.cc`` for ``a`` against the TVM headers and libraries (cached)."""
    link_dirs = sorted({str(p.parent) for p in libs})
    flags = ["-I", str(include), *(f"-L{d}" for d in link_dirs), "-Wl,--no-as-needed", "-ltvm_runtime",
             "-ltvm_ffi", "-Wl,-rpath,$ORIGIN/lib"]
    return _compile(a, cxx, RUNNER_SOURCE, flags, [sha256_file(p) for p in libs], cache)


def build_launcher(arch: str, cache: Path | None = None) -> Path:
    """The single-file bundle launcher (``regc_sfx.cc``) for ``arch``, linked statically (cached)."""
    a = ARCHES[arch]
    return _compile(a, _compiler(a, "the launcher"), LAUNCHER_SOURCE, ["-static", "-s"], [],
                    cache or cache_dir())


def _compiler(a: Arch, what: str) -> str:
    """The path of ``a``'s g++, or a ``LoweringError`` naming its apt package."""
    cxx = shutil.which(a.cxx)
    if cxx is None:
        raise LoweringError(f"building {what} for {a.name} needs {a.cxx}: apt-get install {a.cxx_package}")
    return cxx


def _compile(a: Arch, cxx: str, source: Path, flags: list[str], key_parts: list[str], cache: Path) -> Path:
    """Compile ``source`` for ``a`` with ``cxx`` and ``flags`` into ``cache/runners``, keyed by the source,
    the compiler, the flags and ``key_parts`` (hashes of what it links); reuse a previous build."""
    if not source.is_file():
        raise LoweringError(f"{source} is missing (package data of regc.runtime); reinstall regc")
    key = _digest(source.read_bytes().hex(), cxx, *flags, *key_parts)[:16]
    out = cache / "runners" / f"{source.stem}-{a.name}-{key}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd = [cxx, "-std=c++17", "-O2", str(source), "-o", str(tmp), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        detail = proc.stderr.strip()
        raise LoweringError(f"compiling {source.name} for {a.name} with {a.cxx} failed:\n{detail}")
    tmp.rename(out)
    return out


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
