"""Bounded memory: folding a model larger than the process may hold, streamed from disk."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import onnx_ir as ir
import pytest

from flashnorm_onnx.api import infer_shapes
from flashnorm_onnx.passes import FlashNormFoldPass
from models import synthetic

MB = 1 << 20


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    dims = synthetic.shape_for_bytes(300 * MB, "float16", hidden=1024)
    path = tmp_path_factory.mktemp("scale") / "model.onnx"
    synthetic.build(path, *dims, dtype="float16")
    return path, synthetic.estimate_bytes(*dims, "float16")


def _peak_rss_of(cmd: list[str]) -> tuple[int, subprocess.CompletedProcess]:
    wrapper = (
        "import resource, subprocess, sys, json\n"
        f"p = subprocess.run({cmd!r}, capture_output=True, text=True)\n"
        "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr,"
        " 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    return result["rss"], subprocess.CompletedProcess(cmd, result["rc"], result["out"], result["err"])


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


def test_algebraic_verification_runs_when_asked(big_model, tmp_path):
    path, _ = big_model
    from flashnorm_onnx import optimize

    report = optimize(path, tmp_path / "o.onnx", verify_mode="algebraic")
    assert report.verification.method == "algebraic+structure" and report.verification.passed
    assert len(report.verification.outputs) == report.tensors_written  # RMSNorm: no biases moved


def test_auto_verification_falls_back_to_algebraic_for_large_models(big_model, tmp_path, monkeypatch):
    from flashnorm_onnx import api

    monkeypatch.setattr(api, "VERIFY_MEMORY_FRACTION", 1e-6)  # pretend the machine is tiny
    report = api.optimize(big_model[0], tmp_path / "o.onnx")
    assert report.verification.method == "subgraph+algebraic+structure" and report.verification.passed
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
    assert "verification (subgraph): PASSED" in proc.stdout
    # pieces run one at a time, and linears with large weights on a sample of their output columns:
    # memory is the fold's own, whatever the largest tensor
    bound = 0.3 * data_bytes + 300 * MB
    assert peak < bound, f"peak RSS {peak / MB:.0f} MB for {data_bytes / MB:.0f} MB of data (bound {bound / MB:.0f})"
