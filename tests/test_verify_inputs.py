"""Generated verification inputs for image models: channels and size from the model's configs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flashnorm_onnx.verify.inputs import Case, InputSpec, dims_from_configs, make_feeds


def _vit_like(path, channels=3, patch=4):
    """pixel_values[batch_size, num_channels, height, width] -> Conv(patch) -> LayerNorm -> MatMul."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, channels, patch, patch)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["pixel_values", "w"], ["c"], strides=[patch, patch]),
             helper.make_node("Reshape", ["c", "flat"], ["f"]),
             helper.make_node("Transpose", ["f"], ["t"], perm=[0, 2, 1]),
             helper.make_node("LayerNormalization", ["t", "g", "b"], ["y"], axis=-1),
             helper.make_node("MatMul", ["y", "m"], ["out"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0, 8, -1], np.int64), "flat"), numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "m")]
    graph = helper.make_graph(nodes, "vit", [helper.make_tensor_value_info(
        "pixel_values", TensorProto.FLOAT, ["batch_size", "num_channels", "height", "width"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    return path


SPEC = [InputSpec("pixel_values", np.dtype(np.float32), ["batch_size", "num_channels", "height", "width"])]


@pytest.mark.parametrize("config, preprocessor, expected", [
    ({"num_channels": 1, "image_size": 32}, None, (2, 1, 32, 32)),
    ({"hidden_size": 8, "num_attention_heads": 2}, {"crop_size": {"height": 20, "width": 24}}, (2, 3, 20, 24)),
    ({"vision_config": {"num_channels": 3, "image_size": 28}}, None, (2, 3, 28, 28)),
    (None, None, (2, 3, 224, 224)),  # no config: RGB at the ImageNet size, not 8 channels
])
def test_image_inputs_take_channels_and_size_from_configs(tmp_path, config, preprocessor, expected):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    if preprocessor is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    feeds = make_feeds(SPEC, Case("run1", batch=2, sequence=8), dims=dims_from_configs(model))
    assert feeds["pixel_values"].shape == expected


def test_optimum_style_vit_verifies_with_its_config(tmp_path):
    from flashnorm_onnx.cli import main

    model = _vit_like(tmp_path / "model.onnx", channels=3)
    (tmp_path / "config.json").write_text(json.dumps({"num_channels": 3, "image_size": 16}))
    assert main(["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "-q"]) == 0
    (tmp_path / "gray").mkdir()
    gray = _vit_like(tmp_path / "gray" / "model.onnx", channels=1)
    (tmp_path / "gray" / "config.json").write_text(json.dumps({"num_channels": 1, "image_size": 12}))
    assert main(["optimize", str(gray), "-o", str(tmp_path / "gray_out.onnx"), "-q"]) == 0


# -- padded masks, merged decoders' branch flags, cross-attending decoders -----------------------------

from flashnorm_onnx.verify.case_text import describe_rows  # noqa: E402
from flashnorm_onnx.verify.inputs import (  # noqa: E402
    default_cases, hf_position_ids, input_shapes, is_branch_flag, is_padding_mask, mask_rows)


def _spec(name, dtype, shape):
    return InputSpec(name, np.dtype(dtype), shape)


DECODER = [_spec("input_ids", np.int64, ["batch_size", "sequence_length"]),
           _spec("attention_mask", np.int64, ["batch_size", "past_sequence_length + sequence_length"]),
           _spec("position_ids", np.int64, ["batch_size", "sequence_length"]),
           _spec("past_key_values.0.key", np.float32, ["batch_size", 2, "past_sequence_length", 4])]


def test_padded_cases_only_for_models_with_an_attention_mask():
    names = [(c.name, c.batch, c.sequence, c.past, c.rows) for c in default_cases(DECODER)]
    assert names == [("prefill", 1, 8, 0, ()), ("decode", 1, 1, 5, ()),
                     ("padded", 3, 7, 0, ("left", "right", "one")), ("padded-decode", 2, 1, 6, ("left", "full"))]
    no_past = [s for s in DECODER if "past" not in s.name]
    assert [c.name for c in default_cases(no_past)] == ["run1", "run2", "padded"]
    assert [c.name for c in default_cases(no_past[:1])] == ["run1", "run2"]  # no mask: nothing to pad


@pytest.mark.parametrize("spec, padded", [
    (_spec("attention_mask", np.int64, ["batch", "sequence"]), True),
    (_spec("attention_mask", np.int32, ["batch_size", "total_sequence_length"]), True),
    (_spec("key_padding_mask", np.bool_, ["batch", "sequence"]), True),
    (_spec("attention_mask", np.int64, ["batch", 1, "sequence", "sequence"]), True),
    (_spec("encoder_attention_mask", np.int64, ["batch_size", "encoder_sequence_length"]), False),
    (_spec("attention_mask", np.float32, ["batch", "sequence"]), False),  # an additive bias: not a 0/1 mask
    (_spec("attention_mask", np.int64, ["batch", 128]), False),  # a fixed length: not the tokens'
    (_spec("attention_mask", np.int64, ["sequence"]), False),
])
def test_which_masks_are_padded(spec, padded):
    assert is_padding_mask(spec) is padded


def test_mask_rows_and_positions_as_generate_makes_them():
    mask = mask_rows(("left", "right", "one"), 3, 7)
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1]]
    # transformers' generate: position_ids = mask.cumsum(-1) - 1; position_ids.masked_fill_(mask == 0, 1)
    assert hf_position_ids(mask).tolist() == [[1, 1, 1, 0, 1, 2, 3], [0, 1, 2, 3, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]]
    assert describe_rows(mask) == "left-padded by 3, right-padded by 3, 1 real token"
    assert mask_rows(("left", "right", "one"), 1, 7).tolist() == [[0, 0, 0, 1, 1, 1, 1]]  # batch 1: its first row
    assert mask_rows(("left", "right"), 2, 1).tolist() == [[1], [1]]  # one position: the newest, kept
    assert mask_rows(("left",), 2, 7)[1].all()  # rows past the last given: unpadded
    with pytest.raises(ValueError, match="unknown padded row kind"):
        mask_rows(("middle",), 1, 4)


def test_padded_decode_feeds():
    feeds = make_feeds(DECODER, Case("padded-decode", batch=2, sequence=1, past=6, rows=("left", "full")))
    assert feeds["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1], [1] * 7]
    assert feeds["position_ids"].tolist() == [[3], [6]]  # the new token's position counts real tokens only
    assert feeds["past_key_values.0.key"].shape == (2, 2, 6, 4)
    plain = make_feeds(DECODER, Case("decode", batch=2, sequence=1, past=6))
    assert plain["attention_mask"].all() and plain["position_ids"].tolist() == [[6], [6]]
    # the same random draws as the unpadded case: only masks and positions differ
    assert np.array_equal(plain["input_ids"], feeds["input_ids"])
    assert np.array_equal(plain["past_key_values.0.key"], feeds["past_key_values.0.key"])


def test_padded_masks_of_other_types_and_ranks():
    specs = [_spec("input_ids", np.int64, ["batch", "sequence"]),
             _spec("key_padding_mask", np.bool_, ["batch", "sequence"]),
             _spec("attention_mask", np.int64, ["batch", 1, "sequence", "sequence"]),
             _spec("seqlens_k", np.int32, ["batch"]),
             _spec("position_ids", np.int64, [3, "batch", "sequence"])]  # multi-section rotary
    feeds = make_feeds(specs, Case("padded", batch=2, sequence=5, rows=("left", "right")))
    rows = [[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert feeds["key_padding_mask"].dtype == np.bool_ and feeds["key_padding_mask"].astype(int).tolist() == rows
    assert feeds["attention_mask"].shape == (2, 1, 5, 5) and (feeds["attention_mask"][:, 0, 3] == rows).all()
    assert feeds["seqlens_k"].tolist() == [2, 2]  # as onnxruntime-genai computes it: ReduceSum(mask) - 1
    assert feeds["position_ids"].shape == (3, 2, 5) and feeds["position_ids"][2].tolist() == [[1, 1, 0, 1, 2],
                                                                                             [0, 1, 2, 1, 1]]


MERGED_T5 = [_spec("encoder_attention_mask", np.int64, ["batch_size", "encoder_sequence_length"]),
             _spec("input_ids", np.int64, ["batch_size", "decoder_sequence_length"]),
             _spec("encoder_hidden_states", np.float32, ["batch_size", "encoder_sequence_length", 32]),
             _spec("past_key_values.0.decoder.key", np.float32, ["batch_size", 4, "past_decoder_sequence_length", 8]),
             _spec("past_key_values.0.encoder.key", np.float32, ["batch_size", 4, "encoder_sequence_length", 8]),
             _spec("use_cache_branch", np.bool_, [1])]


def test_merged_decoder_cases_take_both_branches_with_coherent_encoder_sizes():
    """optimum's merged seq2seq decoder: the first step feeds use_cache_branch False and every past
    input empty (optimum.onnxruntime.modeling_seq2seq: zeros of [batch, heads, 0, head_dim]); a
    step with a past feeds True, with the encoder's keys, mask and states of one length."""
    assert is_branch_flag(MERGED_T5[-1]) and not is_padding_mask(MERGED_T5[0])
    prefill, decode = default_cases(MERGED_T5)
    feeds = make_feeds(MERGED_T5, prefill)
    assert feeds["use_cache_branch"].tolist() == [False]
    assert feeds["past_key_values.0.decoder.key"].shape == (1, 4, 0, 8)
    assert feeds["past_key_values.0.encoder.key"].shape == (1, 4, 0, 8)
    assert feeds["encoder_hidden_states"].shape == (1, 8, 32) and feeds["encoder_attention_mask"].shape == (1, 8)
    shapes = input_shapes(MERGED_T5, decode)
    assert make_feeds(MERGED_T5, decode)["use_cache_branch"].tolist() == [True]
    assert shapes["past_key_values.0.decoder.key"] == [1, 4, 5, 8] and shapes["input_ids"] == [1, 1]
    assert shapes["past_key_values.0.encoder.key"][2] == shapes["encoder_attention_mask"][1] \
        == shapes["encoder_hidden_states"][1] == 8


@pytest.mark.parametrize("spec, flag", [
    (_spec("use_cache_branch", np.bool_, [1]), True),
    (_spec("use_cache", np.bool_, []), True),
    (_spec("with_past", np.bool_, [1]), True),
    (_spec("use_cache_branch", np.int64, [1]), False),  # not bool
    (_spec("use_cache_branch", np.bool_, ["batch"]), False),  # not one element
    (_spec("is_training", np.bool_, [1]), False),  # another flag: fed True as before
])
def test_which_bool_inputs_are_branch_flags(spec, flag):
    assert is_branch_flag(spec) is flag
    feeds = [make_feeds([spec], Case("c", past=p))[spec.name] for p in (0, 3)]
    if flag:
        assert [f.all() for f in feeds] == [False, True]
    elif spec.dtype == np.bool_:
        assert all(f.all() for f in feeds)
