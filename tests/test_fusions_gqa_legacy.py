"""GroupQueryAttention on optimum's with-past export (flashnorm_onnx/fusions/gqa_legacy.py, issue 24).

On the tiny Llama and Qwen3 optimum exports with a KV cache (4 query heads, 2 KV heads, 2 layers):
``--for-ort`` writes one ``GroupQueryAttention`` per layer (inside an ``If`` whose other branch
runs the multi-token step on a cache at batch > 1, which ORT's CPU kernel refuses), and the
logits and present keys/values equal the export's at every position the mask keeps: a batch with
a left- and a right-padded row, one decode step on that padded cache, a multi-token step on it at
batch 2 and at batch 1. Without ``attention_bias`` the verification's padded cases fail it; where
ORT ignores ``attention_bias``, or the mask is refused, nothing is fused and the reason is given.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from flashnorm_onnx.cli import main
from flashnorm_onnx.fusions import gqa_legacy

pytest.importorskip("onnxscript")


def _ops(path: Path) -> Counter:
    """Operators of the model at ``path``, subgraphs included (``packed GQA``: those reading Q, K
    and V from their first input)."""
    out: Counter = Counter()

    def walk(graph):
        for node in graph.node:
            out[node.op_type] += 1
            if node.op_type == "GroupQueryAttention" and node.input[1] == "" and node.input[2] == "":
                out["packed GQA"] += 1
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(onnx.load(str(path), load_external_data=False).graph)
    return out


@pytest.fixture(scope="module", params=["llama_optimum_past", "qwen3_optimum_past", "llama_optimum_past+pack"])
def fused(request, build_fixture, tmp_path_factory):
    """(export, --for-ort output, report); Qwen3's per-head Q/K norms sit between the projection and
    the rotary (Q and K go back to [B, S, N*H] through a Transpose there); ``+pack``: with
    ``--pack-linears``, the node with the rotary inside reads Q, K and V packed in one tensor."""
    name, _, pack = request.param.partition("+")
    source = build_fixture(name)
    folder = tmp_path_factory.mktemp("gqa_legacy")
    out, report = folder / "m.onnx", folder / "r.json"
    args = ["optimize", str(source), "-o", str(out), "--for-ort", "--report", str(report), "-q"]
    assert main(args + (["--pack-linears"] if pack else [])) == 0
    return source, out, json.loads(report.read_text())


def _feeds(mask: np.ndarray, seq: int, past: dict | None, rng) -> dict:
    """Hugging Face's feeds for ``mask`` [B, past + seq]: position ids cumsum - 1 (1 at pads)."""
    batch, total = mask.shape
    positions = np.cumsum(mask, 1) - 1
    positions[mask == 0] = 1
    feeds = {"input_ids": rng.integers(0, 500, (batch, seq)), "attention_mask": mask.astype(np.int64),
             "position_ids": positions[:, total - seq:].astype(np.int64)}
    for layer in range(2):
        for kv in ("key", "value"):
            name = f"past_key_values.{layer}.{kv}"
            feeds[name] = past[name] if past else np.zeros((batch, 2, 0, 16), np.float32)
    return feeds


def _compare(a, b, feeds: dict) -> dict:
    """Run both; assert every output equal at the kept positions (fp32 tolerance); the export's outputs."""
    names = [o.name for o in a.get_outputs()]
    want, got = a.run(None, feeds), b.run(None, feeds)
    keep = feeds["attention_mask"].astype(bool)
    seq = feeds["input_ids"].shape[1]
    for name, x, y in zip(names, want, got):
        assert x.shape == y.shape, name
        if name == "logits":  # [B, S, V] at the new tokens' kept positions
            x, y = x[keep[:, -seq:]], y[keep[:, -seq:]]
        else:  # present [B, KV, T, H] at every kept position of past + new
            x, y = np.moveaxis(x, 2, 1)[keep], np.moveaxis(y, 2, 1)[keep]
        assert not np.isnan(y).any(), name
        scale = float(np.abs(x).max())
        assert float(np.abs(x - y).max()) <= 1e-5 * scale, (name, float(np.abs(x - y).max()), scale)
    return dict(zip(names, want))


