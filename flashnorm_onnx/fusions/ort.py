"""ONNX Runtime's fused operators before the fold (``optimize --for-ort``).

ONNX Runtime's own session optimizer never creates ``SkipSimplifiedLayerNormalization`` and does
not fuse the RMSNorm chain or rotary embedding of a torch.onnx (dynamo) export. onnxscript ships
those fusions (:mod:`onnxscript.rewriter.ort_fusions`); they run first, on the loaded model, and
the fold then runs on the fused graph:

* the fused norms (``SimplifiedLayerNormalization``, ``SkipSimplifiedLayerNormalization``,
  ``SkipLayerNormalization``) are forms of the catalogue, folded as any;
* the final norm then feeds the output layer as ``com.microsoft.FusedMatMul`` (transB=1), a
  linear reader the fold absorbs.

The order matters: fusing only after the fold would miss nothing of the fold but would keep
the RMSNorm patterns from seeing the original scales; fusing only before would leave the chains
onnxscript does not recognise (legacy, optimum exports) without their skip fusion. So the
residual add + norm fusions run once more after the fold (:func:`fuse_after_fold`), on the
weightless fused norms the fold wrote.

Only rewrites that compute the same function for every valid input are applied. Of
onnxscript's ``optimize_for_ort``, measured on SmolLM2's dynamo export:

* RMSNorm, skip-RMSNorm, skip-LayerNorm, GELU forms, FusedMatMul and softmax rules: exact;
* rotary embedding (with its cos/sin cache): ORT's ``RotaryEmbedding`` requires position ids
  of shape [batch, sequence], and a dynamo export computes them as [1, sequence] inside the
  graph, so the fused model fails at batch 2. Fixed here: the position ids are expanded to the
  batch of the rotary's input (``_expand_position_ids``), which is what broadcasting did;
* attention: grouped-query attention (fewer K/V heads than Q heads) becomes
  ``com.microsoft.GroupQueryAttention`` by :mod:`flashnorm_onnx.fusions.gqa`: the export's mask
  goes in as ``attention_bias``, ``seqlens_k`` / ``total_sequence_length`` come from shapes, and
  rotary moves inside only for in-graph positions -- exact for every mask, padded batches
  included, where the installed ORT honours ``attention_bias`` (probed). Other scaled dot-product
  attention becomes ``com.microsoft.MultiHeadAttention`` with the mask as its additive
  ``attention_bias`` (exact, padded batches included: measured max relative difference 2e-6 on
  SmolLM2 with a left-padded row). Never onnxscript's own GQA rule: it derives ``seqlens_k`` from
  the position ids and ignores the attention mask, so a padded batch computes another function
  (and with in-graph position ids it fails at batch 2).

onnxscript's patterns are written for torch.onnx dynamo graphs (:func:`written_by_dynamo`). On
other graphs (the legacy exporter's, optimum's) they miss the rotary embedding and take minutes
(134 s on SmolLM2's optimum export) to find little; there ONNX Runtime's transformers optimizer
(:func:`ort_transformers_optimizer`, what such a user would otherwise ship) runs on the input
file instead, it fuses those graphs' rotary embeddings and residual + norm pairs, and only
onnxscript's FusedMatMul rules and the position-id fix follow (:func:`fuse_light`).

The whole-model ONNX Runtime check compares the fused, folded output against the unfused input,
so it covers the fusions too. Where a rewrite raises, the model is loaded again and folded
without fusions, with a note: the output is then the fold alone, never a half-fused graph.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from flashnorm_onnx.errors import first_line
from flashnorm_onnx.fusions.gqa import fuse_gqa, value_dtype
from flashnorm_onnx.fusions.gqa_legacy import fuse_gqa_legacy
from flashnorm_onnx.fusions.gqa_rotary import count_rotary_inside

logger = logging.getLogger(__name__)


def _failed(what: str, e: Exception) -> "FusionFailed":
    """``e`` (raised by a rewrite) as a one-line FusionFailed; the traceback goes to the debug log."""
    logger.debug("%s failed", what, exc_info=e)
    return FusionFailed(f"{type(e).__name__}: {first_line(e, 200)}")


class FusionFailed(Exception):
    """onnxscript's fusions raised on this graph (the model is left unusable: reload it)."""


