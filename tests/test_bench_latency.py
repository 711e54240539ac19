"""``benchmarks/run_latency``'s cross-form comparisons (B of one export against A of another, the
genai builder's model as the anchor): the ``VARIANT@FORM`` specs, the shapes both models can run,
each model fed for its own input signature, the rows, notes and files written. No timing
assertions: two pairs per shape.

Hermetic part: three hand-made ONNX models stand in for the SmolLM2 exports (genai-like: no
position ids, a cache whose last dimension is named ``kv_cache_dim``, its value in
genai_config.json; optimum-like: position ids and a cache; dynamo-like: no cache). Each model fails
to run unless it gets inputs of its own signature (a ``kv_cache_dim`` other than 4 fails a MatMul;
an input it does not have fails the binding). The last test runs the real tiny fixtures with
``--for-ort`` (skipped where the genai environment is missing).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

import benchmarks.run_latency as rl
from flashnorm_onnx.profile import parse_shape

SHAPES = ["p1=1x1", "p8=1x8", "d16=1x1,past=16"]


def _model(path: Path, *, past_dims: list | None, position_ids: bool, mask_total: str) -> Path:
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", mask_total])]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["ids_f"], ["logits"], keepdims=1)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    inits = []
    if position_ids:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                                    ["batch_size", "sequence_length"]))
        nodes.append(helper.make_node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT))
        outputs.append(helper.make_tensor_value_info("pos_f", TensorProto.FLOAT, None))
    if past_dims is not None:
        inputs.append(helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, past_dims))
        inits.append(numpy_helper.from_array(np.ones((4, 2), np.float32), "w"))
        nodes.append(helper.make_node("MatMul", ["past_key_values.0.key", "w"], ["present.0.key"]))
        outputs.append(helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, path.parent.name, inputs, outputs, inits)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.fixture
def fake_exports(tmp_path, monkeypatch) -> dict[str, Path]:
    root = tmp_path / "exports"
    models = {
        "genai": _model(root / "genai" / "model.onnx", past_dims=["batch_size", 1, "past_sequence_length",
                                                                 "kv_cache_dim"],
                        position_ids=False, mask_total="total_sequence_length"),
        "optimum_past": _model(root / "optimum_past" / "model.onnx",
                               past_dims=["batch_size", 1, "past_sequence_length", 4], position_ids=True,
                               mask_total="past_sequence_length + sequence_length"),
        "dynamo": _model(root / "dynamo" / "model.onnx", past_dims=None, position_ids=False, mask_total="sequence"),
    }
    (root / "genai" / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"head_size": 4}}}))
    monkeypatch.setattr(rl, "source_model", lambda family, form: models[form])
    monkeypatch.setattr(rl, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(rl, "BUILD", tmp_path / "build")
    return models


def _run(tmp_path: Path, cross: str, forms: str = "") -> tuple[str, dict]:
    out = tmp_path / "R.md"
    argv = ["--models", "smollm2", "--forms", forms, "--comparisons", "", "--cross", cross, "--runs", "2",
            "--warmup", "1", "--no-progress", "--no-cuda", "--output", str(out)]
    for s in SHAPES:
        argv += ["--shape", s]
    assert rl.main(argv) == 0
    return out.read_text(), json.loads((tmp_path / "results" / "R_summary.json").read_text())


def test_parse_cross():
    assert rl.parse_cross("for-ort@optimum_past/genai") == (("for-ort", "optimum_past"), ("export", "genai"))
    assert rl.parse_cross("dynamo/ort-opt@dynamo") == (("export", "dynamo"), ("ort-opt", "dynamo"))
    assert rl.side_label("export", "genai") == "genai"
    assert rl.side_label("for-ort", "dynamo") == "for-ort@dynamo"
    for bad in ("for-ort@optimum_past", "nope@dynamo/genai", "for-ort@nowhere/genai", "/genai"):
        with pytest.raises(ValueError):
            rl.parse_cross(bad)


def test_bad_cross_spec_fails_before_anything_runs(tmp_path, fake_exports):
    with pytest.raises(ValueError, match="unknown variant"):
        rl.main(["--models", "smollm2", "--forms", "", "--cross", "fast@dynamo/genai", "--output",
                 str(tmp_path / "R.md")])
    assert not (tmp_path / "results").exists()


def test_decode_only_where_both_have_a_cache(fake_exports):
    shapes = [parse_shape(s) for s in SHAPES]
    kept, skipped = rl.shapes_for_both(fake_exports["genai"], fake_exports["optimum_past"], shapes)
    assert [c.name for c in kept] == ["p1", "p8", "d16"] and skipped == []
    for a, b in (("genai", "dynamo"), ("dynamo", "genai")):  # either side without a cache
        kept, skipped = rl.shapes_for_both(fake_exports[a], fake_exports[b], shapes)
        assert [c.name for c in kept] == ["p1", "p8"] and skipped == ["d16"]


def test_cross_rows_each_model_fed_its_own_signature(tmp_path, fake_exports):
    table, summary = _run(tmp_path, "optimum_past/genai,dynamo/genai")
    rows = summary["rows"]
    got = {(r["comparison"], r["shape"]) for r in rows}
    assert got == {("export@optimum_past / genai", "p1"), ("export@optimum_past / genai", "p8"),
                   ("export@optimum_past / genai", "d16"), ("export@dynamo / genai", "p1"),
                   ("export@dynamo / genai", "p8")}
    assert all(r["form"] == "cross" and r["pairs"] == 2 * 4 for r in rows)  # --runs 2 in each of 4 rounds
    assert any("d16 not timed" in n and "dynamo has none" in n for n in summary["notes"])
    assert not any("not measured" in n or "skipped" in n for n in summary["notes"]), summary["notes"]
    # the anchor is A; one JSON report per comparison, with every sample
    rep = json.loads((tmp_path / "results" / "R_smollm2_cross_export_optimum_past_vs_export_genai.json").read_text())
    assert rep["models"]["A"]["path"] == str(fake_exports["genai"])
    assert rep["models"]["B"]["path"] == str(fake_exports["optimum_past"])
    assert rep["settings"]["dims"] == {"kv_cache_dim": 4}
    assert {r["shape"] for r in rep["results"]} == {"p1", "p8", "d16"}
    assert all(len(r[k]["samples_ms"]) == 2 * 4 for r in rep["results"] for k in "AB")
    assert "| smollm2 | cross | export@optimum_past / genai | d16 (1x1 past 16) | cpu |" in table
    assert "| load |" in table and "Load average (1, 5, 15 min) at the start" in table


def test_within_and_cross_in_one_run(tmp_path, fake_exports, monkeypatch):
    """Within-form comparisons still run as before, and the table has both kinds."""
    out = tmp_path / "R.md"
    assert rl.main(["--models", "smollm2", "--forms", "optimum_past", "--comparisons", "no-norm/export",
                    "--full-forms", "optimum_past", "--cross", "genai/optimum_past", "--runs", "2", "--warmup", "0",
                    "--no-progress", "--no-cuda", "--shape", "p1=1x1", "--output", str(out)]) == 0
    rows = json.loads((tmp_path / "results" / "R_summary.json").read_text())["rows"]
    assert [(r["form"], r["comparison"]) for r in rows] == [("optimum_past", "no-norm/export"),
                                                            ("cross", "genai / export@optimum_past")]


@pytest.mark.genai
def test_tiny_for_ort_against_the_genai_model(tmp_path, monkeypatch, build_fixture):
    """The default cross comparisons on the tiny Llama fixtures: --for-ort of the optimum and dynamo
    exports against the genai builder's fp32 model (skipped without .venv-genai)."""
    for name in ("llama_genai_fp32", "llama_optimum_past", "llama_dynamo"):
        build_fixture(name)  # skips the test when a fixture cannot be built here
    monkeypatch.setattr(rl, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(rl, "BUILD", tmp_path / "build")
    out = tmp_path / "R.md"
    argv = ["--models", "tiny", "--forms", "", "--runs", "2", "--warmup", "1", "--no-progress", "--no-cuda",
            "--output", str(out)]
    for s in SHAPES:
        argv += ["--shape", s]
    assert rl.main(argv) == 0
    summary = json.loads((tmp_path / "results" / "R_summary.json").read_text())
    got = {(r["comparison"], r["shape"]) for r in summary["rows"]}
    assert got == {("for-ort@optimum_past / genai", s) for s in ("p1", "p8", "d16")} | {
        ("for-ort@dynamo / genai", s) for s in ("p1", "p8")}, summary["notes"]
