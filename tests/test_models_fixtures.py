"""Each fixture of models/fixtures.py really has the export form it claims, and runs.

Checks are written against the raw graph (op types, domains, initializers) where possible, so
they do not only trust models.fixtures.find_norms (which asks the fold pass's catalogue,
flashnorm_onnx.passes.norm_patterns, and only names its forms); the expected counts are what the exporters
were observed to produce (see each recipe's doc), for 2 layers:
decoder norms = 2 per layer + final = 5; Qwen3 adds q_norm + k_norm per layer = 9.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from flashnorm_onnx.passes import norm_patterns
from models import fixtures as F
from tests import graphs

# name -> (norm forms with their counts, embedding shared with lm_head in the graph, opset)
EXPECTED: dict[str, tuple[dict[str, int], bool, int]] = {
    "llama_dynamo": ({"rms_chain_reciprocal": 5}, False, 20),
    "llama_dynamo_opset23": ({"RMSNormalization": 5}, False, 23),
    "llama_dynamo_noopt": ({"rms_chain_reciprocal": 5}, True, 20),
    "llama_legacy": ({"rms_chain_div": 5}, False, 17),
    "llama_dynamo_fp16": ({"rms_chain_reciprocal": 5}, False, 20),
    "llama_legacy_fp16": ({"rms_chain_div": 5}, False, 17),
    "qwen3_tied_dynamo": ({"rms_chain_reciprocal": 9}, True, 20),
    "qwen3_untied_dynamo": ({"rms_chain_reciprocal": 9}, False, 20),
    "qwen3_tied_legacy": ({"rms_chain_div": 9}, False, 17),
    "qwen3_untied_dynamo_opset23": ({"RMSNormalization": 9}, False, 23),
    "mistral_dynamo": ({"rms_chain_reciprocal": 5}, False, 20),
    "mixtral_legacy": ({"rms_chain_div": 5}, False, 17),
    "llama_optimum": ({"rms_chain_div": 5}, False, 18),
    "llama_optimum_past": ({"rms_chain_div": 5}, True, 18),
    "qwen3_optimum_past": ({"rms_chain_div": 9}, True, 18),
    "qwen3_ort_opt": ({"SimplifiedLayerNormalization": 5, "SkipSimplifiedLayerNormalization": 4}, True, 20),
    "llama_ort_opt": ({"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4}, False, 17),
    "qwen3_genai_fp32": ({"SimplifiedLayerNormalization": 5, "SkipSimplifiedLayerNormalization": 4}, True, 22),
    "qwen3_genai_int4": ({"SimplifiedLayerNormalization": 5, "SkipSimplifiedLayerNormalization": 4}, True, 22),
    "llama_genai_fp32": ({"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4}, True, 22),
    "bert_dynamo": ({"LayerNormalization": 5}, False, 20),
    "bert_legacy": ({"LayerNormalization": 5}, False, 17),
    "gpt2_dynamo": ({"LayerNormalization": 5}, True, 20),
    "gpt2_legacy": ({"LayerNormalization": 5}, False, 17),
    "bert_ort_opt": ({"EmbedLayerNormalization": 1, "SkipLayerNormalization": 4}, False, 17),
    "gpt2_ort_opt": ({"LayerNormalization": 1, "SkipLayerNormalization": 4}, False, 17),
    "vit_dynamo": ({"LayerNormalization": 5}, False, 20),
    "gpt2_optimum": ({"LayerNormalization": 5}, True, 18),
    "gptj_legacy": ({"LayerNormalization": 3}, False, 17),
    "gptj_optimum": ({"LayerNormalization": 3}, False, 18),
    "vit_legacy": ({"LayerNormalization": 5}, False, 17),
    "vit_cls_legacy": ({"LayerNormalization": 5}, False, 17),
    "vit_cls_optimum": ({"LayerNormalization": 5}, False, 18),
}

RMS_FUSED = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization"}


def _params(names):
    out = []
    for name in names:
        marks = [pytest.mark.genai] if F.FIXTURES[name].exporter == "genai" else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


ALL = _params(F.FIXTURES)


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter((n.domain if n.domain != "ai.onnx" else "", n.op_type) for n in model.graph.node)


def _load(path, external=True) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=external)


def test_registry_matches_expectations():
    assert set(EXPECTED) == set(F.FIXTURES)
    for name, recipe in F.FIXTURES.items():
        assert recipe.name == name
        if recipe.source:
            assert recipe.source in F.FIXTURES
            src = F.FIXTURES[recipe.source]
            assert (src.family, src.tied) == (recipe.family, recipe.tied), name


@pytest.mark.parametrize("name", ALL)
def test_form(name, build_fixture, fixture_info):
    path = build_fixture(name)
    info = fixture_info(name)
    recipe = F.FIXTURES[name]
    model = _load(path, external=False)
    ops = _ops(model)
    expected_forms, expected_shared, expected_opset = EXPECTED[name]

    # fixture.json describes this fixture and agrees with the graph
    assert info["name"] == name and info["family"] == recipe.family and info["exporter"] == recipe.exporter
    assert info["num_layers"] == F.LAYERS
    assert info["tied"] == recipe.tied
    assert info["vocab_size"] == (None if recipe.family == "vit" else F.VOCAB)
    norm_counts = {k: v for k, v in info["norm_counts"].items() if v}
    assert norm_counts == expected_forms
    assert Counter(n["form"] for n in F.find_norms(path)) == Counter(expected_forms)
    assert info["tied_in_graph"] is expected_shared
    assert info["opset"] == expected_opset
    assert model.ir_version <= F.MAX_IR_VERSION
    assert info["has_past"] == recipe.has_past == any(i.name.startswith("past_key_values") for i in model.graph.input)

    # raw-graph checks of the claimed form
    n_rms_chain = expected_forms.get("rms_chain_reciprocal", 0) + expected_forms.get("rms_chain_div", 0)
    if n_rms_chain:
        assert ops[("", "ReduceMean")] == n_rms_chain
        assert ops[("", "Sqrt")] >= n_rms_chain  # unoptimized SDPA adds its own Sqrt
        assert ops[("", "Pow")] >= n_rms_chain
        assert not any(op in RMS_FUSED for _, op in ops)
        if "rms_chain_reciprocal" in expected_forms:
            assert ops[("", "Reciprocal")] == n_rms_chain
        else:
            assert ops[("", "Reciprocal")] == 0
            one = _constant_div_numerators(model)
            assert one.count(1.0) >= n_rms_chain
    for form, count in expected_forms.items():
        if form.startswith("rms_chain"):
            continue
        domain = "com.microsoft" if form.startswith(("Skip", "Embed")) else ""
        assert ops[(domain, form)] == count, (form, ops)
    if "SimplifiedLayerNormalization" in expected_forms:
        # ORT writes it in the default domain (a quirk of ORT), not com.microsoft
        assert ops[("com.microsoft", "SimplifiedLayerNormalization")] == 0
    if recipe.exporter == "ort_opt" and recipe.family in ("llama", "qwen3"):
        assert ops[("", "SimplifiedLayerNormalization")] >= 1
        assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] >= 1
    if recipe.dtype == "float16":
        # chains computed in float32 between Casts; the scales are fp16
        casts_to = Counter(
            onnx.helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "Cast" for a in n.attribute
        )
        assert casts_to[onnx.TensorProto.FLOAT] >= 5 and casts_to[onnx.TensorProto.FLOAT16] >= 5


def _constant_div_numerators(model: onnx.ModelProto) -> list[float]:
    """Values of scalar constant first inputs of Div nodes (the legacy chains' Div(1, .))."""
    values = {}
    for n in model.graph.node:
        if n.op_type == "Constant":
            t = onnx.helper.get_attribute_value(n.attribute[0])
            if isinstance(t, onnx.TensorProto):
                values[n.output[0]] = onnx.numpy_helper.to_array(t)
    for t in model.graph.initializer:
        if not t.dims or list(t.dims) in ([1], []):
            values[t.name] = onnx.numpy_helper.to_array(t)
    out = []
    for n in model.graph.node:
        if n.op_type == "Div" and n.input[0] in values and values[n.input[0]].size == 1:
            out.append(float(values[n.input[0]].reshape(())))
    return out


@pytest.mark.parametrize("name", ALL)
def test_norm_scales_are_random(name, build_fixture):
    """Every norm has an initializer scale, none is all ones (a wrong fold would show)."""
    model = _load(build_fixture(name))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    norms = F.find_norms(model)
    assert norms
    for norm in norms:
        assert norm["scale"] in inits, norm
        scale = inits[norm["scale"]].astype(np.float32)
        assert scale.ndim == 1 and scale.size in (F.HIDDEN, F.HEAD_DIM), norm
        assert not np.allclose(scale, 1.0), norm
        assert 0.45 <= scale.min() and scale.max() <= 1.55, norm
    # distinct norms have distinct scales (no exporter deduplicated them)
    scales = [n["scale"] for n in norms]
    assert len(set(scales)) == len(scales)


@pytest.mark.parametrize("name", ALL)
def test_runs_in_onnxruntime(name, build_fixture):
    import onnxruntime as ort

    path = build_fixture(name)
    recipe = F.FIXTURES[name]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = F.fixture_feeds(name, batch=2, seq=5)
    out = sess.run(None, feeds)[0]
    batch = feeds[next(iter(feeds))].shape[0]
    if recipe.family == "vit" and recipe.head == "classification":
        assert out.shape == (batch, F.NUM_LABELS)
    elif recipe.family == "vit":
        assert out.shape == (batch, (F.IMAGE_SIZE // F.PATCH_SIZE) ** 2 + 1, F.HIDDEN)
    elif recipe.family == "bert":
        assert out.shape == (batch, 5, F.HIDDEN)
    else:
        assert out.shape == (batch, 5, F.VOCAB)
    assert np.isfinite(out.astype(np.float32)).all()
    # the exported graph computes what the transformers model computes
    ref = F.reference_output(name, feeds)
    if recipe.precision == "int4":
        tol = 0.5  # 4-bit weights: only a sanity bound
    elif recipe.dtype == "float16":
        tol = 5e-3
    else:
        tol = 1e-4
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=tol, rtol=0)


def test_opset23_batch_limit(build_fixture):
    """Documented limitation: ORT runs the opset-23 RotaryEmbedding export at batch 1 only."""
    import onnxruntime as ort

    path = build_fixture("llama_dynamo_opset23")
    so = ort.SessionOptions()
    so.log_severity_level = 4
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, F.feeds_for(path, batch=1))
    with pytest.raises(Exception, match="cos_cache"):
        sess.run(None, F.feeds_for(path, batch=2))


# -- one catalogue of norm forms ---------------------------------------------------------------

# the fixtures' name of the one norm in each hand-built form of tests/graphs.py
GRAPH_FORMS = {
    "dynamo": "rms_chain_reciprocal", "legacy": "rms_chain_div", "legacy17": "rms_chain_div",
    "fp16_chain": "rms_chain_div", "mulxx_div": "rms_chain_div", "pow_neg_half": "rms_chain_pow",
    "rmsnorm23": "RMSNormalization", "sln": "SimplifiedLayerNormalization",
    "skip_sln": "SkipSimplifiedLayerNormalization", "layernorm": "LayerNormalization",
    "layernorm_nobias": "LayerNormalization", "ln_chain": "layernorm_chain", "skip_ln": "SkipLayerNormalization",
}


def test_graph_forms_cover_the_hand_built_graphs():
    assert set(GRAPH_FORMS) == set(graphs.RMS_FORMS + graphs.LN_FORMS)
    assert set(GRAPH_FORMS.values()) <= set(F.NORM_FORMS)


@pytest.mark.parametrize("form", sorted(GRAPH_FORMS))
def test_find_norms_counts_what_the_pass_finds(form):
    """Every form the pass knows is counted, named, and has its scale found (the fixtures' own
    matcher missed Pow(., -0.5) chains and the scale of Div(x, Sqrt) chains)."""
    model = graphs.build(form)
    norms = F.find_norms(model)
    matches = norm_patterns.find_norms(F._ir_model(model).graph)
    assert [n["form"] for n in norms] == [GRAPH_FORMS[form]]
    assert len(matches) == 1
    assert norms[0]["scale"] == "g" and norms[0]["problem"] is None
    assert norms[0]["node"] == (matches[0].anchor.name or matches[0].output.name)


def test_find_norms_follows_the_catalogue(monkeypatch):
    """A norm form is added in one place: whatever norm_patterns.find_norms returns is what
    the fixtures count (here: the catalogue is made to see nothing, then one norm twice)."""
    model = graphs.build("dynamo")
    assert len(F.find_norms(model)) == 1
    monkeypatch.setattr(norm_patterns, "find_norms", lambda graph: [])
    assert F.find_norms(model) == []
    monkeypatch.undo()
    real = norm_patterns.find_norms
    monkeypatch.setattr(norm_patterns, "find_norms", lambda graph: real(graph) * 2)
    assert [n["form"] for n in F.find_norms(model)] == ["rms_chain_reciprocal"] * 2


def test_find_norms_reports_a_problem():
    """A norm the fold must not touch is still a norm; its problem comes along."""
    model = graphs.build("layernorm")
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            node.attribute.append(onnx.helper.make_attribute("axis", 1))
    (norm,) = F.find_norms(model)
    assert norm["form"] == "LayerNormalization" and "axis 1" in norm["problem"]


# -- specific consumer forms ------------------------------------------------------------------


def test_noopt_every_linear_reads_a_transpose(build_fixture):
    model = _load(build_fixture("llama_dynamo_noopt"), external=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in producer]
    transposed = [producer[w] for w in weights if producer[w].op_type == "Transpose" and producer[w].input[0] in inits]
    assert len(transposed) == 2 * 7 + 1  # q,k,v,o,gate,up,down per layer + lm_head
    for t in transposed:
        assert list(onnx.helper.get_attribute_value(t.attribute[0])) == [1, 0]
    # the tied weight: embedding Gather and lm_head Transpose read the same initializer
    gathers = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits}
    assert gathers & {t.input[0] for t in transposed}


