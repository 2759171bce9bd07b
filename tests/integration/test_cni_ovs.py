"""underlay-ovs on real OVS in rig nodes, executed as a container runtime executes CNI plugins.

The agent runs as a process inside the node namespace (``ip netns exec``), the installed shim
is executed inside the node namespace with CNI_* env and the config on stdin; IPAM is Debian's
host-local here (the Kubernetes-backed underlay-ipam is tested in test_ipam_*.py).
The runtime helpers are in tests/cniruntime.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cniruntime import (
    Agent,
    CniFailure,
    Runtime,
    conflist,
    host_local,
    make_bridge,
    ovs_port_of,
)
from tests.rig import GATEWAY, Rig, wait_for


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture
def one_node(rig: Rig, tmp_path: Path) -> Any:
    node = rig.add_node("n1", "172.18.10.11")
    make_bridge(node)
    agent = Agent(node, tmp_path)
    try:
        yield rig, node, agent, Runtime(node, agent.cni_path)
    finally:
        agent.stop()


# --- tests -----------------------------------------------------------------------------------
@pytest.mark.root
def test_two_pods_on_two_nodes_ping_with_host_local(rig: Rig, tmp_path: Path) -> None:
    """ADD on two nodes: veth, OVS port with external_ids, MAC from IPv4, routes; pods ping."""
    agents = []
    try:
        results = {}
        pods = {}
        for i, (name, ip, lo, hi) in enumerate(
            [
                ("n1", "172.18.10.11", "172.18.30.131", "172.18.30.135"),
                ("n2", "172.18.10.12", "172.18.30.136", "172.18.30.140"),
            ]
        ):
            node = rig.add_node(name, ip)
            make_bridge(node)
            agent = Agent(node, tmp_path)
            agents.append(agent)
            pods[name] = rig.add_pod(f"p{i + 1}")
            conf = conflist(
                {
                    "type": "underlay-ovs",
                    "bridge": "br1",
                    "ipam": host_local(lo, hi, tmp_path / f"hl-{name}"),
                }
            )
            rt = Runtime(node, agent.cni_path)
            results[name] = (
                rt,
                conf,
                rt.add(conf, pods[name], f"cid-{name}", pod=("default", f"p{i + 1}", f"uid-{i}")),
            )
        r1 = results["n1"][2]
        assert r1["cniVersion"] == "1.0.0"
        host, cont = r1["interfaces"]
        assert host["name"].startswith("veth") and len(host["name"]) == 12 and "sandbox" not in host
        assert cont == {"name": "eth0", "mac": "0a:58:ac:12:1e:83", "sandbox": pods["n1"].path}
        assert r1["ips"] == [{"address": "172.18.30.131/16", "gateway": GATEWAY, "interface": 1}]
        assert pods["n1"].addresses("eth0") == ["172.18.30.131/16"]
        assert pods["n1"].default_route_dev() == "eth0"
        n1 = rig.nodes["n1"]
        port = ovs_port_of(n1, "cid-n1")
        assert port == host["name"]
        want = {
            "contId": "cid-n1",
            "contIface": "eth0",
            "contNetns": pods["n1"].path,
            "contPodUid": "uid-0",
            "contPod": "default/p1",
            "owner": "underlay-ovs",
        }
        for key, value in want.items():
            assert n1.vsctl("get", "Port", port, f"external_ids:{key}").strip('"') == value
        assert port in n1.vsctl("list-ports", "br1").split()
        assert n1.run("cat", f"/proc/sys/net/ipv6/conf/{port}/accept_ra").stdout.strip() == "0"
        assert pods["n1"].ping("172.18.30.136"), "pod on n1 cannot reach pod on n2"
        assert pods["n2"].ping(GATEWAY), "pod on n2 cannot reach the gateway"
        assert pods["n1"].ping(GATEWAY)
        # DEL removes port and veth; a second DEL is fine
        rt, conf, _ = results["n1"]
        rt.delete(conf, pods["n1"], "cid-n1")
        assert ovs_port_of(n1, "cid-n1") is None
        wait_for(lambda: not n1.link_exists(port), what=f"veth {port} deleted")  # deferred
        assert not pods["n1"].link_exists("eth0")
        rt.delete(conf, pods["n1"], "cid-n1")
    finally:
        for a in agents:
            a.stop()


@pytest.mark.root
def test_vlan_access_trunk_and_mtu(one_node: Any, tmp_path: Path) -> None:
    rig, node, _agent, rt = one_node
    p1, p2 = rig.add_pod("p1"), rig.add_pod("p2")
    access = conflist(
        {
            "type": "underlay-ovs",
            "bridge": "br1",
            "vlan": 100,
            "mtu": 1400,
            "ipam": host_local("172.18.30.131", "172.18.30.140", tmp_path / "hl"),
        }
    )
    rt.add(access, p1, "c1")
    port = ovs_port_of(node, "c1")
    assert port is not None
    assert node.vsctl("get", "Port", port, "tag") == "100"
    assert node.vsctl("get", "Port", port, "vlan_mode") == "access"
    assert "mtu 1400" in node.run("ip", "link", "show", port).stdout
    assert "mtu 1400" in p1.run("ip", "link", "show", "eth0").stdout
    trunk = conflist(
        {
            "type": "underlay-ovs",
            "bridge": "br1",
            "trunk": [{"id": 10}, {"minID": 20, "maxID": 22}],
            "ipam": host_local("172.18.30.131", "172.18.30.140", tmp_path / "hl"),
        }
    )
    rt.add(trunk, p2, "c2")
    port2 = ovs_port_of(node, "c2")
    assert port2 is not None
    assert node.vsctl("get", "Port", port2, "trunks") == "[10, 20, 21, 22]"
    assert node.vsctl("get", "Port", port2, "tag") == "[]"


@pytest.mark.root
@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_old_result_versions_carry_ip_version(one_node: Any, tmp_path: Path, version: str) -> None:
    rig, _node, _agent, rt = one_node
    pod = rig.add_pod("p1")
    conf = conflist(
        {
            "type": "underlay-ovs",
            "bridge": "br1",
            "ipam": host_local("172.18.30.131", "172.18.30.140", tmp_path / "hl"),
        },
        version=version,
    )
    r = rt.add(conf, pod, "c1")
    assert r["cniVersion"] == version
    assert r["ips"] == [
        {"version": "4", "address": "172.18.30.131/16", "gateway": GATEWAY, "interface": 1}
    ]


@pytest.mark.root
def test_chain_with_prev_result_check_and_reverse_del(one_node: Any, tmp_path: Path) -> None:
    """underlay-ovs followed by Debian's tuning plugin; CHECK passes, then detects drift."""
    rig, node, _agent, rt = one_node
    pod = rig.add_pod("p1")
    conf = conflist(
        {
            "type": "underlay-ovs",
            "bridge": "br1",
            "ipam": host_local("172.18.30.131", "172.18.30.140", tmp_path / "hl"),
        },
        {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.rp_filter": "0"}},
    )
    r = rt.add(conf, pod, "c1")
    assert r["ips"][0]["address"] == "172.18.30.131/16"  # tuning passed our result through
    rt.check(conf, pod, "c1")
    pod.run("ip", "addr", "del", "172.18.30.131/16", "dev", "eth0")
    with pytest.raises(CniFailure) as e:
        rt.check(conf, pod, "c1")
    assert e.value.code == 108 and "172.18.30.131/16" in e.value.msg
    rt.delete(conf, pod, "c1")
    assert ovs_port_of(node, "c1") is None
    # host-local got its DEL too: the reservation file is gone
    assert (tmp_path / "hl" / "ovs-conf").is_dir()
    assert not (tmp_path / "hl" / "ovs-conf" / "172.18.30.131").exists()


@pytest.mark.root
def test_bridge_missing_is_a_clear_error_and_changes_nothing(one_node: Any, tmp_path: Path) -> None:
    rig, _node, _agent, rt = one_node
    pod = rig.add_pod("p1")
    conf = conflist(
        {
            "type": "underlay-ovs",
            "bridge": "br-nope",
            "ipam": host_local("172.18.30.131", "172.18.30.140", tmp_path / "hl"),
        }
    )
    with pytest.raises(CniFailure) as e:
        rt.add(conf, pod, "c1")
    assert e.value.code == 105
    assert "br-nope" in e.value.msg and "n1" in e.value.msg
    assert not pod.link_exists("eth0")
    assert not list((tmp_path / "hl").glob("*/172.*")) if (tmp_path / "hl").exists() else True


@pytest.mark.root
def test_del_after_netns_deleted_and_stale_port_purge(one_node: Any, tmp_path: Path) -> None:
    rig, node, _agent, rt = one_node
    conf = conflist(
        {
            "type": "underlay-ovs",
            "bridge": "br1",
            "ipam": host_local("172.18.30.131", "172.18.30.140", tmp_path / "hl"),
        }
    )
    p1 = rig.add_pod("p1")
    netns1 = p1.path
    rt.add(conf, p1, "c1")
    rig.delete_pod("p1")
    notes = rt.delete(conf, netns1, "c1")  # the runtime's DEL after the sandbox is gone
    assert all("incomplete" not in n for n in notes), notes
    assert ovs_port_of(node, "c1") is None
    rt.delete(conf, netns1, "c1")  # and again

    # a pod that dies without DEL leaves a dead port; the next ADD purges it in the background
    p2 = rig.add_pod("p2")
    rt.add(conf, p2, "c2")
    dead = ovs_port_of(node, "c2")
    rig.delete_pod("p2")
    p3 = rig.add_pod("p3")
    rt.add(conf, p3, "c3")
    wait_for(lambda: dead not in node.vsctl("list-ports", "br1").split(), what=f"purge of {dead}")
    assert ovs_port_of(node, "c3") in node.vsctl("list-ports", "br1").split()


@pytest.mark.root
def test_purge_after_ovs_restart_marks_interface_error(one_node: Any, tmp_path: Path) -> None:
    """After ovs-vswitchd restarts, ports of vanished pods carry an error; a DEL purges them."""
    rig, node, _agent, rt = one_node
    conf = conflist(
        {
            "type": "underlay-ovs",
            "bridge": "br1",
            "ipam": host_local("172.18.30.131", "172.18.30.140", tmp_path / "hl"),
        }
    )
    p1 = rig.add_pod("p1")
    rt.add(conf, p1, "c1")
    dead = ovs_port_of(node, "c1")
    rig.delete_pod("p1")
    node.stop_ovs()
    node.start_ovs()
    wait_for(
        lambda: "No such device" in node.vsctl("get", "Interface", str(dead), "error"),
        what="interface error",
    )
    rt.delete(conf, "/run/netns/unrelated", "other-container")
    wait_for(lambda: dead not in node.vsctl("list-ports", "br1").split(), what=f"purge of {dead}")


@pytest.mark.root
def test_failed_ipam_leaves_nothing_behind(one_node: Any, tmp_path: Path) -> None:
    rig, node, _agent, rt = one_node
    pod = rig.add_pod("p1")
    conf = conflist(
        {
            "type": "underlay-ovs",
            "bridge": "br1",
            "ipam": {"type": "host-local", "ranges": "broken"},
        }
    )
    with pytest.raises(CniFailure) as e:
        rt.add(conf, pod, "c1")
    assert e.value.code == 109 and "host-local" in e.value.msg
    assert ovs_port_of(node, "c1") is None
    assert not pod.link_exists("eth0")
    assert [n for n in node.vsctl("list-ports", "br1").split() if n.startswith("veth")] == []


@pytest.mark.root
def test_retried_add_replaces_leftovers(one_node: Any, tmp_path: Path) -> None:
    rig, node, _agent, rt = one_node
    pod = rig.add_pod("p1")
    conf = conflist(
        {
            "type": "underlay-ovs",
            "bridge": "br1",
        }
    )
    rt.add(conf, pod, "c1")
    first = ovs_port_of(node, "c1")
    rt.add(conf, pod, "c1")  # same container and interface again (runtime retry)
    second = ovs_port_of(node, "c1")
    assert second and second != first
    assert [n for n in node.vsctl("list-ports", "br1").split() if n.startswith("veth")] == [second]
    assert pod.link_exists("eth0")


def _host_veths(node: Any) -> list[str]:
    out = node.run("ip", "-o", "link").stdout
    return sorted(ln.split(": ")[1].split("@")[0] for ln in out.splitlines() if ": veth" in ln)


@pytest.mark.root
@pytest.mark.parametrize("gone", ["port", "bridge"])
def test_del_without_its_port_still_removes_the_interfaces(
    one_node: Any, tmp_path: Path, gone: str
) -> None:
    """DEL removes the veth its ADD recorded whether or not the OVS port is found (deleted by
    hand, or with its bridge): both ends go, the IP is released, DEL exits 0 (also a second
    time), and a retried ADD in the same netns works (no EEXIST) once the bridge is there."""
    rig, node, _agent, rt = one_node
    pod = rig.add_pod("p1")
    hl = tmp_path / "hl"
    conf = conflist(
        {"type": "underlay-ovs", "bridge": "br1",
         "ipam": host_local("172.18.30.131", "172.18.30.140", hl)}
    )  # fmt: skip
    rt.add(conf, pod, "c1")
    port = ovs_port_of(node, "c1")
    assert port and _host_veths(node) == [port] and pod.link_exists("eth0")
    if gone == "port":
        node.vsctl("del-port", "br1", port)
    else:
        node.vsctl("del-br", "br1")

    notes = rt.delete(conf, pod, "c1")

    assert all("incomplete" not in n for n in notes), notes
    wait_for(lambda: not pod.link_exists("eth0"), 5, "pod eth0 deleted")
    wait_for(lambda: _host_veths(node) == [], 5, "host veth deleted")
    assert list(hl.glob("*/172.*")) == []
    assert rt.delete(conf, pod, "c1") is not None  # again: nothing left, still exit 0
    if gone == "bridge":
        make_bridge(node)
    again = rt.add(conf, pod, "c1")  # a retried ADD in the same netns
    assert again["interfaces"][1]["name"] == "eth0" and pod.addresses("eth0")
    assert _host_veths(node) == [ovs_port_of(node, "c1")]
