"""The regc IR: a thin wrapper over the ATen-level ``torch.fx.GraphModule`` that ``torch.export`` gives.

One graph serves inference and training. It is captured in eval mode; ``Model.train_mode(True)``
flips the ``training`` flags of ``aten.batch_norm`` and ``aten.dropout`` in place (parameters are
shared, nothing is re-captured), which is exactly what a train-mode capture of the same module
yields. Passes rewrite ``model.gm`` and call ``model.recompile()``.

Held beside the graph: ``origin`` ("torch" or "onnx"), ``input_names``/``output_names``,
``param_names`` (graph attribute -> user name: module FQN or ONNX initializer), ``annotations``
(per node or parameter name: bits, mask, rank, group, ...), ``example_inputs`` and
``dynamic_shapes``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx

from regc.errors import InputMismatchError

__all__ = ["Model", "param_bytes"]

_TRAIN_FLAG_ARG = {  # op -> positional index of its `training`/`train` flag
    torch.ops.aten.batch_norm.default: 5,
    torch.ops.aten.dropout.default: 2,
}


def param_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclasses.dataclass
class Model:
    """A captured model. Callable on torch tensors like the module it came from."""

    gm: fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    example_inputs: tuple[torch.Tensor, ...]
    origin: str = "torch"
    param_names: dict[str, str] = dataclasses.field(default_factory=dict)
    annotations: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    dynamic_shapes: Any = None

    # ---- running -------------------------------------------------------------------------------
    def __call__(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        self.check_inputs(args)
        out = self.gm(*args)
        if isinstance(out, (tuple, list)) and len(out) == 1:
            return out[0]
        return out

    def run(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run and always return a flat tuple of output tensors (in ``output_names`` order)."""
        self.check_inputs(args)
        out = self.gm(*args)
        if isinstance(out, torch.Tensor):
            return (out,)
        flat, _ = torch.utils._pytree.tree_flatten(out)
        return tuple(flat)

    def check_inputs(self, args: Sequence[Any]) -> None:
        """Raise ``InputMismatchError`` when inputs differ in count, rank, dtype or a static dim."""
        if len(args) != len(self.input_names):
            raise InputMismatchError(
                f"model takes {len(self.input_names)} inputs {self.input_names}, got {len(args)}"
            )
        for name, a, ex in zip(self.input_names, args, self.example_inputs):
            if not isinstance(a, torch.Tensor):
                raise InputMismatchError(f"input '{name}' must be a torch.Tensor, got {type(a).__name__}")
            if a.dtype != ex.dtype:
                raise InputMismatchError(f"input '{name}' has dtype {a.dtype}, the model expects {ex.dtype}")
            if a.dim() != ex.dim():
                raise InputMismatchError(
                    f"input '{name}' has shape {tuple(a.shape)}, the model expects rank {ex.dim()} "
                    f"like {tuple(ex.shape)}"
                )
            dyn = self.dynamic_dims(name)
            for i, (s, e) in enumerate(zip(a.shape, ex.shape)):
                if i not in dyn and s != e:
                    raise InputMismatchError(
                        f"input '{name}' has shape {tuple(a.shape)}, the model expects {tuple(ex.shape)} "
                        f"(dim {i} is static; capture with dynamic_shapes to vary it)"
                    )

    def export_dynamic_shapes(self) -> Any:
        """``dynamic_shapes`` by position, as ``torch.export`` wants it when re-exporting ``gm``
        (whose forward takes positional arguments, whatever the original names were)."""
        ds = self.dynamic_shapes
        if isinstance(ds, dict):
            return tuple(ds.get(name) for name in self.input_names)
        return ds

    def dynamic_dims(self, name: str) -> set[int]:
        """Positions of the dims of input ``name`` that may vary (from ``dynamic_shapes``)."""
        ds = self.dynamic_shapes
        if ds is None:
            return set()
        if isinstance(ds, dict):
            spec = ds.get(name)
        else:
            idx = self.input_names.index(name)
            spec = ds[idx] if idx < len(ds) else None
        if spec is None:
            return set()
        if isinstance(spec, dict):
            return set(spec)
        return {i for i, d in enumerate(spec) if d is not None}

    # ---- mode ----------------------------------------------------------------------------------
    def train_mode(self, on: bool = True) -> "Model":
        """Switch BatchNorm statistics updates and dropout on or off (in place)."""
        changed = False
        for n in self.gm.graph.nodes:
            idx = _TRAIN_FLAG_ARG.get(n.target)
            if n.op == "call_function" and idx is not None and len(n.args) > idx and n.args[idx] != on:
                args = list(n.args)
                args[idx] = on
                n.args = tuple(args)
                changed = True
        if changed:
            self.gm.recompile()
        return self

    @property
    def training(self) -> bool:
        return any(
            n.op == "call_function" and n.target in _TRAIN_FLAG_ARG and n.args[_TRAIN_FLAG_ARG[n.target]]
            for n in self.gm.graph.nodes
        )

    # ---- parameters ----------------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self.gm.named_parameters()

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.gm.parameters()

    def get_tensor(self, target: str) -> torch.Tensor:
        """The parameter or buffer a ``get_attr`` node with this target reads."""
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def free_target(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``, ... : the first name no parameter or buffer uses yet."""
        taken = {k for k, _ in self.gm.named_parameters()} | {k for k, _ in self.gm.named_buffers()}
        cand, i = base, 0
        while cand in taken:
            i += 1
            cand = f"{base}_{i}"
        return cand

    def set_tensor(self, target: str, value: torch.Tensor, *, trainable: bool | None = None) -> None:
        """Create or replace the attribute behind ``target`` (a parameter unless ``trainable=False``)."""
        *path, leaf = target.split(".")
        mod: torch.nn.Module = self.gm
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        if trainable is None:
            trainable = value.is_floating_point()
        if leaf in mod._parameters:
            del mod._parameters[leaf]
        if leaf in mod._buffers:
            del mod._buffers[leaf]
        if trainable:
            mod.register_parameter(leaf, torch.nn.Parameter(value.detach().clone()))
        else:
            mod.register_buffer(leaf, value.detach().clone())

    def user_name(self, target: str) -> str:
        return self.param_names.get(target, target)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.gm.parameters())

    def weight_bytes(self) -> int:
        return sum(param_bytes(t) for t in self.gm.state_dict().values())

    # ---- graph helpers -------------------------------------------------------------------------
    def recompile(self) -> None:
        """Drop dead nodes and unused attributes, lint and recompile after a rewrite."""
        g = self.gm.graph
        g.eliminate_dead_code(is_impure_node=_is_impure)
        used = {n.target for n in g.nodes if n.op == "get_attr"}
        for name in [k for k, _ in self.gm.named_parameters()] + [k for k, _ in self.gm.named_buffers()]:
            if name not in used:
                _delete_attr(self.gm, name)
                self.param_names.pop(name, None)
        g.lint()
        self.gm.recompile()

    def clone(self) -> "Model":
        """A deep copy: graph, parameters and metadata."""
        return dataclasses.replace(
            self,
            gm=copy.deepcopy(self.gm),
            param_names=dict(self.param_names),
            annotations=copy.deepcopy(self.annotations),
        )

    def call_nodes(self) -> Iterator[fx.Node]:
        return (n for n in self.gm.graph.nodes if n.op == "call_function")

    def verify(self) -> None:
        """Check the graph is well formed; raise ``VerifyError`` (a pass bug) otherwise."""
        from regc.verify import verify_model

        verify_model(self)

    def print(self) -> str:
        """Stable text form for tests and ``--dump-ir``."""
        from regc.printer import print_model

        return print_model(self)

    def save(self, path: str) -> None:
        """Export to ONNX (through the registered exporter)."""
        from regc.plugins import exporter_for

        exporter_for(str(path))(self, str(path))


def _is_impure(node: fx.Node) -> bool:
    return node.op in ("placeholder", "output") or (node.op == "call_module" and node.target == "_guards_fn")


def _delete_attr(root: torch.nn.Module, target: str) -> None:
    *path, leaf = target.split(".")
    mod = root
    for part in path:
        mod = getattr(mod, part, None)
        if mod is None:
            return
    mod._parameters.pop(leaf, None)
    mod._buffers.pop(leaf, None)
    if hasattr(mod, leaf) and isinstance(getattr(mod, leaf), torch.Tensor):
        delattr(mod, leaf)
