"""Fixtures for the real-data task tests: an offline Hugging Face environment and a lookup of examples by meta."""
from __future__ import annotations

import pytest


@pytest.fixture
def offline_hf(monkeypatch, tmp_path):
    """No hub access; the HF home, datasets cache and fsearch token cache all live in this test's tmp_path.
    Real-data test modules use it for every test: `pytestmark = pytest.mark.usefixtures("offline_hf")`."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("FSEARCH_TASK_CACHE", str(tmp_path / "cache"))
    return monkeypatch


def _example_with(examples, **meta):
    return next(e for e in examples if all(e.meta[k] == v for k, v in meta.items()))


@pytest.fixture(scope="session")
def example_with():
    """example_with(examples, id=...) -> the first example whose meta has those values (StopIteration if none)."""
    return _example_with
