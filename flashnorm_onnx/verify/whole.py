"""Numerical equivalence check: run the input and the output in ONNX Runtime and compare.

Both models run on the CPU provider on the same generated inputs (see :mod:`inputs`), for the
cases of :func:`~flashnorm_onnx.verify.inputs.default_cases`: a prefill and, for models with a KV
cache, a decode step on a short past; for models with an attention mask, padded batches (left- and
right-padded rows, a row of one real token, a decode step on a padded cache); for merged decoders,
both values of the branch flag. Every output is compared: max absolute error, max error relative
to the output's largest magnitude, and for logits the share of positions whose argmax agrees. The
check passes when, for every output, ``max|a - b| <= atol + rtol * max|a|`` with a tolerance
suited to the output's dtype. On a padded case only the positions the mask keeps are compared
(:func:`kept_positions`): what a model computes at a padded position is undefined.

Memory is bounded before anything runs: each case's generated inputs by
:func:`~flashnorm_onnx.verify.sizing.verification_cap`, and what its runs will create (intermediate
values, outputs, the comparison's temporaries), estimated by :class:`~flashnorm_onnx.verify.run_estimate.RunEstimator` from ONNX
shape inference on the input model without its tensor data, by
:func:`~flashnorm_onnx.verify.sizing.verification_run_cap`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import numpy as np

from flashnorm_onnx.errors import VerificationTimeout, VerificationUnavailable, first_line
from flashnorm_onnx.verify.case_text import branch_note, describe_rows
from flashnorm_onnx.verify.inputs import Case, default_cases, is_padding_mask, make_feeds, specs_from_session
from flashnorm_onnx.verify.sizing import fit_case
from flashnorm_onnx.verify.run_estimate import RunEstimator
from flashnorm_onnx.verify.result import VerificationResult, failed_entry  # noqa: F401 - failed_entry: callers
from flashnorm_onnx.verify.tolerances import TOLERANCES

logger = logging.getLogger(__name__)



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
    :func:`~flashnorm_onnx.verify.sizing.verification_cap`, and the memory its runs need (estimated by
    :class:`RunEstimator`) to :func:`~flashnorm_onnx.verify.sizing.verification_run_cap`, before anything
    is allocated; sizes the model declares that alone exceed either raise
    :class:`VerificationUnavailable`."""
    deadline = Deadline(timeout)
    # one session at a time: the input's runs every case and is freed before the output's loads,
    # so peak memory is one model's (a 16-bit model's session may hold float32 copies of its weights)
    ref = _load_reference(reference, provider)
    specs = specs_from_session(ref)
    estimate = RunEstimator.for_model(reference)  # the input model's graph, read without its data
    output_names = [meta.name for meta in ref.get_outputs()]
    result = VerificationResult(method="onnxruntime-quantized" if quantized else "onnxruntime", passed=True)
    generate = _Generator(specs, dims, vocab, estimate)
    runs = _run_reference(ref, generate, cases, deadline, result)
    del ref
    try:
        cand = make_session(candidate, provider)
    except Exception as e:
        return VerificationResult(
            method="onnxruntime", passed=False, message=f"ONNX Runtime cannot load the output: {first_line(e)}"
        )
    if not _run_candidate(cand, runs, output_names, deadline, result, quantized, rtol, generate):
        return result
    return _conclude(result, quantized)


def _load_reference(reference: str | Path, provider: str):
    """The input model's session; :class:`VerificationUnavailable` when ONNX Runtime cannot load it."""
    try:
        return make_session(reference, provider)
    except Exception as e:
        raise VerificationUnavailable(
            f"ONNX Runtime cannot load the input model ({first_line(e)}); use --no-verify to skip the check"
        ) from e


