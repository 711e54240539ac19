"""Running each node only where its result is read (flashnorm_onnx/fusions/sink.py, shape_source.py).

On hand-built graphs: a node read by one ``If`` branch alone moves into it (and on, into a branch
nested in that one); a node read by both branches, by the main graph or as a graph output stays;
an unread node goes; one-dimension ``Shape`` reads move back through Split/Transpose/Reshape to the
value that has the dimension, and only where the dimension is provably the same. Every rewrite is
checked in ONNX Runtime, on both values of the condition, against the graph as it was. On the tiny
optimum with-past export after ``--for-ort``: the packed Q/K/V ``Split`` leaves the main graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from flashnorm_onnx.fusions.shape_source import reroute_shape_reads
from flashnorm_onnx.fusions.sink import sink_into_branches
from tests.graphs import run

F = TensorProto.FLOAT


def _branch(name: str, nodes, out: str, out_name: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out_name, F, None)])


def _if_model(readers: str = "else", nested: bool = False) -> onnx.ModelProto:
    """x [b, s, 12] -> Split into a, b, c (4 each); an If on ``cond`` whose then-branch returns
    Relu(x) and whose else-branch returns a + b (through a nested If when ``nested``). ``readers``:
    'else' (the Split read by the else-branch only), 'both' (the then-branch reads c too),
    'main' (a Neg of c is an output too), 'output' (c itself is a graph output)."""
    split = helper.make_node("Split", ["x", "sizes"], ["a", "b", "c"], axis=-1, name="split")
    dead = helper.make_node("Sigmoid", ["x"], ["unread"], name="dead")
    if readers == "both":
        then_nodes = [helper.make_node("Relu", ["c"], ["t0"])]
    else:
        then_nodes = [helper.make_node("Slice", ["x", "zero", "four", "minus1"], ["xs"]),
                      helper.make_node("Relu", ["xs"], ["t0"])]
    then = _branch("then", then_nodes, "t0", "t0")
    add = helper.make_node("Add", ["a", "b"], ["e0"])
    if nested:
        inner_then = _branch("inner_then", [helper.make_node("Add", ["a", "b"], ["i0"])], "i0", "i0")
        inner_else = _branch("inner_else", [helper.make_node("Sub", ["a", "b"], ["i1"])], "i1", "i1")
        inner = helper.make_node("If", ["cond2"], ["e0"], then_branch=inner_then, else_branch=inner_else)
        els = _branch("else", [inner], "e0", "e0")
    else:
        els = _branch("else", [add], "e0", "e0")
    node_if = helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=els, name="if")
    nodes = [split, dead, node_if]
    outputs = [helper.make_tensor_value_info("y", F, None)]
    if readers == "main":
        nodes.append(helper.make_node("Neg", ["c"], ["n"]))
        outputs.append(helper.make_tensor_value_info("n", F, None))
    if readers == "output":
        outputs.append(helper.make_tensor_value_info("c", F, None))
    inits = [onnx.numpy_helper.from_array(np.array(v, np.int64), n)
             for n, v in (("sizes", [4, 4, 4]), ("zero", [0]), ("four", [4]), ("minus1", [-1]))]
    inputs = [helper.make_tensor_value_info("x", F, ["b", "s", 12]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
              helper.make_tensor_value_info("cond2", TensorProto.BOOL, [])]
    graph = helper.make_graph(nodes, "m", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _sink(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    model = ir.serde.deserialize_model(proto)
    moved = sink_into_branches(model)
    return ir.serde.serialize_model(model), moved


def _same_on_every_branch(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 12)).astype(np.float32)
    for cond in (True, False):
        for cond2 in (True, False):
            feeds = {"x": x, "cond": np.array(cond), "cond2": np.array(cond2)}
            for want, got in zip(run(before, feeds), run(after, feeds)):
                np.testing.assert_array_equal(got, want)


def _main_ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def test_a_node_read_by_one_branch_moves_into_it_and_an_unread_one_goes():
    proto = _if_model("else")
    out, moved = _sink(proto)
    assert moved == 1
    assert _main_ops(out) == ["If"]  # the Split moved, the unread Sigmoid is gone
    branch = next(a.g for a in out.graph.node[0].attribute if a.name == "else_branch")
    assert [n.op_type for n in branch.node] == ["Split", "Add"]
    _same_on_every_branch(proto, out)


def test_a_node_read_by_a_nested_branch_moves_down_level_by_level():
    proto = _if_model("else", nested=True)
    out, moved = _sink(proto)
    assert moved == 1  # into the else-branch; there both inner branches read it: it stays there
    assert _main_ops(out) == ["If"]
    _same_on_every_branch(proto, out)


def test_a_node_read_elsewhere_stays():
    for readers in ("both", "main", "output"):
        proto = _if_model(readers)
        out, moved = _sink(proto)
        assert moved == 0, readers
        assert "Split" in _main_ops(out), readers
        _same_on_every_branch(proto, out)


def _shape_model(target: list[int] | None, start: int, axis: int = -1) -> onnx.ModelProto:
    """x [b, s, 12] -> Split (axis) -> q [b, s, 4] -> Reshape to [b, s, 2, 2] (target: a constant,
    or None for Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)), [2, 2]))
    -> Transpose [b, 2, s, 2] -> Shape(start, start + 1): the output."""
    nodes = [helper.make_node("Split", ["x", "sizes"], ["q", "k", "v"], axis=axis)]
    inits = [onnx.numpy_helper.from_array(np.array([4, 4, 4], np.int64), "sizes")]
    if target is None:
        for i in (0, 1):
            inits.append(onnx.numpy_helper.from_array(np.array(i, np.int64), f"i{i}"))
            nodes += [helper.make_node("Shape", ["x"], [f"sx{i}"]),
                      helper.make_node("Gather", [f"sx{i}", f"i{i}"], [f"g{i}"], axis=0),
                      helper.make_node("Unsqueeze", [f"g{i}", "axes0"], [f"u{i}"])]
        inits += [onnx.numpy_helper.from_array(np.array([0], np.int64), "axes0"),
                  onnx.numpy_helper.from_array(np.array([2, 2], np.int64), "rest")]
        nodes.append(helper.make_node("Concat", ["u0", "u1", "rest"], ["target"], axis=0))
    else:
        inits.append(onnx.numpy_helper.from_array(np.array(target, np.int64), "target"))
    nodes += [helper.make_node("Reshape", ["q", "target"], ["r"]),
              helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
              helper.make_node("Shape", ["t"], ["dim"], start=start, end=start + 1)]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", F, ["b", "s", 12])],
                              [helper.make_tensor_value_info("dim", TensorProto.INT64, [1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _reroute(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int, str]:
    model = ir.serde.deserialize_model(proto)
    done = reroute_shape_reads(model.graph)
    shape = next(n for n in model.graph if n.op_type == "Shape" and n.outputs[0].name == "dim")
    return ir.serde.serialize_model(model), done, shape.inputs[0].name


def _same_dims(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    x = np.zeros((3, 5, 12), np.float32)
    np.testing.assert_array_equal(run(after, {"x": x})[0], run(before, {"x": x})[0])


def test_a_dimension_is_read_from_the_earliest_value_that_has_it():
    # batch through Transpose (perm 0), Reshape (target 0 = copy) and Split (not its axis): x
    for target in ([0, 0, 2, 2], None):
        proto = _shape_model(target, start=0)
        out, done, source = _reroute(proto)
        assert (done, source) == (1, "x"), target
        _same_dims(proto, out)
    # the sequence: Transpose's perm[2] = 1, Reshape's entry 1 (a copy, or Gather(Shape(x), 1)): x
    for target in ([0, 0, 2, 2], None):
        proto = _shape_model(target, start=2)
        out, done, source = _reroute(proto)
        assert (done, source) == (1, "x"), target
        _same_dims(proto, out)


def test_a_dimension_not_provably_the_same_is_read_where_it_was():
    # Reshape to an explicit size: the dimension is the target's, not x's (stops at the Reshape)
    proto = _shape_model([3, -1, 2, 2], start=0)
    out, done, source = _reroute(proto)
    assert source == "r" and done == 1
    _same_dims(proto, out)
    # the Reshape's heads axis (entry 2 = 2): read from the Reshape's output
    proto = _shape_model([0, 0, 2, 2], start=1)
    out, done, source = _reroute(proto)
    assert source == "r"
    _same_dims(proto, out)
    # a Split along the axis read (axis 0, the batch): not through the Split
    proto = _shape_model([0, 0, 6, 2], start=0, axis=0)
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.array([1, 1, 1], np.int64), "sizes"))
    out, done, source = _reroute(proto)
    assert source == "q"
    x = np.zeros((3, 5, 12), np.float32)
    np.testing.assert_array_equal(run(out, {"x": x})[0], run(proto, {"x": x})[0])


def test_optimum_with_past_runs_the_qkv_split_only_off_the_fast_path(tmp_path):
    """After ``--for-ort`` the packed Q/K/V Split is read only by the rotary-outside branch: it
    is no longer in the main graph (ONNX Runtime runs every main-graph node on every call)."""
    from flashnorm_onnx.cli import main
    from models import fixtures

    source = Path(fixtures.build("llama_optimum_past"))
    out = tmp_path / "model.onnx"
    assert main(["optimize", str(source), "-o", str(out), "--for-ort", "-q", "--report", str(tmp_path / "r.json")]) == 0
    proto = onnx.load(out, load_external_data=False)
    assert "Split" not in _main_ops(proto)
    branches = [n.op_type for node in proto.graph.node if node.op_type == "If"
                for a in node.attribute if a.type == onnx.AttributeProto.GRAPH for n in a.g.node]
    assert "Split" in branches and "GroupQueryAttention" in branches
