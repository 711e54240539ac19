"""One checked model file to one checked output: the fold's stages, or the int4 pipeline."""

from __future__ import annotations

import os
from pathlib import Path

from flashnorm_onnx.io import model_io
from flashnorm_onnx.pipeline.options import FoldOptions
from flashnorm_onnx.pipeline.report import FoldReport
from flashnorm_onnx.pipeline.stages import fold_file


def optimize_file(info: model_io.InputInfo, target: Path, options: FoldOptions, *,
                  report_path: str | os.PathLike | None = None, publish_output: bool = True) -> FoldReport:
    """One checked input model to one checked output path: the fold's stages, or with
    ``options.quantize`` the int4 pipeline (:mod:`flashnorm_onnx.pipeline.quantized`)."""
    if options.quantize is None:
        return fold_file(info, target, options, report_path=report_path, publish_output=publish_output)
    from flashnorm_onnx.pipeline.quantized import quantize_file

    return quantize_file(info, target, options, report_path=report_path, publish_output=publish_output)
