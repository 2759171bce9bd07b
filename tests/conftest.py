"""Shared pytest fixtures: the network rig (real namespaces and OVS).

When ``UNDERLAY_REQUIRE_RIG=1`` (set by ``.ci/run``) a missing rig is a failure, never a skip,
so CI cannot go green without running the integration and e2e tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.rig import Rig, rig_available


def _need_rig() -> None:
    reason = rig_available()
    if reason is None:
        return
    if os.environ.get("UNDERLAY_REQUIRE_RIG") == "1":
        pytest.fail(f"rig required but unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture
def rig() -> Iterator[Rig]:
    """A fresh switch namespace; add nodes and pods with ``rig.add_node`` / ``rig.add_pod``."""
    _need_rig()
    r = Rig()
    try:
        yield r
    finally:
        r.close()