def fuse_for_ort(model: ir.Model) -> tuple[ir.Model, dict[str, int]]:
    """Apply the exact ORT fusions to ``model`` in place; the model and the count of each applied."""
    try:
        return _fuse(model)
    except Exception as e:  # noqa: BLE001 - any failure falls back to the fold alone
        raise _failed("ORT fusions", e) from e


def _fuse(model: ir.Model) -> tuple[ir.Model, dict[str, int]]:
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import _core as ort_fusions

    # the steps of onnxscript's optimize_for_ort / fuse_xformers, without the attention fusions
    rewrite(model, [ort_fusions._gemm_to_matmul_add.gemm_to_matmul_add_rule])
    model = ort_fusions._pre_optimize(model)
    counts: dict[str, int] = {}
    steps = [
        ("erf_gelu", ort_fusions.fuse_erfgelu),
        ("rms_normalization", ort_fusions.fuse_rms_normalization),
        ("skip_layer_normalization", ort_fusions.fuse_skip_layer_normalization),
        ("skip_rms_normalization", ort_fusions.fuse_skip_rms_normalization),
        ("rotary_embedding", ort_fusions.fuse_rotary_embedding),
        ("cos_sin_cache", ort_fusions.fuse_cos_sin_cache),
    ]
    for name, fuse in steps:
        counts[name] = fuse(model)
    common_passes.CommonSubexpressionEliminationPass()(model)
    counts["partial_rotary_embedding"] = ort_fusions.fuse_partial_rotary_embedding(model)
    # grouped-query attention as GroupQueryAttention fed the mask as attention_bias and lengths
    # from shapes (fusions/gqa.py: exact for every mask); the rest as MultiHeadAttention with the
    # mask as an additive bias; never onnxscript's GQA rule, which drops the mask
    counts["sdpa"] = ort_fusions.fuse_sdpa(model, apply_shape_inference=True)
    counts["group_query_attention"] = fuse_gqa(model)
    counts["sdpa_via_mha"] = ort_fusions.replace_sdpa_by_mha(model)
    counts["gelu"] = ort_fusions.fuse_gelu(model)
    counts["bias_gelu"] = ort_fusions.fuse_bias_gelu(model)
    optimize(model)
    counts["position_ids_expanded"] = _expand_position_ids(model.graph)
    counts["fused_matmul"] = _fuse_matmuls(model)
    ir.passes.Sequential(
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
        common_passes.RemoveInitializersFromInputsPass(),
        common_passes.ShapeInferencePass(),
    )(model)
    return model, {name: int(n) for name, n in counts.items() if n}


def ort_transformers_optimizer(path) -> ir.Model:
    """ONNX Runtime's transformers optimizer on the file ``path`` (model_type gpt2, opt_level 0:
    graph fusions only, no ORT session optimizations baked in), as an in-memory ``ir.Model``.

    What such a user runs today. It recognises rotary embeddings and residual + norm forms of
    the legacy exporter and optimum that onnxscript's patterns miss. It loads the whole model
    (``--for-ort`` needs the whole-model check anyway, so the model fits in memory)."""
    import contextlib
    import io

    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as e:
        raise FusionFailed(f"ONNX Runtime's transformers optimizer is not available: {e}") from e
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its advice on num_heads
            optimized = optimize_model(str(path), model_type="gpt2", num_heads=0, hidden_size=0, opt_level=0)
        model = ir.serde.deserialize_model(optimized.model)
        if any(node.domain == "com.microsoft" for node in model.graph):
            model.opset_imports.setdefault("com.microsoft", 1)  # it fuses without importing the domain
        return model
    except Exception as e:  # noqa: BLE001
        raise _failed("ORT transformers optimizer", e) from e
    finally:
        quiet.setLevel(level)


