"""How large a verification case may be: its generated inputs against :func:`verification_cap`,
and the memory its runs need (estimated by :class:`flashnorm_onnx.verify.run_estimate.RunEstimator`) against
:func:`verification_run_cap`. :func:`fit_case` halves batch, tokens or past until a case fits, and
refuses, naming the largest tensor, when the sizes the model declares are already too large."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flashnorm_onnx.memory import available_memory
from flashnorm_onnx.verify.inputs import Case, InputSpec, input_shapes


#: Upper bound of the verification input cap (the smaller of this and available memory / 8).
VERIFY_CAP_MAX_BYTES = 1 << 30


def verification_cap() -> int:
    """Most bytes the generated inputs of one verification case may take: min(1 GiB, available / 8).

    The element cap is this / 4 (generation makes float64 temporaries). Tests monkeypatch this."""
    available = available_memory()
    return VERIFY_CAP_MAX_BYTES if available is None else max(1, min(VERIFY_CAP_MAX_BYTES, available // 8))


#: Upper bound of the verification memory cap (the smaller of this and available memory / 2).
VERIFY_RUN_CAP_MAX_BYTES = 2 << 30


def verification_run_cap() -> int:
    """Most bytes one verification case's runs may need, as estimated (:class:`RunEstimate`):
    min(2 GiB, available / 2). Half: the two models' sessions run one after the other, each
    holding its weights beside the values it creates. Tests monkeypatch this."""
    available = available_memory()
    return VERIFY_RUN_CAP_MAX_BYTES if available is None else max(1, min(VERIFY_RUN_CAP_MAX_BYTES, available // 2))


@dataclasses.dataclass(frozen=True)
class RunEstimate:
    """What running one case (both models, then comparing) needs, estimated from shape inference
    (see :class:`flashnorm_onnx.verify.run_estimate.RunEstimator`); values of unknown shape count nothing."""

    total: int
    """Bytes in all: ``peak`` + ``outputs`` (the input model's, held while the output model runs)
    + the comparison's float64 temporaries for the largest output."""
    peak: int
    """Bytes of the values alive at once during one run (inputs, live intermediates, outputs)."""
    outputs: int
    """Bytes of all graph outputs."""
    name: str
    """The largest single value's name, shape, element type and size."""
    shape: list
    dtype: str
    nbytes: int


def _feeds_size(specs: list[InputSpec], shapes: dict[str, list[int]]) -> tuple[int, int, str, int]:
    """Total elements and bytes of all inputs, and the largest input's name and bytes."""
    import math

    elements = total = biggest = 0
    name = ""
    for spec in specs:
        n = math.prod(shapes[spec.name])
        size = n * spec.dtype.itemsize
        elements, total = elements + n, total + size
        if size >= biggest:
            name, biggest = spec.name, size
    return elements, total, name, biggest


def _mb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


@dataclasses.dataclass(frozen=True)
class _Sizing:
    """What :func:`fit_case` measures a case with: its inputs' shapes from ``specs`` and ``dims``,
    against ``cap`` (bytes, and a quarter of it in elements), and the estimate of its runs (given
    ``estimate``) against ``run_cap``."""

    specs: list[InputSpec]
    dims: dict[str, int] | None
    estimate: Callable[[dict[str, list[int]]], RunEstimate | None] | None
    cap: int
    run_cap: int | None

    @property
    def max_elements(self) -> int:
        return self.cap // 4

    def size(self, c: Case) -> tuple:
        """(elements, bytes, largest input's name, its bytes, the run estimate or None) of a case."""
        shapes = input_shapes(self.specs, c, self.dims)
        run = self.estimate(shapes) if self.estimate is not None else None
        return (*_feeds_size(self.specs, shapes), run)

    def inputs_over(self, s) -> bool:
        return s[0] > self.max_elements or s[1] > self.cap

    def run_over(self, s) -> bool:
        return s[4] is not None and s[4].total > self.run_cap

    def over(self, s) -> bool:
        return self.inputs_over(s) or self.run_over(s)

    @staticmethod
    def key(s) -> tuple:
        return s[0], s[1], s[4].total if s[4] is not None else 0


def fit_case(specs: list[InputSpec], case: Case, dims: dict[str, int] | None = None,
             estimate: Callable[[dict[str, list[int]]], RunEstimate | None] | None = None,
             ) -> tuple[Case, str | None]:
    """The case, with its batch/tokens/past halved until all its inputs fit :func:`verification_cap`
    and, given ``estimate`` (input shapes -> :class:`RunEstimate` or None), until the memory its
    runs need fits :func:`verification_run_cap`.

    Returns the case and a note when it was reduced. Sizes the model declares (and ``--dim`` or
    config values) are never changed: when they alone exceed a cap, raises
    :class:`~flashnorm_onnx.errors.VerificationUnavailable`. Nothing is allocated."""
    sizing = _Sizing(specs, dims, estimate, cap=verification_cap(),
                     run_cap=verification_run_cap() if estimate is not None else None)
    first = sizing.size(case)
    if not sizing.over(first):
        return case, None
    reduced, current = _reduce(sizing, case, first)
    _refuse_if_over(sizing, reduced, current)
    return reduced, _reduction_note(sizing, case, reduced, first)


def _reduce(sizing: _Sizing, case: Case, current: tuple) -> tuple[Case, tuple]:
    """Halves, one at a time, the largest of batch/sequence/past whose halving makes the case
    smaller, until it fits or none does; returns the reduced case and its size."""
    reduced = case
    while sizing.over(current):
        best = None
        for field in ("batch", "sequence", "past"):
            value = getattr(reduced, field)
            if value <= 1:
                continue
            trial = dataclasses.replace(reduced, **{field: max(1, value // 2)})
            trial_size = sizing.size(trial)
            if sizing.key(trial_size) < sizing.key(current) and (best is None or value > best[0]):
                best = (value, trial, trial_size)
        if best is None:
            break
        _, reduced, current = best
    return reduced, current


def _refuse_if_over(sizing: _Sizing, reduced: Case, current: tuple) -> None:
    """:class:`~flashnorm_onnx.errors.VerificationUnavailable` when the reduced case is still over
    a cap (the input cap first), naming what is too large."""
    from flashnorm_onnx.errors import VerificationUnavailable

    given = {str(d) for s in sizing.specs for d in s.shape if not isinstance(d, int)} & set(sizing.dims or {})
    if sizing.inputs_over(current):
        raise VerificationUnavailable(_inputs_over_message(sizing, reduced, current, given))
    if sizing.run_over(current):
        run = current[4]
        hint = "set smaller sizes with --dim NAME=VALUE, " if given else ""
        raise VerificationUnavailable(
            f"running the check would create tensor '{run.name}' {list(run.shape)} of {_mb(run.nbytes)} "
            f"({run.dtype}); its runs need an estimated {_mb(run.total)}, over the verification memory cap of "
            f"{_mb(sizing.run_cap)} (min(2 GiB, available memory / 2)); {hint}skip the check with --no-verify "
            "or check piece by piece with --verify subgraph"
        )


def _inputs_over_message(sizing: _Sizing, reduced: Case, current: tuple, given: set[str]) -> str:
    """Why the reduced case's inputs are over the input cap: the largest input, all inputs, elements."""
    elements, total, name, biggest, _ = current
    spec = next(s for s in sizing.specs if s.name == name)
    shape = input_shapes(sizing.specs, reduced, sizing.dims)[name]
    what = f"input '{name}' {shape} is {_mb(biggest)} ({spec.dtype.name})"
    if total > biggest:
        what += f", all inputs {_mb(total)}"
    if elements > sizing.max_elements and total <= sizing.cap:
        what += f", {elements} elements (cap {sizing.max_elements})"
    hint = "set smaller sizes with --dim NAME=VALUE or skip the check with --no-verify" if given \
        else "skip the check with --no-verify"
    return (f"{what}: over the verification input cap of {_mb(sizing.cap)} (min(1 GiB, available memory / 8)); "
            f"{hint}")


def _reduction_note(sizing: _Sizing, case: Case, reduced: Case, first: tuple) -> str:
    """The note for a reduced case: which sizes changed, to fit which cap(s)."""
    changes = [f"{field} {getattr(case, field)} -> {getattr(reduced, field)}"
               for field in ("batch", "sequence", "past") if getattr(case, field) != getattr(reduced, field)]
    if sizing.inputs_over(first):
        what = f"the verification cap ({_mb(sizing.cap)})"
    else:
        what = f"the verification memory cap ({_mb(sizing.run_cap)})"
    if sizing.inputs_over(first) and sizing.run_over(first):
        what += f" and the verification memory cap ({_mb(sizing.run_cap)})"
    return f"{case.name}: input shapes reduced to fit {what}: " + ", ".join(changes)
