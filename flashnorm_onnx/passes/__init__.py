"""onnx-ir passes of flashnorm-onnx."""

from flashnorm_onnx.passes.flashnorm_fold import FlashNormFoldPass
from flashnorm_onnx.passes.fold_result import FlashNormPassResult

__all__ = ["FlashNormFoldPass", "FlashNormPassResult"]