def test_one_gqa_per_layer_reported(fused):
    source, out, report = fused
    assert report["ort_fusions"]["group_query_attention"] == 2
    # Llama's rotary goes inside the node (a second node, rotary outside, for a padded batch's first
    # prompt); Qwen3's Q/K norms leave no [B, S, N*H] value before its rotary: outside
    inside = report["ort_fusions"].get("group_query_attention_rotary_inside", 0)
    assert inside == (2 if "llama" in str(source) and gqa_legacy.ort_rotary_reads_position_ids() else 0)
    ops = _ops(out)
    assert ops["GroupQueryAttention"] == 2 + inside and ops["If"] == 2 + inside
    assert ops["Softmax"] == 2  # the decomposed fallbacks
    assert ops["RotaryEmbedding"] == 4  # outside, in the fallback branches or before the node
    packed = report["ort_fusions"].get("group_query_attention_packed_qkv", 0)
    assert packed == (2 if "packed_linears" in report["ort_fusions"] else 0) == ops["packed GQA"]
    assert report["verification"]["passed"]
    assert any(c.startswith("padded") for c in report["verification"]["cases"])


def test_equal_to_the_export_on_padded_batches_decode_and_multi_token_steps(fused):
    source, out, _ = fused
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (source, out))
    rng = np.random.default_rng(5)
    mask = np.ones((2, 7), np.int64)
    mask[0, :3] = 0  # left padding
    mask[1, 5:] = 0  # right padding
    prefill = _compare(a, b, _feeds(mask, 7, None, rng))
    past = {f"past_key_values.{i}.{kv}": prefill[f"present.{i}.{kv}"] for i in range(2) for kv in ("key", "value")}
    _compare(a, b, _feeds(np.concatenate([mask, np.ones((2, 1), np.int64)], 1), 1, past, rng))  # decode
    step = np.concatenate([mask, np.ones((2, 3), np.int64)], 1)
    _compare(a, b, _feeds(step, 3, past, rng))  # 3 tokens on the cache, batch 2: the If's decomposed branch
    _compare(a, b, _feeds(step[:1], 3, {k: v[:1] for k, v in past.items()}, rng))  # batch 1: the fused node
    one_token = np.zeros((3, 6), np.int64)
    one_token[0, 5] = one_token[1, 0] = 1
    one_token[2] = 1
    _compare(a, b, _feeds(one_token, 6, None, rng))  # rows of one real token (left and right)
    full = np.ones((2, 5), np.int64)  # an unpadded prompt: the rotary inside (Llama) on the first step too
    first = _compare(a, b, _feeds(full, 5, None, rng))
    past = {f"past_key_values.{i}.{kv}": first[f"present.{i}.{kv}"] for i in range(2) for kv in ("key", "value")}
    _compare(a, b, _feeds(np.ones((2, 6), np.int64), 1, past, rng))


def test_gqa_without_the_mask_fails_verification(build_fixture, tmp_path, monkeypatch, capsys):
    """What the genai builder's and onnxscript's GQA do (no attention_bias): the padded cases catch it."""
    real = gqa_legacy._Nodes.__call__

    def dropping_bias(self, op_type, inputs, *args, **kwargs):
        if op_type == "GroupQueryAttention":
            inputs = list(inputs[:10])
        return real(self, op_type, inputs, *args, **kwargs)

    monkeypatch.setattr(gqa_legacy._Nodes, "__call__", dropping_bias)
    out = tmp_path / "m.onnx"
    code = main(["optimize", str(build_fixture("llama_optimum_past")), "-o", str(out), "--for-ort"])
    text = capsys.readouterr()
    assert code == 5, text.out + text.err
    assert "padded" in text.out + text.err and not out.exists()


def _optimized(build_fixture):
    """ORT's transformers optimizer's output, shapes inferred: what the rule sees in ``fuse_light``."""
    import onnx_ir.passes.common as common_passes

    from flashnorm_onnx.fusions.ort import ort_transformers_optimizer

    model = ort_transformers_optimizer(build_fixture("llama_optimum_past"))
    common_passes.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    return model


