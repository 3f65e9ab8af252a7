"""IR verifier: structural checks plus shape propagation with fake tensors.

Run after every pass (``Pipeline.run(verify=True)``). A failure is a pass bug, not a user error,
so it raises ``VerifyError`` naming the node. Shape propagation also refreshes ``node.meta["val"]``
so later passes see the shapes of nodes an earlier pass created.
"""

from __future__ import annotations

import torch
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from regc.errors import VerifyError

__all__ = ["verify_model", "refresh_meta"]


def refresh_meta(model) -> None:
    """Propagate fake tensors through the graph and store them in ``node.meta['val']``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(t) for t in model.example_inputs]
    FakeTensorProp(model.gm, mode).propagate(*fake_inputs)


def verify_model(model) -> None:
    gm = model.gm
    try:
        gm.graph.lint()
    except Exception as e:
        raise VerifyError(f"graph lint failed: {e}") from e
    state = dict(gm.named_parameters())
    state.update(gm.named_buffers())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(model.input_names):
        raise VerifyError(f"graph has {len(placeholders)} inputs, model declares {model.input_names}")
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in state and not _is_attr(gm, n.target):
            raise VerifyError(f"node '{n.name}' reads missing attribute '{n.target}'")
    for target in model.param_names:
        if target not in state:
            raise VerifyError(f"param_names names '{target}', which the graph does not hold")
    try:
        refresh_meta(model)
    except Exception as e:
        raise VerifyError(f"shape propagation failed: {type(e).__name__}: {e}") from e
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat, _ = torch.utils._pytree.tree_flatten(out.args[0])
    if len(flat) != len(model.output_names):
        raise VerifyError(f"graph has {len(flat)} outputs, model declares {model.output_names}")


def _is_attr(gm, target: str) -> bool:
    obj = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True
