"""``load_onnx``: read, plan, capture with torch.export, wrap as ``regc.Model``.

Input sizes: a dim with a fixed ``dim_value`` is static; a ``dim_param`` or unknown dim is dynamic
(``Dim.AUTO``: torch.export keeps it symbolic unless the graph pins it) with example size 2, or the
size of the given example. An input declared without any shape takes its example's shape, static.
The dims that stay symbolic after capture are recorded in ``Model.dynamic_shapes``.

Inputs that the graph uses as shapes, axes or counts (``constant_input_names``) cannot be traced as
data: pass their values with ``constant_inputs={name: value}``; they are folded into the graph and
are no longer inputs of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import onnx
import torch
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int

import regc.frontend.onnx_import._ops_control  # noqa: F401  (registers rules)
import regc.frontend.onnx_import._ops_math  # noqa: F401
import regc.frontend.onnx_import._ops_nn  # noqa: F401
import regc.frontend.onnx_import._ops_quant  # noqa: F401
import regc.frontend.onnx_import._ops_resize  # noqa: F401
import regc.frontend.onnx_import._ops_rnn  # noqa: F401
import regc.frontend.onnx_import._ops_shape  # noqa: F401
import regc.frontend.onnx_import._ops_signal  # noqa: F401
import regc.frontend.onnx_import._ops_transformer  # noqa: F401
from regc.errors import (
    CaptureError,
    InputMismatchError,
    ModelFormatError,
    RegcError,
    UnsupportedDtypeError,
    UnsupportedOpError,
)
from regc.frontend.onnx_import._builder import OnnxModule, constant_slots
from regc.frontend.onnx_import._dtypes import torch_dtype
from regc.frontend.onnx_import._reader import read_model
from regc.frontend.onnx_import._registry import RULES, tensor_from_numpy
from regc.ir import Model

__all__ = ["load_onnx", "import_model", "constant_input_names", "supported_ops"]

_EXAMPLE_DIM = 2
ArrayLike = Any  # numpy array, torch tensor or nested Python numbers


def supported_ops() -> list[str]:
    """ONNX op types (default domain) the importer has a rule for."""
    return sorted(RULES)


def constant_input_names(model: str | Path | onnx.ModelProto) -> dict[str, str]:
    """Graph inputs the graph reads as shapes, axes or counts: {name: 'Op input slot'}."""
    return constant_slots(model if isinstance(model, onnx.ModelProto) else read_model(model))


def load_onnx(
    path: str | Path,
    *,
    example_inputs: Sequence[ArrayLike] | Mapping[str, ArrayLike] | None = None,
    constant_inputs: Mapping[str, ArrayLike] | None = None,
    dynamic: bool = True,
) -> Model:
    """Import an ONNX file as a ``regc.Model``.

    Args:
        path: the .onnx file (external data is read from its folder only).
        example_inputs: example values for the model's inputs (in order, or by name); they set the
            size of dynamic dims and are required for inputs declared without a shape.
        constant_inputs: graph inputs to fold as constants (see ``constant_input_names``).
        dynamic: keep dims without a fixed size dynamic; False makes every dim static.
    """
    return import_model(
        read_model(path),
        source=str(path),
        example_inputs=example_inputs,
        constant_inputs=constant_inputs,
        dynamic=dynamic,
    )


def import_model(
    model: onnx.ModelProto,
    *,
    source: str = "<onnx model>",
    example_inputs: Sequence[ArrayLike] | Mapping[str, ArrayLike] | None = None,
    constant_inputs: Mapping[str, ArrayLike] | None = None,
    dynamic: bool = True,
) -> Model:
    """Import an already read (and trusted) ``onnx.ModelProto``; see ``load_onnx``."""
    for vi in (*model.graph.input, *model.graph.output):
        if vi.type.WhichOneof("value") != "tensor_type":
            raise UnsupportedDtypeError(
                f"{source}: graph value '{vi.name}' is a {vi.type.WhichOneof('value')}; "
                "regc imports graphs whose inputs and outputs are tensors"
            )
    declared = {vi.name: vi for vi in model.graph.input}
    folded = {
        name: _tensor(v, declared.get(name), f"constant input '{name}'")
        for name, v in (constant_inputs or {}).items()
    }
    unknown = sorted(set(folded) - set(declared))
    if unknown:
        raise InputMismatchError(
            f"{source}: constant_inputs {unknown} are not graph inputs; inputs: {sorted(declared)}"
        )
    for name, where in constant_slots(model).items():
        if name not in folded:
            raise UnsupportedOpError(
                f"{source}: graph input '{name}' is read as a shape, axis or count ({where}), which "
                "torch.export cannot trace as data; fold it: "
                f"load_onnx(path, constant_inputs={{'{name}': value}})",
                op=where.split()[0],
            )
    module = OnnxModule(model, folded)
    examples, spec = _examples(source, [declared[n] for n in module.input_names], example_inputs, dynamic)
    try:
        ep = torch.export.export(module, examples, dynamic_shapes={"args": spec} if examples else None)
        gm = ep.module()
    except RegcError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CaptureError(
            f"{source}: torch.export could not capture the imported graph: {type(e).__name__}: {first}"
        ) from e
    return Model(
        gm=gm,
        input_names=list(module.input_names),
        output_names=list(module.output_names),
        example_inputs=examples,
        origin="onnx",
        param_names=dict(module.param_names),
        dynamic_shapes=_symbolic_dims(ep, module.input_names),
    )


def _tensor(value: ArrayLike, vi: onnx.ValueInfoProto | None, where: str) -> torch.Tensor:
    t = value.detach() if isinstance(value, torch.Tensor) else tensor_from_numpy(value)
    if vi is not None and vi.type.tensor_type.elem_type:
        want = torch_dtype(vi.type.tensor_type.elem_type, f"input '{vi.name}'")
        if t.dtype != want:
            raise InputMismatchError(f"{where} has dtype {t.dtype}, the model declares {want}")
    return t


def _examples(
    source: str, inputs: list[onnx.ValueInfoProto], given: Any, dynamic: bool
) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, Any], ...]]:
    """Example tensors for the inputs and their dynamic dims."""
    if isinstance(given, Mapping):
        given = [given.get(vi.name) for vi in inputs]
    if given is not None and len(given) != len(inputs):
        raise InputMismatchError(
            f"{source}: {len(given)} example inputs for {len(inputs)} inputs {[vi.name for vi in inputs]}"
        )
    gen = torch.Generator().manual_seed(0)
    examples, spec = [], []
    for k, vi in enumerate(inputs):
        tt = vi.type.tensor_type
        dtype = torch_dtype(tt.elem_type, f"input '{vi.name}'")
        example = (
            None if given is None or given[k] is None else _tensor(given[k], vi, f"example input '{vi.name}'")
        )
        if not tt.HasField("shape"):
            if example is None:
                raise ModelFormatError(
                    f"{source}: input '{vi.name}' declares no shape; pass example_inputs=..."
                )
            examples.append(example)
            spec.append({})
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if example is not None and (
            example.dim() != len(dims)
            or any(d is not None and d != s for d, s in zip(dims, example.shape, strict=False))
        ):
            raise InputMismatchError(
                f"{source}: example input '{vi.name}' has shape {tuple(example.shape)}, "
                f"the model declares {['?' if d is None else d for d in dims]}"
            )
        if example is None:
            shape = [_EXAMPLE_DIM if d is None else d for d in dims]
            example = (
                torch.randn(shape, generator=gen).to(dtype)
                if dtype.is_floating_point
                else torch.zeros(shape, dtype=dtype)
            )
        examples.append(example)
        spec.append({i: Dim.AUTO for i, d in enumerate(dims) if d is None} if dynamic else {})
    return tuple(examples), tuple(spec)


def _symbolic_dims(ep: torch.export.ExportedProgram, names: list[str]) -> dict[str, dict[int, Any]] | None:
    """{input: {dim: Dim.DYNAMIC}} for the dims the exported program keeps symbolic (a dim that the
    graph pinned to its example size is static there)."""
    user = set(ep.graph_signature.user_inputs)
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
    found = {}
    for name, ph in zip(names, placeholders, strict=True):
        shape = getattr(ph.meta.get("val"), "shape", ())
        dims = {i: Dim.DYNAMIC for i, s in enumerate(shape) if not is_concrete_int(s)}
        if dims:
            found[name] = dims
    return found or None
