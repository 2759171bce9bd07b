"""``underlay agent`` on the rig: a renamed bridge (spec.bridge changed) and pods plugged while
a first-time bridge is still being probed.

The agent runs inside a rig node as the DaemonSet runs it (see test_agent.py, whose helpers are
used); CNI calls go through the installed shim to the agent's own CNI server, executed as a
container runtime executes plugins (tests/cniruntime.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from node_agent.cni.install import install_shims

from tests.cniruntime import PYTHON, REF_PLUGINS, CniFailure, Runtime, conflist
from tests.integration.test_agent import (  # noqa: F401 - world_fixture is the "world" fixture
    DATA_IPS,
    World,
    assert_same_state,
    files_under,
    node_state,
    ovs_bridge,
    world_fixture,
)
from tests.integration.test_bridges import plug_pod
from tests.rig import DATA_GATEWAY, Node, wait_for

ETH2_IP = "172.19.20.11"
DEAD_IP, DEAD_GATEWAY = "172.20.20.11", "172.20.0.1"
"""eth2 on a segment of its own that nothing answers on (in the node namespace only)."""


def bridges_of(n: Node) -> list[str]:
    return n.vsctl("list-br").split()


def ports_of(n: Node, bridge: str) -> list[str]:
    return sorted(n.vsctl("list-ports", bridge).split())


def data_default_dev(n: Node) -> str | None:
    """Device of the data segment's default route (metric 200), or None."""
    out = n.run("ip", "-4", "route", "show", "default", "via", DATA_GATEWAY).stdout.split()
    return out[out.index("dev") + 1] if "dev" in out else None


def ready_as(w: World, bridge: str, oname: str = "net") -> dict[str, Any]:
    """Wait until enactment n1.<oname> is Ready for OVS bridge ``bridge``; return its status."""
    return wait_for(
        lambda: (
            w.cluster.condition("n1", oname)[0] == "Ready"
            and (st := (w.cluster.enactment("n1", oname) or {}).get("status", {}))
            and st.get("bridge") == bridge
            and st
        ),
        30,
        f"n1.{oname} Ready with bridge {bridge}",
    )


def capacity_is(w: World, resources: set[str]) -> None:
    """Wait until Node n1's underlay.dev/ capacity is exactly ``resources`` (it is published
    right after the enactment is written)."""
    wait_for(
        lambda: {k for k in w.cluster.capacity("n1") if k.startswith("underlay.dev/")} == resources,
        5,
        f"capacity {sorted(resources)}",
    )


def unplug_pod(w: World, n: Node, bridge: str, port: str, pod: str) -> None:
    """The pod of :func:`plug_pod` goes away (port, namespace, host veth)."""
    n.vsctl("del-port", bridge, port)
    w.rig.delete_pod(pod)
    n.run("ip", "link", "del", port, check=False)


# --- spec.bridge renamed -----------------------------------------------------------------------


