"""ONNX importer."""
