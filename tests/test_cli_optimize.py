"""`flashnorm-onnx optimize` / `inspect` and the Python API, end to end on files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import flashnorm_onnx
from flashnorm_onnx.errors import VerificationFailed
from flashnorm_onnx.passes import fold_math
from tests import graphs


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(model: onnx.ModelProto, path: Path, external: bool) -> Path:
    model.metadata_props.add(key="origin", value="test")  # metadata the output must keep
    return graphs.save(model, path, external)


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashnorm_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def model_file(tmp_path):
    model = graphs.build("dynamo", consumers=("matmul", "matmul_t", "tied"))
    return save(model, tmp_path / "in" / "model.onnx", external=True)


def test_optimize_cli_writes_verified_output(model_file, tmp_path):
    before = {p.name: sha(p) for p in model_file.parent.iterdir()}
    out = tmp_path / "out" / "model.flashnorm.onnx"
    report_path = tmp_path / "out" / "report.json"
    proc = cli("optimize", model_file, "-o", out, "--report", report_path)
    assert proc.returncode == 0, proc.stderr
    assert "folded into" in proc.stdout and "verification (onnxruntime+plan): PASSED" in proc.stdout
    # input untouched, output has its own data file
    assert {p.name: sha(p) for p in model_file.parent.iterdir()} == before
    assert (out.parent / (out.name + ".data")).exists()
    report = json.loads(report_path.read_text())
    assert report["summary"]["folded"] == 1 and report["summary"]["skipped"] == 0
    assert report["summary"]["bytes_added_by_untying"] > 0
    assert report["verification"]["passed"] is True
    assert {o["name"] for o in report["verification"]["outputs"]} >= {"out0", "out1", "out2"}
    # what must be kept
    a = onnx.load(str(model_file), load_external_data=False)
    b = onnx.load(str(out), load_external_data=False)
    assert b.ir_version == a.ir_version
    assert {(o.domain, o.version) for o in b.opset_import} == {(o.domain, o.version) for o in a.opset_import}
    assert [i.name for i in b.graph.input] == [i.name for i in a.graph.input]
    assert [o.name for o in b.graph.output] == [o.name for o in a.graph.output]
    kept = {p.key: p.value for p in b.metadata_props}
    assert kept.pop("flashnorm_onnx")  # what the fold records (tests/test_passes_provenance.py)
    assert kept == {p.key: p.value for p in a.metadata_props}
    from flashnorm_onnx.io.checker import check_model

    # the output passes onnx.checker wherever the input does
    assert check_model(out) is None or check_model(out) == check_model(model_file)


def test_second_run_folds_nothing_and_writes_nothing(model_file, tmp_path):
    out = tmp_path / "o1.onnx"
    assert cli("optimize", model_file, "-o", out).returncode == 0
    again = tmp_path / "o2.onnx"
    proc = cli("optimize", out, "-o", again)
    assert proc.returncode == 0
    assert "already weightless" in proc.stdout and "nothing to fold" in proc.stdout
    assert not again.exists()
    forced = cli("optimize", out, "-o", again, "--force-write")
    assert forced.returncode == 0 and again.exists()


def test_inspect_writes_nothing(model_file):
    before = sorted(p.name for p in model_file.parent.iterdir())
    proc = cli("inspect", model_file)
    assert proc.returncode == 0, proc.stderr
    assert "1 norms: 1 foldable, 0 skipped" in proc.stdout and "tensors to write" in proc.stdout
    assert sorted(p.name for p in model_file.parent.iterdir()) == before


def test_no_untie_skips_the_tied_norm(model_file, tmp_path):
    proc = cli("optimize", model_file, "-o", tmp_path / "o.onnx", "--no-untie")
    assert proc.returncode == 0
    assert "skipped" in proc.stdout and "tied embedding" in proc.stdout
    assert not (tmp_path / "o.onnx").exists()


def test_wrong_fold_fails_verification_and_writes_nothing(model_file, tmp_path, monkeypatch):
    """If the arithmetic were wrong, verification must catch it and leave no output."""
    real = fold_math.fold_scale
    monkeypatch.setattr(fold_math, "fold_scale", lambda w, g, k, **kw: real(w, np.asarray(g) * 1.01, k, **kw))
    out = tmp_path / "bad" / "model.onnx"
    with pytest.raises(VerificationFailed) as err:
        flashnorm_onnx.optimize(model_file, out)
    assert "differs" in str(err.value)
    assert not out.exists() and not (out.parent / "model.onnx.data").exists()
    assert not any(out.parent.glob(".*tmp"))


def test_python_api_inline_model(tmp_path):
    model = graphs.build("legacy", consumers=("matmul", "gemm_tb"))
    src = save(model, tmp_path / "m.onnx", external=False)
    report = flashnorm_onnx.optimize(src, tmp_path / "m2.onnx", dims={"batch": 3, "seq": 4})
    assert report.folded == 1 and report.verification.passed
    assert not (tmp_path / "m2.onnx.data").exists()  # the input had no external data
    # the --dim values reached the generated inputs; the cases are named by order, not by a size
    # that --dim overrides (they were "batch2"/"batch1" and both ran batch 3)
    assert report.verification.cases == ["run1: x[3, 16]", "run2: x[3, 16]"]  # Gemm readers: x is 2-D
    outputs = report.verification.outputs
    assert {o["case"] for o in outputs} == {"run1", "run2"}
    assert outputs and all(o["shape"][0] == 3 for o in outputs), outputs  # what ran: batch 3 in both
