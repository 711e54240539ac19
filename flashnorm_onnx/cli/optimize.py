"""``flashnorm-onnx optimize``: fold, verify and write one model or a folder."""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Callable

from flashnorm_onnx.cli.common import EPILOG_EXIT_CODES, add_fold_options, parse_dims, parse_number
from flashnorm_onnx.errors import VerificationFailed


def register(sub) -> None:
    opt = sub.add_parser(
        "optimize",
        help="fold norms into linears, verify, write the output",
        description="Fold every foldable normalization of MODEL into the linear layers that read it, "
        "check the result against MODEL in ONNX Runtime (CPU) and write it. One line per norm says "
        "what it feeds and whether it was folded or skipped (and why).",
        epilog=EPILOG_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    opt.add_argument("model", help="input .onnx file, or a model folder (an optimum export, an onnxruntime-genai "
                     "folder): every .onnx model in it is folded and verified, its other files copied")
    opt.add_argument("-o", "--output", help="output .onnx path (default: MODEL.flashnorm.onnx beside the input); "
                     "for a folder input, the output folder (required)")
    add_fold_options(opt)
    opt.add_argument("--for-ort", action="store_true",
                     help="the fastest form for ONNX Runtime: first apply the exact ORT fusions (RMSNorm, "
                     "skip-RMSNorm, rotary embedding, grouped-query attention as GroupQueryAttention fed the mask "
                     "as its attention_bias, other attention as MultiHeadAttention with the mask as its bias, "
                     "FusedMatMul), then fold the fused graph. The output uses com.microsoft operators (ONNX "
                     "Runtime only) and is verified as a whole against MODEL in ONNX Runtime, padded batches "
                     "included; the report lists the fusions applied")
    opt.add_argument("--pack-linears", nargs="?", const="all", default=None, choices=("attention", "all", "none"),
                     help="with --for-ort: which MatMuls that read one value are packed into one MatMul and a Split, "
                     "as onnxruntime-genai's builder does (only weights no other node reads: nothing is copied). "
                     "'attention' (the default with --for-ort): the Q/K/V projections, which GroupQueryAttention "
                     "then reads as one packed tensor; 'all' (the flag alone): also gate/up and every other "
                     "group; 'none'. docs/for-ort.md has the measurements")
    _add_int4_options(opt)
    _add_verify_options(opt)
    opt.add_argument("--report", metavar="JSON", help="also write the report as JSON")
    opt.add_argument("--in-place", action="store_true", help="replace MODEL itself (written atomically)")
    opt.add_argument("--force-write", action="store_true", help="write the output even when nothing was folded")
    opt.add_argument("-q", "--quiet", action="store_true",
                     help="print only the summary line and the verification verdict line")

    opt.set_defaults(handler=run)


def _add_int4_options(parser) -> None:
    q = parser.add_argument_group(
        "int4 (MatMulNBits)",
        textwrap.fill(
            "--quantize writes an int4 model (ONNX Runtime's block-wise round-to-nearest, the kernel of its "
            "MatMulNBitsQuantizer; defaults as onnxruntime-genai's model builder uses them). Every int4 weight is "
            "checked to be within one quantization step of the float weight it replaces, and the output is run "
            "against the float MODEL (relative error, cosine similarity, argmax agreement reported). "
            "--requantize folds into a model that is already int4.", 79))
    q.add_argument("--quantize", choices=["int4"], help="quantize every MatMul with a constant weight to int4")
    q.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="int4 block size along the input axis: 16, 32, 64, 128 or 256 (default: 32)")
    q.add_argument("--asymmetric", action="store_true",
                   help="asymmetric int4 (uint4 with a zero point per block; default: symmetric)")
    q.add_argument("--accuracy-level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits accuracy_level: the least precision its activations are computed in "
                   "(4: int8, 1: fp32, 0: the provider's choice; default: 4, the genai builder's CPU default)")
    q.add_argument("--quantize-order", choices=["quantize-first", "fold-first"], default=None,
                   help="quantize-first (default): quantize the weights as exported; norms read by int4 "
                   "linears keep their scale (no run-time cost: the norm kernel applies it), norms read by "
                   "float linears are folded. fold-first: fold g into the float weights, then quantize. "
                   "On SmolLM2-135M fold-first raised int4 perplexity at every block size and symmetry "
                   "tried (benchmarks/RESULTS_int4.md)")
    q.add_argument("--calibrate", nargs="?", const=True, default=None, metavar="TEXT",
                   help="activation-aware int4: run the float model on a calibration text (TEXT, a UTF-8 file; "
                   "without it, a bundled text of about a thousand tokens), then place each norm's scale between "
                   "the norm and its int4 readers and clip each int4 block, both chosen from the activations "
                   "(quantize-first and fold-first are among the choices; docs/int4.md). Give MODEL before it")
    q.add_argument("--tokenizer", metavar="JSON", default=None,
                   help="--calibrate: the tokenizer.json that reads the text (default: the one beside MODEL)")
    q.add_argument("--requantize", action="store_true",
                   help="MODEL is int4: dequantize the MatMulNBits weights a norm feeds, fold, and quantize "
                   "them again with each node's own block size, symmetry and accuracy level. Not exact: the "
                   "added error is reported per weight and for the model")


