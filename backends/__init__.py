"""regc backends: ONNX export, TVM lowering, Triton kernels (torch.ops.regc.*).

Importing registers them with regc core."""

from regc.backends import triton  # noqa: F401  (registers torch.ops.regc.{int8,int4,table}_linear)
from regc.backends.onnx_export import export_onnx
from regc.backends.tvm_backend import TARGETS as _TVM_TARGETS
from regc.backends.tvm_tune import TUNE_COMMAND
from regc.plugins import register_command, register_exporter, register_target

register_exporter(".onnx", export_onnx)
for _t in _TVM_TARGETS:
    register_target(_t)
register_command(TUNE_COMMAND)

__all__ = ["export_onnx"]