def test_optimum_tied_transpose_without_perm(build_fixture):
    model = _load(build_fixture("llama_optimum_past"), external=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    head = next(n for n in model.graph.node if n.output[0] == "logits")
    assert head.op_type == "MatMul"
    tr = producer[head.input[1]]
    assert tr.op_type == "Transpose" and not tr.attribute  # default perm (reverse)
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == tr.input[0])
    assert gather is not None


def _readers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return readers


@pytest.mark.parametrize("name", ["gpt2_legacy", "gpt2_optimum", "gptj_legacy", "gptj_optimum"])
def test_final_norm_reaches_lm_head_through_a_shape_computed_reshape(name, build_fixture):
    """ln_f -> Reshape(target shape = Concat of dims taken from Shape) -> lm_head MatMul, in a
    graph without value_info (what the fold needs shape inference for)."""
    model = _load(build_fixture(name), external=False)
    assert not model.graph.value_info
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = _readers(model)
    (ln_f,) = [n for n in model.graph.node if n.op_type == "LayerNormalization" and "ln_f" in n.name]
    (reshape,) = readers[ln_f.output[0]]
    assert reshape.op_type == "Reshape" and producer[reshape.input[1]].op_type == "Concat"
    assert [n.name for n in readers[reshape.output[0]]] == ["/lm_head/MatMul"]


