"""Bridge engine on the real rig: real ovsdb-server/ovs-vswitchd per node, real namespaces.

Each test builds its own rig (random prefix) and removes it. Facts checked with the tools an
operator would use (ovs-vsctl, ip, ping, netplan generate, nmcli --offline).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent import bridges, ovs, ovsdb, probe
from node_agent.bridges import DesiredBridge, NodeContext

from tests.rig import APISERVER_IP, GATEWAY, Node, Rig

API_PORT = 6443
N1_IP = "172.18.10.11"
N2_IP = "172.18.10.12"


def ovs_bridge(name: str = "br1", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "underlay.dev/v1alpha1",
        "kind": "OvsBridge",
        "metadata": {"name": name},
        "spec": {"uplinks": ["eth0"], "probeTimeoutSeconds": 3, **spec},
    }


class Agent:
    """One node of the rig with an OVSDB connection and a NodeContext, closed by the test."""

    def __init__(self, rig: Rig, name: str, ip: str, *, netplan: bool = True) -> None:
        self.node: Node = rig.add_node(name, ip)
        if netplan:  # the node is configured with netplan (auto -> netplan)
            (self.node.root / "etc/netplan").mkdir(parents=True)
            base = self.node.root / "etc/netplan/50-cloud-init.yaml"
            base.write_text("network:\n  version: 2\n")
            base.chmod(0o600)
        else:
            self.node.root.mkdir(parents=True, exist_ok=True)
        self.api = ovsdb.connect(self.node.ovsdb)
        self.ctx = NodeContext(
            name, self.api, self.node.name, self.node.root, (APISERVER_IP, API_PORT)
        )

    def desired(self, obj: dict[str, Any]) -> DesiredBridge:
        return DesiredBridge.from_object(obj, self.ctx.name)

    def reconnect(self) -> None:
        ovsdb.disconnect(self.api)
        self.api = ovsdb.connect(self.node.ovsdb)
        self.ctx.ovsdb = self.api

    def close(self) -> None:
        ovsdb.disconnect(self.api)


@pytest.fixture
def agents(rig: Rig) -> Iterator[list[Agent]]:
    """Nodes are added by the test with ``add``; the API server listens on 172.18.0.2:6443."""
    created: list[Agent] = []
    listener = rig.switch.listen_tcp(APISERVER_IP, API_PORT)
    yield created
    listener.close()
    for a in created:
        a.close()


def add(agents: list[Agent], rig: Rig, name: str, ip: str, **kw: Any) -> Agent:
    a = Agent(rig, name, ip, **kw)
    agents.append(a)
    return a


def files_under(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode & 0o7777)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def state(a: Agent) -> dict[str, Any]:
    """Everything a change could touch: addresses, routes, links, OVS, files. IPv6 duplicate
    address detection progress ("tentative") is the kernel's timing, not state we change."""
    snap = a.node.snapshot()
    snap["addr"] = snap["addr"].replace(" tentative", "")
    return {**snap, "ovs": a.node.ovs_show(), "files": files_under(a.node.root)}


