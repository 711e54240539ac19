"""The Python API: ``optimize`` (fold, verify, write) and ``inspect`` (what would be folded).

The data flow, end to end::

    check the input and output paths -> load (lazy) -> [--for-ort: ORT fusions]
        -> analyse (a plan per norm) -> apply -> write to a hidden staging folder
        -> verify (whole, or piece by piece, and the plan-diff) -> write the report -> publish

one stage each in :mod:`flashnorm_onnx.pipeline.stages`; a folder is the same stages for each
model, then one publish (:mod:`flashnorm_onnx.pipeline.folder`). Nothing becomes visible unless
verification passed.
"""

from __future__ import annotations

import os
from pathlib import Path

from flashnorm_onnx.io import model_io
from flashnorm_onnx.passes import FlashNormFoldPass
from flashnorm_onnx.pipeline.options import FoldOptions
from flashnorm_onnx.pipeline.report import FoldReport
from flashnorm_onnx.pipeline.model import optimize_file
from flashnorm_onnx.pipeline.stages import infer_shapes


def optimize(model: str | os.PathLike, output: str | os.PathLike | None = None, options: FoldOptions | None = None,
             *, report_path: str | os.PathLike | None = None, in_place: bool = False, **choices):
    """Fold every foldable normalization of ``model`` and write the result to ``output``.

    ``options``: a :class:`~flashnorm_onnx.pipeline.options.FoldOptions`, or its fields as keywords
    (``untie``, ``keep_structure``, ``for_ort``, ``pack_linears``, ``verify``, ``verify_mode``, ``dims``, ``rtol``,
    ``verify_timeout``, ``quantize``, ``quantize_order``, ``calibrate``, ``calibration_tokenizer``, ``requantize``, ``force_write``,
    ``progress``), which override ``options``'s.

    ``model`` may be a folder (an optimum export, an onnxruntime-genai folder): every ``*.onnx``
    in it is folded and verified into the output folder, companions copied; the report then has
    one report per model (:class:`~flashnorm_onnx.pipeline.report.FolderReport`).

    Returns the report. Raises :class:`~flashnorm_onnx.errors.FlashNormError` subclasses for bad
    input, unwritable output and failed verification (nothing is published then)."""
    options = (options or FoldOptions()).replace(**choices)
    if Path(model).is_dir() and not in_place:
        from flashnorm_onnx.pipeline.folder import optimize_folder

        return optimize_folder(Path(model), output, options, report_path=report_path)
    info = model_io.check_input(model)
    if in_place:
        target = model_io.check_output(output or info.path, info, in_place=True)
    else:
        target = model_io.check_output(output or model_io.default_output_path(info.path), info)
    model_io.check_report_path(report_path, info, output=target)
    return optimize_file(info, target, options, report_path=report_path)


def inspect(model: str | os.PathLike, *, untie: bool = True, keep_structure: bool = False) -> FoldReport:
    """Analyse a model: what would be folded and what skipped, and why. Writes nothing."""
    info = model_io.check_input(model)
    ir_model = model_io.load(info)
    restore = infer_shapes(ir_model)
    fold = FlashNormFoldPass(untie=untie, keep_structure=keep_structure)
    report = FoldReport(decisions=fold.report_of(fold.analyse(ir_model)).decisions)  # the model is not touched
    restore()
    report.model = str(info.path)
    return report
