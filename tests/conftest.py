"""Shared pytest fixtures.

``build_fixture(name)`` (alias ``fixture_path``) builds one of the tiny exported models of
``models/fixtures.py`` (cached on disk under build/fixtures, or $FLASHNORM_FIXTURES, and in
memory for the session) and returns the path of its model.onnx. When a fixture cannot be
built in this environment (``FixtureUnavailable``: the genai recipes without .venv-genai) the
calling test is skipped. ``fixture_info(name)`` returns its fixture.json as a dict.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


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
