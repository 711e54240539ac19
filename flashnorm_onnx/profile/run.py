"""Running a profile: the measuring process, the steps it takes, and the report it sends back."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np

from flashnorm_onnx.errors import FlashNormError, ProviderUnavailable, VerificationUnavailable, first_line
from flashnorm_onnx.memory import available_memory
from flashnorm_onnx.verify.inputs import Case, has_past, specs_from_session
from flashnorm_onnx.profile.machine import machine_info
from flashnorm_onnx.profile.measure import CHECK_GROWTH, ModelInfo
from flashnorm_onnx.profile.ops import profile_ops
from flashnorm_onnx.profile.rounds import measure_rounds, rounds_that_fit
from flashnorm_onnx.profile.sessions import (
    DEFAULT_BUDGET_S,
    DEFAULT_MAX_RUNS,
    DEFAULT_MIN_RUNS,
    DEFAULT_ROUNDS,
    DEFAULT_TARGET,
    Settings,
    creation_order,
    make_session,
    threading_description,
)
from flashnorm_onnx.profile.shapes import DEFAULT_SHAPES, parse_shape
from flashnorm_onnx.profile.stats import BOOTSTRAP_RESAMPLES, ESTIMATOR, ROUNDS_ESTIMATOR


def profile(
    baseline: str | Path,
    candidate: str | Path,
    shapes: list[Case] | None = None,
    providers: tuple[str, ...] = ("cpu",),
    runs: int | None = None,
    warmup: int = 5,
    ops: bool = False,
    ops_runs: int | None = None,
    cuda_graph: bool = False,
    fallback_cpu: bool = False,
    threads: int | None = None,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    skip_failing: bool = False,
    target: float = DEFAULT_TARGET,
    budget_s: float = DEFAULT_BUDGET_S,
    min_runs: int = DEFAULT_MIN_RUNS,
    max_runs: int = DEFAULT_MAX_RUNS,
    rounds: int = DEFAULT_ROUNDS,
) -> dict:
    """Measure A (baseline) against B (candidate); returns the report as a JSON-ready dict.

    Each shape is timed in ``rounds`` rounds, each on a fresh pair of sessions
    (:mod:`flashnorm_onnx.profile.rounds`). ``runs``: a fixed number of interleaved pairs per
    round; None (default) runs pairs until the 95% interval of B/A has a half-width of at most
    ``target`` (relative), or ``budget_s`` seconds per shape have passed, between ``min_runs`` and
    ``max_runs`` pairs (all three shared among the rounds).

    The sessions live in a fresh process (``spawn``): ORT's shared thread pool, which keeps the
    two sessions from taking each other's cores, is process-wide, and once it exists every
    session of that process must use it -- the caller's own sessions stay as they were. As with
    any ``spawn``, a script that calls this at import time must do so under
    ``if __name__ == "__main__":``.
    """
    log = log or (lambda _msg: None)
    _check_arguments(runs=runs, target=target, budget_s=budget_s, min_runs=min_runs, max_runs=max_runs,
                     warmup=warmup)
    if rounds < 1:
        raise ValueError("need at least 1 round")
    kwargs = dict(baseline=str(baseline), candidate=str(candidate), shapes=shapes, providers=tuple(providers),
                  runs=runs, warmup=warmup, ops=ops, ops_runs=ops_runs, cuda_graph=cuda_graph,
                  fallback_cpu=fallback_cpu, threads=threads, dims=dims, seed=seed, skip_failing=skip_failing,
                  target=target, budget_s=budget_s, min_runs=min_runs, max_runs=max_runs, rounds=rounds)
    return _run_in_worker(kwargs, log, progress)


def _check_arguments(*, runs: int | None, target: float, budget_s: float, min_runs: int, max_runs: int,
                     warmup: int) -> None:
    """ValueError for settings :func:`profile` cannot measure with."""
    if runs is not None and runs < 2:
        raise ValueError("--runs must be at least 2")
    if not (0 < target < 1) or budget_s <= 0 or min_runs < 2 or max_runs < min_runs:
        raise ValueError("need 0 < target < 1, budget > 0 and 2 <= min_runs <= max_runs")
    if warmup < 0:
        raise ValueError("--warmup must be >= 0")


def _run_in_worker(kwargs: dict, log: Callable[[str], None], progress: bool) -> dict:
    """Start :func:`_worker` in a fresh (``spawn``) process and relay its messages: log lines,
    the progress bar, then its report (returned) or its error (raised)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    worker = ctx.Process(target=_worker, args=(kwargs, send), daemon=True, name="flashnorm-profile")
    worker.start()
    send.close()
    bar = None
    try:
        while True:
            try:
                kind, value = receive.recv()
            except EOFError:
                worker.join(timeout=10)
                raise FlashNormError(f"the measuring process ended without a result (exit code {worker.exitcode}; "
                                     "out of memory?)") from None
            if kind == "log":
                log(value)
            elif kind == "total" and progress:
                import sys

                from tqdm import tqdm

                bar = tqdm(total=value, desc="measuring", unit="pair", file=sys.stderr, leave=False, disable=None)
            elif kind == "postfix" and bar is not None:
                bar.set_postfix_str(value)
            elif kind == "update" and bar is not None:
                bar.update(value)
            elif kind == "done":
                return value
            elif kind == "error":
                raise value
    finally:
        if bar is not None:
            bar.close()
        receive.close()
        worker.join(timeout=10)
        if worker.is_alive():
            worker.terminate()
            worker.join()


