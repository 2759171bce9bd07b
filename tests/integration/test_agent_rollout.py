"""Rollout of an OvsBridge across three agents (real rig nodes, the real control plane): at most
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
import time
from typing import Any

from kubernetes import client, watch
from node_agent import rollout

from reconciler import vocab
from tests.controlplane.cluster import Kube
from tests.integration.test_agent import (
    AGENT_NAMESPACE,
    DATA_IPS,
    ROLLOUT_CONDITIONS,
    World,
    assert_same_state,
    node_state,
    ovs_bridge,
    slot_leases,
    world_fixture,  # noqa: F401 - the ``world`` fixture
)
from tests.rig import DATA_GATEWAY, wait_for

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
                    (
                        c["type"]
                        for c in st.get("conditions") or []
                        if c["status"] == "True" and c["type"] in ROLLOUT_CONDITIONS
                    ),
                    None,
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
    return w.cluster.slot_leases()


def hold_slot(w: World, bridge: str) -> None:
    """A maintenance job holds the only rollout slot of OvsBridge ``bridge`` for 60 s."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    w.cluster.coord.create_namespaced_lease(
        AGENT_NAMESPACE,
        {
            "metadata": {"name": rollout.lease_name(bridge, 0)},
            "spec": {"holderIdentity": "maintenance", "leaseDurationSeconds": 60, "renewTime": now},
        },
    )


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
            assert_same_state(node_state(nodes[n]), before[n])
            assert "underlay.dev/br2" not in w.cluster.capacity(n)
        assert not timeline.seen("n1", "Progressing") and not timeline.seen("n3", "Progressing")
        assert leases(w) == []

        # the operator fixes n2's cable; a maintenance job holds the slot for a while
        w.rig.plug("n2", "eth1")
        hold_slot(w, "br2")
        # generation 2 resumes the stopped rollout (n2 included), but only within the slot
        obj = w.cluster.apply_bridge(ovs_bridge("br2", uplinks=["eth1"], probeTimeoutSeconds=3))
        assert obj["metadata"]["generation"] == 2
        for n in NODES:
            _, reason, message = w.cluster.wait_condition(n, "Pending", "br2", timeout=10)
            assert "changing now: maintenance" in message, message
        w.cluster.coord.delete_namespaced_lease("underlay-rollout.br2.0", AGENT_NAMESPACE)
        for n in NODES:
            w.cluster.wait_condition(n, "Ready", "br2", timeout=30)
        for n, node in nodes.items():
            assert node.vsctl("list-ports", "br2").split() == ["eth1"]
            assert node.addresses("br2") == [f"{DATA_IPS[n]}/16"]
            assert node.ping(DATA_GATEWAY, count=1)
            # published right after the Ready status is written, a request later
            wait_for(lambda n=n: "underlay.dev/br2" in w.cluster.capacity(n), 5, "published")
            e = w.cluster.enactment(n, "br2")
            assert e is not None and e["status"]["enactedGeneration"] == 2
            assert timeline.progressing(n, 2) == 1, timeline.events
        wait_for(lambda: leases(w) == [], 5, "slots released")
    finally:
        timeline.stop()
    assert timeline.max_progressing() == 1, timeline.events

    # generation 3 fails on n2 again while n1 and n3 are stopped; back, they are Aborted and
    # keep generation 2: drift on n1 is still repaired (to generation 2), capacity withdrawn
    for a in w.agents:
        if a.name != "n2":
            assert a.stop() == 0
    w.rig.unplug("n2", "eth1")
    w.cluster.apply_bridge(ovs_bridge("br2", uplinks=["eth1"], probeTimeoutSeconds=1, mtu=1400))
    w.cluster.wait_condition("n2", "Failing", "br2")
    w.agent("n1", resync=60)
    w.agent("n3", resync=60)
    for n in ("n1", "n3"):
        w.cluster.wait_condition(n, "Aborted", "br2")
        wait_for(lambda n=n: "underlay.dev/br2" not in w.cluster.capacity(n), 5, "withdrawn")
    n1 = nodes["n1"]
    assert "mtu 1500" in n1.run("ip", "link", "show", "eth1").stdout  # generation 3 not here
    n1.vsctl("del-port", "br2", "eth1")
    wait_for(lambda: n1.vsctl("list-ports", "br2").split() == ["eth1"], 5, "uplink port back")
    rec = wait_for(
        lambda: (w.cluster.enactment("n1", "br2") or {}).get("status", {}).get("lastRepair"), 10
    )
    assert any(d.startswith("uplink-port-missing") for d in rec["drift"]), rec
    assert w.cluster.condition("n1", "br2")[0] == "Aborted"
    assert w.cluster.enactment("n1", "br2")["status"]["enactedGeneration"] == 2  # type: ignore[index]
    assert n1.ping(DATA_GATEWAY, count=1)

    # n2 leaves the cluster: its enactments are garbage-collected with its Node (owner), so its
    # last Failing no longer stops anybody
    w.cluster.core.delete_node("n2")
    wait_for(lambda: w.cluster.enactment("n2", "br2") is None, 10, "n2's enactment collected")


# --- slots against the API server alone ------------------------------------------------------


