"""Shared fixtures: every test gets its own empty SPARCODE_HOME and no mirror from the environment."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import sparcode_cli  # noqa: F401  # pins the CPU kernels (cpu_kernels.py) before any test module imports torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("sparcode_home")
    monkeypatch.setenv("SPARCODE_HOME", str(home))
    monkeypatch.delenv("SPARCODE_MIRROR", raising=False)
    # Tests talk only to servers on 127.0.0.1: never through a proxy from the environment.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return home


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread for the test (small models: bit-stable sums, no thread start-up), then restored.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
