"""Bounded memory: folding a model larger than the process may hold, streamed from disk."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from flashnorm_onnx.pipeline.api import infer_shapes
from flashnorm_onnx.passes import FlashNormFoldPass
from models import synthetic
from tests.helpers import MB, peak_rss_of as _peak_rss_of


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    dims = synthetic.shape_for_bytes(300 * MB, "float16", hidden=1024)
    path = tmp_path_factory.mktemp("scale") / "model.onnx"
    synthetic.build(path, *dims, dtype="float16")
    return path, synthetic.estimate_bytes(*dims, "float16")


def test_peak_memory_is_bounded_and_output_matches_in_memory_fold(big_model, tmp_path):
    path, data_bytes = big_model
    out = tmp_path / "folded.onnx"
    cmd = [sys.executable, "-m", "flashnorm_onnx.cli", "optimize", str(path), "-o", str(out), "--verify", "algebraic"]
    peak, proc = _peak_rss_of(cmd)
    assert proc.returncode == 0, proc.stderr
    assert "folded" in proc.stdout
    assert peak < 0.3 * data_bytes + 300 * MB, f"peak RSS {peak / MB:.0f} MB for {data_bytes / MB:.0f} MB of data"

    # the streamed output is bit-identical to folding the fully loaded model in memory
    proto = onnx.load(str(path))  # loads external data into memory
    model = ir.serde.deserialize_model(proto)
    restore = infer_shapes(model)  # as optimize does: shapes inform the decisions, then are undone
    FlashNormFoldPass()(model)
    restore()
    in_memory = {v.name: v.const_value.tobytes() for v in model.graph.initializers.values()}
    streamed = onnx.load(str(out))
    streamed_bytes = {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in streamed.graph.initializer}
    assert streamed_bytes.keys() == in_memory.keys()
    for name, data in in_memory.items():
        assert streamed_bytes[name] == data, name


def test_whole_model_check_holds_one_session_at_a_time(big_model, tmp_path):
    """The default check of a model that fits runs both models whole in ONNX Runtime, one session
    at a time: a float16 model's session holds float32 copies of its weights (about 3x the data),
    and two at once measured 5.5x the data on this model; one at a time, 3.7x."""
    path, data_bytes = big_model
    out = tmp_path / "folded.onnx"
    peak, proc = _peak_rss_of([sys.executable, "-m", "flashnorm_onnx.cli", "optimize", str(path), "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert "verification (onnxruntime+plan): PASSED" in proc.stdout
    assert peak < 4.3 * data_bytes + 100 * MB, f"peak RSS {peak / MB:.0f} MB for {data_bytes / MB:.0f} MB of data"


def test_algebraic_verification_runs_when_asked(big_model, tmp_path):
    path, _ = big_model
    from flashnorm_onnx import optimize

    report = optimize(path, tmp_path / "o.onnx", verify_mode="algebraic")
    assert report.verification.method == "algebraic+structure+plan" and report.verification.passed
    assert len(report.verification.outputs) == report.tensors_written  # RMSNorm: no biases moved


def test_auto_verification_falls_back_to_algebraic_for_large_models(big_model, tmp_path, monkeypatch):
    from flashnorm_onnx.pipeline import api
    from flashnorm_onnx.verify import policy

    monkeypatch.setattr(policy, "VERIFY_MEMORY_FRACTION", 1e-6)  # pretend the machine is tiny
    report = api.optimize(big_model[0], tmp_path / "o.onnx")
    assert report.verification.method == "subgraph+algebraic+structure+plan" and report.verification.passed
    assert "too large to run twice in memory" in report.verification.message
    # the executed check ran every folded norm and each of its linears
    norm_entries = [o for o in report.verification.outputs if o["case"] == "subgraph" and o["name"].endswith("(norm)")]
    assert len(norm_entries) == report.folded


def test_subgraph_verification_memory_is_bounded(big_model, tmp_path):
    path, data_bytes = big_model
    cmd = [sys.executable, "-m", "flashnorm_onnx.cli", "optimize", str(path), "-o", str(tmp_path / "o.onnx"),
           "--verify", "subgraph"]
    peak, proc = _peak_rss_of(cmd)
    assert proc.returncode == 0, proc.stderr
    assert "verification (subgraph+plan): PASSED" in proc.stdout
    # pieces run one at a time, and linears with large weights on a sample of their output columns:
    # memory is the fold's own, whatever the largest tensor
    bound = 0.3 * data_bytes + 300 * MB
    assert peak < bound, f"peak RSS {peak / MB:.0f} MB for {data_bytes / MB:.0f} MB of data (bound {bound / MB:.0f})"


# -- the streamed writer: the same bytes as ir.save, whatever the block boundaries ---------------


def _reference_check_fold(weight, g, k_axis):
    """The whole-tensor overflow check as it was before it was streamed (the reference)."""
    from flashnorm_onnx.passes.fold_math import CHUNK_ELEMENTS, FoldRefused, _finfo_max

    g = np.asarray(g, dtype=np.float64).reshape(-1)
    limit = _finfo_max(weight.dtype)
    g_abs = np.abs(g)
    worst = 0.0
    col_max = None
    rows_per = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(weight.shape[1:]))))
    for start in range(0, weight.shape[0], rows_per):
        rows = slice(start, min(start + rows_per, weight.shape[0]))
        block = np.abs(weight[rows])
        if k_axis == 0:
            row_max = block.max(axis=1).astype(np.float64) if block.size else np.zeros(0)
            gr = g_abs if g.size == 1 else g_abs[rows]
            worst = max(worst, float(np.max(row_max * gr)) if row_max.size else 0.0)
        else:
            m = block.max(axis=0) if block.size else None
            if m is not None:
                col_max = m if col_max is None else np.maximum(col_max, m)
    if col_max is not None:
        worst = max(worst, float(np.max(col_max.astype(np.float64) * g_abs)))
    if not np.isfinite(worst):
        return None
    if worst > limit:
        raise FoldRefused(f"g*w reaches {worst:.4g}, beyond the {np.dtype(weight.dtype).name} maximum {limit:.4g}")
    return None


def _outcome(f, *args):
    from flashnorm_onnx.passes.fold_math import FoldRefused

    try:
        f(*args)
        return "ok"
    except FoldRefused as e:
        return str(e)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("k_axis", [0, 1])
def test_streamed_overflow_check_decides_as_the_whole_tensor_check(dtype, k_axis, monkeypatch):
    """Block by block (any block size), with NaN and inf in the weight: the same refusals."""
    from flashnorm_onnx.passes import fold_math

    monkeypatch.setattr(fold_math, "CHUNK_ELEMENTS", 1000)  # several reference blocks per tensor
    rng = np.random.default_rng(3)
    big = float(np.finfo(dtype).max) * 0.6
    refused = 0
    for case in range(40):
        with np.errstate(over="ignore"):
            w = (rng.uniform(-1, 1, (37, 29)) * (big if case % 3 == 0 else 1.0)).astype(dtype)
        if case % 5 == 1:
            w[rng.integers(37), rng.integers(29)] = np.nan
        if case % 7 == 2:
            w[rng.integers(37), rng.integers(29)] = np.inf
        g = rng.uniform(0.2, 2.5 if case % 2 else 0.9, w.shape[k_axis])
        want = _outcome(_reference_check_fold, w, g, k_axis)
        refused += want != "ok"
        assert _outcome(fold_math.check_fold, w, g, k_axis) == want
        check = fold_math.OverflowCheck(g, k_axis, w.dtype, w.shape)
        step = int(rng.integers(1, 11))
        if check.needed:
            for start in range(0, 37, step):
                check.add(w[start:start + step], slice(start, min(start + step, 37)))
        assert _outcome(check.finish) == want, case
    assert refused >= 3  # the cases do exercise refusals


def test_fast_float16_kernel_is_bit_identical_to_numpy():
    """ONNX Runtime's Cast/Mul/Cast against numpy on every float16 bit pattern and many scales."""
    from flashnorm_onnx.io.fp16_kernel import build_ort_kernel
    from flashnorm_onnx.passes import fold_math

    kernel = build_ort_kernel()
    if kernel is None or not fold_math.kernel_agrees(kernel):
        pytest.skip("no ONNX Runtime (or it disagrees with numpy here, and is not used)")
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(256, 256)
    rng = np.random.default_rng(5)
    for trial in range(12):
        g = rng.uniform(2.0 ** -12, 8.0, 256).astype(np.float32) if trial % 2 else \
            (2.0 ** rng.uniform(-30, 12, 256)).astype(np.float32)
        for k_axis in (0, 1):
            with np.errstate(all="ignore"):
                want = (every.astype(np.float32) * (g[:, None] if k_axis == 0 else g[None, :])).astype(np.float16)
            got = kernel(np.ascontiguousarray(every), g, k_axis)
            assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), (trial, k_axis)


