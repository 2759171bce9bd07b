"""Rollout of an OvsBridge across three agents (real rig nodes, the API emulator): at most
``maxUnavailable`` nodes change at once, a Failing node aborts the rollout for the others
until the OvsBridge changes; the coordination goes through the API only (slot Leases and the
other nodes' enactments, see node_agent/rollout.py).

A watch on OvsBridgeEnactments, opened before the rollout starts, records every status the
agents write in the API server's order, so "how many nodes were Progressing at once" is read
from the API's own history rather than from timings.
"""

from __future__ import annotations

import datetime
import threading
from typing import Any

from kubernetes import client, watch

from reconciler import vocab
from tests.integration.test_agent import (
    DATA_IPS,
    World,
    node_state,
    ovs_bridge,
    wait_for,
    world_fixture,  # noqa: F401 - the ``world`` fixture
)
from tests.rig import DATA_GATEWAY

NODES = ("n1", "n2", "n3")


class Timeline:
    """Every enactment status of one OvsBridge, in the API server's order, as
    (node, True condition, observedGeneration)."""

    def __init__(self, api: client.ApiClient, bridge: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.bridge = bridge
        self.events: list[tuple[str, str | None, int | None]] = []
        self._stop = threading.Event()
        r = vocab.OVS_BRIDGE_ENACTMENT
        self._rv = self.custom.list_cluster_custom_object(r.group, r.version, r.plural)["metadata"][
            "resourceVersion"
        ]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        r = vocab.OVS_BRIDGE_ENACTMENT
        while not self._stop.is_set():
            w = watch.Watch()
            for ev in w.stream(
                self.custom.list_cluster_custom_object, r.group, r.version, r.plural,
                label_selector=f"{vocab.LABEL_ENACTMENT_BRIDGE}={self.bridge}",
                resource_version=self._rv, timeout_seconds=5,
            ):  # fmt: skip
                obj: dict[str, Any] = ev["object"]
                self._rv = obj["metadata"]["resourceVersion"]
                st = obj.get("status") or {}
                active = next(
                    (c["type"] for c in st.get("conditions") or [] if c["status"] == "True"), None
                )
                self.events.append((st.get("node", "?"), active, st.get("observedGeneration")))
                if self._stop.is_set():
                    w.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def max_progressing(self) -> int:
        """Most nodes Progressing at the same time."""
        state: dict[str, str | None] = {}
        most = 0
        for node, active, _gen in self.events:
            state[node] = active
            most = max(most, sum(1 for a in state.values() if a == "Progressing"))
        return most

    def progressing(self, node: str, generation: int) -> int:
        """How many times ``node`` started changing for ``generation``."""
        return sum(
            1
            for i, (n, a, g) in enumerate(self.events)
            if n == node and a == "Progressing" and g == generation
            and not (i and self.events[i - 1][:2] == (n, a))
        )  # fmt: skip

    def seen(self, node: str, active: str) -> bool:
        return any(n == node and a == active for n, a, _ in self.events)


def leases(w: World) -> list[Any]:
    return list(w.cluster.coord.list_namespaced_lease("kube-system").items)


def test_rollout_one_node_at_a_time_stops_at_a_failing_node_until_the_bridge_changes(
    world: World,
) -> None:
    w = world
    nodes = {n: w.node(n, persistence="none", data=True) for n in NODES}
    w.rig.unplug("n2", "eth1")  # n2's data uplink leads nowhere
    before = {n: node_state(node) for n, node in nodes.items()}
    timeline = Timeline(w.cluster.api, "br2")
    try:
        # generation 1: n2's agent runs first, takes the only slot (maxUnavailable default 1),
        # fails its gateway probe and rolls back; the agents that come later see it Failing
        w.cluster.apply_bridge(ovs_bridge("br2", uplinks=["eth1"], probeTimeoutSeconds=1))
        w.agent("n2")
        _, reason, message = w.cluster.wait_condition("n2", "Failing", "br2")
        assert reason == "ProbeFailed" and f"default gateway {DATA_GATEWAY}" in message
        assert timeline.seen("n2", "Progressing")
        w.agent("n1")
        w.agent("n3")
        for n in ("n1", "n3"):
            _, reason, message = w.cluster.wait_condition(n, "Aborted", "br2")
            assert reason == "RolloutAborted"
            assert message.startswith("rollout stopped: node n2 is Failing: probe gateway failed")
        for n in NODES:  # nobody's node changed: n2 rolled back, n1 and n3 never started
            assert node_state(nodes[n]) == before[n], n
            assert "underlay.dev/br2" not in w.cluster.capacity(n)
        assert not timeline.seen("n1", "Progressing") and not timeline.seen("n3", "Progressing")
        assert leases(w) == []

        # the operator fixes n2's cable; a maintenance job holds the slot for a while
        w.rig.plug("n2", "eth1")
        w.cluster.coord.create_namespaced_lease(
            "kube-system",
            {
                "metadata": {"name": "underlay-rollout.br2.0"},
                "spec": {
                    "holderIdentity": "maintenance",
                    "leaseDurationSeconds": 60,
                    "renewTime": datetime.datetime.now(datetime.UTC).strftime(
                        "%Y-%m-%dT%H:%M:%S.%fZ"
                    ),
                },
            },
        )
        # generation 2 resumes the stopped rollout (n2 included), but only within the slot
        obj = w.cluster.apply_bridge(ovs_bridge("br2", uplinks=["eth1"], probeTimeoutSeconds=3))
        assert obj["metadata"]["generation"] == 2
        for n in NODES:
            _, reason, message = w.cluster.wait_condition(n, "Pending", "br2", timeout=10)
            assert "changing now: maintenance" in message, message
        w.cluster.coord.delete_namespaced_lease("underlay-rollout.br2.0", "kube-system")
        for n in NODES:
            w.cluster.wait_condition(n, "Ready", "br2", timeout=30)
        for n, node in nodes.items():
            assert node.vsctl("list-ports", "br2").split() == ["eth1"]
            assert node.addresses("br2") == [f"{DATA_IPS[n]}/16"]
            assert node.ping(DATA_GATEWAY, count=1)
            assert "underlay.dev/br2" in w.cluster.capacity(n)
            e = w.cluster.enactment(n, "br2")
            assert e is not None and e["status"]["enactedGeneration"] == 2
            assert timeline.progressing(n, 2) == 1, timeline.events
        wait_for(lambda: leases(w) == [], 5, "slots released")
    finally:
        timeline.stop()
    assert timeline.max_progressing() == 1, timeline.events
