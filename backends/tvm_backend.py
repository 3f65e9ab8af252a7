"""Lower a ``regc.Model`` with TVM Relax and save it as a folder that ``regc.runtime`` opens.

    torch.export (training IR) -> run_decompositions (quantize/dequantize ops become integer
    arithmetic) -> TVM's torch frontend, every weight a function input -> detach_params ->
    relax.build for a named preset (optionally with a MetaSchedule database) -> TvmArtifact.save(folder)

The folder holds ``model.so`` (kernels + Relax VM bytecode, no weights), ``model.params`` (weights in
TVM's tensor-list format, keyed by parameter name) and ``meta.json`` (inputs, outputs, parameter
order, target, versions, sha256 of ``model.so``, tuned or untuned). Buffers and tensor constants
(BatchNorm statistics, packed weights a pass stored as buffers) are lifted to parameters first, so
no weight is baked into the code and one ``.so`` serves many weight sets.

Compressed weights stay compressed: ``model.params`` holds the codes and the graph decodes them.
A weight that ``quant`` stored as int8 codes ``q`` with per-channel scales ``s`` (and zero points
``z``) is read as ``w = (q - z) * s``; regc's own decoding ops (``regc::*`` custom ops: 4-bit codes
packed two per byte, ``w = s_g (u - 8)``; RF8 codes, ``w = (-1)^s M[r] 2^(e + bias)``) are decomposed
from their torch bodies (bit shifts rewritten as integer arithmetic, the RF8 mantissa computed, not
looked up), so every decode reaches Relax as elementwise ops on an integer parameter. Then:

- ``fuse_kernels`` merges each decoding kernel into the kernel that consumes ``w`` (matmul, conv,
  gather): no kernel of its own writes ``w``;
- on CPU, builds schedule that merged kernel (``_schedule_weight_decode``) so the matmul/conv decodes
  one output channel's slice ``w[n, :]`` at a time right before using it, and a gather decodes just the
  rows it reads: the float weight exists only as a K-element temporary (tuned kernels keep the
  tuner's schedule, GPU kernels get dlight's defaults).

``model.params`` then holds 1 byte per weight for int8 and RF8 and half a byte for 4-bit codes, plus
scales, and no float copy of ``w``.

Builds are untuned unless a database from ``regc tune`` is given (ARCHITECTURE.md section 5); the
``cuda`` preset schedules every kernel with dlight's default GPU rules and compiles with nvcc.
``tvm`` is imported inside functions: importing it takes seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.metadata
import json
import operator
import platform
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from regc.errors import ConfigError, InputMismatchError, LoweringError, ModelFormatError
from regc.files import sha256_file
from regc.ir import Model
from regc.plugins import Target

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "PARAMS_FILE",
    "PRESETS",
    "SO_FILE",
    "TARGETS",
    "TRANSFORM_PARAMS",
    "ArtifactMeta",
    "Preset",
    "RelaxProgram",
    "TensorSpec",
    "TvmArtifact",
    "get_preset",
    "import_relax",
    "kernel_tasks",
    "lower_tvm",
    "tvm_versions",
]

FORMAT_VERSION = 1
SO_FILE = "model.so"
# The VM function that turns model.params into main's weight arguments (see fuse_kernels).
TRANSFORM_PARAMS = "main_transform_params"
PARAMS_FILE = "model.params"
META_FILE = "meta.json"


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named TVM target.

    Attributes:
        name: the name users pass (``regc compile -t NAME``).
        description: one line for ``regc targets``.
        target: the TVM 0.27 target dict.
        arch: the host machine (``platform.machine()``) the ``.so`` loads on.
        cross_compiler: the g++ that links the ``.so`` when it is not the host's.
        cross_package: the Debian package that provides ``cross_compiler``.
        device: the TVM device kind the kernels run on (``cpu`` or ``cuda``).
        cpu_flags: instruction set extensions (``/proc/cpuinfo`` flags) the code uses: a CPU without
            them cannot run it.
    """

    name: str
    description: str
    target: dict[str, Any]
    arch: str
    cross_compiler: str | None = None
    cross_package: str | None = None
    device: str = "cpu"
    cpu_flags: tuple[str, ...] = ()

    def tvm_target(self, gpu_arch: str | None = None) -> Any:
        """The ``tvm.target.Target``; ``gpu_arch`` (``sm_80``, ...) replaces a GPU preset's default."""
        import tvm

        if gpu_arch is not None:
            if self.device != "cuda":
                raise ConfigError(
                    f"option arch={gpu_arch} applies to the 'cuda' target only, not '{self.name}'")
            if not re.fullmatch(r"sm_\d{2,3}[a-z]?", gpu_arch):
                raise ConfigError(
                    f"cuda arch '{gpu_arch}' is not a CUDA compute capability like sm_80 or sm_90a")
        return tvm.target.Target(self.target_dict(gpu_arch))

    def missing_cpu_flags(self) -> list[str]:
        """The ``cpu_flags`` this machine's CPU lacks: its code cannot run here unless this is empty."""
        return [f for f in self.cpu_flags if f not in host_cpu_flags()]

    def target_dict(self, gpu_arch: str | None = None) -> dict[str, Any]:
        return {**self.target, "arch": gpu_arch} if gpu_arch else dict(self.target)


