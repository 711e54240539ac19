"""The fold inside control flow (issue 23): If branches, Loop bodies, model-local functions.

Hand-built graphs, each run in ONNX Runtime against its unfolded self on every branch:

* a merged-decoder-like ``If`` whose two branches normalise ``x`` with equal scales (two
  initializers, equal values) and read one outer weight: both norms fold, the weight is written
  once, in place; with unequal scales, each scale gets its own copy;
* a ``Loop`` whose body normalises its carried state into a MatMul with an outer weight;
* a norm inside a model-local function: skipped, with the reason;
* a broken pass (the weight written in place although the other branch reads it with another
  scale) fails every verification mode, the plan-diff naming the other branch's reader.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from flashnorm_onnx.passes import flashnorm_fold
from flashnorm_onnx.passes.flashnorm_fold import FlashNormFoldPass
from tests.graphs import run, save
from tests.helpers import run_mode, snapshot

K, N = 16, 8
EPS = 1e-6


def _init(name: str, array: np.ndarray) -> TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(array), name)


def _rms_nodes(x: str, scale: str, out: str, tag: str) -> list[onnx.NodeProto]:
    """x / sqrt(mean(x^2) + eps) * scale, in the decomposed form exporters write."""
    return [
        helper.make_node("Mul", [x, x], [f"{tag}/sq"]),
        helper.make_node("ReduceMean", [f"{tag}/sq"], [f"{tag}/ms"], axes=[-1], keepdims=1),
        helper.make_node("Add", [f"{tag}/ms", "eps"], [f"{tag}/var"]),
        helper.make_node("Sqrt", [f"{tag}/var"], [f"{tag}/std"]),
        helper.make_node("Reciprocal", [f"{tag}/std"], [f"{tag}/inv"]),
        helper.make_node("Mul", [x, f"{tag}/inv"], [f"{tag}/normed"]),
        helper.make_node("Mul", [f"{tag}/normed", scale], [out], name=f"{tag}/scale"),
    ]


def if_model(equal_scales: bool = True, seed: int = 0) -> onnx.ModelProto:
    """out = If(cond, then: rms(x)*g1 @ W, else: rms(x)*g2 @ W + 1): the shape of optimum's merged
    decoder (sibling branches using the same value names, one outer weight)."""
    rng = np.random.default_rng(seed)
    g1 = rng.uniform(0.5, 1.5, K).astype(np.float32)
    g2 = g1.copy() if equal_scales else rng.uniform(0.5, 1.5, K).astype(np.float32)
    out_info = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    then = helper.make_graph(_rms_nodes("x", "g1", "h", "n") + [helper.make_node("MatMul", ["h", "W"], ["y"])],
                             "then", [], out_info)
    other = helper.make_graph(_rms_nodes("x", "g2", "h", "n") + [helper.make_node("MatMul", ["h", "W"], ["p"]),
                                                                  helper.make_node("Add", ["p", "one"], ["y"])],
                              "else", [], out_info)
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["out"], name="merged", then_branch=then, else_branch=other)], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", N])],
        [_init("g1", g1), _init("g2", g2), _init("W", rng.standard_normal((K, N)).astype(np.float32)),
         _init("eps", np.array(EPS, np.float32)), _init("one", np.array(1.0, np.float32))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def loop_model(seed: int = 0) -> onnx.ModelProto:
    """A Loop of 3 steps: state = rms(state) * g @ W (W square), scan output the state."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        _rms_nodes("s_in", "g", "h", "n") + [helper.make_node("MatMul", ["h", "W"], ["s_out"]),
                                             helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["out"], name="loop", body=body)], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", K])],
        [_init("g", rng.uniform(0.5, 1.5, K).astype(np.float32)),
         _init("W", (rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32)),
         _init("eps", np.array(EPS, np.float32)), _init("trips", np.array(3, np.int64))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def function_model(seed: int = 0) -> onnx.ModelProto:
    """A norm and its linear inside a model-local function (constants in the body)."""
    rng = np.random.default_rng(seed)
    consts = [helper.make_node("Constant", [], ["g"], value=_init("g", rng.uniform(0.5, 1.5, K).astype(np.float32))),
              helper.make_node("Constant", [], ["W"], value=_init("W", rng.standard_normal((K, N)).astype(np.float32))),
              helper.make_node("Constant", [], ["eps"], value=_init("eps", np.array(EPS, np.float32)))]
    body = consts + _rms_nodes("x", "g", "h", "n") + [helper.make_node("MatMul", ["h", "W"], ["y"])]
    function = helper.make_function("local", "NormLinear", ["x"], ["y"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("NormLinear", ["x"], ["out"], domain="local")], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", N])])
    return helper.make_model(graph, functions=[function],
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                             ir_version=10)


def _fold(proto: onnx.ModelProto):
    model = ir.serde.deserialize_model(proto)
    result = FlashNormFoldPass()(model)
    return ir.serde.serialize_model(model), result


def _feeds(cond: bool | None, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((2, 3, K)).astype(np.float32)}
    if cond is not None:
        feeds["cond"] = np.array([cond])
    return feeds


def test_both_branches_fold_and_the_shared_weight_is_written_once_in_place():
    proto = if_model(equal_scales=True)
    folded, result = _fold(proto)
    decisions = result.report.decisions
    assert [d.status for d in decisions] == ["folded", "folded"], [d.line() for d in decisions]
    assert {d.name.split("@")[0] for d in decisions} == {"then_branch", "else_branch"}
    # one tensor written, W itself, in place; the second branch's reader shares it
    assert result.written == {"W": "W"}, result.written
    actions = sorted(c.action for d in decisions for c in d.consumers)
    assert actions == ["in place", "shared in place"], actions
    # no copy of W: every other initializer is a vector (the weightless norms' ones, eps, the 1)
    assert [t.name for t in folded.graph.initializer if np.prod(t.dims) > K] == ["W"]
    for cond in (True, False):
        [want], [got] = run(proto, _feeds(cond)), run(folded, _feeds(cond))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"cond={cond}")


def test_unequal_scales_give_one_copy_each():
    proto = if_model(equal_scales=False)
    folded, result = _fold(proto)
    assert [d.status for d in result.report.decisions] == ["folded", "folded"]
    assert sorted(result.written.values()) == ["W", "W"] and "W" not in result.written, result.written
    # W itself is never written; with both readers moved to their copies, nothing reads it any more
    big = sorted(t.name for t in folded.graph.initializer if np.prod(t.dims) > K)
    assert big == sorted(result.written) and len(big) == 2, big
    for cond in (True, False):
        [want], [got] = run(proto, _feeds(cond)), run(folded, _feeds(cond))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"cond={cond}")