@pytest.mark.parametrize("name", ["gptj_legacy", "gptj_optimum"])
def test_gptj_parallel_block_one_norm_per_layer(name, build_fixture):
    """GPT-J computes attention and MLP from the same ln_1: it feeds q/k/v and fc_in."""
    model = _load(build_fixture(name), external=False)
    readers = _readers(model)
    for layer in range(F.LAYERS):
        (ln_1,) = [n for n in model.graph.node if n.name == f"/transformer/h.{layer}/ln_1/LayerNormalization"]
        linears = sorted(n.name for n in readers[ln_1.output[0]] if n.op_type == "MatMul")
        assert linears == sorted(f"/transformer/h.{layer}/{p}/MatMul" for p in
                                 ("attn/q_proj", "attn/k_proj", "attn/v_proj", "mlp/fc_in"))


@pytest.mark.parametrize("name", ["vit_cls_legacy", "vit_cls_optimum"])
def test_vit_classifier_reads_the_cls_row(name, build_fixture):
    """vit.layernorm -> Gather(axis 1, constant 0) -> classifier Gemm(transB=1)."""
    model = _load(build_fixture(name), external=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = _readers(model)
    (final,) = [n for n in model.graph.node if n.name == "/vit/layernorm/LayerNormalization"]
    (gather,) = readers[final.output[0]]
    assert gather.op_type == "Gather"
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gather.attribute} == {"axis": 1}
    index = producer[gather.input[1]]
    assert index.op_type == "Constant" and onnx.numpy_helper.to_array(index.attribute[0].t).tolist() == 0
    (gemm,) = readers[gather.output[0]]
    assert gemm.op_type == "Gemm" and gemm.input[1] == "classifier.weight"
    if F.FIXTURES[name].exporter == "optimum":  # every pixel_values dim symbolic
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch_size", "num_channels", "height", "width"]


