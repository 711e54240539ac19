"""Packing the linears that read one value into one MatMul + Split (flashnorm_onnx/fusions/packing.py).

Asserted on hand-built graphs and on the tiny Llama export after ``--for-ort``: the packed model
computes the input's outputs in ONNX Runtime; Q/K/V and gate/up groups become one MatMul each;
a tied or shared weight, a weight of another dtype or width K, and a MatMul reading another
input are left alone; no tensor is copied (the total weight bytes do not grow).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from flashnorm_onnx.fusions.packing import pack_linears
from tests.graphs import run

K = 16


def _model(shared: bool = False) -> onnx.ModelProto:
    """x -> three MatMuls (q, k, v: 16, 8, 8 columns) and a fourth by a weight also read by a Gather
    (``shared``) or by its own weight; outputs: each product."""
    rng = np.random.default_rng(0)
    ws = {name: rng.standard_normal((K, n)).astype(np.float32) for name, n in (("Wq", 16), ("Wk", 8), ("Wv", 8))}
    nodes = [helper.make_node("MatMul", ["x", w], [f"y_{w}"]) for w in ws]
    outputs = [helper.make_tensor_value_info(f"y_{w}", TensorProto.FLOAT, None) for w in ws]
    inits = [onnx.numpy_helper.from_array(a, n) for n, a in ws.items()]
    e = rng.standard_normal((K, 4)).astype(np.float32)
    inits.append(onnx.numpy_helper.from_array(e, "E"))
    nodes.append(helper.make_node("MatMul", ["x", "E"], ["y_E"]))
    outputs.append(helper.make_tensor_value_info("y_E", TensorProto.FLOAT, None))
    if shared:  # E is also read by a Gather: never packed (no copy)
        inits.append(onnx.numpy_helper.from_array(np.array([0, 1], np.int64), "idx"))
        nodes.append(helper.make_node("Gather", ["E", "idx"], ["g"]))
        outputs.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _pack(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    model = ir.serde.deserialize_model(proto)
    count = pack_linears(model)
    return ir.serde.serialize_model(model), count


def _weight_bytes(proto: onnx.ModelProto) -> int:
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer if len(t.dims) == 2)


def _feeds() -> dict:
    return {"x": np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)}


def test_one_matmul_and_a_split_compute_the_same_outputs():
    proto = _model()
    packed, count = _pack(proto)
    assert count == 1
    ops = Counter(n.op_type for n in packed.graph.node)
    assert ops == {"MatMul": 1, "Split": 1}, ops
    assert [o.name for o in packed.graph.output] == [o.name for o in proto.graph.output]
    assert _weight_bytes(packed) == _weight_bytes(proto)
    for want, got in zip(run(proto, _feeds()), run(packed, _feeds())):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_shared_weight_is_not_packed_or_copied():
    proto = _model(shared=True)
    packed, count = _pack(proto)
    assert count == 1
    ops = Counter(n.op_type for n in packed.graph.node)
    assert ops["MatMul"] == 2 and ops["Split"] == 1, ops  # q/k/v packed; E's MatMul left alone
    assert "E" in {t.name for t in packed.graph.initializer}
    assert _weight_bytes(packed) == _weight_bytes(proto)
    for want, got in zip(run(proto, _feeds()), run(packed, _feeds())):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_the_folded_llama_packs_qkv_and_gate_up_per_layer(tmp_path):
    from flashnorm_onnx.cli import main
    from models import fixtures

    source = fixtures.build("llama_dynamo")
    folded = tmp_path / "f.onnx"
    assert main(["optimize", str(source), "-o", str(folded), "--for-ort", "--pack-linears", "none", "-q"]) == 0
    proto = onnx.load(str(folded))
    before = Counter(n.op_type for n in proto.graph.node)
    packed, count = _pack(proto)
    after = Counter(n.op_type for n in packed.graph.node)
    assert count == 4  # 2 layers x (q/k/v, gate/up)
    assert after["MatMul"] == before["MatMul"] - 5 * 2 + 2 * 2 and after["Split"] == before.get("Split", 0) + 4
    rng = np.random.default_rng(2)
    mask = np.ones((2, 6), np.int64)
    mask[0, :2] = 0
    feeds = {"input_ids": rng.integers(0, 500, (2, 6)).astype(np.int64), "attention_mask": mask}
    [want], [got] = run(proto, feeds)[:1], run(packed, feeds)[:1]
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-5, atol=1e-5)


def test_pack_linears_through_the_cli_is_verified_and_named(tmp_path, capsys):
    import json

    from flashnorm_onnx.cli import main
    from models import fixtures

    source, out, report = fixtures.build("llama_dynamo"), tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["optimize", str(source), "-o", str(out), "--for-ort", "--pack-linears", "--report", str(report),
                 "-q"]) == 0
    data = json.loads(report.read_text())
    assert data["ort_fusions"]["packed_linears"] == 4 and data["verification"]["passed"]
    # the gate/up Splits; the Q/K/V ones are read by nothing once GroupQueryAttention reads the
    # packed tensor, and are gone
    assert Counter(n.op_type for n in onnx.load(str(out)).graph.node)["Split"] == 2
    capsys.readouterr()
    # the default with --for-ort: only Q/K/V, which each GroupQueryAttention then reads packed
    assert main(["optimize", str(source), "-o", str(out), "--for-ort", "--report", str(report), "-q",
                 "--force"]) == 0
    data = json.loads(report.read_text())
    assert data["ort_fusions"]["packed_linears"] == 2 and data["verification"]["passed"]
    assert data["ort_fusions"]["group_query_attention_packed_qkv"] == 2
    gqa = [n for n in onnx.load(str(out)).graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.input[1] == n.input[2] == "" for n in gqa)
    assert Counter(n.op_type for n in onnx.load(str(out)).graph.node)["Split"] == 0
    capsys.readouterr()
    assert main(["optimize", str(source), "-o", str(tmp_path / "x.onnx"), "--pack-linears"]) == 2
    assert "--pack-linears applies with --for-ort only" in capsys.readouterr().err


def test_pack_linears_settings():
    import pytest

    from flashnorm_onnx.pipeline.options import FoldOptions

    assert FoldOptions(for_ort=True).pack_linears == "attention"
    assert FoldOptions(for_ort=True, pack_linears=True).pack_linears == "all"
    assert FoldOptions(for_ort=True, pack_linears=False).pack_linears == "none"
    assert FoldOptions().pack_linears == "attention"  # no effect without for_ort
    with pytest.raises(ValueError, match="for_ort only"):
        FoldOptions(pack_linears="all")
    with pytest.raises(ValueError, match="must be one of"):
        FoldOptions(for_ort=True, pack_linears="qkv")