def _worker(kwargs: dict, conn) -> None:
    """Entry point of the measuring process: runs :func:`_profile_here`, sends back messages."""
    import pickle

    def send(kind, value):
        conn.send((kind, value))

    try:
        send("done", _profile_here(**kwargs, log=lambda m: send("log", m), tick=send))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the caller
        try:
            pickle.dumps(e)
        except Exception:
            e = FlashNormError(f"{type(e).__name__}: {first_line(e)}")
        send("error", e)
    finally:
        conn.close()


def _profile_here(
    *,
    baseline: str | Path,
    candidate: str | Path,
    shapes: list[Case] | None = None,
    providers: tuple[str, ...] = ("cpu",),
    runs: int | None = None,
    warmup: int = 5,
    ops: bool = False,
    ops_runs: int | None = None,
    cuda_graph: bool = False,
    fallback_cpu: bool = False,
    threads: int | None = None,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
    tick: Callable[[str, object], None] = lambda _kind, _value: None,
    skip_failing: bool = False,
    target: float = DEFAULT_TARGET,
    budget_s: float = DEFAULT_BUDGET_S,
    min_runs: int = DEFAULT_MIN_RUNS,
    max_runs: int = DEFAULT_MAX_RUNS,
    rounds: int = DEFAULT_ROUNDS,
) -> dict:
    """:func:`profile`'s work, in the measuring process. ``tick(kind, value)`` reports progress:
    ("total", pairs or None), ("postfix", text), ("update", pairs)."""
    shapes = shapes or [parse_shape(s) for s in DEFAULT_SHAPES]
    paths, vocab, weight_bytes = _model_paths_and_vocab(baseline, candidate)
    report = _new_report(paths, providers=providers, runs=runs, warmup=warmup, cuda_graph=cuda_graph,
                         threads=threads, seed=seed, dims=dims, target=target, budget_s=budget_s, min_runs=min_runs,
                         max_runs=max_runs, rounds=rounds)
    sessions = []
    todo = []
    for provider in providers:
        settings = Settings(provider=provider, runs=runs, warmup=warmup, cuda_graph=cuda_graph and provider == "cuda",
                            threads=threads, seed=seed, target=target, budget_s=budget_s, min_runs=min_runs,
                            max_runs=max_runs, rounds=rounds)
        report["settings"]["threading"] = threading_description(settings)
        opened = _open_pair(paths, settings, providers, fallback_cpu, report, log)
        if opened is None:
            continue
        settings, models = opened
        settings, note = rounds_that_fit(settings, weight_bytes, available_memory())
        if note:
            report["notes"].append(note)
            log(f"note: {note}")
        for m in models:
            sessions.append(m.session)
            report["models"][m.label].setdefault("providers", {})[settings.provider] = m.session.get_providers()
        todo += [(settings, models, case) for case in _cases_to_time(models, settings, shapes, report)]
    report["machine"] = machine_info("cuda" if "cuda" in providers else "cpu", sessions)
    if report["machine"]["gpu"]:
        gpu = report["machine"]["gpu"]
        log(f"GPU: {gpu['name']}, driver {gpu['driver']}")

    tick("total", len(todo) * runs if runs else None)
    for settings, models, case in todo:
        _measure_case(report, settings, models, case, vocab, dims, ops=ops, ops_runs=ops_runs,
                      skip_failing=skip_failing, log=log, tick=tick)
    note = session_effect_note(report["results"])
    if note:
        report["notes"].append(note)
        log(f"note: {note}")
    return report


