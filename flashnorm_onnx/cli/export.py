"""``flashnorm-onnx export``: checkpoint -> exported, folded, verified ONNX folder."""

from __future__ import annotations

import sys


def register(sub) -> None:
    import argparse
    import textwrap

    from flashnorm_onnx.cli.common import EPILOG_EXIT_CODES
    from flashnorm_onnx.pipeline.export import TASKS

    p = sub.add_parser(
        "export",
        help="export a transformers checkpoint to ONNX, fold it, verify it",
        description=textwrap.fill(  # the raw formatter (for the exit codes) does not wrap it
            "Export PATH_OR_ID (a local transformers folder, or a hub id already in the local "
            "cache: nothing is downloaded) with optimum's exporter or torch.onnx dynamo, fold every "
            "foldable norm, verify in ONNX Runtime, and write OUTDIR with model.onnx (+ data), the config "
            "and tokenizer files, and flashnorm_report.json. OUTDIR loads in optimum's ORTModel classes. "
            "Encoder-decoder tasks (T5, BART, Whisper; optimum only) write encoder_model.onnx, "
            "decoder_model.onnx and, with past, decoder_with_past_model.onnx, each folded and verified "
            "(nothing is written unless every model passes); OUTDIR loads in ORTModelForSeq2SeqLM / "
            "ORTModelForSpeechSeq2Seq.", 79),
        epilog=EPILOG_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="PATH_OR_ID",
                   help="a local transformers checkpoint folder (with config.json), or a hub id already in "
                   "the local Hugging Face cache (nothing is downloaded)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="output folder (created; an existing file there is an error, exit 4)")
    p.add_argument("--exporter", choices=["optimum", "dynamo"], default="optimum",
                   help="optimum: optimum-onnx's exporter (KV cache with the -with-past tasks); "
                   "dynamo: torch.onnx.export(dynamo=True), no KV cache, no encoder-decoder task "
                   "(default: optimum)")
    p.add_argument("--task", choices=TASKS, default="text-generation-with-past", metavar="TASK",
                   help="what the exported model computes: text-generation (logits), "
                   "text-generation-with-past (logits with past key/values inputs and outputs), "
                   "feature-extraction (the last hidden state); encoder-decoder, optimum only: "
                   "text2text-generation (T5, BART: encoder_model.onnx + decoder_model.onnx), "
                   "automatic-speech-recognition (Whisper: the same two), "
                   "text2text-generation-with-past and automatic-speech-recognition-with-past "
                   "(+ decoder_with_past_model.onnx, the KV-cache decoder) "
                   "(default: text-generation-with-past)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="weights and activations of the export (default: fp32; fp16 is verified with the "
                   "16-bit tolerance)")
    p.add_argument("--opset", type=int, help="ONNX opset for the export (default: the exporter's)")
    p.add_argument("--no-untie", action="store_true", help="skip norms whose weight is shared instead of untying")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime comparison")
    p.set_defaults(handler=run)


def run(args) -> int:
    if not args.no_verify:
        # the check runs ONNX Runtime: without it, stop now (exit 7) rather than after the export
        import importlib

        importlib.import_module("onnxruntime")

    from flashnorm_onnx.pipeline.export import export

    report = export(
        args.model, args.output, exporter=args.exporter, task=args.task, dtype=args.dtype, opset=args.opset,
        untie=not args.no_untie, verify=not args.no_verify,
        status=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(report.text())
    return 0
