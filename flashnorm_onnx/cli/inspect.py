"""``flashnorm-onnx inspect``: what optimize would fold or skip, and why; writes nothing."""

from __future__ import annotations

import argparse
import textwrap

from flashnorm_onnx.cli.common import EPILOG_EXIT_CODES, add_fold_options


def register(sub) -> None:
    ins = sub.add_parser(
        "inspect",
        help="print what optimize would fold or skip, and why; write nothing",
        description=textwrap.fill("Analyse MODEL: every normalization, its form, what reads it, and whether it "
                                  "would be folded or skipped (with the reason). Writes nothing.", 79),
        epilog=EPILOG_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ins.add_argument("model", help="input .onnx file")
    add_fold_options(ins)
    ins.add_argument("--report", metavar="JSON", help="also write the analysis as JSON")

    ins.set_defaults(handler=run)


def run(args) -> int:
    from flashnorm_onnx.pipeline.api import inspect

    report = inspect(args.model, untie=not args.no_untie, keep_structure=args.keep_structure)
    print(report.text(planned=True))
    if args.report:
        from flashnorm_onnx.io.model_io import write_report

        write_report(report, args.report)
    return 0
