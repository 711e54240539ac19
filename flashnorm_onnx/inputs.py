"""Generate plausible inputs for a transformer exported to ONNX.

Used by verification (``optimize``) and by ``profile``. Inputs are recognised by their name
and type, symbolic dimensions by their name:

* token ids (``input_ids``, ``*ids``): integers within the embedding's range, read from the
  ``Gather`` that consumes them;
* ``attention_mask``: ones over past + current tokens; ``position_ids``/``cache_position``:
  positions after the past;
* past key/values (``past_key_values.*``, ``past.*``, ``cache*``): random values, with a past
  length that may be zero (an empty cache);
* onnxruntime-genai's ``seqlens_k`` / ``total_sequence_length``;
* any other float input (``pixel_values``, ``input_features``): standard normal.

Symbolic dimensions: names containing ``batch`` take the batch size, ``past`` the cache
length, ``total``/``+`` the sum, others (``sequence``, ``s17``...) the new-token count. Any can
be overridden with ``dims={"name": value}`` (``--dim name=value``).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

_PAST = re.compile(r"past|cache|present", re.I)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int = 1
    sequence: int = 8
    past: int = 0

    def describe(self) -> str:
        past = f", past {self.past}" if self.past else ""
        return f"{self.name}: batch {self.batch}, {self.sequence} tokens{past}"


@dataclasses.dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    shape: list  # ints, strings (symbolic) or None


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def specs_from_session(session) -> list[InputSpec]:
    specs = []
    for arg in session.get_inputs():
        dtype = _ORT_TYPES.get(arg.type)
        if dtype is None and arg.type == "tensor(bfloat16)":
            import ml_dtypes

            dtype = ml_dtypes.bfloat16
        if dtype is None:
            raise ValueError(f"input '{arg.name}' has unsupported type {arg.type}")
        specs.append(InputSpec(arg.name, np.dtype(dtype), list(arg.shape)))
    return specs


def has_past(specs: list[InputSpec]) -> bool:
    return any(_PAST.search(s.name) and s.dtype.kind == "f" for s in specs)


def default_cases(specs: list[InputSpec]) -> list[Case]:
    if has_past(specs):
        return [Case("prefill", batch=1, sequence=8, past=0), Case("decode", batch=1, sequence=1, past=5)]
    return [Case("batch2", batch=2, sequence=8, past=0), Case("batch1", batch=1, sequence=3, past=0)]


def _dim_value(dim, case: Case, dims: dict[str, int], position: int, spec: InputSpec) -> int:
    if isinstance(dim, int) and dim >= 0:
        return dim
    name = str(dim) if dim is not None else ""
    if name in dims:
        return dims[name]
    low = name.lower()
    total = case.past + case.sequence
    if "batch" in low:
        return case.batch
    if "+" in low or "total" in low or "all" in low:
        return total
    if "past" in low or ("cache" in low and ("len" in low or "seq" in low)):
        return case.past
    if low in ("kv_cache_dim", "head_size", "head_dim") and "head_size" in dims:
        return dims["head_size"]
    if low in ("", "none") or not name:
        # unnamed dynamic dim: batch first, then the sequence
        if position == 0:
            return case.batch
    if position == 0 and not ("seq" in low or "len" in low):
        return case.batch
    if "mask" in spec.name.lower() and position == len(spec.shape) - 1:
        return total
    return case.sequence


def make_feeds(
    specs: list[InputSpec],
    case: Case,
    dims: dict[str, int] | None = None,
    vocab: dict[str, int] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    dims = dims or {}
    vocab = vocab or {}
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = [_dim_value(d, case, dims, i, spec) for i, d in enumerate(spec.shape)]
        name = spec.name.lower()
        total = case.past + case.sequence
        if spec.dtype.kind == "f" or spec.dtype.name == "bfloat16":
            scale = 0.5 if _PAST.search(name) else 1.0
            feeds[spec.name] = (rng.standard_normal(shape) * scale).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = np.ones(shape, dtype=np.bool_)
        elif "mask" in name:
            feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
        elif "position" in name or "cache_position" in name:
            pos = np.arange(case.past, case.past + (shape[-1] if shape else 1))
            feeds[spec.name] = np.broadcast_to(pos, shape).astype(spec.dtype).copy() if shape else np.array(case.past, spec.dtype)
        elif "seqlens_k" in name:
            feeds[spec.name] = np.full(shape, total - 1, dtype=spec.dtype)
        elif "total_sequence_length" in name:
            feeds[spec.name] = np.array(total, dtype=spec.dtype).reshape(shape)
        elif "token_type" in name:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        else:
            high = vocab.get(spec.name)
            if high is None:
                high = 2 if "ids" in name else 1
            feeds[spec.name] = rng.integers(0, high, size=shape).astype(spec.dtype)
    return feeds


def vocab_sizes(model) -> dict[str, int]:
    """Upper bound for integer graph inputs that index an embedding (onnx-ir model)."""
    from flashnorm_onnx.passes.graph_utils import const_tensor

    bounds: dict[str, int] = {}
    for value in model.graph.inputs:
        if value.dtype is None or value.dtype.is_floating_point():
            continue
        frontier = [value]
        seen = set()
        while frontier:
            v = frontier.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            for use in v.uses():
                node = use.node
                if node.op_type in ("Gather", "GatherBlockQuantized") and use.idx == 1:
                    data = const_tensor(node.inputs[0])
                    if data is None and node.inputs[0].producer() is not None:
                        # Gather(Transpose(W)) or Gather(Cast(W)): look through it
                        src = node.inputs[0].producer().inputs[0]
                        data = const_tensor(src) if src is not None else None
                        if data is not None and node.inputs[0].producer().op_type == "Transpose":
                            n = int(data.shape[1])
                            bounds[value.name] = min(bounds.get(value.name, n), n)
                            continue
                    if data is not None:
                        axis = 0
                        if "axis" in node.attributes:
                            axis = node.attributes["axis"].value
                        n = int(data.shape[axis])
                        if node.op_type == "GatherBlockQuantized":
                            n = int(data.shape[0])
                        bounds[value.name] = min(bounds.get(value.name, n), n)
                elif node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity") and use.idx == 0:
                    frontier.extend(node.outputs)
    return bounds


def dims_from_configs(model_path) -> dict[str, int]:
    """Dimension values a runtime config beside the model states (genai's head_size, HF's head_dim)."""
    import json
    from pathlib import Path

    folder = Path(model_path).parent
    dims: dict[str, int] = {}
    try:
        genai = json.loads((folder / "genai_config.json").read_text())
        head = genai["model"]["decoder"]["head_size"]
        dims.update({"head_size": int(head), "kv_cache_dim": int(head)})
    except (OSError, KeyError, ValueError, TypeError):
        pass
    try:
        hf = json.loads((folder / "config.json").read_text())
        head = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        dims.setdefault("head_size", int(head))
        dims.setdefault("head_dim", int(head))
    except (OSError, KeyError, ValueError, TypeError, ZeroDivisionError):
        pass
    return dims
