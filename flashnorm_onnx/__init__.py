"""flashnorm-onnx: FlashNorm weight folding for ONNX models, verified in ONNX Runtime.

    from flashnorm_onnx import optimize
    report = optimize("model.onnx", "model.flashnorm.onnx")

or as an onnx-ir pass in a pipeline::

    from flashnorm_onnx import FlashNormFoldPass
    result = FlashNormFoldPass()(model)   # result.report.decisions
"""

__version__ = "0.1.0"

from flashnorm_onnx.api import inspect, optimize  # noqa: E402
from flashnorm_onnx.passes import FlashNormFoldPass, FlashNormPassResult  # noqa: E402
from flashnorm_onnx.report import FoldReport, NormDecision  # noqa: E402

__all__ = [
    "FlashNormFoldPass",
    "FlashNormPassResult",
    "FoldReport",
    "NormDecision",
    "__version__",
    "inspect",
    "optimize",
]
