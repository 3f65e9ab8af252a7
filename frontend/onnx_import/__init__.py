"""ONNX importer: ``load_onnx("model.onnx") -> regc.Model`` (registered for ``regc.load``).

    m = load_onnx("model.onnx")                                  # dims without a fixed size are dynamic
    m = load_onnx("model.onnx", constant_inputs={"shape": arr})  # fold an input used as a shape

The file is read safely (``_reader``), each node is mapped by the rule table (``_ops_*``) onto torch
calls, and torch.export captures the result as the ATen graph that ``regc.Model`` wraps.
"""

from regc.frontend.onnx_import._capture import constant_input_names, import_model, load_onnx, supported_ops

__all__ = ["load_onnx", "import_model", "constant_input_names", "supported_ops"]