def test_renamed_bridge_replaces_the_old_one_through_removal(world: World) -> None:
    """OvsBridge ``net``: br1 over eth1, renamed to br9 over the same eth1 (blocked while a pod
    port is on br1: Pending/RemovalBlocked naming it, br1 kept working), then to br7 over eth2.
    Each old bridge is removed as a deleted OvsBridge's would be: addresses and routes back to
    its uplink, netplan file and replay record gone, capacity withdrawn; deleting the OvsBridge
    gives the node back exactly as it was."""
    w = world
    n1 = w.node("n1", data=True)
    w.rig.add_nic("n1", "eth2", ETH2_IP)
    before = node_state(n1)
    w.cluster.apply_bridge(ovs_bridge("net", bridge="br1", uplinks=["eth1"]))
    w.agent("n1")
    ready_as(w, "br1")
    capacity_is(w, {"underlay.dev/br1"})

    port = plug_pod(w.rig, n1, "p1", "172.19.30.1", contNetns="/run/netns/x", contIface="eth0",
                    contPodUid="uid-1", owner="underlay-ovs")  # fmt: skip
    w.cluster.apply_bridge(ovs_bridge("net", bridge="br9", uplinks=["eth1"]))
    _, reason, message = w.cluster.wait_condition("n1", "Pending", "net")
    assert reason == "RemovalBlocked", message
    assert "from br1 to br9" in message and port in message and "uid-1" in message, message
    capacity_is(w, set())
    assert bridges_of(n1) == ["br1"] and ports_of(n1, "br1") == sorted(["eth1", port])
    assert n1.addresses("br1") == [f"{DATA_IPS['n1']}/16"] and n1.addresses("eth1") == []
    assert w.rig.pods["p1"].ping(DATA_GATEWAY, count=1)

    unplug_pod(w, n1, "br1", port, "p1")  # OVSDB notices: the rename goes on
    st = ready_as(w, "br9")
    assert bridges_of(n1) == ["br9"] and ports_of(n1, "br9") == ["eth1"]
    assert n1.addresses("br9") == [f"{DATA_IPS['n1']}/16"] and data_default_dev(n1) == "br9"
    assert not n1.link_exists("br1")
    files = set(files_under(n1.root))
    assert files == {"etc/netplan/50-cloud-init.yaml", "etc/netplan/60-underlay-br9.yaml",
                     "var/lib/underlay/bridges/br9.json"}, files  # fmt: skip
    capacity_is(w, {"underlay.dev/br9"})
    assert any(c.startswith("bridge br1: deleted OVS bridge br1") for c in st["lastChanges"])
    assert st["enactedState"]["spec"]["bridge"] == "br9"

    # renamed again, onto another uplink: eth1 gets its address and route back
    w.cluster.apply_bridge(ovs_bridge("net", bridge="br7", uplinks=["eth2"]))
    ready_as(w, "br7")
    assert bridges_of(n1) == ["br7"] and ports_of(n1, "br7") == ["eth2"]
    assert n1.addresses("eth1") == [f"{DATA_IPS['n1']}/16"] and data_default_dev(n1) == "eth1"
    assert n1.addresses("br7") == [f"{ETH2_IP}/16"] and n1.addresses("eth2") == []
    assert set(files_under(n1.root)) == {"etc/netplan/50-cloud-init.yaml",
                                         "etc/netplan/60-underlay-br7.yaml",
                                         "var/lib/underlay/bridges/br7.json"}  # fmt: skip
    capacity_is(w, {"underlay.dev/br7"})

    w.cluster.delete_bridge("net")
    wait_for(lambda: w.cluster.enactment("n1", "net") is None, 10, "enactment deleted")
    assert_same_state(node_state(n1), before)
    capacity_is(w, set())


def test_failed_rename_puts_the_old_bridge_back(world: World) -> None:
    """Renamed to br9 over eth2, whose cable leads nowhere (its default route's gateway never
    answers): br1 is removed, br9's probe fails and is rolled back, and br1 is put back as the
    node had it (addresses, route, files); the enactment is Failing/ProbeFailed saying so,
    enactedState still br1; the generation is not tried again, br1's drift still repaired."""
    w = world
    n1 = w.node("n1", data=True)
    w.rig.add_nic("n1", "eth2", DEAD_IP, network=None)
    n1.run("ip", "route", "add", "default", "via", DEAD_GATEWAY, "dev", "eth2", "metric", "300")
    w.cluster.apply_bridge(ovs_bridge("net", bridge="br1", uplinks=["eth1"]))
    a = w.agent("n1")
    ready_as(w, "br1")
    files = files_under(n1.root)

    w.cluster.apply_bridge(ovs_bridge("net", bridge="br9", uplinks=["eth2"]))
    _, reason, message = w.cluster.wait_condition("n1", "Failing", "net", timeout=30)
    assert reason == "ProbeFailed", message
    assert "probe gateway failed" in message and "bridge br1 put back" in message, message
    assert bridges_of(n1) == ["br1"] and ports_of(n1, "br1") == ["eth1"]
    assert n1.addresses("br1") == [f"{DATA_IPS['n1']}/16"] and data_default_dev(n1) == "br1"
    assert n1.addresses("eth2") == [f"{DEAD_IP}/16"] and not n1.link_exists("br9")
    assert files_under(n1.root) == files
    st = (w.cluster.enactment("n1", "net") or {})["status"]
    assert st["enactedState"]["spec"]["bridge"] == "br1"
    assert "bridge br1 put back as this node had it" in st["lastRollback"]
    wait_for(lambda: a.text().count("changing n1") == 2, 5, "one attempt")
    n1.vsctl("del-port", "br1", "eth1")  # drift of br1 is still repaired
    wait_for(lambda: ports_of(n1, "br1") == ["eth1"], 5, "br1 repaired")
    assert a.text().count("changing n1") == 2, a.text()


