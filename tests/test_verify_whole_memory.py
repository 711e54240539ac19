"""The whole-model check bounds the memory its runs will take, not only its generated inputs.

Before running anything, ``compare_models`` estimates the largest values each case will create
(ONNX shape inference on the model without its tensor data, graph inputs set to the case's
sizes) and compares the estimate with :func:`flashnorm_onnx.verify.sizing.verification_run_cap`:
symbolic sizes are halved to fit; declared sizes over the cap are refused (exit 6) with one line
naming the largest tensor. Values whose shapes stay unknown are not counted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import save
from tests.helpers import assert_clean_error, rms_model, snapshot
from tests.helpers import cli_measured, in_process

UNAVAILABLE = 6
GiB, MiB = 1 << 30, 1 << 20


def tiled_model(shape: list, repeats: int) -> onnx.ModelProto:
    """rms_model (an RMSNorm feeding two MatMuls: something to fold) whose input ``x`` is also
    tiled ``repeats`` times along its last axis into ``big`` and reduced back (output ``peak``):
    a tiny model whose run creates a tensor ``repeats`` times the input's size."""
    model = rms_model()
    graph = model.graph
    graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, shape))
    graph.initializer.extend([numpy_helper.from_array(np.array([1, 1, repeats], np.int64), "repeats")])
    graph.node.extend([helper.make_node("Tile", ["x", "repeats"], ["big"]),
                       helper.make_node("ReduceMax", ["big", "axes"], ["peak"], keepdims=1)])
    graph.output.append(helper.make_tensor_value_info("peak", TensorProto.FLOAT, None))
    return model


def test_tiny_model_whose_run_needs_gigabytes_is_refused_before_running(tmp_path):
    # x declared [32, 65536, 16] float32: 128 MiB, well within the input cap; Tile makes it
    # [32, 65536, 512]: 4 GiB, over any run cap (at most 2 GiB)
    src = tmp_path / "m" / "model.onnx"
    src.parent.mkdir()
    src.write_bytes(tiled_model([32, 65536, 16], 32).SerializeToString())
    assert src.stat().st_size < 2048
    before = snapshot(tmp_path)
    proc, elapsed, peak = cli_measured("optimize", src, "-o", tmp_path / "out" / "o.onnx")
    assert_clean_error(proc, UNAVAILABLE, "tensor 'big'", "[32, 65536, 512]", "4.0 GiB", "verification memory cap",
                       "--no-verify", "--verify subgraph")
    assert snapshot(tmp_path) == before  # nothing written
    assert peak < 600 * MiB, f"peak RSS {peak / MiB:.0f} MiB: the check ran"