@pytest.mark.genai
def test_genai_int4_uses_matmulnbits(build_fixture):
    model = _load(build_fixture("qwen3_genai_int4"), external=False)
    ops = _ops(model)
    assert ops[("com.microsoft", "MatMulNBits")] == 2 * 5 + 1  # qkv, o, gate, up, down + lm_head
    assert ops[("", "MatMul")] == 0
    assert ops[("com.microsoft", "GatherBlockQuantized")] == 1


@pytest.mark.genai
def test_genai_fp32_packs_qkv(build_fixture):
    model = _load(build_fixture("qwen3_genai_fp32"), external=False)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    qkv = [n for n in model.graph.node if n.op_type == "MatMul" and "qkv_proj" in n.name]
    assert len(qkv) == 2
    assert dims[qkv[0].input[1]] == [F.HIDDEN, (F.HEADS + 2 * F.KV_HEADS) * F.HEAD_DIM]
    assert (build_fixture("qwen3_genai_fp32").parent / "genai_config.json").is_file()


# -- cache / atomic build ----------------------------------------------------------------------


def test_cache_and_rebuild(tmp_path, monkeypatch):
    path = F.build("bert_legacy", tmp_path)
    assert path == tmp_path / "bert_legacy" / "model.onnx"
    stamp = (path.parent / F.STAMP).read_text().strip()
    assert stamp == F.recipe_hash("bert_legacy")
    mtime = path.stat().st_mtime_ns
    assert F.build("bert_legacy", tmp_path) == path
    assert path.stat().st_mtime_ns == mtime  # cached
    monkeypatch.setattr(F, "RECIPE_VERSION", F.RECIPE_VERSION + 1000)
    assert F.recipe_hash("bert_legacy") != stamp
    F.build("bert_legacy", tmp_path)
    assert (path.parent / F.STAMP).read_text().strip() == F.recipe_hash("bert_legacy")
    info = json.loads((path.parent / "fixture.json").read_text())
    assert info["recipe_hash"] == F.recipe_hash("bert_legacy")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_env_var_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHNORM_FIXTURES", str(tmp_path / "fx"))
    assert F.fixtures_root() == tmp_path / "fx"
    assert F.fixtures_root(tmp_path) == tmp_path


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(recipe, out, root):
        (out / "model.onnx").write_bytes(b"half a model")
        raise RuntimeError("killed")

    monkeypatch.setitem(F._BUILDERS, "legacy", broken)
    with pytest.raises(RuntimeError, match="killed"):
        F.build("gpt2_legacy", tmp_path)
    assert not (tmp_path / "gpt2_legacy").exists()
    assert list(tmp_path.iterdir()) == []


