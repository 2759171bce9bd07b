"""The test rig: nodes, a switch and pods built from real network namespaces and real OVS.

Layout (DESIGN.md, "The test rig")::

    <p>-sw   switch namespace: Linux bridge ``br0`` holding the gateway 172.18.0.1/16 and the
             API server address 172.18.0.2/16; one veth per node is enslaved to it.
    <p>-n1   a node: ``eth0`` (veth into the switch) with 172.18.10.11/16 and a default route via
             172.18.0.1; its own ovsdb-server and ovs-vswitchd with a private run directory.
    <p>-pod1 a pod: an empty namespace that CNI plugins fill.

Optional second segment (:meth:`Rig.add_network` / :meth:`Rig.add_nic`): a Linux bridge
``data`` in the switch namespace holding the data gateway 172.19.0.1/16, and per node an
``eth1`` veth into it, so a node keeps its ``eth0`` path to the API server while a bridge is
built over ``eth1``; :meth:`Rig.unplug` detaches the cable from the segment (carrier stays up,
nothing answers), :meth:`Rig.plug` attaches it again.

Every 172.18.x address lives inside namespaces this module created; the machine's own
namespace is never given an address or a route. ``Rig.close()`` removes everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OVS_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
GATEWAY = "172.18.0.1"
APISERVER_IP = "172.18.0.2"
PREFIXLEN = 16
DATA_GATEWAY = "172.19.0.1"
"""Gateway of the optional data segment (lives only in the switch namespace)."""
RUN_ROOT = Path("/tmp/underlay-rig")


class RigError(RuntimeError):
    """A rig command failed; the message holds the command and its stderr."""


def run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output; raise RigError naming it when ``check`` fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RigError(f"{' '.join(cmd)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def wait_for(
    pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition", step: float = 0.1
) -> Any:
    """Poll ``pred`` until it returns a truthy value (returned); AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rig_available() -> str | None:
    """Return None when the rig can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "the rig needs root (network namespaces)"
    for tool in ("ip", "ovsdb-server", "ovs-vswitchd", "ovsdb-tool", "ovs-vsctl"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not Path(OVS_SCHEMA).exists():
        return f"{OVS_SCHEMA} missing"
    return None


@dataclass
class Netns:
    """A network namespace created by the rig (``/run/netns/<name>``)."""

    name: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside this namespace (``ip netns exec``)."""
        return run("ip", "netns", "exec", self.name, *cmd, check=check, timeout=timeout)

    def popen(self, *cmd: str, **kw: object) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside this namespace in the background."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)  # type: ignore[call-overload, no-any-return]

    def ping(self, addr: str, count: int = 2, timeout: int = 2) -> bool:
        """True when ``addr`` answers ICMP echo from inside this namespace."""
        proc = self.run(
            "ping", "-c", str(count), "-i", "0.2", "-W", str(timeout), addr, check=False
        )
        return proc.returncode == 0

    def addresses(self, dev: str) -> list[str]:
        """IPv4/IPv6 global addresses of ``dev`` in CIDR form."""
        out = self.run("ip", "-o", "addr", "show", "dev", dev, "scope", "global").stdout
        return [line.split()[3] for line in out.splitlines()]

    def default_route_dev(self) -> str | None:
        """Device of the IPv4 default route, or None."""
        out = self.run("ip", "-4", "route", "show", "default").stdout.split()
        return out[out.index("dev") + 1] if "dev" in out else None

    def link_exists(self, dev: str) -> bool:
        return self.run("ip", "link", "show", "dev", dev, check=False).returncode == 0

    def listen_tcp(self, addr: str, port: int) -> socket.socket:
        """A listening TCP socket on ``addr``:``port`` inside this namespace (the kernel completes
        handshakes up to the backlog, so no accept loop is needed). Close it to stop listening."""
        from pyroute2 import netns as pr_netns

        pr_netns.pushns(self.name)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            pr_netns.popns()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(128)
        return sock

    def snapshot(self) -> dict[str, str]:
        """``ip addr``, ``ip -4 route``, ``ip -6 route`` and ``ip link`` of this namespace, for
        before/after comparisons (counters and timers excluded)."""
        return {
            "addr": self.run("ip", "addr").stdout,
            "route4": self.run("ip", "-4", "route", "show", "table", "all").stdout,
            "route6": self.run("ip", "-6", "route", "show", "table", "main").stdout,
            "link": self.run("ip", "-o", "link").stdout,
        }


