"""Activation-aware int4: ``optimize --quantize int4 --calibrate`` (flashnorm_onnx/quantize/activation_aware.py,
calibrate.py, search.py, scale_move.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import flashnorm_onnx
from flashnorm_onnx.errors import VerificationFailed
from flashnorm_onnx.quantize import calibrate, search
from flashnorm_onnx.quantize.int4 import QuantSpec, clip_blocks, dequantize, quantize_weight
from flashnorm_onnx.quantize.scale_move import (
    find_attention_pairs,
    find_pairs,
    find_sites,
    move_attention_scale,
    move_pair_scale,
    move_scale,
)

RNG = np.random.default_rng(0)


def _word_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json over the bundled calibration text's words (ids < vocab_size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from flashnorm_onnx.quantize.calibration_text import TEXT

    words = sorted(set(re.findall(r"\w+|[^\w\s]", TEXT)))[: vocab_size - 1]
    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny Llama fixture (random weights, norms with g in [0.5, 1.5)) with a tokenizer beside it."""
    from models import fixtures

    folder = tmp_path_factory.mktemp("llama")
    shutil.copy(fixtures.build("llama_dynamo"), folder / "model.onnx")
    _word_tokenizer(folder / "tokenizer.json", 512)
    return folder / "model.onnx"


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    return _session(path).run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


# -- the float part: moving s is exact ------------------------------------------------------------


def test_moving_a_scale_keeps_the_function_in_onnxruntime(llama, tmp_path):
    """g -> g/s, W -> diag(s) W for every norm (s with both signs, spanning 1e-2..1e2): ONNX Runtime
    computes the input's logits, to float32 rounding."""
    model = ir.load(str(llama))
    sites, others = find_sites(model)
    assert len(sites) == 5 and not others  # 2 x (q, k, v), 2 x (gate, up), final norm -> lm_head
    pairs = find_pairs(model)
    assert len(pairs) == 2  # up -> down of each layer's MLP
    for site in sites:
        s = np.exp(RNG.uniform(np.log(1e-2), np.log(1e2), site.g.size)) * RNG.choice([-1.0, 1.0], site.g.size)
        move_scale(model, site, s)
    for pair in pairs:  # composed with the post-attention norm's move of up's rows
        k = pair.down.inputs[1].const_value.shape[0]
        move_pair_scale(pair, np.exp(RNG.uniform(np.log(1e-2), np.log(1e2), k)) * RNG.choice([-1.0, 1.0], k))
    attention, refused = find_attention_pairs(model)
    assert len(attention) == 2 and not refused  # v -> o of each layer
    for pair in attention:  # composed with the input norm's move of v's rows
        c = pair.channels
        s_v = np.exp(RNG.uniform(np.log(1e-2), np.log(1e2), c)) * RNG.choice([-1.0, 1.0], c)
        move_attention_scale(pair, s_v[pair.channel_of_row])
    out = tmp_path / "moved.onnx"
    ir.save(model, str(out))
    ids = RNG.integers(0, 512, (2, 24))
    ref, got = _logits(llama, ids), _logits(out, ids)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # and it really moved: every norm's scale and every reader's weight changed
    before, after = _initializers(llama), _initializers(out)
    changed = [n for n in before if n in after and not np.array_equal(before[n], after[n])]
    assert len(changed) == 5 + 11 + 2 + 2  # 5 scales; q, k, v, gate, up x 2 layers and lm_head; down, o x 2


