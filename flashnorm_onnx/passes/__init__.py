"""onnx-ir passes of flashnorm-onnx."""

from flashnorm_onnx.passes.flashnorm_fold import FlashNormFoldPass, FlashNormPassResult

__all__ = ["FlashNormFoldPass", "FlashNormPassResult"]