def _odd_model(path):
    """fp16, widths that are multiples of nothing useful; an odd-sized tensor first, so every later
    offset in the data file is unaligned; a tied embedding (folded along its columns)."""
    dims = (72, 200, 2, 1003, 24)
    synthetic.build(path, *dims, dtype="float16")
    proto = onnx.load(str(path))
    odd = onnx.numpy_helper.from_array(np.arange(1001, dtype=np.uint8), "odd_bytes")
    proto.graph.initializer.insert(0, odd)
    proto.graph.output.append(onnx.helper.make_tensor_value_info("odd_bytes", onnx.TensorProto.UINT8, [1001]))
    onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


@pytest.mark.parametrize("block_bytes", [3001, 4096, 1 << 20])
@pytest.mark.parametrize("direct", [True, False])
def test_streamed_write_is_the_bytes_ir_save_writes(tmp_path, monkeypatch, block_bytes, direct):
    """Block sizes that split rows, pages and tensors anywhere (and a block bigger than a tensor):
    the data file and the model file are byte for byte those of ir.save on the same folded model."""
    from flashnorm_onnx.io import model_io
    from flashnorm_onnx.io import tensor_io

    src = _odd_model(tmp_path / "in" / "model.onnx")
    monkeypatch.setattr(tensor_io, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(tensor_io, "DIRECT", direct)

    def folded():
        model = model_io.load(model_io.check_input(src))
        restore = infer_shapes(model)
        result = FlashNormFoldPass()(model)
        restore()
        assert result.report.folded == 5
        return model

    (tmp_path / "ref").mkdir()
    (tmp_path / "new").mkdir()
    ir.save(folded(), str(tmp_path / "ref" / "model.onnx"), external_data="model.onnx.data")
    tensor_io.save_with_external_data(folded(), tmp_path / "new" / "model.onnx", "model.onnx.data")
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_a_block_boundary_bug_is_caught(tmp_path, monkeypatch):
    """The comparison above is not vacuous: a writer that puts one block one element off fails it."""
    from flashnorm_onnx.io import model_io
    from flashnorm_onnx.io import tensor_io
    from flashnorm_onnx.passes import fold_math

    src = _odd_model(tmp_path / "in" / "model.onnx")
    monkeypatch.setattr(tensor_io, "BLOCK_BYTES", 3001)
    real_blocks = fold_math.FoldedTensor.blocks

    def off_by_one(self, block_bytes):
        for i, (start, nbytes, fill) in enumerate(real_blocks(self, block_bytes)):
            yield (start + 2 if i == 1 else start), nbytes, fill  # the second block lands 1 element late

    def write(out):
        model = model_io.load(model_io.check_input(src))
        FlashNormFoldPass()(model)
        out.mkdir()
        tensor_io.save_with_external_data(model, out / "model.onnx", "model.onnx.data")
        return (out / "model.onnx.data").read_bytes()

    good = write(tmp_path / "good")
    monkeypatch.setattr(fold_math.FoldedTensor, "blocks", off_by_one)
    assert write(tmp_path / "bad") != good


@pytest.mark.parametrize("block_bytes", [3001, 1 << 20])
def test_kept_samples_are_the_columns_written(tmp_path, monkeypatch, block_bytes):
    """The sampled columns the writer keeps for the subgraph check are, element for element, the
    columns of the weights in the written file (and the same window the check asks for)."""
    from flashnorm_onnx.io import model_io
    from flashnorm_onnx.io import tensor_io
    from flashnorm_onnx.verify import subgraph as verify_subgraph

    monkeypatch.setattr(verify_subgraph, "SAMPLE_BYTES", 1024)
    monkeypatch.setattr(verify_subgraph, "SAMPLE_COLUMNS", 5)
    monkeypatch.setattr(tensor_io, "BLOCK_BYTES", block_bytes)
    src = _odd_model(tmp_path / "in" / "model.onnx")
    model = model_io.load(model_io.check_input(src))
    FlashNormFoldPass()(model)
    kept: dict = {}
    (tmp_path / "out").mkdir()
    tensor_io.save_with_external_data(model, tmp_path / "out" / "model.onnx", "model.onnx.data", keep_samples=kept,
                                      sample_window=verify_subgraph.sample_window)
    written = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.initializer}
    assert len(kept) >= 4  # q/k/v, gate/up: [K, N] weights over the (patched) sample size
    for name, (cols, sample) in kept.items():
        array = written[name]
        assert cols == verify_subgraph.sample_window(array.shape, 0, array.itemsize)
        np.testing.assert_array_equal(sample, array[:, cols])


