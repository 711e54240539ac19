"""``--quantize int4``: the fold and the quantization in the order asked for (or activation-aware, ``--calibrate``), each staged and checked."""

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
KEPT_MOVED = "kept g/s: read by int4 MatMulNBits; --calibrate moved s = {alpha} into their weights"
#: Tokens per calibration run (the text is cut into windows of this length).
CALIBRATION_WINDOW = 512


def quantize_file(info: model_io.InputInfo, target: Path, options: FoldOptions, *,
                  report_path: str | os.PathLike | None = None, publish_output: bool = True) -> FoldReport:
    """Fold and quantize in ``options.quantize_order``, each step staged and checked, then the int4
    output checked against the float input with measures that fit quantization. Tensors stream:
    one weight in memory at a time."""
    spec, order = options.quantize, options.quantize_order
    fold_options = options.replace(quantize=None, force_write=True, calibrate=None)
    plan = None
    if options.calibrate:
        order = "activation-aware"
        report, staged, stats, vocab, plan = _calibrated(info, target, spec, options, fold_options)
    else:
        report, staged, stats, vocab = _fold_and_quantize(info, target, spec, order, fold_options)
    try:
        _describe(report, stats, spec, order, plan)
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


def _describe(report: FoldReport, stats, spec, order: str, plan=None) -> None:
    summary = f"{stats.quantized} MatMul(s) to MatMulNBits"
    reason = ("fold-first: g folded into the float weights, then quantized" if order == "fold-first" else
              "quantize-first: weights quantized as exported; norms read by int4 linears keep their scale "
              "(folding g first measured worse at int4, docs/int4.md), float readers folded")
    if plan is not None:
        reason = _calibrated_reason(plan)
    report.quantization = dict(mode="quantize", order=order, spec=spec.describe(), summary=summary, reason=reason,
                               quantized=stats.quantized, left_float=stats.left_float,
                               weight_errors=dict(stats.weight_errors))
    if plan is not None:
        if stats.clips:
            report.notes.append(f"int4 weights clipped by --calibrate ({len(stats.clips)}): each value within one "
                                "quantization step of the weight clipped to its block's chosen range (at least "
                                f"{min(float(c.min()) for c in stats.clips.values()):g} of the block's own range)")
        report.quantization["calibration"] = plan.summary()
        report.quantization["calibration"].update(plan.calibration_info)
        chosen = {c.name: c.alpha for c in plan.choices}
        for d in report.decisions:
            if d.status == "skipped" and "MatMulNBits" in d.reason and d.name in chosen:
                d.reason = KEPT_MOVED.format(alpha=chosen[d.name])
        return
    if not stats.quantized:
        report.notes.append("no MatMul with a constant float weight of 16 rows or more: nothing quantized")
    if order == "quantize-first":
        for d in report.decisions:
            if d.status == "skipped" and "MatMulNBits" in d.reason:
                d.reason = KEPT_SCALE


# -- --calibrate: activation-aware int4 -------------------------------------------------------------


def _calibrated(info, target, spec, options: FoldOptions, fold_options: FoldOptions):
    """(report, staged int4 output, quantization stats, vocabulary sizes, plan): calibrate on the float
    model, choose each norm's scale and each block's clip, move the scales (the moved float model
    checked against the input in ONNX Runtime), quantize with the clips, fold the float readers."""
    from flashnorm_onnx.quantize import activation_aware, calibrate
    from flashnorm_onnx.quantize.int4 import quantize_model

    external = model_io.wants_external_data(info, info.tensor_bytes)
    model = model_io.load(info)
    vocab = vocab_sizes(model)
    values, rows, sites, not_moved = activation_aware.calibration_values(model)
    text, source = calibrate.read_text(None if options.calibrate is True else options.calibrate)
    feeds, tokens = _calibration_feeds(info, model, text, options, vocab)
    calibration = calibrate.collect(info.path, feeds, values, rows)
    plan = activation_aware.plan(model, sites, not_moved, calibration, spec, progress=options.progress_of("search"))
    plan.calibration_info = dict(text=source, tokens=tokens, runs=calibration.runs,
                                 calibration_seconds=calibration.seconds)
    moved = quantized = None
    try:
        moved = model_io.write_atomic(model, target, external, progress=options.progress_of("write"))
        del model
        plan.calibration_info["float_check"] = _check_moved(info, moved.model_path, options, vocab)
        model = model_io.load(model_io.check_input(moved.model_path))
        stats = quantize_model(model, spec, clips=plan.clips)
        quantized = model_io.write_atomic(model, target, external, progress=options.progress_of("write"))
        del model
        moved.abandon()
        moved = None
        report = fold_file(model_io.check_input(quantized.model_path), target, fold_options, publish_output=False)
        report.model = str(info.path)
        staged = report.staged
        quantized.abandon()
    except BaseException:
        for left in (moved, quantized):
            if left is not None:
                left.abandon()
        raise
    report.staged = None
    return report, staged, stats, vocab, plan


