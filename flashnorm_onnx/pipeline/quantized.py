"""``--quantize int4``: the fold and the quantization in the order asked for, each staged and checked."""

from __future__ import annotations

import os
from pathlib import Path

from flashnorm_onnx.errors import VerificationFailed
from flashnorm_onnx.io import model_io
from flashnorm_onnx.pipeline.options import FoldOptions
from flashnorm_onnx.pipeline.report import FoldReport
from flashnorm_onnx.pipeline.stages import (
    check_int4_weights,
    fold_file,
    publish_report,
    verify_quantized,
    write_report,
)
from flashnorm_onnx.verify.inputs import vocab_sizes

KEPT_SCALE = ("kept its scale: read by int4 MatMulNBits (quantize-first keeps g in the norm, where it costs "
              "nothing; --quantize-order fold-first folds it before quantizing)")


def quantize_file(info: model_io.InputInfo, target: Path, options: FoldOptions, *,
                  report_path: str | os.PathLike | None = None, publish_output: bool = True) -> FoldReport:
    """Fold and quantize in ``options.quantize_order``, each step staged and checked, then the int4
    output checked against the float input with measures that fit quantization. Tensors stream:
    one weight in memory at a time."""
    spec, order = options.quantize, options.quantize_order
    fold_options = options.replace(quantize=None, force_write=True)
    report, staged, stats, vocab = _fold_and_quantize(info, target, spec, order, fold_options)
    try:
        _describe(report, stats, spec, order)
        check_int4_weights(report, stats, report_path)
        if options.verify:
            report.quant_verification = verify_quantized(info, staged.model_path, options, vocab)
            if not report.quant_verification.passed:
                report.notes.append("the quantized model failed its check: no output written")
                write_report(report, report_path)
                raise VerificationFailed(
                    f"the int4 model failed its check: {report.quant_verification.message}; no output written",
                    report=report)
        return publish_report(report, staged, target, report_path, publish_output)
    except BaseException:
        staged.abandon()
        raise


def _fold_and_quantize(info, target, spec, order, options: FoldOptions):
    """(report, staged int4 output, quantization stats, vocabulary sizes): the fold and the
    quantization in ``order``, the intermediate model staged and removed."""
    from flashnorm_onnx.quantize.int4 import quantize_model

    external = model_io.wants_external_data(info, info.tensor_bytes)
    intermediate = None
    try:
        if order == "fold-first":
            report = fold_file(info, target, options, publish_output=False)
            intermediate = report.staged
            model = model_io.load(model_io.check_input(intermediate.model_path))
            vocab = vocab_sizes(model)
            stats = quantize_model(model, spec)
            staged = model_io.write_atomic(model, target, external, progress=options.progress_of("write"))
        else:
            model = model_io.load(info)
            vocab = vocab_sizes(model)
            stats = quantize_model(model, spec)
            intermediate = model_io.write_atomic(model, target, external, progress=options.progress_of("write"))
            del model
            report = fold_file(model_io.check_input(intermediate.model_path), target, options, publish_output=False)
            report.model = str(info.path)
            staged = report.staged
        intermediate.abandon()
    except BaseException:
        if intermediate is not None:
            intermediate.abandon()
        raise
    report.staged = None
    return report, staged, stats, vocab


def _describe(report: FoldReport, stats, spec, order: str) -> None:
    summary = f"{stats.quantized} MatMul(s) to MatMulNBits"
    reason = ("fold-first: g folded into the float weights, then quantized" if order == "fold-first" else
              "quantize-first: weights quantized as exported; norms read by int4 linears keep their scale "
              "(folding g first measured worse at int4, docs/int4.md), float readers folded")
    report.quantization = dict(mode="quantize", order=order, spec=spec.describe(), summary=summary, reason=reason,
                               quantized=stats.quantized, left_float=stats.left_float,
                               weight_errors=dict(stats.weight_errors))
    if not stats.quantized:
        report.notes.append("no MatMul with a constant float weight of 16 rows or more: nothing quantized")
    if order == "quantize-first":
        for d in report.decisions:
            if d.status == "skipped" and "MatMulNBits" in d.reason:
                d.reason = KEPT_SCALE