def test_in_process_refusal_names_the_tensor_and_the_estimate(tmp_path, capsys):
    from flashnorm_onnx import cli as cli

    src = save(tiled_model([32, 65536, 16], 32), tmp_path / "m" / "model.onnx")
    before = snapshot(tmp_path)
    code = cli.main(["optimize", str(src), "-o", str(tmp_path / "out" / "o.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == UNAVAILABLE, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in ("tensor 'big' [32, 65536, 512]", "4.0 GiB (float32)", "estimated", "--no-verify",
                 "--verify subgraph"):
        assert word in err, (word, err)
    assert snapshot(tmp_path) == before


def test_symbolic_sizes_are_halved_until_the_run_fits(tmp_path, capsys, monkeypatch):
    from flashnorm_onnx.verify import sizing

    # x[batch, seq, 16] tiled 64 times: run1 (batch 2 x 8 tokens) makes a 64 KiB 'big'
    monkeypatch.setattr(sizing, "verification_run_cap", lambda: 48 * 1024)
    src = save(tiled_model(["batch", "seq", 16], 64), tmp_path / "m" / "model.onnx")
    out, report = tmp_path / "out" / "o.onnx", tmp_path / "r.json"
    proc = in_process(capsys, "optimize", src, "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "PASSED" in proc.stdout
    cases = json.loads(report.read_text())["verification"]["cases"]
    assert any(c.startswith("run1: input shapes reduced to fit the verification memory cap (48.0 KiB)")
               for c in cases), cases
    assert "run1: x[2, 4, 16]" in cases or "run1: x[1, 8, 16]" in cases, cases
    assert "run2: x[1, 3, 16]" in cases, cases  # 24 KiB of 'big': fits as it is
    assert out.is_file()


def test_ordinary_model_verifies_and_its_estimate_is_small(tmp_path, capsys):
    from flashnorm_onnx.verify.inputs import Case, input_shapes, specs_from_session
    from flashnorm_onnx.verify.run_estimate import RunEstimator
    from flashnorm_onnx.verify.whole import make_session

    src = save(rms_model(), tmp_path / "m" / "model.onnx")
    proc = in_process(capsys, "optimize", src, "-o", tmp_path / "out" / "o.onnx")
    assert proc.returncode == 0 and "PASSED" in proc.stdout, proc.stderr
    specs = specs_from_session(make_session(src))
    estimate = RunEstimator.for_model(src)(input_shapes(specs, Case("run1", batch=2, sequence=8)))
    # x[2, 8, 16] 1 KiB; q, kk [2, 8, 8] 512 B each; the norm's intermediates
    assert estimate is not None and 2 * 1024 < estimate.total < 64 * 1024, estimate
    assert estimate.shape == [2, 8, 16] and estimate.nbytes == 1024, estimate


def test_estimate_counts_live_values_outputs_and_the_comparison():
    from flashnorm_onnx.verify.run_estimate import COMPARE_BYTES_PER_ELEMENT, RunEstimator

    # a chain x -> a -> b -> c (output): a is freed once b exists, so at most x, a, b (or x, b, c)
    # are alive together
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["c"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    estimate = RunEstimator(model)({"x": [1000]})
    assert estimate.peak == 3 * 4000
    assert estimate.outputs == 4000
    assert estimate.total == 3 * 4000 + 4000 + COMPARE_BYTES_PER_ELEMENT * 1000
    assert (estimate.name, estimate.shape, estimate.dtype, estimate.nbytes) in (
        ("x", [1000], "float32", 4000), ("a", [1000], "float32", 4000), ("b", [1000], "float32", 4000),
        ("c", [1000], "float32", 4000))


def test_values_of_unknown_shape_are_not_counted():
    from flashnorm_onnx.verify.run_estimate import RunEstimator

    # NonZero's output length depends on the data: shape inference cannot know it, nor the
    # Expand that follows; they count nothing (and never cause a refusal)
    nodes = [helper.make_node("NonZero", ["x"], ["nz"]),
             helper.make_node("Expand", ["x", "huge"], ["e"]),
             helper.make_node("Shape", ["nz"], ["s"]),
             helper.make_node("Expand", ["x", "s"], ["y"])]
    graph = helper.make_graph(
        nodes, "unknown", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
                           helper.make_tensor_value_info("huge", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    estimate = RunEstimator(model)({"x": [10], "huge": [3]})
    assert estimate.total < 1024, estimate


def test_estimate_reads_no_tensor_data_of_a_large_model(tmp_path):
    """A 256 MiB embedded initializer: the skeleton the estimate uses skips its bytes (the file is
    memory-mapped and only field headers are read), so neither time nor memory grow with it."""
    k, n = 1024, 64 * 1024  # 256 MiB float32 weight
    weight = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[k, n], raw_data=bytes(4 * k * n))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    path = tmp_path / "model.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                       ir_version=10).SerializeToString())
    del weight, graph
    assert path.stat().st_size > 256 * MiB
    script = (
        "import json, resource, sys, time\n"
        "import onnx\n"
        "from flashnorm_onnx.verify.run_estimate import RunEstimator, model_skeleton\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "t = time.monotonic()\n"
        "skeleton = model_skeleton(sys.argv[1])\n"
        "e = RunEstimator(skeleton)({'x': [2, 8, 1024]})\n"
        "print(json.dumps({'seconds': time.monotonic() - t, 'size': skeleton.ByteSize(),\n"
        "                  'inputs': [i.name for i in skeleton.graph.input], 'name': e.name, 'shape': e.shape,\n"
        "                  'nbytes': e.nbytes, 'before': before,\n"
        "                  'after': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["size"] < 4096
    assert r["inputs"] == ["x", "w"]  # the weight, declared, without its data
    assert (r["name"], r["shape"], r["nbytes"]) == ("y", [2, 8, n], 2 * 8 * n * 4)
    assert r["after"] - r["before"] < 64 * MiB, f"peak RSS grew by {(r['after'] - r['before']) / MiB:.0f} MiB"
    assert r["seconds"] < 1.0, r["seconds"]


def test_skeleton_keeps_small_tensors_for_shape_inference(tmp_path):
    """Reshape's target shape lives in a small initializer: kept, so the shapes after it are known."""
    from flashnorm_onnx.verify.run_estimate import RunEstimator, model_skeleton

    src = save(tiled_model(["batch", "seq", 16], 4), tmp_path / "model.onnx", external=True)
    skeleton = model_skeleton(src)
    assert "repeats" in {t.name for t in skeleton.graph.initializer}
    estimate = RunEstimator(skeleton)({"x": [2, 8, 16]})
    assert estimate.name == "big" and estimate.shape == [2, 8, 64], estimate
    proto = onnx.load(str(src), load_external_data=False)
    assert RunEstimator(proto)({"x": [2, 8, 16]}) == estimate


def test_run_cap_is_at_most_2_gib_and_half_of_available():
    from flashnorm_onnx.verify import sizing

    cap = sizing.verification_run_cap()
    assert 0 < cap <= 2 * GiB
    available = sizing.available_memory()
    if available is not None:
        assert cap <= available // 2 + 1


@pytest.mark.parametrize("field", ["batch", "sequence"])
def test_fit_case_halves_for_the_run_estimate(monkeypatch, field):
    from flashnorm_onnx.errors import VerificationUnavailable
    from flashnorm_onnx.verify import inputs, sizing

    specs = [inputs.InputSpec("x", np.dtype(np.float32), ["batch", "seq", 16])]

    def estimate(shapes):  # a run that needs 1000 times the input
        n = int(np.prod(shapes["x"])) * 4
        return sizing.RunEstimate(total=1000 * n, peak=1000 * n, outputs=0, name="t", shape=[n], dtype="float32",
                                  nbytes=1000 * n)

    monkeypatch.setattr(sizing, "verification_run_cap", lambda: 1000 * 4 * 16)  # batch 1 x 1 token only
    case = inputs.Case("run1", batch=2 if field == "batch" else 1, sequence=8 if field == "sequence" else 1)
    fitted, note = sizing.fit_case(specs, case, estimate=estimate)
    assert (fitted.batch, fitted.sequence) == (1, 1) and "verification memory cap" in note, (fitted, note)
    monkeypatch.setattr(sizing, "verification_run_cap", lambda: 100)
    with pytest.raises(VerificationUnavailable, match="tensor 't'"):
        sizing.fit_case(specs, case, estimate=estimate)
