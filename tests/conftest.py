"""Shared pytest fixtures: the network rig (real namespaces and OVS) and the API emulator.

When ``UNDERLAY_REQUIRE_RIG=1`` (set by ``.ci/run``) a missing rig is a failure, never a skip,
so CI cannot go green without running the integration and e2e tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.rig import Rig, rig_available

if TYPE_CHECKING:
    from tests.kube.emulator import Emulator


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


@pytest.fixture
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """A running Kubernetes API server emulator (tests/kube/emulator.py) on 127.0.0.1.

    ``apiserver.url`` is its address and ``apiserver.kubeconfig`` a kubeconfig for it, so code
    under test uses the real ``kubernetes`` client exactly as against a cluster.
    """
    from tests.kube.emulator import Emulator

    emu = Emulator()
    emu.start()
    emu.write_kubeconfig(tmp_path_factory.mktemp("apiserver") / "kubeconfig")
    try:
        yield emu
    finally:
        emu.stop()
