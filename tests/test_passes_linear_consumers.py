"""``Einsum`` readers written as a linear map (``"...k,kn->...n"``, ``"bsk,nk->bsn"``): folded when
the equation contracts exactly the norm's channel axis with an axis of a constant weight,
refused with a reason otherwise. Each graph is built with onnx.helper and the folded model is
compared with the unfolded one in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from flashnorm_onnx import FlashNormFoldPass
from flashnorm_onnx.passes import linear_consumers
from tests import graphs

K = 16
EPS = 1e-6


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def build(
    readers: list[tuple[str, tuple[int, ...]]],
    norm: str = "rms",
    x_shape: tuple = ("batch", "seq", K),
    bias_after: bool = False,
    transpose_weight: bool = False,
    shared_weight: bool = False,
    norm_second: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """One norm over x and ``readers``: (equation, weight shape) each, ``Einsum(y, W_i)``.

    norm: "rms" (the dynamo chain Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul ->
    Mul(g)) or "layernorm" (LayerNormalization with a bias). bias_after: Add(constant) after
    the first reader. transpose_weight: the first weight is Transpose(W^T). shared_weight: every
    reader reads the first weight. norm_second: the first Einsum reads (W, y) instead.
    """
    rng = np.random.default_rng(seed)
    g = rng.uniform(0.5, 1.5, size=K).astype(np.float32)
    nodes, inits = [], [_init("g", g)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    outputs = []
    if norm == "rms":
        inits += [_init("eps", np.array(EPS, np.float32)), _init("two", np.array(2.0, np.float32)),
                  _init("axes", np.array([-1], np.int64))]
        nodes += [helper.make_node("Pow", ["x", "two"], ["sq"]),
                  helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
                  helper.make_node("Add", ["ms", "eps"], ["mse"]),
                  helper.make_node("Sqrt", ["mse"], ["rms"]),
                  helper.make_node("Reciprocal", ["rms"], ["inv"]),
                  helper.make_node("Mul", ["x", "inv"], ["n"]),
                  helper.make_node("Mul", ["g", "n"], ["y"])]
    elif norm == "layernorm":
        inits.append(_init("beta", rng.standard_normal(K).astype(np.float32) * 0.5))
        nodes.append(helper.make_node("LayerNormalization", ["x", "g", "beta"], ["y"], axis=-1, epsilon=EPS))
    else:
        raise ValueError(norm)
    for i, (equation, shape) in enumerate(readers):
        w = f"W{i}"
        if shared_weight and i > 0:
            w = "W0"
        else:
            array = (rng.standard_normal(shape) / np.sqrt(K)).astype(np.float32)
            if i == 0 and transpose_weight:
                inits.append(_init("W0_t", np.ascontiguousarray(array.T)))
                nodes.append(helper.make_node("Transpose", ["W0_t"], [w], perm=[1, 0]))
            else:
                inits.append(_init(w, array))
        operands = [w, "y"] if (i == 0 and norm_second) else ["y", w]
        out = f"out{i}"
        nodes.append(helper.make_node("Einsum", operands, [out if not (i == 0 and bias_after) else "lin0"],
                                      equation=equation))
        if i == 0 and bias_after:
            n_out = shape[1] if equation.split(",")[1][0] == equation.split(",")[0][-1] else shape[0]
            inits.append(_init("c0", rng.standard_normal(n_out).astype(np.float32)))
            nodes.append(helper.make_node("Add", ["lin0", "c0"], [out]))
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "einsum_readers", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def fold(model: onnx.ModelProto, **kwargs):
    ir_model = ir.serde.deserialize_model(model)
    result = FlashNormFoldPass(**kwargs)(ir_model)
    return ir.serde.serialize_model(result.model), result.report


def assert_same(a: onnx.ModelProto, b: onnx.ModelProto, rtol=1e-5, atol=1e-5):
    feeds = graphs.feeds_for(a, seed=1)
    outs_a, outs_b = graphs.run(a, feeds), graphs.run(b, feeds)
    assert len(outs_a) == len(outs_b)
    for x, y in zip(outs_a, outs_b):
        np.testing.assert_allclose(y.astype(np.float64), x.astype(np.float64), rtol=rtol, atol=atol)


def _scale(model: onnx.ModelProto) -> np.ndarray:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if "Normalization" in n.op_type)
    return inits[node.input[1]]


FOLDED = {
    "ellipsis_kn": ([("...k,kn->...n", (K, 8))], {}),
    "bsk_nk": ([("bsk,nk->bsn", (8, K))], {}),
    "bsk_kn_bias_add": ([("bsk,kn->bsn", (K, 8))], dict(bias_after=True)),
    "batch_axes_permuted": ([("bsk,kn->sbn", (K, 8))], {}),
    "rank2_input": ([("bk,nk->bn", (8, K))], dict(x_shape=("batch", K))),
    "upper_case": ([("BSK,NK->BSN", (8, K))], {}),
    "transposed_weight": ([("bsk,kn->bsn", (K, 8))], dict(transpose_weight=True)),
    "two_readers": ([("bsk,kn->bsn", (K, 8)), ("...k,nk->...n", (12, K))], {}),
    # one square weight read along its rows by one Einsum and its columns by the other: untied
    "shared_both_axes": ([("bsk,kn->bsn", (K, K)), ("bsk,nk->bsn", (K, K))], dict(shared_weight=True)),
}


@pytest.mark.parametrize("norm", ["rms", "layernorm"])
@pytest.mark.parametrize("case", sorted(FOLDED))
def test_linear_einsum_folds_exactly(case, norm):
    readers, kwargs = FOLDED[case]
    model = build(readers, norm=norm, **kwargs)
    out, report = fold(model)
    (decision,) = report.decisions
    assert decision.status == "folded", report.text()
    assert len(decision.consumers) == len(readers)
    assert all(c.op == "Einsum" for c in decision.consumers)
    if case == "shared_both_axes":
        assert sorted(c.action for c in decision.consumers) == ["untied copy", "untied copy"]
    assert np.all(_scale(out) == 1)
    assert_same(model, out)
    # idempotent: the weightless norm is recognised, nothing more to fold
    _, again = fold(out)
    assert [d.status for d in again.decisions] == ["already-weightless"]


def test_k_axis_of_each_equation():
    def k_axis(equation):
        node = ir.Node("", "Einsum", [ir.Value(name="y"), ir.Value(name="w")],
                       attributes=[ir.AttrString("equation", equation)])
        return linear_consumers.einsum_linear(node)

    assert k_axis("...k,kn->...n") == 0
    assert k_axis("bsk,nk->bsn") == 1
    assert k_axis(" b s k , k n -> b s n ") == 0
    assert k_axis("bk,kn->bn") == 0
    assert k_axis("bsk,kn->sbn") == 0


REFUSED = {
    # equation, weight shape, extra build options, words the reason must contain
    "channels_kept": ("bsk,kn->bskn", (K, 8), {}, "keeps the norm's channels"),
    "sums_another_axis": ("bsk,kn->bn", (K, 8), {}, "does not keep every other axis"),
    "output_axis_not_last": ("bsk,kn->bns", (K, 8), {}, "last in its output"),
    "channels_not_contracted": ("bsk,nd->bsknd", (8, 4), {}, "does not contract the norm's channels"),
    "contracts_another_axis": ("bsk,sn->bkn", (5, 8), dict(x_shape=("batch", 5, K)),
                               "does not contract the norm's channels"),
    "multi_head_weight": ("bsk,khd->bshd", (K, 2, 4), {}, "as a [K, N] matrix"),
    "implicit_output": ("bsk,kn", (K, 8), {}, "not an explicit two-operand equation"),
    "norm_is_second_operand": ("nk,bsk->bsn", (8, K), dict(norm_second=True), "as its second operand"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_nonlinear_einsum_is_refused_with_a_reason(case):
    equation, shape, kwargs, words = REFUSED[case]
    model = build([(equation, shape)], **kwargs)
    graphs.run(model, graphs.feeds_for(model))  # a valid model: ORT runs it
    out, report = fold(model)
    (decision,) = report.decisions
    assert decision.status == "skipped" and words in decision.reason, decision.reason
    assert "Einsum" in decision.reason
    assert_same(model, out, rtol=0, atol=0)


def test_one_refused_reader_blocks_the_norm():
    """A linear Einsum and a refused one on the same norm: nothing folds (every reader must be
    linear), and the reason names the refused one."""
    model = build([("bsk,kn->bsn", (K, 8)), ("bsk,kn->bskn", (K, 8))])
    out, report = fold(model)
    (decision,) = report.decisions
    assert decision.status == "skipped" and "keeps the norm's channels" in decision.reason
    assert_same(model, out, rtol=0, atol=0)


def _wrong_einsum_axis(monkeypatch):
    """Mutation: read the Einsum's weight along its other axis (a fold along the wrong axis)."""
    real = linear_consumers.einsum_linear

    def wrong(node):
        k = real(node)
        return 1 - k if isinstance(k, int) else k

    monkeypatch.setattr(linear_consumers, "einsum_linear", wrong)


