"""Errors a user can act on. Each carries the process exit code the CLI returns.

=====  ==========================================================================
code   meaning
=====  ==========================================================================
0      success (also: nothing to fold, when no output was requested to be forced)
1      internal error (a bug: rerun with --debug and report the traceback)
2      usage error (bad command-line arguments)
3      bad input model (missing, empty, not ONNX, truncated, bad external data)
4      cannot write the output (same path as the input, not a folder, disk full)
5      verification failed: the output does not compute the same function
6      verification could not run the models (inputs could not be generated)
7      ONNX Runtime or the requested execution provider unavailable (no ``onnxruntime`` module:
       install ``flashnorm-onnx[cpu]`` or ``[gpu]``; CUDA on a CPU-only machine)
8      ``export``: the exporter failed on the checkpoint (:class:`flashnorm_onnx.pipeline.export.ExportFailed`)
9      verification did not finish within ``--verify-timeout`` seconds (nothing written)
=====  ==========================================================================
"""

from __future__ import annotations


class FlashNormError(Exception):
    exit_code = 1


class InputModelError(FlashNormError):
    exit_code = 3


class OutputPathError(FlashNormError):
    exit_code = 4


class VerificationFailed(FlashNormError):
    exit_code = 5

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class VerificationUnavailable(FlashNormError):
    exit_code = 6


class ProviderUnavailable(FlashNormError):
    """ONNX Runtime itself, or the execution provider asked for, is not available here."""

    exit_code = 7


#: The one line the CLI prints when no ONNX Runtime family is installed (exit 7).
ORT_MISSING = ("ONNX Runtime is not installed: pip install 'flashnorm-onnx[cpu]' "
               "(or 'flashnorm-onnx[gpu]' for CUDA; one of the two, never both)")


class VerificationTimeout(FlashNormError):
    """A verification run went past its wall-clock limit (``--verify-timeout``)."""

    exit_code = 9

    @classmethod
    def after(cls, seconds: float) -> "VerificationTimeout":
        return cls(f"verification did not finish within {seconds:g} s (--verify-timeout); nothing written")


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name if it has none), for
    the one-line errors and report messages."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(e).__name__
