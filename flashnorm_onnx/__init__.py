"""flashnorm-onnx: FlashNorm weight folding for ONNX models, verified in ONNX Runtime."""

from flashnorm_onnx.passes import FlashNormFoldPass, FlashNormPassResult

__version__ = "0.1.0"
__all__ = ["FlashNormFoldPass", "FlashNormPassResult", "__version__"]
