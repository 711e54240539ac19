"""What the fold writes into the model it rewrote: one ``metadata_props`` entry.

Key ``flashnorm_onnx``, a JSON object::

    {"tool": "flashnorm-onnx", "version": "0.1.0",
     "runs": [{"norms": 5, "folded": 5, "skipped": 0, "folded_norms": ["model.norm.weight", ...]}]}

one entry in ``runs`` per fold that changed the model (a second run on a folded model changes
nothing and adds nothing). A later run, another tool, or a pipeline that composed
:class:`~flashnorm_onnx.passes.FlashNormFoldPass` in an ``onnx_ir.passes.PassManager`` (whose
result keeps only ``model`` and ``modified``, not the pass's report) reads it with :func:`read`.
onnx-ir keeps ``metadata_props`` through load and save, and ONNX Runtime ignores it.
"""

from __future__ import annotations

import json
from typing import Any

import onnx_ir as ir

KEY = "flashnorm_onnx"


def record(model: ir.Model, report) -> None:
    """Append this fold (a :class:`~flashnorm_onnx.pipeline.report.FoldReport`) to the model's entry."""
    from flashnorm_onnx import __version__

    entry = read(model) or {"tool": "flashnorm-onnx", "runs": []}
    entry["version"] = __version__
    entry["runs"].append({
        "norms": len(report.decisions),
        "folded": report.folded,
        "skipped": report.skipped,
        "folded_norms": [d.name for d in report.decisions if d.status == "folded"],
    })
    model.metadata_props[KEY] = json.dumps(entry, separators=(",", ":"))


def read(model) -> dict[str, Any] | None:
    """The entry of an ``ir.Model`` or ``onnx.ModelProto`` (None: never folded by this tool, or
    an entry that is not ours)."""
    if isinstance(model, ir.Model):
        text = model.metadata_props.get(KEY)
    else:
        text = next((p.value for p in model.metadata_props if p.key == KEY), None)
    if text is None:
        return None
    try:
        entry = json.loads(text)
    except ValueError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("runs"), list):
        return None
    return entry


def folded_norms(model) -> int:
    """How many norms this tool folded into the model, over all its runs (0: none)."""
    entry = read(model)
    return sum(int(run.get("folded", 0)) for run in entry["runs"]) if entry else 0
