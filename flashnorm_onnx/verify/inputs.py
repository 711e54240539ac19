"""Generate plausible inputs for a transformer exported to ONNX.

Used by verification (``optimize``) and by ``profile``. Inputs are recognised by their name
and type, symbolic dimensions by their name:

* token ids (``input_ids``, ``*ids``): integers within the embedding's range, read from the
  ``Gather`` that consumes them;
* ``attention_mask``: ones over past + current tokens, or in a padded case (``Case.rows``) zeros
  at the padded positions (see :func:`is_padding_mask`); ``position_ids``: what Hugging Face
  generates from the mask (``cumsum(mask) - 1``, padded positions 1), so positions after the past
  when nothing is padded; ``cache_position``: positions after the past;
* past key/values (``past_key_values.*``, ``past.*``, ``cache*``): random values, with a past
  length that may be zero (an empty cache);
* a merged decoder's branch flag (optimum's ``use_cache_branch``: see :func:`is_branch_flag`):
  True when the case has a past, else False, with every past input empty (what optimum feeds on
  the first step); other bool inputs: True;
* onnxruntime-genai's ``seqlens_k`` / ``total_sequence_length``;
* any other float input (``pixel_values``, ``input_features``): standard normal.

Symbolic dimensions: names containing ``batch`` take the batch size, ``past`` the cache
length, ``total``/``+`` the sum, in a decoder that cross-attends (``Case.encoder``) names
containing ``encoder`` the encoder's length, others (``sequence``, ``s17``...) the new-token
count. Any can be overridden with ``dims={"name": value}`` (``--dim name=value``).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

_PAST = re.compile(r"past|cache|present", re.I)


#: Row kinds of a padded attention mask (:func:`mask_rows`): ``left``: the first (T - 1) // 2
#: positions masked (in a decode step, the start of the past); ``right``: the last (T - 1) // 2;
#: ``one``: all but the last (one real token); ``full``: nothing masked.
ROW_KINDS = ("left", "right", "one", "full")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int = 1
    sequence: int = 8
    past: int = 0
    rows: tuple[str, ...] = ()
    """A padded case: the attention mask's row kinds (:data:`ROW_KINDS`), one per batch row (rows
    past the last take ``full``); empty: masks of ones."""
    branch: bool | None = None
    """The value fed to a merged decoder's branch flag; None: whether the case has a past."""
    encoder: int | None = None
    """The encoder's length in a decoder that cross-attends (dimensions named ``encoder*``);
    None: those dimensions are sized as any other."""

    def describe(self) -> str:
        past = f", past {self.past}" if self.past else ""
        return f"{self.name}: batch {self.batch}, {self.sequence} tokens{past}"

    @property
    def use_cache(self) -> bool:
        """What a branch flag (:func:`is_branch_flag`) is fed: ``branch``, else whether there is a past."""
        return self.past > 0 if self.branch is None else self.branch


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
    return any(_is_past(s) for s in specs)


def _is_past(spec: InputSpec) -> bool:
    return bool(_PAST.search(spec.name)) and spec.dtype.kind == "f"


_BRANCH = re.compile(r"branch|use_cache|use_past|with_past", re.I)


def is_branch_flag(spec: InputSpec) -> bool:
    """A merged decoder's branch flag: a bool input of at most one element whose name says it picks
    a branch or the cache (optimum's ``use_cache_branch`` [1] choosing, in an ``If``, between the
    decoder without past and the one with past)."""
    if spec.dtype != np.bool_ or not _BRANCH.search(spec.name):
        return False
    return all(isinstance(d, int) and d == 1 for d in spec.shape)


def is_padding_mask(spec: InputSpec) -> bool:
    """An attention mask a padded case pads: an integer or bool input named ``*mask*`` of rank 2 or
    more, whose last axis is symbolic (the total length: past + new tokens). An encoder's mask in a
    decoder (``encoder_attention_mask``, ``cross*``) is not: its positions are not the decoder's."""
    low = spec.name.lower()
    if "mask" not in low or "encoder" in low or "cross" in low or len(spec.shape) < 2:
        return False
    if not (spec.dtype.kind in "iu" or spec.dtype == np.bool_):
        return False
    return not isinstance(spec.shape[-1], int)


def _cross_attends(specs: list[InputSpec]) -> bool:
    """A decoder that reads an encoder's output: some symbolic dimension names the encoder and
    another a sequence that is not the encoder's (``decoder_sequence_length``)."""
    names = {str(d).lower() for s in specs for d in s.shape if isinstance(d, str)}
    encoder = any("encoder" in n for n in names)
    other = any(("seq" in n or "len" in n) and "encoder" not in n and "batch" not in n for n in names)
    return encoder and other


#: Length of the encoder output a cross-attending decoder's cases read (``encoder*`` dimensions).
ENCODER_LENGTH = 8

#: The padded prefill case's rows: a left-padded row, a right-padded row and a row of one real token.
PADDED_ROWS = ("left", "right", "one")