def test_refusals_say_why(build_fixture, monkeypatch):
    monkeypatch.setattr(gqa_legacy, "ort_honours_attention_bias", lambda: False)
    count, why = gqa_legacy.fuse_gqa_legacy(_optimized(build_fixture))
    assert count == 0 and "ignores its attention_bias" in why[0]
    monkeypatch.setattr(gqa_legacy, "ort_honours_attention_bias", lambda: True)
    monkeypatch.setattr(gqa_legacy, "_mask_is_causal", lambda *a, **k: "the mask lets a query see a later key")
    model = _optimized(build_fixture)
    count, why = gqa_legacy.fuse_gqa_legacy(model)
    assert count == 0 and len(why) == 2 and all("later key" in w for w in why), why
    assert not any(n.op_type == "GroupQueryAttention" for n in model.graph)


def test_a_mask_that_lets_queries_see_later_keys_is_refused_by_the_probe(build_fixture):
    """The mask's condition negated (padding and future keys visible): the probe, run on the mask's
    subgraph with the keys' length fed from shapes, refuses both layers."""
    model = _optimized(build_fixture)
    for node in [n for n in model.graph if n.op_type == "Softmax"]:
        add = node.inputs[0].producer()
        where = next(i.producer() for i in add.inputs if i.producer() is not None and i.producer().op_type == "Where")
        negated = ir.node("Not", [where.inputs[0]], name=f"{where.name}/not")
        model.graph.insert_before(where, negated)
        where.replace_input_with(0, negated.outputs[0])
    count, why = gqa_legacy.fuse_gqa_legacy(model)
    assert count == 0 and len(why) == 2 and all("later key" in w for w in why), why


def test_rotary_stays_outside_where_the_kernel_reads_positions_otherwise(build_fixture, monkeypatch):
    """An ORT whose rotary probe disagrees (e.g. one that ignores position_ids): one node per layer,
    the rotary outside, no second If."""
    from flashnorm_onnx.fusions.gqa_rotary import count_rotary_inside

    monkeypatch.setattr(gqa_legacy, "ort_rotary_reads_position_ids", lambda: False)
    model = _optimized(build_fixture)
    count, why = gqa_legacy.fuse_gqa_legacy(model)
    assert count == 2 and not why and count_rotary_inside(model) == 0
    assert sum(n.op_type == "If" for n in model.graph) == 2



def test_rotary_inside_on_a_padded_prompt_fails_verification(build_fixture, tmp_path, monkeypatch, capsys):
    """The kernel's rotary on a left-padded batch's first prompt (positions[0, 0] + s for every row)
    writes other keys to the cache: a condition that always takes the rotary-inside node is caught."""
    if not gqa_legacy.ort_rotary_reads_position_ids():
        pytest.skip("this onnxruntime's rotary probe disagrees: the rotary stays outside")
    monkeypatch.setattr(gqa_legacy, "positions_condition",
                        lambda new, positions, past_len: new.const([True], ir.DataType.BOOL))
    out = tmp_path / "m.onnx"
    code = main(["optimize", str(build_fixture("llama_optimum_past")), "-o", str(out), "--for-ort"])
    text = capsys.readouterr()
    assert code == 5, text.out + text.err
    assert "padded" in text.out + text.err and not out.exists()


def test_the_report_says_why_an_attention_was_not_fused(build_fixture, tmp_path, monkeypatch):
    monkeypatch.setattr(gqa_legacy, "_mask_is_causal", lambda *a, **k: "the mask lets a query see a later key")
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    assert main(["optimize", str(build_fixture("llama_optimum_past")), "-o", str(out), "--for-ort", "--report",
                 str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    assert "group_query_attention" not in data["ort_fusions"]
    notes = [n for n in data["notes"] if n.startswith("GroupQueryAttention not used")]
    assert len(notes) == 1 and "at 2 Softmax nodes" in notes[0] and notes[0].endswith("see a later key"), notes
    monkeypatch.setattr(gqa_legacy, "ort_honours_attention_bias", lambda: False)
    assert main(["optimize", str(build_fixture("llama_optimum_past")), "-o", str(out), "--for-ort", "--report",
                 str(report), "-q", "--force"]) == 0
    assert "GroupQueryAttention not used: this onnxruntime ignores its attention_bias input" in \
        json.loads(report.read_text())["notes"]
