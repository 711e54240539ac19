"""Numerical equivalence check: run the input and the output in ONNX Runtime and compare.

Both models run on the CPU provider on the same generated inputs (see :mod:`inputs`), for a
prefill case and, for models with a KV cache, a decode step on a short past. Every output is
compared: max absolute error, max error relative to the output's largest magnitude, and for
logits the share of positions whose argmax agrees. The check passes when, for every output,
``max|a - b| <= atol + rtol * max|a|`` with a tolerance suited to the output's dtype.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import numpy as np

from flashnorm_onnx.errors import VerificationTimeout, VerificationUnavailable, first_line
from flashnorm_onnx.inputs import Case, default_cases, fit_case, make_feeds, specs_from_session
from flashnorm_onnx.report import VerificationResult

logger = logging.getLogger(__name__)

#: (rtol, atol) by output dtype; relative to the output's largest magnitude.
TOLERANCES = {
    "float64": (1e-6, 1e-8),
    "float32": (1e-4, 1e-5),
    "float16": (2e-2, 2e-3),
    "bfloat16": (5e-2, 1e-2),
}


#: ONNX Runtime optimizers the check's sessions leave out. FuseFp16InitializerToFp32Node converts
#: every float16 weight that the CPU provider reads through a Cast to float32 once at load, at
#: about 0.15 GB/s here: 14.9 s of a 2.1 GB fp16 model's 18.8 s session start, for runs that then
#: take 1 s instead of about 5 s. A check runs each session a few times: the Cast at run time is
#: cheaper, and the function is the same (the same Cast, at another time).
CHECK_DISABLED_OPTIMIZERS = ["FuseFp16InitializerToFp32NodeTransformer"]


def make_session(path: str | Path | bytes, provider: str = "cpu", threads: int | None = None):
    """A session for the check: the default graph optimizations but :data:`CHECK_DISABLED_OPTIMIZERS`,
    no memory arena (a few runs of different shapes; their buffers go back at once)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions; keep stderr clean
    options.enable_cpu_mem_arena = False
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if provider == "cuda":
        providers = [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=providers, disabled_optimizers=CHECK_DISABLED_OPTIMIZERS)


