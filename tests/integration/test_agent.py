"""``underlay agent`` as a process on the real rig, against the real Kubernetes control plane.

Each test builds rig nodes (network namespaces with their own ovsdb-server/ovs-vswitchd), runs
the agent inside a node namespace exactly as the DaemonSet runs it on a node (as the agent's
ServiceAccount with deploy/rbac.yaml, ``POD_NAMESPACE=underlay-system``, reaching
kube-apiserver at 172.18.0.2:6443 over the rig's switch through the test's fault proxy),
changes OvsBridge objects through the API and checks the node with the tools an operator would
use (ovs-vsctl, ip, netplan, nmcli) and the enactments and Node capacity through the API.

The helpers at the top (:class:`Cluster`, :class:`AgentProcess`, :func:`node_state`...) are
shared by the other ``test_agent_*.py`` modules.
"""

from __future__ import annotations

import difflib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.utils import parse_quantity
from node_agent import rollout

from reconciler import vocab
from tests.controlplane.cluster import Kube
from tests.integration.test_bridges import plug_pod
from tests.rig import APISERVER_IP, DATA_GATEWAY, GATEWAY, Node, Rig, wait_for

ROOT = Path(__file__).resolve().parents[2]
UNDERLAY = str(Path(sys.executable).parent / "underlay")
API_PORT = 6443
IPS = {"n1": "172.18.10.11", "n2": "172.18.10.12", "n3": "172.18.10.13"}
DATA_IPS = {"n1": "172.19.10.11", "n2": "172.19.10.12", "n3": "172.19.10.13"}
NETPLAN_FILE = "etc/netplan/60-underlay-br1.yaml"
RECORD_FILE = "var/lib/underlay/bridges/br1.json"
AGENT_NAMESPACE = "underlay-system"
AGENT_ENV = {**os.environ, "POD_NAMESPACE": AGENT_NAMESPACE, "PYTHONFAULTHANDLER": "1"}
"""The DaemonSet's environment (deploy/agent.yaml: POD_NAMESPACE from the downward API), so
the rollout slot Leases live in underlay-system, where deploy/rbac.yaml's Role grants them."""
ROLLOUT_CONDITIONS = ("Ready", "Progressing", "Failing", "Pending", "Aborted")


def ovs_bridge(name: str = "br1", **spec: Any) -> dict[str, Any]:
    """An OvsBridge object (short probe timeout, as tests want failures fast)."""
    return {
        "apiVersion": vocab.UNDERLAY_API_VERSION,
        "kind": vocab.OVS_BRIDGE.kind,
        "metadata": {"name": name},
        "spec": {"uplinks": ["eth0"], "probeTimeoutSeconds": 2, "persistence": "auto", **spec},
    }


def slot_leases(kube: Kube) -> list[Any]:
    """The rollout slot Leases, in the agents' namespace (underlay-system, where the
    DaemonSet's POD_NAMESPACE puts them; other Leases there are not ours)."""
    return [
        lease
        for lease in kube.coord.list_namespaced_lease(AGENT_NAMESPACE).items
        if lease.metadata.name.startswith(rollout.LEASE_PREFIX + ".")
    ]


