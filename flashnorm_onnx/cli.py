"""``flashnorm-onnx``: a thin command line over :mod:`flashnorm_onnx.api`."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import warnings
from typing import Callable

from flashnorm_onnx import __version__
from flashnorm_onnx.errors import ORT_MISSING, FlashNormError, ProviderUnavailable, VerificationFailed

EPILOG_EXIT_CODES = """exit codes:
  0  success (also when there was nothing to fold)
  1  internal error (rerun with --debug and report the traceback)
  2  bad command-line arguments
  3  bad input model (missing, empty, not ONNX, truncated, bad external data)
  4  cannot write the output (would overwrite the input, not a folder, disk full)
  5  verification failed: the output would not compute the same function (nothing written)
  6  verification could not run the input model on generated inputs (try --dim, or --no-verify)
  7  ONNX Runtime not installed (pip install 'flashnorm-onnx[cpu]' or '[gpu]'), or the requested
     execution provider unavailable
  8  export: the exporter failed on the checkpoint
  9  verification did not finish within --verify-timeout seconds (nothing written)
"""


def version_text() -> str:
    """``--version``: this tool's version and what a bug report needs beside it (Python, onnx,
    onnx-ir, the ONNX Runtime package, its providers). Works without ONNX Runtime."""
    import importlib.metadata as md
    import platform

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    lines = [
        f"flashnorm-onnx {__version__}",
        f"python {platform.python_version()} ({platform.system()} {platform.machine()})",
    ]
    lines += [f"{dist} {version(dist) or 'not installed'}" for dist in ("onnx", "onnx-ir")]
    try:
        # which distributions install the `onnxruntime` module (onnxruntime, onnxruntime-gpu, ...)
        families = sorted(set(md.packages_distributions().get("onnxruntime", [])))
    except Exception:  # pragma: no cover - unreadable metadata
        families = []
    try:
        import onnxruntime as ort
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "onnxruntime":
            lines.append("onnxruntime not installed (pip install 'flashnorm-onnx[cpu]' or 'flashnorm-onnx[gpu]')")
        else:
            from flashnorm_onnx.errors import first_line

            lines.append(f"onnxruntime cannot be imported: {first_line(e)}")
        return "\n".join(lines)
    module = getattr(ort, "__version__", "?")
    if families:
        lines += [f"{dist} {version(dist) or '?'} (module onnxruntime {module})" for dist in families]
    else:
        lines.append(f"onnxruntime {module} (no package metadata)")
    if len(families) > 1:
        lines.append(f"warning: {' and '.join(families)} are both installed and overwrite each other's "
                     "onnxruntime module: uninstall all of them, then install one")
    try:
        providers = ", ".join(ort.get_available_providers())
    except Exception as e:  # pragma: no cover - a broken build
        providers = f"unavailable ({type(e).__name__})"
    lines.append(f"onnxruntime providers: {providers}")
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked (it imports onnxruntime)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def _dims(values: list[str] | None) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in values or []:
        name, sep, number = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--dim expects NAME=VALUE, got '{item}'")
        try:
            dims[name] = int(number)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--dim {item}: '{number}' is not an integer") from None
        if dims[name] < 0:
            raise argparse.ArgumentTypeError(f"--dim {item}: a dimension cannot be negative")
        if dims[name] == 0:
            raise argparse.ArgumentTypeError(f"--dim {item}: a dimension must be at least 1 (0 makes empty "
                                             "inputs, and comparing empty outputs proves nothing)")
    return dims


def _number(option: str, text: str | None, default: float | None = None) -> float | None:
    """A finite, non-negative float option, parsed here (not by argparse) so errors are one line."""
    import math

    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option}: '{text}' is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{option}: '{text}' must be a finite number >= 0")
    return value


def _add_fold_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-untie",
        action="store_true",
        help="skip a norm whose linear weight is also read elsewhere (e.g. an lm_head tied to the "
        "embedding) instead of folding into a new, untied copy of that weight",
    )
    p.add_argument(
        "--keep-structure",
        action="store_true",
        help="keep decomposed norm chains as they are and only set their scale to ones "
        "(default: replace each chain by one fused SimplifiedLayerNormalization / RMSNormalization "
        "/ LayerNormalization kernel)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashnorm-onnx",
        description="FlashNorm for ONNX: fold each normalization's scale (and LayerNorm bias) into "
        "the linear layers it feeds, so the norm becomes weightless; verify the result in ONNX Runtime.",
        epilog=EPILOG_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of flashnorm-onnx, onnx, onnx-ir and onnxruntime, and "
                        "ONNX Runtime's providers, then exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    _add_fold_options(opt)
    opt.add_argument("--for-ort", action="store_true",
                     help="the fastest form for ONNX Runtime: first apply onnxscript's ORT fusions (RMSNorm, "
                     "skip-RMSNorm, rotary embedding, attention as MultiHeadAttention with the mask as its bias (not "
                     "GroupQueryAttention, which would drop the mask), FusedMatMul), then fold the fused graph. "
                     "The output uses com.microsoft operators (ONNX Runtime only) and is verified as a whole "
                     "against MODEL in ONNX Runtime; the report lists the fusions applied")
    q = opt.add_argument_group(
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
    q.add_argument("--requantize", action="store_true",
                   help="MODEL is int4: dequantize the MatMulNBits weights a norm feeds, fold, and quantize "
                   "them again with each node's own block size, symmetry and accuracy level. Not exact: the "
                   "added error is reported per weight and for the model")
    opt.add_argument("--no-verify", action="store_true", help="skip verification")
    opt.add_argument(
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
    opt.add_argument(
        "--dim",
        action="append",
        metavar="NAME=VALUE",
        help="value for a symbolic input dimension during verification, e.g. --dim batch=2 --dim sequence=16",
    )
    opt.add_argument("--rtol", metavar="X", help="verification tolerance relative to each output's magnitude "
                     "(default: 1e-4 for float32 outputs, 2e-2 for float16)")
    opt.add_argument("--verify-timeout", metavar="SECONDS", help="wall-clock limit for the ONNX Runtime "
                     "verification; past it, exit 9 and write nothing (default: 600; 0: no limit)")
    opt.add_argument("--report", metavar="JSON", help="also write the report as JSON")
    opt.add_argument("--in-place", action="store_true", help="replace MODEL itself (written atomically)")
    opt.add_argument("--force-write", action="store_true", help="write the output even when nothing was folded")
    opt.add_argument("-q", "--quiet", action="store_true",
                     help="print only the summary line and the verification verdict line")

    ins = sub.add_parser(
        "inspect",
        help="print what optimize would fold or skip, and why; write nothing",
        description=textwrap.fill("Analyse MODEL: every normalization, its form, what reads it, and whether it "
                                  "would be folded or skipped (with the reason). Writes nothing.", 79),
        epilog=EPILOG_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ins.add_argument("model", help="input .onnx file")
    _add_fold_options(ins)
    ins.add_argument("--report", metavar="JSON", help="also write the analysis as JSON")

    _register_extensions(sub)
    for p in {id(p): p for p in sub.choices.values()}.values():
        # `flashnorm-onnx optimize m.onnx --debug` as well as `flashnorm-onnx --debug optimize m.onnx`;
        # SUPPRESS: when not given after the command, the one before it (or False) stands
        if "--debug" not in p._option_string_actions:
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show tracebacks and debug logging (also accepted before the command)")
    return parser


def _register_extensions(sub) -> None:
    """Subcommands that live in their own modules (profile, export)."""
    for module_name in ("flashnorm_onnx.profile_cli", "flashnorm_onnx.export_cli"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ImportError:
            continue
        module.register(sub)


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


def _cmd_optimize(args) -> int:
    # bad option values: one line, exit 2, before anything is imported or read
    dims = _dims(args.dim)
    rtol = _number("--rtol", args.rtol)
    verify_timeout = _number("--verify-timeout", args.verify_timeout, default=600.0) or None
    spec = _quant_spec(args)
    from flashnorm_onnx.api import optimize

    try:
        report = optimize(
            args.model,
            args.output,
            untie=not args.no_untie,
            keep_structure=args.keep_structure,
            verify=not args.no_verify,
            verify_mode=args.verify,
            dims=dims,
            rtol=rtol,
            verify_timeout=verify_timeout,
            report_path=args.report,
            in_place=args.in_place,
            force_write=args.force_write,
            progress=_progress_factory(True),
            for_ort=args.for_ort,
            quantize=spec,
            quantize_order=args.quantize_order,
            requantize=args.requantize,
        )
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
                                           ("--quantize-order", args.quantize_order is not None)) if given]
    if args.requantize and args.quantize:
        raise argparse.ArgumentTypeError("--requantize keeps the model's own int4 settings; do not combine it "
                                         "with --quantize")
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
    from flashnorm_onnx.quantize import GENAI_DEFAULTS, QuantSpec

    try:
        return QuantSpec(block_size=args.block_size or GENAI_DEFAULTS["block_size"],
                         symmetric=not args.asymmetric,
                         accuracy_level=GENAI_DEFAULTS["accuracy_level"] if args.accuracy_level is None
                         else args.accuracy_level)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--block-size: {e}") from None


def _quiet_text(report) -> str:
    """``-q``: the summary and the verification verdict (the line a script checks)."""
    lines = [report.summary_line()]
    if report.verification is not None:
        lines.append(report.verification.lines()[0])
    quantized = getattr(report, "quant_verification", None)
    if quantized is not None:
        lines.append(quantized.lines()[0])
    return "\n".join(lines)


def _ort_missing(e: BaseException | None) -> bool:
    """Whether ``e`` comes from ``import onnxruntime`` failing (no ONNX Runtime family installed),
    directly or as the cause of the error raised in its place."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, ModuleNotFoundError) and e.name == "onnxruntime":
            return True
        seen.add(id(e))
        # the context too, even under `raise ... from None` (the subgraph check raises its one-line
        # error that way): a missing onnxruntime is the cause whatever error was raised in its place
        e = e.__cause__ or e.__context__
    return False


