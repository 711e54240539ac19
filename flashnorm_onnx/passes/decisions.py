"""What the fold decided for each normalization: the records the pass returns, and their summary."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Status = Literal["folded", "skipped", "already-weightless"]


@dataclasses.dataclass
class ConsumerRecord:
    op: str
    node: str
    weight: str
    action: str
    """'in place' (the weight was only read by this fold), 'untied copy' (a new tensor; the
    original keeps its other readers), or, for a reader of a tensor another reader writes first
    (of this norm, or of another norm with an equal scale: the two branches of a merged decoder),
    'shared in place' / 'shared copy'."""


@dataclasses.dataclass
class NormDecision:
    index: int
    name: str
    kind: str
    form: str
    status: Status
    reason: str = ""
    feeds: list[str] = dataclasses.field(default_factory=list)
    consumers: list[ConsumerRecord] = dataclasses.field(default_factory=list)
    rewritten_as: str = ""
    tensors_written: int = 0
    bytes_added: int = 0
    bytes_rewritten: int = 0
    shape_readers: int = 0

    def line(self, planned: bool = False) -> str:
        """``planned``: the words of an analysis that writes nothing (``inspect``: "would fold into")."""
        feeds = ", ".join(self.feeds) if self.feeds else "-"
        head = f"[{self.index:3d}] {self.form:<34s} {self.name}"
        if self.status == "folded":
            extra = f" -> {self.rewritten_as}" if self.rewritten_as else ""
            untied = sum(1 for c in self.consumers if c.action == "untied copy")
            tie = f", {untied} untied copy(ies) +{fmt_bytes(self.bytes_added)}" if untied else ""
            verb = "would fold into" if planned else "folded into"
            return f"{head}\n      {verb} {feeds}{tie}{extra}"
        if self.status == "already-weightless":
            return f"{head}\n      already weightless (scale is all ones): nothing to fold"
        return f"{head}\n      skipped: {self.reason}"



@dataclasses.dataclass
class FoldDecisions:
    """One :class:`NormDecision` per normalization, in graph order, and what they add up to."""

    decisions: list[NormDecision] = dataclasses.field(default_factory=list)

    @property
    def folded(self) -> int:
        return sum(d.status == "folded" for d in self.decisions)

    @property
    def skipped(self) -> int:
        return sum(d.status == "skipped" for d in self.decisions)

    @property
    def already(self) -> int:
        return sum(d.status == "already-weightless" for d in self.decisions)

    @property
    def tensors_written(self) -> int:
        return sum(d.tensors_written for d in self.decisions)

    @property
    def bytes_added(self) -> int:
        return sum(d.bytes_added for d in self.decisions)

    @property
    def bytes_rewritten(self) -> int:
        return sum(d.bytes_rewritten for d in self.decisions)

    def summary(self) -> dict[str, Any]:
        return {
            "norms": len(self.decisions),
            "folded": self.folded,
            "skipped": self.skipped,
            "already_weightless": self.already,
            "tensors_written": self.tensors_written,
            "bytes_rewritten": self.bytes_rewritten,
            "bytes_added_by_untying": self.bytes_added,
            "bytes_added_note": "new tensors: untied copies of shared weights, and LayerNorm biases created for linears that had none",
        }

    def summary_line(self, planned: bool = False) -> str:
        """``planned``: the words of an analysis that writes nothing (``inspect``)."""
        s = self.summary()
        folded, written = ("foldable", "tensors to write") if planned else ("folded", "tensors written")
        return (
            f"{s['norms']} norms: {s['folded']} {folded}, {s['skipped']} skipped, "
            f"{s['already_weightless']} already weightless; {s['tensors_written']} {written} "
            f"({fmt_bytes(s['bytes_rewritten'])} rewritten, {fmt_bytes(s['bytes_added_by_untying'])} "
            "added as untied copies or new biases)"
        )

    def text(self, planned: bool = False) -> str:
        return "\n".join([d.line(planned) for d in self.decisions] + [self.summary_line(planned)])


def fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
