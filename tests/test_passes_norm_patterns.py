"""Every RMSNorm form and every reader kind, on hand-built graphs, checked in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from flashnorm_onnx import FlashNormFoldPass
from tests import graphs
from tests.helpers import fold, assert_same


def norm_scales(model: onnx.ModelProto) -> list[np.ndarray]:
    """The scale input of every fused norm in the output."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("SimplifiedLayerNormalization", "RMSNormalization", "LayerNormalization"):
            out.append(inits[node.input[1]])
        elif node.op_type.startswith("Skip"):
            out.append(inits[node.input[2]])
    return out


@pytest.mark.parametrize("form", graphs.RMS_FORMS)
def test_each_form_folds_exactly(form):
    model = graphs.build(form, consumers=("matmul", "matmul_t"))
    out, report = fold(model)
    assert [d.status for d in report.decisions] == ["folded"], report.text()
    tol = 2e-2 if form == "fp16_chain" else 1e-5
    assert_same(model, out, rtol=tol, atol=tol)
    scales = norm_scales(out)
    assert len(scales) == 1 and np.all(scales[0] == 1)
    # the norm is one fused kernel afterwards
    fused = [n.op_type for n in out.graph.node if "Normalization" in n.op_type]
    assert len(fused) == 1
    assert not any(n.op_type in ("Pow", "ReduceMean", "Sqrt") for n in out.graph.node)


@pytest.mark.parametrize("form", ["dynamo", "legacy", "fp16_chain"])
def test_keep_structure_keeps_the_chain(form):
    model = graphs.build(form)
    out, report = fold(model, keep_structure=True)
    assert report.folded == 1
    ops = [n.op_type for n in out.graph.node]
    assert "ReduceMean" in ops and "SimplifiedLayerNormalization" not in ops
    tol = 2e-2 if form == "fp16_chain" else 1e-5
    assert_same(model, out, rtol=tol, atol=tol)


def test_opset23_chain_becomes_rmsnormalization():
    model = graphs.build("dynamo")
    model.opset_import[0].version = 23
    out, _ = fold(model)
    assert [n.op_type for n in out.graph.node if "Normal" in n.op_type] == ["RMSNormalization"]
    assert out.opset_import[0].version == 23
    assert_same(model, out)


@pytest.mark.parametrize(
    "consumers",
    [("matmul",), ("matmul_t",), ("gemm",), ("gemm_tb",), ("cast_matmul",), ("matmul_castw",),
     ("matmul", "matmul", "matmul"), ("shared",), ("fused_matmul",), ("fused_matmul_tb", "matmul"),
     ("scaled_matmul",), ("scaled_matmul", "matmul_t")],
)
def test_each_reader_kind(consumers):
    model = graphs.build("dynamo", consumers=consumers)
    out, report = fold(model)
    assert report.folded == 1, report.text()
    fp16 = any(c in ("cast_matmul", "matmul_castw") for c in consumers)
    assert_same(model, out, rtol=1e-2 if fp16 else 1e-5, atol=1e-2 if fp16 else 1e-5)


@pytest.mark.parametrize("consumers", [("fused_matmul",), ("fused_matmul_tb",)])
def test_layernorm_bias_into_fused_matmul_is_scaled_by_alpha(consumers):
    """(x*g + beta) @ B * alpha == x @ (g*B) * alpha + alpha * (beta @ B): the moved bias carries alpha."""
    model = graphs.build("layernorm", consumers=consumers)
    out, report = fold(model)
    assert report.folded == 1, report.text()
    assert_same(model, out)


@pytest.mark.parametrize("form, consumers, reason", [
    ("layernorm", ("scaled_matmul",), "scalar Mul"),  # the moved bias would need the scalar too
    ("dynamo", ("vector_mul_matmul",), "not a linear layer"),
])
def test_scaled_readers_that_cannot_fold(form, consumers, reason):
    model = graphs.build(form, consumers=consumers)
    out, report = fold(model)
    (decision,) = report.decisions
    assert decision.status == "skipped" and reason in decision.reason, decision.reason
    assert_same(model, out, rtol=0, atol=0)


def test_mixture_of_experts_row_selection_folds(tmp_path):
    """The router and the expert (through Unsqueeze and a Gather of rows) both fold. The graph
    has no value_info: the Gather's rank comes from the shape inference optimize runs first."""
    from flashnorm_onnx import optimize

    model = graphs.build("dynamo", consumers=("moe",))
    src = graphs.save(model, tmp_path / "moe.onnx")
    report = optimize(src, tmp_path / "out.onnx")
    (decision,) = report.decisions
    assert decision.status == "folded", decision.reason
    assert len(decision.consumers) == 2 and report.verification.passed
    assert_same(model, onnx.load(str(tmp_path / "out.onnx")))


def test_fused_matmul_that_transposes_the_activation_is_refused():
    model = graphs.build("dynamo", consumers=("fused_matmul_ta",))
    out, report = fold(model)
    (decision,) = report.decisions
    assert decision.status == "skipped" and "transA" in decision.reason
    assert_same(model, out, rtol=0, atol=0)


def test_weights_written_once_when_one_tensor_feeds_two_readers():
    model = graphs.build("dynamo", consumers=("shared",))
    out, report = fold(model)
    records = report.decisions[0].consumers
    assert sorted(r.action for r in records) == ["in place", "shared in place"]
    assert report.tensors_written == 1


def test_shape_readers_do_not_block():
    model = graphs.build("legacy", extra=("shape",))
    out, report = fold(model)
    assert report.folded == 1
    assert report.decisions[0].shape_readers == 1
    assert_same(model, out)


