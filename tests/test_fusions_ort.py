"""``optimize --for-ort``: onnxscript's exact ORT fusions, then the fold, on exported models.

Each output is run in ONNX Runtime against its input at a batch and length the verification did
not use, and the fused operators are counted in the written graph.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from flashnorm_onnx.cli import main
from flashnorm_onnx.verify.inputs import Case, make_feeds, specs_from_session

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _ops(path: Path) -> Counter:
    model = onnx.load(str(path), load_external_data=False)
    return Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph.node)


def _run_both(source: Path, output: Path, case: Case) -> None:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    a = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(output), options, providers=["CPUExecutionProvider"])
    feeds = make_feeds(specs_from_session(a), case, seed=5)
    names = [o.name for o in a.get_outputs()]
    for name, x, y in zip(names, a.run(None, feeds), b.run(names, feeds)):
        scale = max(float(np.abs(x).max()), 1e-6)
        assert float(np.abs(x - y).max()) / scale < 1e-4, name


def _optimize(source: Path, out: Path, *extra: str) -> dict:
    report = out.with_suffix(".json")
    rc = main(["optimize", str(source), "-o", str(out), "--for-ort", "--report", str(report), "-q", *extra])
    assert rc == 0
    return json.loads(report.read_text())


def test_dynamo_export_fuses_and_folds_every_norm(tmp_path):
    from models import fixtures

    source = Path(fixtures.build("llama_dynamo"))
    out = tmp_path / "model.onnx"
    data = _optimize(source, out)
    fusions = data["ort_fusions"]
    assert fusions["rms_normalization"] > 0 and fusions["skip_rms_normalization"] > 0, fusions
    assert fusions.get("rotary_embedding", 0) > 0, fusions  # then moved into GroupQueryAttention
    summary = data["summary"]
    assert summary["skipped"] == 0 and summary["folded"] == summary["norms"] > 0
    assert data["verification"]["passed"] and data["verification"]["method"] == "onnxruntime"
    ops = _ops(out)
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == fusions["skip_rms_normalization"]
    # no decomposed RMSNorm left; attention is GroupQueryAttention (fed the mask: test_fusions_gqa.py),
    # which took the rotary embeddings inside (the positions are an in-graph arange)
    assert ops[("ai.onnx", "ReduceMean")] == 0 and ops[("ai.onnx", "Pow")] == 0
    assert ops[("com.microsoft", "GroupQueryAttention")] == fusions["group_query_attention"] == 2
    assert ops[("com.microsoft", "RotaryEmbedding")] == 0
    # batch 3 at another length: the rotary kernel needs position ids of the batch's size
    _run_both(source, out, Case("b3", batch=3, sequence=11))


def test_final_norm_folds_into_fused_matmul(tmp_path):
    """The fused output layer is com.microsoft.FusedMatMul(transB=1): the final norm folds into it."""
    from models import fixtures

    source = Path(fixtures.build("qwen3_tied_dynamo"))  # tied: lm_head = MatMul(y, Transpose(E))
    out = tmp_path / "model.onnx"
    data = _optimize(source, out)
    final = data["norms"][-1]
    assert final["status"] == "folded", final
    assert any("FusedMatMul" in c["op"] for c in final["consumers"]), final["consumers"]
    _run_both(source, out, Case("b2", batch=2, sequence=9))


def test_optimum_with_past(tmp_path):
    from models import fixtures

    source = Path(fixtures.build("llama_optimum_past"))
    out = tmp_path / "model.onnx"
    data = _optimize(source, out)
    assert data["verification"]["passed"]
    assert data["summary"]["skipped"] == 0 and data["ort_fusions"], data["ort_fusions"]
    _run_both(source, out, Case("decode", batch=2, sequence=1, past=7))


def test_checks_that_cannot_see_fusions_are_refused(tmp_path, capsys):
    from models import fixtures

    source = Path(fixtures.build("llama_dynamo"))
    rc = main(["optimize", str(source), "-o", str(tmp_path / "m.onnx"), "--for-ort", "--verify", "subgraph"])
    assert rc == 6
    assert "--for-ort" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_legacy_export_goes_through_ort_transformers_optimizer(tmp_path):
    """onnxscript's patterns are written for dynamo graphs: on the legacy exporter's graph ORT's
    transformers optimizer fuses the residual + norm pairs, and the fold then folds every norm."""
    from models import fixtures

    source = Path(fixtures.build("llama_legacy"))
    out = tmp_path / "model.onnx"
    data = _optimize(source, out)
    assert data["summary"]["skipped"] == 0
    ops = _ops(out)
    skip = ops[("com.microsoft", "SkipSimplifiedLayerNormalization")]
    assert skip == data["ort_fusions"]["ort_transformers_optimizer:SkipSimplifiedLayerNormalization"] > 0
    plain = sum(n for (_domain, op), n in ops.items() if op == "SimplifiedLayerNormalization")
    assert plain + skip == data["summary"]["norms"]
    _run_both(source, out, Case("b3", batch=3, sequence=6))


def test_fp16_legacy_export_loads_with_its_rotary_cache_in_fp16(tmp_path):
    """ORT's transformers optimizer writes the fused RotaryEmbedding's cos/sin caches as float32
    in an fp16 model, which ORT then refuses to load (one type for the input and the caches):
    the caches are cast to the input's dtype, and the output computes the export's function."""
    from models import fixtures

    source = Path(fixtures.build("llama_legacy_fp16"))
    out = tmp_path / "model.onnx"
    data = _optimize(source, out)
    assert data["verification"]["passed"] and data["ort_fusions"]["rotary_cache_in_input_dtype"] == 2
    model = onnx.load(str(out), load_external_data=False)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    caches = {i for n in model.graph.node if n.op_type == "RotaryEmbedding" for i in n.input[2:4]}
    assert caches and all(inits[c] == onnx.TensorProto.FLOAT16 for c in caches)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    a = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    feeds = make_feeds(specs_from_session(a), Case("b2", batch=2, sequence=5), seed=5)
    want, got = a.run(None, feeds)[0].astype(np.float32), b.run(None, feeds)[0].astype(np.float32)
    assert float(np.abs(want - got).max()) / float(np.abs(want).max()) < 5e-3


def _upcast_softmax(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each attention's softmax in float32, as an fp16 export of an eager attention writes it:
    Add(Cast(scores, f32), Cast(mask, f32)) -> Softmax -> Cast(p, f16)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    del graph.value_info[:]
    nodes: list = []
    for node in list(graph.node):
        if node.op_type != "Softmax":
            nodes.append(node)
            continue
        add = producer[node.input[0]]
        i = 0 if getattr(producer.get(add.input[0]), "op_type", "") == "MatMul" else 1
        up = [onnx.helper.make_node("Cast", [add.input[j]], [add.input[j] + ".f32"], to=onnx.TensorProto.FLOAT)
              for j in (i, 1 - i)]
        at = nodes.index(add)
        nodes[at:at] = up
        add.input[i], add.input[1 - i] = up[0].output[0], up[1].output[0]
        p = node.output[0]
        node.output[0] = p + ".f32"
        nodes += [node, onnx.helper.make_node("Cast", [node.output[0]], [p], to=onnx.TensorProto.FLOAT16)]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


@pytest.mark.parametrize("upcast", [False, True], ids=["fp16-softmax", "fp32-softmax"])
def test_fp16_optimum_with_past_takes_the_rotary_inside_grouped_query_attention(tmp_path, upcast):
    """optimum's with-past Llama converted to fp16 (ORT's own float16 converter), its softmax in
    fp16 or, as an eager fp16 export writes it, in float32 between two Casts: the rotary caches
    are cast to fp16 with their shapes (and the float32 mask to fp16), so GroupQueryAttention takes
    the rotary inside and the packed Q/K/V as in fp32; the whole-model check (padded prompt and
    padded decode included) passes, and a batch-2 decode step and a batch-2 multi-token step on a
    cache (the decomposed branch) match the fp16 export."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from models import fixtures

    source = tmp_path / "fp16" / "model.onnx"
    source.parent.mkdir()
    fp16 = convert_float_to_float16(onnx.load(fixtures.build("llama_optimum_past")), keep_io_types=False)
    onnx.save(_upcast_softmax(fp16) if upcast else fp16, str(source))
    out = tmp_path / "model.onnx"
    data = _optimize(source, out)
    fused = data["ort_fusions"]
    assert data["verification"]["passed"] and fused["rotary_cache_in_input_dtype"] == 2
    assert fused["group_query_attention"] == fused["group_query_attention_rotary_inside"] == 2
    assert fused["group_query_attention_packed_qkv"] == 2
    options = ort.SessionOptions()
    options.log_severity_level = 3
    a = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in a.get_outputs()]
    for case in (Case("decode", batch=2, sequence=1, past=7), Case("chunk", batch=2, sequence=3, past=4)):
        feeds = make_feeds(specs_from_session(a), case, seed=5)
        for name, x, y in zip(names, a.run(None, feeds), b.run(names, feeds)):
            x, y = x.astype(np.float32), y.astype(np.float32)
            assert float(np.abs(x - y).max()) / max(float(np.abs(x).max()), 1e-6) < 5e-3, (case.name, name)


@pytest.mark.genai
def test_genai_builder_output_is_the_fold_alone_when_nothing_fuses(tmp_path):
    """The genai builder already writes ORT's fused ops: no fusion applies, and the --for-ort
    output is node for node the plain fold's (never slower than the fold alone)."""
    from models import fixtures

    source = Path(fixtures.build("llama_genai_fp32"))
    out = tmp_path / "for_ort.onnx"
    data = _optimize(source, out)
    assert data["ort_fusions"] == {} and data["verification"]["passed"]
    plain = tmp_path / "fold.onnx"
    assert main(["optimize", str(source), "-o", str(plain), "-q"]) == 0
    a = onnx.load(str(plain), load_external_data=False).graph
    b = onnx.load(str(out), load_external_data=False).graph
    assert [(n.op_type, list(n.input)) for n in a.node] == [(n.op_type, list(n.input)) for n in b.node]
