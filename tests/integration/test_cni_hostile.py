"""underlay-ovs against hostile CNI input on a rig node (issue 10, items 1, 3 and 6).

The agent (``python -m node_agent.cni.server``) runs inside a rig node's network namespace,
which is "the node" here: a CNI_NETNS naming it (``/run/netns/<node>``, ``/proc/<agent
pid>/ns/net``, ``/run/netns/../../proc/self/ns/net``) is the node's own namespace, never the
machine's. The shim is executed inside the node as a runtime executes it; IPAM is Debian's
host-local. Before this change, a DEL for a container that never existed deleted whatever
CNI_IFNAME named in CNI_NETNS (the node's uplink, another pod's eth0, an interface Debian's
bridge plugin had just made), ADD configured a pool address and a /16 route on the node itself,
and a FIFO as CNI_NETNS blocked the ADD (and a DEL of the same container) indefinitely.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
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
from tests.rig import GATEWAY, Node, Rig, wait_for

pytestmark = pytest.mark.root


@pytest.fixture
def one_node(rig: Rig, tmp_path: Path) -> Any:
    node = rig.add_node("n1", "172.18.10.11")
    make_bridge(node)
    agent = Agent(node, tmp_path)
    try:
        yield rig, node, agent, Runtime(node, agent.cni_path)
    finally:
        agent.stop()


def ovs_conf(
    tmp_path: Path, lo: str = "172.18.30.131", hi: str = "172.18.30.140"
) -> dict[str, Any]:
    return conflist(
        {"type": "underlay-ovs", "bridge": "br1", "ipam": host_local(lo, hi, tmp_path / "hl")}
    )


def allocations(tmp_path: Path, name: str = "hl") -> list[str]:
    return sorted(p.name for p in (tmp_path / name).glob("*/172.*"))


def call(
    node: Node, cni_path: str, command: str, conf: dict[str, Any], netns: str, cid: str,
    ifname: str = "eth0", timeout: float = 20,
) -> tuple[int, dict[str, Any] | None, float]:  # fmt: skip
    """Execute the first plugin of ``conf`` once inside ``node``; (exit, stdout JSON, seconds).
    Raises subprocess.TimeoutExpired after ``timeout`` s."""
    plugin = {**conf["plugins"][0], "name": conf["name"], "cniVersion": conf["cniVersion"]}
    binary = next(
        Path(d) / plugin["type"] for d in cni_path.split(":") if (Path(d) / plugin["type"]).exists()
    )
    env = {
        "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
        "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=nosuch", "CNI_PATH": cni_path,
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }  # fmt: skip
    t0 = time.monotonic()
    p = subprocess.run(
        ["ip", "netns", "exec", node.name, str(binary)],
        input=json.dumps(plugin).encode(), env=env, capture_output=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None, time.monotonic() - t0


def node_state(node: Node) -> tuple[dict[str, str], str]:
    """The node's links, addresses, routes and br1's ports (IPv6 DAD flags aside)."""
    snap = {k: v.replace(" tentative", "") for k, v in node.snapshot().items()}
    return snap, node.vsctl("list-ports", "br1")


@pytest.mark.parametrize(
    "spelling",
    ["{node}", "/proc/{pid}/ns/net", "/run/netns/../../proc/self/ns/net"],
    ids=["run-netns", "proc-pid", "dot-dot-self"],
)
def test_del_and_add_naming_the_nodes_own_namespace_are_refused(
    one_node: Any, tmp_path: Path, spelling: str
) -> None:
    """The reproduction: DEL CNI_CONTAINERID=never-existed CNI_IFNAME=eth0 (br1's uplink)
    deleted eth0 and exited 0; ADD CNI_IFNAME=evil0 put a pool address and a /16 route on the
    node. Now both are refused (code 4, naming the namespace), and the node is unchanged."""
    _rig, node, agent, rt = one_node
    netns = spelling.format(node=node.path, pid=agent.proc.pid)
    conf = ovs_conf(tmp_path)
    before = node_state(node)
    for ifname in ("eth0", "br1", "lo"):
        with pytest.raises(CniFailure) as e:
            rt.delete(conf, netns, "never-existed", ifname=ifname)
        assert e.value.code == 4, e.value
        assert "own network namespace" in e.value.msg and netns in e.value.msg, e.value.msg
    with pytest.raises(CniFailure) as e:
        rt.add(conf, netns, "evil", ifname="evil0")
    assert e.value.code == 4 and "not a pod's" in e.value.msg, e.value
    time.sleep(0.5)  # what DEL would delete, it deletes right after its answer
    assert node_state(node) == before
    assert node.link_exists("eth0") and not node.link_exists("evil0")
    assert allocations(tmp_path) == [], "no IP taken"
    assert node.ping(GATEWAY), "the node lost its uplink"


def test_a_del_never_deletes_another_pods_interface(one_node: Any, tmp_path: Path) -> None:
    """A DEL for a container that never existed, naming a pod's namespace and eth0, or the
    node and that pod's host veth: the pod keeps its interface and its connectivity."""
    rig, node, _agent, rt = one_node
    conf = ovs_conf(tmp_path)
    pod = rig.add_pod("p1")
    host = rt.add(conf, pod, "c1")["interfaces"][0]["name"]
    assert pod.ping(GATEWAY)
    notes = rt.delete(conf, pod, "never-existed")  # nothing of ours there: exit 0
    assert all("incomplete" not in n for n in notes), notes
    with pytest.raises(CniFailure) as e:
        rt.delete(conf, node.path, "never-existed-2", ifname=host)
    assert e.value.code == 4
    time.sleep(0.5)
    assert pod.link_exists("eth0") and node.link_exists(host)
    assert ovs_port_of(node, "c1") == host and pod.ping(GATEWAY)
    rt.delete(conf, pod, "c1")  # its own DEL still removes it
    wait_for(lambda: not pod.link_exists("eth0") and not node.link_exists(host), 5, "c1 gone")


def test_debians_bridge_plugin_right_after_our_del_keeps_its_interface(
    one_node: Any, tmp_path: Path
) -> None:
    """The control-plane issue's bench crash: our DEL answered, then deleted "eth0 in the
    netns", which by then was the interface Debian's bridge plugin had just made there
    ("failed to lookup eth0: Link not found")."""
    rig, _node, _agent, rt = one_node
    ours = ovs_conf(tmp_path)
    theirs = conflist(
        {"type": "bridge", "bridge": "cnihostile0",
         "ipam": host_local("172.18.31.1", "172.18.31.20", tmp_path / "hl-bridge")}
    )  # fmt: skip
    pod = rig.add_pod("p1")
    for i in range(5):
        rt.add(ours, pod, f"ovs{i}")
        rt.delete(ours, pod, f"ovs{i}")
        got = rt.add(theirs, pod, f"bridge{i}")  # same netns, same eth0, at once
        time.sleep(0.3)
        assert pod.link_exists("eth0"), f"cycle {i}: the bridge plugin's eth0 was deleted"
        assert pod.addresses("eth0") == [got["ips"][0]["address"]]
        rt.delete(theirs, pod, f"bridge{i}")


def test_del_deletes_only_the_links_its_add_recorded(one_node: Any, tmp_path: Path) -> None:
    """After ADD, the pod's veth is gone and other links took its names (an eth0 in the pod,
    the host veth's name on the node): DEL removes the port and the IP, and neither link."""
    rig, node, _agent, rt = one_node
    conf = ovs_conf(tmp_path)
    pod = rig.add_pod("p1")
    host = rt.add(conf, pod, "c1")["interfaces"][0]["name"]
    pod.run("ip", "link", "del", "eth0")  # takes the host end along
    wait_for(lambda: not node.link_exists(host), 5, "host veth gone")
    pod.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    node.run("ip", "link", "add", host, "type", "veth", "peer", "name", "other0")
    notes = rt.delete(conf, pod, "c1")
    assert all("incomplete" not in n for n in notes), notes
    time.sleep(0.5)
    assert pod.link_exists("eth0") and node.link_exists(host), "DEL deleted links by name"
    assert ovs_port_of(node, "c1") is None and allocations(tmp_path) == []


@pytest.mark.parametrize("kind", ["fifo", "regular-file", "directory", "mount-namespace"])
def test_a_netns_that_is_not_a_network_namespace_is_refused_at_once(
    one_node: Any, tmp_path: Path, kind: str
) -> None:
    """A FIFO blocked the ADD for 51 s holding its IP, and a DEL of the same container waited
    behind it; now ADD and DEL are refused at once (code 4, saying what the path is) and no
    IP is held."""
    rig, node, agent, rt = one_node
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "regular-file":
        path.write_text("root:x:0:0::/root:/bin/sh\n")
    elif kind == "directory":
        path.mkdir()
    else:
        path = Path(f"/proc/{agent.proc.pid}/ns/mnt")
    conf = ovs_conf(tmp_path)
    for command in ("ADD", "DEL"):
        rc, out, took = call(node, agent.cni_path, command, conf, str(path), "cfifo")
        assert rc == 1 and out and out["code"] == 4, (command, out)
        assert "not a network namespace" in out["msg"] or "not a network one" in out["msg"], out
        assert took < 5, f"{command} took {took:.1f} s"
    assert allocations(tmp_path) == []
    pod = rig.add_pod("p1")
    assert rt.add(conf, pod, "cfifo")["ips"], "the container's real ADD works afterwards"


def test_managed_bridges_only_refuses_a_bridge_underlay_did_not_make(
    rig: Rig, tmp_path: Path
) -> None:
    """Another tenant's OVS bridge on the node: with --managed-bridges-only (the agent's
    default, --cni-managed-bridges-only) an ADD naming it fails with code 112 and changes
    nothing; a bridge the agent made (external_ids underlay.dev/owner=agent) is allowed."""
    node = rig.add_node("n1", "172.18.10.11")
    make_bridge(node)
    agent = Agent(node, tmp_path, extra_args=("--managed-bridges-only",))
    try:
        rt = Runtime(node, agent.cni_path)
        conf = ovs_conf(tmp_path)
        pod = rig.add_pod("p1")
        before = node_state(node)
        with pytest.raises(CniFailure) as e:
            rt.add(conf, pod, "c1")
        assert e.value.code == 112 and "br1" in e.value.msg and "not made by" in e.value.msg
        assert node_state(node) == before and not pod.link_exists("eth0")
        assert allocations(tmp_path) == []
        node.vsctl("set", "Bridge", "br1", "external_ids:underlay.dev/owner=agent")
        assert rt.add(conf, pod, "c1")["ips"] and pod.ping(GATEWAY)
    finally:
        agent.stop()


def test_records_outlive_an_agent_restart(rig: Rig, tmp_path: Path) -> None:
    """What ADD recorded is on disk (next to the socket): a DEL served by the next agent, with
    the OVS port deleted by hand meanwhile, still removes exactly that veth."""
    node = rig.add_node("n1", "172.18.10.11")
    make_bridge(node)
    conf = ovs_conf(tmp_path)
    pod = rig.add_pod("p1")
    agent = Agent(node, tmp_path)
    try:
        host = Runtime(node, agent.cni_path).add(conf, pod, "c1")["interfaces"][0]["name"]
    finally:
        agent.stop()
    assert list(tmp_path.glob("*.attachments/*.json")), "no record on disk"
    node.vsctl("del-port", "br1", host)
    agent = Agent(node, tmp_path)
    try:
        Runtime(node, agent.cni_path).delete(conf, pod, "c1")
        wait_for(lambda: not node.link_exists(host) and not pod.link_exists("eth0"), 5, "veth")
        # the record goes with the links, after the answer (DEL removes them in the background)
        wait_for(lambda: not list(tmp_path.glob("*.attachments/*.json")), 5, "record removed")
    finally:
        agent.stop()