SESSION_EFFECT = 0.05
"""How far apart two sessions of one file ran on a quiet machine (docs/profile.md): a claimed
difference smaller than this is flagged as not resolved by one run."""


def session_effect_note(results: list[dict]) -> str | None:
    """A note for the shapes timed on one session pair (``rounds`` 1) whose verdict claims a
    difference smaller than :data:`SESSION_EFFECT` (with more rounds the interval holds it)."""
    small = [f"{r['shape']} ({r['provider']})" for r in results
             if r["ratio"]["verdict"] != "no significant difference" and r["ratio"].get("rounds", 1) == 1
             and abs(np.log(r["ratio"]["estimate"])) < np.log1p(SESSION_EFFECT)]
    if not small:
        return None
    return (f"B/A within {SESSION_EFFECT:.0%} of 1 at {', '.join(small)}: two sessions of one file differed in "
            "speed by a few percent on a quiet machine, by their order of creation (docs/profile.md), which one "
            "session pair's interval cannot see: use --rounds 4 (the default) or more")


def _model_paths_and_vocab(baseline: str | Path, candidate: str | Path) -> tuple[dict[str, Path], dict[str, int], int]:
    """The checked paths of A and B, the vocabulary sizes read from A, and the tensor bytes of A and
    B together (what a pair of sessions holds)."""
    from flashnorm_onnx.io import model_io
    from flashnorm_onnx.verify.inputs import vocab_sizes

    infos = {label: model_io.check_input(p) for label, p in (("A", baseline), ("B", candidate))}
    vocab = vocab_sizes(model_io.load(infos["A"]))
    return {label: info.path for label, info in infos.items()}, vocab, sum(i.tensor_bytes for i in infos.values())


def _new_report(paths: dict[str, Path], *, providers: tuple[str, ...], runs: int | None, warmup: int,
                cuda_graph: bool, threads: int | None, seed: int, dims: dict[str, int] | None, target: float,
                budget_s: float, min_runs: int, max_runs: int, rounds: int = DEFAULT_ROUNDS) -> dict:
    """The report before anything is measured: tool, models, settings, and empty result lists."""
    from flashnorm_onnx import __version__

    return {
        "tool": "flashnorm-onnx profile",
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "models": {"A": {"path": str(paths["A"]), "role": "baseline"},
                   "B": {"path": str(paths["B"]), "role": "candidate"}},
        "settings": {"runs": runs if runs is not None else "adaptive", "target_half_width": target,
                     "budget_s_per_shape": budget_s, "min_runs": min_runs, "max_runs": max_runs, "warmup": warmup,
                     "providers": list(providers), "cuda_graph": cuda_graph, "io_binding": True, "threads": threads,
                     "seed": seed, "rounds": rounds,
                     "order": ("interleaved in units of two pairs, A B + B A or B A + A B, at random and afresh in "
                               "every run; each round on a fresh pair of sessions, created in the opposite order to "
                               "the round before (the first at random); garbage collector off"),
                     "estimator": ROUNDS_ESTIMATOR if rounds > 1 else ESTIMATOR, "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
                     "stopping": f"in each round: target checked at pair counts growing {CHECK_GROWTH:g}x from "
                                 "its min_runs; budget checked after every ABBA unit from there (rounds share "
                                 "budget, min_runs and max_runs)", "dims": dims or {}},
        "machine": None,
        "results": [],
        "skipped": [],
        "ops": [],
        "notes": [],
    }


