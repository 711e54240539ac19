"""Verification cases in words: a padded mask's rows (``left-padded by 3``), what a merged
decoder's branch flag was fed, and a case's inputs as one line, with inputs of one shape grouped
(``past_key_values.{0..29}.{key,value}[2, 3, 4, 64]``)."""

from __future__ import annotations

import re

import numpy as np

from flashnorm_onnx.verify.inputs import Case, InputSpec, has_past, is_branch_flag


def describe_rows(mask: np.ndarray) -> str:
    """A [batch, total] mask's rows in words: ``left-padded by 3, right-padded by 3, 1 real token``."""
    words = []
    for row in np.asarray(mask) != 0:
        masked = int((~row).sum())
        lead = int(np.argmax(row)) if row.any() else row.size
        trail = int(np.argmax(row[::-1])) if row.any() else row.size
        if masked == 0:
            words.append("unpadded")
        elif row.sum() == 1 and row.size > 1:
            words.append("1 real token")
        elif lead == masked:
            words.append(f"left-padded by {masked}")
        elif trail == masked:
            words.append(f"right-padded by {masked}")
        else:
            words.append(f"{masked} masked")
    return ", ".join(words)


def branch_note(specs: list[InputSpec], case: Case, feeds: dict | None = None) -> str | None:
    """What a case fed a merged decoder's branch flag, for its case line (None: no flag):
    ``use_cache_branch=False (the no-past branch; past inputs empty, as optimum feeds them)``."""
    flags = [s.name for s in specs if is_branch_flag(s)]
    if not flags:
        return None
    value = bool(np.asarray(feeds[flags[0]]).all()) if feeds and flags[0] in feeds else case.use_cache
    fed = ", ".join(f"{name}={value}" for name in flags)
    if not has_past(specs):
        return f"{case.name}: fed {fed}"
    if value:
        return f"{case.name}: fed {fed} (the with-past branch)"
    return f"{case.name}: fed {fed} (the no-past branch; past inputs empty, as optimum feeds them)"


#: Width a verification case line is summarised to (a terminal's; the report indents it by 8).
CASE_WIDTH = 120


_NUMBER = re.compile(r"\d+")


_TOKEN = re.compile(r"\{[^}]*\}|[^./{}]+|[./]")


def _numbers(values: list[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``{0..3,7}``."""
    values = sorted(set(values))
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    parts = [f"{r[0]}..{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs]
    return "{" + ",".join(parts) + "}"


def _merge_numbers(items: list[tuple[str, tuple]]) -> list[tuple[str, tuple]]:
    """Names that differ only in one number and have the same shape become one
    (``past_key_values.0.key`` ... ``past_key_values.29.key`` -> ``past_key_values.{0..29}.key``)."""
    groups: dict[tuple, list[tuple[str, ...]]] = {}
    order: list[tuple] = []
    for name, shape in items:
        nums = tuple(_NUMBER.findall(name))
        if any(n != str(int(n)) for n in nums):  # leading zeros: keep the name as it is
            key = (name, None, shape)
        else:
            key = (_NUMBER.sub("\0", name), len(nums), shape)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(nums)
    out: list[tuple[str, tuple]] = []
    for key in order:
        template, count, shape = key
        members = groups[key]
        varying = [i for i in range(count or 0) if len({m[i] for m in members}) > 1]
        if count is None or len(members) == 1 or len(varying) != 1:
            # one name, or several numbers varying at once: each name as it is
            out += [(_fill(template, nums), shape) for nums in members]
            continue
        i = varying[0]
        parts = list(members[0])
        parts[i] = _numbers([int(m[i]) for m in members])
        out.append((_fill(template, parts), shape))
    return out


def _fill(template: str, parts) -> str:
    it = iter(parts)
    return "".join(next(it) if piece == "\0" else piece for piece in re.split("(\0)", template))


def _merge_words(items: list[tuple[str, tuple]]) -> list[tuple[str, tuple]]:
    """Names with the same shape that differ in one dot-separated part become one
    (``past_key_values.{0..29}.key`` and ``.value`` -> ``past_key_values.{0..29}.{key,value}``)."""
    merged: list[dict] = []  # tokens, shape, the position that differs (None: one name), its words
    for name, shape in items:
        tokens = _TOKEN.findall(name)
        if "".join(tokens) == name and len(tokens) > 1:  # a part of a dotted name, never a whole name
            for entry in merged:
                if entry["shape"] != shape or len(entry["tokens"]) != len(tokens):
                    continue
                diff = [i for i, (a, b) in enumerate(zip(entry["tokens"], tokens)) if a != b]
                if len(diff) != 1 or tokens[diff[0]] in "./" or entry["at"] not in (None, diff[0]):
                    continue
                if entry["at"] is None:
                    entry["at"] = diff[0]
                    entry["words"].append(entry["tokens"][diff[0]])
                entry["words"].append(tokens[diff[0]])
                break
            else:
                merged.append({"tokens": tokens, "shape": shape, "at": None, "words": []})
        else:
            merged.append({"tokens": [name], "shape": shape, "at": None, "words": []})
    out = []
    for entry in merged:
        tokens = list(entry["tokens"])
        if entry["at"] is not None:
            tokens[entry["at"]] = "{" + ",".join(entry["words"]) + "}"
        out.append(("".join(tokens), entry["shape"]))
    return out


def summarize_inputs(shapes, width: int | None = None) -> str:
    """``name[shape]`` for each input, with the names of inputs of the same shape grouped
    (``past_key_values.{0..29}.{key,value}[2, 3, 4, 64]``). ``shapes``: a mapping or pairs of
    name and shape. With ``width``, cut to that many characters and say how many were left out."""
    items = [(str(name), tuple(int(d) for d in shape))
             for name, shape in (shapes.items() if hasattr(shapes, "items") else shapes)]
    parts = [f"{name}{list(shape)}" for name, shape in _merge_words(_merge_numbers(items))]
    text = ", ".join(parts)
    if width is None or len(text) <= width:
        return text
    for keep in range(len(parts) - 1, 0, -1):
        cut = ", ".join(parts[:keep]) + f", ... ({len(parts) - keep} more)"
        if len(cut) <= width:
            return cut
    return parts[0] + (f", ... ({len(parts) - 1} more)" if len(parts) > 1 else "")


def case_line(name: str, shapes, width: int = CASE_WIDTH) -> str:
    """A verification case as one line, ``NAME: in0[1, 8], in1[1, 8], ...`` from the shapes that
    ran; past ``width``, its inputs grouped by :func:`summarize_inputs` to fit."""
    items = list(shapes.items() if hasattr(shapes, "items") else shapes)
    text = f"{name}: " + ", ".join(f"{n}{list(s)}" for n, s in items)
    if len(text) <= width:
        return text
    return f"{name}: {summarize_inputs(items, max(40, width - len(name) - 2))}"
