"""int4: ``optimize --quantize int4`` and ``--requantize`` (flashnorm_onnx/quantize.py)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import flashnorm_onnx
from flashnorm_onnx.errors import VerificationFailed
from flashnorm_onnx.quantize.int4 import QuantSpec, dequantize, quantize_model

ROOT = Path(__file__).resolve().parent.parent
RNG = np.random.default_rng(0)


def _matmul_model(weight: np.ndarray, k: int) -> onnx.ModelProto:
    dt = helper.np_dtype_to_tensor_dtype(weight.dtype)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", dt, [2, k])], [helper.make_tensor_value_info("y", dt, [2, weight.shape[1]])],
        [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 80])  # 80: the last block is zero-padded
def test_quantization_is_byte_identical_to_matmulnbitsquantizer(dtype, symmetric, k):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = _matmul_model(RNG.standard_normal((k, 24)).astype(dtype), k)
    tool = MatMulNBitsQuantizer(onnx.ModelProto.FromString(model.SerializeToString()), block_size=32,
                                is_symmetric=symmetric, accuracy_level=4)
    tool.process()
    expected = tool.model.model
    ours_ir = ir.from_proto(model)
    stats = quantize_model(ours_ir, QuantSpec(block_size=32, symmetric=symmetric, accuracy_level=4))
    ours = ir.to_proto(ours_ir)
    assert stats.quantized == 1
    a, b = _initializers(expected), _initializers(ours)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    (na,), (nb,) = expected.graph.node, ours.graph.node
    assert (na.op_type, na.domain) == (nb.op_type, nb.domain) == ("MatMulNBits", "com.microsoft")
    assert sorted((x.name, x.i) for x in na.attribute) == sorted((x.name, x.i) for x in nb.attribute)
    assert 0 < stats.weight_errors["W"] < 0.2


@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_is_what_matmulnbits_multiplies_by(symmetric):
    """accuracy level 0 on float32: ONNX Runtime's MatMulNBits output equals x @ dequantize(...)."""
    import onnxruntime as ort

    k, n = 96, 40
    model = _matmul_model(RNG.standard_normal((k, n)).astype(np.float32), k)
    m = ir.from_proto(model)
    quantize_model(m, QuantSpec(block_size=32, symmetric=symmetric, accuracy_level=0))
    proto = ir.to_proto(m)
    t = _initializers(proto)
    w = dequantize(t["W_Q4"], t["W_scales"], None if symmetric else t["W_zero_points"], k, n, 32)
    x = RNG.standard_normal((2, k)).astype(np.float32)
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
    # and it is close to the float weight, not equal: a real quantization happened
    original = numpy_helper.to_array(model.graph.initializer[0])
    assert 0.01 < np.abs(w - original).max() < 0.5


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _files(folder: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in folder.iterdir() if p.is_file()}


def _ops(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, int] = {}
    for node in model.graph.node:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return out