def test_a_misplaced_block_fails_the_large_model_check(tmp_path, monkeypatch, capsys):
    """The subgraph check reads the writer's kept samples, so it is the algebraic read-back from
    the file that must see a writer that misplaces a block: the default check for a large model
    fails (exit 5) and publishes nothing."""
    from flashnorm_onnx.pipeline import api
    from flashnorm_onnx.verify import policy
    from flashnorm_onnx import cli as cli
    from flashnorm_onnx.io import tensor_io
    from flashnorm_onnx.verify import subgraph as verify_subgraph
    from flashnorm_onnx.passes import fold_math

    monkeypatch.setattr(policy, "VERIFY_MEMORY_FRACTION", 1e-12)  # "too large to run whole": subgraph+algebraic
    monkeypatch.setattr(verify_subgraph, "SAMPLE_BYTES", 1024)
    monkeypatch.setattr(tensor_io, "BLOCK_BYTES", 4096)
    src = _odd_model(tmp_path / "in" / "model.onnx")
    assert cli.main(["optimize", str(src), "-o", str(tmp_path / "good" / "model.onnx")]) == 0  # unbroken: passes
    assert "as kept from the buffers the writer wrote" in capsys.readouterr().out
    real_blocks = fold_math.FoldedTensor.blocks

    def misplaced(self, block_bytes):
        for i, (start, nbytes, fill) in enumerate(real_blocks(self, block_bytes)):
            yield (start + 2 if i == 1 else start), nbytes, fill

    monkeypatch.setattr(fold_math.FoldedTensor, "blocks", misplaced)
    out = tmp_path / "out" / "model.onnx"
    code = cli.main(["optimize", str(src), "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 5, text
    assert "algebraic" in text and "FAILED" in text
    assert not out.exists()


@pytest.fixture(scope="module")
def one_big_tensor(tmp_path_factory):
    """A small model whose tied embedding (folded into an untied copy) is one 256 MB tensor."""
    path = tmp_path_factory.mktemp("bigtensor") / "model.onnx"
    synthetic.build(path, 512, 1024, 1, 262144, 128, dtype="float16")
    return path


def test_peak_memory_does_not_follow_the_largest_tensor(one_big_tensor, tmp_path):
    """The fold, the write and the algebraic read-back hold a few blocks, not the 256 MB tensor."""
    small = tmp_path / "small" / "model.onnx"
    synthetic.build(small, 512, 1024, 1, 1024, 128, dtype="float16")
    peaks = {}
    for name, model in (("small", small), ("big", one_big_tensor)):
        out = tmp_path / name / "out.onnx"
        cmd = [sys.executable, "-m", "flashnorm_onnx.cli", "optimize", str(model), "-o", str(out),
               "--verify", "algebraic"]
        peaks[name], proc = _peak_rss_of(cmd)
        assert proc.returncode == 0, proc.stderr
        assert "verification (algebraic" in proc.stdout and "PASSED" in proc.stdout
    # the same start-up and buffers for both: the 256 MB tensor may add only a little
    assert peaks["big"] < peaks["small"] + 64 * MB, {k: v / MB for k, v in peaks.items()}


def test_direct_writes_unless_the_whole_output_is_read_back(tmp_path, monkeypatch):
    """Nothing reads the output whole after --no-verify or the sampled checks: the writer may go
    around the page cache; the whole-model check reads it back, so that one keeps it cached."""
    from flashnorm_onnx.pipeline import api
    from flashnorm_onnx.verify import policy
    from flashnorm_onnx.io import tensor_io

    monkeypatch.setattr(tensor_io, "DIRECT", None)
    asked = []
    real = tensor_io._use_direct
    monkeypatch.setattr(tensor_io, "_use_direct", lambda total, read_back=True: (asked.append(read_back), real(total, read_back))[1])
    src = _odd_model(tmp_path / "in" / "model.onnx")
    outputs = {}
    for label, kwargs in (("no-verify", dict(verify=False)), ("algebraic", dict(verify_mode="algebraic")),
                          ("onnxruntime", dict(verify_mode="onnxruntime"))):
        out = tmp_path / label / "model.onnx"
        report = api.optimize(src, out, **kwargs)
        assert report.verification.passed
        outputs[label] = (out.parent / "model.onnx.data").read_bytes()
    assert asked == [False, False, True]
    assert real(1, read_back=False) is True
    assert outputs["no-verify"] == outputs["algebraic"] == outputs["onnxruntime"]  # the same bytes either way


def test_a_tied_weight_folded_in_place_is_caught_on_a_large_model(big_model, tmp_path, monkeypatch, capsys):
    """The reviewer's case at scale: a Llama-shaped fp16 model with a tied lm_head (a Transpose of
    the embedding), checked piece by piece as a model too large to run whole, and a pass that
    believes the embedding has no other reader. The plan-diff check names the embedding's Gather
    (exit 5) and nothing is written."""
    from flashnorm_onnx import cli
    from flashnorm_onnx.passes import flashnorm_fold
    from flashnorm_onnx.verify import policy

    monkeypatch.setattr(policy, "VERIFY_MEMORY_FRACTION", 1e-12)  # "too large to run whole"
    monkeypatch.setattr(flashnorm_fold, "_outside_readers", lambda source, ours: [])
    out = tmp_path / "out" / "model.onnx"
    code = cli.main(["optimize", str(big_model[0]), "-o", str(out)])
    text = capsys.readouterr()
    assert code == 5, text.out[-2000:]
    assert "verification (subgraph+algebraic+structure+plan): FAILED" in text.out
    assert "which the fold wrote, is also read by Gather" in text.err
    assert not out.parent.exists() or not any(out.parent.iterdir())