def _add_verify_options(parser) -> None:
    v = parser.add_argument_group("verification", "how the output is checked against MODEL before it is written")
    v.add_argument("--no-verify", action="store_true", help="skip verification")
    v.add_argument(
        "--verify",
        choices=["auto", "onnxruntime", "subgraph", "algebraic"],
        default="auto",
        help="how to verify. onnxruntime: run the whole input and output models in ONNX Runtime on "
        "generated inputs and compare every output. subgraph: cut each rewritten norm and each of "
        "its linears out of both files and run them in ONNX Runtime on random activations (memory "
        "bounded by the largest piece, any model size). algebraic: check each folded tensor's "
        "arithmetic only (cheap; does not run the rewritten graph). auto (default): onnxruntime when "
        "both models fit comfortably in memory, else subgraph plus algebraic",
    )
    v.add_argument(
        "--dim",
        action="append",
        metavar="NAME=VALUE",
        help="value for a symbolic input dimension during verification, e.g. --dim batch=2 --dim sequence=16",
    )
    v.add_argument("--rtol", metavar="X", help="verification tolerance relative to each output's magnitude "
                     "(default: 1e-4 for float32 outputs, 2e-2 for float16)")
    v.add_argument("--verify-timeout", metavar="SECONDS", help="wall-clock limit for the ONNX Runtime "
                     "verification; past it, exit 9 and write nothing (default: 600; 0: no limit)")


def _progress_factory(enabled: bool) -> Callable[[str, int, int], None] | None:
    if not enabled:
        return None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}
    labels = {"fold": "folding norms", "write": "writing tensors"}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=labels.get(stage, stage), unit="", leave=False,
                                     file=sys.stderr, disable=None)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return progress


def run(args) -> int:
    # bad option values: one line, exit 2, before anything is imported or read
    dims = parse_dims(args.dim)
    rtol = parse_number("--rtol", args.rtol)
    verify_timeout = parse_number("--verify-timeout", args.verify_timeout, default=600.0) or None
    spec = _quant_spec(args)
    from flashnorm_onnx.pipeline.api import optimize
    from flashnorm_onnx.pipeline.options import FoldOptions

    options = FoldOptions(
        untie=not args.no_untie, keep_structure=args.keep_structure, for_ort=args.for_ort,
        pack_linears=args.pack_linears or "attention",
        verify=not args.no_verify, verify_mode=args.verify, dims=dims, rtol=rtol, verify_timeout=verify_timeout,
        quantize=spec, quantize_order=args.quantize_order, requantize=args.requantize,
        calibrate=args.calibrate, calibration_tokenizer=args.tokenizer, force_write=args.force_write, progress=_progress_factory(True),
    )
    try:
        report = optimize(args.model, args.output, options, report_path=args.report, in_place=args.in_place)
    except VerificationFailed as e:
        if e.report is not None:
            print(e.report.text())
        raise
    print(_quiet_text(report) if args.quiet else report.text())
    return 0


def _quant_spec(args):
    """``--quantize`` and its options as a QuantSpec (None without --quantize); one-line errors."""
    quant_only = [name for name, given in (("--block-size", args.block_size is not None),
                                           ("--asymmetric", args.asymmetric),
                                           ("--accuracy-level", args.accuracy_level is not None),
                                           ("--quantize-order", args.quantize_order is not None),
                                           ("--calibrate", args.calibrate is not None),
                                           ("--tokenizer", args.tokenizer is not None)) if given]
    if args.requantize and args.quantize:
        raise argparse.ArgumentTypeError("--requantize keeps the model's own int4 settings; do not combine it "
                                         "with --quantize")
    if args.pack_linears is not None and not args.for_ort:
        raise argparse.ArgumentTypeError("--pack-linears applies with --for-ort only")
    if args.requantize and args.for_ort:
        raise argparse.ArgumentTypeError("--requantize and --for-ort cannot be combined")
    if args.requantize and args.verify != "auto" and not args.no_verify:
        raise argparse.ArgumentTypeError(
            f"--verify {args.verify} does not apply with --requantize: its output is checked by quantization's "
            "measures (each rewritten int4 weight within one step, and the whole model against the input when "
            "it fits in memory)")
    if not args.quantize:
        if quant_only:
            raise argparse.ArgumentTypeError(f"{', '.join(quant_only)} only apply with --quantize int4")
        return None
    if args.for_ort:
        raise argparse.ArgumentTypeError("--quantize and --for-ort cannot be combined yet")
    _check_calibrate(args)
    from flashnorm_onnx.quantize.int4 import GENAI_DEFAULTS, QuantSpec

    try:
        return QuantSpec(block_size=args.block_size or GENAI_DEFAULTS["block_size"],
                         symmetric=not args.asymmetric,
                         accuracy_level=GENAI_DEFAULTS["accuracy_level"] if args.accuracy_level is None
                         else args.accuracy_level)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--block-size: {e}") from None


def _check_calibrate(args) -> None:
    """``--calibrate`` and ``--tokenizer``: one-line errors before anything runs."""
    from pathlib import Path

    if args.calibrate is None:
        if args.tokenizer is not None:
            raise argparse.ArgumentTypeError("--tokenizer only applies with --calibrate")
        return
    if args.quantize_order is not None:
        raise argparse.ArgumentTypeError("--calibrate chooses the scale placement itself (quantize-first and "
                                         "fold-first are among its choices): do not combine it with --quantize-order")
    if args.calibrate is not True and not Path(args.calibrate).is_file():
        raise argparse.ArgumentTypeError(f"--calibrate: calibration text '{args.calibrate}' not found")
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise argparse.ArgumentTypeError(f"--tokenizer: '{args.tokenizer}' not found")


def _quiet_text(report) -> str:
    """``-q``: the summary and the verification verdict (the line a script checks)."""
    lines = [report.summary_line()]
    if report.verification is not None:
        lines.append(report.verification.lines()[0])
    quantized = getattr(report, "quant_verification", None)
    if quantized is not None:
        lines.append(quantized.lines()[0])
    return "\n".join(lines)
