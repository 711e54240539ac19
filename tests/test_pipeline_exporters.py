"""The fold on models as real exporters write them (models/fixtures.py builds them).

Per fixture: how many norms are folded and skipped, equality in ONNX Runtime (optimize's own
verification plus an independent run here), scales all ones afterwards, tied embeddings
unchanged, idempotence, and the input's files unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest

import flashnorm_onnx
from models import fixtures

# name: (folded, skipped, untied copies) with default options
EXPECTED = {
    "llama_dynamo": (5, 0, 0),
    "llama_dynamo_opset23": (5, 0, 0),
    "llama_dynamo_noopt": (5, 0, 1),
    "llama_dynamo_fp16": (5, 0, 0),
    "llama_legacy": (5, 0, 0),
    "llama_legacy_fp16": (5, 0, 0),
    "llama_optimum": (5, 0, 0),
    "llama_optimum_past": (5, 0, 1),
    "llama_ort_opt": (5, 0, 0),
    "mistral_dynamo": (5, 0, 0),
    # mixture of experts: the post-attention norm folds into the router and all 8 expert linears
    "mixtral_legacy": (5, 0, 0),
    # Qwen3: 2 input + 2 post-attention norms and the final norm fold; q_norm/k_norm (4) are skipped
    "qwen3_tied_dynamo": (5, 4, 1),
    "qwen3_untied_dynamo": (5, 4, 0),
    "qwen3_tied_legacy": (5, 4, 0),  # the legacy exporter duplicates the tied weight
    "qwen3_untied_dynamo_opset23": (5, 4, 0),
    "qwen3_optimum_past": (5, 4, 1),
    "qwen3_ort_opt": (5, 4, 1),
    # LayerNorm families
    "gpt2_dynamo": (5, 0, 1),
    # ln_f feeds a Reshape to a shape computed from the embeddings: foldable once shape inference
    # gives that Reshape its rank (the graph has no value_info)
    "gpt2_legacy": (5, 0, 0),
    "gpt2_ort_opt": (5, 0, 0),
    "gpt2_optimum": (5, 0, 1),  # ln_f as in gpt2_legacy; optimum keeps the tie (lm_head reads wte)
    # GPT-J: one ln_1 per layer (parallel attention + MLP) + ln_f, read through a Reshape whose
    # target shape is computed from Shape (resolved by shape inference)
    "gptj_legacy": (3, 0, 0),
    "gptj_optimum": (3, 0, 0),
    "vit_dynamo": (4, 1, 0),  # the final LayerNorm is the graph output
    "vit_legacy": (4, 1, 0),
    # ViTForImageClassification: the final LayerNorm reaches the classifier through Gather(CLS row)
    "vit_cls_legacy": (5, 0, 0),
    "vit_cls_optimum": (5, 0, 0),
    "bert_dynamo": (0, 5, 0),  # post-LN: every norm feeds the residual stream
    "bert_legacy": (0, 5, 0),
    "bert_ort_opt": (0, 5, 0),  # EmbedLayerNormalization + 4 SkipLayerNormalization
}
GENAI = {
    "llama_genai_fp32": (5, 0, 1),
    "qwen3_genai_fp32": (5, 4, 1),
    "qwen3_genai_int4": (0, 9, 0),  # MatMulNBits everywhere
}


def _build(name: str) -> Path:
    try:
        return fixtures.build(name)
    except fixtures.FixtureUnavailable as e:
        pytest.skip(str(e))


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def _scales_after(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = []
    for node in model.graph.node:
        index = {"SimplifiedLayerNormalization": 1, "RMSNormalization": 1, "LayerNormalization": 1,
                 "SkipSimplifiedLayerNormalization": 2, "SkipLayerNormalization": 2}.get(node.op_type)
        if index is not None and node.input[index] in inits:
            scales.append(inits[node.input[index]])
    return scales


def _check(name: str, expected: tuple[int, int, int], tmp_path: Path) -> None:
    src = _build(name)
    before = _hashes(src.parent)
    out = tmp_path / "out" / "model.onnx"
    report = flashnorm_onnx.optimize(src, out)
    folded, skipped, untied = expected
    assert (report.folded, report.skipped) == (folded, skipped), report.text()
    assert sum(c.action == "untied copy" for d in report.decisions for c in d.consumers) == untied
    for d in report.decisions:
        if d.status == "skipped":
            assert d.reason
    assert _hashes(src.parent) == before, "the input's files changed"
    if not folded:
        assert not out.exists()
        return
    assert report.verification.method == "onnxruntime+plan" and report.verification.passed, report.text()
    # every folded norm is a fused op with scale ones now; the skipped ones keep their scales
    scales = _scales_after(out)
    assert sum(bool(np.all(s == 1)) for s in scales) == folded
    # idempotent: a second pass folds nothing
    again = flashnorm_onnx.inspect(out)
    assert again.folded == 0
    assert again.already == folded


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exported_model(name, tmp_path):
    _check(name, EXPECTED[name], tmp_path)


@pytest.mark.genai
@pytest.mark.parametrize("name", sorted(GENAI))
def test_genai_builder_model(name, tmp_path):
    _check(name, GENAI[name], tmp_path)


def test_qwen3_decisions_name_the_norms(tmp_path):
    report = flashnorm_onnx.inspect(_build("qwen3_tied_dynamo"))
    by_name = {d.name: d for d in report.decisions}
    for layer in range(2):
        assert by_name[f"model.layers.{layer}.input_layernorm.weight"].status == "folded"
        assert by_name[f"model.layers.{layer}.post_attention_layernorm.weight"].status == "folded"
        for qk in ("q_norm", "k_norm"):
            d = by_name[f"model.layers.{layer}.self_attn.{qk}.weight"]
            assert d.status == "skipped" and "not a linear layer" in d.reason
    final = by_name["model.norm.weight"]
    assert final.status == "folded" and [c.action for c in final.consumers] == ["untied copy"]


def test_mixtral_moe_folds_into_the_router_and_every_expert(tmp_path):
    """Legacy-exported Mixtral (4 experts, top 2): each post-attention norm reaches the router
    through Reshape(view(-1, hidden)) and every expert's w1/w3 through Unsqueeze -> Gather of
    the expert's rows -> Reshape; all of them fold, and the folded model computes what the
    transformers model computes, also on inputs that leave experts without tokens."""
    import onnxruntime as ort

    src = _build("mixtral_legacy")
    out = tmp_path / "model.onnx"
    report = flashnorm_onnx.optimize(src, out)
    assert (report.folded, report.skipped) == (5, 0), report.text()
    by_name = {d.name: d for d in report.decisions}
    for layer in range(fixtures.LAYERS):
        d = by_name[f"model.layers.{layer}.post_attention_layernorm.weight"]
        assert d.status == "folded"
        names = sorted(c.node for c in d.consumers)
        moe = f"/model/layers.{layer}/block_sparse_moe"
        assert names == sorted([f"{moe}/gate/MatMul"] + [f"{moe}/experts.{e}/{w}/MatMul"
                                                         for e in range(fixtures.EXPERTS) for w in ("w1", "w3")])
        assert all(c.action == "in place" for c in d.consumers)
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch, seq in ((2, 5), (1, 1), (1, 16)):  # one token selects 2 of the 4 experts
        feeds = fixtures.feeds_for(src, batch=batch, seq=seq, seed=seq)
        (x,), (y,) = a.run(None, feeds), b.run(None, feeds)
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(y, fixtures.reference_output("mixtral_legacy", feeds), rtol=0, atol=1e-4)


# fixture: (the final norm's weight, what it folds into: [(op type, node name)])
FINAL_NORM = {
    "gpt2_legacy": ("transformer.ln_f.weight", [("MatMul", "/lm_head/MatMul")]),
    "gpt2_optimum": ("transformer.ln_f.weight", [("MatMul", "/lm_head/MatMul")]),
    "gptj_legacy": ("transformer.ln_f.weight", [("MatMul", "/lm_head/MatMul")]),
    "gptj_optimum": ("transformer.ln_f.weight", [("MatMul", "/lm_head/MatMul")]),
    "vit_cls_legacy": ("vit.layernorm.weight", [("Gemm", "/classifier/Gemm")]),
    "vit_cls_optimum": ("vit.layernorm.weight", [("Gemm", "/classifier/Gemm")]),
}


@pytest.mark.parametrize("name", sorted(FINAL_NORM))
def test_final_norm_folds_through_shape_computed_reshape_and_cls_gather(name, tmp_path):
    """Legacy and optimum graphs carry no value_info: GPT-2's and GPT-J's ln_f reach lm_head
    through a Reshape whose target shape is computed from Shape, ViT's final LayerNorm reaches the
    classifier through a Gather of the CLS row. Both keep the channel axis last once shape
    inference gives them their ranks, and fold; the result equals the transformers model."""
    import onnxruntime as ort

    src = _build(name)
    out = tmp_path / "model.onnx"
    report = flashnorm_onnx.optimize(src, out)
    weight, readers = FINAL_NORM[name]
    final = next(d for d in report.decisions if d.name == weight)
    assert final.status == "folded", report.text()
    assert sorted((c.op, c.node) for c in final.consumers) == sorted(readers)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = fixtures.feeds_for(src, batch=2, seq=5, seed=3)
    (y,) = sess.run(None, feeds)
    np.testing.assert_allclose(y, fixtures.reference_output(name, feeds), rtol=0, atol=1e-4)


def test_vit_model_final_norm_is_a_graph_output():
    for name in ("vit_dynamo", "vit_legacy"):
        report = flashnorm_onnx.inspect(_build(name))
        final = next(d for d in report.decisions if d.name == "layernorm.weight")
        assert final.status == "skipped" and "graph output" in final.reason, report.text()


def test_tied_embedding_bytes_unchanged_and_no_untie(tmp_path):
    src = _build("qwen3_tied_dynamo")
    out = tmp_path / "model.onnx"
    report = flashnorm_onnx.optimize(src, out)
    a, b = onnx.load(str(src)), onnx.load(str(out))
    emb = next(n.input[0] for n in a.graph.node if n.op_type == "Gather" and n.input[0] in
               {i.name for i in a.graph.initializer})
    get = lambda m: next(onnx.numpy_helper.to_array(i) for i in m.graph.initializer if i.name == emb)  # noqa: E731
    assert get(a).tobytes() == get(b).tobytes()
    assert report.bytes_added == get(a).nbytes

    strict = flashnorm_onnx.inspect(src, untie=False)
    final = next(d for d in strict.decisions if d.name == "model.norm.weight")
    assert final.status == "skipped" and "--no-untie" in final.reason
    assert strict.folded == 4


def test_dynamo_chain_becomes_one_fused_kernel(tmp_path):
    out = tmp_path / "model.onnx"
    flashnorm_onnx.optimize(_build("llama_dynamo"), out)
    ops = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
    assert ops.count("SimplifiedLayerNormalization") == 5
    assert "Reciprocal" not in ops and "ReduceMean" not in ops
    out23 = tmp_path / "m23.onnx"
    flashnorm_onnx.optimize(_build("llama_dynamo_opset23"), out23)
    ops23 = [n.op_type for n in onnx.load(str(out23), load_external_data=False).graph.node]
    assert ops23.count("RMSNormalization") == 5


def test_independent_ort_comparison_on_optimum_past(tmp_path):
    """Beyond optimize's own check: other inputs (batch 2, a 3-token cache) through ORT here."""
    import onnxruntime as ort

    from flashnorm_onnx.verify.inputs import Case, make_feeds, specs_from_session, vocab_sizes

    src = _build("llama_optimum_past")
    out = tmp_path / "model.onnx"
    flashnorm_onnx.optimize(src, out)
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    import onnx_ir as ir

    feeds = make_feeds(specs_from_session(a), Case("decode", batch=2, sequence=2, past=3),
                       vocab=vocab_sizes(ir.load(str(src))), seed=7)
    for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)


