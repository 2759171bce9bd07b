"""underlay-ovs + underlay-ipam on the rig: a wrong call never breaks a running pod.

Real OVS in a rig node, the agent inside it as the agent's ServiceAccount, the real control
plane (tests/controlplane) reached over the rig network through the test's fault proxy, the
shims executed as a runtime executes them. Each test started as a hostile tester's
reproducer: a late DEL of a pod's dead sandbox, many ADDs and DELs at once (half of the DELs
after their netns is gone), and a port that ovs-vswitchd refuses.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.ippool import allocated_ips
from tests.cniruntime import Agent, exec_plugin, make_bridge, ovs_port_of
from tests.integration.test_ipam_kube import Cluster, cluster, rig_cluster
from tests.rig import GATEWAY, Node, Rig, wait_for

__all__ = ["cluster", "rig_cluster"]  # fixtures shared with test_ipam_kube

IPAM = {"type": "underlay-ipam", "default_ipv4_ippool": ["pool"]}


@pytest.fixture
def node_agent(
    rig_cluster: tuple[Rig, Cluster, str], tmp_path: Path
) -> Iterator[tuple[Rig, Cluster, Node, Agent]]:
    rig, cluster, kubeconfig = rig_cluster
    node = rig.add_node("n1", "172.18.10.11")
    make_bridge(node)
    cluster.node("n1")
    agent = Agent(node, tmp_path, kubeconfig=kubeconfig, node_name="n1")
    try:
        yield rig, cluster, node, agent
    finally:
        agent.stop()


def call(
    node: Node,
    agent: Agent,
    command: str,
    conf: dict[str, Any],
    netns: str,
    cid: str,
    pod: tuple[str, str, str],
) -> tuple[int, dict[str, Any] | None, str]:
    full = {"cniVersion": "1.0.0", "name": "ovs-conf", **conf}
    return exec_plugin(node, agent.cni_path, command, full, netns=netns, cid=cid, pod=pod)


def veths(node: Node) -> list[str]:
    out = node.run("ip", "-o", "link", "show").stdout
    return sorted(
        line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ": veth" in line
    )


def pod_ports(node: Node) -> list[str]:
    return sorted(p for p in node.vsctl("list-ports", "br1").split() if p != "eth0")


@pytest.mark.root
def test_late_del_of_a_dead_sandbox_keeps_the_live_pod_reachable(
    node_agent: tuple[Rig, Cluster, Node, Agent],
) -> None:
    rig, cluster, node, agent = node_agent
    cluster.pool("pool", ips="172.18.30.131-172.18.30.140")
    conf = {"type": "underlay-ovs", "bridge": "br1", "ipam": IPAM}
    uid = cluster.pod("web")
    web = ("default", "web", uid)
    a, b = rig.add_pod("webA"), rig.add_pod("webB")
    rc, out, _ = call(node, agent, "ADD", conf, a.path, "sandbox-A", web)
    assert rc == 0 and out is not None
    rig.delete_pod("webA")  # sandbox A dies with its netns
    rc, out, _ = call(node, agent, "ADD", conf, b.path, "sandbox-B", web)
    assert rc == 0 and out is not None
    web_ip = out["ips"][0]["address"]
    rc, _, err = call(node, agent, "DEL", conf, "/run/netns/gone", "sandbox-A", web)
    assert rc == 0 and "incomplete" not in err, err
    assert allocated_ips(cluster.status("pool")) == {
        web_ip.split("/")[0]: {"pod": "default/web", "podUid": uid}
    }
    assert b.addresses("eth0") == [web_ip] and ovs_port_of(node, "sandbox-B") is not None

    db, probe = rig.add_pod("db"), rig.add_pod("probe")
    rc, out, _ = call(
        node, agent, "ADD", conf, db.path, "sandbox-db", ("default", "db", cluster.pod("db"))
    )
    assert rc == 0 and out is not None and out["ips"][0]["address"] != web_ip
    rc, _, _ = call(
        node,
        agent,
        "ADD",
        conf,
        probe.path,
        "sandbox-probe",
        ("default", "probe", cluster.pod("probe")),
    )
    assert rc == 0
    assert probe.ping(web_ip.split("/")[0]) and probe.ping(out["ips"][0]["address"].split("/")[0])
    assert b.ping(GATEWAY)


@pytest.mark.root
def test_parallel_adds_retries_and_dels_leave_nothing_behind(
    node_agent: tuple[Rig, Cluster, Node, Agent],
) -> None:
    """Many pods ADDed at once (some ADDs retried at the same time), then all DELeted at once,
    half after their netns is gone: every pod gets one distinct address, every DEL completes
    (no OVSDB cache race), and no port, veth, record or endpoint is left."""
    rig, cluster, node, agent = node_agent
    cluster.pool("pool", ips="172.18.40.1-172.18.40.100")
    conf = {"type": "underlay-ovs", "bridge": "br1", "ipam": IPAM}
    n = 16
    uids = cluster.pods([f"q{i}" for i in range(n)])
    pods = {i: (rig.add_pod(f"q{i}"), ("default", f"q{i}", uids[f"q{i}"])) for i in range(n)}
    results: list[tuple[int, int, dict[str, Any] | None, str]] = []

    def run(i: int, command: str, netns: str) -> None:
        rc, out, err = call(node, agent, command, conf, netns, f"cid{i}", pods[i][1])
        results.append((i, rc, out, err))

    threads = [threading.Thread(target=run, args=(i, "ADD", pods[i][0].path)) for i in range(n)]
    threads += [
        threading.Thread(target=run, args=(i, "ADD", pods[i][0].path)) for i in range(0, n, 4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r for r in results if r[1] != 0] == []
    addresses = {i: pod.addresses("eth0") for i, (pod, _) in pods.items()}
    assert all(len(a) == 1 for a in addresses.values()), addresses
    assert not [a for a, k in Counter(a[0] for a in addresses.values()).items() if k > 1]
    assert len(pod_ports(node)) == n and len(veths(node)) == n
    assert len(allocated_ips(cluster.status("pool"))) == n

    results.clear()
    paths = {i: pod.path for i, (pod, _) in pods.items()}
    for i in range(1, n, 2):
        rig.delete_pod(f"q{i}")
    threads = [threading.Thread(target=run, args=(i, "DEL", paths[i])) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(i, err) for i, rc, _, err in results if rc != 0 or err.strip()] == []
    assert pod_ports(node) == []
    wait_for(lambda: veths(node) == [], what="host veths deleted")
    assert allocated_ips(cluster.status("pool")) == {}
    assert cluster.endpoints.list("default")["items"] == []


@pytest.mark.root
def test_port_refused_by_vswitchd_fails_the_add_and_is_rolled_back(
    node_agent: tuple[Rig, Cluster, Node, Agent],
) -> None:
    """``interface_type: internal`` on a veth: ovs-vswitchd refuses the port. The ADD must
    not report success; port, veth, IP record and endpoint are all undone."""
    rig, cluster, node, agent = node_agent
    cluster.pool("pool", ips="172.18.30.131-172.18.30.140")
    pod = rig.add_pod("p1")
    who = ("default", "p1", cluster.pod("p1"))
    conf = {"type": "underlay-ovs", "bridge": "br1", "interface_type": "internal", "ipam": IPAM}
    rc, out, _ = call(node, agent, "ADD", conf, pod.path, "cid1", who)
    assert rc == 1 and out is not None and out["code"] == 106, out
    assert "refused port veth" in out["msg"] and "interface_type internal" in out["msg"]
    assert "could not open network device" in out["msg"]
    assert pod_ports(node) == [] and veths(node) == [] and not pod.link_exists("eth0")
    assert allocated_ips(cluster.status("pool")) == {} and cluster.endpoint("p1") is None
    # the same pod with a working config attaches and reaches the gateway
    ok = {"type": "underlay-ovs", "bridge": "br1", "ipam": IPAM}
    rc, out, _ = call(node, agent, "ADD", ok, pod.path, "cid1", who)
    assert rc == 0 and pod.ping(GATEWAY)


@pytest.mark.root
@pytest.mark.parametrize(
    ("conf", "env_ifname", "code", "words"),
    [
        ({"mac": "zz:zz:zz:zz:zz:zz"}, "eth0", 7, "mac 'zz:zz:zz:zz:zz:zz' is not a MAC address"),
        ({"mac": "01:00:5e:00:00:01"}, "eth0", 7, "multicast MAC"),
        ({}, "eth0:1", 4, "CNI_IFNAME 'eth0:1' is not a valid interface name"),
    ],
)
def test_bad_input_gets_a_clear_code_and_changes_nothing(
    node_agent: tuple[Rig, Cluster, Node, Agent],
    conf: dict[str, Any],
    env_ifname: str,
    code: int,
    words: str,
) -> None:
    rig, cluster, node, agent = node_agent
    cluster.pool("pool", ips="172.18.30.131-172.18.30.140")
    pod = rig.add_pod("p1")
    full = {
        "cniVersion": "1.0.0",
        "name": "ovs-conf",
        "type": "underlay-ovs",
        "bridge": "br1",
        "ipam": IPAM,
        **conf,
    }
    rc, out, _ = exec_plugin(
        node, agent.cni_path, "ADD", full, netns=pod.path, cid="c1", ifname=env_ifname,
        pod=("default", "p1", cluster.pod("p1")),
    )  # fmt: skip
    assert rc == 1 and out is not None and out["code"] == code and words in out["msg"], out
    assert pod_ports(node) == [] and veths(node) == []
    assert allocated_ips(cluster.status("pool")) == {}


@pytest.mark.root
def test_port_lookups_from_many_threads_while_ovsdb_changes(rig: Rig) -> None:
    """The agent looks ports up from its worker threads while its OVSDB connection thread
    applies updates from ovsdb-server (ports added, ovs-vswitchd setting errors, ports
    removed). No lookup may fail or see a half-updated row."""
    from node_agent.cni import ports
    from node_agent.ovsdb import disconnect

    node = rig.add_node("n1", "172.18.10.11")
    make_bridge(node)
    api = ports.connect(node.ovsdb)
    errors: list[str] = []
    lookups = [0]
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                for p in ports.find_pod_ports(api, contIface="eth0"):
                    assert p.name.startswith("vx") and p.bridge in ("br1", None)
                assert ports.bridge_exists(api, "br1")
                ports.wait_ofport(api, "vx0", timeout=0)
                lookups[0] += 1
                time.sleep(0.001)  # let the connection thread apply updates in between
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    readers = [threading.Thread(target=reader) for _ in range(6)]
    for t in readers:
        t.start()
    try:
        ext = {ports.EXT_OWNER: ports.OWNER, ports.EXT_IFNAME: "eth0"}
        for i in range(30):  # devices that do not exist: vswitchd writes an error on each
            names = [f"vx{i}-{k}" for k in range(5)]
            for name in names:
                ports.attach_port(
                    api, "br1", name, {**ext, ports.EXT_CONTAINER_ID: name}, wait=False
                )
            ports.detach_ports(api, names)
    finally:
        stop.set()
        for t in readers:
            t.join()
        disconnect(api)
    assert errors == [], errors[:5]
    assert lookups[0] > 0
    assert pod_ports(node) == []