#: The padded decode step's rows: one left-padded past (zeros at its start), one unpadded.
PADDED_DECODE_ROWS = ("left", "full")


def default_cases(specs: list[InputSpec]) -> list[Case]:
    """The whole-model check's cases.

    * with a KV cache: ``prefill`` (an empty cache) and ``decode`` (one token on a past of 5);
      without: ``run1`` and ``run2``;
    * with an attention mask (:func:`is_padding_mask`): ``padded``, 3 rows of 7 tokens (one
      left-padded, one right-padded, one with a single real token), and with a KV cache
      ``padded-decode``, one token on a past of 6 whose first row has the start of its past masked;
    * with a branch flag (:func:`is_branch_flag`): both values, no past (False) and a past (True);
      without a KV cache, ``run2`` feeds True.
    """
    padded = any(is_padding_mask(s) for s in specs)
    if has_past(specs):
        cases = [Case("prefill", batch=1, sequence=8, past=0), Case("decode", batch=1, sequence=1, past=5)]
        if padded:
            cases += [Case("padded", batch=3, sequence=7, past=0, rows=PADDED_ROWS),
                      Case("padded-decode", batch=2, sequence=1, past=6, rows=PADDED_DECODE_ROWS)]
    else:
        # named by order, not by size: --dim (and a model's fixed sizes) decide the shapes that run,
        # which the case line then lists
        flag = True if any(is_branch_flag(s) for s in specs) else None
        cases = [Case("run1", batch=2, sequence=8, past=0), Case("run2", batch=1, sequence=3, past=0, branch=flag)]
        if padded:
            cases.append(Case("padded", batch=3, sequence=7, past=0, rows=PADDED_ROWS))
    if _cross_attends(specs):
        cases = [dataclasses.replace(c, encoder=ENCODER_LENGTH) for c in cases]
    return cases


