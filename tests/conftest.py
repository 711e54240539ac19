"""Shared pytest fixtures.

``build_fixture(name)`` (alias ``fixture_path``) builds one of the tiny exported models of
``models/fixtures.py`` (cached on disk under build/fixtures, or $FLASHNORM_FIXTURES, and in
memory for the session) and returns the path of its model.onnx. When a fixture cannot be
built in this environment (``FixtureUnavailable``: the genai recipes without .venv-genai) the
calling test is skipped. ``fixture_info(name)`` returns its fixture.json as a dict.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# What a run of the whole suite writes under the temporary directory at most (measured: 5.5 GB
# with every directory kept); a disk with less room free fails tests at random places.
SUITE_TEMP_BYTES = 6 * 1024**3


def pytest_sessionstart(session):
    """Say, before any test runs, when the disk has less room than the suite may write."""
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < SUITE_TEMP_BYTES:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        line = (f"WARNING: {free / 1024**3:.1f} GiB free under {tempfile.gettempdir()}, less than "
                f"the {SUITE_TEMP_BYTES / 1024**3:.0f} GiB this suite may write: tests may fail "
                "for want of disk")
        if reporter is not None:
            reporter.write_line(line, yellow=True, bold=True)


@pytest.fixture(scope="session")
def build_fixture():
    from models import fixtures

    cache: dict[str, Path | Exception] = {}

    def _build(name: str) -> Path:
        if name not in cache:
            try:
                cache[name] = fixtures.build(name)
            except fixtures.FixtureUnavailable as exc:
                cache[name] = exc
        result = cache[name]
        if isinstance(result, Exception):
            pytest.skip(f"fixture {name} unavailable: {result}")
        return result

    return _build


@pytest.fixture(scope="session")
def fixture_path(build_fixture):
    return build_fixture


@pytest.fixture(scope="session")
def fixture_info(build_fixture):
    def _info(name: str) -> dict:
        return json.loads((build_fixture(name).parent / "fixture.json").read_text())

    return _info
