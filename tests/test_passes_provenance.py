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


@pytest.mark.parametrize("name", ["llama_dynamo", "gpt2_legacy", "bert_dynamo", "qwen3_tied_dynamo"])
def test_analysis_writes_nothing_and_apply_does_what_it_planned(name):
    """The pass is two steps: analyse (a plan per norm, the model untouched) and apply; what the
    analysis reports is what the apply step then does."""
    import dataclasses

    from models import fixtures

    model = ir.load(str(fixtures.build(name)))
    before = ir.to_proto(model).SerializeToString()
    fold = FlashNormFoldPass()
    plans = fold.analyse(model)
    assert ir.to_proto(model).SerializeToString() == before
    planned = [dataclasses.asdict(p.decision) for p in plans]
    result = fold.apply(model, plans)
    done = [dataclasses.asdict(d) for d in result.report.decisions]
    for d in done:
        d["rewritten_as"] = ""  # known only once written
    assert planned == done
    assert result.report.folded == sum(p.folds for p in plans)


def test_two_norms_sharing_a_weight_are_decided_alike(tmp_path):
    """Each decision is taken on the unmodified graph: two norms whose linears read one weight
    both fold into untied copies (the order of the norms does not matter), and the function is
    unchanged."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    k, n = 16, 8
    inits = [numpy_helper.from_array((rng.random(k) + 0.5).astype(np.float32), "g1"),
             numpy_helper.from_array((rng.random(k) + 0.5).astype(np.float32), "g2"),
             numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")]
    nodes = [helper.make_node("RMSNormalization", ["x1", "g1"], ["h1"], axis=-1),
             helper.make_node("RMSNormalization", ["x2", "g2"], ["h2"], axis=-1),
             helper.make_node("MatMul", ["h1", "W"], ["y1"]), helper.make_node("MatMul", ["h2", "W"], ["y2"])]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [vi("x1", TensorProto.FLOAT, [2, k]), vi("x2", TensorProto.FLOAT, [2, k])],
                              [vi("y1", TensorProto.FLOAT, [2, n]), vi("y2", TensorProto.FLOAT, [2, n])], inits)
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10), str(src))
    report = flashnorm_onnx.optimize(src, tmp_path / "o.onnx")
    assert report.folded == 2 and report.verification.passed
    assert [c.action for d in report.decisions for c in d.consumers] == ["untied copy", "untied copy"]
    feeds = {"x1": rng.standard_normal((2, k)).astype(np.float32), "x2": rng.standard_normal((2, k)).astype(np.float32)}
    a = ort.InferenceSession(str(src)).run(None, feeds)
    b = ort.InferenceSession(str(tmp_path / "o.onnx")).run(None, feeds)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