# Generic x86-64 (no -mcpu): runs on any x86-64 CPU, with 4-wide SSE2 vectors and no FMA. Untuned code is
# no faster with AVX2, but tuned kernels are: a MetaSchedule-tuned 3x3 conv (64 channels, 32x32) ran
# 6.7 ms generic and 2.9 ms for x86-64-v3 after the same 64 trials (measured), hence x86_64_v3.
_X86_HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("x86_64", "TVM, x86-64 Linux CPU (generic x86-64, untuned)", _X86_HOST, "x86_64"),
        Preset("x86_64_v3",
               "TVM, x86-64-v3 Linux CPU (AVX2+FMA: Intel Haswell, AMD Zen and newer), for tuned builds",
               {**_X86_HOST, "mcpu": "x86-64-v3"}, "x86_64", cpu_flags=("avx2", "fma", "f16c", "bmi2")),
        Preset(
            "aarch64",
            "TVM, 64-bit Arm Linux CPU with NEON, cross-compiled (untuned)",
            {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
            "aarch64",
            cross_compiler="aarch64-linux-gnu-g++",
            cross_package="g++-aarch64-linux-gnu",
        ),
        Preset(
            "cuda",
            "TVM, NVIDIA GPU via nvcc, dlight default schedules (option arch=sm_XX, default sm_80)",
            {"kind": "cuda", "arch": "sm_80", "host": _X86_HOST},
            "x86_64",
            device="cuda",
        ),
    ]
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ConfigError`` listing the known ones when there is none."""
    if name not in PRESETS:
        raise ConfigError(f"unknown TVM preset '{name}'; known: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a model input, output or parameter.

    Attributes:
        name: the user-facing name.
        shape: one entry per dim: an int, or a str naming a dynamic dim.
        dtype: numpy-style dtype name (``float32``, ``int64``, ``bfloat16``, ...).
        example_shape: the concrete shape seen at capture (sizes for generated inputs), if known.
        value_range: ``(low, high)`` of the capture example for integer inputs (safe values for
            generated inputs, e.g. token ids below the vocabulary size), if known.
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    example_shape: tuple[int, ...] | None = None
    value_range: tuple[int, int] | None = None

    def mismatch(self, array: np.ndarray) -> str | None:
        """Why ``array`` cannot stand for this tensor, or None when it can."""
        if str(array.dtype) != self.dtype:
            return f"dtype {array.dtype}, expected {self.dtype}"
        if array.ndim != len(self.shape) or any(
            isinstance(want, int) and got != want for got, want in zip(array.shape, self.shape, strict=True)
        ):
            return f"shape {tuple(array.shape)}, expected {self.shape_text()}"
        return None

    def check_input(self, array: np.ndarray) -> None:
        """Raise ``InputMismatchError`` naming this input when ``array`` does not fit it."""
        reason = self.mismatch(array)
        if reason is not None:
            raise InputMismatchError(f"input '{self.name}' has {reason}")

    def shape_text(self) -> str:
        return "(" + ", ".join(str(d) for d in self.shape) + ")"

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        def opt_tuple(v: Any) -> tuple | None:
            return None if v is None else tuple(v)

        return cls(
            name=str(d["name"]),
            shape=tuple(d["shape"]),
            dtype=str(d["dtype"]),
            example_shape=opt_tuple(d.get("example_shape")),
            value_range=opt_tuple(d.get("value_range")),
        )


@dataclasses.dataclass(frozen=True)
class ArtifactMeta:
    """What ``meta.json`` holds. ``params`` lists the weights in the order the VM takes them;
    ``tuning`` is ``tuned`` or ``untuned``, ``tuning_db`` (tuned builds) says which database and how
    many kernels it covered."""

    preset: str
    target: dict[str, Any]
    arch: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    params: list[TensorSpec]
    opt_level: int
    versions: dict[str, str]
    so_sha256: str = ""
    tuning: str = "untuned"
    tuning_db: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("inputs", "outputs", "params"):
            d[key] = [s.to_json() for s in getattr(self, key)]
        return d

    @classmethod
    def read(cls, folder: Path) -> "ArtifactMeta":
        """Parse ``folder/meta.json``; raise ``ModelFormatError`` when it is missing or malformed."""
        path = folder / META_FILE
        try:
            d = json.loads(path.read_text())
            if d.get("format_version") != FORMAT_VERSION:
                raise ModelFormatError(
                    f"{path}: format_version {d.get('format_version')!r}, this regc reads "
                    f"{FORMAT_VERSION}; re-run 'regc compile' with this regc"
                )
            specs = {k: [TensorSpec.from_json(s) for s in d.pop(k)] for k in ("inputs", "outputs", "params")}
            return cls(**d, **specs)
        except FileNotFoundError as e:
            raise ModelFormatError(f"{folder}: no {META_FILE}; not written by TvmArtifact.save") from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelFormatError(f"{path}: unreadable or malformed ({e}); re-run 'regc compile'") from e


class TvmArtifact:
    """A compiled model: VM executable, weights (name -> ``tvm.runtime.Tensor``) and metadata.

    ``art(*tensors)`` runs it like ``Model`` (torch in, torch out); ``art.run(*arrays)`` takes and
    returns numpy arrays. ``params`` may be swapped for another weight set with the same specs. One run
    at a time: the VM and, on CPUs, the input buffers are the artifact's own.
    """

    def __init__(
        self, module: Any, params: dict[str, Any], meta: ArtifactMeta, source_so: Path | None = None
    ) -> None:
        self.module = module  # tvm.relax Executable when built here, tvm.runtime.Module when loaded
        self.params = params
        self.meta = meta
        self._source_so = source_so
        self._vm: Any = None
        self._main: Any = None  # the VM's main function
        self._device: Any = None
        self._on_cpu = True  # set with the VM
        self._inputs: dict[int, tuple[Any, np.ndarray]] = {}  # CPU: input buffer and its numpy view
        self._weights: list[Any] = []  # main's weight arguments, made from...
        self._weights_source: list[Any] = []  # ...these params
        self._param_names = [s.name for s in meta.params]

    # ---- files ---------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``model.so``, ``model.params`` and ``meta.json`` into ``folder`` (created if needed)."""
        import tvm

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        so = folder / SO_FILE
        if self._source_so is not None:  # a loaded library cannot be re-exported: copy its file
            shutil.copyfile(self._source_so, so)
        else:
            preset = PRESETS[self.meta.preset]
            fcompile = None
            if preset.cross_compiler:
                from tvm.support import cc

                fcompile = cc.cross_compiler(preset.cross_compiler)
            try:
                self.module.export_library(str(so), fcompile=fcompile)
            except Exception as e:  # compiler/linker failures surface as RuntimeError with the log
                raise LoweringError(f"linking {so} for '{preset.name}' failed: {e}") from e
        tvm.runtime.save_param_dict_to_file(self.params, str(folder / PARAMS_FILE))
        meta = dataclasses.replace(self.meta, so_sha256=sha256_file(so))
        (folder / META_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "TvmArtifact":
        """Open a saved folder. Raise ``ModelFormatError`` when a file is missing or corrupt, and
        ``LoweringError`` when it was built for another machine.

        ``model.so`` is native code: it is checked against the sha256 in ``meta.json`` before it is
        loaded (a truncated library crashes the process), and only folders you trust should be opened.
        """
        import tvm

        folder = Path(folder)
        meta = ArtifactMeta.read(folder)
        so, params_path = folder / SO_FILE, folder / PARAMS_FILE
        for f in (so, params_path):
            if not f.is_file():
                raise ModelFormatError(f"{folder}: {f.name} is missing; copy the whole artifact folder")
        if sha256_file(so) != meta.so_sha256:
            raise ModelFormatError(f"{so}: sha256 differs from {META_FILE} (corrupt or replaced); re-compile")
        _check_arch(meta)
        try:
            params = dict(tvm.runtime.load_param_dict_from_file(str(params_path)))
        except RuntimeError as e:  # tvm.error.InternalError: bad magic, truncated
            raise ModelFormatError(f"{params_path}: not a TVM parameter file ({e})") from e
        _check_param_specs(params, meta.params, str(params_path))
        try:
            module = tvm.runtime.load_module(str(so))
        except RuntimeError as e:  # tvm.error.InternalError from dlopen
            raise ModelFormatError(f"{so}: cannot be loaded ({e})") from e
        return cls(module, params, meta, source_so=so)

    def runs_here(self) -> bool:
        """Whether this machine can run the build (its architecture, and a GPU for ``cuda``)."""
        try:
            _check_arch(self.meta)
        except LoweringError:
            return False
        return True

    def kernel_source(self, kind: str, fmt: str = "") -> str:
        """Generated code of the built kernels of one module kind (``cuda``: CUDA C; ``llvm``: LLVM IR, or
        assembly with ``fmt="asm"``) in the in-memory build, concatenated; empty when there is none."""
        mod = getattr(self.module, "mod", self.module)
        found = mod._collect_from_import_tree(lambda m: m.kind == kind)
        return "\n".join(m.inspect_source(fmt) for m in found)

    # ---- running -------------------------------------------------------------------------------
    def run(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """Run on numpy arrays in input order; return outputs in output order."""
        specs = self.meta.inputs
        if len(arrays) != len(specs):
            raise InputMismatchError(
                f"model takes {len(specs)} inputs {[s.name for s in specs]}, got {len(arrays)}"
            )
        for spec, a in zip(specs, arrays, strict=True):
            spec.check_input(a)
        inputs = self._device_inputs(arrays)  # first: it opens the VM
        return tuple(map(self._host_array, self._main(*inputs, *self._main_weights())))

    def _device_inputs(self, arrays: Sequence[np.ndarray]) -> list[Any]:
        """``arrays`` as ``main``'s input tensors on the run device; opens the VM on first use.

        On CPUs each array is copied into the buffer its input had in the previous run when the shape
        is the same (through a numpy view of it), and outputs come back through DLPack
        (``_host_array``). Python's share of a run is what this saves: a fresh ``tvm.runtime.tensor``
        per input and ``Tensor.numpy`` per output (ctypes on every call) took ~0.25 ms of a 2 ms
        ResNet-style run here, next to ~0.07 ms for the numpy copies in and out (measured).
        """
        import tvm

        if self._vm is None:
            from tvm.runtime.vm import VirtualMachine

            _check_arch(self.meta)
            self._device = _device(self.meta)
            self._on_cpu = _device_kind(self.meta) == "cpu"
            self._vm = VirtualMachine(self.module, self._device)
            self._main = self._vm["main"]
        if not self._on_cpu:
            return [tvm.runtime.tensor(np.ascontiguousarray(a), self._device) for a in arrays]
        tensors = []
        for i, array in enumerate(arrays):
            buffer, view = self._inputs.get(i, (None, None))
            if view is None or view.shape != array.shape or view.dtype != array.dtype:
                buffer = tvm.runtime.empty(array.shape, str(array.dtype), self._device)
                view = np.from_dlpack(buffer)
                self._inputs[i] = buffer, view
            np.copyto(view, array)
            tensors.append(buffer)
        return tensors

    def _host_array(self, t: Any) -> np.ndarray:
        """A numpy copy of output ``t`` (DLPack on CPUs for the dtypes numpy has)."""
        return np.from_dlpack(t).copy() if self._on_cpu and str(t.dtype) in _NUMPY_DTYPES else t.numpy()

    def kernel_times(self, *arrays: np.ndarray, runs: int = 10) -> dict[str, tuple[int, float]]:
        """Where a run's time goes: ``{VM function: (calls per run, seconds per run)}`` over ``runs`` runs
        on ``arrays``, for every kernel and VM builtin ``main`` calls, timed around each call (the
        timing adds a few microseconds a call, so compare kernels with each other, not with a plain run).
        """
        import time

        self.run(*arrays)  # warm up; creates the VM and main's weights
        inputs = self._device_inputs(arrays)
        calls: dict[str, int] = {}
        seconds: dict[str, float] = {}
        started: list[float] = []

        def instrument(_func: Any, symbol: str, before: bool, _ret: Any, *_args: Any) -> int:
            if before:
                started.append(time.perf_counter())
            else:
                seconds[symbol] = seconds.get(symbol, 0.0) + time.perf_counter() - started.pop()
                calls[symbol] = calls.get(symbol, 0) + 1
            return 0  # VMInstrumentReturnKind.NO_OP: run the call

        self._vm.set_instrument(instrument)
        try:
            for _ in range(runs):
                self._main(*inputs, *self._main_weights())
        finally:
            self._vm.set_instrument(None)
        return {k: (calls[k] // runs, seconds[k] / runs) for k in sorted(seconds, key=lambda k: -seconds[k])}

    def _main_weights(self) -> list[Any]:
        """``main``'s weight arguments: ``params`` in VM order, on the run device, through
        ``main_transform_params`` when the build has it; kept until ``params`` changes."""
        source = list(map(self.params.__getitem__, self._param_names))  # C loops: this runs every run
        kept = self._weights_source
        if len(source) != len(kept) or not all(map(operator.is_, source, kept)):
            weights = source if self._on_cpu else [w.copyto(self._device) for w in source]
            if self._vm.module.implements_function(TRANSFORM_PARAMS):
                weights = list(self._vm[TRANSFORM_PARAMS](weights))
            self._weights, self._weights_source = weights, source
        return self._weights

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = tuple(torch.from_numpy(a) for a in self.run(*(t.detach().cpu().numpy() for t in tensors)))
        return out[0] if len(out) == 1 else out


@dataclasses.dataclass
class RelaxProgram:
    """A model imported into Relax with its weights detached: what ``relax.build`` and MetaSchedule
    tuning both start from, so the kernels they see are the same.

    Attributes:
        mod: the IRModule; ``main`` takes the inputs then the weights.
        params: weights by name (``tvm.runtime.Tensor``), in ``main``'s order.
        inputs: input specs.
        outputs: output specs.
    """

    mod: Any
    params: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def import_relax(model: Model) -> RelaxProgram:
    """Import ``model`` into Relax; raise ``LoweringError`` naming the failing stage."""
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program

    if model.training:
        raise LoweringError("the model is in training mode; call model.train_mode(False) before lowering")
    gm = _weights_as_params(model.gm)
    dynamic_shapes = model.export_dynamic_shapes()
    try:
        ep = torch.export.export(gm, tuple(model.example_inputs), dynamic_shapes=dynamic_shapes)
    except Exception as e:  # torch.export raises many unrelated types (UserError, GuardOnDataDependent...)
        raise LoweringError(f"torch.export could not re-capture the model for TVM: {e}") from e
    try:
        ep = ep.run_decompositions(_decomposition_table(ep))
    except Exception as e:
        raise LoweringError(f"decomposing the graph to core ATen for TVM failed: {e}") from e
    _check_ops_supported(ep)
    try:
        mod = from_exported_program(ep, keep_params_as_input=True, run_ep_decomposition=False)
    except Exception as e:  # converters raise AssertionError/ValueError/InternalError on unsupported args
        raise LoweringError(f"TVM's torch frontend failed to convert the graph: {e}") from e
    mod, detached = detach_params(mod)

    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    arg_to_fqn = ep.graph_signature.inputs_to_parameters
    param_names = [arg_to_fqn[v.name] for v in func.params[num_input:]]
    params = dict(zip(param_names, detached.get("main", []), strict=True))
    inputs, outputs = _io_specs(model, ep)
    return RelaxProgram(mod, params, inputs, outputs)


def lower_tvm(
    model: Model,
    preset: str = "x86_64",
    *,
    tuning_db: str | Path | None = None,
    arch: str | None = None,
    opt_level: int = 3,
) -> TvmArtifact:
    """Compile ``model`` for a preset (``x86_64``, ``aarch64``, ``cuda``) with weights kept outside the code.

    ``tuning_db``: a folder written by ``regc tune`` for this preset; its tuned kernels replace the
    default schedules (kernels it lacks keep them) and ``meta.tuning`` says ``tuned``. ``arch``: the
    CUDA compute capability for ``cuda`` (``sm_80`` when omitted). Raises ``ConfigError`` for an
    unknown preset, a bad option or a database for another target/TVM version, and ``LoweringError``
    naming the failing stage (torch.export, decomposition, TVM import, build) with what to do.
    """
    import tvm
    from tvm import relax

    p = get_preset(preset)
    target = p.tvm_target(arch)
    if p.cross_compiler and shutil.which(p.cross_compiler) is None:
        raise LoweringError(
            f"target '{preset}' needs the cross compiler {p.cross_compiler}: "
            f"apt-get install {p.cross_package}"
        )
    if p.device == "cuda" and shutil.which("nvcc") is None:
        raise LoweringError(
            "target 'cuda' compiles kernels with nvcc: install the CUDA toolkit (nvcc on PATH)")
    db = None
    if tuning_db is not None:
        from regc.backends.tvm_tune import TuningDatabase

        db = TuningDatabase.open(tuning_db, preset, target)
    program = import_relax(model)

    tuning_info = None
    try:
        kernels = fuse_kernels(program.mod, target)
        if db is not None:
            kernels, tuning_info = db.apply(kernels, target)
        with tvm.transform.PassContext(opt_level=opt_level):
            executable = relax.build(kernels, target=target, relax_pipeline=_finish_pipeline(target))
    except ConfigError:
        raise
    except Exception as e:  # tvm.error.InternalError and friends, with TVM's message
        raise LoweringError(f"TVM build for '{preset}' failed: {e}") from e

    meta = ArtifactMeta(
        preset=preset,
        target=p.target_dict(arch),
        arch=p.arch,
        inputs=program.inputs,
        outputs=program.outputs,
        params=[_tensor_spec(n, t.shape, t.dtype) for n, t in program.params.items()],
        opt_level=opt_level,
        versions=tvm_versions(),
        tuning="untuned" if db is None else "tuned",
        tuning_db=tuning_info,
    )
    return TvmArtifact(executable, program.params, meta)


def fuse_kernels(mod: Any, target: Any) -> Any:
    """Legalize and fuse ``mod`` into one TIR kernel per fused group: what MetaSchedule tunes and
    what ``lower_tvm`` schedules and compiles (so the tuning keys match the build).

    float32 ``exp``, ``erf``, ``tanh``, softmax and GELU get TVM's polynomial approximations (``_fast_math``).
    Then TVM's default fusion (FuseOps) and one more: each weight-decoding kernel (elementwise math on
    integer weights and constants, e.g. ``(q - z) * s``, a 4-bit unpack, the RF8 decode) is merged into
    the kernel that consumes its result, so the kernels that read codes are the matmuls/convs/gathers
    themselves. Models without integer weights get TVM's default fusion unchanged.

    Last, the kernels left that read weights only (a float weight's transpose for ``y = x W^T``, a bias
    reshape) move out of ``main`` into ``main_transform_params`` (TVM's LiftTransformParams), which
    ``TvmArtifact`` and the bundle runner call once per weight set: ``main`` then takes its inputs and
    that function's outputs. An untuned MiniLM build spent 33 ms of every run transposing its 36 weight
    matrices (measured). Decodes are merged into their consumers first, so codes are never lifted into
    float weights.

    On CPUs, first, convs on maps up to 32 wide run channels-last (``tvm_conv_layout``: the layout is
    carried over the ops between them), where their tuned kernels vectorize over channels; and last,
    the kernels' weight buffers (``main``'s parameters) are marked layout-free
    (AttachAttrLayoutFreeBuffers): a tuned schedule may read a weight in a tiled layout of its choice,
    and ``TuningDatabase.apply`` moves that repacking into ``main_transform_params`` too.
    """
    import tvm
    from tvm import relax

    from regc.backends.tvm_conv_layout import narrow_convs_channels_last

    weights = _weight_names(mod["main"])
    cpu = target.kind.name == "llvm"
    with target:
        return tvm.transform.Sequential([
            *([narrow_convs_channels_last(weights)] if cpu else []),
            *_backend_pipeline(target).library_dispatch_passes(target),
            relax.transform.LegalizeOps(_fast_math()),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.FuseOpsByPattern(_decode_patterns(weights), bind_constants=False),
            relax.transform.FuseTIR(),
            relax.transform.LiftTransformParams(),
            *([relax.transform.AttachAttrLayoutFreeBuffers()] if cpu else []),
        ])(mod)


def kernel_tasks(kernels: Any, target: Any) -> list[Any]:
    """MetaSchedule's tasks (one per distinct kernel, ``weight`` = calls per run) for the kernels that
    ``main`` of a ``fuse_kernels`` module calls; ``main_transform_params``' kernels run once per weight
    set and are not worth tuning trials."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    per_run = tvm.IRModule({gv: f for gv, f in kernels.functions.items() if gv.name_hint != TRANSFORM_PARAMS})
    return ms.relax_integration.extract_tasks(per_run, target)


def _finish_pipeline(target: Any) -> Any:
    """The rest of ``relax.build`` after ``fuse_kernels`` (and a tuning database): kernels not scheduled
    yet get dlight's defaults on GPUs, ``_schedule_weight_decode`` on CPUs, then TVM's own lowering and
    finalization."""
    import tvm
    from tvm.s_tir import dlight as dl

    backend = _backend_pipeline(target)
    gpu = target.kind.name == "cuda"
    schedule = [dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                        dl.gpu.GeneralReduction(), dl.gpu.Fallback())] if gpu else [
        _schedule_weight_decode()]

    @tvm.transform.module_pass(opt_level=0, name="regc_finish")
    def finish(mod: Any, _ctx: Any) -> Any:
        with target:
            return tvm.transform.Sequential([
                *schedule,
                *backend.dataflow_lower_passes(target),
                *backend.finalize_passes(target),
            ])(mod)

    return finish


def _backend_pipeline(target: Any) -> Any:
    """TVM's per-backend pass lists (``tvm.relax.backend.<kind>.pipeline``) for the presets' kinds."""
    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline
    else:
        from tvm.relax.backend.cpu_generic import pipeline
    return pipeline


_MAX_CONSUMER_ARGS = 6
_MAX_DECODE_ARGS = 4


def _weight_side(arg: Any, weights: set[str]) -> bool:
    """Whether a call argument does not depend on the activations: a weight parameter (name in
    ``weights``), a constant, or a scalar (a symbolic shape size, e.g. the batch a weight is broadcast to)."""
    import tvm
    from tvm import relax

    scalar = not isinstance(arg.ty, relax.TensorType)
    return isinstance(arg, tvm.ir.Constant) or scalar or _weight(arg, weights)


def _integer_weight(arg: Any, weights: set[str]) -> bool:
    """Whether a call argument is a weight parameter stored as integers (codes)."""
    return _weight(arg, weights) and "int" in str(arg.ty.dtype)


def _weight(arg: Any, weights: set[str]) -> bool:
    """Whether a call argument is one of ``main``'s weight parameters (names in ``weights``)."""
    from tvm import relax

    return isinstance(arg, relax.Var) and not isinstance(arg, relax.DataflowVar) and arg.name in weights


def _fast_math() -> dict[str, Callable[[Any, Any], Any]]:
    """LegalizeOps overrides: float32 ``exp``, ``erf``, ``tanh``, ``softmax``, ``gelu`` and ``gelu_tanh``
    computed with TVM's ``fast_exp``/``fast_erf``/``fast_tanh`` (range reduction and rational polynomials,
    the kind onnxruntime's own kernels use) instead of calls to the C library, which run one element at
    a time. On 49152 elements with x86-64-v3 (measured): erf 1.17 -> 0.03 ms, tanh 0.73 -> 0.18 ms,
    exp 0.37 -> 0.03 ms, relative error at most 3.5e-7; a tuned MiniLM's GELU took 1.5 ms a layer with
    ``erf``. Other dtypes keep TVM's default legalization. Softmax, ``max``-shifted, stays exact in form:
    ``exp(x - max) / sum``.
    """
    import math

    from tvm import te, tirx, topi

    def gelu(x: te.Tensor) -> te.Tensor:  # x Phi(x) = x (1 + erf(x / sqrt 2)) / 2
        return x * (tirx.const(0.5, "float32") + topi.fast_erf(x * tirx.const(0.5**0.5, "float32")) *
                    tirx.const(0.5, "float32"))

    def gelu_tanh(x: te.Tensor) -> te.Tensor:  # x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2
        inner = tirx.const(math.sqrt(2.0 / math.pi), "float32") * x * (
            tirx.const(1.0, "float32") + tirx.const(0.044715, "float32") * x * x)
        return tirx.const(0.5, "float32") * x * (tirx.const(1.0, "float32") + topi.fast_tanh(inner))

    def no_args(_call: Any) -> tuple[()]:
        return ()

    def axis(call: Any) -> tuple[int]:
        return (int(call.attrs.axis),)

    # op -> (fast TE function, kernel name hint, the call's extra TE arguments)
    rules: dict[str, tuple[Callable[..., Any], str, Callable[[Any], tuple[Any, ...]]]] = {
        "relax.exp": (topi.fast_exp, "tir_exp", no_args),
        "relax.erf": (topi.fast_erf, "erf", no_args),
        "relax.tanh": (topi.fast_tanh, "tir_tanh", no_args),
        "relax.nn.gelu": (gelu, "gelu", no_args),
        "relax.nn.gelu_tanh": (gelu_tanh, "gelu_tanh", no_args),
        "relax.nn.softmax": (topi.nn.fast_softmax, "softmax", axis),
    }

    def rule(op_name: str) -> Callable[[Any, Any], Any]:
        import tvm

        fast, hint, extra = rules[op_name]
        default = tvm.ir.Op.get(op_name).get_attr("FLegalize")

        def legalize(bb: Any, call: Any) -> Any:
            if str(call.args[0].ty.dtype) != "float32":
                return default(bb, call)
            return bb.call_te(fast, call.args[0], *extra(call), primfunc_name_hint=hint)

        return legalize

    return {name: rule(name) for name in rules}


def _decode_patterns(weights: set[str]) -> list[Any]:
    """``call_tir(consumer, (..., call_tir(decode, args...), ...))`` for every argument position, where
    ``decode``'s arguments are all weight-side (``_weight_side``), at least one an integer weight."""
    from tvm import relax
    from tvm.relax.dpl import GlobalVarPattern, TuplePattern, is_op, wildcard

    def decodes_integer_weights(ctx: Any) -> bool:
        args = ctx.annotated_expr["decode"].args[1].fields
        return all(_weight_side(a, weights) for a in args) and any(_integer_weight(a, weights) for a in args)

    patterns = []
    for n_decode in range(1, _MAX_DECODE_ARGS + 1):
        for n_args in range(1, _MAX_CONSUMER_ARGS + 1):
            for pos in range(n_args):
                decode = is_op("relax.call_tir")(
                    GlobalVarPattern(), TuplePattern([wildcard() for _ in range(n_decode)]),
                    add_constraint=False)
                args = [wildcard() for _ in range(n_args)]
                args[pos] = decode
                consumer = is_op("relax.call_tir")(
                    GlobalVarPattern(), TuplePattern(args), add_constraint=False)
                patterns.append(relax.transform.FusionPattern(
                    "regc.decoded_weight", consumer, {"decode": decode}, decodes_integer_weights))
    return patterns


def _schedule_weight_decode() -> Any:
    """A module pass: in each kernel that ``main`` calls with an integer weight and that no tuning
    database scheduled, move the decode into the block that reads the decoded weight
    (``_decode_at_consumer``)."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")

    @tvm.transform.module_pass(opt_level=0, name="regc_schedule_weight_decode")
    def schedule(mod: Any, _ctx: Any) -> Any:
        main = mod["main"]
        weights, done = _weight_names(main), set()
        for binding in (b for block in main.body.blocks for b in block.bindings):
            call = binding.value
            if not (isinstance(call, relax.Call) and call.op.same_as(call_tir)):
                continue
            args, kernel = call.args[1].fields, call.args[0]
            func = mod[kernel]
            tuned = func.attrs is not None and "tirx.is_scheduled" in func.attrs
            if any(_integer_weight(a, weights) for a in args) and not tuned and kernel.name_hint not in done:
                # the kernel's parameters are the call's arguments, then its outputs
                fixed = [p for p, a in zip(func.params, args, strict=False) if _weight_side(a, weights)]
                mod[kernel] = _decode_at_consumer(func, fixed)
                done.add(kernel.name_hint)  # layers of the same shape share one kernel
        return mod

    return schedule


def _decode_at_consumer(func: Any, sources: list[Any]) -> Any:
    """``func`` with its decode (the spatial blocks that read only ``sources`` or what such blocks
    write) moved into the block that reads the decoded weight ``w``:

    - the decode's inner steps (unpack, scale, transpose, ...) are inlined into its last one, which
      then computes ``w`` from the codes element by element;
    - a consumer without a reduction (a gather) gets that last step inlined too: it decodes just the
      elements it reads;
    - a reduction (matmul, conv) gets its loops over ``w``'s output axes moved outermost, and computes
      the slice of ``w`` it needs under the innermost of them: for y = x w^T, w[n, :] (K values) is
      decoded once per output channel n and reused by every row of x. Decoding each element where
      it is read would instead redo it for every row (measured 2.5-18x slower untuned, digits CNN).

    A step TVM's schedule primitives refuse stays as it was: a loop nest of its own, still correct.
    """
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    derived, outputs, steps = set(sources), set(func.params), []
    for rv in sch.get_child_blocks(sch.get_sblock("root")):
        block = sch.get(rv)
        written = {w.source for w in block.writes}
        if _spatial(block) and {r.source for r in block.reads} <= derived and not written & outputs:
            derived |= written
            steps.append(rv)
    names = {sch.get(rv).name_hint for rv in steps}
    for rv in steps:
        consumers = sch.get_consumers(rv)
        try:
            if all(sch.get(c).name_hint in names for c in consumers):
                sch.compute_inline(rv)
            elif len(consumers) == 1 and _spatial(sch.get(consumers[0])):
                sch.compute_inline(rv)
            elif len(consumers) == 1:
                _compute_under_output_loops(sch, rv, consumers[0])
        except s_tir.ScheduleError:
            pass  # the step stays a loop nest of its own
    return sch.mod["main"]


def _compute_under_output_loops(sch: Any, producer: Any, consumer: Any) -> None:
    """Reorder ``consumer``'s loops so that the spatial ones indexing ``producer``'s buffer come first,
    and compute ``producer`` under the innermost of them (only the slice those loops select)."""
    from tvm import tirx

    block = sch.get(consumer)
    buffer = sch.get(producer).writes[0].source
    region = next(r.region for r in block.reads if r.source.same_as(buffer))
    used = {v for rng in region for v in tirx.analysis.undefined_vars(rng.min, [])}
    loops = sch.get_loops(consumer)
    if len(loops) != len(block.iter_vars):
        return
    outer = [i for i, v in enumerate(block.iter_vars)
             if v.iter_type == tirx.IterVar.DataPar and v.var in used]
    if not outer:
        return
    sch.reorder(*[loops[i] for i in outer], *[loops[i] for i in range(len(loops)) if i not in outer])
    sch.compute_at(producer, loops[outer[-1]])


def _spatial(block: Any) -> bool:
    """Whether a TIR block has no reduction axis."""
    from tvm import tirx

    return all(v.iter_type == tirx.IterVar.DataPar for v in block.iter_vars)


def _weight_names(main: Any) -> set[str]:
    """Names of ``main``'s weight parameters (those after its ``num_input`` inputs)."""
    num_input = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs else 0
    return {p.name for p in main.params[num_input:]}  # not the model's own (integer) inputs


def tvm_versions() -> dict[str, str]:
    import tvm

    return {
        "tvm": tvm.__version__,
        "tvm_ffi": importlib.metadata.version("apache-tvm-ffi"),
        "torch": torch.__version__,
        "regc": importlib.metadata.version("regc"),
    }


TARGETS = [Target(p.name, p.description, functools.partial(lower_tvm, preset=p.name))
           for p in PRESETS.values()]


# ---- helpers -----------------------------------------------------------------------------------
def _weights_as_params(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose buffers and tensor constants read by the graph are frozen parameters.

    TVM's frontend keeps only parameters as function inputs and bakes buffers into the code.
    """
    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_path, _, leaf = node.target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        value = getattr(owner, leaf)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            delattr(owner, leaf)
            owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    return gm


def _decomposition_table(ep: torch.export.ExportedProgram) -> Any:
    """Core-ATen decompositions, plus arithmetic bodies for the (de)quantize ops and ``regc::`` decoding
    ops in the graph, so that integer weights reach TVM as integers followed by elementwise math."""
    from torch._library.custom_ops import _maybe_get_opdef
    from torch.ao.quantization.fx import _decomposed

    table = torch.export.default_decompositions()
    for node in ep.graph.nodes:
        op = node.target
        if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
            continue
        namespace = op.namespace
        if namespace == "quantized_decomposed":
            overload = "" if op._overloadname == "default" else "_" + op._overloadname
            body = getattr(_decomposed, op._opname + overload, None)
        elif namespace == "regc":
            opdef = _maybe_get_opdef(op)
            body = None if opdef is None else opdef._init_fn
        else:
            continue
        if body is not None:
            table[op] = body
    table.update(_arith_shifts())
    return table


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x >> k`` = floor(x / 2^k) for integers (arithmetic shift), in int32 (TVM's torch frontend has no
    shifts, and its scalar constants are int32)."""
    return torch.div(x.to(torch.int32), 2 ** int(k), rounding_mode="floor").to(x.dtype)


def _shift_left(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x << k`` = x * 2^k in int32, cast back (dropping the same high bits as the shift)."""
    return (x.to(torch.int32) * 2 ** int(k)).to(x.dtype)


def _arith_shifts() -> dict[Any, Any]:
    aten = torch.ops.aten
    return {aten.__rshift__.Scalar: _shift_right, aten.__lshift__.Scalar: _shift_left}


def _check_ops_supported(ep: torch.export.ExportedProgram) -> None:
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    known = ExportedProgramImporter().convert_map
    missing: dict[str, list[str]] = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target.__name__ not in known:
            missing.setdefault(node.target.__name__, []).append(node.name)
    if missing:
        ops = "; ".join(f"aten.{op} (nodes {', '.join(nodes)})" for op, nodes in sorted(missing.items()))
        raise LoweringError(
            f"TVM's torch frontend has no converter for {ops}; rewrite these ops before lowering "
            "(regc.rewrite) or target ONNX instead"
        )


def _io_specs(model: Model, ep: torch.export.ExportedProgram) -> tuple[list[TensorSpec], list[TensorSpec]]:
    sig = ep.graph_signature
    nodes = {n.name: n for n in ep.graph.nodes}
    if len(sig.user_inputs) != len(model.input_names):
        raise LoweringError(
            f"the graph takes {len(sig.user_inputs)} inputs, model.input_names lists {model.input_names}"
        )
    if len(sig.user_outputs) != len(model.output_names):
        raise LoweringError(
            f"the graph returns {len(sig.user_outputs)} outputs, model.output_names is {model.output_names}"
        )
    inputs = []
    for name, arg, example in zip(model.input_names, sig.user_inputs, model.example_inputs, strict=True):
        spec = _tensor_spec(name, nodes[arg].meta["val"].shape, example.dtype)
        value_range = None
        if not example.is_floating_point() and example.dtype != torch.bool:
            value_range = (int(example.min()), int(example.max())) if example.numel() else (0, 0)
        inputs.append(dataclasses.replace(spec, example_shape=tuple(example.shape), value_range=value_range))
    outputs = [
        _tensor_spec(name, nodes[arg].meta["val"].shape, nodes[arg].meta["val"].dtype)
        for name, arg in zip(model.output_names, sig.user_outputs, strict=True)
    ]
    return inputs, outputs


def _tensor_spec(name: str, shape: Sequence[Any], dtype: Any) -> TensorSpec:
    """A spec from a torch/TVM shape (SymInt dims become their symbol's name) and dtype."""
    dims = tuple(int(d) if isinstance(d, int) else str(d) for d in shape)
    return TensorSpec(name, dims, str(dtype).removeprefix("torch."))


def _check_param_specs(params: dict[str, Any], specs: list[TensorSpec], where: str) -> None:
    want = {s.name for s in specs}
    if set(params) != want:
        raise ModelFormatError(
            f"{where}: parameter names differ from {META_FILE}: missing {sorted(want - set(params))}, "
            f"unexpected {sorted(set(params) - want)}"
        )
    for s in specs:
        t = params[s.name]
        if str(t.dtype) != s.dtype or tuple(t.shape) != s.shape:
            raise ModelFormatError(
                f"{where}: parameter '{s.name}' is {t.dtype}{tuple(t.shape)}, "
                f"expected {s.dtype}{s.shape_text()}"
            )


def _check_arch(meta: ArtifactMeta) -> None:
    """Raise ``LoweringError`` when this machine cannot run a ``meta`` build (architecture, GPU)."""
    import tvm

    if meta.arch != platform.machine():
        raise LoweringError(
            f"this '{meta.preset}' build runs on {meta.arch} machines, this one is {platform.machine()}; "
            "copy the saved folder to the target and run it there"
        )
    missing = PRESETS[meta.preset].missing_cpu_flags() if meta.preset in PRESETS else []
    if missing:
        raise LoweringError(f"this '{meta.preset}' build uses {', '.join(missing)} instructions, which this "
                            "CPU lacks; build for the generic 'x86_64' target to run here")
    if _device_kind(meta) == "cuda" and not tvm.cuda().exist:
        raise LoweringError(f"this '{meta.preset}' build runs on an NVIDIA GPU and this machine has none; "
                            "copy the saved folder to a machine with one")


@functools.cache
def host_cpu_flags() -> frozenset[str]:
    """This CPU's instruction set extensions, from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines()
                           if line.startswith("flags")), []))


# dtypes numpy takes over DLPack (bfloat16 and the float8s go through Tensor.numpy and ml_dtypes)
_NUMPY_DTYPES = frozenset({"bool", "float16", "float32", "float64", "int8", "int16", "int32", "int64",
                           "uint8", "uint16", "uint32", "uint64"})


def _device_kind(meta: ArtifactMeta) -> str:
    return PRESETS[meta.preset].device if meta.preset in PRESETS else "cpu"


def _device(meta: ArtifactMeta) -> Any:
    import tvm

    return tvm.cuda() if _device_kind(meta) == "cuda" else tvm.cpu()


