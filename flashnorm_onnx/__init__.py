"""flashnorm-onnx: FlashNorm weight folding for ONNX models, verified in ONNX Runtime.

    from flashnorm_onnx import optimize
    report = optimize("model.onnx", "model.flashnorm.onnx")

or as an onnx-ir pass in a pipeline::

    from flashnorm_onnx import FlashNormFoldPass
    result = FlashNormFoldPass()(model)   # result.report.decisions
"""

__version__ = "0.1.0"

#: The public names, imported on first use (PEP 562): the command line starts without loading
#: onnx, onnx-ir and numpy for ``--help``, and chooses what it imports (see ``cli.main``).
_LAZY = {
    "inspect": "flashnorm_onnx.pipeline.api",
    "optimize": "flashnorm_onnx.pipeline.api",
    "FlashNormFoldPass": "flashnorm_onnx.passes",
    "FlashNormPassResult": "flashnorm_onnx.passes",
    "FoldOptions": "flashnorm_onnx.pipeline.options",
    "FoldReport": "flashnorm_onnx.pipeline.report",
    "NormDecision": "flashnorm_onnx.pipeline.report",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flashnorm_onnx' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])

__all__ = [
    "FlashNormFoldPass",
    "FlashNormPassResult",
    "FoldOptions",
    "FoldReport",
    "NormDecision",
    "__version__",
    "inspect",
    "optimize",
]
