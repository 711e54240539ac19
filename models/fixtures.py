"""Build the tiny ONNX test models ("fixtures") in every export form the fold pass must handle.

Every fixture is built from a transformers config with random weights (seeded, so builds are
deterministic), then exported by one exporter with one set of options. After init, EVERY norm
weight (RMSNorm incl. Qwen3 q_norm/k_norm and the final norm; LayerNorm weight and bias) is set
to random values (weights uniform [0.5, 1.5], biases normal * 0.1), so a wrong fold changes the
output visibly and exporters cannot deduplicate the (otherwise all-ones) scales.

Usage::

    python -m models.fixtures list
    python -m models.fixtures build llama_dynamo qwen3_ort_opt
    python -m models.fixtures build --all
    python -m models.fixtures table          # fold each fixture: the README's table of fold counts
    python -m models.fixtures genai-env      # create <repo>/.venv-genai (genai builder recipes)

``build`` exits 1 if a build failed, 3 if a fixture is unavailable here (the genai recipes
without .venv-genai; ``--skip-unavailable`` makes that exit 0).

From Python::

    from models.fixtures import build
    path = build("llama_dynamo")            # <root>/llama_dynamo/model.onnx

Layout: ``<root>/<name>/model.onnx`` plus ``fixture.json`` (what the model is and which norm
forms were observed in it) and ``.recipe-hash`` (the cache stamp). Exporters that write folders
(optimum, the genai builder) keep their other files (config.json, genai_config.json,
model.onnx.data ...) next to model.onnx. ``<root>`` defaults to ``<repo>/build/fixtures`` and is
overridden by the environment variable ``FLASHNORM_FIXTURES``; the genai venv by
``FLASHNORM_GENAI_VENV``. HF model folders needed by the
optimum and genai recipes are saved under ``<root>/_hf/<family>_<variant>/`` and reused.

Caching: a fixture is rebuilt only when its stamp (a hash of the recipe's parameters,
RECIPE_VERSION, the versions of the libraries that produce it, and of any fixture it is built
from) changes. Builds go to a temporary folder beside the target and are renamed into place, so
an interrupted build never leaves a half-written fixture behind. Each fixture (and each ``_hf``
folder) is built under a file lock (in the system's temporary folder, named after ``<root>`` and the
fixture), so that concurrent processes (``pytest -n 2`` workers) build it once: the second one
waits, then finds it fresh.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Bump when a change to this file should invalidate every cached fixture.
RECIPE_VERSION = 1
#: Bump when describe()/find_norms() change: cached fixtures get a new fixture.json, no rebuild.
#: 2: find_norms() asks the fold pass's catalogue (norm_patterns) instead of its own matcher.
ANALYZER_VERSION = 2

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO_ROOT / "build" / "fixtures"
#: The onnxruntime-genai venv (override: FLASHNORM_GENAI_VENV).
GENAI_VENV = Path(os.environ.get("FLASHNORM_GENAI_VENV") or REPO_ROOT / ".venv-genai")
#: The pins of the onnxruntime-genai environment (the genai builder needs transformers 5.x,
#: optimum-onnx 0.1.0 pins transformers < 4.58, so the two cannot share one environment).
GENAI_REQUIREMENTS = [
    "torch==2.13.0",
    "transformers==5.23.0",
    "onnxruntime==1.32.0",
    "onnxruntime-genai==0.18.0",
    "onnx==1.23.2",
    "onnx-ir",
    "onnxscript==0.7.2",
]
#: Highest IR version written (onnxruntime 1.31/1.32 accept at most 13; onnx 1.23 writes 14).
MAX_IR_VERSION = 10
SEED = 0

# Tiny dimensions shared by every family.
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE = 128
VOCAB = 512
MAX_POS = 128
# ViT
IMAGE_SIZE = 32
PATCH_SIZE = 8
# Mixtral (mixture of experts)
EXPERTS = 4
EXPERTS_PER_TOKEN = 2
# GPT-J: rotary embedding on the first ROTARY_DIM of each head's HEAD_DIM channels
ROTARY_DIM = 8
# ViTForImageClassification (head="classification")
NUM_LABELS = 10
_DIMS = dict(hidden=HIDDEN, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
             intermediate=INTERMEDIATE, vocab=VOCAB, max_pos=MAX_POS, image=IMAGE_SIZE, patch=PATCH_SIZE,
             seed=SEED)


class FixtureUnavailable(RuntimeError):
    """The fixture cannot be built in this environment (e.g. .venv-genai is missing)."""


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to build one fixture. ``doc`` records what the export was observed to contain."""

    name: str
    family: str  # llama | qwen3 | mistral | mixtral | bert | gpt2 | gptj | vit
    exporter: str  # dynamo | legacy | optimum | ort_opt | genai
    doc: str = ""
    opset: int | None = None  # None: the exporter's default
    dtype: str = "float32"  # float32 | float16 (model dtype before export)
    tied: bool = False  # tie_word_embeddings (GPT2 is always tied)
    optimize: bool = True  # dynamo: run the onnxscript optimizer
    task: str | None = None  # optimum task
    source: str | None = None  # ort_opt: the fixture that is optimized
    ort_model_type: str | None = None
    ort_opt_level: int | None = None
    precision: str | None = None  # genai: fp32 | int4
    max_batch: int | None = None  # largest batch ORT CPU runs it with (None: any)
    head: str | None = None  # vit: "classification" = ViTForImageClassification (None: ViTModel)

    @property
    def has_past(self) -> bool:
        return self.exporter == "genai" or (self.task or "").endswith("-with-past")

    def params(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("doc")
        if d["head"] is None:  # only where set, so that the other fixtures' stamps stay as they were
            d.pop("head")
        return d


FIXTURES: dict[str, Recipe] = {}


def _add(recipe: Recipe) -> None:
    assert recipe.name not in FIXTURES, recipe.name
    FIXTURES[recipe.name] = recipe


# The docstrings below describe what the exports were observed to contain (RECIPE_VERSION 1,
# torch 2.13.0, transformers 4.57.6, onnxscript 0.7.2, optimum-onnx 0.1.0, onnxruntime 1.31.1;
# genai: transformers 5.23.0, onnxruntime 1.32.0, onnxruntime-genai 0.18.0).
_add(Recipe(
    "llama_dynamo", "llama", "dynamo",
    doc="""torch.onnx.export(dynamo=True, optimize=True), default opset 20, IR 10.
    5 RMSNorms as Pow(x, 2.0) -> ReduceMean(axes input [-1]) -> Add(eps) -> Sqrt -> Reciprocal
    -> Mul(x, .) -> Mul(scale, .); 2.0/eps/axes are initializers, scales keep HF names.
    Consumers: q/k/v, gate/up, lm_head = MatMul(norm, W[in, out]) (W named val_N). No Shape users.""",
))
_add(Recipe(
    "llama_dynamo_opset23", "llama", "dynamo", opset=23, max_batch=1,
    doc="""dynamo, opset_version=23: 5 x RMSNormalization(x, scale) (axis -1, stash_type 1);
    attention becomes opset-23 Attention + RotaryEmbedding. ORT 1.31 runs it at batch 1 only:
    the exported cos/sin caches have batch dim 1 and ORT's RotaryEmbedding requires the input's
    batch ("Inputs 'cos_cache' and 'sin_cache' are expected to have the same shape as input 'x'").""",
))
_add(Recipe(
    "llama_dynamo_noopt", "llama", "dynamo", tied=True, optimize=False,
    doc="""dynamo, optimize=False, tie_word_embeddings=True. EVERY linear (not only lm_head) is
    MatMul(x, Transpose(W[out, in], perm=[1, 0])). The tied weight is the initializer
    `lm_head.weight` [512, 64], read by the embedding Gather AND by Transpose -> MatMul after the
    final norm. Constants are Constant nodes; many Cast/Reshape; norms are Reciprocal chains.
    (The tie is also kept with optimize=True: see qwen3_tied_dynamo, gpt2_dynamo.)""",
))
_add(Recipe(
    "llama_legacy", "llama", "legacy", opset=17,
    doc="""torch.onnx.export(dynamo=False) opset 17, IR 8 (transformers' vmap masks swapped for
    optimum's vmap-free ones during the export). 5 x Cast(FLOAT) -> Pow(., Constant 2) ->
    ReduceMean(axes attr) -> Add(Constant eps) -> Sqrt -> Div(Constant 1, .) -> Mul(x, .) ->
    Cast(FLOAT) -> Mul(scale, .). input_layernorm outputs also feed 2 Shape nodes.
    Weights `onnx::MatMul_N` [in, out].""",
))
_add(Recipe(
    "llama_dynamo_fp16", "llama", "dynamo", dtype="float16",
    doc="""dynamo, model in float16 (exports on CPU without trouble): Cast(FLOAT) -> Pow -> ... ->
    Reciprocal -> Mul -> Cast(FLOAT16) -> Mul(scale fp16, .); MatMul weights fp16.""",
))
_add(Recipe(
    "llama_legacy_fp16", "llama", "legacy", opset=17, dtype="float16",
    doc="""legacy opset 17, model in float16: the legacy chain with Cast(FLOAT) first and
    Cast(FLOAT16) before Mul(scale fp16, .).""",
))
_add(Recipe(
    "qwen3_tied_dynamo", "qwen3", "dynamo", tied=True,
    doc="""Qwen3, tied, dynamo opset 20: 9 Reciprocal chains = 4 decoder norms + final + q_norm/k_norm
    per layer (scale [16]; input Reshape(q/k MatMul), output -> Transpose -> RoPE: not foldable).
    The tie is kept: `lm_head.weight` feeds the embedding Gather and Transpose(perm=[1,0]) -> MatMul.""",
))
_add(Recipe(
    "qwen3_untied_dynamo", "qwen3", "dynamo", tied=False,
    doc="Qwen3, untied, dynamo opset 20: 9 Reciprocal chains; lm_head a plain MatMul(norm, W[64, 512]).",
))
_add(Recipe(
    "qwen3_tied_legacy", "qwen3", "legacy", opset=17, tied=True,
    doc="""Qwen3, tied, legacy opset 17: 9 Div chains (Cast-wrapped). The tie is NOT kept: lm_head
    reads its own copy `onnx::MatMul_N` [64, 512].""",
))
_add(Recipe(
    "qwen3_untied_dynamo_opset23", "qwen3", "dynamo", opset=23, max_batch=1,
    doc="""Qwen3, untied, dynamo opset 23: 9 x RMSNormalization (q_norm/k_norm included).
    Runs in ORT at batch 1 only (see llama_dynamo_opset23).""",
))
_add(Recipe(
    "mixtral_legacy", "mixtral", "legacy", opset=17,
    doc="""MixtralForCausalLM (4 experts, top 2, sliding_window=None), legacy opset 17, IR 8, exported
    with the MoE block's loop over every expert (_moe_forward_every_expert: the original loop over
    the experts the sample hits traces to a Split that fails on inputs hitting fewer). 5 Div
    chains as in llama_legacy. Each post_attention_layernorm output feeds 3 Shape nodes and
    Reshape(view(-1, hidden)) -> the router MatMul (gate) and Unsqueeze(0) -> per expert
    Gather(axis 1, top_x) -> Reshape -> w1 and w3 MatMul (8 expert linears per layer); ScatterElements
    (index_add_) and NonZero (torch.where) route the tokens.""",
))
_add(Recipe(
    "mistral_dynamo", "mistral", "dynamo",
    doc="MistralForCausalLM (sliding_window=None), dynamo opset 20: same graph shape as llama_dynamo.",
))
_add(Recipe(
    "llama_optimum", "llama", "optimum", task="text-generation",
    doc="""optimum main_export(task="text-generation") from _hf/llama_untied: opset 18, IR 8; inputs
    input_ids, attention_mask, position_ids. 5 Div chains as in llama_legacy, with the
    ReduceMean axes as a Constant input (opset 18); Shape users on the norm outputs.""",
))
_add(Recipe(
    "llama_optimum_past", "llama", "optimum", tied=True, task="text-generation-with-past",
    doc="""optimum, text-generation-with-past, tied: inputs add past_key_values.N.key/value
    [batch, 2, past, 16], outputs present.N.*. With accelerate installed the tie is kept:
    lm_head = MatMul(norm, Transpose(model.embed_tokens.weight)) where the Transpose has NO perm
    attribute (default reverse) and the embedding Gather reads the same initializer.""",
))
_add(Recipe(
    "qwen3_optimum_past", "qwen3", "optimum", tied=True, task="text-generation-with-past",
    doc="optimum, Qwen3 tied, with past: 9 Div chains; tie kept as in llama_optimum_past.",
))
_add(Recipe(
    "qwen3_ort_opt", "qwen3", "ort_opt", tied=True, source="qwen3_tied_dynamo",
    ort_model_type="qwen3", ort_opt_level=0,
    doc="""optimize_model(qwen3_tied_dynamo, model_type="qwen3", num_heads=4, hidden_size=64,
    opt_level=0): 5 x SimplifiedLayerNormalization (ai.onnx domain; first input_layernorm + the
    4 q/k norms) and 4 x com.microsoft.SkipSimplifiedLayerNormalization (output 3 = residual sum
    feeds the next Skip; the final norm is the last Skip). Attention is not fused. The tie is kept
    at opt_level 0 (Gather + Transpose of lm_head.weight); opt_level 1 duplicates it. The same call
    on a legacy export gives the same norms but a RotaryEmbedding ORT cannot run (opt_level 0).""",
))
_add(Recipe(
    "llama_ort_opt", "llama", "ort_opt", source="llama_legacy", ort_model_type="gpt2", ort_opt_level=1,
    doc="""optimize_model(llama_legacy, model_type="gpt2", opt_level=1): ORT session optimization
    first (drops the no-op Casts, folds Constants), then 1 x SimplifiedLayerNormalization +
    4 x SkipSimplifiedLayerNormalization. On legacy exports opt_level 0 (and None with model_type
    qwen3) fuse a RotaryEmbedding that fails at run time; dynamo exports work at every level with
    both model types. An fp16 dynamo export fuses nothing at opt_level 0 (Casts) and only
    Simplified (no Skip) at opt_level 1.""",
))
_add(Recipe(
    "qwen3_genai_fp32", "qwen3", "genai", tied=True, precision="fp32",
    doc="""onnxruntime-genai builder -p fp32 -e cpu from _hf/qwen3_tied (saved by transformers 4.57,
    loaded by 5.23): opset 22 + com.microsoft, IR 10, weights in model.onnx.data. 5 x
    SimplifiedLayerNormalization (first input_layernorm + q_norm/k_norm) + 4 x Skip (final norm in
    the last). q/k/v packed in one MatMul [64, 128]; GroupQueryAttention. Tie kept: embedding =
    Gather(Transpose(lm_head.MatMul.weight [64, 512])), which lm_head's MatMul also reads.""",
))
_add(Recipe(
    "qwen3_genai_int4", "qwen3", "genai", tied=True, precision="int4",
    doc="""genai builder -p int4: same norms; every linear is com.microsoft.MatMulNBits
    (uint8 [N, K/32, 16] + scales [N, K/32]); embedding = GatherBlockQuantized(Reshape(
    lm_head.MatMul.weight_Q4), ids, lm_head.MatMul.weight_scales), shared with lm_head.""",
))
_add(Recipe(
    "llama_genai_fp32", "llama", "genai", tied=True, precision="fp32",
    doc="genai builder -p fp32, Llama tied: 1 x SimplifiedLayerNormalization + 4 x Skip; tie kept as in qwen3_genai_fp32.",
))
_add(Recipe(
    "bert_dynamo", "bert", "dynamo",
    doc="""BertModel (no pooler, post-LN), dynamo opset 20: 5 x LayerNormalization(x, scale, bias)
    (embeddings + 2 per layer). Each output feeds q/k/v (or intermediate) MatMul AND the residual
    Add: not foldable. The last one is the graph output.""",
))
_add(Recipe(
    "bert_legacy", "bert", "legacy", opset=17,
    doc="BertModel, legacy opset 17: 5 x LayerNormalization, plus Shape users on the outputs.",
))
_add(Recipe(
    "gpt2_dynamo", "gpt2", "dynamo", tied=True,
    doc="""GPT2LMHeadModel (pre-LN, always tied), dynamo opset 20: 5 x LayerNormalization (ln_1, ln_2
    per layer, ln_f); consumers Reshape -> Gemm(x, W[in, out] (Conv1D), bias), q/k/v packed in c_attn
    [64, 192]. Tie kept: lm_head.weight feeds Gather and Transpose -> MatMul. ORT's optimizer
    crashes on this export (IndexError), hence gpt2_ort_opt starts from gpt2_legacy.""",
))
_add(Recipe(
    "gpt2_legacy", "gpt2", "legacy", opset=17, tied=True,
    doc="GPT2, legacy opset 17: 5 x LayerNormalization -> Reshape (+ Shape users); tie NOT kept (copy onnx::MatMul_N).",
))
_add(Recipe(
    "bert_ort_opt", "bert", "ort_opt", source="bert_legacy", ort_model_type="bert", ort_opt_level=0,
    doc="""optimize_model(bert_legacy, model_type="bert", opt_level=0): com.microsoft.EmbedLayerNormalization
    (gamma = input 5, beta = input 6) + 4 x SkipLayerNormalization(input, skip, gamma, beta, bias)
    + 2 x Attention + BiasGelu. (From bert_dynamo: 1 LayerNormalization + 4 Skip, no Attention.)""",
))
_add(Recipe(
    "gpt2_ort_opt", "gpt2", "ort_opt", tied=True, source="gpt2_legacy", ort_model_type="gpt2", ort_opt_level=0,
    doc="""optimize_model(gpt2_legacy, model_type="gpt2", opt_level=0): 1 x LayerNormalization (layer 0
    ln_1) + 4 x SkipLayerNormalization (ln_f in the last), FastGelu; consumers become MatMul.""",
))
_add(Recipe(
    "vit_dynamo", "vit", "dynamo",
    doc="""ViTModel (no pooler, pre-LN), image 32, patch 8 (17 tokens), input pixel_values, dynamo opset 20:
    5 x LayerNormalization (layernorm_before/after per layer -> q/k/v or intermediate MatMul;
    final layernorm -> graph output).""",
))

_add(Recipe(
    "gpt2_optimum", "gpt2", "optimum", tied=True, task="text-generation",
    doc="""optimum main_export(task="text-generation") from _hf/gpt2_tied: opset 18, IR 8, no value_info;
    inputs input_ids, attention_mask, position_ids. 5 x LayerNormalization -> Reshape -> Gemm (c_attn,
    c_fc; Conv1D weights [in, out]); ln_f -> Reshape(shape = Concat of Shape-derived dims) -> lm_head.
    Tie kept (optimum deduplicates it, with a warning): lm_head = MatMul(., Transpose(transformer.wte.weight))
    and the embedding Gather reads transformer.wte.weight.""",
))
_add(Recipe(
    "gptj_legacy", "gptj", "legacy", opset=17,
    doc="""GPTJForCausalLM (parallel attention + MLP: one ln_1 per layer feeds q/k/v AND fc_in; rotary_dim 8
    of head_dim 16; untied, lm_head with bias), legacy opset 17, IR 8, no value_info: 3 x
    LayerNormalization. ln_f -> Reshape(shape = Concat of Shape-derived dims) -> lm_head MatMul
    (onnx::MatMul_N [64, 512]) -> Add(lm_head.bias).""",
))
_add(Recipe(
    "gptj_optimum", "gptj", "optimum", task="text-generation",
    doc="""optimum main_export(task="text-generation") from _hf/gptj_untied: opset 18, IR 8, inputs input_ids,
    attention_mask, position_ids; the same 3 x LayerNormalization and consumers as gptj_legacy
    (ln_f -> Reshape from Shape -> lm_head MatMul + bias).""",
))
_add(Recipe(
    "vit_legacy", "vit", "legacy", opset=17,
    doc="""ViTModel (no pooler), legacy opset 17, IR 8, input pixel_values [batch, 3, 32, 32]: 5 x
    LayerNormalization as in vit_dynamo (layernorm_before/after -> q/k/v or intermediate MatMul;
    the final layernorm is the graph output last_hidden_state).""",
))
_add(Recipe(
    "vit_cls_legacy", "vit", "legacy", opset=17, head="classification",
    doc="""ViTForImageClassification (10 labels), legacy opset 17, IR 8, output logits: 5 x
    LayerNormalization; the final vit.layernorm -> Gather(axis 1, Constant 0) (the CLS row) ->
    classifier Gemm(transB=1, classifier.weight [10, 64], bias).""",
))
_add(Recipe(
    "vit_cls_optimum", "vit", "optimum", task="image-classification", head="classification",
    doc="""optimum main_export(task="image-classification") from _hf/vit_untied_classification: opset 18,
    IR 8; pixel_values with all four dims symbolic (batch_size, num_channels, height, width: channels
    and size come from config.json). Norms and the CLS Gather -> classifier Gemm as in vit_cls_legacy.""",
))

# --------------------------------------------------------------------------------------------
# Paths, stamps, atomic builds
# --------------------------------------------------------------------------------------------


def fixtures_root(root: Path | str | None = None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get("FLASHNORM_FIXTURES")
    return Path(env) if env else DEFAULT_ROOT


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _genai_versions() -> dict[str, str]:
    """Versions installed in .venv-genai, read from dist-info folder names (no subprocess)."""
    out = {}
    for site in sorted(GENAI_VENV.glob("lib/python*/site-packages")):
        for dist in ("torch", "transformers", "onnxruntime", "onnxruntime_genai", "onnx"):
            for info in site.glob(f"{dist}-*.dist-info"):
                out[dist] = info.name[len(dist) + 1 : -len(".dist-info")]
    return out


def _library_versions(recipe: Recipe) -> dict[str, Any]:
    if recipe.exporter == "genai":
        return {"genai_venv": _genai_versions(), "transformers_save": _version("transformers")}
    versions = {d: _version(d) for d in ("torch", "transformers", "onnx", "onnxscript", "onnx-ir")}
    versions["onnxruntime"] = _version("onnxruntime-gpu") or _version("onnxruntime")
    if recipe.exporter == "optimum":
        versions["optimum-onnx"] = _version("optimum-onnx")
        versions["optimum"] = _version("optimum")
        versions["accelerate"] = _version("accelerate")
    return versions


def recipe_hash(name: str) -> str:
    recipe = FIXTURES[name]
    payload = {
        "recipe_version": RECIPE_VERSION,
        "dims": _DIMS,
        "params": recipe.params(),
        "libraries": _library_versions(recipe),
        "source": recipe_hash(recipe.source) if recipe.source else None,
    }
    if recipe.family == "mixtral":  # only here, so that the other fixtures' stamps stay as they were
        payload["moe"] = {"experts": EXPERTS, "experts_per_token": EXPERTS_PER_TOKEN}
    payload.update(_extra_dims(recipe.family, recipe.head))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _extra_dims(family: str, head: str | None = None) -> dict[str, Any]:
    """The dimensions only some families use (in their stamps only: the others stay as they were)."""
    extra: dict[str, Any] = {}
    if family == "gptj":
        extra["gptj"] = {"rotary_dim": ROTARY_DIM}
    if head == "classification":
        extra["head"] = {"head": head, "num_labels": NUM_LABELS}
    return extra


STAMP = ".recipe-hash"


def _is_fresh(folder: Path, stamp: str, main_file: str = "model.onnx") -> bool:
    try:
        return (folder / main_file).is_file() and (folder / STAMP).read_text().strip() == stamp
    except OSError:
        return False


@contextlib.contextmanager
def _atomic_folder(
    target: Path, stamp: str, main_file: str = "model.onnx", replace: bool = False
) -> Iterator[Path]:
    """Yield an empty temporary folder; on success, stamp it and rename it to ``target``.

    If meanwhile another process put a fresh ``target`` (same stamp) in place, that one is kept
    unless ``replace``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        yield tmp
        (tmp / STAMP).write_text(stamp + "\n")
        if not replace and _is_fresh(target, stamp, main_file):
            return  # a concurrent build of the same recipe finished first: keep it
        if target.exists():
            trash = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
            try:
                target.rename(trash)
            except FileNotFoundError:
                trash = None
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            # Someone else renamed theirs in meanwhile: fine if it is the same recipe.
            if not _is_fresh(target, stamp, main_file):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(root: Path, name: str) -> Iterator[None]:
    """An exclusive lock (fcntl.flock; none where there is no fcntl) on a file named after ``root``
    and ``name`` in the system's temporary folder, not in ``root``, which stays the fixtures alone.
    Locks are taken in the order fixtures are built from one another (a fixture's source before the
    fixture, a fixture before its _hf folder), so two processes cannot wait on each other."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    locks = Path(tempfile.gettempdir()) / f"flashnorm-fixture-locks-{os.getuid()}"
    locks.mkdir(mode=0o700, exist_ok=True)
    with open(locks / f"{key}-{name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(name: str, root: Path | str | None = None, *, force: bool = False) -> Path:
    """Build fixture ``name`` (if not cached) and return the path of its ``model.onnx``."""
    if name not in FIXTURES:
        raise KeyError(f"unknown fixture {name!r}; known: {', '.join(FIXTURES)}")
    recipe = FIXTURES[name]
    root = fixtures_root(root)
    if recipe.exporter == "genai" and not _genai_python().exists():
        raise FixtureUnavailable(
            f"{name}: the onnxruntime-genai environment {GENAI_VENV} is missing; "
            "create it with `python -m models.fixtures genai-env`"
        )
    target = root / name
    stamp = recipe_hash(name)
    if not force and _is_fresh(target, stamp):
        _refresh_info(recipe, target)
        return target / "model.onnx"
    if recipe.source:
        build(recipe.source, root)
    with _build_lock(root, name):
        if not force and _is_fresh(target, stamp):  # another process built it while we waited
            _refresh_info(recipe, target)
            return target / "model.onnx"
        t0 = time.perf_counter()
        with _atomic_folder(target, stamp, replace=force) as tmp:
            _BUILDERS[recipe.exporter](recipe, tmp, root)
            model_path = tmp / "model.onnx"
            _cap_ir_version(model_path)
            info = describe(recipe, model_path)
            info["build_seconds"] = round(time.perf_counter() - t0, 2)
            (tmp / "fixture.json").write_text(json.dumps(info, indent=2) + "\n")
    return target / "model.onnx"


def _refresh_info(recipe: Recipe, folder: Path) -> None:
    """Rewrite a cached fixture's fixture.json if it was written by another ANALYZER_VERSION."""
    info_path = folder / "fixture.json"
    try:
        old = json.loads(info_path.read_text())
    except (OSError, ValueError):
        old = {}
    if old.get("analyzer_version") == ANALYZER_VERSION:
        return
    info = describe(recipe, folder / "model.onnx")
    info["build_seconds"] = old.get("build_seconds")
    tmp = folder / f".fixture.json.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, info_path)


def load_info(name: str, root: Path | str | None = None) -> dict[str, Any]:
    """The fixture.json of a built fixture (builds it if needed)."""
    path = build(name, root)
    return json.loads((path.parent / "fixture.json").read_text())


# --------------------------------------------------------------------------------------------
# Tiny transformers models
# --------------------------------------------------------------------------------------------


def _config(family: str, tied: bool, head: str | None = None):
    import transformers as tr

    common_lm = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        intermediate_size=INTERMEDIATE,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=tied,
    )
    if family == "llama":
        return tr.LlamaConfig(**common_lm)
    if family == "qwen3":
        return tr.Qwen3Config(**common_lm)
    if family == "mistral":
        return tr.MistralConfig(**common_lm, sliding_window=None)
    if family == "mixtral":
        return tr.MixtralConfig(**common_lm, sliding_window=None, num_local_experts=EXPERTS,
                                num_experts_per_tok=EXPERTS_PER_TOKEN)
    enc = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
    )
    if family == "bert":
        return tr.BertConfig(**enc, vocab_size=VOCAB, max_position_embeddings=MAX_POS)
    if family == "vit":
        labels = {"num_labels": NUM_LABELS} if head == "classification" else {}
        return tr.ViTConfig(**enc, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3, **labels)
    if family == "gptj":
        return tr.GPTJConfig(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE, rotary_dim=ROTARY_DIM,
            vocab_size=VOCAB, n_positions=MAX_POS, tie_word_embeddings=tied,
        )
    if family == "gpt2":
        if not tied:
            raise ValueError("GPT2LMHeadModel always ties lm_head to the token embedding")
        return tr.GPT2Config(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE,
            vocab_size=VOCAB, n_positions=MAX_POS, tie_word_embeddings=True,
        )
    raise ValueError(f"unknown family {family!r}")


def _randomize_norms(model) -> int:
    """Random norm weights/biases (seeded); returns how many norm modules were changed."""
    import torch

    gen = torch.Generator().manual_seed(SEED + 1)
    count = 0
    with torch.no_grad():
        for _, module in model.named_modules():
            is_ln = isinstance(module, torch.nn.LayerNorm)
            is_rms = type(module).__name__.endswith("RMSNorm") or isinstance(module, torch.nn.RMSNorm)
            if not (is_ln or is_rms):
                continue
            weight = getattr(module, "weight", None)
            if weight is not None:
                weight.copy_(torch.rand(weight.shape, generator=gen, dtype=torch.float32) + 0.5)
            bias = getattr(module, "bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=gen, dtype=torch.float32) * 0.1)
            count += 1
    return count


def make_model(family: str, tied: bool = False, dtype: str = "float32", head: str | None = None):
    """The tiny transformers model of ``family`` (seeded random weights, random norms, eval).
    ``head="classification"`` (vit only): ViTForImageClassification instead of ViTModel."""
    import torch
    import transformers as tr

    tr.set_seed(SEED)
    config = _config(family, tied, head)
    cls = {
        "llama": tr.LlamaForCausalLM,
        "qwen3": tr.Qwen3ForCausalLM,
        "mistral": tr.MistralForCausalLM,
        "mixtral": tr.MixtralForCausalLM,
        "gpt2": tr.GPT2LMHeadModel,
        "gptj": tr.GPTJForCausalLM,
    }.get(family)
    if head is not None and family != "vit":
        raise ValueError(f"head={head!r} is for vit only")
    if cls is not None:
        model = cls(config)
    elif family == "bert":
        model = tr.BertModel(config, add_pooling_layer=False)
    elif family == "vit" and head == "classification":
        model = tr.ViTForImageClassification(config)
    elif family == "vit":
        model = tr.ViTModel(config, add_pooling_layer=False)
    else:
        raise ValueError(family)
    n = _randomize_norms(model)
    assert n > 0, f"no norm modules found in {family}"
    model = model.to(getattr(torch, dtype)).eval()
    return model


def _is_causal_lm(family: str) -> bool:
    return family in ("llama", "qwen3", "mistral", "mixtral", "gpt2", "gptj")


def _traceable(model, family: str, head: str | None = None):
    """Give the model a forward with positional tensor inputs and one tensor output.

    The class is swapped (not wrapped) so parameter names, and thus initializer names, stay
    the HF names. The legacy exporter otherwise turns ``logits_to_keep`` into a graph input.
    """
    base = type(model)
    if _is_causal_lm(family):

        def forward(self, input_ids, attention_mask):
            out = base.forward(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits

    elif family == "bert":

        def forward(self, input_ids, attention_mask):
            return base.forward(self, input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    elif family == "vit" and head == "classification":

        def forward(self, pixel_values):
            return base.forward(self, pixel_values=pixel_values).logits

    elif family == "vit":

        def forward(self, pixel_values):
            return base.forward(self, pixel_values=pixel_values).last_hidden_state

    else:
        raise ValueError(family)
    model.__class__ = type(f"Traceable{base.__name__}", (base,), {"forward": forward})
    return model


def sample_inputs(family: str, batch: int = 2, seq: int = 8, dtype: str = "float32") -> dict[str, Any]:
    """Numpy inputs for the exported graph (no past)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    if family == "vit":
        return {"pixel_values": rng.standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(dtype)}
    ids = rng.integers(0, VOCAB, (batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def feeds_for(model, batch: int = 2, seq: int = 8, past: int = 0, seed: int = SEED) -> dict[str, Any]:
    """Numpy feeds for any fixture's graph inputs (a ModelProto or a path).

    Knows the input names the exporters use: input_ids, attention_mask, position_ids,
    token_type_ids, pixel_values, past_key_values.N.key/value ([batch, kv_heads, past, head_dim];
    ``past`` = 0 gives empty caches, which every fixture accepts).
    """
    import numpy as np
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for inp in model.graph.input:
        tt = inp.type.tensor_type
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        name = inp.name
        if name == "input_ids":
            value = rng.integers(3, VOCAB, (batch, seq))
        elif name == "attention_mask":
            value = np.ones((batch, past + seq))
        elif name == "position_ids":
            value = np.broadcast_to(np.arange(past, past + seq), (batch, seq))
        elif name == "token_type_ids":
            value = np.zeros((batch, seq))
        elif name == "pixel_values":
            value = rng.standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE))
        elif name.startswith("past_key_values"):
            kv = dims[1] if len(dims) > 1 and dims[1] else KV_HEADS
            hd = dims[3] if len(dims) > 3 and dims[3] else HEAD_DIM
            value = rng.standard_normal((batch, kv, past, hd)) * 0.1
        else:
            raise ValueError(f"no feed recipe for graph input {name!r}")
        feeds[name] = np.ascontiguousarray(value).astype(np_dtype)
    return feeds


def fixture_feeds(name: str, root: Path | str | None = None, **kwargs) -> dict[str, Any]:
    """feeds_for() a built fixture, with a batch size the fixture is known to run with."""
    path = build(name, root)
    max_batch = FIXTURES[name].max_batch
    if max_batch is not None:
        kwargs["batch"] = min(kwargs.get("batch", 2), max_batch)
    return feeds_for(path, **kwargs)


def reference_output(name: str, feeds: dict[str, Any]):
    """The first output of the fixture's transformers model (same seed/weights) on ``feeds``.

    Past inputs must be empty (past = 0). Returns a float32 numpy array.
    """
    import numpy as np
    import torch

    recipe = FIXTURES[name]
    model = make_model(recipe.family, recipe.tied, recipe.dtype, recipe.head)
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items() if not k.startswith("past_key_values")}
    with torch.no_grad():
        if recipe.family == "vit" and recipe.head == "classification":
            out = model(pixel_values=t["pixel_values"].to(model.dtype)).logits
        elif recipe.family == "vit":
            out = model(pixel_values=t["pixel_values"].to(model.dtype)).last_hidden_state
        elif recipe.family == "bert":
            out = model(input_ids=t["input_ids"].long(), attention_mask=t["attention_mask"].long()).last_hidden_state
        else:
            kw = {"position_ids": t["position_ids"].long()} if "position_ids" in t else {}
            out = model(
                input_ids=t["input_ids"].long(), attention_mask=t["attention_mask"].long(), use_cache=False, **kw
            ).logits
    return out.float().numpy()


def _export_io(family: str, dtype: str, head: str | None = None):
    import torch

    inputs = {k: torch.from_numpy(v) for k, v in sample_inputs(family, dtype=dtype).items()}
    names = list(inputs)
    if family == "vit":
        out_name, out_axes = ("logits" if head == "classification" else "last_hidden_state"), {0: "batch"}
        axes = {"pixel_values": {0: "batch"}}
    else:
        out_name = "logits" if _is_causal_lm(family) else "last_hidden_state"
        out_axes = {0: "batch", 1: "sequence"}
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
    return inputs, names, out_name, axes, out_axes


@contextlib.contextmanager
def _legacy_mask_patch() -> Iterator[None]:
    """transformers >= 4.53 builds masks with torch.vmap, which TorchScript cannot trace.

    Swap in optimum's vmap-free mask functions for the duration of a legacy export (the same
    patch optimum's own exporter applies).
    """
    import transformers.masking_utils as mu

    try:
        from optimum.exporters.onnx.model_patcher import (
            eager_mask_without_vmap,
            find_packed_sequence_indices_patched,
            sdpa_mask_without_vmap,
        )
    except ImportError:  # pragma: no cover - optimum is part of the export extras
        yield
        return
    orig_find = mu.find_packed_sequence_indices
    mu.ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", sdpa_mask_without_vmap)
    mu.ALL_MASK_ATTENTION_FUNCTIONS.register("eager", eager_mask_without_vmap)
    mu.find_packed_sequence_indices = find_packed_sequence_indices_patched
    try:
        yield
    finally:
        mu.ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", mu.sdpa_mask)
        mu.ALL_MASK_ATTENTION_FUNCTIONS.register("eager", mu.eager_mask)
        mu.find_packed_sequence_indices = orig_find


def _moe_forward_every_expert(self, hidden_states):
    """``MixtralSparseMoeBlock.forward`` with its loop over *every* expert instead of the experts
    the sample input happens to hit (``for expert_idx in expert_hit``). Traced, the original
    loop becomes a ``Split`` of ``expert_hit`` into as many pieces as the sample hit, and
    ONNX Runtime fails on any input that hits fewer experts. Same function (an expert no token
    selects adds nothing); optimum patches Qwen3-MoE the same way (qwen3_moe_forward_patched)."""
    import torch

    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    routing_weights = torch.nn.functional.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
    routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(hidden_states.dtype)
    final_hidden_states = torch.zeros(
        (batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device
    )
    expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        expert_layer = self.experts[expert_idx]
        idx, top_x = torch.where(expert_mask[expert_idx].squeeze(0))
        current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
        current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
        final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
    final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
    return final_hidden_states, router_logits


@contextlib.contextmanager
def _legacy_moe_patch(family: str) -> Iterator[None]:
    """For a legacy (TorchScript) export of Mixtral: :func:`_moe_forward_every_expert`."""
    if family != "mixtral":
        yield
        return
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    original = MixtralSparseMoeBlock.forward
    MixtralSparseMoeBlock.forward = _moe_forward_every_expert
    try:
        yield
    finally:
        MixtralSparseMoeBlock.forward = original


# --------------------------------------------------------------------------------------------
# Builders (one per exporter). Each writes <out>/model.onnx (and whatever else it writes).
# --------------------------------------------------------------------------------------------


def _build_torch(recipe: Recipe, out: Path, root: Path) -> None:
    import torch

    model = _traceable(make_model(recipe.family, recipe.tied, recipe.dtype, recipe.head), recipe.family, recipe.head)
    inputs, names, out_name, axes, out_axes = _export_io(recipe.family, recipe.dtype, recipe.head)
    path = out / "model.onnx"
    kwargs: dict[str, Any] = dict(input_names=names, output_names=[out_name])
    if recipe.opset is not None:
        kwargs["opset_version"] = recipe.opset
    with torch.no_grad(), _quiet():
        if recipe.exporter == "dynamo":
            dims = {}
            for n, ax in axes.items():
                dims[n] = {i: torch.export.Dim(d) for i, d in ax.items()}
            torch.onnx.export(
                model, tuple(inputs.values()), str(path), dynamo=True, optimize=recipe.optimize,
                dynamic_shapes=dims, external_data=False, verbose=False, **kwargs,
            )
        else:
            with _legacy_mask_patch(), _legacy_moe_patch(recipe.family):
                torch.onnx.export(
                    model, tuple(inputs.values()), str(path), dynamo=False,
                    dynamic_axes={**axes, out_name: out_axes}, **kwargs,
                )


def _hf_folder(recipe: Recipe, root: Path) -> Path:
    """Save (once) the HF folder of the recipe's model under <root>/_hf/<family>_<variant>/."""
    variant = ("tied" if recipe.tied else "untied") + ("" if recipe.dtype == "float32" else f"_{recipe.dtype}")
    if recipe.head:
        variant += f"_{recipe.head}"
    folder = root / "_hf" / f"{recipe.family}_{variant}"
    key = {"recipe_version": RECIPE_VERSION, "dims": _DIMS, "family": recipe.family, "tied": recipe.tied,
           "dtype": recipe.dtype, "tokenizer": "wordlevel", "transformers": _version("transformers"),
           "torch": _version("torch"), **_extra_dims(recipe.family, recipe.head)}
    stamp = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    if _is_fresh(folder, stamp, main_file="config.json"):
        return folder
    with _build_lock(root, f"_hf-{folder.name}"):
        if _is_fresh(folder, stamp, main_file="config.json"):  # built by another process meanwhile
            return folder
        with _atomic_folder(folder, stamp, main_file="config.json") as tmp:
            model = make_model(recipe.family, recipe.tied, recipe.dtype, recipe.head)
            model.save_pretrained(tmp)
            if recipe.family == "vit":
                _tiny_image_processor().save_pretrained(tmp)
            else:
                _tiny_tokenizer().save_pretrained(tmp)
    return folder


def _tiny_tokenizer():
    """A word-level tokenizer over VOCAB made-up tokens, built offline.

    The genai builder insists on loading a tokenizer (AutoTokenizer) from the HF folder; Llama's
    own tokenizer needs a sentencepiece file we do not have.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 = the Llama config's bos/eos defaults
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
        model_max_length=MAX_POS,
    )


def _tiny_image_processor():
    """A ViT image processor for IMAGE_SIZE images (optimum reads a preprocessor from the folder)."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def _build_optimum(recipe: Recipe, out: Path, root: Path) -> None:
    from optimum.exporters.onnx import main_export

    hf = _hf_folder(recipe, root)
    with _quiet():
        main_export(
            str(hf), output=str(out), task=recipe.task, opset=recipe.opset, device="cpu",
            do_validation=False, local_files_only=True, library_name="transformers",
        )


def _build_ort_opt(recipe: Recipe, out: Path, root: Path) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    src = build(recipe.source, root)
    num_heads = HEADS
    with _quiet():
        opt = optimize_model(
            str(src), model_type=recipe.ort_model_type, num_heads=num_heads, hidden_size=HIDDEN,
            opt_level=recipe.ort_opt_level, use_gpu=False,
        )
    opt.save_model_to_file(str(out / "model.onnx"), use_external_data_format=False)


def _genai_python() -> Path:
    return GENAI_VENV / "bin" / "python"


def _build_genai(recipe: Recipe, out: Path, root: Path) -> None:
    hf = _hf_folder(recipe, root)
    cmd = [
        str(_genai_python()), "-m", "onnxruntime_genai.models.builder",
        "-i", str(hf), "-o", str(out), "-p", recipe.precision, "-e", "cpu",
        "-c", str(out / "_cache"),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"genai builder failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    shutil.rmtree(out / "_cache", ignore_errors=True)


_BUILDERS: dict[str, Callable[[Recipe, Path, Path], None]] = {
    "dynamo": _build_torch,
    "legacy": _build_torch,
    "optimum": _build_optimum,
    "ort_opt": _build_ort_opt,
    "genai": _build_genai,
}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' chatter (warnings, progress prints) unless FLASHNORM_VERBOSE."""
    import warnings

    if os.environ.get("FLASHNORM_VERBOSE"):
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _cap_ir_version(path: Path) -> None:
    """Lower the IR version field to MAX_IR_VERSION if needed (without touching external data)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        onnx.save(model, str(path))


# --------------------------------------------------------------------------------------------
# What a graph contains
# --------------------------------------------------------------------------------------------

#: The fixtures' names of the norm forms, one per way an exporter writes a norm. What is a
#: norm is decided by the pass's catalogue (:mod:`flashnorm_onnx.passes.norm_patterns`), the
#: only one: a form added there is counted here too. These names only split its decomposed
#: chains by how they write 1/sqrt and drop the domain of fused ops.
NORM_FORMS = [
    "rms_chain_reciprocal",  # [Cast] Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul [Cast] -> Mul(scale)
    "rms_chain_div",  # [Cast] Pow -> ReduceMean -> Add -> Sqrt -> Div(1, .) -> Mul [Cast] -> Mul(scale)
    #                   (or Div(x, Sqrt) -> Mul(scale))
    "rms_chain_pow",  # ... -> Add -> Pow(., -0.5) -> Mul(x, .) -> Mul(scale)
    "layernorm_chain",  # ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul -> Add
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
    "LayerNormalization",
    "SkipLayerNormalization",
    "EmbedLayerNormalization",
]
_RMS_CHAIN_FORMS = {"reciprocal": "rms_chain_reciprocal", "div": "rms_chain_div", "div_sqrt": "rms_chain_div",
                    "pow": "rms_chain_pow"}


def fixture_form(match) -> str:
    """The NORM_FORMS name of one ``norm_patterns.NormMatch``."""
    from flashnorm_onnx.passes.norm_patterns import FORM_LN_CHAIN, FORM_RMS_CHAIN

    if match.form == FORM_LN_CHAIN:
        return "layernorm_chain"
    if match.form == FORM_RMS_CHAIN:
        return _RMS_CHAIN_FORMS[match.inv_std]
    return match.anchor.op_type  # a fused op, whatever its domain


def _ir_model(model):
    """An onnx-ir model of a path, a ModelProto or an ir.Model (external data stays lazy)."""
    import onnx
    import onnx_ir as ir

    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return ir.load(str(model))


def find_norms(model) -> list[dict[str, Any]]:
    """Every norm of the main graph, as the fold pass finds them (``norm_patterns.find_norms``),
    in topological order: {"form" (a NORM_FORMS name), "node" (the node carrying its result),
    "scale" (the initializer behind its scale, or None), "problem" (why the fold must not
    touch it, or None)}. ``model``: a path, an onnx.ModelProto or an onnx_ir.Model. A
    ModelProto loaded without its external data works only when the norms' scales are stored
    in the model file (the catalogue reads them); give the path otherwise."""
    from flashnorm_onnx.passes.norm_patterns import find_norms as catalogue

    graph = _ir_model(model).graph
    norms: list[dict[str, Any]] = []
    for match in catalogue(graph):
        source = match.scale_source
        scale = source.name if source is not None and source.is_initializer() else None
        norms.append({"form": fixture_form(match), "node": match.anchor.name or match.output.name,
                      "scale": scale, "problem": match.problem})
    return norms


def _tied_in_graph(model) -> bool:
    """True if one initializer feeds both an embedding Gather and a (Transpose/MatMul) head."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    gather_src, matmul_src = set(), set()
    for n in graph.node:
        if n.op_type in ("Gather", "GatherBlockQuantized") and n.input:
            w = n.input[0]
            while w in producer and producer[w].op_type in ("Transpose", "Cast", "Reshape"):
                w = producer[w].input[0]
            if w in inits:
                gather_src.add(w)
        if n.op_type in ("MatMul", "Gemm", "MatMulNBits") and len(n.input) > 1:
            w = n.input[1]
            while w in producer and producer[w].op_type in ("Transpose", "Cast", "Reshape"):
                w = producer[w].input[0]
            if w in inits:
                matmul_src.add(w)
    return bool(gather_src & matmul_src)


def describe(recipe: Recipe, path: Path) -> dict[str, Any]:
    """The fixture.json content: what the recipe says and what the graph really holds."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    norms = find_norms(path)
    counts = Counter(n["form"] for n in norms)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    elem = None
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(t.dims) == 2:
            elem = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
            break
    ops = Counter((n.domain + "::" if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph.node)
    return {
        "name": recipe.name,
        "family": recipe.family,
        "exporter": recipe.exporter,
        "opset": opset,
        "ir_version": model.ir_version,
        "dtype": recipe.dtype if recipe.exporter != "genai" else (elem or recipe.dtype),
        "precision": recipe.precision,
        "has_past": any(i.name.startswith("past_key_values") for i in model.graph.input),
        "tied": recipe.tied,
        "tied_in_graph": _tied_in_graph(model),
        "num_layers": LAYERS,
        "hidden_size": HIDDEN,
        "num_heads": HEADS,
        "num_kv_heads": KV_HEADS if recipe.family in ("llama", "qwen3", "mistral", "mixtral") else HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB if recipe.family != "vit" else None,
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
        "norm_counts": {**{f: 0 for f in NORM_FORMS}, **counts},  # a form new to the catalogue counts too
        "norms": norms,
        "op_counts": dict(sorted(ops.items())),
        "recipe": recipe.params(),
        "max_batch": recipe.max_batch,
        "recipe_hash": recipe_hash(recipe.name),
        "analyzer_version": ANALYZER_VERSION,
        "doc": inspect.cleandoc(recipe.doc),
    }


# --------------------------------------------------------------------------------------------
# Fold counts (the README's table of architectures x exporters)
# --------------------------------------------------------------------------------------------


def _variant(recipe: Recipe, info: dict[str, Any]) -> str:
    parts = [f"opset {info['opset']}"]
    if recipe.dtype != "float32":
        parts.append(recipe.dtype.replace("float", "fp"))
    if recipe.tied:
        parts.append("tied")
    if recipe.exporter == "dynamo" and not recipe.optimize:
        parts.append("optimize=False")
    if recipe.task:
        parts.append(recipe.task)
    if recipe.source:
        parts.append(f"from {recipe.source}, model_type {recipe.ort_model_type}, opt_level {recipe.ort_opt_level}")
    if recipe.precision:
        parts.append(recipe.precision)
    if recipe.head == "classification":
        parts.append("ViTForImageClassification")
    return ", ".join(parts)


def _short_reason(reason: str) -> str:
    """A skip reason without the node and tensor names (so equal reasons count together)."""
    import re

    first = re.sub(r"'[^']*'", "'…'", reason.split("; ")[0])
    return first.split(" (post-LN")[0].split(": ")[0]


def fold_row(name: str, root: Path | str | None = None) -> dict[str, Any]:
    """Build fixture ``name`` and ``flashnorm_onnx.optimize`` it (default options, ONNX Runtime
    verification) into a temporary folder: what was folded, skipped (and why), untied, verified."""
    import flashnorm_onnx

    recipe = FIXTURES[name]
    row: dict[str, Any] = {"fixture": name, "family": recipe.family, "exporter": recipe.exporter}
    try:
        path = build(name, root)
    except FixtureUnavailable as e:
        row["unavailable"] = str(e)
        return row
    info = json.loads((path.parent / "fixture.json").read_text())
    with tempfile.TemporaryDirectory(prefix="flashnorm-table-") as tmp:
        report = flashnorm_onnx.optimize(path, Path(tmp) / "model.onnx")
    reasons = Counter(_short_reason(d.reason) for d in report.decisions if d.status == "skipped")
    row.update(
        variant=_variant(recipe, info),
        norms=len(report.decisions),
        folded=report.folded,
        skipped=report.skipped,
        untied=sum(c.action == "untied copy" for d in report.decisions for c in d.consumers),
        verification=("-" if report.verification is None or report.verification.method == "skipped" else
                      f"{report.verification.method}: {'passed' if report.verification.passed else 'FAILED'}"),
        reasons=dict(reasons),
    )
    return row


def format_fold_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`fold_row` as a Markdown table."""
    lines = ["| architecture | exporter | fixture (variant) | norms | folded | skipped: why | untied copies "
             "| verification |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"| {r['family']} | {r['exporter']} | `{r['fixture']}` | not built here | | | | |")
            continue
        why = "; ".join(f"{n} × {reason}" for reason, n in r["reasons"].items()) or "-"
        lines.append(f"| {r['family']} | {r['exporter']} | `{r['fixture']}` ({r['variant']}) | {r['norms']} | "
                     f"{r['folded']} | {r['skipped']}{': ' + why if r['skipped'] else ''} | {r['untied']} | "
                     f"{r['verification']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# genai environment
# --------------------------------------------------------------------------------------------


def create_genai_env(venv: Path = GENAI_VENV, python: str | None = None) -> Path:
    """Create the onnxruntime-genai venv (transformers 5.x) with pip. Returns its python."""
    python = python or shutil.which("python3") or sys.executable
    if not (venv / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, *GENAI_REQUIREMENTS], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import onnxruntime_genai.models.builder, transformers, onnxruntime; "
         "print('genai env ok: transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__)"],
        check=True,
    )
    return venv / "bin" / "python"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.fixtures", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_list = sub.add_parser("list", help="list the fixtures")
    p_list.add_argument("-v", "--verbose", action="store_true", help="print each recipe's notes")
    p_build = sub.add_parser("build", help="build fixtures (cached)")
    p_build.add_argument("names", nargs="*")
    p_build.add_argument("--all", action="store_true")
    p_build.add_argument("--root", type=Path, default=None)
    p_build.add_argument("--force", action="store_true", help="rebuild even if cached")
    p_build.add_argument(
        "--skip-unavailable", action="store_true",
        help="exit 0 although some fixtures could not be built here (genai without .venv-genai); else exit 3",
    )
    p_table = sub.add_parser(
        "table", help="fold every fixture (or the ones named) and print a Markdown table of the counts")
    p_table.add_argument("names", nargs="*")
    p_table.add_argument("--root", type=Path, default=None)
    p_table.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    p_env = sub.add_parser("genai-env", help=f"create {GENAI_VENV.name} for the genai builder recipes")
    p_env.add_argument("--venv", type=Path, default=GENAI_VENV)
    args = parser.parse_args(argv)

    if args.cmd == "list":
        for r in FIXTURES.values():
            flags = [r.exporter, f"opset={r.opset or 'default'}", r.dtype]
            if r.tied:
                flags.append("tied")
            if r.has_past:
                flags.append("past")
            if r.source:
                flags.append(f"from={r.source}")
            print(f"{r.name:30s} {r.family:8s} {' '.join(flags)}")
            if args.verbose and r.doc:
                print("    " + inspect.cleandoc(r.doc).replace("\n", "\n    "))
        return 0
    if args.cmd == "genai-env":
        create_genai_env(args.venv)
        return 0
    if args.cmd == "table":
        unknown = [n for n in args.names if n not in FIXTURES]
        if unknown:
            parser.error(f"unknown fixtures: {', '.join(unknown)}")
        families = {f: i for i, f in enumerate(("llama", "mistral", "mixtral", "qwen3", "gpt2", "gptj", "bert",
                                                "vit"))}
        exporters = {e: i for i, e in enumerate(("dynamo", "legacy", "optimum", "ort_opt", "genai"))}
        names = sorted(args.names or FIXTURES, key=lambda n: (
            families.get(FIXTURES[n].family, 99), exporters.get(FIXTURES[n].exporter, 99), n))
        with _quiet():
            rows = [fold_row(n, args.root) for n in names]
        print(format_fold_table(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return 1 if any(r.get("verification", "").endswith("FAILED") for r in rows) else 0
    names = list(FIXTURES) if args.all else args.names
    if not names:
        parser.error("build: give fixture names or --all")
    unknown = [n for n in names if n not in FIXTURES]
    if unknown:
        parser.error(f"unknown fixtures: {', '.join(unknown)}")
    failed = unavailable = 0
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        try:
            path = build(name, args.root, force=args.force)
        except FixtureUnavailable as e:
            print(f"skip  {name}: {e}", file=sys.stderr)
            unavailable += 1
            continue
        except Exception as e:  # keep going, report at the end
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        print(f"ok    {name:30s} {time.perf_counter() - t0:6.1f}s  {path}")
    print(f"total {time.perf_counter() - t_all:.1f}s")
    if failed:
        return 1
    if unavailable and not args.skip_unavailable:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