@dataclasses.dataclass
class _Generator:
    """What a case's inputs are generated from: the input model's input specs, ``--dim`` and
    vocabulary sizes, and the run estimator that :func:`fit_case` sizes the case with."""

    specs: list
    dims: dict[str, int] | None
    vocab: dict[str, int] | None
    estimate: RunEstimator | None

    def feeds(self, case: Case, result: VerificationResult) -> tuple[Case, dict]:
        """The case fitted to the memory caps (a note in ``result.cases`` when it was reduced) and its feeds."""
        case, note = fit_case(self.specs, case, self.dims, estimate=self.estimate)
        if note:
            result.cases.append(note)
        return case, make_feeds(self.specs, case, dims=self.dims, vocab=self.vocab)

    def padding(self, case: Case, feeds: dict) -> "_Padding | None":
        """A padded case's attention mask as fed (its first, by :func:`is_padding_mask`); None for
        a case that is not padded."""
        if not case.rows:
            return None
        for spec in self.specs:
            fed = feeds.get(spec.name)
            if is_padding_mask(spec) and fed is not None and fed.ndim >= 2:
                rows = fed.reshape(fed.shape[0], -1, fed.shape[-1])[:, 0, :] != 0
                return _Padding(spec.name, list(fed.shape), rows, case.past)
        return None


@dataclasses.dataclass
class _Padding:
    """A padded case's attention mask: its name and shape as fed, its [batch, total] rows (True:
    kept) and the past length (the new tokens are the last ``total - past`` positions)."""

    name: str
    shape: list[int]
    rows: np.ndarray
    past: int

    def note(self, case: str, entries: list[dict]) -> str:
        """The case's line saying how the mask was padded and at which positions outputs were
        compared: ``padded: attention_mask[3, 7] rows left-padded by 3, right-padded by 3, 1 real
        token; compared at its 9/21 kept positions``, naming any output compared in full although
        some new token was padded (it has no position axis: a pooled output)."""
        past = f" (past {self.past})" if self.past else ""
        head = f"{case}: {self.name}{self.shape}{past} rows {describe_rows(self.rows)}; "
        if self.rows.all():
            return head + "nothing padded at this size: compared in full"
        line = head + f"compared at its {int(self.rows.sum())}/{self.rows.size} kept positions"
        full = [e["name"] for e in entries if e.get("kept") is None]
        if full and not self.rows[:, self.past:].all():  # a padded new token, outputs without its axis
            line += f"; in full (no position axis): {', '.join(full[:2])}" + (
                f" +{len(full) - 2} more" if len(full) > 2 else "")
        return line


def kept_positions(shape: tuple | list, rows: np.ndarray, past: int = 0) -> np.ndarray | None:
    """Where an output of ``shape`` holds values at positions a padded mask keeps: a boolean array
    over its leading axes (all of them when its last axis is a position axis), or None when the
    output has no position axis (it is then compared in full).

    ``rows``: the mask's [batch, total] rows (True: kept), ``past``: the cache length fed. Axis 0 is
    the batch; every other axis of the mask's length ``total`` is a key position axis (a present
    key/value, attention weights), and of the new tokens' ``total - past`` (when that is more than
    1 and less than total) a query position axis (logits, hidden states of a multi-token step), read
    against the last positions of the mask. An axis that has one of those lengths by chance is
    masked too: that compares fewer values, never wrong ones."""
    batch, total = rows.shape
    new = total - past
    if len(shape) < 2 or shape[0] != batch:
        return None
    axes = {}
    for i in range(1, len(shape)):
        if shape[i] == total:
            axes[i] = rows
        elif 1 < new < total and shape[i] == new:
            axes[i] = rows[:, total - new:]
    if not axes:
        return None
    lead = len(shape) if len(shape) - 1 in axes else len(shape) - 1
    keep = np.ones(tuple(shape[:lead]), dtype=bool)
    for i, mask in axes.items():
        view = [1] * lead
        view[0], view[i] = batch, shape[i]
        keep &= mask.reshape(view)
    return keep


def _run_reference(ref, generate: _Generator, cases: list[Case] | None, deadline: Deadline,
                   result: VerificationResult) -> list:
    """Runs the input model on each case (the given ones, else :func:`default_cases`); returns
    (case as run, feeds, the input model's outputs) for each. A default padded case the input
    model does not run on is left out, with a note: the others still check the function."""
    explicit = cases is not None
    runs = []
    for case in cases or default_cases(generate.specs):
        deadline.check()
        try:
            case, feeds, expected = _run_reference_case(ref, generate, case, explicit, deadline, result)
        except VerificationUnavailable as e:
            if explicit or not case.rows:
                raise
            why = first_line(e.__cause__) if e.__cause__ else str(e)
            why = why if len(why) <= 100 else why[:97] + "..."
            result.cases.append(f"{case.name}: not run: the input model does not run on it ({why})")
            continue
        runs.append((case, feeds, [np.asarray(a) for a in expected]))
    return runs