def wait_carrier(node: Node, dev: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "NO-CARRIER" not in node.run("ip", "link", "show", dev).stdout:
            time.sleep(0.2)  # let the kernel clear "linkdown" on routes
            return
        time.sleep(0.05)
    raise AssertionError(f"{dev} of {node.name} has no carrier")


def mac(node: Node, dev: str) -> str:
    return node.run("cat", f"/sys/class/net/{dev}/address").stdout.strip()


def plug_pod(rig: Rig, node: Node, pod_name: str, ip: str, **external_ids: str) -> str:
    """A pod namespace with eth0=ip/16 whose veth peer is a port of br1 (built with ip/vsctl)."""
    pod = rig.add_pod(pod_name)
    host = f"vp{pod_name}"[:15]
    node.run("ip", "link", "add", host, "type", "veth", "peer", "name", "podtmp0")
    node.run("ip", "link", "set", "podtmp0", "netns", pod.name)
    pod.run("ip", "link", "set", "podtmp0", "name", "eth0")
    pod.run("ip", "addr", "add", f"{ip}/16", "dev", "eth0")
    pod.run("ip", "link", "set", "eth0", "up")
    node.run("ip", "link", "set", host, "up")
    args = ["add-port", "br1", host]
    if external_ids:
        args += [
            "--",
            "set",
            "Port",
            host,
            *(f"external_ids:{k}={v}" for k, v in external_ids.items()),
        ]
    node.vsctl(*args)
    return host


# --- enact ----------------------------------------------------------------------------------


def test_enact_moves_node_onto_br1_and_is_idempotent(rig: Rig, agents: list[Agent]) -> None:
    a = add(agents, rig, "n1", N1_IP)
    add(agents, rig, "n2", N2_IP)
    eth0_mac = mac(a.node, "eth0")
    d = a.desired(ovs_bridge())

    res = bridges.enact(d, a.ctx)

    assert res.status == "changed", res.reason
    assert res.probe is not None and res.probe.ok
    assert (
        a.node.vsctl("get", "Bridge", "br1", "datapath_type") == "netdev"
    )  # detected: no kernel DP
    assert sorted(a.node.vsctl("list-ports", "br1").split()) == ["eth0"]
    assert a.node.vsctl("get", "Interface", "br1", "type") == "internal"
    assert a.node.vsctl("br-get-external-id", "br1", ovs.OWNER_KEY) == ovs.OWNER_AGENT
    assert a.node.addresses("br1") == [f"{N1_IP}/16"]
    assert a.node.addresses("eth0") == []
    assert a.node.default_route_dev() == "br1"
    assert f"default via {GATEWAY} dev br1" in a.node.run("ip", "route").stdout
    assert mac(a.node, "br1") == eth0_mac
    assert a.node.ping(GATEWAY)
    assert a.node.ping(N2_IP)
    netplan_file = a.node.root / "etc/netplan/60-underlay-br1.yaml"
    assert netplan_file.stat().st_mode & 0o777 == 0o600
    if shutil.which("netplan"):
        proc = subprocess.run(["netplan", "generate", "--root-dir", str(a.node.root)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr

    before = state(a)
    inode = netplan_file.stat().st_ino
    again = bridges.enact(d, a.ctx)
    assert again.status == "unchanged"
    assert again.changes == () and again.files == ()
    assert netplan_file.stat().st_ino == inode  # not rewritten
    assert state(a) == before
    assert bridges.plan(d, a.ctx).empty
    assert bridges.drift(d, a.ctx) == []


def test_pods_on_br1_of_two_nodes_ping_across_the_switch(rig: Rig, agents: list[Agent]) -> None:
    n1 = add(agents, rig, "n1", N1_IP)
    n2 = add(agents, rig, "n2", N2_IP)
    for a in (n1, n2):
        assert bridges.enact(a.desired(ovs_bridge()), a.ctx).status == "changed"
    plug_pod(rig, n1.node, "p1", "172.18.20.1")
    plug_pod(rig, n2.node, "p2", "172.18.20.2")
    assert rig.pods["p1"].ping("172.18.20.2", count=3)
    assert rig.pods["p2"].ping(N1_IP)  # a pod reaches the other node's address on br1


def test_noop_plan_changes_nothing_and_shows_the_files(rig: Rig, agents: list[Agent]) -> None:
    a = add(agents, rig, "n1", N1_IP)
    before = state(a)
    p = bridges.plan(a.desired(ovs_bridge(mtu=1400)), a.ctx)
    text = bridges.format_plan(p)
    assert state(a) == before
    assert p.datapath == "netdev" and p.backend == "netplan"
    assert "create OVS bridge br1 (datapath_type netdev)" in text
    assert f"move address {N1_IP}/16 from eth0 to br1" in text
    assert "--- /etc/netplan/60-underlay-br1.yaml (mode 0600)" in text
    assert "mtu: 1400" in text
    assert set(p.files) == {
        "/etc/netplan/60-underlay-br1.yaml",
        "/var/lib/underlay/bridges/br1.json",
    }


def test_mtu_goes_to_bridge_and_uplink(rig: Rig, agents: list[Agent]) -> None:
    a = add(agents, rig, "n1", N1_IP)
    res = bridges.enact(a.desired(ovs_bridge(mtu=1400)), a.ctx)
    assert res.status == "changed", res.reason
    deadline = time.monotonic() + 5
    while (
        time.monotonic() < deadline
        and "mtu 1400" not in a.node.run("ip", "link", "show", "br1").stdout
    ):
        time.sleep(0.05)
    assert "mtu 1400" in a.node.run("ip", "link", "show", "br1").stdout
    assert "mtu 1400" in a.node.run("ip", "link", "show", "eth0").stdout
    assert a.node.ping(GATEWAY)


def test_networkmanager_backend_keyfiles_pass_nmcli(rig: Rig, agents: list[Agent]) -> None:
    a = add(agents, rig, "n1", N1_IP, netplan=False)
    (a.node.root / "etc/NetworkManager/system-connections").mkdir(parents=True)
    res = bridges.enact(a.desired(ovs_bridge()), a.ctx)  # persistence auto -> networkmanager
    assert res.status == "changed", res.reason
    keyfiles = sorted((a.node.root / "etc/NetworkManager/system-connections").iterdir())
    assert len(keyfiles) == 5
    conf = a.node.root / "etc/NetworkManager/conf.d/90-underlay-unmanaged-veth.conf"
    assert "unmanaged-devices+=interface-name:veth*" in conf.read_text()
    iface = next(k for k in keyfiles if k.name.endswith("-if.nmconnection")).read_text()
    assert f"address1={N1_IP}/16" in iface and f"gateway={GATEWAY}" in iface
    assert (
        "datapath-type=netdev"
        in next(k for k in keyfiles if k.name.endswith("-br.nmconnection")).read_text()
    )
    if shutil.which("nmcli") is None:
        pytest.skip("nmcli not installed")
    for k in keyfiles:
        assert k.stat().st_mode & 0o777 == 0o600
        proc = subprocess.run(["nmcli", "--offline", "connection", "modify"], input=k.read_text(),
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert proc.returncode == 0, f"{k.name}: {proc.stderr}"


# --- probes and rollback --------------------------------------------------------------------


def test_gateway_probe_failure_rolls_back_everything(rig: Rig, agents: list[Agent]) -> None:
    a = add(agents, rig, "n1", N1_IP)
    before = state(a)
    # unplug the switch side of the node's cable: the gateway can no longer answer
    rig.switch.run("ip", "link", "set", f"{rig.prefix}n1"[:15], "down")
    t0 = time.monotonic()
    res = bridges.enact(a.desired(ovs_bridge(probeTimeoutSeconds=2)), a.ctx)
    elapsed = time.monotonic() - t0
    assert res.status == "rolled-back"
    assert res.reason is not None and "probe gateway failed" in res.reason
    assert res.probe is not None and res.probe.failed == "gateway"
    assert "create OVS bridge br1 (datapath_type netdev)" in res.changes  # it did try
    assert res.rollback  # and undid it
    assert 2 <= elapsed < 10
    assert not a.node.link_exists("br1")
    rig.switch.run("ip", "link", "set", f"{rig.prefix}n1"[:15], "up")  # carrier back
    wait_carrier(a.node, "eth0")
    assert state(a) == before  # addresses, routes, links, OVS and files exactly as before
    assert a.node.ping(GATEWAY)


def test_api_server_probe_failure_rolls_back(rig: Rig, agents: list[Agent]) -> None:
    a = add(agents, rig, "n1", N1_IP)
    a.ctx.api_server = (APISERVER_IP, API_PORT + 1)  # nothing listens there
    before = state(a)
    res = bridges.enact(a.desired(ovs_bridge(probeTimeoutSeconds=2)), a.ctx)
    assert res.status == "rolled-back"
    assert res.probe is not None and res.probe.failed == "api-server"
    assert f"{APISERVER_IP}:{API_PORT + 1}" in (res.reason or "")
    assert state(a) == before


def test_failed_change_of_an_existing_bridge_restores_it(rig: Rig, agents: list[Agent]) -> None:
    """Rollback of a change to a bridge that already carried the node (MTU change)."""
    a = add(agents, rig, "n1", N1_IP)
    assert bridges.enact(a.desired(ovs_bridge()), a.ctx).status == "changed"
    before = state(a)
    rig.switch.run("ip", "link", "set", f"{rig.prefix}n1"[:15], "down")
    res = bridges.enact(a.desired(ovs_bridge(mtu=1400, probeTimeoutSeconds=1)), a.ctx)
    assert res.status == "rolled-back", res
    rig.switch.run("ip", "link", "set", f"{rig.prefix}n1"[:15], "up")
    wait_carrier(a.node, "eth0")
    deadline = time.monotonic() + 5  # vswitchd applies the restored mtu_request asynchronously
    while time.monotonic() < deadline and state(a) != before:
        time.sleep(0.1)
    assert state(a) == before
    assert a.node.ping(GATEWAY)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (ovs_bridge(uplinks=["eth7"]), "uplink eth7 does not exist on node n1"),
        (ovs_bridge("br-sixteen-chars"), "'br-sixteen-chars' is 16 characters"),
        (ovs_bridge(datapathType="system"), "kernel datapath is not usable"),
    ],
)
def test_bad_input_changes_nothing(
    rig: Rig, agents: list[Agent], obj: dict[str, Any], reason: str
) -> None:
    a = add(agents, rig, "n1", N1_IP)
    before = state(a)
    d = a.desired(obj)
    p = bridges.plan(d, a.ctx)
    assert any(reason in r for r in p.invalid), p.invalid
    res = bridges.enact(d, a.ctx)
    assert res.status == "invalid"
    assert res.reason is not None and reason in res.reason
    assert state(a) == before


def test_uplink_already_in_another_bridge_is_refused(rig: Rig, agents: list[Agent]) -> None:
    a = add(agents, rig, "n1", N1_IP)
    a.node.vsctl("add-br", "br0", "--", "set", "Bridge", "br0", "datapath_type=netdev")
    a.node.vsctl("add-port", "br0", "eth0")
    before = state(a)
    res = bridges.enact(a.desired(ovs_bridge()), a.ctx)
    assert res.status == "invalid"
    assert "uplink eth0 is already a port of OVS bridge br0" in (res.reason or "")
    assert state(a) == before


def test_bridge_named_like_another_nic_is_refused(rig: Rig, agents: list[Agent]) -> None:
    """A data NIC eth1 exists: an OvsBridge named eth1 over eth0 would move the node's
    address onto the NIC and cut it off (found by a hostile test): refused, nothing changed."""
    a = add(agents, rig, "n1", N1_IP)
    a.node.run("ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p")
    before = state(a)
    res = bridges.enact(a.desired(ovs_bridge("data", bridge="eth1")), a.ctx)
    assert res.status == "invalid"
    assert (
        "node n1 already has a network interface named eth1 (veth) that is not an OVS bridge"
        in (res.reason or "")
    )
    assert state(a) == before


# --- reboot, removal, drift -----------------------------------------------------------------


def test_reboot_replay_brings_bridge_and_addresses_back(rig: Rig, agents: list[Agent]) -> None:
    a = add(agents, rig, "n1", N1_IP)
    d = a.desired(ovs_bridge())
    assert bridges.enact(d, a.ctx).status == "changed"
    eth0_mac = mac(a.node, "eth0")
    # reboot: OVS database gone, addresses flushed
    ovsdb.disconnect(a.api)
    a.node.reboot_ovs()
    # vswitchd stopped without --cleanup leaves its netdev taps; a reboot would not
    for dev in ("br1", "ovs-netdev"):
        a.node.run("ip", "link", "del", dev, check=False)
    a.node.run("ip", "addr", "flush", "dev", "eth0")
    assert not a.node.link_exists("br1")
    assert a.node.addresses("eth0") == []
    assert not a.node.ping(GATEWAY, count=1, timeout=1)
    a.reconnect()

    res = bridges.enact(d, a.ctx)

    assert res.status == "changed", res.reason
    assert any("add address" in c and "br1" in c for c in res.changes)
    assert sorted(a.node.vsctl("list-ports", "br1").split()) == ["eth0"]
    assert a.node.addresses("br1") == [f"{N1_IP}/16"]
    assert a.node.default_route_dev() == "br1"
    assert mac(a.node, "br1") == eth0_mac
    assert a.node.ping(GATEWAY)
    assert bridges.enact(d, a.ctx).status == "unchanged"


def test_remove_is_blocked_by_pod_ports_then_restores_the_uplink(
    rig: Rig, agents: list[Agent]
) -> None:
    a = add(agents, rig, "n1", N1_IP)
    before = state(a)
    d = a.desired(ovs_bridge())
    assert bridges.enact(d, a.ctx).status == "changed"
    port = plug_pod(rig, a.node, "p1", "172.18.20.1", contNetns="/run/netns/x", contIface="eth0",
                    contPodUid="uid-1", owner="underlay-ovs")  # fmt: skip
    assert [p.name for p in ovs.pod_ports(a.api, "br1")] == [port]
    blocked_state = state(a)

    res = bridges.remove(d, a.ctx)

    assert res.status == "blocked"
    assert port in (res.reason or "") and "uid-1" in (res.reason or "")
    assert state(a) == blocked_state  # nothing touched
    a.node.vsctl("del-port", "br1", port)
    rig.delete_pod("p1")

    res = bridges.remove(d, a.ctx)

    assert res.status == "removed", res.reason
    assert "/etc/netplan/60-underlay-br1.yaml" in res.files
    after = state(a)
    assert after["addr"] == before["addr"]  # address back on eth0, same MAC/flags
    assert after["route4"] == before["route4"]
    assert after["ovs"] == before["ovs"]
    assert after["files"] == before["files"]
    assert a.node.ping(GATEWAY)
    assert bridges.remove(d, a.ctx).status == "absent"


def test_drift_is_detected_and_enact_repairs_it(rig: Rig, agents: list[Agent]) -> None:
    a = add(agents, rig, "n1", N1_IP)
    d = a.desired(ovs_bridge())
    assert bridges.enact(d, a.ctx).status == "changed"
    a.node.vsctl("del-port", "br1", "eth0")
    netplan_file = a.node.root / "etc/netplan/60-underlay-br1.yaml"
    netplan_file.write_text(
        netplan_file.read_text().replace("openvswitch: {}", "openvswitch: {fail-mode: secure}")
    )
    kinds = {x.kind for x in bridges.drift(d, a.ctx)}
    assert kinds == {"uplink-port-missing", "file-edited"}
    res = bridges.enact(d, a.ctx)
    assert res.status == "changed", res.reason
    assert "fail-mode" not in netplan_file.read_text()
    assert bridges.drift(d, a.ctx) == []
    assert a.node.ping(GATEWAY)
    a.node.vsctl("del-br", "br1")
    assert "bridge-missing" in {x.kind for x in bridges.drift(d, a.ctx)}


def test_watchers_call_back_within_5_seconds(rig: Rig, agents: list[Agent]) -> None:
    a = add(agents, rig, "n1", N1_IP)
    d = a.desired(ovs_bridge())
    assert bridges.enact(d, a.ctx).status == "changed"
    seen_ovs: list[str] = []
    seen_file: list[str] = []
    got_ovs, got_file = threading.Event(), threading.Event()
    ow = bridges.OvsdbWatcher(a.api, ["br1"], lambda b: (seen_ovs.append(b), got_ovs.set()))
    fw = bridges.FileWatcher(a.node.root, bridges.watched_paths(d, a.ctx),
                             lambda p: (seen_file.append(p), got_file.set()))  # fmt: skip
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        a.node.vsctl("del-port", "br1", "eth0")
        assert got_ovs.wait(5), "no OVSDB callback"
        (a.node.root / "etc/netplan/60-underlay-br1.yaml").write_text("network: {version: 2}\n")
        assert got_file.wait(5), "no file callback"
        assert time.monotonic() - t0 < 5
        assert "br1" in seen_ovs
        assert "/etc/netplan/60-underlay-br1.yaml" in seen_file
    finally:
        ow.stop()
        fw.stop()


def test_two_uplinks_make_one_bond_port(rig: Rig, agents: list[Agent]) -> None:
    """Structure only: the rig's switch is one Linux bridge, so a bond's backup leg would loop."""
    a = add(agents, rig, "n1", N1_IP)
    a.node.run("ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1peer")
    d = a.desired(ovs_bridge(uplinks=["eth0", "eth1"], bondMode="balance-slb"))
    res = bridges.enact(d, a.ctx, run_probes=False)
    assert res.status == "changed", res.reason
    assert res.probe is None
    assert a.node.vsctl("list-ports", "br1").split() == ["br1-bond"]
    assert a.node.vsctl("get", "Port", "br1-bond", "bond_mode") == "balance-slb"
    ifaces = a.node.vsctl(
        "--columns=name", "--bare", "find", "Interface", f"external_ids:{ovs.BRIDGE_KEY}=br1"
    )
    assert sorted(ifaces.split()) == ["br1", "eth0", "eth1"]
    assert a.node.run("ip", "link", "show", "eth1").stdout.count(",UP") == 1  # uplinks brought up
    assert bridges.enact(d, a.ctx, run_probes=False).status == "unchanged"
    # back to one uplink: the bond port is replaced by port eth0 in one transaction
    one = a.desired(ovs_bridge())
    assert bridges.enact(one, a.ctx, run_probes=False).status == "changed"
    assert sorted(a.node.vsctl("list-ports", "br1").split()) == ["eth0"]


def test_probes_answer_and_fail_by_name(rig: Rig, agents: list[Agent]) -> None:
    a = add(agents, rig, "n1", N1_IP)
    ns = a.node.name
    assert probe.icmp_echo(GATEWAY, 1.0, ns)
    assert not probe.icmp_echo("172.18.99.99", 0.3, ns)  # nobody has it
    assert probe.tcp_connect(APISERVER_IP, API_PORT, 1.0, ns)
    assert not probe.tcp_connect(APISERVER_IP, API_PORT + 1, 1.0, ns)
    ok = probe.run_probes(probe.ProbeTargets(GATEWAY, (APISERVER_IP, API_PORT), 2.0), ns)
    assert ok.ok and ok.failed is None
    bad = probe.run_probes(probe.ProbeTargets("172.18.99.99", (APISERVER_IP, API_PORT), 1.0), ns)
    assert (bad.ok, bad.failed) == (False, "gateway")
    assert 1.0 <= bad.elapsed < 3