def written_by_dynamo(model: ir.Model) -> bool:
    """torch.onnx's dynamo exporter marks its nodes (``pkg.torch.onnx.fx_node``); onnxscript's
    fusion patterns are written for those graphs."""
    for i, node in enumerate(model.graph):
        if "pkg.torch.onnx.fx_node" in node.metadata_props:
            return True
        if i > 500:
            break
    return False


def fuse_light(model: ir.Model, refusals: list[str] | None = None) -> dict[str, int]:
    """onnxscript's FusedMatMul/softmax rules and the position-id fix only: for a graph ORT's
    transformers optimizer already fused (the full onnxscript pipeline takes minutes on such
    graphs and finds nothing more)."""
    try:
        import onnx_ir.passes.common as common_passes

        # ORT's optimizer writes no value_info: the position ids' rank comes from inference
        common_passes.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        # position ids first: the attention node then reads the [B, S] ids its rotary is given
        counts = {"position_ids_expanded": _expand_position_ids(model.graph),
                  "rotary_cache_in_input_dtype": _rotary_cache_dtype(model.graph)}
        inside = count_rotary_inside(model)  # a genai builder's nodes already have it
        counts["group_query_attention"], why = fuse_gqa_legacy(model)
        if refusals is not None:
            refusals.extend(why)  # "Softmax name: reason", for the report
        counts["group_query_attention_rotary_inside"] = count_rotary_inside(model) - inside
        counts["fused_matmul"] = _fuse_matmuls(model)
    except Exception as e:  # noqa: BLE001
        raise _failed("light fusions", e) from e
    return {name: int(n) for name, n in counts.items() if n}


def _fuse_matmuls(model: ir.Model) -> int:
    """onnxscript's ORT pattern rules (MatMul + Transpose/scale as ``FusedMatMul``, softmax
    forms); returns how many ``FusedMatMul`` they added."""
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import _core as ort_fusions

    before = _count(model.graph, "FusedMatMul")
    rewrite(model, ort_fusions.ORT_PATTERN_REWRITE_RULES)
    return _count(model.graph, "FusedMatMul") - before


def new_ops(before: ir.Model, after: ir.Model) -> dict[str, int]:
    """com.microsoft operators ``after`` has beyond those ``before`` had, by type."""
    def count(model):
        out: dict[str, int] = {}
        for node in model.graph:
            if node.domain == "com.microsoft":
                out[node.op_type] = out.get(node.op_type, 0) + 1
        return out

    a, b = count(before), count(after)
    return {op: n - a.get(op, 0) for op, n in b.items() if n > a.get(op, 0)}


def fuse_after_fold(model: ir.Model) -> dict[str, int]:
    """The residual add + norm fusions once more, after the fold.

    The fold writes every decomposed chain it folds as one weightless fused norm. Chains that
    onnxscript's RMSNorm patterns do not recognise (the legacy exporter's, optimum's) reach the
    skip fusions only then: ``Add`` + ``SimplifiedLayerNormalization`` becomes
    ``SkipSimplifiedLayerNormalization``, exactly as ORT's transformers optimizer does."""
    try:
        from onnxscript.rewriter.ort_fusions import _core as ort_fusions

        counts = {
            "skip_rms_normalization": ort_fusions.fuse_skip_rms_normalization(model),
            "skip_layer_normalization": ort_fusions.fuse_skip_layer_normalization(model),
        }
        counts["fused_matmul"] = _fuse_matmuls(model)
    except Exception as e:  # noqa: BLE001
        raise _failed("post-fold fusions", e) from e
    return {name: int(n) for name, n in counts.items() if n}