@dataclass
class Node(Netns):
    """A rig node: namespace, uplink ``eth0`` and a private OVS (ovsdb-server + ovs-vswitchd)."""

    ip: str = ""
    rundir: Path = field(default_factory=Path)

    @property
    def ovsdb(self) -> str:
        """OVSDB connection string for ovsdbapp / ``ovs-vsctl --db``."""
        return f"unix:{self.rundir / 'db.sock'}"

    @property
    def root(self) -> Path:
        """Stand-in for the node's ``/``: persistence files are written under it."""
        return self.rundir / "root"

    def vsctl(self, *args: str, check: bool = True) -> str:
        """``ovs-vsctl`` against this node's OVS; returns stdout stripped."""
        return run(
            "ovs-vsctl", f"--db={self.ovsdb}", "--timeout=10", *args, check=check
        ).stdout.strip()

    def start_ovs(self) -> None:
        """Create a fresh OVS database and start ovsdb-server and ovs-vswitchd in the namespace."""
        self.rundir.mkdir(parents=True, exist_ok=True)
        db = self.rundir / "conf.db"
        if not db.exists():
            run("ovsdb-tool", "create", str(db), OVS_SCHEMA)
        d = self.rundir
        self.run(
            "ovsdb-server", str(db), f"--remote=punix:{d / 'db.sock'}",
            f"--pidfile={d / 'ovsdb-server.pid'}", f"--unixctl={d / 'ovsdb-server.ctl'}",
            f"--log-file={d / 'ovsdb-server.log'}", "--detach",
        )  # fmt: skip
        run("ovs-vsctl", f"--db={self.ovsdb}", "--no-wait", "init")
        self.run(
            "env", f"OVS_RUNDIR={d}", "ovs-vswitchd", self.ovsdb,
            f"--pidfile={d / 'ovs-vswitchd.pid'}", f"--unixctl={d / 'ovs-vswitchd.ctl'}",
            f"--log-file={d / 'ovs-vswitchd.log'}", "--detach",
        )  # fmt: skip
        # vswitchd is up once it has written its version into the database
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.vsctl("get", "Open_vSwitch", ".", "ovs_version", check=False).strip('"'):
                return
            time.sleep(0.05)
        raise RigError(f"ovs-vswitchd of {self.name} did not start; see {d}/ovs-vswitchd.log")

    def ovs_show(self) -> str:
        """``ovs-vsctl show`` without the volatile database UUID line."""
        return "\n".join(self.vsctl("show").splitlines()[1:])

    def reboot_ovs(self) -> None:
        """Simulate a reboot of OVS: stop the daemons, delete the database, start fresh."""
        self.stop_ovs()
        (self.rundir / "conf.db").unlink(missing_ok=True)
        self.start_ovs()

    def stop_ovs(self) -> None:
        """Stop this node's OVS daemons (as a reboot would)."""
        for daemon in ("ovs-vswitchd", "ovsdb-server"):
            pidfile = self.rundir / f"{daemon}.pid"
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(200):
                if not _alive(pid):
                    break
                time.sleep(0.01)
            else:
                os.kill(pid, signal.SIGKILL)