def _run_reference_case(ref, generate: _Generator, case: Case, explicit: bool, deadline: Deadline,
                        result: VerificationResult) -> tuple[Case, dict, list]:
    """One case on the input model, retried with batch 1 when a default case of a larger batch
    fails; :class:`VerificationUnavailable` when the input model does not run on it."""
    case, feeds = generate.feeds(case, result)
    try:
        return case, feeds, deadline.run(ref, feeds)
    except VerificationTimeout:
        raise
    except Exception as e:
        expected = None
        if not explicit and case.batch > 1:
            # Exports traced with batch 1 may be specialised to it: check batch 1 only.
            case, feeds, expected = _retry_batch1(ref, generate, case, deadline, result)
        if expected is None:
            shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
            raise VerificationUnavailable(
                f"the input model does not run on generated inputs ({case.describe()}; {shapes}): "
                f"{first_line(e)}. Set sizes with --dim NAME=VALUE, or skip with --no-verify"
            ) from e
        return case, feeds, expected


def _retry_batch1(ref, generate: _Generator, case: Case, deadline: Deadline,
                  result: VerificationResult) -> tuple[Case, dict, list | None]:
    """The case again with batch 1 on the input model: (case, feeds, outputs), the outputs None
    when it fails too. A padded case keeps its first row."""
    name, batch = case.name, case.batch
    case = dataclasses.replace(case, batch=1, name=case.name + "-batch1")
    case, feeds = generate.feeds(case, result)
    try:
        expected = deadline.run(ref, feeds)
    except VerificationTimeout:
        raise
    except Exception:
        return case, feeds, None
    result.cases.append(f"{name}: the input model does not run with batch {batch}; checked batch 1")
    return case, feeds, expected


def _run_candidate(cand, runs: list, output_names: list[str], deadline: Deadline, result: VerificationResult,
                   quantized: bool, rtol: float | None, generate: _Generator | None = None) -> bool:
    """Runs the output model on each case's feeds and compares its outputs to the input model's;
    False (``result`` failed, with its message) when the output model fails to run. After each
    case's line come what it fed a merged decoder's branch flag and, for a padded case, how the
    mask was padded and which positions were compared."""
    for case, feeds, expected in runs:
        deadline.check()
        try:
            got = deadline.run(cand, feeds)
        except VerificationTimeout:
            raise
        except Exception as e:
            result.passed = False
            result.message = f"the output model fails to run: {first_line(e)}"
            return False
        # what actually ran: --dim values and config dims may override the case's sizes
        result.case_inputs[case.name] = {k: list(v.shape) for k, v in feeds.items()}
        result.cases.append(f"{case.name}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items()))
        padding = generate.padding(case, feeds) if generate is not None else None
        first = len(result.outputs)
        _compare_outputs(case, output_names, expected, got, result, quantized, rtol, padding)
        branch = branch_note(generate.specs, case, feeds) if generate is not None else None
        if branch:
            result.cases.append(branch)
        if padding is not None:
            result.cases.append(padding.note(case.name, result.outputs[first:]))
    return True


def _compare_outputs(case: Case, output_names: list[str], expected: list, got: list, result: VerificationResult,
                     quantized: bool, rtol: float | None, padding: _Padding | None = None) -> None:
    """Each output of one case compared (:func:`compare_quantized` or exactly), into ``result``;
    on a padded case only at the positions its mask keeps (:func:`kept_positions`: the entry's
    ``kept`` is [values compared, values in all] then)."""
    compare = compare_quantized if quantized else _compare
    for name, a, b in zip(output_names, expected, got):
        b = np.asarray(b)
        keep = None
        if padding is not None and not padding.rows.all() and a.shape == b.shape:
            keep = kept_positions(a.shape, padding.rows, padding.past)
        if keep is None:
            entry = compare(name, case.name, a, b, rtol)
        else:
            entry = compare(name, case.name, a[keep], b[keep], rtol)
            entry.update(shape=list(a.shape), kept=[int(a[keep].size), int(a.size)])
        result.outputs.append(entry)
        if not entry["ok"]:
            result.passed = False


def _conclude(result: VerificationResult, quantized: bool) -> VerificationResult:
    """The result's message (and for an exact check its tolerance) from its outputs' entries."""
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
#: garbage. What proves the quantization is the per-weight check (pipeline.stages.check_int4_weights).
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
