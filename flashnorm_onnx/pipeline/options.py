"""FoldOptions: every choice of a run, typed, grouped by concern, built once by the CLI or the API."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flashnorm_onnx.verify.policy import VERIFY_MODES

#: ``--quantize-order``: "fold-first" folds g into the float weights, then quantizes them;
#: "quantize-first" quantizes the weights as exported, then folds only the norms whose readers
#: stayed float (the int4 ones keep g in their norm, which costs nothing at run time).
QUANTIZE_ORDERS = ("quantize-first", "fold-first")
#: Measured on SmolLM2-135M (benchmarks/RESULTS_int4.md): see docs/int4.md.
DEFAULT_QUANTIZE_ORDER = "quantize-first"
PACK_LINEARS = ("attention", "all", "none")


@dataclasses.dataclass(frozen=True)
class FoldOptions:
    """What ``optimize`` does. Invalid combinations raise ``ValueError`` when it is built."""

    # -- the fold
    untie: bool = True
    """Fold into a new copy of a weight that is also read elsewhere (else skip that norm)."""
    keep_structure: bool = False
    """Keep decomposed norm chains (scale set to ones) instead of one fused kernel per norm."""
    for_ort: bool = False
    """First apply onnxscript's exact ONNX Runtime fusions, then fold the fused graph."""
    pack_linears: str = "attention"
    """With ``for_ort``, one of :data:`PACK_LINEARS`: which MatMuls reading one value are packed into
    one MatMul + Split. ``attention``: the Q/K/V projections a GroupQueryAttention then reads packed;
    ``all``: also every other group (gate/up); ``none``. (True/False mean ``all``/``none``.)"""

    # -- verification
    verify: bool = True
    verify_mode: str = "auto"
    """One of :data:`~flashnorm_onnx.verify.policy.VERIFY_MODES`."""
    dims: dict[str, int] | None = None
    """Sizes of symbolic input dimensions for the generated inputs (each at least 1)."""
    rtol: float | None = None
    verify_timeout: float | None = 600.0

    # -- int4
    quantize: Any = None
    """A :class:`~flashnorm_onnx.quantize.int4.QuantSpec`: the output is int4 (``MatMulNBits``)."""
    quantize_order: str | None = None
    """One of :data:`QUANTIZE_ORDERS` (None: :data:`DEFAULT_QUANTIZE_ORDER`)."""
    requantize: bool = False
    """The input is int4: fold into its dequantized weights and quantize them again."""
    calibrate: str | bool | None = None
    """With ``quantize``: activation-aware int4 (docs/int4.md). True: calibrate on the bundled text;
    a path: on that UTF-8 text file; None/False: plain round-to-nearest in ``quantize_order``."""
    calibration_tokenizer: str | None = None
    """``calibrate``: the ``tokenizer.json`` that reads the text (None: the one beside the model)."""

    # -- output
    force_write: bool = False
    """Write the output even when nothing was folded."""
    progress: Callable[[str, int, int], None] | None = dataclasses.field(default=None, compare=False)
    """``progress(stage, done, total)`` for long work ("fold", "write")."""

    def __post_init__(self) -> None:
        from flashnorm_onnx.io.model_io import check_dims

        if self.verify_mode not in VERIFY_MODES:
            raise ValueError(f"verify_mode must be one of {', '.join(VERIFY_MODES)}")
        if self.quantize is not None and self.requantize:
            raise ValueError("quantize and requantize exclude each other")
        if isinstance(self.pack_linears, bool):
            object.__setattr__(self, "pack_linears", "all" if self.pack_linears else "none")
        if self.pack_linears not in PACK_LINEARS:
            raise ValueError(f"pack_linears must be one of {', '.join(PACK_LINEARS)}")
        if self.pack_linears == "all" and not self.for_ort:
            raise ValueError("pack_linears applies with for_ort only")
        if self.calibrate not in (None, False) and self.quantize is None:
            raise ValueError("calibrate applies with quantize only")
        if self.quantize_order is None:
            object.__setattr__(self, "quantize_order", DEFAULT_QUANTIZE_ORDER)
        if self.quantize_order not in QUANTIZE_ORDERS:
            raise ValueError(f"quantize_order must be one of {', '.join(QUANTIZE_ORDERS)}")
        check_dims(self.dims)

    def replace(self, **changes) -> "FoldOptions":
        return dataclasses.replace(self, **changes)

    def progress_of(self, stage: str) -> Callable[[int, int], None] | None:
        """The progress callback of one stage, or None."""
        progress = self.progress
        return (lambda done, total: progress(stage, done, total)) if progress else None
