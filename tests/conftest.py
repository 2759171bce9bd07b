"""Shared pytest fixtures: the network rig (real namespaces and OVS) and the real Kubernetes
control plane (etcd, kube-apiserver, kube-controller-manager from tests/controlplane).

When ``UNDERLAY_REQUIRE_RIG=1`` (set by ``.ci/run``) a missing rig is a failure, never a skip,
so CI cannot go green without running the integration and e2e tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.rig import Rig, rig_available

if TYPE_CHECKING:
    from tests.controlplane.cluster import Baseline, Kube
    from tests.controlplane.server import ControlPlane


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


@pytest.fixture(scope="session")
def controlplane() -> Iterator[tuple[ControlPlane, Baseline]]:
    """The real control plane, started once per test run (about 10 s; building the binaries
    first, when tests/controlplane/build.sh has not, takes minutes), and the baseline that
    :meth:`Kube.reset` returns the cluster to. Torn down by PID at the end of the run."""
    from tests.controlplane.cluster import Baseline
    from tests.controlplane.server import ControlPlane

    workdir = Path(tempfile.mkdtemp(prefix="underlay-controlplane-"))
    cp = ControlPlane(workdir)
    cp.start()
    try:
        yield cp, Baseline(cp.api_client())
    finally:
        cp.stop()
        if os.environ.get("UNDERLAY_KEEP_CONTROLPLANE") != "1":
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def kube(
    controlplane: tuple[ControlPlane, Baseline], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Kube]:
    """The shared control plane for one test, behind a fault proxy of its own (see
    tests/controlplane/cluster.py); what the test made is removed afterwards."""
    from tests.controlplane.cluster import Kube

    cp, baseline = controlplane
    k = Kube(cp, baseline, tmp_path_factory.mktemp("kube"))
    try:
        yield k
    finally:
        k.reset()