@pytest.mark.parametrize("equation", ["bsk,kn->bsn", "bsk,nk->bsn"])
def test_folding_the_wrong_weight_axis_is_caught(equation, monkeypatch):
    """Square weights, so a fold along the wrong axis is well-formed: ORT then sees it."""
    model = build([(equation, (K, K))])
    good, _ = fold(model)
    assert_same(model, good)
    _wrong_einsum_axis(monkeypatch)
    bad, report = fold(model)
    assert report.folded == 1
    with pytest.raises(AssertionError):
        assert_same(model, bad)


def _optimize(mode: str, src, out, monkeypatch, capsys) -> tuple[int, str]:
    """``optimize --verify MODE``, as tests/test_verify_mutations.py runs it."""
    from tests.helpers import run_mode as _run

    return _run(mode, src, out, monkeypatch, capsys)


def _mode_model(tmp_path):
    model = build([("bsk,nk->bsn", (K, K)), ("...k,kn->...n", (K, K))], norm="layernorm")
    return model, graphs.save(model, tmp_path / "m" / "model.onnx")


@pytest.mark.parametrize("mode", ["onnxruntime", "subgraph", "subgraph-sampled", "algebraic", "auto-large"])
def test_every_verification_mode_passes_an_einsum_fold(mode, tmp_path, monkeypatch, capsys):
    model, src = _mode_model(tmp_path)
    out = tmp_path / "out" / "model.onnx"
    code, text = _optimize(mode, src, out, monkeypatch, capsys)
    assert code == 0 and "PASSED" in text and out.is_file(), text
    assert_same(model, onnx.load(str(out)))


@pytest.mark.parametrize("mode", ["onnxruntime", "subgraph", "auto-large"])
def test_executed_modes_catch_a_misread_einsum(mode, tmp_path, monkeypatch, capsys):
    """A fold along the wrong weight axis fails every mode that runs the model or its pieces
    (exit 5, nothing written). The algebraic mode cannot see it: it checks each written tensor
    against the pass's own reading of its reader, which is what this mutation breaks."""
    _, src = _mode_model(tmp_path)
    out = tmp_path / "out" / "model.onnx"
    _wrong_einsum_axis(monkeypatch)
    code, text = _optimize(mode, src, out, monkeypatch, capsys)
    assert code == 5 and "FAILED" in text and not out.exists(), text
