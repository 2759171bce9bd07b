"""Fixtures shared by the reconciler's unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_apply import World


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """A Git origin and an API emulator with the CRDs installed (see :class:`World`), stopped
    after the test."""
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.stop()