def _cmd_inspect(args) -> int:
    from flashnorm_onnx.api import inspect

    report = inspect(args.model, untie=not args.no_untie, keep_structure=args.keep_structure)
    print(report.text(planned=True))
    if args.report:
        from flashnorm_onnx.model_io import write_report

        write_report(report, args.report)
    return 0


COMMANDS = {"optimize": _cmd_optimize, "inspect": _cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentTypeError as e:  # pragma: no cover - argparse reports most itself
        parser.error(str(e))
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        # numpy's RuntimeWarnings (inf/nan in a weight) would break the one-line error contract;
        # the report and the verification say what matters. --debug shows them.
        warnings.simplefilter("ignore", RuntimeWarning)
    if args.command is None:
        parser.print_help()
        return 2
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    try:
        try:
            return int(handler(args) or 0)
        except Exception as e:
            if _ort_missing(e):  # one line naming what to install, exit 7, from every command
                raise ProviderUnavailable(ORT_MISSING) from e
            raise
    except argparse.ArgumentTypeError as e:
        print(f"flashnorm-onnx: error: {e}", file=sys.stderr)
        return 2
    except FlashNormError as e:
        if args.debug:
            raise
        print(f"flashnorm-onnx: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head`
        return 0
    except KeyboardInterrupt:
        print("flashnorm-onnx: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line, unless --debug
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"flashnorm-onnx: internal error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
