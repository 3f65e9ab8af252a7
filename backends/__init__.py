"""regc backends: ONNX export, TVM lowering, Triton kernels. Importing registers them with regc core."""

from regc.backends.onnx_export import export_onnx
from regc.plugins import register_exporter

register_exporter(".onnx", export_onnx)

__all__ = ["export_onnx"]