@pytest.mark.parametrize(
    "extra, reason",
    [
        (("residual",), "residual"),
        (("graph_output",), "graph output"),
        (("weight_input",), "graph input"),
    ],
)
def test_unfoldable_readers_skip_with_reason(extra, reason):
    model = graphs.build("dynamo", extra=extra)
    out, report = fold(model)
    (decision,) = report.decisions
    assert decision.status == "skipped"
    assert reason in decision.reason
    assert_same(model, out, rtol=0, atol=0)  # untouched


def test_tied_weight_is_untied_not_written():
    model = graphs.build("dynamo", consumers=("tied",))
    emb_before = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "emb")).copy()
    out, report = fold(model)
    (decision,) = report.decisions
    assert decision.status == "folded"
    assert [c.action for c in decision.consumers] == ["untied copy"]
    assert decision.bytes_added == emb_before.nbytes
    emb_after = onnx.numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == "emb"))
    assert emb_after.tobytes() == emb_before.tobytes()
    assert_same(model, out)


def test_no_untie_skips_tied():
    model = graphs.build("dynamo", consumers=("tied",))
    out, report = fold(model, untie=False)
    (decision,) = report.decisions
    assert decision.status == "skipped"
    assert "Gather" in decision.reason and "--no-untie" in decision.reason


def test_shared_gamma_between_two_norms():
    """Two norms reading one gamma initializer (deduplicated by an exporter)."""
    a = graphs.build("dynamo")
    g = a.graph
    # second norm: copy of the chain on another input, same 'g', its own weight
    rename = lambda s: s if s in ("g", "eps", "two", "axes") else (s + "_2" if s else s)  # noqa: E731
    extra_nodes = []
    for node in list(g.node):
        n2 = onnx.helper.make_node(node.op_type, [rename(i) for i in node.input], [rename(o) for o in node.output])
        n2.attribute.extend(node.attribute)
        extra_nodes.append(n2)
    g.node.extend(extra_nodes)
    for init in list(g.initializer):
        if init.name.startswith("w"):
            c = onnx.TensorProto()
            c.CopyFrom(init)
            c.name = init.name + "_2"
            g.initializer.append(c)
    g.input.append(onnx.helper.make_tensor_value_info("x_2", onnx.TensorProto.FLOAT, ["batch", "seq", graphs.K]))
    for o in list(g.output):
        g.output.append(onnx.helper.make_tensor_value_info(o.name + "_2", onnx.TensorProto.FLOAT, None))
    out, report = fold(a)
    assert report.folded == 2
    assert_same(a, out)


def test_idempotent_and_already_weightless():
    model = graphs.build("legacy")
    once, r1 = fold(model)
    twice, r2 = fold(once)
    assert r1.folded == 1
    assert [d.status for d in r2.decisions] == ["already-weightless"]
    assert r2.folded == 0
    ones = graphs.build("dynamo", scale=np.ones(graphs.K))
    _, r3 = fold(ones)
    assert [d.status for d in r3.decisions] == ["already-weightless"]


def test_fp16_overflow_is_refused():
    model = graphs.build("fp16_chain", scale=np.full(graphs.K, 60000.0))
    w = next(i for i in model.graph.initializer if i.name == "w0")
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * np.float16(10), "w0"))
    # |w| reaches several units: g*w exceeds the fp16 maximum 65504
    out, report = fold(model)
    (decision,) = report.decisions
    assert decision.status == "skipped" and "float16" in decision.reason


def test_bfloat16_weights():
    import ml_dtypes

    model = graphs.build("dynamo", consumers=("matmul",))
    w = next(i for i in model.graph.initializer if i.name == "w0")
    arr = onnx.numpy_helper.to_array(w).astype(ml_dtypes.bfloat16)
    ir_model = ir.serde.deserialize_model(model)
    ir_model.graph.initializers["w0"].const_value = ir.Tensor(arr, name="w0")
    # weight bf16 reached through a Cast to float
    mm = next(n for n in ir_model.graph if n.op_type == "MatMul")
    cast = ir.node("Cast", [ir_model.graph.initializers["w0"]], attributes={"to": ir.DataType.FLOAT})
    ir_model.graph.insert_before(mm, cast)
    mm.replace_input_with(1, cast.outputs[0])
    g = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "g"))
    result = FlashNormFoldPass()(ir_model)
    assert result.report.folded == 1
    folded = ir_model.graph.initializers["w0"].const_value.numpy()
    assert folded.dtype == ml_dtypes.bfloat16
    expected = (arr.astype(np.float32) * g[:, None].astype(np.float32)).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(folded.astype(np.float32), expected.astype(np.float32))


def test_quantized_reader_is_refused():
    model = graphs.build("sln", consumers=("matmul",))
    mm = next(n for n in model.graph.node if n.op_type == "MatMul")
    mm.op_type, mm.domain = "MatMulNBits", "com.microsoft"
    _, report = fold(model)
    assert report.decisions[0].status == "skipped"
    assert "MatMulNBits" in report.decisions[0].reason


def test_norm_over_other_axis_is_refused():
    model = graphs.build("legacy17")
    rm = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    rm.attribute[0].ints[:] = [1]
    _, report = fold(model)
    assert report.decisions[0].status == "skipped" and "last axis" in report.decisions[0].reason


def test_skip_sln_residual_output_untouched():
    model = graphs.build("skip_sln")
    out, report = fold(model)
    assert report.folded == 1
    node = next(n for n in out.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
    assert node.output[3] == "resid"
    assert_same(model, out)
