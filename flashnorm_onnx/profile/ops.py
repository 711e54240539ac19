"""Op-type profiling of one model on one shape: ORT's profiler, on a session of its own."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from flashnorm_onnx.verify.inputs import Case
from flashnorm_onnx.profile.measure import ModelInfo, feeds_for
from flashnorm_onnx.profile.opgroups import _norm_names, parse_profile
from flashnorm_onnx.profile.runner import Runner
from flashnorm_onnx.profile.sessions import Settings, make_session


def profile_ops(info: ModelInfo, case: Case, settings: Settings, vocab: dict[str, int],
                dims: dict[str, int] | None, runs: int) -> dict:
    """Per-op kernel time of one model on one shape (ORT profiler, on its own session)."""
    tmp = Path(tempfile.mkdtemp(prefix="flashnorm-prof-"))
    try:
        session = make_session(info.path, settings, profile_prefix=str(tmp / "ort"))
        runner = Runner(session, feeds_for(info, case, vocab, dims, settings.seed), settings, info.path)
        for _ in range(min(settings.warmup, 2)):
            runner.run()
        # the profile holds every run since the session started: leave out shape discovery and warm-up
        skip = (0 if settings.cuda_graph else 1) + min(settings.warmup, 2)
        for _ in range(runs):
            runner.run()
        profile_file = Path(session.end_profiling())
        result = parse_profile(profile_file, runs, _norm_names(info.path), skip_runs=skip)
        result["profiled_runs"] = result.pop("runs")
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
