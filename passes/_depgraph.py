"""Dependency graph of prunable channels: which slices of which parameters must go together.

Channel labels (abstract interpretation). Every producer (conv, linear-like, embedding) gives each
output channel a fresh integer label; each graph value carries a label tensor of its own shape
holding, per element, the label of the channel it belongs to. Ops move labels by rule:

    shape ops (view, permute, cat, split, slice, flatten, ...)   run the op itself on the labels
    elementwise a (op) b                                        labels of a and b are coupled
    reductions over dims R (softmax, layer_norm, mean, ...)      all labels along R are coupled
    a @ b between activations (attention q k^T, p v)            all labels of a row and column coupled
    conv / linear                                               input labels -> weight in-slot; fresh out
    depthwise conv, batch_norm                                  labels pass through; params slotted

Coupled labels are edges of a networkx graph; a connected component is a *unit*: channels removed
all together or not at all (a residual channel across every block it touches; an attention head
across q, k, v and the output projection, because q k^T and p v contract inside a head). Units
produced by the same layer form a *group*, ranked together. The label 0 is the barrier: graph
inputs and outputs, constants, and every value an op without a rule touches are coupled to it, so
those channels are never cut (the op is named in ``warnings``). Before a unit is accepted it must be
removable as whole hyperplanes of every tensor it touches (else it is pinned, reason recorded).

Removing units slices every parameter slot (param, dim) at the kept labels and rewrites literal
sizes of shape ops (view shapes, split sizes, slice bounds, layer_norm shapes, depthwise groups).
The idea follows DepGraph (Fang et al., CVPR 2023); the labelling formulation is regc's own.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, Iterable

import networkx as nx
import torch
import torch.fx as fx

from regc.ir import Model
from regc.opclass import OpClass, conv_view, linear_view, op_class

__all__ = ["Slot", "Group", "DepGraph", "build_depgraph"]

aten = torch.ops.aten
BARRIER = 0
_KEY = 1 << 31  # a coupling pair (a, b) is stored as a * _KEY + b


@dataclasses.dataclass(frozen=True)
class Slot:
    """Dimension ``dim`` of parameter ``target`` is indexed by channel ``labels``.

    ``role`` is "out" where the slice makes the channel (filters, biases, norm affine) and "in"
    where a consumer reads it (input columns of the next layer).
    """

    target: str
    dim: int
    labels: torch.Tensor
    role: str
    layer: str


@dataclasses.dataclass
class Group:
    """Units produced by the same layer(s). ``members[i]`` = (slot, unit index per position or -1)."""

    name: str
    units: list[int]
    unit_width: int
    layers: list[str]
    members: list[tuple[Slot, torch.Tensor]]

    @property
    def kind(self) -> str:
        return "head" if self.unit_width > 1 else "channel"

    def reduce(self, scores: dict[str, torch.Tensor], role: str = "out") -> torch.Tensor:
        """Sum per-element ``scores[target]`` (param-shaped) over the unit's slots of ``role``."""
        out = torch.zeros(len(self.units), dtype=torch.float64)
        for slot, idx in self.members:
            s = scores.get(slot.target)
            if s is None or slot.role != role:
                continue
            dims = [d for d in range(s.dim()) if d != slot.dim]
            per = s.double().sum(dims) if dims else s.double()
            keep = idx >= 0
            out.index_add_(0, idx[keep], per[keep])
        return out