def test_genai_unavailable_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "GENAI_VENV", tmp_path / "no-venv")
    with pytest.raises(F.FixtureUnavailable, match="genai-env"):
        F.build("qwen3_genai_fp32", tmp_path)
    assert not list(tmp_path.iterdir())


def test_unknown_fixture():
    with pytest.raises(KeyError):
        F.build("no_such_fixture")


def test_cli_list(capsys):
    assert F.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in F.FIXTURES:
        assert name in out


def test_cli_table(capsys, tmp_path):
    """`python -m models.fixtures table`: the README's fold counts, one optimize run per fixture."""
    rows_json = tmp_path / "rows.json"
    assert F.main(["table", "qwen3_untied_dynamo", "llama_dynamo", "--json", str(rows_json)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| architecture | exporter |")
    assert lines[1].startswith("| llama | dynamo | `llama_dynamo` (opset 20) | 5 | 5 | 0 | 0 | onnxruntime+plan: passed |")
    assert lines[2].startswith("| qwen3 | dynamo | `qwen3_untied_dynamo` (opset 20) | 9 | 5 | 4: 4 × feeds ")
    rows = json.loads(rows_json.read_text())
    qwen3 = next(r for r in rows if r["fixture"] == "qwen3_untied_dynamo")
    assert (qwen3["norms"], qwen3["folded"], qwen3["skipped"], qwen3["untied"]) == (9, 5, 4, 0)
    assert sum(qwen3["reasons"].values()) == 4