# --- pods and a first-time bridge still being probed -----------------------------------------


def test_pods_and_a_first_time_bridge_whose_probe_fails(world: World, tmp_path: Path) -> None:
    """br1 over eth1, whose cable leads nowhere, is probed for 6 s. Meanwhile (a) a runtime's
    ADD is refused with CNI code 11 naming br1 and why, touching nothing; (b) a pod port
    plugged by another writer survives the rollback: the bridge stays with that port only,
    eth1 keeps its address and route, no files, Failing/ProbeFailed naming the port. Deleting
    the OvsBridge is blocked while the port remains; then the node is as before."""
    w = world
    n1 = w.node("n1", data=True)
    w.rig.unplug("n1", "eth1")
    before = node_state(n1)
    w.cluster.apply_bridge(ovs_bridge("br1", uplinks=["eth1"], probeTimeoutSeconds=6))
    a = w.agent("n1")
    bin_dir = tmp_path / "cni-bin"
    install_shims(bin_dir, a.socket, python=PYTHON)
    rt = Runtime(n1, f"{bin_dir}:{REF_PLUGINS}")
    conf = conflist({"type": "underlay-ovs", "bridge": "br1"})
    a.wait_log("changing n1")
    wait_for(lambda: "br1" in bridges_of(n1), 5, "br1 created")

    pod2 = w.rig.add_pod("p2")
    with pytest.raises(CniFailure) as e:
        rt.add(conf, pod2, "c2")
    assert e.value.code == 11, e.value
    assert "OVS bridge br1 on node n1 is not ready for pods" in e.value.msg, e.value.msg
    assert "has not finished" in e.value.msg, e.value.msg
    assert not pod2.link_exists("eth0")

    port = plug_pod(w.rig, n1, "p1", "172.19.30.1", contNetns="/run/netns/x", contIface="eth0",
                    contPodUid="uid-1", owner="underlay-ovs")  # fmt: skip
    assert w.cluster.condition("n1")[0] == "Progressing"  # still within the probe window
    _, reason, message = w.cluster.wait_condition("n1", "Failing", timeout=20)
    assert reason == "ProbeFailed", message
    assert f"kept without its uplink (eth1) for the pod ports plugged meanwhile: {port}" in message
    assert bridges_of(n1) == ["br1"] and ports_of(n1, "br1") == [port]
    assert n1.link_exists(port) and w.rig.pods["p1"].link_exists("eth0")
    assert n1.addresses("eth1") == [f"{DATA_IPS['n1']}/16"] and data_default_dev(n1) == "eth1"
    assert n1.addresses("br1") == []
    assert files_under(n1.root) == before["files"]
    assert "underlay.dev/br1" not in w.cluster.capacity("n1")
    with pytest.raises(CniFailure) as e:  # kept for its pods only
        rt.add(conf, pod2, "c2")
    assert e.value.code == 11 and "kept only for the pod ports" in e.value.msg, e.value.msg

    w.cluster.delete_bridge("br1")
    _, reason, message = w.cluster.wait_condition("n1", "Pending")
    assert reason == "RemovalBlocked" and port in message, message
    unplug_pod(w, n1, "br1", port, "p1")
    wait_for(lambda: w.cluster.enactment("n1") is None, 10, "enactment deleted")
    w.rig.delete_pod("p2")
    assert_same_state(node_state(n1), before)