def test_a_norm_in_a_loop_body_folds():
    proto = loop_model()
    folded, result = _fold(proto)
    [decision] = result.report.decisions
    assert decision.status == "folded" and decision.name.startswith("body@out/"), decision.line()
    assert result.written == {"W": "W"}
    x = np.random.default_rng(2).standard_normal((2, K)).astype(np.float32)
    [want], [got] = run(proto, {"x": x}), run(folded, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_norm_in_a_function_is_reported_skipped_with_the_reason():
    proto = function_model()
    folded, result = _fold(proto)
    [decision] = result.report.decisions
    assert decision.status == "skipped" and "inside model-local function 'local::NormLinear'" in decision.reason
    assert not result.modified
    x = np.random.default_rng(2).standard_normal((2, K)).astype(np.float32)
    np.testing.assert_array_equal(run(folded, {"x": x})[0], run(proto, {"x": x})[0])


MODES = ["onnxruntime", "subgraph", "algebraic", "auto-large"]


@pytest.mark.parametrize("mode", MODES)
def test_the_merged_model_verifies_in_every_mode(mode, tmp_path, monkeypatch, capsys):
    src = save(if_model(equal_scales=False), tmp_path / "m.onnx")
    code, text = run_mode(mode, src, tmp_path / "out.onnx", monkeypatch, capsys)
    assert code == 0, text
    assert "2 folded" in text or "folded 2" in text or "2 norms" in text, text


@pytest.mark.parametrize("mode", MODES)
def test_a_weight_written_in_place_under_another_branch_fails_every_mode(mode, tmp_path, monkeypatch, capsys):
    """The broken pass sees no outside reader: W is folded in place with one branch's scale, which the
    other branch (another scale) then reads. Nothing is written; the plan-diff names the branch."""
    monkeypatch.setattr(flashnorm_fold, "_outside_readers", lambda source, ours: [])
    src = save(if_model(equal_scales=False), tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    code, text = run_mode(mode, src, tmp_path / "out.onnx", monkeypatch, capsys)
    assert code == 5, text
    assert snapshot(tmp_path) == before
    if mode != "onnxruntime":
        assert "_branch@out/" in text, text
