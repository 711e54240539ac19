"""ONNX Runtime fusions applied before the fold (--for-ort)."""
