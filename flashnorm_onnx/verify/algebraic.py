"""Verification for models too large to run twice in memory: check every folded tensor.

For each weight the fold wrote, read back *from the written output file*, with random vectors
x (rows of X)::

    X @ B*   ==   (X * g) @ B        (within the weight dtype's rounding)

on a random sample of the rows of the stored 2-D weight: up to ``columns`` of its rows, read
with ``pread`` from the input and from the output (all of them for small tensors). For a
weight stored as ``[N, K]`` (the norm's channels along its columns) a row is one output
column with every channel; for one stored as ``[K, N]`` it is one input channel with every
output column. Either way a sampled row is a contiguous run of the file, so the check reads a
few percent of each tensor and never maps it: memory stays flat and the cost is a fraction of
the fold. This checks the arithmetic of every fold that reached the disk; the structural
decisions (which readers, untying) are the code paths the ONNX Runtime comparison checks on
every model that fits in memory.
"""

from __future__ import annotations

import numpy as np

from flashnorm_onnx.passes.graph_utils import attr, const_array, release_tensor
from flashnorm_onnx.passes.norm_patterns import find_norms, strip_casts
from flashnorm_onnx.passes.linear_consumers import output_scale
from flashnorm_onnx.verify.result import VerificationResult
from flashnorm_onnx.verify.result import failed_entry
from flashnorm_onnx.verify.tolerances import FOLD_TOLERANCES



#: At most this many bytes of each tensor are read back from each file (rows are dropped to fit).
READ_BACK_BYTES = 256 << 10