def _float_linears(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return sum(n.op_type == "MatMul" and n.input[1] in inits for n in model.graph.node)


def _norm_scales(path: Path) -> list[np.ndarray]:
    """The scale tensors of the fused norms of a model (the fold sets them to ones)."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("SimplifiedLayerNormalization", "RMSNormalization", "SkipSimplifiedLayerNormalization"):
            scale = node.input[2] if node.op_type.startswith("Skip") else node.input[1]
            if scale in inits:
                out.append(numpy_helper.to_array(inits[scale]))
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from models import fixtures

    return Path(fixtures.build("llama_dynamo"))


@pytest.mark.parametrize("order", ["quantize-first", "fold-first"])
def test_quantize_int4_tiny_llama(llama, tmp_path, order):
    before = _files(llama.parent)
    out = tmp_path / "q.onnx"
    report = flashnorm_onnx.optimize(llama, out, quantize=QuantSpec(), quantize_order=order)
    assert _files(llama.parent) == before  # the input is untouched
    assert _ops(out).get("MatMulNBits") == 15  # 2 layers x 7 linears + lm_head
    assert _float_linears(out) == 0  # the MatMuls left are attention's (no constant weight)
    q = report.quantization
    assert q["quantized"] == 15 and len(q["weight_errors"]) == 15
    assert all(0 < e < 0.2 for e in q["weight_errors"].values())
    assert report.quant_verification.passed and report.quant_verification.method == "onnxruntime-quantized"
    cos = [o["cosine"] for o in report.quant_verification.outputs]
    assert min(cos) > 0.97
    scales = _norm_scales(out)
    if order == "fold-first":
        assert report.folded == 5 and report.verification.passed  # the fold, checked exactly in float
        assert len(scales) == 5 and all(np.all(s == 1) for s in scales)
    else:
        # every norm is read by int4 linears only: all keep their scale, and say why
        assert report.folded == 0 and report.skipped == 5
        assert all("int4" in d.reason for d in report.decisions)
        assert len(scales) == 0 or not all(np.all(s == 1) for s in scales)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    assert "quantization (quantize)" in report.text()


def test_quantize_first_still_folds_norms_read_by_float_linears(llama, tmp_path, monkeypatch):
    """quantize-first: a norm whose linear stays float (here the lm_head, kept out of the
    quantization) is folded; the ones read by int4 linears keep their scale."""
    from flashnorm_onnx.quantize import int4 as q

    original = q.quantize_model

    def all_but_lm_head(model, spec, include=None, record_errors=True):
        weights = [q.quantizable_weight(n) for n in model.graph if q.quantizable_weight(n) is not None]
        return original(model, spec, include={id(w) for w in weights[:-1]}, record_errors=record_errors)

    monkeypatch.setattr(q, "quantize_model", all_but_lm_head)
    report = flashnorm_onnx.optimize(llama, tmp_path / "q.onnx", quantize=QuantSpec())
    assert report.folded == 1 and report.verification.passed  # the final norm, into the float lm_head
    assert _float_linears(tmp_path / "q.onnx") == 1 and report.quant_verification.passed


def test_requantize_folds_into_int4_weights(llama, tmp_path):
    int4 = tmp_path / "int4.onnx"
    flashnorm_onnx.optimize(llama, int4, quantize=QuantSpec(), quantize_order="quantize-first")
    before = _files(tmp_path)
    out = tmp_path / "out" / "rq.onnx"
    out.parent.mkdir()
    report = flashnorm_onnx.optimize(int4, out, requantize=True)
    assert _files(tmp_path) == before
    assert report.folded == 5
    q = report.quantization
    assert q["mode"] == "requantize" and q["quantized"] == 11  # q, k, v, gate, up x 2 layers + lm_head
    assert "block 32, symmetric, accuracy level 4" in q["spec"]
    assert report.verification.passed and min(o["cosine"] for o in report.verification.outputs) > 0.97
    # each requantized weight is the fold of the old int4 weight, rounded to int4 again; the others
    # are byte-identical
    old, new = onnx.load(str(int4)), onnx.load(str(out))
    old_t, new_t = _initializers(old), _initializers(new)
    old_nodes = {n.name: n for n in old.graph.node if n.op_type == "MatMulNBits"}
    untouched = 0
    for node in new.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, n, bs = attrs["K"], attrs["N"], attrs["block_size"]
        w_new = dequantize(new_t[node.input[1]], new_t[node.input[2]], None, k, n, bs)
        o = old_nodes[node.name]
        w_old = dequantize(old_t[o.input[1]], old_t[o.input[2]], None, k, n, bs)
        if node.input[1] == o.input[1]:
            untouched += 1
            continue
        # the norm's scale g, from the input model's norm (read by this linear): the new weight
        # is diag(g) w_old to within one int4 step per block, far from w_old itself
        ratio = np.linalg.norm(w_new - w_old) / np.linalg.norm(w_old)
        assert ratio > 0.2, node.name  # g in [0.5, 1.5): the weight really changed
    assert untouched == 4


def test_requantize_skips_a_norm_that_also_feeds_something_else(tmp_path):
    """RMSNorm -> MatMulNBits and -> Add (a residual): not foldable; the int4 weight untouched."""
    k, n = 64, 32
    g = (RNG.random(k) + 0.5).astype(np.float32)
    w = RNG.standard_normal((k, n)).astype(np.float32)
    nodes = [
        helper.make_node("RMSNormalization", ["x", "g"], ["h"], axis=-1, epsilon=1e-6),
        helper.make_node("MatMul", ["h", "W"], ["y"], name="mm"),
        helper.make_node("Add", ["h", "x"], ["r"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, n]),
                               helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 4, k])],
                              [numpy_helper.from_array(g, "g"), numpy_helper.from_array(w, "W")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10))
    quantize_model(model, QuantSpec())
    src = tmp_path / "int4.onnx"
    ir.save(model, str(src))
    report = flashnorm_onnx.optimize(src, tmp_path / "o.onnx", requantize=True, force_write=True)
    assert report.folded == 0 and report.skipped == 1
    assert "Add" in report.decisions[0].reason
    assert report.quantization["quantized"] == 0
    a, b = _initializers(onnx.load(str(src))), _initializers(onnx.load(str(tmp_path / "o.onnx")))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k_], b[k_]) for k_ in a)


def test_requantize_that_restored_unfolded_weights_fails_verification(llama, tmp_path, monkeypatch):
    """A mutation: --requantize makes the norms weightless but puts the old int4 weights back.
    The quantized check must catch it (nothing written)."""
    from flashnorm_onnx.quantize import int4 as q

    int4 = tmp_path / "int4.onnx"
    flashnorm_onnx.optimize(llama, int4, quantize=QuantSpec())

    def broken(model, items, **kwargs):
        for item in items:
            item.tensor = item.matmul.inputs[1].const_value  # looks unfolded: restored as it was
        return original(model, items, **kwargs)

    original = q.requantize_after_fold
    monkeypatch.setattr(q, "requantize_after_fold", broken)
    with pytest.raises(VerificationFailed):
        flashnorm_onnx.optimize(int4, tmp_path / "bad.onnx", requantize=True)
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("order", ["quantize-first", "fold-first"])
def test_codes_that_do_not_quantize_the_weight_fail_the_check(llama, tmp_path, monkeypatch, order):
    """A mutation: the int4 codes written with the low and high nibbles swapped. The whole-model
    run alone cannot be trusted to see it (int4 differs from float by design); the per-weight
    check does: exit 5, nothing written."""
    from tests.helpers import swap_int4_nibbles

    swap_int4_nibbles(monkeypatch)
    with pytest.raises(VerificationFailed, match="quantization steps"):
        flashnorm_onnx.optimize(llama, tmp_path / "bad.onnx", quantize=QuantSpec(), quantize_order=order)
    assert list(tmp_path.iterdir()) == []


def test_every_written_int4_weight_is_within_one_step(llama, tmp_path):
    for spec in (QuantSpec(), QuantSpec(block_size=16, symmetric=False), QuantSpec(block_size=128)):
        report = flashnorm_onnx.optimize(llama, tmp_path / f"q{spec.block_size}.onnx", quantize=spec)
        assert 0.4 < report.quantization["max_step_ratio"] <= 1.001
        assert any("within one quantization step" in n for n in report.notes)


def test_quantize_options_need_quantize(llama, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "flashnorm_onnx", "optimize", str(llama), "-o",
                               str(tmp_path / "o.onnx"), *args], capture_output=True, text=True)

    for args, needle in ((["--block-size", "64"], "only apply with --quantize"),
                         (["--quantize", "int4", "--block-size", "48"], "power of two"),
                         (["--quantize", "int4", "--requantize"], "--requantize"),
                         (["--quantize", "int4", "--for-ort"], "--for-ort"),
                         (["--requantize", "--verify", "subgraph"], "does not apply with --requantize")):
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_quantize_cli_writes_int4_and_reports(llama, tmp_path):
    out = tmp_path / "q.onnx"
    r = subprocess.run([sys.executable, "-m", "flashnorm_onnx", "optimize", str(llama), "-o", str(out),
                        "--quantize", "int4", "--block-size", "16", "--asymmetric", "--accuracy-level", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "int4, block 16, asymmetric, accuracy level 1" in r.stdout
    assert "verification (onnxruntime-quantized): PASSED" in r.stdout
    model = onnx.load(str(out), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(len(n.input) == 4 for n in nbits)  # zero points: asymmetric
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 16 for n in nbits)


_GENERATE = (
    "import sys, onnxruntime_genai as og\n"
    "m = og.Model(sys.argv[1]); p = og.GeneratorParams(m)\n"
    "p.set_search_options(max_length=20, do_sample=False)\n"
    "g = og.Generator(m, p); g.append_tokens([[1, 5, 9, 42, 7]])\n"
    "while not g.is_done(): g.generate_next_token()\n"
    "print(len(g.get_sequence(0)))\n"
)


def _generates(folder: Path) -> None:
    python = ROOT / ".venv-genai" / "bin" / "python"
    r = subprocess.run([str(python), "-c", _GENERATE, str(folder)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "20"


@pytest.mark.genai
def test_requantize_genai_int4_folder_generates(tmp_path):
    """The genai builder's int4 folder, --requantize: norms folded into MatMulNBits, the tied
    embedding's int4 tensor kept for GatherBlockQuantized, and onnxruntime-genai generates."""
    from models import fixtures

    src = fixtures.build("qwen3_genai_int4").parent
    before = {p.name: _sha(p) for p in src.iterdir() if p.is_file()}
    out = tmp_path / "out"
    report = flashnorm_onnx.optimize(src, out, requantize=True)
    model = report.models["model.onnx"]
    # input_layernorm x 2 -> packed qkv, post-attention x 2 -> gate/up, final -> lm_head;
    # q_norm/k_norm feed attention, not linears
    assert model.folded == 5 and model.quantization["quantized"] == 7
    assert model.verification.passed
    assert any("lm_head.MatMul.weight_Q4" in n for n in model.notes)  # untied from the embedding
    assert (out / "genai_config.json").read_text() == (src / "genai_config.json").read_text()
    assert {p.name: _sha(p) for p in src.iterdir() if p.is_file()} == before
    _generates(out)


@pytest.mark.genai
def test_quantize_genai_fp32_folder_generates(tmp_path):
    from models import fixtures

    src = fixtures.build("qwen3_genai_fp32").parent
    out = tmp_path / "out"
    report = flashnorm_onnx.optimize(src, out, quantize=QuantSpec())
    model = report.models["model.onnx"]
    assert model.quantization["quantized"] > 0 and model.quant_verification.passed
    assert "int4 check PASSED" in report.summary_line()
    assert _ops(out / "model.onnx").get("MatMulNBits") == model.quantization["quantized"]
    _generates(out)


@pytest.mark.parametrize("order", ["fold-first", "quantize-first"])
def test_quantize_streams_one_weight_at_a_time(tmp_path, order):
    """A 300 MB fp16 model: --quantize keeps peak memory well below the model's size (the int4
    tensors are computed as each is written), in either order."""
    from models import synthetic
    from tests.helpers import MB, peak_rss_of as _peak_rss_of

    dims = synthetic.shape_for_bytes(300 * MB, "float16", hidden=1024)
    path = tmp_path / "in" / "model.onnx"
    path.parent.mkdir()
    synthetic.build(path, *dims, dtype="float16")
    data_bytes = synthetic.estimate_bytes(*dims, "float16")
    out = tmp_path / "q.onnx"
    cmd = [sys.executable, "-m", "flashnorm_onnx", "optimize", str(path), "-o", str(out), "--quantize", "int4",
           "--quantize-order", order, "--no-verify"]
    peak, proc = _peak_rss_of(cmd)
    assert proc.returncode == 0, proc.stderr
    assert _ops(out).get("MatMulNBits", 0) > 0
    assert peak < 0.3 * data_bytes + 300 * MB, f"peak RSS {peak / MB:.0f} MB for {data_bytes / MB:.0f} MB of data"


def test_a_weight_two_matmuls_read_is_quantized_once_and_stays_shared(tmp_path):
    import onnxruntime as ort

    k, n = 64, 32
    w = RNG.standard_normal((k, n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y1"], name="a"), helper.make_node("MatMul", ["x2", "W"], ["y2"], name="b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k]),
                                           helper.make_tensor_value_info("x2", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [2, n]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, n])],
                              [numpy_helper.from_array(w, "W")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))
    stats = quantize_model(model, QuantSpec(accuracy_level=0))
    proto = ir.to_proto(model)
    assert stats.quantized == 2 and sorted(t.name for t in proto.graph.initializer) == ["W_Q4", "W_scales"]
    assert [list(node.input[1:]) for node in proto.graph.node] == [["W_Q4", "W_scales"]] * 2
    x = RNG.standard_normal((2, k)).astype(np.float32)
    y1, y2 = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "x2": x})
    np.testing.assert_array_equal(y1, y2)
