"""Calibration that streams: the graph run piece by piece under a cap on weight bytes
(flashnorm_onnx/quantize/pieces.py, calibrate.collect) gives the whole run's statistics and outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from flashnorm_onnx import memory
from flashnorm_onnx.quantize import activation_aware, calibrate, pieces

RNG = np.random.default_rng(3)


def _external(source: Path, folder: Path) -> Path:
    """``source`` saved with its tensors of 1 KiB or more in one external data file."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "model.onnx"
    onnx.save_model(onnx.load(str(source)), str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from models import fixtures

    return _external(fixtures.build("llama_dynamo"), tmp_path_factory.mktemp("llama_ext"))


@pytest.fixture(scope="module")
def llama_past(tmp_path_factory):
    from models import fixtures

    return _external(fixtures.build("llama_optimum_past"), tmp_path_factory.mktemp("llama_past_ext"))


def _feeds(path: Path, runs: int = 2, seq: int = 7, past: int = 0) -> list[dict[str, np.ndarray]]:
    from models import fixtures

    return [fixtures.feeds_for(path, batch=1, seq=seq, past=past, seed=k) for k in range(runs)]


def _assert_same_stats(a: calibrate.Calibration, b: calibrate.Calibration) -> None:
    assert a.stats.keys() == b.stats.keys() and a.tokens == b.tokens and a.runs == b.runs
    for name, x in a.stats.items():
        y = b.stats[name]
        assert x.count == y.count and x.kept_rows == y.kept_rows, name
        scale = max(float(np.abs(x.sq_sum).max()), 1e-30)
        np.testing.assert_allclose(y.abs_sum, x.abs_sum, rtol=1e-4, atol=1e-6 * float(np.abs(x.abs_sum).max()))
        np.testing.assert_allclose(y.sq_sum, x.sq_sum, rtol=1e-4, atol=1e-6 * scale)
        r = x.row_matrix()
        r_max = max(float(np.abs(r).max(initial=0.0)), 1e-30)
        np.testing.assert_allclose(y.row_matrix(), r, rtol=1e-4, atol=1e-5 * r_max)
        assert (x.gram is None) == (y.gram is None), name
        if x.gram is not None:
            np.testing.assert_allclose(y.second_moment, x.second_moment, rtol=1e-4,
                                       atol=1e-6 * float(np.abs(x.second_moment).max()))


def test_pieces_give_the_whole_runs_statistics(llama):
    """A cap well under the model's weights: several pieces, every node in exactly one, the
    statistics of every requested value (counts, sum|x|, sum x^2, kept rows, second moments) those of
    the whole run."""
    proto = onnx.load(str(llama), load_external_data=False)
    total = calibrate.weight_bytes(proto)
    values, rows, _, _ = activation_aware.calibration_values(ir.load(str(llama)))
    assert len(values) >= 8 and rows
    cap = total // 6
    parts = pieces.partition(proto.graph, cap, values)
    assert len(parts) >= 5
    assert sorted(i for p in parts for i in p.nodes) == list(range(len(proto.graph.node)))
    big = {t.name for t in proto.graph.initializer if pieces.tensor_bytes(t) > cap}
    assert all(p.weight_bytes <= cap or set(p.initializers) & big for p in parts)
    feeds = _feeds(llama)
    whole = calibrate.collect(llama, feeds, values, rows, max_rows=10, cap=10 * total)
    piecewise = calibrate.collect(llama, feeds, values, rows, max_rows=10, cap=cap)
    _assert_same_stats(whole, piecewise)
    assert whole.stats[next(iter(rows))].kept_rows == 10  # rows cut across the two feeds the same way


def test_default_cap_is_a_fraction_of_available_memory(llama, monkeypatch, caplog):
    """Without a cap, collect streams once the weights exceed MEMORY_FRACTION of the memory
    available, with a message per piece; with room, it runs the whole model."""
    import logging

    values, rows, _, _ = activation_aware.calibration_values(ir.load(str(llama)))
    feeds = _feeds(llama, runs=1)
    total = calibrate.weight_bytes(onnx.load(str(llama), load_external_data=False))
    with caplog.at_level(logging.INFO, logger="flashnorm_onnx.quantize"):
        monkeypatch.setattr(memory, "available_memory", lambda: 10 * total)
        whole = calibrate.collect(llama, feeds, values, rows)
        assert not [r for r in caplog.records if "piece" in r.getMessage()]
        monkeypatch.setattr(memory, "available_memory", lambda: total)  # cap: a quarter of the weights
        piecewise = calibrate.collect(llama, feeds, values, rows)
    messages = [r.getMessage() for r in caplog.records if "calibration piece" in r.getMessage()]
    assert len(messages) >= 4 and messages[0].startswith("calibration piece 1/")
    _assert_same_stats(whole, piecewise)


def test_pieces_compute_the_graph_outputs(llama, llama_past):
    """Logits (and, with past, the present keys and values) computed piece by piece equal the whole
    model's in ONNX Runtime."""
    import onnxruntime as ort

    for path, past in ((llama, 0), (llama_past, 3)):
        feeds = _feeds(path, past=past)
        proto = onnx.load(str(path), load_external_data=False)
        cap = calibrate.weight_bytes(proto) // 5
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in proto.graph.output]
        got = pieces.run(path, feeds, cap, [], lambda *a: None, keep_outputs=True)
        assert len(pieces.partition(proto.graph, cap)) >= 4
        for feed, out in zip(feeds, got):
            ref = session.run(names, feed)
            assert list(out) == names
            for name, r in zip(names, ref):
                np.testing.assert_allclose(out[name], r, rtol=1e-4, atol=1e-5 * max(float(np.abs(r).max()), 1.0))