class Rig:
    """A switch namespace with nodes and pods; use as a context manager or call ``close()``.

    ``prefix`` keeps several rigs (and stale ones from a crashed run) apart; names stay within
    the 15-character limit of Linux interface names where they become interfaces.
    """

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"u{uuid.uuid4().hex[:5]}"
        self.dir = RUN_ROOT / self.prefix
        self.dir.mkdir(parents=True, exist_ok=True)
        self.nodes: dict[str, Node] = {}
        self.pods: dict[str, Netns] = {}
        self.networks: dict[str, str] = {}
        self.cables: dict[tuple[str, str], tuple[str, str | None]] = {}
        self.switch = Netns(f"{self.prefix}-sw")
        run("ip", "netns", "add", self.switch.name)
        self.switch.run("ip", "link", "set", "lo", "up")
        self.switch.run("ip", "link", "add", "br0", "type", "bridge")
        self.switch.run("ip", "link", "set", "br0", "up")
        self.switch.run("ip", "addr", "add", f"{GATEWAY}/{PREFIXLEN}", "dev", "br0")
        self.switch.run("ip", "addr", "add", f"{APISERVER_IP}/{PREFIXLEN}", "dev", "br0")

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_node(self, name: str, ip: str, *, ovs: bool = True) -> Node:
        """Create node ``name`` with ``eth0`` = ``ip``/16, default route via the gateway, and OVS."""
        node = Node(f"{self.prefix}-{name}", ip=ip, rundir=self.dir / name)
        run("ip", "netns", "add", node.name)
        self.nodes[name] = node
        outside = f"{self.prefix}{name}"[:15]
        run("ip", "link", "add", "rigtmp0", "netns", node.name, "type", "veth",
            "peer", "name", outside, "netns", self.switch.name)  # fmt: skip
        node.run("ip", "link", "set", "rigtmp0", "name", "eth0")
        self.switch.run("ip", "link", "set", outside, "master", "br0", "up")
        node.run("ip", "link", "set", "lo", "up")
        node.run("ip", "link", "set", "eth0", "up")
        node.run("ip", "addr", "add", f"{ip}/{PREFIXLEN}", "dev", "eth0")
        node.run("ip", "route", "add", "default", "via", GATEWAY)
        if ovs:
            node.start_ovs()
        return node

    def add_network(self, name: str = "data", gateway: str = DATA_GATEWAY) -> None:
        """A second L2 segment: Linux bridge ``name`` in the switch namespace holding
        ``gateway``/16 (only there)."""
        self.switch.run("ip", "link", "add", name, "type", "bridge")
        self.switch.run("ip", "link", "set", name, "up")
        self.switch.run("ip", "addr", "add", f"{gateway}/{PREFIXLEN}", "dev", name)
        self.networks[name] = gateway

    def add_nic(
        self,
        node_name: str,
        ifname: str,
        ip: str,
        *,
        network: str | None = "data",
        default_metric: int | None = None,
    ) -> str:
        """Give node ``node_name`` NIC ``ifname`` = ``ip``/16, a veth whose other end is in the
        switch namespace, attached to segment ``network`` (None: attached to nothing, a cable
        into an empty port). ``default_metric``: also add a default route via the segment's
        gateway with that metric (the node's main default route stays on eth0). Returns the
        switch-side name."""
        node = self.nodes[node_name]
        outside = f"{self.prefix}{node_name}{ifname}"[:15]
        run("ip", "link", "add", "rigtmp1", "netns", node.name, "type", "veth",
            "peer", "name", outside, "netns", self.switch.name)  # fmt: skip
        node.run("ip", "link", "set", "rigtmp1", "name", ifname)
        if network is not None:
            self.switch.run("ip", "link", "set", outside, "master", network)
        self.switch.run("ip", "link", "set", outside, "up")
        node.run("ip", "link", "set", ifname, "up")
        node.run("ip", "addr", "add", f"{ip}/{PREFIXLEN}", "dev", ifname)
        if default_metric is not None:
            gateway = self.networks[network or "data"]
            node.run("ip", "route", "add", "default", "via", gateway, "dev", ifname,
                     "metric", str(default_metric))  # fmt: skip
        self.cables[(node_name, ifname)] = (outside, network)
        return outside

    def unplug(self, node_name: str, ifname: str) -> None:
        """Detach the NIC's cable from its segment (its carrier stays up; nobody answers)."""
        outside, _ = self.cables[(node_name, ifname)]
        self.switch.run("ip", "link", "set", outside, "nomaster")

    def plug(self, node_name: str, ifname: str, network: str = "data") -> None:
        """Attach the NIC's cable to segment ``network``."""
        outside, _ = self.cables[(node_name, ifname)]
        self.switch.run("ip", "link", "set", outside, "master", network)
        self.cables[(node_name, ifname)] = (outside, network)

    def add_pod(self, name: str) -> Netns:
        """Create an empty pod network namespace (loopback up)."""
        pod = Netns(f"{self.prefix}-{name}")
        run("ip", "netns", "add", pod.name)
        pod.run("ip", "link", "set", "lo", "up")
        self.pods[name] = pod
        return pod

    def delete_pod(self, name: str) -> None:
        """Delete a pod namespace (as a runtime does after the pod is gone)."""
        pod = self.pods.pop(name)
        run("ip", "netns", "del", pod.name, check=False)

    def close(self) -> None:
        """Stop every daemon and delete every namespace this rig created."""
        for node in self.nodes.values():
            node.stop_ovs()
        for ns in [*self.pods.values(), *self.nodes.values(), self.switch]:
            run("ip", "netns", "del", ns.name, check=False)
        self.nodes.clear()
        self.pods.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