def mask_rows(rows: tuple[str, ...], batch: int, total: int) -> np.ndarray:
    """The [batch, total] 0/1 mask of a padded case's rows (:data:`ROW_KINDS`; rows past the last
    given: ``full``). The last position is never masked (it is the newest token)."""
    mask = np.ones((batch, total), dtype=np.int64)
    half = max(0, (total - 1) // 2)
    for r, kind in enumerate(rows[:batch]):
        if kind not in ROW_KINDS:
            raise ValueError(f"unknown padded row kind {kind!r} (one of {', '.join(ROW_KINDS)})")
        if kind == "left":
            mask[r, :half] = 0
        elif kind == "right":
            mask[r, total - half:] = 0  # half 0: nothing (the slice [total:])
        elif kind == "one":
            mask[r, :total - 1] = 0
    return mask


def hf_position_ids(mask: np.ndarray) -> np.ndarray:
    """Position ids as Hugging Face's ``generate`` makes them from a [batch, total] mask:
    ``cumsum(mask) - 1``, with masked positions set to 1 (so an unpadded row counts 0, 1, 2...)."""
    pos = np.cumsum(mask != 0, axis=-1, dtype=np.int64) - 1
    pos[mask == 0] = 1
    return pos


def _is_image(spec: InputSpec) -> bool:
    """A rank-4 floating input of image pixels (``pixel_values``, ``images``, ``image``)."""
    low = spec.name.lower()
    return len(spec.shape) == 4 and (spec.dtype.kind == "f" or spec.dtype.name == "bfloat16") and (
        "pixel" in low or "image" in low)


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
    if case.encoder is not None and "encoder" in low:
        # a cross-attending decoder: the encoder's length; its past inputs are empty on the no-past
        # branch of a merged decoder, as optimum feeds them
        return 0 if _is_past(spec) and not case.use_cache else case.encoder
    if "+" in low or "total" in low or "all" in low:
        return total
    if "past" in low or ("cache" in low and ("len" in low or "seq" in low)):
        return case.past
    if low in ("kv_cache_dim", "head_size", "head_dim") and "head_size" in dims:
        return dims["head_size"]
    if _is_image(spec) and position in (1, 2, 3):
        # NCHW pixels (optimum names the axes batch_size, num_channels, height, width): channels and
        # size from the model's config (dims_from_configs), else RGB at the ImageNet size
        if position == 1:
            return dims.get("num_channels", 3)
        return dims.get("height" if position == 2 else "width", dims.get("image_size", 224))
    if low in ("", "none") or not name:
        # unnamed dynamic dim: batch first, then the sequence
        if position == 0:
            return case.batch
    if position == 0 and not ("seq" in low or "len" in low):
        return case.batch
    if "mask" in spec.name.lower() and position == len(spec.shape) - 1:
        return total
    return case.sequence


def input_shapes(specs: list[InputSpec], case: Case, dims: dict[str, int] | None = None) -> dict[str, list[int]]:
    """The shape :func:`make_feeds` gives each input for this case (nothing allocated)."""
    dims = dims or {}
    return {spec.name: [_dim_value(d, case, dims, i, spec) for i, d in enumerate(spec.shape)] for spec in specs}


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
    shapes = input_shapes(specs, case, dims)
    padded = _padded_mask(specs, case, shapes)  # [batch, total], None when nothing is padded
    for spec in specs:
        shape = shapes[spec.name]
        name = spec.name.lower()
        total = case.past + case.sequence
        if spec.dtype.kind == "f" or spec.dtype.name == "bfloat16":
            scale = 0.5 if _PAST.search(name) else 1.0
            feeds[spec.name] = (rng.standard_normal(shape) * scale).astype(spec.dtype)
        elif is_branch_flag(spec):
            feeds[spec.name] = np.full(shape, case.use_cache, dtype=np.bool_)
        elif padded is not None and is_padding_mask(spec) and _fits(padded, shape):
            feeds[spec.name] = _broadcast_rows(padded, shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = np.ones(shape, dtype=np.bool_)
        elif "mask" in name:
            feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
        elif "position" in name and "cache_position" not in name and _positions(padded, shape) is not None:
            feeds[spec.name] = _positions(padded, shape).astype(spec.dtype)
        elif "position" in name or "cache_position" in name:
            pos = np.arange(case.past, case.past + (shape[-1] if shape else 1))
            feeds[spec.name] = np.broadcast_to(pos, shape).astype(spec.dtype).copy() if shape else np.array(case.past, spec.dtype)
        elif "seqlens_k" in name:
            if padded is not None and list(shape) == [padded.shape[0]]:
                # as onnxruntime-genai computes it: ReduceSum(mask) - 1
                feeds[spec.name] = (padded.sum(axis=-1) - 1).astype(spec.dtype)
            else:
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


def _padded_mask(specs: list[InputSpec], case: Case, shapes: dict[str, list[int]]) -> np.ndarray | None:
    """A padded case's [batch, total] mask (:func:`mask_rows`), sized from its first attention mask
    (:func:`is_padding_mask`): batch its first axis, total its last. None when the case is not
    padded or the model has no such mask."""
    if not case.rows:
        return None
    for spec in specs:
        if is_padding_mask(spec):
            shape = shapes[spec.name]
            return mask_rows(case.rows, shape[0], shape[-1])
    return None


def _fits(rows: np.ndarray | None, shape: list[int]) -> bool:
    """Whether [batch, n] ``rows`` broadcast into ``shape`` along its first (or, for rank 3 or more,
    second to last) and last axes."""
    if rows is None or len(shape) < 2 or shape[-1] != rows.shape[1]:
        return False
    return shape[0] == rows.shape[0] or shape[-2] == rows.shape[0]


def _positions(padded: np.ndarray | None, shape: list[int]) -> np.ndarray | None:
    """Position ids of ``shape`` for a padded case: Hugging Face's (:func:`hf_position_ids`) for the
    last ``shape[-1]`` positions of the mask (the new tokens); None when the case is not padded or
    the shape does not take them."""
    if padded is None or not shape or shape[-1] > padded.shape[1]:
        return None
    positions = hf_position_ids(padded)[:, padded.shape[1] - shape[-1]:]
    return _broadcast_rows(positions, shape) if _fits(positions, shape) else None


def _broadcast_rows(rows: np.ndarray, shape: list[int]) -> np.ndarray:
    """[batch, n] ``rows`` into ``shape``: [batch, ..., n] (a 4-D mask repeats each row over its
    middle axes), else [..., batch, n] (positions of a multi-section rotary, [3, batch, n])."""
    if shape[0] == rows.shape[0]:
        view = rows.reshape([rows.shape[0]] + [1] * (len(shape) - 2) + [rows.shape[1]])
    else:
        view = rows
    return np.broadcast_to(view, shape).copy()


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
    """Dimension values a runtime config beside the model states: genai's head_size, HF's head_dim,
    and for image inputs the channels and size (config.json ``num_channels`` / ``image_size``, or
    preprocessor_config.json ``crop_size`` / ``size``)."""
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
    except (OSError, ValueError):
        hf = {}
    try:
        head = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        dims.setdefault("head_size", int(head))
        dims.setdefault("head_dim", int(head))
    except (KeyError, ValueError, TypeError, ZeroDivisionError, AttributeError):
        pass
    # images (ViT, CLIP vision, ...): channels and size from config.json, else preprocessor_config.json
    vision = hf.get("vision_config", hf) if isinstance(hf, dict) else {}
    if isinstance(vision.get("num_channels"), int):
        dims.setdefault("num_channels", vision["num_channels"])
    size = vision.get("image_size")
    try:
        pre = json.loads((folder / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        pre = {}
    if size is None and isinstance(pre, dict):
        size = pre.get("crop_size") or pre.get("size")
    if isinstance(size, dict):
        size = [size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge"))]
    if isinstance(size, int):
        size = [size, size]
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        dims.setdefault("height", size[0])
        dims.setdefault("width", size[1])
    return dims
