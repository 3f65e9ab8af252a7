"""regc frontends: torch capture and the ONNX importer. Importing registers them with regc core."""

from regc.frontend.torch_capture import capture
from regc.plugins import provide, register_loader


def _load_onnx(path: str, **kw):
    from regc.frontend.onnx_import import load_onnx

    return load_onnx(path, **kw)


provide("capture", capture)
register_loader(".onnx", _load_onnx)

__all__ = ["capture"]
