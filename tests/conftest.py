"""Shared fixtures: every test gets its own empty SPARCODE_HOME and no mirror from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("sparcode_home")
    monkeypatch.setenv("SPARCODE_HOME", str(home))
    monkeypatch.delenv("SPARCODE_MIRROR", raising=False)
    return home
