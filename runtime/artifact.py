"""Open compiled artifacts behind one interface: named numpy arrays in, named numpy arrays out.

    runner = open_artifact("out/model.onnx")      # onnxruntime, CPU, 1 thread
    runner = open_artifact("out/x86_64")          # a TVM folder written by TvmArtifact.save
    runner = open_artifact("bundle")              # an edge bundle written by 'regc export'
    outputs = runner.run({"x": x})                # {"logits": ...}

Both runners check inputs the same way before running (names, dtype, rank, static dims) and raise
``InputMismatchError``; a missing or corrupt artifact raises ``ModelFormatError``.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path

import numpy as np

from regc.backends.tvm_backend import META_FILE, PARAMS_FILE, SO_FILE, TensorSpec, TvmArtifact
from regc.errors import ConfigError, InputMismatchError, ModelFormatError

__all__ = [
    "OnnxRunner",
    "Runner",
    "TvmRunner",
    "open_artifact",
    "run_npz",
]

_ORT_DTYPES = {"float": "float32", "double": "float64"}  # other 'tensor(T)' names are numpy's


class Runner(abc.ABC):
    """Runs one artifact. Subclasses set ``input_specs``/``output_names`` and implement ``_run``."""

    input_specs: list[TensorSpec]
    output_names: list[str]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.input_specs]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``inputs`` against the declared specs, run, and return outputs by name."""
        missing = [n for n in self.input_names if n not in inputs]
        extra = sorted(set(inputs) - set(self.input_names))
        if missing or extra:
            raise InputMismatchError(
                f"inputs do not match the model's {self.input_names}: missing {missing}, unexpected {extra}"
            )
        arrays = [np.asarray(inputs[s.name]) for s in self.input_specs]
        for spec, a in zip(self.input_specs, arrays, strict=True):
            spec.check_input(a)
        return dict(zip(self.output_names, self._run(arrays), strict=True))

    @abc.abstractmethod
    def _run(self, arrays: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        """Run checked arrays in input order; return outputs in output order."""


class OnnxRunner(Runner):
    """An ``.onnx`` file in an onnxruntime CPU session."""

    def __init__(self, path: Path, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception
            raise ModelFormatError(f"{path}: onnxruntime cannot load it ({e})") from e
        self.input_specs = [
            TensorSpec(i.name, tuple(_ort_dim(d) for d in i.shape), _ort_dtype(i.type))
            for i in self.session.get_inputs()
        ]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, arrays: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(self.output_names, dict(zip(self.input_names, arrays, strict=True))))


class TvmRunner(Runner):
    """A TVM artifact folder run by the Relax VM on this machine's CPU."""

    def __init__(self, path: Path, threads: int = 1):
        import tvm

        self.artifact = TvmArtifact.load(path)
        # TVM's thread pool is process-wide: the last runner opened sets it.
        tvm.get_global_func("runtime.config_threadpool")(1, threads)
        self.input_specs = self.artifact.meta.inputs
        self.output_names = [s.name for s in self.artifact.meta.outputs]

    def _run(self, arrays: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        return self.artifact.run(*arrays)


def open_artifact(path: str | os.PathLike[str], *, threads: int = 1) -> Runner:
    """Open an ``.onnx`` file, a TVM folder (``regc compile -t TARGET``) or an edge bundle
    (``regc export``, a folder or a single file); ``threads``: CPU threads."""
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file or folder")
    from regc.runtime.bundle import BundleRunner, SingleFileRunner, is_bundle, is_single_file  # imports us

    if is_bundle(path):  # before the TVM check: a bundle also holds model.so and model.params
        return BundleRunner(path, threads)
    if is_single_file(path):
        return SingleFileRunner(path, threads)
    if path.is_file() and path.suffix.lower() == ".onnx":
        return OnnxRunner(path, threads)
    if path.is_dir() and any((path / f).exists() for f in (META_FILE, SO_FILE, PARAMS_FILE)):
        return TvmRunner(path, threads)
    raise ModelFormatError(
        f"{path}: not a runnable artifact (expected an .onnx file, a folder with {META_FILE}, {SO_FILE} "
        f"and {PARAMS_FILE} written by 'regc compile -t TARGET', or a bundle written by 'regc export')"
    )


def run_npz(
    artifact_path: str | os.PathLike[str],
    inputs_npz: str | os.PathLike[str],
    outputs_npz: str | os.PathLike[str],
    *,
    threads: int = 1,
) -> dict[str, np.ndarray]:
    """``regc run``: read inputs from an ``.npz`` keyed by input name, write outputs keyed by output name."""
    runner = open_artifact(artifact_path, threads=threads)
    outputs = runner.run(_read_npz(inputs_npz))
    np.savez(outputs_npz, **outputs)
    return outputs


def _read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, TypeError) as e:  # missing, not an archive (.npy: TypeError), object arrays
        raise ConfigError(f"--inputs {path}: cannot read it as an .npz of arrays ({e})") from e


def _ort_dim(d: int | str | None) -> int | str:
    return d if isinstance(d, int) else str(d or "?")  # onnxruntime gives None for unnamed dynamic dims


def _ort_dtype(type_name: str) -> str:
    name = type_name.removeprefix("tensor(").removesuffix(")")
    return _ORT_DTYPES.get(name, name)