class _Prop:
    """Label propagation state: labels per node, coupling edges, slots, barriers."""

    def __init__(self, model: Model):
        self.model = model
        self.gm = model.gm
        self.labels: dict[fx.Node, Any] = {}
        self.next = 1
        self.pairs: list[torch.Tensor] = []
        self.slots: list[Slot] = []
        self.producers: list[tuple[str, torch.Tensor]] = []
        self.warnings: list[str] = []
        self.vals = _concrete_values(model)

    # ---- primitives ----------------------------------------------------------------------------
    def fresh(self, n: int) -> torch.Tensor:
        t = torch.arange(self.next, self.next + n)
        self.next += n
        return t

    def couple(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = _compact(*torch.broadcast_tensors(a, b))
        a, b = a.reshape(-1), b.reshape(-1)
        diff = a != b
        if bool(diff.any()):
            self.pairs.append(torch.unique(a[diff] * _KEY + b[diff]))

    def reduce(self, lab: torch.Tensor, dims: Iterable[int]) -> torch.Tensor:
        """Couple all labels along ``dims``; return one representative label per remaining index."""
        dims = sorted({d % lab.dim() for d in dims}) if lab.dim() else []
        if not dims:
            return lab
        keep = [d for d in range(lab.dim()) if d not in dims]
        flat = lab.permute(*keep, *dims).reshape(math.prod(lab.shape[d] for d in keep), -1)
        if flat.shape[1] == 0:
            return torch.zeros([lab.shape[d] for d in keep], dtype=torch.long)
        self.couple(flat[:, :1], flat)
        return flat[:, 0].reshape([lab.shape[d] for d in keep])

    def hyper(self, lab: torch.Tensor, dim: int) -> torch.Tensor:
        """One label per index of ``dim`` (coupling each hyperplane)."""
        return self.reduce(lab, [d for d in range(lab.dim()) if d != dim % lab.dim()])

    def slot(self, target: str | None, dim: int, labels: torch.Tensor, role: str, layer: str) -> None:
        if target is not None:
            self.slots.append(Slot(target, dim, labels.clone(), role, layer))

    def barrier(self, node: fx.Node, reason: str) -> Any:
        """Couple every input label to the barrier; the outputs get barrier labels. Warn when that
        blocks channels (an input carries labels other than the barrier)."""
        blocked = False
        for a in node.all_input_nodes:
            lab = self.labels.get(a)
            for t in lab if isinstance(lab, tuple) else (lab,):
                if isinstance(t, torch.Tensor) and bool((t != BARRIER).any()):
                    blocked = True
                    self.couple(t, torch.tensor(BARRIER))
        if blocked:
            self.warnings.append(f"{node.name} ({node.target}): {reason}")
        return _const_like(self.val(node))

    def lab(self, arg: Any) -> torch.Tensor | None:
        if not isinstance(arg, fx.Node):
            return None
        if arg in self.labels:
            return self.labels[arg]
        if arg.op == "get_attr":
            return _const_like(self.model.get_tensor(arg.target))
        return None

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(self.vals[node].shape)

    def val(self, node: fx.Node) -> Any:
        return self.vals.get(node)

    def layer(self, target: str) -> str:
        return self.model.user_name(target)


def _concrete_values(model: Model) -> dict[fx.Node, Any]:
    """Each node's value on the example inputs, tensors kept as empty tensors of the same shape."""
    vals: dict[fx.Node, Any] = {}

    def keep(n: fx.Node, out: Any) -> None:
        vals[n] = fx.node.map_aggregate(
            out, lambda v: torch.empty(v.shape, device="meta") if isinstance(v, torch.Tensor) else v)

    run_example(model, keep)
    return vals


def run_example(model: Model, on_node: Callable[[fx.Node, Any], None]) -> None:
    """Run the graph on the example inputs (eval mode, no grad), calling ``on_node(node, value)`` per node."""

    class _Rec(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            on_node(n, out)
            return out

    was_training = model.training
    model.train_mode(False)  # no BatchNorm statistics update
    try:
        with torch.no_grad():
            _Rec(model.gm).run(*model.example_inputs)
    finally:
        model.train_mode(was_training)


def _const_like(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return torch.full(tuple(int(s) for s in val.shape), BARRIER, dtype=torch.long)
    if isinstance(val, (tuple, list)):
        return tuple(_const_like(v) for v in val)
    return None


def _compact(*labs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Narrow to one index every dim along which none of ``labs`` (same shape) varies."""
    for d in range(labs[0].dim()):
        if not any(_varies(t, d) for t in labs):
            labs = tuple(t.narrow(d, 0, 1) for t in labs)
    return labs


def _along(vec: torch.Tensor, dim: int, shape: tuple[int, ...]) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = -1
    return vec.reshape(view).expand(shape)


def _varies(lab: torch.Tensor, dim: int) -> bool:
    if lab.shape[dim] <= 1 or lab.stride(dim) == 0:
        return False
    return bool((lab != lab.narrow(dim, 0, 1)).any())


# ---- rules: one function per op family ---------------------------------------------------------

def _apply(p: _Prop, node: fx.Node) -> Any:
    """Shape ops: run the op itself on the label tensors."""
    def conv(a: Any, contiguous: bool) -> Any:
        if isinstance(a, fx.Node):
            lab = p.lab(a)
            if isinstance(lab, torch.Tensor):
                return lab.contiguous() if contiguous else lab
            return p.val(a)
        return a
    try:  # labels are often expanded views (stride 0); copy only when the op needs it
        out = node.target(*fx.node.map_aggregate(node.args, lambda a: conv(a, False)),
                          **fx.node.map_aggregate(node.kwargs, lambda a: conv(a, False)))
    except RuntimeError:
        out = node.target(*fx.node.map_aggregate(node.args, lambda a: conv(a, True)),
                          **fx.node.map_aggregate(node.kwargs, lambda a: conv(a, True)))
    return tuple(out) if isinstance(out, list) else out


def _getitem(p: _Prop, node: fx.Node) -> Any:
    src, i = node.args
    lab = p.labels.get(src)
    return lab[i] if isinstance(lab, tuple) else p.barrier(node, "indexes a value without labels")


def _slice(p: _Prop, node: fx.Node) -> Any:
    step = node.args[4] if len(node.args) > 4 else 1
    return _apply(p, node) if step == 1 else p.barrier(node, "strided slice")


def _elementwise(p: _Prop, node: fx.Node) -> Any:
    """Broadcasting ops. A constant-label operand broadcast along a dim where another operand's labels
    vary (an attention mask over heads, a scalar) carries no channel and is left out; parameter and
    buffer operands become slots."""
    out_shape = p.shape(node)
    acts, params = [], []
    for a in node.all_input_nodes:
        if a.op == "get_attr":
            params.append(a)
        elif isinstance(p.labels.get(a), torch.Tensor):
            lab = p.labels[a]
            shp = (1,) * (len(out_shape) - lab.dim()) + tuple(lab.shape)
            full = torch.broadcast_to(lab.reshape(shp), out_shape)
            bdims = {d for d, (s, o) in enumerate(zip(shp, out_shape, strict=True)) if s == 1 and o > 1}
            acts.append((full, bdims))
    if not acts:
        return _const_like(p.val(node))
    vary = [{d for d in range(len(out_shape)) if _varies(f, d)} for f, _ in acts]
    part = []
    for i, (full, bdims) in enumerate(acts):
        const = full.numel() == 0 or bool((full == full.reshape(-1)[0]).all())
        passive = const and any(bdims & v for j, v in enumerate(vary) if j != i)
        if not passive:
            part.append(full)
    out = part[0]
    for other in part[1:]:
        p.couple(out, other)
    for a in params:
        val = p.model.get_tensor(a.target)
        off = len(out_shape) - val.dim()
        for d in range(val.dim()):
            if val.shape[d] > 1 and d + off >= 0 and _varies(out, d + off):
                p.slot(a.target, d, p.hyper(out, d + off), "out", p.layer(a.target))
    return out


def _reduce_dims(p: _Prop, node: fx.Node, dims: Any, keepdim: bool, same_shape: bool) -> torch.Tensor:
    lab = p.lab(node.args[0])
    if dims is None or dims == []:
        dims = list(range(lab.dim()))
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(d % lab.dim() for d in dims)
    rep = p.reduce(lab, dims)
    if same_shape or keepdim:
        for d in dims:
            rep = rep.unsqueeze(d)
    return rep.expand(lab.shape) if same_shape else rep


def _softmax(p: _Prop, node: fx.Node) -> torch.Tensor:
    return _reduce_dims(p, node, node.args[1], True, True)


def _reduction(p: _Prop, node: fx.Node) -> torch.Tensor:
    a = node.args
    dims = a[1] if len(a) > 1 else node.kwargs.get("dim")
    keep = a[2] if len(a) > 2 else node.kwargs.get("keepdim", False)
    return _reduce_dims(p, node, dims, bool(keep), False)


_POOL_DIMS = {aten.max_pool1d.default: 1, aten.avg_pool1d.default: 1, aten.max_pool2d.default: 2,
              aten.avg_pool2d.default: 2, aten.adaptive_avg_pool2d.default: 2, aten.max_pool3d.default: 3,
              aten.adaptive_avg_pool1d.default: 1, aten.adaptive_max_pool2d.default: 2,
              aten.max_pool2d_with_indices.default: 2, aten.max_pool3d_with_indices.default: 3}


def _pool(p: _Prop, node: fx.Node) -> torch.Tensor:
    k = _POOL_DIMS[node.target]
    lab = p.lab(node.args[0])
    rep = p.reduce(lab, range(lab.dim() - k, lab.dim()))
    return rep.reshape(*rep.shape, *([1] * k)).expand(p.shape(node))


def _pool_with_indices(p: _Prop, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor]:
    """max_pool with indices (ONNX MaxPool imports): values and argmax indices are both per channel."""
    k = _POOL_DIMS[node.target]
    lab = p.lab(node.args[0])
    rep = p.reduce(lab, range(lab.dim() - k, lab.dim()))
    out = rep.reshape(*rep.shape, *([1] * k)).expand(p.val(node)[0].shape)
    return out, out


def _contract(p: _Prop, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """Labels of a @ b (both activations): a row of a and a column of b share one unit."""
    ra = p.reduce(la, [-1])
    rb = p.reduce(lb, [-2])
    a, b = torch.broadcast_tensors(ra.unsqueeze(-1), rb.unsqueeze(-2))
    p.couple(a, b)
    return a.contiguous()


def _matmul(p: _Prop, node: fx.Node) -> Any:
    if linear_view(node, p.gm) is not None:
        return _linear(p, node)
    la, lb = p.lab(node.args[0]), p.lab(node.args[1])
    if la is None or lb is None or la.dim() < 2 or lb.dim() < 2:
        return p.barrier(node, "matmul of a vector or of a value without labels")
    return _contract(p, la, lb)


def _linear(p: _Prop, node: fx.Node) -> Any:
    v = linear_view(node, p.gm)
    if v is None:
        return p.barrier(node, "linear-like op whose weight is not a parameter")
    w = p.model.get_tensor(v.weight)
    n_out = w.shape[0] if v.layout == "out_in" else w.shape[1]
    in_labels = p.hyper(p.lab(v.input), -1)
    out = p.fresh(n_out)
    layer = p.layer(v.weight)
    in_dim, out_dim = (1, 0) if v.layout == "out_in" else (0, 1)
    p.slot(v.weight, in_dim, in_labels, "in", layer)
    p.slot(v.weight, out_dim, out, "out", layer)
    if v.bias is not None:
        b = p.model.get_tensor(v.bias)
        if b.dim() >= 1 and b.shape[-1] == n_out:
            p.slot(v.bias, b.dim() - 1, out, "out", layer)
        elif b.numel() != 1:
            return p.barrier(node, f"bias of shape {tuple(b.shape)}")
    p.producers.append((layer, out))
    shape = p.shape(node)
    return _along(out, len(shape) - 1, shape)


_CONV_GROUPS_ARG = {aten.convolution.default: 8, aten.conv_transpose1d.default: 6,
                    aten.conv_transpose2d.input: 6, aten.conv_transpose3d.input: 6}


def _conv(p: _Prop, node: fx.Node) -> Any:
    v = conv_view(node, p.gm)
    if v is None:
        return p.barrier(node, "convolution whose weight is not a parameter")
    w = p.model.get_tensor(v.weight)
    lab = p.lab(v.input)
    cdim = 0 if lab.dim() == w.dim() - 1 else 1
    in_labels = p.hyper(lab, cdim)
    groups = _conv_groups(node)
    layer = p.layer(v.weight)
    shape = p.shape(node)
    out_dim, in_dim = (1, 0) if v.transposed else (0, 1)
    if groups == 1:
        out = p.fresh(w.shape[out_dim])
        p.slot(v.weight, in_dim, in_labels, "in", layer)
        p.producers.append((layer, out))
    elif not v.transposed and groups == len(in_labels) == w.shape[0] and w.shape[1] == 1:
        out = in_labels  # depthwise: channel c in -> channel c out
    else:
        return p.barrier(node, f"grouped convolution (groups={groups})")
    p.slot(v.weight, out_dim, out, "out", layer)
    if v.bias is not None:
        p.slot(v.bias, 0, out, "out", layer)
    return _along(out, cdim, shape)


def _conv_groups(node: fx.Node) -> int:
    idx = _CONV_GROUPS_ARG.get(node.target, 6)
    if len(node.args) > idx:
        return int(node.args[idx])
    return int(node.kwargs.get("groups", 1))


def _embedding(p: _Prop, node: fx.Node) -> torch.Tensor:
    w_node = node.args[0]
    if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
        return p.barrier(node, "embedding table is not a parameter")
    out = p.fresh(p.model.get_tensor(w_node.target).shape[1])
    layer = p.layer(w_node.target)
    p.slot(w_node.target, 1, out, "out", layer)
    p.producers.append((layer, out))
    shape = p.shape(node)
    return _along(out, len(shape) - 1, shape)


def _batch_norm(p: _Prop, node: fx.Node) -> torch.Tensor:
    lab = p.lab(node.args[0])
    ch = p.hyper(lab, 1)
    for a in node.args[1:5]:
        if isinstance(a, fx.Node):
            p.slot(a.target, 0, ch, "out", p.layer(a.target))
    return lab


def _layer_norm(p: _Prop, node: fx.Node) -> torch.Tensor:
    """Statistics span the normalized dims, so their channels form one unit (never cut)."""
    lab = p.lab(node.args[0])
    k = len(node.args[1])
    out = _reduce_dims(p, node, list(range(lab.dim() - k, lab.dim())), True, True)
    params = node.args[2:4] if node.target is aten.layer_norm.default else node.args[2:3]
    for a in params:
        if isinstance(a, fx.Node):
            for d in range(p.model.get_tensor(a.target).dim()):
                p.slot(a.target, d, p.hyper(out, lab.dim() - k + d), "out", p.layer(a.target))
    return out


def _sdpa(p: _Prop, node: fx.Node) -> Any:
    """softmax(q k^T + mask) v: a head of q, k, v and the output is one unit."""
    a = node.args
    if node.kwargs.get("enable_gqa") or (len(a) > 7 and a[7]):
        return p.barrier(node, "grouped-query attention")
    q, k, v = (p.lab(x) for x in a[:3])
    scores = _contract(p, q, k.transpose(-1, -2))
    mask = a[3] if len(a) > 3 else node.kwargs.get("attn_mask")
    lm = p.lab(mask)
    if lm is not None:
        out_shape = torch.broadcast_shapes(scores.shape, lm.shape)
        lmb = torch.broadcast_to(lm, out_shape)
        bdims = {d for d in range(len(out_shape)) if (lm.dim() - len(out_shape) + d < 0
                 or lm.shape[lm.dim() - len(out_shape) + d] == 1) and out_shape[d] > 1}
        vary = {d for d in range(scores.dim()) if _varies(scores, d)}
        if not (bool((lmb == lmb.reshape(-1)[0]).all()) and bdims & vary):
            p.couple(scores, lmb)
    probs = p.reduce(scores, [-1]).unsqueeze(-1).expand(scores.shape)
    return _contract(p, probs, v)


def _passthrough(p: _Prop, node: fx.Node) -> Any:
    return p.lab(node.args[0])


def _ignore(p: _Prop, node: fx.Node) -> None:
    return None


Rule = Callable[[_Prop, fx.Node], Any]

_RULES: dict[Any, Rule] = {
    operator.getitem: _getitem,
    aten.slice.Tensor: _slice,
    aten.max_pool2d_with_indices.default: _pool_with_indices,
    aten.max_pool3d_with_indices.default: _pool_with_indices,
    aten.batch_norm.default: _batch_norm,
    aten.layer_norm.default: _layer_norm,
    aten.rms_norm.default: _layer_norm,
    aten.scaled_dot_product_attention.default: _sdpa,
    aten.embedding.default: _embedding,
    aten.softmax.int: _softmax,
    aten._softmax.default: _softmax,
    aten.log_softmax.int: _softmax,
    aten.mean.dim: _reduction,
    aten.sum.dim_IntList: _reduction,
    aten.amax.default: _reduction,
    aten.matmul.default: _matmul,
    aten.mm.default: _matmul,
    aten.bmm.default: _matmul,
    aten._unsafe_view.default: _apply,
    aten.narrow.default: _apply,
    aten.to.dtype: _passthrough,
    aten._to_copy.default: _passthrough,
    aten.alias.default: _passthrough,
    aten.detach.default: _passthrough,
    aten.where.self: _elementwise,
    aten.where.ScalarOther: _elementwise,
    aten.where.ScalarSelf: _elementwise,
    aten.rsub.Scalar: _elementwise,
    aten.rsub.Tensor: _elementwise,
    aten.masked_fill.Scalar: _elementwise,
    aten.maximum.default: _elementwise,
    aten.minimum.default: _elementwise,
    aten.sym_size.int: _ignore,
    aten._assert_tensor_metadata.default: _ignore,
    aten._assert_scalar.default: _ignore,
}
_CLASS_RULES: dict[OpClass, Rule] = {
    OpClass.CONV: _conv,
    OpClass.LINEAR: _linear,
    OpClass.ELEMENTWISE: _elementwise,
    OpClass.SHAPE: _apply,
    OpClass.POOL: _pool,
}


def _rule(node: fx.Node, gm: fx.GraphModule) -> Rule | None:
    if node.target in _RULES:
        return _RULES[node.target]
    if node.target in _POOL_DIMS:
        return _pool
    return _CLASS_RULES.get(op_class(node, gm))


# ---- shape-argument rewriters (literal sizes that follow pruned dims) ----------------------------

def _rw_shape_arg(node: fx.Node, new: Callable[[fx.Node, int], int]) -> None:
    old = node.args[1]
    sizes = [s if not isinstance(s, int) or s == -1 else new(node, i) for i, s in enumerate(old)]
    node.args = (node.args[0], sizes, *node.args[2:])


def _rw_split(node: fx.Node, pieces: list[int]) -> None:
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    node.target = aten.split_with_sizes.default
    node.args = (node.args[0], pieces, dim)
    node.kwargs = {}


class DepGraph:
    """The analysis result: groups of prunable units, pinned reasons, and the removal mechanism."""

    def __init__(self, model: Model, prop: _Prop, root: torch.Tensor, pinned: dict[int, str],
                 groups: list[Group]):
        self.model = model
        self._prop = prop
        self.root = root
        self.pinned = pinned
        self.groups = groups
        self.warnings = prop.warnings

    def remove(self, units: Iterable[int]) -> dict[str, dict[str, int]]:
        """Physically remove ``units`` (ids from ``Group.units``); return per-layer before/after sizes."""
        removed = torch.zeros(len(self.root), dtype=torch.bool)
        units = list(units)
        if not units:
            return {}
        removed[torch.tensor(units)] = True
        gone = removed[self.root]  # raw label -> removed?
        before = _layer_sizes(self.model)
        self._rewrite_shapes(gone)
        keep: dict[tuple[str, int], torch.Tensor] = {}
        for s in self._prop.slots:
            k = ~gone[s.labels]
            keep[(s.target, s.dim)] = keep.get((s.target, s.dim), k) & k
        by_target: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for (t, d), k in keep.items():
            if not bool(k.all()):
                by_target.setdefault(t, []).append((d, k))
        with torch.no_grad():
            for t, dims in by_target.items():
                val = self.model.get_tensor(t).detach()
                for d, k in dims:
                    val = val.index_select(d, k.nonzero().flatten())
                trainable = isinstance(self.model.get_tensor(t), torch.nn.Parameter)
                self.model.set_tensor(t, val, trainable=trainable)
                _slice_mask(self.model, t, dims)
        self.model.recompile()
        after = _layer_sizes(self.model)
        return {name: {**{f"{k}_before": v for k, v in before[name].items()},
                       **{f"{k}_after": v for k, v in after.get(name, before[name]).items()}}
                for name in before if before[name] != after.get(name)}

    def _rewrite_shapes(self, gone: torch.Tensor) -> None:
        labels = self._prop.labels

        def kept(lab: torch.Tensor, dim: int) -> torch.Tensor:
            g = gone[lab]
            others = [d for d in range(lab.dim()) if d != dim % lab.dim()]
            return ~(g.all(dim=others) if others else g)

        def new_size(n: fx.Node, i: int) -> int:
            return int(kept(labels[n], i).sum())

        for n in list(self.model.gm.graph.nodes):
            lab = labels.get(n)
            if n.op != "call_function" or lab is None:
                continue
            t = n.target
            if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default):
                if tuple(new_size(n, i) for i in range(lab.dim())) != tuple(lab.shape):
                    _rw_shape_arg(n, new_size)
            elif t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
                dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
                pieces = [int(kept(x, dim).sum()) for x in lab]
                if pieces != [x.shape[dim] for x in lab]:
                    _rw_split(n, pieces)
            elif t in (aten.slice.Tensor, aten.select.int, aten.narrow.default):
                src = labels.get(n.args[0])
                if src is None:  # a constant the graph reads (e.g. a position-id buffer): no channels
                    continue
                dim = n.args[1] % src.dim()
                k = kept(src, dim)
                if bool(k.all()):
                    continue
                before = torch.cat([torch.zeros(1, dtype=torch.long), k.long().cumsum(0)])
                args = list(n.args)
                size = src.shape[dim]
                if t is aten.select.int:
                    args[2] = int(before[args[2] % size])
                elif t is aten.narrow.default:
                    start = args[2] % size
                    args[2], args[3] = int(before[start]), int(before[start + args[3]] - before[start])
                else:
                    start = 0 if len(args) < 3 or args[2] is None else args[2]
                    end = size if len(args) < 4 or args[3] is None else args[3]
                    start, end = (max(0, min(size, s + size if s < 0 else s)) for s in (start, end))
                    args[2:4] = [int(before[start]), int(before[end])]
                n.args = tuple(args)
            elif t in (aten.layer_norm.default, aten.rms_norm.default):
                src = labels[n.args[0]]
                k = len(n.args[1])
                n.args = (n.args[0], [int(kept(src, d).sum()) for d in range(src.dim() - k, src.dim())],
                          *n.args[2:])
            elif op_class(n) is OpClass.CONV and _conv_groups(n) > 1:
                src = labels[conv_view(n, self.model.gm).input]
                cdim = 0 if src.dim() == self.model.get_tensor(n.args[1].target).dim() - 1 else 1
                args = list(n.args) + [1] * max(0, _CONV_GROUPS_ARG.get(t, 6) + 1 - len(n.args))
                args[_CONV_GROUPS_ARG.get(t, 6)] = int(kept(src, cdim).sum())
                n.args = tuple(args)


def _slice_mask(model: Model, target: str, dims: list[tuple[int, torch.Tensor]]) -> None:
    """Keep a same-shaped ``annotations[target]["mask"]`` (ISS-P) in step with its sliced tensor."""
    ann = model.annotations.get(target, {})
    mask = ann.get("mask")
    if not isinstance(mask, torch.Tensor):
        return
    for d, k in dims:
        mask = mask.index_select(d, k.nonzero().flatten())
    ann["mask"] = mask
    if "sparsity" in ann:
        ann["sparsity"] = 1 - int(mask.sum()) / max(1, mask.numel())


def _layer_sizes(model: Model) -> dict[str, dict[str, int]]:
    """Per weighted layer (user name of its weight): out/in channels and parameter count."""
    sizes = {}
    for n in model.call_nodes():
        v = linear_view(n, model.gm) or conv_view(n, model.gm)
        if v is None:
            continue
        w = model.get_tensor(v.weight)
        b = model.get_tensor(v.bias).numel() if v.bias else 0
        if getattr(v, "layout", "out_in") == "in_out" or getattr(v, "transposed", False):
            out, inp = w.shape[1], w.shape[0]
        else:
            out, inp = w.shape[0], w.shape[1]
        sizes[model.user_name(v.weight)] = {"out": int(out), "in": int(inp), "params": int(w.numel() + b)}
    return sizes


def build_depgraph(model: Model) -> DepGraph:
    """Analyse ``model`` (not modified) into groups of prunable units."""
    p = _Prop(model)
    for node in model.gm.graph.nodes:
        if node.op == "placeholder":
            p.labels[node] = _const_like(p.val(node))
        elif node.op == "output":
            for a in node.all_input_nodes:
                lab = p.labels.get(a)
                for t in lab if isinstance(lab, tuple) else (lab,):
                    if isinstance(t, torch.Tensor):
                        p.couple(t, torch.tensor(BARRIER))
        elif node.op == "call_function":
            rule = _rule(node, model.gm)
            if rule is None:
                out = p.barrier(node, "no pruning rule for this op")
            else:
                try:
                    out = rule(p, node)
                except Exception as e:  # a rule that cannot follow this use: barrier, never a crash
                    out = p.barrier(node, f"rule failed: {type(e).__name__}: {e}")
            if out is not None:
                p.labels[node] = out
        elif node.op in ("call_module", "call_method") and node.target != "_guards_fn":
            p.labels[node] = p.barrier(node, "module or method call")
    return _finish(model, p)


def _finish(model: Model, p: _Prop) -> DepGraph:
    g = nx.Graph()
    g.add_nodes_from(range(p.next))
    if p.pairs:
        keys = torch.unique(torch.cat(p.pairs))
        g.add_edges_from(zip((keys // _KEY).tolist(), (keys % _KEY).tolist(), strict=True))
    roots = list(range(p.next))
    for comp in nx.connected_components(g):
        r = min(comp)
        for i in comp:
            roots[i] = r
    root = torch.tensor(roots)
    pinned: dict[int, str] = {BARRIER: "barrier"}
    for node, lab in p.labels.items():
        for t in lab if isinstance(lab, tuple) else (lab,):
            if isinstance(t, torch.Tensor) and t.numel() > 1:
                for c, why in _unclean(root[_compact(t)[0]], node.name).items():
                    pinned.setdefault(c, why)
    for s in p.slots:
        r = root[s.labels]
        if r.numel() and bool((r == r[0]).all()) and len(r) > 1:
            pinned.setdefault(int(r[0]), f"fills all of {s.target} dim {s.dim}")
    # groups: units made by the same producer(s)
    gg = nx.Graph()
    for layer, out in p.producers:
        units = [int(u) for u in torch.unique(root[out]) if int(u) not in pinned]
        for u in units:
            gg.add_node(u)
            gg.nodes[u].setdefault("layers", set()).add(layer)
        gg.add_edges_from(zip(units, units[1:], strict=False))
    groups = []
    for comp in sorted(nx.connected_components(gg), key=min):
        units = sorted(comp)
        if len(units) < 2:
            continue
        uid = torch.full((p.next,), -1, dtype=torch.long)
        uid[torch.tensor(units)] = torch.arange(len(units))
        members = [(s, uid[root[s.labels]]) for s in p.slots if bool((uid[root[s.labels]] >= 0).any())]
        layers = sorted({lay for u in units for lay in gg.nodes[u]["layers"]})
        first = next(i for s, i in members if s.role == "out" and s.layer in layers)
        name = layers[0] if len(layers) == 1 else f"{layers[0]} (+{len(layers) - 1})"
        groups.append(Group(name, units, int((first == 0).sum()), layers, members))
    return DepGraph(model, p, root, pinned, groups)


def _unclean(cls: torch.Tensor, where: str) -> dict[int, str]:
    """Classes that are not whole hyperplanes of this tensor, or that fill all of it."""
    covered = torch.zeros(cls.shape, dtype=torch.bool)
    for d in range(cls.dim()):
        others = [o for o in range(cls.dim()) if o != d]
        if others:
            lo, hi = cls.amin(dim=others), cls.amax(dim=others)
        else:
            lo = hi = cls
        const = torch.where(lo == hi, lo, torch.full_like(lo, -1))
        covered |= cls == _along(const, d, tuple(cls.shape))
    out = {int(c): f"not a whole slice of {where}" for c in torch.unique(cls[~covered])}
    if cls.numel() == 1:
        out.setdefault(int(cls.reshape(-1)[0]), f"fills all of {where}")
    return out
