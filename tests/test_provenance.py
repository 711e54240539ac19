"""The fold records itself in the output's metadata_props; the record survives a PassManager;
inspect writes nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

import flashnorm_onnx
from flashnorm_onnx.passes import FlashNormFoldPass, provenance


@pytest.fixture(scope="module")
def llama():
    from models import fixtures

    return Path(fixtures.build("llama_dynamo"))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def test_output_records_what_was_folded_and_by_which_version(llama, tmp_path):
    out = tmp_path / "o.onnx"
    report = flashnorm_onnx.optimize(llama, out)
    assert provenance.read(onnx.load(str(llama), load_external_data=False)) is None
    entry = provenance.read(onnx.load(str(out), load_external_data=False))
    assert entry["tool"] == "flashnorm-onnx" and entry["version"] == flashnorm_onnx.__version__
    (run,) = entry["runs"]
    assert run["folded"] == report.folded == 5 and run["norms"] == 5
    assert run["folded_norms"] == [d.name for d in report.decisions if d.status == "folded"]
    assert provenance.folded_norms(ir.load(str(out))) == 5
    # a second run finds the norms weightless, changes nothing, records nothing more
    again = flashnorm_onnx.optimize(out, tmp_path / "again.onnx", force_write=True)
    assert again.folded == 0
    assert provenance.read(onnx.load(str(tmp_path / "again.onnx"), load_external_data=False)) == entry


def test_the_record_survives_a_pass_manager(llama):
    direct = FlashNormFoldPass()(ir.load(str(llama)))
    model = ir.load(str(llama))
    result = ir.passes.PassManager([FlashNormFoldPass(), ir.passes.common.RemoveUnusedNodesPass()])(model)
    assert result.modified and not hasattr(result, "report")  # the manager's result drops it
    (run,) = provenance.read(result.model)["runs"]
    assert run["folded"] == direct.report.folded == 5


def test_inspect_leaves_the_model_byte_identical(llama):
    before = _digest(llama.parent)
    report = flashnorm_onnx.inspect(llama)
    assert report.folded == 5
    assert _digest(llama.parent) == before