class Cluster:
    """The real control plane (the ``kube`` fixture) as the agents see it: each agent runs as
    the agent's ServiceAccount (exactly deploy/rbac.yaml) through this test's fault proxy,
    which listens on the rig's API address 172.18.0.2:6443 in the switch namespace, as nodes
    reach an API server. The test's own setup and assertions use the admin clients
    (:attr:`core`, :attr:`custom`, :attr:`coord`), straight to the server and never logged."""

    def __init__(self, kube: Kube, rig: Rig, workdir: Path) -> None:
        self.kube = kube
        url = kube.listen_in_netns(rig.switch.path, APISERVER_IP, API_PORT)
        self.node_kubeconfig = str(kube.agent_kubeconfig(workdir / "agent.kubeconfig", url))
        self.api = kube.api
        self.core = kube.core
        self.custom = kube.custom
        self.coord = kube.coord

    def add_node(self, name: str, **labels: str) -> None:
        self.kube.create_node(name, labels)

    def label_node(self, name: str, labels: dict[str, str | None]) -> None:
        self.core.patch_node(name, {"metadata": {"labels": labels}})

    def apply_bridge(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create the OvsBridge, or replace its spec (a new generation when it differs)."""
        r = vocab.OVS_BRIDGE
        try:
            cur = self.custom.get_cluster_custom_object(
                r.group, r.version, r.plural, obj["metadata"]["name"]
            )
        except client.ApiException as exc:
            assert exc.status == 404
            return self.custom.create_cluster_custom_object(r.group, r.version, r.plural, obj)  # type: ignore[no-any-return]
        cur["spec"] = obj["spec"]
        return self.custom.replace_cluster_custom_object(  # type: ignore[no-any-return]
            r.group, r.version, r.plural, obj["metadata"]["name"], cur
        )

    def delete_bridge(self, name: str) -> None:
        r = vocab.OVS_BRIDGE
        self.custom.delete_cluster_custom_object(r.group, r.version, r.plural, name)

    def enactment(self, node: str, bridge: str = "br1") -> dict[str, Any] | None:
        r = vocab.OVS_BRIDGE_ENACTMENT
        try:
            return self.custom.get_cluster_custom_object(  # type: ignore[no-any-return]
                r.group, r.version, r.plural, f"{node}.{bridge}"
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def condition(self, node: str, bridge: str = "br1") -> tuple[str | None, str, str]:
        """(the True condition's type or None, its reason, its message) of an enactment; of
        the five rollout conditions (Ready, Progressing, Failing, Pending, Aborted) only: a
        condition of another type says something else and may be True alongside one of them."""
        e = self.enactment(node, bridge)
        for c in ((e or {}).get("status") or {}).get("conditions") or []:
            if c["status"] == "True" and c["type"] in ROLLOUT_CONDITIONS:
                return c["type"], c.get("reason", ""), c.get("message", "")
        return None, "", ""

    def wait_condition(
        self, node: str, ctype: str, bridge: str = "br1", timeout: float = 20.0
    ) -> tuple[str | None, str, str]:
        return wait_for(  # type: ignore[no-any-return]
            lambda: (c := self.condition(node, bridge))[0] == ctype and c,
            timeout,
            f"enactment {node}.{bridge} {ctype}",
        )

    def capacity(self, node: str) -> dict[str, str]:
        st = self.core.read_node(node).status
        return dict((st.capacity if st else None) or {})

    def published(self, node: str, bridge: str = "br1", timeout: float = 5.0) -> Any:
        """Wait until Node ``node`` publishes ``underlay.dev/<bridge>`` (the agent patches it
        a request after it wrote the Ready status); returns the quantity."""
        return parse_quantity(
            wait_for(
                lambda: self.capacity(node).get(f"underlay.dev/{bridge}"),
                timeout,
                f"{node} publishing underlay.dev/{bridge}",
            )
        )

    def writes(self) -> list[str]:
        """Write requests the agents sent (through the proxy) since the last reset, as
        "VERB path"."""
        return [f"{r.method} {r.path}" for r in self.kube.requests(writes=True)]

    def slot_leases(self) -> list[Any]:
        """The rollout slot Leases (:func:`slot_leases`)."""
        return slot_leases(self.kube)


class AgentProcess:
    """``underlay agent`` running inside a rig node (as the DaemonSet runs it on a node)."""

    def __init__(
        self, node: Node, name: str, kubeconfig: str, *args: str, resync: float = 1.0
    ) -> None:
        self.node, self.name = node, name
        self.socket = str(node.rundir / "agent.sock")
        self.log = node.rundir / "agent.log"
        self.argv = [
            UNDERLAY, "-v", "agent", "--node-name", name, "--kubeconfig", kubeconfig,
            "--ovsdb", node.ovsdb, "--socket", self.socket, "--root", str(node.root),
            "--resync", str(resync), "--rollout-retry", "0.5", *args,
        ]  # fmt: skip
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as logf:
            self.proc = node.popen(*self.argv, stdout=logf, stderr=subprocess.STDOUT, env=AGENT_ENV)
        wait_for(
            lambda: Path(self.socket).exists() or self.proc.poll() is not None, 20, "agent socket"
        )
        assert self.proc.poll() is None, self.text()

    def text(self) -> str:
        """This process's log."""
        return self.log.read_bytes()[self.offset :].decode(errors="replace")

    def wait_log(self, needle: str, timeout: float = 20.0) -> str:
        return wait_for(lambda: needle in self.text() and self.text(), timeout, f"log {needle!r}")  # type: ignore[no-any-return]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait; returns the exit code (kills after ``timeout`` s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(
                    f"agent {self.name} ignored {sig}:\n{self.text()[-3000:]}"
                ) from exc
        return self.proc.returncode


def netplan_node(node: Node) -> Node:
    """Make ``node`` look configured by netplan (persistence auto -> netplan)."""
    d = node.root / "etc/netplan"
    d.mkdir(parents=True)
    base = d / "50-cloud-init.yaml"
    base.write_text("network:\n  version: 2\n")
    base.chmod(0o600)
    return node


def networkmanager_node(node: Node) -> Node:
    """Make ``node`` look configured by NetworkManager (persistence auto -> networkmanager)."""
    (node.root / "etc/NetworkManager/system-connections").mkdir(parents=True)
    return node


def files_under(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode & 0o7777)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def node_state(node: Node) -> dict[str, Any]:
    """Everything the agent could change on a node: addresses, routes, links, OVS, files
    (IPv6 DAD progress, "tentative", is the kernel's timing, not a change)."""
    snap = node.snapshot()
    snap["addr"] = snap["addr"].replace(" tentative", "")
    return {**snap, "ovs": node.ovs_show(), "files": files_under(node.root)}


def assert_same_state(after: dict[str, Any], before: dict[str, Any]) -> None:
    """``after == before`` for two :func:`node_state` results, failing with a diff."""
    for key in before.keys() | after.keys():
        a, b = after.get(key), before.get(key)
        if a != b:
            if isinstance(a, str) and isinstance(b, str):
                lines = "\n".join(difflib.unified_diff(b.splitlines(), a.splitlines(), lineterm=""))
            else:
                lines = f"before: {b!r}\nafter:  {a!r}"
            raise AssertionError(f"node state {key!r} changed:\n{lines}")


class World:
    """A rig, the control plane, and the agents a test starts (all stopped at the end; the
    ``kube`` fixture removes what the test made in the cluster)."""

    def __init__(self, kube: Kube, rig: Rig, tmp: Path) -> None:
        self.rig = rig
        self.tmp = tmp
        self.cluster = Cluster(kube, rig, tmp)
        self.agents: list[AgentProcess] = []

    def node(self, name: str, *, persistence: str = "netplan", data: bool = False) -> Node:
        """Rig node ``name`` (eth0 = IPS[name]) with its Node object; ``persistence``:
        netplan, networkmanager or none (what ``auto`` detects); ``data``: also eth1 on the
        data segment (DATA_IPS[name]) with a default route of metric 200."""
        node = self.rig.add_node(name, IPS[name])
        node.root.mkdir(parents=True, exist_ok=True)
        if persistence == "netplan":
            netplan_node(node)
        elif persistence == "networkmanager":
            networkmanager_node(node)
        if data:
            if "data" not in self.rig.networks:
                self.rig.add_network()
            self.rig.add_nic(name, "eth1", DATA_IPS[name], default_metric=200)
        self.cluster.add_node(name)
        return node

    def agent(self, name: str, *args: str, resync: float = 1.0) -> AgentProcess:
        a = AgentProcess(
            self.rig.nodes[name], name, self.cluster.node_kubeconfig, *args, resync=resync
        )
        self.agents.append(a)
        return a

    def logs(self) -> str:
        """The agents' logs without debug lines (for failure reports)."""
        out = []
        for a in self.agents:
            lines = [line for line in a.text().splitlines() if " DEBUG " not in line]
            out.append(f"--- agent {a.name}\n" + "\n".join(lines[-60:]))
        return "\n".join(out)

    def close(self) -> None:
        for a in self.agents:
            if a.proc.poll() is None:
                a.proc.kill()
                a.proc.wait(5)


@pytest.fixture(name="world")
def world_fixture(kube: Kube, rig: Rig, tmp_path: Path) -> Iterator[World]:
    """A :class:`World` on a fresh rig; other modules import ``world_fixture`` to use it."""
    w = World(kube, rig, tmp_path)
    try:
        yield w
    finally:
        w.close()
        print(w.logs())  # pytest shows it when the test failed


def ready_with_br1(w: World, name: str, ip: str, *pod_ports: str) -> None:
    """Assert node ``name`` carries br1 over eth0 (plus ``pod_ports``) with its address and
    default route."""
    node = w.rig.nodes[name]
    assert sorted(node.vsctl("list-ports", "br1").split()) == sorted(["eth0", *pod_ports])
    assert node.addresses("br1") == [f"{ip}/16"]
    assert node.addresses("eth0") == []
    assert node.default_route_dev() == "br1"
    assert node.ping(GATEWAY, count=1)


# --- takeover, restart ----------------------------------------------------------------------


def test_restarted_agent_changes_nothing_and_writes_nothing(world: World) -> None:
    """Takeover through the daemon; a restarted agent finds the node taken over and leaves the
    node and the API alone (no write request at all)."""
    w = world
    n1 = w.node("n1")
    w.cluster.apply_bridge(ovs_bridge())
    a = w.agent("n1")
    w.cluster.wait_condition("n1", "Ready")
    ready_with_br1(w, "n1", IPS["n1"])
    assert w.cluster.published("n1") == 1000
    e = w.cluster.enactment("n1")
    assert e is not None
    st = e["status"]
    assert st["observedGeneration"] == st["enactedGeneration"] == 1
    node_uid = w.cluster.core.read_node("n1").metadata.uid
    assert e["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": node_uid}
    ]
    assert {c["type"] for c in st["conditions"]} == {
        "Ready", "Progressing", "Failing", "Pending", "Aborted", "Degraded",
    }  # fmt: skip
    assert any("move address 172.18.10.11/16" in c or "add address" in c for c in st["lastChanges"])
    assert a.stop() == 0

    before = node_state(n1)
    w.cluster.kube.reset_requests()
    b = w.agent("n1", resync=0.5)
    b.wait_log("pass on n1: br1=unchanged")
    time.sleep(1.2)  # two more resync passes
    assert b.proc.poll() is None
    assert w.cluster.writes() == [], b.text()
    assert_same_state(node_state(n1), before)
    assert w.cluster.enactment("n1") == e
    assert "repaired" not in b.text() and "enacted on" not in b.text()
    assert b.stop() == 0