def _sample_rows(shape: tuple[int, ...], itemsize: int, limit: int, rng) -> np.ndarray | None:
    """Sorted row indices of the stored 2-D weight to read back (None: all of them)."""
    rows = shape[0]
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    count = max(1, min(limit, READ_BACK_BYTES // row_bytes))
    if rows <= count:
        return None
    return np.sort(rng.choice(rows, size=count, replace=False))


def check_folds(folds, output=None, rows: int = 4, columns: int = 256, seed: int = 0) -> VerificationResult:
    """``output``: the written model (a path or a verify_subgraph.ModelFile); None: the tensors in memory.

    ``rows``: random vectors per tensor; ``columns``: sampled rows of each stored weight (see the
    module docstring)."""
    rng = np.random.default_rng(seed)
    written = _written_tensors(output)
    result = VerificationResult(method="algebraic", passed=True)
    for record in folds:
        name = record.folded.name or record.name
        folded_tensor = written.get(name) if written is not None else record.folded
        if _check_fold(record, name, folded_tensor, rows, columns, rng, result):
            for tensor in (record.original, folded_tensor):
                release_tensor(tensor)
    result.cases.append(
        f"{len(folds)} folded tensors read back from the output, each checked on {rows} random vectors "
        f"(up to {columns} sampled rows of the stored weight, at most {READ_BACK_BYTES >> 10} KB of it)"
    )
    return result


def _written_tensors(output) -> dict | None:
    """Initializer name -> tensor of the written model (None: no ``output``, the tensors in memory)."""
    from flashnorm_onnx.verify.subgraph import ModelFile

    if output is None:
        return None
    return {v.name: v.const_value for v in ModelFile.of(output).graph.initializers.values()}


def _check_fold(record, name: str, folded_tensor, rows: int, columns: int, rng, result: VerificationResult) -> bool:
    """One folded tensor into ``result``: missing or of another shape fails it (returns False:
    nothing read), else its entry from :func:`_fold_entry` (returns True)."""
    if folded_tensor is None:
        result.passed = False
        result.message = f"folded tensor '{name}' is missing from the output"
        return False
    shape = tuple(int(d) for d in record.original.shape.numpy())
    dtype = np.dtype(record.original.dtype.numpy())
    if tuple(int(d) for d in folded_tensor.shape.numpy()) != shape or len(shape) != 2:
        result.passed = False
        result.message = f"folded tensor '{name}' has shape {list(folded_tensor.shape.numpy())}, not {list(shape)}"
        result.outputs.append(failed_entry("x@B*", name))
        return False
    entry = _fold_entry(record, name, folded_tensor, shape, dtype, rows, columns, rng)
    result.outputs.append(entry)
    if not entry["ok"]:
        result.passed = False
        result.message = f"folded tensor '{name}' does not equal diag(g)·B"
    return True


def _read_back(record, folded_tensor, shape: tuple, itemsize: int, columns: int, rng):
    """The sampled rows (:func:`_sample_rows`, one draw from ``rng``; None: all) of the stored
    weight, and those rows of the original and of the folded tensor."""
    from flashnorm_onnx.passes import tensor_access

    picks = _sample_rows(shape, itemsize, columns, rng)
    if picks is None:
        return picks, np.asarray(record.original.numpy()), np.asarray(folded_tensor.numpy())
    return picks, tensor_access.read_rows(record.original, picks), tensor_access.read_rows(folded_tensor, picks)


def _fold_entry(record, name: str, folded_tensor, shape: tuple, dtype: np.dtype, rows: int, columns: int,
                rng) -> dict:
    """``X @ B* == (X * g) @ B`` on the sampled rows, for ``rows`` random vectors X (drawn from
    ``rng`` after the rows), within the dtype's fold tolerance: the entry."""
    picks, original, folded = _read_back(record, folded_tensor, shape, dtype.itemsize, columns, rng)
    work = np.float64 if dtype.itemsize >= 4 else np.float32
    # the effective [K', n] matrix: the channels (K, or the sampled ones) along its rows
    b = np.ascontiguousarray(original if record.k_axis == 0 else original.T).astype(work)
    bf = np.ascontiguousarray(folded if record.k_axis == 0 else folded.T).astype(work)
    del original, folded
    g = np.asarray(record.g, dtype=np.float64).reshape(-1)
    channels = shape[record.k_axis]
    g = np.broadcast_to(g, (channels,))
    if record.k_axis == 0 and picks is not None:
        g = g[picks]
    g = g.astype(work)
    k = b.shape[0]
    x = rng.standard_normal((rows, k)).astype(work)
    expected = ((x * g) @ b).astype(np.float64)
    got = (x @ bf).astype(np.float64)
    del b, bf
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    scale = scale or 1.0
    max_abs = float(np.abs(got - expected).max()) if expected.size else 0.0
    tol = FOLD_TOLERANCES.get(dtype.name, 1e-6)
    ok = bool(np.isfinite(max_abs)) and max_abs <= tol * scale * np.sqrt(k / 16 + 1)
    return {"case": "x@B*", "name": name, "max_abs": max_abs, "max_rel": max_abs / scale,
            "argmax_agreement": None, "ok": bool(ok), "rtol": tol, "dtype": dtype.name,
            "shape": list(shape)}


def check_structure(sites, reference, output) -> VerificationResult:
    """What the weight check cannot see, read back from the written output without running it:

    * every folded norm is weightless in the output (scale all ones, bias zero), and it is what
      its readers read;
    * every LayerNorm bias moved into a linear: ``c_out - c_in == beta @ B`` (Gemm: scaled by its
      alpha / beta), with B the input's weight and c the linear's bias constant in each file.
    """
    from flashnorm_onnx.verify.subgraph import ModelFile

    ref, out = ModelFile.of(reference), ModelFile.of(output)
    by_output = {out.scopes.name(m.output): m for _, graph in out.scopes.graphs for m in find_norms(graph)}
    result = VerificationResult(method="structure", passed=True)

    def fail(message: str, name: str) -> None:
        result.passed = False
        result.message = result.message or message
        result.outputs.append(failed_entry("structure", name))

    biases = 0
    for site in sites:
        after = site.output_after_name
        match = _norm_producing(out, after, by_output)
        if match is None:
            fail(f"norm '{site.norm}': its readers in the output do not read a normalization", after)
            continue
        g = match.scale_array()
        beta = match.bias_array()
        if not np.all(g == 1) or (beta is not None and np.any(beta != 0)):
            fail(f"norm '{site.norm}' is not weightless in the output (scale != 1 or bias != 0)", after)
        if site.beta is None or not np.any(site.beta):
            continue
        for r in site.readers:
            weight = ref.values.get(r.weight)
            if weight is None or weight.const_value is None:
                fail(f"norm '{site.norm}': weight '{r.weight}' not found in the input", r.result_before)
                continue
            b = weight.const_value.numpy().astype(np.float64)
            delta = np.asarray(site.beta, np.float64).reshape(-1) @ (b if r.k_axis == 0 else b.T)
            scale_in, c_in = _bias_of(ref, r.result_before)
            scale_out, c_out = _bias_of(out, r.result_after_name)
            if c_out is None:
                fail(f"norm '{site.norm}': the linear '{r.result_before}' lost its LayerNorm bias", r.result_before)
                continue
            moved = c_out * scale_out - (0.0 if c_in is None else c_in * scale_in)
            alpha = _gemm_alpha(out, r.result_after_name)
            biases += 1
            err = float(np.max(np.abs(moved - alpha * delta)))
            mag = float(np.max(np.abs(alpha * delta))) or 1.0
            ok = err <= 2e-2 * mag if weight.const_value.dtype.itemsize < 4 else err <= 1e-4 * mag
            result.outputs.append({"case": "c+β@B", "name": r.result_before, "max_abs": err, "max_rel": err / mag,
                                   "argmax_agreement": None, "ok": bool(ok), "rtol": 0.0, "dtype": "", "shape": []})
            if not ok:
                fail(f"norm '{site.norm}': the bias moved into '{r.result_before}' is not beta @ B", r.result_before)
    result.cases.append(f"{len(sites)} folded norms weightless in the output and read by their linears; "
                        f"{biases} moved LayerNorm biases equal beta @ B")
    return result


def _norm_producing(file, name: str, by_output: dict):
    """The norm whose output (through Casts) is ``name`` in ``file``."""
    value = file.values.get(name)
    if value is None:
        return None
    _, casts = strip_casts(value)
    for v in [value, *(c.inputs[0] for c in casts)]:
        if file.scopes.name(v) in by_output:
            return by_output[file.scopes.name(v)]
    return None


def _const_behind_casts(value) -> np.ndarray | None:
    array = const_array(strip_casts(value)[0]) if value is not None else None
    return None if array is None else array.astype(np.float64)


def _bias_of(file, result: str) -> tuple[float, np.ndarray | None]:
    """(scale, c): the constant bias that produced ``result`` (Add(x, c), Gemm's beta * C, Attention's bias)."""
    value = file.values.get(result)
    node = value.producer() if value is not None else None
    if node is None:
        return 1.0, None
    if node.op_type == "Add":
        for v in node.inputs:
            c = _const_behind_casts(v)
            if c is not None:
                return 1.0, c
        return 1.0, None
    if node.op_type == "Gemm" and len(node.inputs) > 2:
        return float(attr(node, "beta", 1.0)), _const_behind_casts(node.inputs[2])
    if node.op_type == "Attention" and len(node.inputs) > 2:
        return 1.0, _const_behind_casts(node.inputs[2])
    return 1.0, None


def _gemm_alpha(file, result: str) -> float:
    value = file.values.get(result)
    node = value.producer() if value is not None else None
    return output_scale(node)
