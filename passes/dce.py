"""dce: remove nodes whose results nothing uses, and parameters nothing reads (exact)."""

from __future__ import annotations

import dataclasses

from regc.ir import Model
from regc.registry import PassContext, PassResult, Phase, register_pass


@dataclasses.dataclass(frozen=True)
class DceConfig:
    """Options for `dce` (none)."""


@register_pass("dce", DceConfig, phase=Phase.CANONICALIZE, exact=True)
def dce(model: Model, config: DceConfig, ctx: PassContext) -> PassResult:
    """Dead-code elimination: drop unused nodes and unread parameters/buffers."""
    nodes_before = len(model.gm.graph.nodes)
    state_before = len(model.gm.state_dict())
    model.recompile()
    removed_nodes = nodes_before - len(model.gm.graph.nodes)
    removed_state = state_before - len(model.gm.state_dict())
    return PassResult(model, bool(removed_nodes or removed_state),
                      {"removed_nodes": removed_nodes, "removed_tensors": removed_state})