def merge(*counts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for name, n in c.items():
            out[name] = out.get(name, 0) + n
    return out


def _count(graph: ir.Graph, op_type: str) -> int:
    return sum(1 for n in graph if n.op_type == op_type and n.domain == "com.microsoft")


def _expand_position_ids(graph: ir.Graph) -> int:
    """Give every fused ``RotaryEmbedding`` position ids of shape [batch, sequence].

    ORT's kernel refuses position ids whose first dimension is not the input's batch, while the
    unfused graph broadcast a [1, sequence] row over the batch. ``Expand(p, [B, S_p])`` with B the
    input's batch is that broadcast, written out; on ids that already have B rows it is a no-op.
    Returns the number of position-id values rewired."""
    done: dict[int, ir.Value] = {}
    for node in list(graph):
        if node.op_type != "RotaryEmbedding" or node.domain != "com.microsoft" or len(node.inputs) < 2:
            continue
        pos, x = node.inputs[1], node.inputs[0]
        if pos is None or x is None or pos.shape is None or len(pos.shape) != 2:
            continue
        if id(pos) not in done:
            def const(name: str, values: list[int]) -> ir.Value:
                return ir.Value(name=f"{pos.name}.{name}", const_value=ir.tensor(values, dtype=ir.DataType.INT64))

            nodes = []
            x_shape = ir.Node("", "Shape", [x], num_outputs=1, attributes=[ir.AttrInt64("end", 1)])
            p_shape = ir.Node("", "Shape", [pos], num_outputs=1,
                              attributes=[ir.AttrInt64("start", 1), ir.AttrInt64("end", 2)])
            target = ir.Node("", "Concat", [x_shape.outputs[0], p_shape.outputs[0]], num_outputs=1,
                             attributes=[ir.AttrInt64("axis", 0)])
            expand = ir.Node("", "Expand", [pos, target.outputs[0]], num_outputs=1)
            nodes = [x_shape, p_shape, target, expand]
            for i, n in enumerate(nodes):
                n.name = f"{pos.name}/flashnorm_expand_{i}"
                n.outputs[0].name = f"{pos.name}.flashnorm_expand_{i}"
            expand.outputs[0].dtype, expand.outputs[0].shape = pos.dtype, ir.Shape([None, pos.shape[1]])
            graph.insert_before(node, nodes)
            done[id(pos)] = expand.outputs[0]
        node.replace_input_with(1, done[id(pos)])
    return len(done)


def _rotary_cache_dtype(graph: ir.Graph) -> int:
    """Give every ``RotaryEmbedding``'s cos/sin cache its input's dtype.

    ORT's transformers optimizer writes the caches it fuses as float32 whatever the model's
    dtype, and ORT's kernel binds the input and both caches to one type, so an fp16 model's fused
    graph does not load. The unfused graph rounded cos/sin to the activations' dtype before
    using them; the cache cast to that dtype is that rounding. Returns the number of caches
    cast (each shared cache once)."""
    cast: dict[tuple[int, ir.DataType], ir.Value] = {}
    for node in graph:
        if node.op_type != "RotaryEmbedding" or node.domain != "com.microsoft" or len(node.inputs) < 4:
            continue
        dtype = value_dtype(node.inputs[0])  # inference stops at ORT's contrib norms: found upstream
        if dtype not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            continue
        for i in (2, 3):
            cache = node.inputs[i]
            if cache is None or not cache.is_initializer() or cache.const_value is None or cache.dtype == dtype:
                continue
            key = (id(cache), dtype)
            if key not in cast:
                name = f"{cache.name}.{dtype.name.lower()}"
                array = cache.const_value.numpy().astype(dtype.numpy())
                cast[key] = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(array.shape),
                                     const_value=ir.tensor(array, dtype=dtype, name=name))
                graph.register_initializer(cast[key])
            node.replace_input_with(i, cast[key])
    for cache_id, _ in cast:
        for value in list(graph.initializers.values()):
            if id(value) == cache_id and not list(value.uses()):
                graph.initializers.pop(value.name)
    return len(cast)


def describe(counts: dict[str, int]) -> str:
    if not counts:
        return "ORT fusions: none applied (no pattern matched)"
    return "ORT fusions applied: " + ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))
