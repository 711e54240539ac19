"""Block-wise int4 weight quantization (``com.microsoft.MatMulNBits``) and its inverse.

What ``optimize --quantize int4`` and ``--requantize`` do to the weights, tensor by tensor.

Quantization (what ONNX Runtime's ``MatMulNBitsQuantizer`` does with its default RTN algorithm,
through the same C++ kernel, ``quantize_matmul_4bits``): a ``MatMul`` whose ``B [K, N]`` is a
constant float tensor becomes ``MatMulNBits(A, B_q, scales[, zero_points])``. Each column n is
cut along K into blocks of ``block_size`` rows (the last one zero-padded); block b of column n
stores 4-bit codes q and one scale s (and, asymmetric, a zero point z)::

    B[k, n]  ~=  (q[n, b, k mod block] - z[n, b]) * s[n, b]      with  b = k // block_size

z is 8 when symmetric (codes are signed int4 shifted to 0..15). Codes are packed two per byte,
low nibble first; zero points likewise along the blocks. :func:`dequantize` is the exact
inverse of this storage (it gives the values the kernel multiplies by), so a fold on an int4
model can work on the float weights the model really computes with.

Why our own pass and not ``MatMulNBitsQuantizer`` itself: that tool converts the whole
``ModelProto`` in memory; here each new tensor is an ``ir.LazyTensor`` computed when the model is
written, so memory stays at one weight at a time, as in the float fold. The arithmetic is ORT's
own kernel, and a test checks the result is byte-identical to ``MatMulNBitsQuantizer``'s.

Folding and int4: g rescales row k of ``B`` before the block-wise scales are chosen, so the fold
changes what quantization sees. ``benchmarks/RESULTS_int4.md`` measures the effect on SmolLM2's
perplexity; the default of ``--quantize`` follows that measurement (see :data:`FOLD_POLICIES`).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"

#: onnxruntime-genai's model builder defaults for int4 (``block_size`` 32, symmetric,
#: ``accuracy_level`` 4 = int8 activations, its CPU default).
GENAI_DEFAULTS = dict(block_size=32, symmetric=True, accuracy_level=4)

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one weight is (or is to be) quantized: what ``MatMulNBits`` records in its attributes
    and inputs."""

    bits: int = 4
    block_size: int = GENAI_DEFAULTS["block_size"]
    symmetric: bool = GENAI_DEFAULTS["symmetric"]
    accuracy_level: int = GENAI_DEFAULTS["accuracy_level"]

    def __post_init__(self):
        if self.bits != 4:
            raise ValueError("only 4-bit quantization is supported")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size must be a power of two >= 16, not {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy level must be 0..4, not {self.accuracy_level}")

    def describe(self) -> str:
        return (f"int{self.bits}, block {self.block_size}, {'symmetric' if self.symmetric else 'asymmetric'}, "
                f"accuracy level {self.accuracy_level}")

    @classmethod
    def of_node(cls, node: ir.Node) -> "QuantSpec":
        """The spec a ``MatMulNBits`` node was quantized with (symmetric: no zero-point input)."""
        attrs = node.attributes
        zero_points = len(node.inputs) > 3 and node.inputs[3] is not None
        return cls(bits=attrs["bits"].as_int() if "bits" in attrs else 4,
                   block_size=attrs["block_size"].as_int(),
                   symmetric=not zero_points,
                   accuracy_level=attrs["accuracy_level"].as_int() if "accuracy_level" in attrs else 0)


# -- the arithmetic ------------------------------------------------------------------------------

def quantize_weight(weight: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``B [K, N]`` (float32 or float16) -> (packed codes [N, blocks, block/2] uint8, scales
    [N, blocks] in B's dtype, zero points [N, ceil(blocks/2)] uint8), by ORT's kernel."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rows, cols = weight.shape
    blocks = -(-rows // spec.block_size)
    weight = np.ascontiguousarray(weight)
    if blocks * spec.block_size != rows:
        weight = np.pad(weight, ((0, blocks * spec.block_size - rows), (0, 0)))
    packed = np.zeros((cols, blocks, spec.block_size // 2), dtype=np.uint8)
    scales = np.zeros((cols, blocks), dtype=weight.dtype)
    zero_points = np.zeros((cols, (blocks + 1) // 2), dtype=np.uint8)
    quantize_matmul_4bits(packed, weight, scales, zero_points, spec.block_size, cols, rows, spec.symmetric)
    return packed, scales, zero_points


def dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int,
               block_size: int, dtype=np.float32) -> np.ndarray:
    """The float ``B [K, N]`` a ``MatMulNBits`` (4 bits) multiplies by, computed in float32 and
    returned in ``dtype`` (the scales' dtype: ORT dequantizes to it)."""
    blocks = -(-k // block_size)
    packed = np.asarray(packed, dtype=np.uint8).reshape(n, blocks, block_size // 2)
    codes = np.empty((n, blocks, block_size), dtype=np.float32)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    scales = np.asarray(scales).reshape(n, blocks).astype(np.float32)
    if zero_points is None:
        zero = np.float32(8.0)
    else:
        zp = np.asarray(zero_points, dtype=np.uint8).reshape(n, -1)
        both = np.empty((n, zp.shape[1] * 2), dtype=np.float32)
        both[:, 0::2] = zp & 0x0F
        both[:, 1::2] = zp >> 4
        zero = both[:, :blocks, None]
    values = (codes - zero) * scales[..., None]  # [N, blocks, block]
    return np.ascontiguousarray(values.reshape(n, blocks * block_size)[:, :k].T).astype(dtype, copy=False)


def step_ratio(weight: np.ndarray, back: np.ndarray, scales: np.ndarray, block_size: int) -> float:
    """max |back - weight| / |scale of its block| over the tensor: round-to-nearest int4 keeps
    each value within one step of its block (half a step inside the range, up to one where a
    code clips: the symmetric range is [-8, 7] steps, and an asymmetric zero point is rounded).
    Above :data:`MAX_STEP_RATIO`, the stored codes are not a quantization of that weight."""
    k, n = weight.shape
    s = np.abs(np.asarray(scales, dtype=np.float32).reshape(n, -1)).T  # [blocks, N]
    step = np.repeat(s, block_size, axis=0)[:k]
    err = np.abs(np.asarray(back, dtype=np.float32) - np.asarray(weight, dtype=np.float32))
    # a 16-bit weight and scale round the dequantized value once more
    slack = 2.0 ** -10 * np.abs(np.asarray(weight, dtype=np.float32)) if weight.dtype == np.float16 else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(step > 0, (err - slack) / step, np.where(err - slack > 0, np.inf, 0.0))
    return float(max(0.0, ratio.max())) if ratio.size else 0.0


#: See :func:`step_ratio`: one step, with room for float32 rounding of the scale.
MAX_STEP_RATIO = 1.0 + 1e-3


def block_ranges(weight: np.ndarray, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), each [blocks, N]: the range ORT's kernel maps onto the int4 codes of each block of
    ``weight [K, N]`` (symmetric: [-max|w|, max|w|]; asymmetric: [min w, max w])."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    w = np.asarray(weight, dtype=np.float32)
    if blocks * block_size != k:
        w = np.pad(w, ((0, blocks * block_size - k), (0, 0)), mode="edge")  # padding changes no range
    w = w.reshape(blocks, block_size, n)
    if symmetric:
        m = np.abs(w).max(axis=1)
        return -m, m
    return w.min(axis=1), w.max(axis=1)


def clip_blocks(weight: np.ndarray, ratios, block_size: int, symmetric: bool) -> np.ndarray:
    """``weight [K, N]`` with each block's values clipped to ``ratio`` times its own range
    (:func:`block_ranges`); ``ratios`` is a scalar or [blocks, N]. Quantizing the result with ORT's
    kernel is round-to-nearest with that block's int4 range shrunk by the ratio (the values past
    it saturate): the clipping of AWQ-style searches, with ORT's own arithmetic."""
    k, n = weight.shape
    lo, hi = block_ranges(weight, block_size, symmetric)
    ratios = np.broadcast_to(np.asarray(ratios, dtype=np.float32), lo.shape)
    lo = np.repeat(lo * ratios, block_size, axis=0)[:k]
    hi = np.repeat(hi * ratios, block_size, axis=0)[:k]
    return np.clip(weight, lo.astype(weight.dtype), hi.astype(weight.dtype))


def relative_error(reference: np.ndarray, approx: np.ndarray) -> float:
    """||approx - reference|| / ||reference|| (Frobenius, float64)."""
    ref = np.asarray(reference, dtype=np.float64)
    den = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(np.asarray(approx, dtype=np.float64) - ref))
    return num / den if den > 0 else num


# -- lazy tensors: one weight in memory at a time ------------------------------------------------

class _Once:
    """Computes the three tensors of one weight's quantization once, for whichever is written
    first, and forgets them after the last one was taken (so memory holds one weight)."""

    def __init__(self, weight: ir.TensorProtocol, spec: QuantSpec, on_done=None, clip=None):
        self.weight, self.spec, self.on_done, self.clip = weight, spec, on_done, clip
        self.parts: dict[str, np.ndarray] | None = None
        self.left = {"packed", "scales", "zero_points"} if not spec.symmetric else {"packed", "scales"}

    def take(self, part: str) -> np.ndarray:
        if self.parts is None:
            w = self.weight.numpy()
            w2 = w.reshape(w.shape[-2], w.shape[-1])
            target = w2 if self.clip is None else clip_blocks(w2, self.clip, self.spec.block_size, self.spec.symmetric)
            packed, scales, zero_points = quantize_weight(target, self.spec)
            self.parts = {"packed": packed, "scales": scales, "zero_points": zero_points}
            if self.on_done is not None:
                self.on_done(target, packed, scales, zero_points, w2)
        out = self.parts[part]
        self.left.discard(part)
        if not self.left:
            self.parts = None
            self.weight = None
        return out


def _lazy(once: _Once, part: str, dtype: ir.DataType, shape: tuple[int, ...], name: str) -> ir.LazyTensor:
    return ir.LazyTensor(lambda: ir.Tensor(once.take(part), name=name), dtype=dtype, shape=ir.Shape(shape), name=name)


def _lazy_dequantized(node: ir.Node, k: int, n: int, block_size: int, dtype: ir.DataType, name: str) -> ir.LazyTensor:
    packed, scales = node.inputs[1].const_value, node.inputs[2].const_value
    zp = node.inputs[3].const_value if len(node.inputs) > 3 and node.inputs[3] is not None else None

    def compute() -> ir.Tensor:
        return ir.Tensor(dequantize(packed.numpy(), scales.numpy(), None if zp is None else zp.numpy(), k, n,
                                    block_size, dtype.numpy()), name=name)

    return ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape((k, n)), name=name)


# -- graph rewrites ------------------------------------------------------------------------------

def quantizable_weight(node: ir.Node) -> ir.Value | None:
    """``B`` of a ``MatMul`` that ``MatMulNBitsQuantizer`` would quantize: a float32/float16
    initializer of shape [K, N] (or with leading 1s), K at least 16; else None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    b = node.inputs[1]
    if b is None or b.const_value is None or not b.is_initializer() or b.dtype not in FLOAT_TYPES:
        return None
    shape = b.const_value.shape.numpy()
    if len(shape) < 2 or any(d != 1 for d in shape[:-2]) or shape[-2] < 16:
        return None
    if len(shape) > 2 and (node.inputs[0].shape is None or len(node.inputs[0].shape) < len(shape)):
        return None  # the output's rank would follow B's: keep the rule simple and leave it float
    return b


def _matmulnbits(graph: ir.Graph, node: ir.Node, weight: ir.Value, spec: QuantSpec, base: str,
                 on_done=None, node_name: str | None = None, shared: dict | None = None, clip=None) -> ir.Node:
    """Replace ``node`` (a MatMul reading ``weight``) by a MatMulNBits with lazily quantized
    tensors; returns the new node. ``shared``: id(weight) -> the int4 values already made for it
    (a weight several MatMuls read is quantized once, and stays shared). ``clip``: per-block clip
    ratios [blocks, N] (:func:`clip_blocks`), None for plain round-to-nearest."""
    shape = weight.const_value.shape.numpy()
    k, n = int(shape[-2]), int(shape[-1])
    blocks = -(-k // spec.block_size)
    made = shared.get(id(weight)) if shared is not None else None
    if made is None:
        once = _Once(weight.const_value, spec, on_done, clip)
        names = _unique_names(graph, base, ("_Q4", "_scales", "_zero_points"))
        parts = [("packed", ir.DataType.UINT8, (n, blocks, spec.block_size // 2)),
                 ("scales", weight.dtype, (n, blocks))]
        if not spec.symmetric:
            parts.append(("zero_points", ir.DataType.UINT8, (n, (blocks + 1) // 2)))
        made = []
        for (part, dtype, part_shape), name in zip(parts, names):
            value = ir.Value(name=name, shape=ir.Shape(part_shape), type=ir.TensorType(dtype),
                             const_value=_lazy(once, part, dtype, part_shape, name))
            graph.register_initializer(value)
            made.append(value)
        if shared is not None:
            shared[id(weight)] = made
    inputs = [node.inputs[0], *made]
    attributes = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", spec.bits),
                  ir.AttrInt64("block_size", spec.block_size)]
    if spec.accuracy_level:
        attributes.append(ir.AttrInt64("accuracy_level", spec.accuracy_level))
    if node_name is None and node.name:
        node_name = node.name + "_Q4"  # as MatMulNBitsQuantizer names it
    new = ir.Node(MS_DOMAIN, "MatMulNBits", inputs, attributes, num_outputs=1, name=node_name)
    _swap(graph, node, new)
    return new


def _swap(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put ``new`` where ``old`` is: same output name, type and readers; ``old`` leaves the graph
    and stops reading its inputs."""
    out_old, out_new = old.outputs[0], new.outputs[0]
    name = out_old.name
    out_new.shape, out_new.type = out_old.shape, out_old.type
    out_new.meta.update(out_old.meta)
    ir.convenience.replace_all_uses_with([out_old], [out_new], replace_graph_outputs=True)
    graph.insert_after(old, [new])
    graph.remove(old, safe=True)
    out_old.name = None
    out_new.name = name


def _unique_names(graph: ir.Graph, base: str, suffixes) -> list[str]:
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs if v.name} | {
        v.name for v in graph.inputs if v.name}
    names = []
    for suffix in suffixes:
        name, i = base + suffix, 1
        while name in taken:
            name, i = f"{base}{suffix}_{i}", i + 1
        taken.add(name)
        names.append(name)
    return names


def _drop_unused_initializers(graph: ir.Graph, values) -> None:
    for value in values:
        if value.name in graph.initializers and graph.initializers[value.name] is value and not value.uses() \
                and not value.is_graph_output():
            graph.initializers.pop(value.name)


@dataclasses.dataclass
class QuantizeStats:
    """What :func:`quantize_model` did; per-weight errors are filled in as the model is written."""

    spec: QuantSpec
    quantized: int = 0
    left_float: list[str] = dataclasses.field(default_factory=list)
    #: weight name -> relative error of the dequantized int4 weight against the float one
    weight_errors: dict[str, float] = dataclasses.field(default_factory=dict)
    #: weight name -> :func:`step_ratio` (filled as the model is written); for a clipped weight,
    #: against the weight clipped to its blocks' ranges (:func:`clip_blocks`)
    step_ratios: dict[str, float] = dataclasses.field(default_factory=dict)
    #: weight name -> per-block clip ratios [blocks, N] used (only the weights quantized with a clip)
    clips: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def bad_weights(self) -> list[str]:
        """Weights whose int4 codes are not a round-to-nearest of the float weight."""
        return [name for name, r in self.step_ratios.items() if not r <= MAX_STEP_RATIO]


def quantize_model(model: ir.Model, spec: QuantSpec, include=None, record_errors: bool = True,
                   clips: dict[str, np.ndarray] | None = None) -> QuantizeStats:
    """Rewrite every quantizable ``MatMul`` of the main graph (``include``: only nodes whose weight
    value is in this set) into ``MatMulNBits``. Tensors are computed when the model is written.
    ``clips``: weight name -> per-block clip ratios [blocks, N] (``--calibrate``'s search); the
    others are plain round-to-nearest."""
    graph = model.graph
    stats = QuantizeStats(spec)
    if MS_DOMAIN not in model.opset_imports:
        model.opset_imports[MS_DOMAIN] = 1
    replaced = []
    shared: dict[int, list] = {}
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = quantizable_weight(node)
        if weight is None:
            b = node.inputs[1] if len(node.inputs) > 1 else None
            if b is not None and b.const_value is not None:
                stats.left_float.append(node.name or (b.name or "?"))
            continue
        if include is not None and id(weight) not in include:
            continue
        name = weight.name or "weight"
        on_done = _error_recorder(stats, name, spec) if record_errors else None
        clip = (clips or {}).get(weight.name)
        if clip is not None and not np.all(clip == 1):
            stats.clips[name] = clip
        else:
            clip = None
        _matmulnbits(graph, node, weight, spec, name, on_done, shared=shared, clip=clip)
        stats.quantized += 1
        replaced.append(weight)
    _drop_unused_initializers(graph, replaced)
    return stats


def _error_recorder(stats, name: str, spec: QuantSpec):
    """Measures each weight as it is quantized (the float weight is in memory then): its relative
    error and its :func:`step_ratio`, the check that the codes quantize that weight."""

    def record(weight, packed, scales, zero_points, original=None) -> None:
        # weight: what was rounded (clipped to its blocks' ranges when a clip was chosen);
        # original: the float weight the int4 one stands for
        k, n = weight.shape
        back = dequantize(packed, scales, None if spec.symmetric else zero_points, k, n, spec.block_size)
        stats.weight_errors[name] = relative_error(weight if original is None else original, back)
        stats.step_ratios[name] = step_ratio(weight, back, scales, spec.block_size)

    return record


# -- --requantize: fold into an int4 model -------------------------------------------------------

@dataclasses.dataclass
class Dequantized:
    """A ``MatMulNBits`` turned into a float ``MatMul`` for the fold, and how to undo it."""

    original: ir.Node
    #: the original node's inputs (removing it from the graph detached them)
    inputs: list
    matmul: ir.Node
    weight: ir.Value
    spec: QuantSpec
    #: the lazily dequantized tensor ``weight`` held before the fold
    tensor: ir.TensorProtocol


def dequantize_for_fold(model: ir.Model) -> list[Dequantized]:
    """Replace each 4-bit ``MatMulNBits`` of the main graph (no bias, no g_idx, constant
    weights) by ``MatMul(A, B)`` with B the float weight it multiplies by, computed lazily."""
    graph = model.graph
    out = []
    for node in list(graph):
        if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN:
            continue
        if len(node.inputs) > 4 and any(v is not None for v in node.inputs[4:]):
            continue  # g_idx or bias: not a plain x @ B
        if any(v is None or v.const_value is None for v in node.inputs[1:3]) or (
                len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].const_value is None):
            continue
        try:
            spec = QuantSpec.of_node(node)
        except ValueError:
            continue
        if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].dtype != ir.DataType.UINT8:
            continue  # float zero points: leave it
        k, n = node.attributes["K"].as_int(), node.attributes["N"].as_int()
        dtype = node.inputs[2].dtype
        name = _unique_names(graph, (node.inputs[1].name or "w").removesuffix("_Q4") + "_dequantized", ("",))[0]
        value = ir.Value(name=name, shape=ir.Shape((k, n)), type=ir.TensorType(dtype),
                         const_value=_lazy_dequantized(node, k, n, spec.block_size, dtype, name))
        graph.register_initializer(value)
        inputs = list(node.inputs)
        matmul = ir.Node("", "MatMul", [node.inputs[0], value], num_outputs=1, name=node.name)
        _swap(graph, node, matmul)
        out.append(Dequantized(node, inputs, matmul, value, spec, value.const_value))
    return out


@dataclasses.dataclass
class RequantizeStats:
    requantized: int = 0
    restored: int = 0
    left_float: list[str] = dataclasses.field(default_factory=list)
    #: old int4 weights kept for their other readers (a tied embedding) beside the requantized copy
    untied: list[str] = dataclasses.field(default_factory=list)
    #: weight name -> :func:`step_ratio` of the new int4 weight against the folded float one
    step_ratios: dict[str, float] = dataclasses.field(default_factory=dict)

    def bad_weights(self) -> list[str]:
        return [name for name, r in self.step_ratios.items() if not r <= MAX_STEP_RATIO]
    #: weight name -> relative error of the new int4 weight against the folded float one
    weight_errors: dict[str, float] = dataclasses.field(default_factory=dict)


class RequantizeInconsistent(RuntimeError):
    """A weight the fold rewrote would have been put back unfolded (a bug, never written)."""


def requantize_after_fold(model: ir.Model, items: list[Dequantized], folded_weights=()) -> RequantizeStats:
    """After the fold: a MatMul whose weight the fold rewrote is quantized again with its node's
    spec; every other one gets its original ``MatMulNBits`` back, tensors untouched.

    ``folded_weights``: the names of the weights the fold reports it rewrote; a MatMul reading
    one of them is never put back as it was (its norm is weightless now)."""
    graph = model.graph
    folded_weights = set(folded_weights)
    stats = RequantizeStats()
    requantized = []
    for item in items:
        weight = item.matmul.inputs[1]
        # the fold either gives the MatMul a new weight value or rewrites the value's tensor in place
        if weight is item.weight and weight.const_value is item.tensor:
            if item.weight.name in folded_weights:
                raise RequantizeInconsistent(
                    f"the fold rewrote '{item.weight.name}' but its MatMulNBits would be put back unfolded")
            for value in item.inputs[1:]:
                # the fold's clean-up dropped them while no node read them
                if value is not None and value.name not in graph.initializers:
                    graph.register_initializer(value)
            restored = ir.Node(MS_DOMAIN, "MatMulNBits", [item.matmul.inputs[0], *item.inputs[1:]],
                               list(item.original.attributes.values()), num_outputs=1, name=item.original.name)
            _swap(graph, item.matmul, restored)
            stats.restored += 1
        elif quantizable_weight(item.matmul) is not weight:
            stats.left_float.append(item.original.name or weight.name or "?")  # not a constant [K, N]
        else:
            name = (item.inputs[1].name or "w").removesuffix("_Q4") + ".flashnorm"
            _matmulnbits(graph, item.matmul, weight, item.spec, name, _error_recorder(stats, name, item.spec),
                         node_name=item.original.name)
            _drop_unused_initializers(graph, [weight])
            stats.requantized += 1
            requantized.append(item)
        _drop_unused_initializers(graph, [item.weight])
    _drop_unused_initializers(graph, [v for item in items for v in item.inputs[1:] if v is not None])
    for item in requantized:
        old = item.inputs[1]
        if old is not None and old.name in graph.initializers and old.uses():
            # requantized, but its old int4 tensor has other readers (the genai builder's tied
            # embedding, GatherBlockQuantized): both are kept, as the float fold unties a weight
            stats.untied.append(old.name)
    return stats