# --- the netdev datapath ----------------------------------------------------------------------


def agent_events(w: World, enactment: str) -> list[dict[str, Any]]:
    """The Events about OvsBridgeEnactment ``enactment`` (the agent records them in default)."""
    out = w.cluster.kube.kubectl(
        "get", "events", "-n", "default", "-o", "json",
        "--field-selector", f"involvedObject.kind=OvsBridgeEnactment,involvedObject.name={enactment}",
    ).stdout  # fmt: skip
    return list(json.loads(out)["items"])


def test_netdev_fallback_is_a_degraded_condition_and_a_warning_event(world: World) -> None:
    """No openvswitch kernel module here, so datapathType auto falls back to netdev: the
    enactment stays Ready (Enacted) and also says Degraded/NetdevDatapath, what it means and
    what to do; one Warning Event about the enactment says the same (``kubectl describe``
    shows it). A restarted agent records no second Event; spec.datapathType netdev turns the
    condition False (NetdevRequested), without an Event."""
    w = world
    n1 = w.node("n1")
    w.cluster.apply_bridge(ovs_bridge())
    a = w.agent("n1")
    w.cluster.wait_condition("n1", "Ready")
    assert n1.vsctl("get", "Bridge", "br1", "datapath_type").strip('"') == "netdev"
    e = w.cluster.enactment("n1")
    assert e is not None
    conds = {c["type"]: c for c in e["status"]["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Ready"]["reason"] == "Enacted"
    deg = conds["Degraded"]
    assert (deg["status"], deg["reason"], deg["observedGeneration"]) == (
        "True", "NetdevDatapath", 1,
    )  # fmt: skip
    for words in (
        "OVS bridge br1 runs on the userspace (netdev) datapath",
        "the kernel openvswitch module is not loaded on this node",
        "throughput is lower",
        "pings sent from this node get duplicate replies",
        "set spec.datapathType: netdev",
    ):
        assert words in deg["message"], deg["message"]
    # what the message says: a ping from the node gets every reply twice
    ping = n1.run("ping", "-c", "3", "-i", "0.2", "-W", "1", GATEWAY, check=False).stdout
    assert "(DUP!)" in ping, ping
    # the columns an operator sees stay those of Ready
    row = w.cluster.kube.kubectl("get", "ovsbridgeenactment", "n1.br1", "--no-headers").stdout
    assert row.split() == ["n1.br1", "n1", "br1", "True", "Enacted"], row

    events = wait_for(lambda: agent_events(w, "n1.br1"), 10, "the Warning Event")
    (ev,) = events
    assert (ev["type"], ev["reason"], ev["message"]) == (
        "Warning",
        "NetdevDatapath",
        deg["message"],
    )
    assert ev["involvedObject"]["uid"] == e["metadata"]["uid"]
    assert ev["involvedObject"]["apiVersion"] == vocab.UNDERLAY_API_VERSION
    assert ev["source"] == {"component": "underlay-agent", "host": "n1"}
    described = w.cluster.kube.kubectl("describe", "ovsbridgeenactment", "n1.br1").stdout
    assert "Warning  NetdevDatapath" in described, described

    assert a.stop() == 0
    w.cluster.kube.reset_requests()
    b = w.agent("n1")
    b.wait_log("pass on n1: br1=unchanged")
    time.sleep(1.5)
    assert w.cluster.writes() == [], b.text()
    assert len(agent_events(w, "n1.br1")) == 1

    w.cluster.apply_bridge(ovs_bridge(datapathType="netdev"))
    wait_for(
        lambda: next(
            c for c in w.cluster.enactment("n1")["status"]["conditions"]  # type: ignore[index]
            if c["type"] == "Degraded"
        )["reason"] == "NetdevRequested",
        20,
        "Degraded False, NetdevRequested",
    )  # fmt: skip
    deg = {c["type"]: c for c in w.cluster.enactment("n1")["status"]["conditions"]}["Degraded"]  # type: ignore[index]
    assert deg["status"] == "False" and deg["observedGeneration"] == 2, deg
    assert w.cluster.condition("n1")[:2] == ("Ready", "Enacted")
    assert len(agent_events(w, "n1.br1")) == 1
    assert b.stop() == 0


# --- probe and rollback -----------------------------------------------------------------------


def test_uplink_that_cannot_reach_its_gateway_is_rolled_back(world: World) -> None:
    """br2 over eth1, whose cable leads nowhere: the gateway probe fails, the node is put back
    exactly as before (OVS, addresses, routes, links, files), the API server stays reachable
    (the agent reports through it), the enactment is Failing naming the probe, and the same
    generation is not tried again."""
    w = world
    n1 = w.node("n1", data=True)
    w.rig.unplug("n1", "eth1")
    before = node_state(n1)
    w.cluster.apply_bridge(ovs_bridge("br2", uplinks=["eth1"], probeTimeoutSeconds=1))
    a = w.agent("n1")
    _, reason, message = w.cluster.wait_condition("n1", "Failing", "br2")
    assert reason == "ProbeFailed"
    assert f"probe gateway failed: default gateway {DATA_GATEWAY} did not answer" in message
    e = w.cluster.enactment("n1", "br2")
    assert e is not None
    assert e["status"]["failedProbe"] == "gateway"
    assert any("restored OVS bridge br2 (deleted)" in r for r in e["status"]["lastRollback"])
    assert "enactedState" not in e["status"]
    assert "underlay.dev/br2" not in w.cluster.capacity("n1")
    assert_same_state(node_state(n1), before)
    reach = n1.run(sys.executable, "-c", "import socket; socket.create_connection(('172.18.0.2', 6443), 2)", check=False)  # fmt: skip
    assert reach.returncode == 0, reach.stderr
    time.sleep(2.5)  # resync passes: a failed generation is not retried
    assert a.text().count("changing n1") == 1, a.text()
    assert_same_state(node_state(n1), before)
    assert w.cluster.condition("n1", "br2")[0] == "Failing"


# --- persistence backends through the daemon -------------------------------------------------


def test_auto_persistence_follows_what_each_node_uses(world: World) -> None:
    """persistence: auto on three nodes at once (maxUnavailable 3): netplan on a netplan node
    (``netplan generate`` accepts it), the five NetworkManager keyfiles plus the conf.d
    ``unmanaged-devices+=interface-name:veth*`` on an NM node (``nmcli --offline`` accepts
    each), only the replay record on a node with neither."""
    w = world
    n1 = w.node("n1", persistence="netplan")
    n2 = w.node("n2", persistence="networkmanager")
    n3 = w.node("n3", persistence="none")
    w.cluster.apply_bridge(ovs_bridge(maxUnavailable=3))
    for name in ("n1", "n2", "n3"):
        w.agent(name)
    for name in ("n1", "n2", "n3"):
        w.cluster.wait_condition(name, "Ready")
        ready_with_br1(w, name, IPS[name])

    f1 = files_under(n1.root)
    assert set(f1) == {"etc/netplan/50-cloud-init.yaml", NETPLAN_FILE, RECORD_FILE}
    assert f1[NETPLAN_FILE][1] == 0o600
    assert b"renderer: networkd" in f1[NETPLAN_FILE][0]
    gen = subprocess.run(["netplan", "generate", "--root-dir", str(n1.root)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert gen.returncode == 0 and gen.stderr == "", gen.stderr

    f2 = files_under(n2.root)
    keyfiles = sorted(p for p in f2 if p.startswith("etc/NetworkManager/system-connections/"))
    assert len(keyfiles) == 5, keyfiles
    conf = "etc/NetworkManager/conf.d/90-underlay-unmanaged-veth.conf"
    assert b"unmanaged-devices+=interface-name:veth*" in f2[conf][0]
    assert set(f2) == {*keyfiles, conf, RECORD_FILE}
    for k in keyfiles:
        assert f2[k][1] == 0o600
        nm = subprocess.run(["nmcli", "--offline", "connection", "modify"], input=f2[k][0].decode(),
                            capture_output=True, text=True, check=False)  # fmt: skip
        assert nm.returncode == 0, f"{k}: {nm.stderr}"

    assert set(files_under(n3.root)) == {RECORD_FILE}
    record = json.loads((n3.root / RECORD_FILE).read_text())
    assert record["addresses"][0]["cidr"] == f"{IPS['n3']}/16"


# --- no-op mode --------------------------------------------------------------------------------


def noop(w: World, name: str) -> subprocess.CompletedProcess[str]:
    node = w.rig.nodes[name]
    return node.run(
        UNDERLAY, "agent", "--noop", "--node-name", name,
        "--kubeconfig", w.cluster.node_kubeconfig, "--ovsdb", node.ovsdb,
        "--root", str(node.root), "--socket", str(node.rundir / "noop.sock"), check=False,
    )  # fmt: skip


def test_noop_prints_the_plan_and_files_and_changes_nothing(world: World) -> None:
    w = world
    n1 = w.node("n1")
    # a jumbo MTU, not a smaller one: eth0 also carries the agent's connections to the API
    # server, and after an MTU below the segment's 1500 the answers the server sends on them
    # (MSS negotiated before the change) are dropped by the node's veth until they time out
    w.cluster.apply_bridge(ovs_bridge(mtu=9000))
    before = initial = node_state(n1)
    w.cluster.kube.reset_requests()

    out = noop(w, "n1")

    assert out.returncode == 0, out.stderr
    for line in (
        "OvsBridge br1:",
        "create OVS bridge br1 (datapath_type netdev)",
        f"move address {IPS['n1']}/16 from eth0 to br1",
        f"move route default via {GATEWAY} dev eth0 to br1",
        "--- /etc/netplan/60-underlay-br1.yaml (mode 0600)",
        "mtu: 9000",
        "--- /var/lib/underlay/bridges/br1.json (mode 0600)",
        "(noop: nothing was changed)",
    ):
        assert line in out.stdout, out.stdout
    assert_same_state(node_state(n1), before)
    assert w.cluster.writes() == []
    assert w.cluster.enactment("n1") is None
    assert not (n1.rundir / "noop.sock").exists()

    # after the agent enacted it, and then the OvsBridge left: the removal plan
    a = w.agent("n1")
    w.cluster.wait_condition("n1", "Ready")
    assert a.stop() == 0
    again = noop(w, "n1")
    assert "bridge br1: no change" in again.stdout and "no changes" in again.stdout, again.stdout
    w.cluster.delete_bridge("br1")
    before = node_state(n1)
    w.cluster.kube.reset_requests()
    gone = noop(w, "n1")
    assert gone.returncode == 0, gone.stderr
    for line in (
        "OvsBridge br1: gone or no longer selects n1:",
        f"[remove] move address {IPS['n1']}/16 from br1 back to eth0",
        "[remove] delete OVS bridge br1",
        "[remove] remove /etc/netplan/60-underlay-br1.yaml",
    ):
        assert line in gone.stdout, gone.stdout
    assert_same_state(node_state(n1), before)
    assert w.cluster.writes() == []

    # its enactment is deleted too while the agent is down: the replay record still tells the
    # noop plan and the agent what this node carries, so it is still taken off
    r = vocab.OVS_BRIDGE_ENACTMENT
    w.cluster.custom.delete_cluster_custom_object(r.group, r.version, r.plural, "n1.br1")
    orphan = noop(w, "n1")
    assert "[remove] delete OVS bridge br1" in orphan.stdout, orphan.stdout
    w.agent("n1").wait_log("OvsBridge br1: removed from n1")
    assert_same_state(node_state(n1), initial)
    assert n1.ping(GATEWAY, count=1)
    assert w.cluster.enactment("n1") is None


# --- reboot replay -----------------------------------------------------------------------------


def test_reboot_replay_brings_bridge_uplink_and_addresses_back(world: World) -> None:
    """Wipe the node's OVS database and addresses (as a reboot does) and restart OVS and the
    agent: from its replay record, before it can reach the API server, the agent puts br1,
    eth0 and the address and default route back; then reports the repair."""
    w = world
    n1 = w.node("n1")
    w.cluster.apply_bridge(ovs_bridge())
    a = w.agent("n1")
    w.cluster.wait_condition("n1", "Ready")
    eth0_mac = n1.run("cat", "/sys/class/net/eth0/address").stdout.strip()
    files = files_under(n1.root)
    assert a.stop() == 0

    n1.reboot_ovs()
    for dev in ("br1", "ovs-netdev"):  # vswitchd stopped without --cleanup leaves its taps
        n1.run("ip", "link", "del", dev, check=False)
    n1.run("ip", "addr", "flush", "dev", "eth0")
    assert not n1.link_exists("br1") and n1.addresses("eth0") == []
    assert n1.default_route_dev() is None
    assert n1.vsctl("list-br") == ""

    b = w.agent("n1")
    wait_for(lambda: _bridge_back(n1), 10, "br1 back")
    ready_with_br1(w, "n1", IPS["n1"])
    assert n1.run("cat", "/sys/class/net/br1/address").stdout.strip() == eth0_mac
    assert files_under(n1.root) == files
    b.wait_log("repaired drift on n1")
    e = wait_for(lambda: (w.cluster.enactment("n1") or {}).get("status", {}).get("lastRepair"))
    assert e["trigger"] == "startup (replay records)"
    assert any(d.startswith("bridge-missing") for d in e["drift"])
    assert w.cluster.condition("n1")[0] == "Ready"

    # OVS alone restarts with a wiped database while the agent runs: the agent's OVSDB
    # connection comes back to an empty database and the agent rebuilds br1 at once
    n1.stop_ovs()
    for dev in ("br1", "ovs-netdev"):
        n1.run("ip", "link", "del", dev, check=False)
    n1.run("ip", "addr", "flush", "dev", "eth0")
    (n1.rundir / "conf.db").unlink()
    n1.start_ovs()
    # a freshly started ovs-vswitchd on a loaded machine can take over 10 s to create br1's
    # tap: the agent's first repair then times out, rolls back and the next one succeeds
    wait_for(lambda: _bridge_back(n1), 30, "br1 back again")
    ready_with_br1(w, "n1", IPS["n1"])
    rec = wait_for(
        lambda: (
            (w.cluster.enactment("n1") or {}).get("status", {}).get("lastRepair", {}).get("trigger")
            != "startup (replay records)"
            and w.cluster.enactment("n1")["status"]["lastRepair"]
        )  # type: ignore[index]
    )
    assert "(database reconnected)" in rec["trigger"], rec
    assert b.proc.poll() is None


# --- drift repair ------------------------------------------------------------------------------


def _uplink_port_back(n: Node) -> bool:
    return n.vsctl("list-ports", "br1").split() == ["eth0"]


def _bridge_back(n: Node) -> bool:
    return (
        n.link_exists("br1")
        and n.vsctl("list-ports", "br1", check=False).split() == ["eth0"]
        and n.addresses("br1") == [f"{IPS['n1']}/16"]
        and n.default_route_dev() == "br1"
    )


@pytest.mark.parametrize(
    ("what", "kind"),
    [("uplink-port", "uplink-port-missing"), ("bridge", "bridge-missing"), ("file", "file-edited")],
)
def test_drift_is_repaired_within_5_seconds(
    world: World, what: str, kind: str, record_property: Callable[[str, object], None]
) -> None:
    w = world
    n1 = w.node("n1")
    w.cluster.apply_bridge(ovs_bridge())
    a = w.agent("n1", resync=60)  # no resync: the watchers must notice
    w.cluster.wait_condition("n1", "Ready")
    netplan = n1.root / NETPLAN_FILE
    good = netplan.read_text()
    time.sleep(0.5)  # watchers armed after the first pass

    t0 = time.monotonic()
    if what == "uplink-port":
        n1.vsctl("del-port", "br1", "eth0")
        back: Callable[[], bool] = lambda: _uplink_port_back(n1)  # noqa: E731
    elif what == "bridge":
        n1.vsctl("del-br", "br1")
        back = lambda: _bridge_back(n1)  # noqa: E731
    else:
        netplan.write_text(good.replace("renderer: networkd", "renderer: NetworkManager"))
        back = lambda: netplan.read_text() == good  # noqa: E731
    wait_for(back, 5, f"{what} repaired", step=0.02)
    latency = time.monotonic() - t0
    record_property("repair_seconds", round(latency, 3))
    print(f"repair of {what}: {latency:.2f}s")

    ready_with_br1(w, "n1", IPS["n1"])
    assert netplan.read_text() == good and netplan.stat().st_mode & 0o777 == 0o600
    rec = wait_for(
        lambda: (w.cluster.enactment("n1") or {}).get("status", {}).get("lastRepair"), 10
    )
    assert any(d.startswith(kind) for d in rec["drift"]), rec
    assert rec["changes"] and rec["time"]
    assert rec["trigger"].startswith("ovsdb br1" if what != "file" else "file /etc/netplan")
    assert "repaired drift on n1" in a.text()
    assert w.cluster.condition("n1")[0] == "Ready"


def test_drift_repair_does_not_wait_for_a_hung_api_server(world: World) -> None:
    """The full pass is stuck in a request the API server does not answer; drift is repaired
    anyway, by the repair thread, within 5 s."""
    w = world
    n1 = w.node("n1")
    w.cluster.apply_bridge(ovs_bridge())
    a = w.agent("n1", resync=0.5)
    w.cluster.wait_condition("n1", "Ready")
    w.cluster.kube.inject_fault("/ovsbridges$", method="GET", hang=12, count=3)
    wait_for(lambda: w.cluster.kube.faults()[0].count < 3, 5, "a pass stuck in a request")
    n1.vsctl("del-port", "br1", "eth0")
    wait_for(lambda: _uplink_port_back(n1), 5, "uplink port repaired", step=0.02)
    a.wait_log("repaired drift on n1 in", 2)
    w.cluster.kube.clear_faults()


def test_a_repair_made_while_a_status_is_written_is_still_reported(world: World) -> None:
    """Drift repaired by the repair thread while the full pass waits for the API server's
    answer to an enactment status write: the repair is recorded in the next write
    (``status.lastRepair``), not forgotten with the one in flight (seen on the real control
    plane, whose slower writes left the window open: OVS restarted during a pass)."""
    w = world
    n1 = w.node("n1")
    w.cluster.apply_bridge(ovs_bridge())
    w.agent("n1", resync=60)
    w.cluster.wait_condition("n1", "Ready")
    assert "lastRepair" not in w.cluster.enactment("n1")["status"]  # type: ignore[index]
    # generation 2 (a longer probe) changes nothing on the node but the status: Progressing,
    # then Ready; the first of those writes is held 3 s by the proxy
    w.cluster.kube.inject_fault(r"/ovsbridgeenactments/n1\.br1/status$", method="PUT", hang=3)
    w.cluster.apply_bridge(ovs_bridge(probeTimeoutSeconds=3))
    wait_for(lambda: w.cluster.kube.faults() == [], 10, "a status write held")
    n1.vsctl("del-port", "br1", "eth0")
    wait_for(lambda: _uplink_port_back(n1), 3, "uplink port repaired during the write")
    rec = wait_for(
        lambda: (w.cluster.enactment("n1") or {}).get("status", {}).get("lastRepair"), 15
    )
    assert any(d.startswith("uplink-port-missing") for d in rec["drift"]), rec
    e = w.cluster.enactment("n1")
    assert e is not None and e["status"]["enactedGeneration"] == 2
    assert w.cluster.condition("n1")[0] == "Ready"


# --- removal -----------------------------------------------------------------------------------


def test_removal_waits_for_pod_ports_then_gives_the_node_back(world: World) -> None:
    """OvsBridge deleted: while a pod port remains the enactment says Pending/RemovalBlocked
    naming the port and pod, capacity is withdrawn and the bridge keeps working; once the port
    is gone (OVSDB notices) the addresses and routes go back to eth0, the bridge and files go,
    and the enactment is deleted."""
    w = world
    n1 = w.node("n1")
    before = node_state(n1)
    w.cluster.apply_bridge(ovs_bridge())
    w.agent("n1", resync=30)
    w.cluster.wait_condition("n1", "Ready")
    port = plug_pod(w.rig, n1, "p1", "172.18.20.1", contNetns="/run/netns/x", contIface="eth0",
                    contPodUid="uid-1", owner="underlay-ovs")  # fmt: skip

    w.cluster.delete_bridge("br1")

    _, reason, message = w.cluster.wait_condition("n1", "Pending")
    assert reason == "RemovalBlocked"
    assert port in message and "uid-1" in message
    wait_for(lambda: "underlay.dev/br1" not in w.cluster.capacity("n1"), 5, "capacity withdrawn")
    ready_with_br1(w, "n1", IPS["n1"], port)
    assert w.rig.pods["p1"].ping(GATEWAY, count=1)

    n1.vsctl("del-port", "br1", port)
    w.rig.delete_pod("p1")
    n1.run("ip", "link", "del", port, check=False)
    wait_for(lambda: w.cluster.enactment("n1") is None, 10, "enactment deleted")
    assert_same_state(node_state(n1), before)
    assert n1.ping(GATEWAY, count=1)
    assert "underlay.dev/br1" not in w.cluster.capacity("n1")


def test_node_no_longer_selected_loses_the_bridge_others_keep_it(world: World) -> None:
    w = world
    nodes = {name: w.node(name) for name in ("n1", "n2")}
    before = {name: node_state(n) for name, n in nodes.items()}
    for name in nodes:
        w.cluster.label_node(name, {"underlay.dev/br1": "yes"})
    w.cluster.apply_bridge(ovs_bridge(nodeSelector={"underlay.dev/br1": "yes"}, maxUnavailable=2))
    for name in nodes:
        w.agent(name, resync=30)
    for name in nodes:
        w.cluster.wait_condition(name, "Ready")
    e1 = w.cluster.enactment("n1")

    w.cluster.label_node("n2", {"underlay.dev/br1": None})  # Node watch wakes the agent

    wait_for(lambda: w.cluster.enactment("n2") is None, 10, "n2 enactment deleted")
    assert_same_state(node_state(nodes["n2"]), before["n2"])
    assert "underlay.dev/br1" not in w.cluster.capacity("n2")
    assert nodes["n2"].ping(GATEWAY, count=1)
    ready_with_br1(w, "n1", IPS["n1"])
    assert w.cluster.enactment("n1") == e1
    assert parse_quantity(w.cluster.capacity("n1")["underlay.dev/br1"]) == 1000


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (ovs_bridge(uplinks=["eth7"]), "uplink eth7 does not exist on node n1"),
        (
            ovs_bridge("br-sixteen-chars"),
            "bridge name 'br-sixteen-chars' is 16 characters; Linux interface names are at "
            "most 15 (set spec.bridge to a shorter name)",
        ),
    ],
    ids=["uplink-missing", "name-too-long"],
)
def test_bad_input_is_failing_and_changes_nothing(
    world: World, obj: dict[str, Any], reason: str
) -> None:
    w = world
    n1 = w.node("n1")
    before = node_state(n1)
    w.cluster.apply_bridge(obj)
    a = w.agent("n1")
    _, why, message = w.cluster.wait_condition("n1", "Failing", obj["metadata"]["name"])
    assert why == "Invalid"
    assert reason in message
    assert reason in a.text()  # logged once, with the reason
    time.sleep(1.5)
    assert_same_state(node_state(n1), before)
    assert not any(k.startswith("underlay.dev/") for k in w.cluster.capacity("n1"))
    assert w.cluster.slot_leases() == []  # no slot taken


def _created(w: World, obj: dict[str, Any]) -> bool:
    try:
        w.cluster.apply_bridge(obj)
    except client.ApiException as exc:
        if exc.status != 422:
            raise
        return False
    return True


def test_a_bridge_the_api_cannot_label_does_not_stop_the_others(world: World) -> None:
    """An OvsBridge whose name is too long to label its enactments (found by a hostile test:
    a 400 on its label selector stopped every bridge on every node) is reported in the log;
    br1 is still built. The CRD refuses such a name (metadata.name maxLength 63), so one exists
    only where a CRD without that rule let it in (installed before it, or edited): the test
    removes the rule first."""
    w = world
    w.node("n1")
    long_name = "b" * 64
    with pytest.raises(client.ApiException) as refused:
        w.cluster.apply_bridge(ovs_bridge(long_name, bridge="brx"))
    assert refused.value.status == 422, refused.value
    assert "metadata.name: Too long: may not be more than 63 bytes" in refused.value.body
    rule = "/spec/versions/0/schema/openAPIV3Schema/properties/metadata/properties/name/maxLength"
    w.cluster.kube.kubectl(
        "patch", "crd", vocab.OVS_BRIDGE.plural + "." + vocab.OVS_BRIDGE.group, "--type=json",
        "-p", json.dumps([{"op": "remove", "path": rule}]),
    )  # fmt: skip
    # the server's custom resource handler takes the new schema asynchronously
    wait_for(lambda: _created(w, ovs_bridge(long_name, bridge="brx")), 20, "long name accepted")
    w.cluster.apply_bridge(ovs_bridge())
    a = w.agent("n1")
    w.cluster.wait_condition("n1", "Ready")
    ready_with_br1(w, "n1", IPS["n1"])
    a.wait_log(f"OvsBridge {long_name}: metadata.name is 64 characters")
    assert not w.rig.nodes["n1"].link_exists("brx")


# --- process lifecycle -------------------------------------------------------------------------


def test_sigterm_stops_cleanly_even_in_the_middle_of_a_change(world: World) -> None:
    """SIGTERM while the agent waits for a probe: the change is finished (rolled back), the
    slot released, watchers stopped, the CNI socket removed; exit code 0."""
    w = world
    n1 = w.node("n1", data=True)
    w.rig.unplug("n1", "eth1")
    before = node_state(n1)
    w.cluster.apply_bridge(ovs_bridge("br2", uplinks=["eth1"], probeTimeoutSeconds=3))
    a = w.agent("n1")
    a.wait_log("changing n1")
    assert a.stop(signal.SIGTERM) == 0  # within AgentProcess.stop's 15 s, else it fails
    log = a.text()
    assert "SIGTERM received, stopping" in log and "agent on n1 stopped" in log
    assert "Traceback" not in log
    assert not Path(a.socket).exists()
    assert_same_state(node_state(n1), before)
    assert w.cluster.slot_leases() == []
    assert w.cluster.condition("n1", "br2")[0] == "Failing"

    # an idle agent stops at once
    b = w.agent("n1")
    b.wait_log("pass on n1")
    assert b.stop(signal.SIGTERM) == 0
    assert not Path(b.socket).exists()


def test_transient_api_errors_are_retried_never_fatal(world: World) -> None:
    """503s, 429s, 500s and dropped connections on every kind of request the agent makes:
    single requests are retried at once, a pass that still fails is retried with backoff, the
    agent ends Ready and the process never exits; while the API server is away after that,
    the node is left alone."""
    w = world
    w.node("n1")
    w.cluster.apply_bridge(ovs_bridge())
    proxy = w.cluster.kube
    proxy.inject_fault("/api/v1/nodes/n1$", method="GET", status=503, count=5)  # > retries
    proxy.inject_fault("/ovsbridges$", method="GET", drop=True, count=2)
    proxy.inject_fault("/leases", method="POST", status=429, retry_after=1, count=1)
    proxy.inject_fault("/ovsbridgeenactments/n1.br1/status$", method="PUT", status=500, count=2)
    a = w.agent("n1")
    w.cluster.wait_condition("n1", "Ready", timeout=30)
    ready_with_br1(w, "n1", IPS["n1"])
    assert a.proc.poll() is None
    log = a.text()
    assert "bridge pass on n1 failed: API server answered 503 Service Unavailable" in log
    assert "retrying in 1s" in log
    assert proxy.faults() == [], proxy.faults()
    codes = [(r.method, r.path, r.code) for r in proxy.requests() if r.fault]
    assert ("POST", "/apis/coordination.k8s.io/v1/namespaces/underlay-system/leases", 429) in codes
    assert w.cluster.published("n1") == 1000
    # the API goes away for a while after the node is Ready: nothing changes, nothing crashes
    before = node_state(w.rig.nodes["n1"])
    proxy.inject_fault("/api", status=503, count=1000)
    time.sleep(3)
    assert a.proc.poll() is None
    assert_same_state(node_state(w.rig.nodes["n1"]), before)
    proxy.clear_faults()
    assert a.stop() == 0
    assert "Traceback" not in "\n".join(
        line for line in a.text().splitlines() if " DEBUG " not in line
    )
