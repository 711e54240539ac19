"""models/gemma3.py on a tiny synthetic Gemma 3 GGUF (never the real 270M model).

The GGUF is written the way llama.cpp's converter writes a Gemma 3 checkpoint, independently of the
recipe's own name table: names from gguf's tensor-name map, every norm weight stored as 1 + w,
user-defined pieces with spaces and added tokens scored -1000, one projection quantized to Q8_0.
The recipe's folder must give back the source model (weights, config, logits), agree with
transformers' own GGUF loader tensor for tensor, and tokenize as SentencePiece does.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from models import gemma3  # noqa: E402

LAYERS = 6  # one full llama.cpp pattern: five sliding layers, then a global one
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"]
USER = ["\n", "  ", "   "]  # llama.cpp writes the user-defined "▁▁" as "  "
BYTES = [f"<0x{i:02X}>" for i in range(256)]
WORDS = ["▁", "t", "h", "e", "a", "n", "d", "c", "o", "s", "i", "x", "b",
         "▁t", "he", "▁the", "an", "▁an", "▁and", "▁c", "at", "▁cat", "▁s", "at", "▁sat", "is", "▁is",
         "▁a", "▁b", "ox", "▁box", "in", "▁in", "▁x"]


def _vocab():
    tokens, scores, types = [], [], []
    for t in SPECIAL:
        tokens.append(t), scores.append(-1000.0), types.append(3)  # control, llama.cpp's -1000
    for t in USER:
        tokens.append(t), scores.append(-1000.0), types.append(4)
    for t in BYTES:
        tokens.append(t), scores.append(0.0), types.append(6)
    seen = set()
    for rank, t in enumerate(WORDS):
        if t in seen:
            continue
        seen.add(t)
        tokens.append(t), scores.append(-float(rank)), types.append(1)
    return tokens, scores, types


def _source_model(vocab: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
        sliding_window=4, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=32,
        rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma's norms start at 0 (scale 1 + w): make them matter
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def _write_gguf(path, model, tokens, scores, types):
    """As llama.cpp's convert_hf_to_gguf.py writes Gemma 3."""
    from gguf.quants import quantize

    c = model.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_sliding_window(c.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, c.num_hidden_layers)
    expected = {}
    for hf, p in model.state_dict().items():
        if hf == "lm_head.weight":  # tied: llama.cpp writes no output.weight
            continue
        base, suffix = hf.rsplit(".", 1)
        name = names.get_name(base) + "." + suffix
        data = p.detach().numpy().astype(np.float32)
        if name.endswith("norm.weight"):
            data = data + np.float32(1.0)
        if name == "blk.1.ffn_gate.weight":  # [96, 64]: rows of 64 = two Q8_0 blocks
            q = quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[hf] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data)
            expected[hf] = p.detach().numpy()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    tokens, scores, types = _vocab()
    model = _source_model(len(tokens))
    path = root / "tiny.gguf"
    expected = _write_gguf(path, model, tokens, scores, types)
    folder = root / "hf"
    folder.mkdir()
    times = gemma3.write_hf_folder(path, folder)
    return dict(model=model, path=path, folder=folder, expected=expected, times=times)


def test_names_match_transformers_gguf_map(tiny):
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    reference = get_gguf_hf_weights_map(tiny["model"])  # GGUF name (with suffix) -> HF name
    reader = gemma3.gguf_reader(tiny["path"])
    mine = {t.name: gemma3.hf_name(t.name) for t in reader.tensors}
    assert mine == {k: v for k, v in reference.items() if k in mine}
    assert len(mine) == len(tiny["model"].state_dict()) - 1  # all but the tied head
    with pytest.raises(KeyError):
        gemma3.hf_name("blk.0.attn_qkv.weight")


def test_folder_gives_back_the_source_model(tiny):
    from safetensors.numpy import load_file
    from transformers import Gemma3ForCausalLM

    saved = load_file(str(tiny["folder"] / "model.safetensors"))
    assert set(saved) == set(tiny["expected"])
    for name, want in tiny["expected"].items():
        # norms went through 1 + w and back in fp32: within rounding; the rest bit-exact
        atol = 1e-6 if name.endswith("norm.weight") else 0.0
        np.testing.assert_allclose(saved[name], want.reshape(saved[name].shape), rtol=0, atol=atol, err_msg=name)

    src = tiny["model"]
    loaded = Gemma3ForCausalLM.from_pretrained(str(tiny["folder"]), dtype=torch.float32).eval()
    for key in ("layer_types", "sliding_window", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
                "head_dim", "num_key_value_heads", "tie_word_embeddings", "vocab_size", "hidden_activation",
                "rms_norm_eps", "final_logit_softcapping", "attn_logit_softcapping", "rope_scaling"):
        want_value, got_value = getattr(src.config, key), getattr(loaded.config, key)
        if isinstance(want_value, float):  # GGUF stores floats as float32
            assert got_value == pytest.approx(want_value, rel=1e-6), key
        else:
            assert got_value == want_value, key
    assert loaded.config.layer_types.count("full_attention") == 1 and loaded.config.layer_types[5] == "full_attention"
    with torch.no_grad():  # sequence of 12 > sliding window 4: local and global layers both matter
        ids = torch.randint(0, src.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        want, got = src(input_ids=ids).logits, loaded(input_ids=ids).logits
        # the Q8_0 projection is the only real difference: compare with it put into the source too
        src_q = copy.deepcopy(src)
        gate = tiny["expected"]["model.layers.1.mlp.gate_proj.weight"]
        src_q.model.layers[1].mlp.gate_proj.weight.copy_(torch.from_numpy(gate))
        exact = src_q(input_ids=ids).logits
    assert torch.allclose(got, exact, atol=1e-4, rtol=0), float((got - exact).abs().max())
    assert float((want - got).abs().max()) < 0.05 * float(want.abs().max())  # Q8_0 error only


def test_matches_transformers_gguf_loader(tiny):
    """Bit for bit the tensors transformers' own GGUF loader makes (its Gemma2TensorProcessor: w - 1)."""
    from safetensors.numpy import load_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    reference = load_gguf_checkpoint(str(tiny["path"]), return_tensors=True, model_to_load=tiny["model"])["tensors"]
    saved = load_file(str(tiny["folder"] / "model.safetensors"))
    assert set(reference) == set(saved)
    for name, tensor in reference.items():
        assert np.array_equal(tensor.numpy(), saved[name]), name


def test_tokenizer_is_sentencepiece_bpe(tiny):
    from transformers import AutoTokenizer

    folder = tiny["folder"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert sp.id_to_piece(6) == "\u2581\u2581"  # user-defined "  " given back as SentencePiece's piece
    for text in ["the cat sat in the box", "the  cat\n\nsat   in a box", "an ax, and the ox", "été 😀 the x",
                 "  the", "the cat\tsat"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # BPE, not a Unigram over BPE scores: " the" is one piece, and "<bos>" comes first
    ids = tok("the cat")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "t", "he", "▁cat"]
    # "▁▁" as SentencePiece matches it (scored 0 in tokenizer.model, not llama.cpp's -1000, which would
    # merge "▁" + "c" first)
    pieces = tok.convert_ids_to_tokens(tok("the  cat", add_special_tokens=False)["input_ids"])
    assert pieces == ["t", "he", "▁▁", "c", "at"]
    assert json.loads((folder / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert set(tiny["times"]) == {"read_gguf", "dequantize", "save", "tokenizer"}