class Deadline:
    """A wall-clock limit over several ONNX Runtime runs (``--verify-timeout``); None or <= 0: none.

    :meth:`run` passes ``RunOptions`` to ``session.run`` and a timer sets its ``terminate`` flag
    when the time is up; ONNX Runtime checks it between kernels (a ``Loop``'s iterations too), so
    the run stops with an error, turned into :class:`VerificationTimeout`. One kernel that runs
    long by itself is not interrupted."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds if seconds and seconds > 0 else None
        self.end = None if self.seconds is None else time.monotonic() + self.seconds

    def check(self) -> None:
        if self.end is not None and time.monotonic() >= self.end:
            raise VerificationTimeout.after(self.seconds)

    def run(self, session, feeds: dict, outputs: list[str] | None = None) -> list:
        import onnxruntime as ort

        self.check()
        options = ort.RunOptions()
        options.log_severity_level = 4  # the "terminate flag" error comes back as an exception
        timer = None
        if self.end is not None:
            timer = threading.Timer(max(0.0, self.end - time.monotonic()), setattr, (options, "terminate", True))
            timer.daemon = True
            timer.start()
        try:
            return session.run(outputs, feeds, options)
        except Exception:
            if options.terminate:
                raise VerificationTimeout.after(self.seconds) from None
            raise
        finally:
            if timer is not None:
                timer.cancel()


def failed_entry(case: str, name: str) -> dict:
    """A comparison entry for something that could not be compared (it counts as a failure)."""
    return {"case": case, "name": name, "max_abs": float("inf"), "max_rel": float("inf"), "argmax_agreement": None,
            "ok": False, "rtol": 0.0, "dtype": "", "shape": []}


def compare_models(
    reference: str | Path,
    candidate: str | Path,
    dims: dict[str, int] | None = None,
    vocab: dict[str, int] | None = None,
    cases: list[Case] | None = None,
    rtol: float | None = None,
    timeout: float | None = None,
    provider: str = "cpu",
    quantized: bool = False,
) -> VerificationResult:
    """Run both models on the same generated inputs and compare every output.

    ``quantized``: the candidate is a quantized form of the reference, so equality is not
    expected: each output gets the measures that fit quantization (see :func:`compare_quantized`)
    and the check fails only on a model that no longer computes the function (cosine similarity
    below :data:`QUANT_MIN_COSINE`, non-finite values, another shape).

    ``provider``: "cpu" (what ``optimize`` uses) or "cuda" (``benchmarks/cuda.sh``: both models on
    the CUDA provider).

    ``timeout``: seconds for the whole comparison (None or 0: no limit); past it, raises
    :class:`VerificationTimeout`. Each case's inputs are sized to
    :func:`~flashnorm_onnx.inputs.verification_cap` before anything is allocated."""
    deadline = Deadline(timeout)
    # one session at a time: the input's runs every case and is freed before the output's loads,
    # so peak memory is one model's (a 16-bit model's session may hold float32 copies of its weights)
    try:
        ref = make_session(reference, provider)
    except Exception as e:
        raise VerificationUnavailable(
            f"ONNX Runtime cannot load the input model ({first_line(e)}); use --no-verify to skip the check"
        ) from e
    specs = specs_from_session(ref)
    output_names = [meta.name for meta in ref.get_outputs()]
    result = VerificationResult(method="onnxruntime-quantized" if quantized else "onnxruntime", passed=True)
    explicit = cases is not None
    cases = cases or default_cases(specs)
    runs = []  # (case, feeds, the input model's outputs)
    for case in cases:
        deadline.check()
        case, note = fit_case(specs, case, dims)
        if note:
            result.cases.append(note)
        feeds = make_feeds(specs, case, dims=dims, vocab=vocab)
        try:
            expected = deadline.run(ref, feeds)
        except VerificationTimeout:
            raise
        except Exception as e:
            if not explicit and case.batch > 1:
                # Exports traced with batch 1 may be specialised to it: check batch 1 only.
                case = dataclasses.replace(case, batch=1, name=case.name + "-batch1")
                case, note = fit_case(specs, case, dims)
                if note:
                    result.cases.append(note)
                feeds = make_feeds(specs, case, dims=dims, vocab=vocab)
                try:
                    expected = deadline.run(ref, feeds)
                except VerificationTimeout:
                    raise
                except Exception:
                    expected = None
                if expected is not None:
                    result.cases.append("the input model does not run with batch 2; checked batch 1")
            else:
                expected = None
            if expected is None:
                e_ = e
                shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
                raise VerificationUnavailable(
                    f"the input model does not run on generated inputs ({case.describe()}; {shapes}): "
                    f"{first_line(e_)}. Set sizes with --dim NAME=VALUE, or skip with --no-verify"
                ) from e_
        runs.append((case, feeds, [np.asarray(a) for a in expected]))
    del ref
    try:
        cand = make_session(candidate, provider)
    except Exception as e:
        return VerificationResult(
            method="onnxruntime", passed=False, message=f"ONNX Runtime cannot load the output: {first_line(e)}"
        )
    for case, feeds, expected in runs:
        deadline.check()
        try:
            got = deadline.run(cand, feeds)
        except VerificationTimeout:
            raise
        except Exception as e:
            result.passed = False
            result.message = f"the output model fails to run: {first_line(e)}"
            return result
        # what actually ran: --dim values and config dims may override the case's sizes
        result.cases.append(f"{case.name}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items()))
        for name, a, b in zip(output_names, expected, got):
            compare = compare_quantized if quantized else _compare
            entry = compare(name, case.name, a, np.asarray(b), rtol)
            result.outputs.append(entry)
            if not entry["ok"]:
                result.passed = False
    if quantized:
        bad = [o for o in result.outputs if not o["ok"]]
        if bad:
            result.message = (f"output '{bad[0]['name']}' has cosine similarity {bad[0]['cosine']:.3f} to the input's "
                              f"(below {QUANT_MIN_COSINE}: not a quantization error, a broken model)")
        return result
    worst = max(result.outputs, key=lambda o: o["max_rel"], default=None)
    if worst is not None:
        result.tolerance = worst["rtol"]
        if not result.passed:
            result.message = (
                f"output '{worst['name']}' differs by {worst['max_rel']:.3e} (relative), "
                f"tolerance {worst['rtol']:.1e}"
            )
    return result


#: A floor, not a proof: an int4 model's outputs differ from the float model's by design, and on
#: the generated (random-token) inputs SmolLM2-135M's correct int4 logits had a cosine similarity
#: as low as 0.78 to fp32's (tiny random-weight models: 0.99). Below this floor the model computes
#: garbage. What proves the quantization is the per-weight check (api._check_int4_weights).
QUANT_MIN_COSINE = 0.5


def compare_quantized(name: str, case: str, a: np.ndarray, b: np.ndarray, rtol: float | None = None) -> dict:
    """Measures of a quantized output ``b`` against the float ``a``: relative error
    ||b - a|| / ||a|| (``rel_err``), cosine similarity, argmax agreement for logits, and the
    max errors as for an exact check."""
    entry = {"case": case, "name": name, "dtype": a.dtype.name, "shape": list(a.shape), "rtol": 0.0}
    if a.shape != b.shape or a.dtype.kind not in "fc":
        equal = a.shape == b.shape and bool(np.array_equal(a, b))
        entry.update(max_abs=0.0 if equal else float("inf"), max_rel=0.0 if equal else float("inf"),
                     rel_err=0.0 if equal else float("inf"), cosine=1.0 if equal else 0.0, ok=equal,
                     argmax_agreement=None)
        return entry
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    finite = bool(np.isfinite(a64).all() and np.isfinite(b64).all())
    if not finite or not a.size:
        entry.update(max_abs=float("inf") if a.size else 0.0, max_rel=float("inf") if a.size else 0.0,
                     rel_err=float("inf") if a.size else 0.0, cosine=0.0 if a.size else 1.0, ok=not a.size,
                     argmax_agreement=None)
        return entry
    diff = np.abs(a64 - b64)
    scale = float(np.abs(a64).max())
    norm_a, norm_b = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    cosine = float(a64 @ b64 / (norm_a * norm_b)) if norm_a > 0 and norm_b > 0 else float(norm_a == norm_b)
    agreement = None
    if "logit" in name.lower() and a.ndim >= 1 and a.shape[-1] > 1:
        agreement = float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))
    entry.update(max_abs=float(diff.max()), max_rel=float(diff.max()) / scale if scale > 0 else float(diff.max()),
                 rel_err=float(np.linalg.norm(a64 - b64)) / norm_a if norm_a > 0 else float(norm_b),
                 cosine=cosine, ok=cosine >= QUANT_MIN_COSINE, argmax_agreement=agreement)
    return entry


def _compare(name: str, case: str, a: np.ndarray, b: np.ndarray, rtol: float | None) -> dict:
    dtype = a.dtype.name
    default_rtol, atol = TOLERANCES.get(dtype, (0.0, 0.0))
    rtol = default_rtol if rtol is None else rtol
    entry = {"case": case, "name": name, "dtype": dtype, "shape": list(a.shape), "rtol": rtol}
    if a.shape != b.shape:
        entry.update(max_abs=float("inf"), max_rel=float("inf"), ok=False, argmax_agreement=None)
        return entry
    if a.dtype.kind not in "fc" and dtype != "bfloat16":
        equal = bool(np.array_equal(a, b))
        entry.update(max_abs=0.0 if equal else float("inf"), max_rel=0.0 if equal else float("inf"), ok=equal,
                     argmax_agreement=None)
        return entry
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(a64)
    same_nonfinite = bool(np.array_equal(np.isfinite(b64), finite))
    diff = np.abs(a64 - b64)[finite] if a.size else np.zeros(0)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(a64[finite]).max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    ok = same_nonfinite and max_abs <= atol + rtol * scale
    agreement = None
    if "logit" in name.lower() and a.ndim >= 1 and a.shape[-1] > 1 and a.size:
        agreement = float(np.mean(np.argmax(a64, axis=-1) == np.argmax(b64, axis=-1)))
    entry.update(max_abs=max_abs, max_rel=max_rel, ok=bool(ok), argmax_agreement=agreement)
    return entry
