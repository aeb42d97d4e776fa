"""Fixtures of the fault tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import Harness


@pytest.fixture
def harnesses() -> Iterator[list[Harness]]:
    """Every harness a test builds; its processes are killed whatever the outcome."""
    made: list[Harness] = []
    yield made
    for harness in made:
        harness.stop_all()