def test_attention_pairs_map_each_o_row_to_its_kv_head(llama):
    """Grouped-query attention (4 query heads, 2 kv heads, head dim 16): row h * 16 + d of W_o
    multiplies v channel (h // 2) * 16 + d, as proved from the graph's shapes."""
    from models import fixtures

    pairs, _ = find_attention_pairs(ir.load(str(llama)))
    group, hd = fixtures.HEADS // fixtures.KV_HEADS, fixtures.HEAD_DIM
    expected = np.array([(h // group) * hd + d for h in range(fixtures.HEADS) for d in range(hd)])
    for pair in pairs:
        assert "v_proj" in pair.up.inputs[1].name or pair.channels == fixtures.KV_HEADS * hd
        np.testing.assert_array_equal(pair.channel_of_row, expected)
        tied = pair.tie(np.arange(expected.size, dtype=np.float64))
        assert np.array_equal(tied[:hd], tied[hd:2 * hd])  # heads 0 and 1 read kv head 0: one scale
        assert not np.array_equal(tied[:hd], tied[2 * hd:3 * hd])
        with pytest.raises(ValueError, match="one value per v channel"):
            pair.up_scale(np.arange(expected.size, dtype=np.float64) + 1)


def _attention_graph(merge_heads_first: bool = False, extra_reader: bool = False) -> ir.Model:
    """x [batch, seq, 16] -> v (16 channels: 2 kv heads of 8) -> heads -> repeated to 4 query heads
    -> P @ V -> concatenated -> o (32 -> 16). ``merge_heads_first``: the heads are concatenated without
    moving the sequence axis back (a Reshape across a symbolic axis: not provable). ``extra_reader``:
    v's output is also a graph output."""
    from onnx import TensorProto, helper

    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    inits = [numpy_helper.from_array(RNG.standard_normal((16, 16)).astype(np.float32), "Wv"),
             numpy_helper.from_array(RNG.standard_normal((32, 16)).astype(np.float32), "Wo"),
             c("split", [0, 0, 2, 8]), c("ax2", [2]), c("rep", [1, 2, 2, 1, 1]), c("merge", [0, 4, -1, 8]),
             c("cat", [0, 0, 32])]
    nodes = [helper.make_node("MatMul", ["x", "Wv"], ["v"], name="v_proj"),
             helper.make_node("Reshape", ["v", "split"], ["v4"]),
             helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
             helper.make_node("Unsqueeze", ["vt", "ax2"], ["vu"]),
             helper.make_node("Expand", ["vu", "rep"], ["ve"]),
             helper.make_node("Reshape", ["ve", "merge"], ["vr"]),
             helper.make_node("MatMul", ["p", "vr"], ["att"], name="attention"),
             helper.make_node("Transpose", ["att"], ["at"], perm=[0, 1, 2, 3] if merge_heads_first else [0, 2, 1, 3]),
             helper.make_node("Reshape", ["at", "cat"], ["a"]),
             helper.make_node("MatMul", ["a", "Wo"], ["y"], name="o_proj")]
    f = TensorProto.FLOAT
    shapes = {"v": ["b", "s", 16], "v4": ["b", "s", 2, 8], "vt": ["b", 2, "s", 8], "vu": ["b", 2, 1, "s", 8],
              "ve": ["b", 2, 2, "s", 8], "vr": ["b", 4, "s", 8], "att": ["b", 4, "s", 8],
              "at": ["b", 4, "s", 8] if merge_heads_first else ["b", "s", 4, 8], "a": ["b", "s", 32]}
    outputs = [helper.make_tensor_value_info("y", f, ["b", "s", 16])]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("v", f, ["b", "s", 16]))
    graph = helper.make_graph(nodes, "att", [helper.make_tensor_value_info("x", f, ["b", "s", 16]),
                                             helper.make_tensor_value_info("p", f, ["b", 4, "s", "s"])],
                              outputs, inits,
                              value_info=[helper.make_tensor_value_info(k, f, v) for k, v in shapes.items()
                                          if not (extra_reader and k == "v")])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9))