def slots(kube: Kube, identity: str, lease_seconds: int = 30) -> rollout.Slots:
    """An agent's rollout slots: the agent's ServiceAccount through the test's proxy, in the
    agents' namespace (underlay-system, as the DaemonSet's POD_NAMESPACE says)."""
    api = kube.api_client(kube.agent_kubeconfig(kube.workdir / f"agent-{identity}.kubeconfig"))
    return rollout.Slots(api, AGENT_NAMESPACE, identity, lease_seconds=lease_seconds)


def test_at_most_n_holders_when_many_agents_race(kube: Kube) -> None:
    """Six agents, two slots, five turns each: never more than two hold a slot at once, two do
    at times, and everybody gets its turns (create-or-CAS on the Lease is atomic on the API
    server). A holder keeps its slot until a second one is held (at most 0.5 s): each request
    to the real server takes long enough that short turns rarely overlapped."""
    held: set[str] = set()
    most = 0
    lock = threading.Lock()
    turns: dict[str, int] = {}

    def agent(me: str) -> None:
        nonlocal most
        s = agents[me]
        for _ in range(5):
            while (slot := s.acquire("br1", 2)[0]) is None:
                time.sleep(0.01)
            with lock:
                held.add(me)
                most = max(most, len(held))
            until = time.monotonic() + 0.5
            while time.monotonic() < until:
                with lock:
                    if len(held) >= 2:
                        break
                time.sleep(0.01)
            time.sleep(0.02)
            with lock:
                held.discard(me)
            s.release(slot)
            turns[me] = turns.get(me, 0) + 1

    agents = {f"n{i}": slots(kube, f"n{i}") for i in range(6)}
    threads = [threading.Thread(target=agent, args=(me,)) for me in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert turns == {f"n{i}": 5 for i in range(6)}
    assert most == 2
    assert slot_leases(kube) == []


def test_expired_slot_is_taken_over_and_the_late_holder_does_not_free_it(kube: Kube) -> None:
    a, b = slots(kube, "n1", 1), slots(kube, "n2", 1)
    sa, _ = a.acquire("br1", 1)
    assert sa is not None
    sa._stop.set()  # n1 hangs: it stops renewing but never releases
    assert b.acquire("br1", 1) == (None, ["n1"])
    time.sleep(1.5)
    sb, _ = b.acquire("br1", 1)
    assert sb is not None
    coord = kube.coord
    lease = coord.read_namespaced_lease("underlay-rollout.br1.0", AGENT_NAMESPACE)
    assert lease.spec.holder_identity == "n2" and lease.spec.lease_transitions == 1
    a.release(sa)  # precondition on its old resourceVersion: n2's slot stays
    assert coord.read_namespaced_lease("underlay-rollout.br1.0", AGENT_NAMESPACE).spec.holder_identity == "n2"  # fmt: skip
    b.release(sb)
    assert slot_leases(kube) == []


def test_holder_renews_its_slot_while_it_works(kube: Kube) -> None:
    a, b = slots(kube, "n1", 2), slots(kube, "n2", 2)
    sa, _ = a.acquire("br1", 1)
    assert sa is not None
    coord = kube.coord
    first = coord.read_namespaced_lease("underlay-rollout.br1.0", AGENT_NAMESPACE).spec.renew_time
    time.sleep(3)  # longer than leaseDurationSeconds: only renewal keeps it
    assert b.acquire("br1", 1) == (None, ["n1"])
    later = coord.read_namespaced_lease("underlay-rollout.br1.0", AGENT_NAMESPACE).spec.renew_time
    assert later > first
    a.release(sa)
    assert not sa.lost
    sb, _ = b.acquire("br1", 1)
    assert sb is not None
    b.release(sb)


def test_removal_takes_a_rollout_slot_too(world: World) -> None:
    """An OvsBridge that leaves Git is taken off the nodes within the same slots as a change:
    while someone holds the only slot, every node keeps its bridge, Pending with the reason;
    once the slot is free the nodes remove it (their own slots, released afterwards)."""
    w = world
    nodes = {n: w.node(n, persistence="none", data=True) for n in ("n1", "n2")}
    before = {n: node_state(node) for n, node in nodes.items()}
    w.cluster.apply_bridge(ovs_bridge("br2", uplinks=["eth1"], probeTimeoutSeconds=3))
    for n in nodes:
        w.agent(n)
    for n in nodes:
        w.cluster.wait_condition(n, "Ready", "br2", timeout=30)
    wait_for(lambda: leases(w) == [], 5, "slots released after the rollout")
    hold_slot(w, "br2")
    w.cluster.delete_bridge("br2")
    for n, node in nodes.items():
        _, reason, message = w.cluster.wait_condition(n, "Pending", "br2", timeout=15)
        assert reason == "WaitingForSlot"
        assert message.startswith("bridge br2 is to be removed: waiting for a rollout slot"), (
            message
        )
        assert "changing now: maintenance" in message, message
        assert node.vsctl("list-ports", "br2").split() == ["eth1"]  # still there, still working
        assert node.ping(DATA_GATEWAY, count=1)
    w.cluster.coord.delete_namespaced_lease("underlay-rollout.br2.0", AGENT_NAMESPACE)
    for n, node in nodes.items():
        wait_for(lambda n=n: w.cluster.enactment(n, "br2") is None, 30, f"br2 removed from {n}")
        assert not node.link_exists("br2")
        assert_same_state(node_state(node), before[n])
    wait_for(lambda: leases(w) == [], 5, "slots released after the removal")