def _load_pair(paths: dict[str, Path], settings: Settings, order: tuple[str, str] | None = None) -> list[ModelInfo]:
    """Sessions of A and B on ``settings.provider``, created in ``order`` (default:
    :func:`creation_order`, at random); returned as [A, B]."""
    models = {}
    for rank, label in enumerate(order or creation_order()):
        session = make_session(paths[label], settings)
        models[label] = ModelInfo(label, paths[label], session, specs_from_session(session), created=rank)
    return [models["A"], models["B"]]


def _open_pair(paths: dict[str, Path], settings: Settings, providers: tuple[str, ...], fallback_cpu: bool,
               report: dict, log: Callable[[str], None]) -> tuple[Settings, list[ModelInfo]] | None:
    """The settings and sessions A and B are measured with. With ``fallback_cpu``, a CUDA provider
    that does not load is noted and CPU is used instead; None when CPU is among ``providers``
    anyway."""
    try:
        return settings, _load_pair(paths, settings)
    except ProviderUnavailable as e:
        if not (settings.provider == "cuda" and fallback_cpu):
            raise
        note = f"{e} -- measuring on CPU instead (--fallback-cpu)"
        report["notes"].append(note)
        log(f"warning: {note}")
        if "cpu" in providers:
            return None
        settings = dataclasses.replace(settings, provider="cpu", cuda_graph=False)
        return settings, _load_pair(paths, settings)


def _cases_to_time(models: list[ModelInfo], settings: Settings, shapes: list[Case], report: dict) -> list[Case]:
    """The shapes these models can be timed on; the others go to ``report["skipped"]`` with the reason.

    A decode step with a past is timed only when every model takes a KV cache: a model without one
    would be fed a plain prefill of the new tokens, a different (and much cheaper) computation."""
    without = [m.label for m in models if not has_past(m.specs)]
    cases = []
    for case in shapes:
        if case.past and without:
            which = "the model has" if len(models) == 1 else (
                f"model {without[0]} has" if len(without) == 1 else f"models {' and '.join(without)} have")
            reason = f"{which} no KV-cache inputs: a decode step with a past cannot be timed"
            report["skipped"].append({"shape": case.name, "provider": settings.provider, "reason": reason})
            continue
        cases.append(case)
    return cases


def _measure_case(report: dict, settings: Settings, models: list[ModelInfo], case: Case, vocab: dict[str, int],
                  dims: dict[str, int] | None, *, ops: bool, ops_runs: int | None, skip_failing: bool,
                  log: Callable[[str], None], tick: Callable[[str, object], None]) -> None:
    """Time A against B on one shape (and with ``ops``, profile their op types) into ``report``."""
    tick("postfix", f"{case.name} {settings.provider}")
    paths = {m.label: m.path for m in models}
    try:
        result = measure_rounds(models, case, settings, vocab, dims,
                                lambda order: _load_pair(paths, settings, order),
                                progress=lambda n: tick("update", n))
    except VerificationUnavailable as e:
        if not skip_failing:
            raise
        report["skipped"].append({"shape": case.name, "provider": settings.provider, "reason": str(e)})
        return
    report["results"].append(result)
    log(f"{case.name} ({settings.provider}): {result['pairs']} pairs, stopped by {result['stopped']}")
    if result["load"]["competed"]:
        note = (f"{case.name} ({settings.provider}): other processes kept "
                f"{result['load']['other_cores_busy']:.2f} cores busy while measuring (load average "
                f"{result['load']['load_before']} before, {result['load']['load_after']} after); "
                "the numbers may be disturbed")
        report["notes"].append(note)
        log(f"warning: {note}")
    if ops:
        n = ops_runs or max(3, min(result["pairs"], 10))
        entry = {"shape": case.name, "provider": settings.provider, "batch": case.batch,
                 "sequence": case.sequence, "past": case.past}
        for m in models:
            entry[m.label] = profile_ops(m, case, settings, vocab, dims, n)
        report["ops"].append(entry)
