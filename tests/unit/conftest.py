"""Fixtures shared by the reconciler's tests that need a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.controlplane.cluster import Kube
from tests.unit.test_apply import World


@pytest.fixture
def world(kube: Kube, tmp_path: Path) -> World:
    """A Git origin and the real control plane (see :class:`World`); what the test made in the
    cluster is removed by the ``kube`` fixture afterwards."""
    return World(kube, tmp_path)