def test_pieces_with_past_give_the_whole_runs_statistics(llama_past):
    values, rows, _, _ = activation_aware.calibration_values(ir.load(str(llama_past)))
    feeds = _feeds(llama_past, past=2)
    total = calibrate.weight_bytes(onnx.load(str(llama_past), load_external_data=False))
    _assert_same_stats(calibrate.collect(llama_past, feeds, values, rows, max_rows=8, cap=10 * total),
                       calibrate.collect(llama_past, feeds, values, rows, max_rows=8, cap=total // 5))


def test_a_broken_partition_is_refused(llama):
    """Mutations: a node moved to the piece before the one that produces its input, a boundary input
    dropped, a node left out, a node in two pieces -- each a PieceError before anything runs."""
    proto = onnx.load(str(llama), load_external_data=False)
    graph = proto.graph
    groups = [p.nodes for p in pieces.partition(graph, calibrate.weight_bytes(proto) // 4)]
    assert len(groups) >= 3
    # a wrong topological cut: piece 1's node that reads a value of piece 1 moved to the end of piece 0
    produced_in_1 = {n for i in groups[1] for n in graph.node[i].output}
    reader = next(i for i in groups[1] if set(pieces.node_reads(graph.node[i])) & produced_in_1)
    bad = [groups[0] + [reader], [i for i in groups[1] if i != reader]] + groups[2:]
    with pytest.raises(pieces.PieceError, match="read before any earlier piece"):
        pieces.describe(graph, bad)
    # a boundary input dropped from a piece
    parts = pieces.describe(graph, groups)
    victim = next(p for p in parts[1:] if p.inputs)
    dropped = victim.inputs.pop()
    with pytest.raises(pieces.PieceError, match=f"reads value '{dropped}'"):
        pieces.check(graph, parts)
    with pytest.raises(pieces.PieceError, match="nodes in no piece"):
        pieces.describe(graph, [groups[0][:-1]] + groups[1:])
    with pytest.raises(pieces.PieceError, match="in two"):
        pieces.describe(graph, [groups[0] + groups[1][:1]] + groups[1:])
    # and the run refuses it too, as it refuses a feed without a graph input
    with pytest.raises(pieces.PieceError):
        pieces.run(llama, _feeds(llama, runs=1), 0, [], lambda *a: None, pieces=parts)
    feed = {k: v for k, v in _feeds(llama, runs=1)[0].items() if k != "attention_mask"}
    with pytest.raises(pieces.PieceError, match="graph input 'attention_mask' is not in feed 0"):
        pieces.run(llama, [feed], 0, [], lambda *a: None, keep_outputs=True)


def test_if_bodies_read_outer_values_across_pieces(tmp_path):
    """A node with subgraphs counts the outer values its bodies read as its inputs: an If whose
    branches read a weight and a value of an earlier piece, run piecewise, gives the whole result."""
    import onnxruntime as ort

    w1 = RNG.standard_normal((8, 8)).astype(np.float32)
    w2 = RNG.standard_normal((8, 8)).astype(np.float32)
    f = TensorProto.FLOAT
    then = helper.make_graph([helper.make_node("MatMul", ["h", "W2"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", f, None)])
    other = helper.make_graph([helper.make_node("Add", ["h", "x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", f, None)])
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other),
             helper.make_node("Add", ["y", "r"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, ["n", 8]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("z", f, ["n", 8])],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    path = tmp_path / "if.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="if.data", size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    parts = pieces.partition(proto.graph, 256)  # each 8x8 weight is 256 bytes: W1 and W2 apart
    assert len(parts) == 2 and parts[1].nodes == [2, 3]
    assert set(parts[1].inputs) == {"h", "x", "flag", "r"} and parts[1].initializers == ["W2"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for flag in (True, False):
        feed = {"x": RNG.standard_normal((3, 8)).astype(np.float32), "flag": np.array(flag)}
        seen = {}
        (out,) = pieces.run(path, [feed], 256, ["h"], lambda f, n, x: seen.setdefault(n, x), keep_outputs=True)
        np.testing.assert_allclose(out["z"], session.run(["z"], feed)[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(seen["h"], feed["x"] @ w1, rtol=1e-5, atol=1e-5)


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnx, onnxruntime
    from flashnorm_onnx.quantize import calibrate

    def peak():  # this process's high-water resident set (VmHWM: ru_maxrss outlives exec on Linux)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    path, cap = sys.argv[1], int(sys.argv[2])
    feeds = [{"x": np.ones((4, 1024), np.float32)}]
    before = peak()
    cal = calibrate.collect(path, feeds, {"h3": 1, "h7": 1}, cap=cap)
    print(json.dumps(dict(before=before, peak=peak(), count=cal.stats["h7"].count)))
""")


def test_piecewise_peak_memory_stays_near_one_piece(tmp_path):
    """8 weights of 16 MiB (128 MiB) under a 40 MiB cap: the calibration's peak resident memory grows
    by well under the model's size, where the whole run's grows by more than it."""
    f = TensorProto.FLOAT
    nodes, inits = [], []
    for k in range(8):
        inits.append(numpy_helper.from_array(
            (RNG.standard_normal((1024, 4096), dtype=np.float32) * 0.01), f"W{k}"))
        nodes.append(helper.make_node("MatMul", ["x" if k == 0 else f"h{k - 1}", f"W{k}"], [f"m{k}"]))
        nodes.append(helper.make_node("Slice", [f"m{k}", "s0", "s1", "ax"], [f"h{k}"]))
    inits += [numpy_helper.from_array(np.array([0], np.int64), "s0"),
              numpy_helper.from_array(np.array([1024], np.int64), "s1"),
              numpy_helper.from_array(np.array([1], np.int64), "ax")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", f, ["n", 1024])],
                              [helper.make_tensor_value_info("h7", f, ["n", 1024])], inits)
    path = tmp_path / "chain.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path),
                    save_as_external_data=True, location="chain.data", size_threshold=1024)
    total = 8 * 1024 * 4096 * 4

    def measure(cap: int) -> dict:
        out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(path), str(cap)], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent.parent)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    piecewise, whole = measure(40 * 2**20), measure(2 * total)
    assert piecewise["count"] == whole["count"] == 4
    grew, grew_whole = piecewise["peak"] - piecewise["before"], whole["peak"] - whole["before"]
    print(f"peak RSS growth: piecewise {grew / 2**20:.0f} MiB, whole {grew_whole / 2**20:.0f} MiB")
    assert grew_whole > total
    assert grew < total / 2