def _large_model_check(name: str, tmp_path, monkeypatch) -> None:
    from flashnorm_onnx.pipeline import api
    from flashnorm_onnx.verify import policy

    monkeypatch.setattr(policy, "VERIFY_MEMORY_FRACTION", 1e-12)  # as if the model were too large to run whole
    src = _build(name)
    report = flashnorm_onnx.optimize(src, tmp_path / "out" / "model.onnx")
    folded = (GENAI.get(name) or EXPECTED[name])[0]
    if folded == 0:
        assert report.verification.method == "skipped"
        return
    v = report.verification
    assert v.method == "subgraph+algebraic+structure+plan" and v.passed, report.text()
    norms = [o for o in v.outputs if o["case"] == "subgraph" and o["name"].endswith("(norm)")]
    linears = [o for o in v.outputs if o["case"] == "subgraph" and not o["name"].endswith("(norm)")
               and "(norm output" not in o["name"]]
    assert len(norms) == folded == report.folded
    assert len(linears) == sum(len(d.consumers) for d in report.decisions if d.status == "folded")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_large_model_check_on_every_export(name, tmp_path, monkeypatch):
    """The check large models get (pieces run in ORT + algebra) passes on every exporter's form."""
    _large_model_check(name, tmp_path, monkeypatch)


@pytest.mark.genai
@pytest.mark.parametrize("name", sorted(GENAI))
def test_large_model_check_on_genai_models(name, tmp_path, monkeypatch):
    _large_model_check(name, tmp_path, monkeypatch)