def _calibration_feeds(info, model, text: str, options: FoldOptions, vocab: dict[str, int]):
    """(feed dicts, token count): the text's tokens in windows of :data:`CALIBRATION_WINDOW`, each
    with the model's other inputs generated as the verification generates them (masks of ones,
    positions, an empty cache)."""
    import numpy as np

    from flashnorm_onnx.quantize.calibrate import CalibrationError, find_tokenizer, tokenize, windows
    from flashnorm_onnx.verify.inputs import Case, InputSpec, dims_from_configs, make_feeds

    token_inputs = [name for name in vocab if name in {v.name for v in model.graph.inputs}]
    if not token_inputs:
        raise CalibrationError("--calibrate reads a text: the model has no token-id input (an integer input "
                               "that indexes an embedding)")
    ids_input = next((n for n in token_inputs if "input_ids" in n), token_inputs[0])
    tokenizer = find_tokenizer(info.path, options.calibration_tokenizer)
    ids = tokenize(text, tokenizer, vocab.get(ids_input))
    specs = []
    for value in model.graph.inputs:
        shape = [None if d is None else (d if isinstance(d, int) else str(d)) for d in (value.shape or [])]
        specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), shape))
    dims = {**dims_from_configs(info.path), **(options.dims or {})}
    feeds = []
    for window in windows(ids, CALIBRATION_WINDOW):
        feed = make_feeds(specs, Case("calibration", batch=1, sequence=int(window.size)), dims, vocab)
        if list(feed[ids_input].shape) != [1, window.size]:
            raise CalibrationError(f"--calibrate: the model's '{ids_input}' input is not [batch, sequence]")
        feed[ids_input] = window.reshape(1, -1).astype(feed[ids_input].dtype)
        feeds.append(feed)
    return feeds, int(ids.size)


def _check_moved(info, moved_path, options: FoldOptions, vocab) -> str:
    """The float model with the scales moved must compute the input's function: both run whole in
    ONNX Runtime on generated inputs (the fold's own check). Too large to run twice in memory:
    skipped, and said so."""
    from flashnorm_onnx.verify import policy
    from flashnorm_onnx.verify.inputs import dims_from_configs
    from flashnorm_onnx.verify.whole import compare_models

    if not options.verify:
        return "skipped (--no-verify)"
    if not policy.fits_in_memory(info.tensor_bytes):
        return "skipped: the model is too large to run twice in memory"
    dims = {**dims_from_configs(info.path), **(options.dims or {})}
    result = compare_models(info.path, moved_path, dims=dims, vocab=vocab, rtol=options.rtol,
                            timeout=options.verify_timeout)
    if not result.passed:
        raise VerificationFailed(f"--calibrate: the float model with the scales moved does not compute the input's "
                                 f"function: {result.message}; no output written")
    return f"passed ({result.method}: the float model with the scales moved against the input)"


def _calibrated_reason(plan) -> str:
    totals = plan.objective_totals()
    alphas: dict[str, int] = {}
    for c in plan.choices:
        key = c.alpha.replace(", unclipped", "")
        alphas[key] = alphas.get(key, 0) + 1
    clips = plan.summary()["clips"]
    fold = totals["fold_first"]
    lines = [
        f"activation-aware (--calibrate on {plan.calibration_info['text']}, {plan.calibration_info['tokens']} "
        f"tokens, {plan.calibration_info['calibration_seconds']:.1f} s + search {plan.seconds:.1f} s): "
        f"{len(plan.choices)} norm scale(s) placed, {clips['clipped']} of {clips['blocks']} block(s) clipped "
        f"({100 * clips['clipped_share']:.1f}%)",
        "  scales chosen: " + ", ".join(f"{k} x{v}" for k, v in sorted(alphas.items())),
    ]
    if plan.pair_choices:
        kinds: dict[str, dict] = {}
        for c in plan.pair_choices:
            counts = kinds.setdefault(plan.pair_kinds.get(c.name, "up -> down"), {})
            counts[c.alpha] = counts.get(c.alpha, 0) + 1
        pt = plan.summary()["pair_objective_totals"]
        lines.append(f"  {len(plan.pair_choices)} scale(s) moved between linears: "
                     + "; ".join(f"{kind}: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
                                 for kind, counts in sorted(kinds.items()))
                     + f"; the second linears' output error {pt['chosen']:.4g} (round-to-nearest {pt['rtn']:.4g})")
    lines += [
        f"  calibration objective (readers' output error): {totals['chosen']:.4g} chosen, "
        f"{totals['quantize_first']:.4g} quantize-first" + (f", {fold:.4g} fold-first" if fold is not None else ""),
        f"  float check of the moved scales: {plan.calibration_info.get('float_check', 'not run')}",
    ]
    return "\n".join(lines)
