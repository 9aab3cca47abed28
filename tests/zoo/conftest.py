"""Fixtures for the zoo tests: a tiny fast build, and the real default zoo (slow)."""

from __future__ import annotations

import pytest

from mergesearch.zoo import Zoo, ZooConfig, build_zoo


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """``ZooConfig.tiny()`` built once per session (seconds)."""
    return build_zoo(tmp_path_factory.mktemp("zoo") / "tiny", config=ZooConfig.tiny(),
                     progress=False)


@pytest.fixture(scope="session")
def default_zoo() -> Zoo:
    """The real zoo, built once into the user cache (``$MERGESEARCH_ZOO`` to move it)."""
    return build_zoo(progress=False)
