"""The shapes to time: parsing ``--shape NAME=BATCHxTOKENS[,past=N]`` into a :class:`~flashnorm_onnx.verify.inputs.Case`."""

from __future__ import annotations

import re

from flashnorm_onnx.verify.inputs import Case


def parse_shape(text: str) -> Case:
    """``prefill=1x512`` -> Case(prefill, batch 1, 512 tokens); ``decode=1x1,past=1024``."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--shape expects NAME=BATCHxTOKENS[,past=N], got '{text}'")
    parts = rest.split(",")
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", parts[0])
    if not m:
        raise ValueError(f"--shape {text}: '{parts[0]}' is not BATCHxTOKENS (e.g. 1x512)")
    batch, seq = int(m.group(1)), int(m.group(2))
    past = 0
    for extra in parts[1:]:
        key, sep, value = extra.partition("=")
        if key.strip() != "past" or not sep or not value.strip().isdigit():
            raise ValueError(f"--shape {text}: unknown option '{extra}' (only past=N)")
        past = int(value)
    if batch < 1 or seq < 1:
        raise ValueError(f"--shape {text}: batch and tokens must be >= 1")
    return Case(name.strip(), batch=batch, sequence=seq, past=past)


DEFAULT_SHAPES = ("prefill=1x128", "decode=1x1,past=256")
