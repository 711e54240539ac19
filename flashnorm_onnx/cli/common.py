"""What the subcommands share: the exit codes they document, the fold options, option values."""

from __future__ import annotations

import argparse

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


def parse_dims(values: list[str] | None) -> dict[str, int]:
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


def parse_number(option: str, text: str | None, default: float | None = None) -> float | None:
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


def add_fold_options(p: argparse.ArgumentParser) -> None:
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