def test_attention_pair_on_a_hand_built_graph_is_exact(tmp_path):
    """The v -> o move on a minimal grouped-query attention: mapping h -> h // 2, and ORT computes the
    same output after the move; a wrong mapping (h -> h % 2) does not."""
    model = _attention_graph()
    (pair,), refused = find_attention_pairs(model)
    heads = [(h // 2) * 8 + d for h in range(4) for d in range(8)]  # 4 query heads on 2 kv heads of 8
    assert not refused and pair.channel_of_row.tolist() == heads
    path, bad = tmp_path / "ref.onnx", tmp_path / "bad.onnx"
    ir.save(model, str(path))
    x, p = RNG.standard_normal((2, 3, 16)).astype(np.float32), RNG.standard_normal((2, 4, 3, 3)).astype(np.float32)
    (ref,) = _session(path).run(None, {"x": x, "p": p})
    s_v = np.exp(RNG.uniform(np.log(0.1), np.log(10), 16)) * RNG.choice([-1.0, 1.0], 16)
    move_attention_scale(pair, s_v[pair.channel_of_row])
    ir.save(model, str(tmp_path / "moved.onnx"))
    (got,) = _session(tmp_path / "moved.onnx").run(None, {"x": x, "p": p})
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    wrong = _attention_graph()
    (pair,), _ = find_attention_pairs(wrong)
    pair.channel_of_row = np.array([(h % 2) * 8 + d for h in range(4) for d in range(8)])  # the mutation
    move_attention_scale(pair, s_v[pair.channel_of_row])
    ir.save(wrong, str(bad))
    assert not np.allclose(_session(bad).run(None, {"x": x, "p": p})[0], ref, rtol=1e-3, atol=1e-4)


def test_attention_pair_refused_where_not_provable():
    """Heads concatenated across the sequence axis, or v read elsewhere: no move, with the reason."""
    sites, refused = find_attention_pairs(_attention_graph(merge_heads_first=True))
    assert not sites and refused == [("v_proj", "no v -> o scale move: a Reshape that mixes channels with a "
                                                 "symbolic axis")]
    sites, refused = find_attention_pairs(_attention_graph(extra_reader=True))
    assert not sites  # v is a graph output too: never reaches the attention, so no refusal either


def test_wrong_v_to_o_mapping_fails_the_float_check(llama, tmp_path, monkeypatch):
    """A mutation: each o row scaled by the channel of the wrong kv head (h % kv_heads instead of
    h // group). The float check of the moved model in ONNX Runtime catches it: exit 5."""
    from flashnorm_onnx.quantize import activation_aware
    from models import fixtures

    def wrong(model):
        pairs, refused = find_attention_pairs(model)
        hd = fixtures.HEAD_DIM
        for pair in pairs:
            pair.channel_of_row = np.array([(h % fixtures.KV_HEADS) * hd + d for h in range(fixtures.HEADS)
                                            for d in range(hd)])
        return pairs, refused

    monkeypatch.setattr(activation_aware, "find_attention_pairs", wrong)
    with pytest.raises(VerificationFailed, match="scales moved"):
        flashnorm_onnx.optimize(llama, tmp_path / "bad.onnx", quantize=QuantSpec(), calibrate=True)
    assert list(tmp_path.iterdir()) == []


def test_v_scaled_but_o_not_fails_the_float_check(llama, tmp_path, monkeypatch):
    """A mutation: W_v's columns take 1/s but W_o's rows keep their values: exit 5."""
    from flashnorm_onnx.quantize import activation_aware, scale_move

    real = scale_move._scaled_lazy

    def half(weight, s, name, rows=True):
        return weight if rows and name in o_weights else real(weight, s, name, rows)

    o_weights = {p.down.inputs[1].name for p in find_attention_pairs(ir.load(str(llama)))[0]}
    monkeypatch.setattr(scale_move, "_scaled_lazy", half)
    monkeypatch.setattr(activation_aware, "find_pairs", lambda model: [])
    with pytest.raises(VerificationFailed, match="scales moved"):
        flashnorm_onnx.optimize(llama, tmp_path / "bad.onnx", quantize=QuantSpec(), calibrate=True)
    assert list(tmp_path.iterdir()) == []


def test_scale_move_keeps_a_weight_read_elsewhere(tmp_path):
    """A weight a site's reader shares with a MatMul outside the site is not written: the site gets
    a copy, the other reader keeps the original."""
    from onnx import TensorProto, helper

    k, n = 32, 16
    g = (RNG.random(k) + 0.5).astype(np.float32)
    w = RNG.standard_normal((k, n)).astype(np.float32)
    nodes = [helper.make_node("RMSNormalization", ["x", "g"], ["h"], axis=-1, epsilon=1e-6),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="mm"),
             helper.make_node("MatMul", ["x2", "W"], ["z"], name="other")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k]),
                                           helper.make_tensor_value_info("x2", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, n])],
                              [numpy_helper.from_array(g, "g"), numpy_helper.from_array(w, "W")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10))
    (site,), _ = find_sites(model)
    renamed = move_scale(model, site, np.linspace(0.5, 2.0, k))
    assert renamed == {"W": "W.scaled"}
    path = tmp_path / "m.onnx"
    ir.save(model, str(path))
    x, x2 = RNG.standard_normal((3, k)).astype(np.float32), RNG.standard_normal((3, k)).astype(np.float32)
    y, z = _session(path).run(None, {"x": x, "x2": x2})
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * g
    np.testing.assert_allclose(y, h @ w, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(z, x2 @ w)
    assert np.array_equal(_initializers(path)["W"], w)


# -- the search ------------------------------------------------------------------------------------


def test_clipping_is_ort_rounding_of_the_clipped_weight():
    k, n = 96, 8
    w = RNG.standard_normal((k, n)).astype(np.float32)
    for symmetric in (True, False):
        spec = QuantSpec(block_size=32, symmetric=symmetric)
        np.testing.assert_array_equal(clip_blocks(w, 1.0, 32, symmetric), w)
        clipped = clip_blocks(w, 0.8, 32, symmetric)
        assert (clipped != w).any() and np.abs(clipped).max() < np.abs(w).max()
        packed, scales, zp = quantize_weight(clipped, spec)
        back = dequantize(packed, scales, None if symmetric else zp, k, n, 32)
        step = np.repeat(np.abs(scales.T), 32, axis=0)
        # round-to-nearest of the clipped weight: half a step inside the range, one where a code saturates
        # (ORT's symmetric range is [-8, 7] steps)
        assert np.all(np.abs(back - clipped) <= step * 1.001)
        assert np.mean(np.abs(back - clipped) <= 0.5 * step * 1.001) > 0.9
        ratios, chosen = search.choose_clips(w, np.ones(k), spec, clips=(1.0,))
        assert np.all(ratios == 1) and np.array_equal(chosen, search.rtn_dequantized(w, spec))


def test_block_moments_over_every_token_equal_those_of_the_rows():
    """E[x_b x_b^T] per block: from the full second moment (every token) and from the kept rows
    agree when every row is kept; a partial last block is zero-padded."""
    x = RNG.standard_normal((3, 50, 40)).astype(np.float32)
    full, rows_only = calibrate.ActivationStats("a"), calibrate.ActivationStats("b")
    for part in x:
        full.add(part, keep_rows=1000)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(calibrate, "MAX_COV_CHANNELS", 8)  # too wide for the full matrix: from the rows
    for part in x:
        rows_only.add(part, keep_rows=1000)
    monkey.undo()
    assert full.gram is not None and rows_only.gram is None
    a, b = full.block_moments(16), rows_only.block_moments(16)
    assert a.shape == (3, 16, 16)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    flat = x.reshape(-1, 40).astype(np.float64)
    np.testing.assert_allclose(a[1], flat[:, 16:32].T @ flat[:, 16:32] / 150, rtol=1e-6)
    assert np.all(a[2, 8:, :] == 0) and np.all(a[2, :, 8:] == 0)


def test_clip_by_block_covariance_minimises_each_blocks_output_error():
    """With the block second moments, each block's chosen ratio is the one whose rounding error d
    gives the smallest output error ||R_b d||^2 on rows with correlated channels, recomputed here."""
    k, n, t = 64, 12, 400
    mix = RNG.standard_normal((k, k)) * 0.4 + np.eye(k)
    rows = (RNG.standard_normal((t, k)) @ mix).astype(np.float64)
    w = RNG.standard_normal((k, n)).astype(np.float32)
    spec = QuantSpec(block_size=32)
    moments = calibrate.diagonal_blocks(rows.T @ rows / t, 32)
    ratios, back = search.choose_clips(w, np.ones(k), spec, moments=moments)
    errors = []
    for c in search.CLIPS:
        d = (w - search.rtn_dequantized(w, spec, None if c == 1.0 else c)).astype(np.float64)
        errors.append([[np.sum((rows[:, b * 32:(b + 1) * 32] @ d[b * 32:(b + 1) * 32, j]) ** 2) / t
                        for j in range(n)] for b in range(2)])
    errors = np.array(errors)  # [clips, blocks, N]
    np.testing.assert_array_equal(ratios, np.asarray(search.CLIPS, np.float32)[np.argmin(errors, axis=0)])
    assert (ratios < 1).any()
    chosen = np.take_along_axis(errors, np.argmin(errors, axis=0)[None], 0)[0]
    assert np.all(chosen <= errors[0] + 1e-9)  # never worse than unclipped, block by block
    # diagonal moments reproduce the E[x^2]-weighted choice
    diag = calibrate.diagonal_blocks(np.diag(np.mean(rows ** 2, axis=0)), 32)
    r1, _ = search.choose_clips(w, np.mean(rows ** 2, axis=0), spec)
    r2, _ = search.choose_clips(w, np.ones(k), spec, moments=diag)
    np.testing.assert_array_equal(r1, r2)


def test_choose_scale_never_loses_to_quantize_first_or_fold_first():
    """On synthetic activations with outlier channels, the chosen placement's objective is at most
    that of s = 1 and of s = g, which are recomputed here independently."""
    k, n, t = 64, 48, 300
    g = RNG.uniform(0.2, 3.0, k)
    x_hat = RNG.standard_normal((t, k)) * np.where(RNG.random(k) < 0.1, 8.0, 1.0)
    rows = (x_hat * g).astype(np.float32)
    ws = [RNG.standard_normal((k, n)).astype(np.float32) for _ in range(2)]
    for spec in (QuantSpec(block_size=32), QuantSpec(block_size=16, symmetric=False)):
        choice = search.choose_scale("n", ws, g, np.abs(rows).mean(0), (rows.astype(np.float64) ** 2).mean(0),
                                     rows, spec)

        def objective(s):
            err = 0.0
            for w in ws:
                q = dequantize(*_quantized(search.scaled(w, s), spec), k, n, spec.block_size)
                err += float(np.sum((rows.astype(np.float64) @ (w - q / s[:, None])) ** 2))
            return err / t

        rtn, fold = objective(np.ones(k)), objective(g)
        assert choice.rtn == pytest.approx(rtn, rel=1e-4) and choice.fold == pytest.approx(fold, rel=1e-4)
        assert choice.chosen.objective <= min(rtn, fold) * (1 + 1e-6)
        assert choice.chosen.objective < 0.9 * min(rtn, fold)  # outliers: the search finds better


def _quantized(w, spec):
    packed, scales, zp = quantize_weight(w, spec)
    return packed, scales, None if spec.symmetric else zp


# -- the pipeline ----------------------------------------------------------------------------------


def _norm_scales(path: Path) -> dict[str, np.ndarray]:
    t = _initializers(path)
    return {name: a for name, a in t.items() if name.endswith("layernorm.weight") or name == "model.norm.weight"}


@pytest.fixture(scope="module")
def calibrated(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "q.onnx"
    report = flashnorm_onnx.optimize(llama, out, quantize=QuantSpec(), calibrate=True)
    return out, report


@pytest.fixture(scope="module")
def calibrated_norms_only(llama, tmp_path_factory):
    """The same without the up -> down and v -> o moves, so that each norm reader's int4 weight is
    diag(s) W rounded (the up and v weights' columns are not scaled too)."""
    from flashnorm_onnx.quantize import activation_aware

    mp = pytest.MonkeyPatch()
    mp.setattr(activation_aware, "find_pairs", lambda model: [])
    mp.setattr(activation_aware, "V_TO_O", False)
    try:
        out = tmp_path_factory.mktemp("cal_norms") / "q.onnx"
        report = flashnorm_onnx.optimize(llama, out, quantize=QuantSpec(), calibrate=True)
    finally:
        mp.undo()
    return out, report


def test_calibrated_int4_model_runs_and_reports(llama, calibrated):
    out, report = calibrated
    q = report.quantization
    assert q["order"] == "activation-aware" and q["quantized"] == 15
    model = onnx.load(str(out))
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 15
    assert report.quant_verification.passed and min(o["cosine"] for o in report.quant_verification.outputs) > 0.97
    cal = q["calibration"]
    assert cal["tokens"] > 500 and cal["text"] == "the bundled calibration text"
    assert len(cal["norms"]) == 5 and all(n["alpha"].startswith(("alpha=", "fold")) for n in cal["norms"])
    assert cal["float_check"].startswith("passed")
    assert 0 < cal["clips"]["clipped"] < cal["clips"]["blocks"]  # o_proj/down_proj included: 15 weights
    text = report.text()
    assert "activation-aware" in text and "scales chosen:" in text and "kept g/s" in text
    assert 0.4 < q["max_step_ratio"] <= 1.001
    assert len(cal["pairs"]) == 4 and "between linears" in text  # up -> down, v -> o of 2 layers
    moved = next(line for line in text.splitlines() if "between linears" in line)
    assert "up -> down: " in moved and "v -> o: " in moved, moved  # each kind named with its choices
    pt = cal["pair_objective_totals"]
    assert pt["chosen"] <= pt["rtn"]
    # the norms keep g/s: not g, not ones
    g_in, g_out = _norm_scales(llama), _norm_scales(out)
    assert sorted(g_in) == sorted(g_out)
    assert any(not np.allclose(g_in[k], g_out[k]) for k in g_in)


def test_calibrated_objective_is_at_most_quantize_first_and_fold_first(llama, calibrated_norms_only):
    """Recomputed from the written int4 model: its readers' output error on the calibration rows
    (s recovered as g_in / g_out, the int4 weights dequantized) is at most that of RTN on the
    unmoved weights (quantize-first) and on diag(g) W (fold-first)."""
    out, report = calibrated_norms_only
    model = ir.load(str(llama))
    sites, _ = find_sites(model)
    tok = calibrate.find_tokenizer(llama)
    ids = calibrate.tokenize(calibrate.read_text(None)[0], tok, 512)
    feeds = [{"input_ids": w[None, :], "attention_mask": np.ones((1, w.size), np.int64)}
             for w in calibrate.windows(ids, 512)]
    stats = calibrate.collect(llama, feeds, {s.output.name: 1 for s in sites}, rows={s.output.name for s in sites},
                              max_rows=10 ** 6)  # every token, as the search's E[x x^T]
    t_in, t_out = _initializers(llama), _initializers(out)
    q_nodes = {n.name.removesuffix("_Q4"): n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"}
    spec = QuantSpec()
    totals = {"chosen": 0.0, "rtn": 0.0, "fold": 0.0}
    for site in sites:
        rows = stats.stats[site.output.name].row_matrix().astype(np.float64)
        g_in = t_in[site.match.scale_source.name]
        s = g_in.astype(np.float64) / t_out[site.match.scale_source.name]
        for node in site.readers:
            w = t_in[node.inputs[1].name].astype(np.float64)
            qn = q_nodes[node.name]
            attrs = {a.name: a.i for a in qn.attribute}
            deq = dequantize(t_out[qn.input[1]], t_out[qn.input[2]], None, attrs["K"], attrs["N"], 32)
            rtn = dequantize(*_quantized(w.astype(np.float32), spec), *w.shape, 32)
            fold = dequantize(*_quantized(search.scaled(w.astype(np.float32), g_in), spec), *w.shape, 32)
            for key, eff in (("chosen", deq / s[:, None]), ("rtn", rtn), ("fold", fold / g_in[:, None])):
                totals[key] += float(np.sum((rows @ (w - eff)) ** 2)) / rows.shape[0]
    assert totals["chosen"] <= totals["rtn"] * (1 + 1e-4) and totals["chosen"] <= totals["fold"] * (1 + 1e-4)
    reported = report.quantization["calibration"]["objective_totals"]
    assert reported["chosen"] == pytest.approx(totals["chosen"], rel=1e-3)
    assert reported["quantize_first"] == pytest.approx(totals["rtn"], rel=1e-3)
    assert reported["fold_first"] == pytest.approx(totals["fold"], rel=1e-3)


def test_scale_on_the_weight_but_not_divided_in_the_norm_fails(llama, tmp_path, monkeypatch):
    """A mutation: the weights get diag(s) W but the norm keeps g. The float check of the moved
    model in ONNX Runtime catches it: exit 5, nothing written."""
    from flashnorm_onnx.quantize import scale_move

    monkeypatch.setattr(scale_move, "_divided", lambda source, s, name: ir.Tensor(
        np.asarray(source.const_value.numpy()), name=name))
    with pytest.raises(VerificationFailed, match="scales moved"):
        flashnorm_onnx.optimize(llama, tmp_path / "bad.onnx", quantize=QuantSpec(), calibrate=True)
    assert list(tmp_path.iterdir()) == []


def test_clipped_codes_that_do_not_quantize_the_weight_fail(llama, tmp_path, monkeypatch):
    """A mutation: the clipped weight's codes written with the nibbles swapped: the per-weight
    check (against the weight clipped to its chosen ranges) fails the run."""
    from tests.helpers import swap_int4_nibbles

    swap_int4_nibbles(monkeypatch)
    with pytest.raises(VerificationFailed, match="quantization steps"):
        flashnorm_onnx.optimize(llama, tmp_path / "bad.onnx", quantize=QuantSpec(), calibrate=True)
    assert list(tmp_path.iterdir()) == []


def test_asymmetric_calibrated_with_a_text_file(llama, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The harbour town woke slowly . The tide would turn at half past seven . " * 20)
    report = flashnorm_onnx.optimize(llama, tmp_path / "out" / "q.onnx", quantize=QuantSpec(block_size=16,
                                     symmetric=False), calibrate=str(text))
    cal = report.quantization["calibration"]
    assert cal["text"] == str(text) and cal["tokens"] > 100
    assert report.quant_verification.passed
    totals = cal["objective_totals"]
    assert totals["chosen"] <= min(totals["quantize_first"], totals["fold_first"])


# -- errors ----------------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flashnorm_onnx", "optimize", *map(str, args)],
                          capture_output=True, text=True)


def test_calibrate_errors_are_one_line(llama, tmp_path):
    from models import fixtures

    bare = fixtures.build("llama_dynamo")  # no tokenizer beside it
    out = tmp_path / "o.onnx"
    for args, code, needle in (
            ((llama, "-o", out, "--quantize", "int4", "--calibrate", tmp_path / "missing.txt"), 2,
             "calibration text"),
            ((llama, "-o", out, "--calibrate"), 2, "only apply with --quantize"),
            ((llama, "-o", out, "--quantize", "int4", "--calibrate", "--quantize-order", "fold-first"), 2,
             "--quantize-order"),
            ((llama, "-o", out, "--quantize", "int4", "--tokenizer", llama.parent / "tokenizer.json"), 2,
             "--tokenizer only applies with --calibrate"),
            ((bare, "-o", out, "--quantize", "int4", "--calibrate"), 2, "tokenizer.json")):
        r = _cli(*args)
        assert r.returncode == code, (args, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_calibrate_cli_writes_int4(llama, tmp_path):
    out = tmp_path / "q.onnx"
    r = _cli(llama, "-o", out, "--quantize", "int4", "--block-size", "16", "--calibrate")
    assert r.returncode == 0, r.stderr
    assert "activation-aware (--calibrate on the bundled calibration text" in r.stdout
    assert "verification (onnxruntime-quantized): PASSED" in r.stdout
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(out)).graph.node) == 15
