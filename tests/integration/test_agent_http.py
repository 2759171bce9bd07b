"""The agent's HTTP endpoint against the node's LAN and slow clients (issue 10, item 2).

``underlay agent --no-bridges`` runs inside a rig node, as the DaemonSet runs it (its
ServiceAccount with deploy/'s RBAC, the API server reached at the rig's address, POD_NAMESPACE
set). The switch namespace plays another host on the node's LAN. Before this change the
endpoint listened on 0.0.0.0:9441, had a listen backlog of 5, no read timeout and a thread per
connection: 4,000 half-sent requests made 4,014 threads and 61 MiB, and once released
``/healthz`` took 16 s, over the probe's 5 s timeout, each request also making a CNI call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_agent.cni.server import CniAgent, CniServer
from node_agent.daemon import AgentHealth

from tests.controlplane.cluster import Kube
from tests.rig import APISERVER_IP, Netns, Node, Rig, wait_for

UNDERLAY = str(Path(sys.executable).parent / "underlay")
AGENT_ENV = {**os.environ, "POD_NAMESPACE": "underlay-system"}


class AgentProcess:
    """``underlay agent --no-bridges`` inside ``node``, its HTTP endpoint as configured."""

    def __init__(self, node: Node, kubeconfig: str, *args: str) -> None:
        self.node = node
        self.log = node.rundir / "agent.log"
        self.socket = str(node.rundir / "agent.sock")
        with open(self.log, "wb") as logf:
            self.proc = node.popen(
                UNDERLAY, "-v", "agent", "--node-name", "n1", "--kubeconfig", kubeconfig,
                "--ovsdb", node.ovsdb, "--socket", self.socket, "--root", str(node.root),
                "--no-bridges", "--gc-interval", "0", *args,
                stdout=logf, stderr=subprocess.STDOUT, env=AGENT_ENV,
            )  # fmt: skip
        wait_for(lambda: Path(self.socket).exists() or self.proc.poll() is not None, 60, "agent")
        assert self.proc.poll() is None, self.log.read_text()

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def curl(where: Netns, url: str, timeout: float = 10) -> tuple[int, str, float]:
    """(HTTP status or 0 when nothing answered, body, seconds) of GET ``url`` from ``where``."""
    t0 = time.monotonic()
    out = where.run(
        "curl", "-s", "-m", str(timeout), "-o", "-", "-w", "\n%{http_code}", url,
        check=False, timeout=timeout + 5,
    ).stdout  # fmt: skip
    body, _, code = out.rpartition("\n")
    return int(code or 0), body, time.monotonic() - t0


@pytest.fixture
def node_and_kubeconfig(kube: Kube, rig: Rig, tmp_path: Path) -> Iterator[tuple[Rig, Node, str]]:
    node = rig.add_node("n1", "172.18.10.11")
    url = kube.listen_in_netns(rig.switch.path, APISERVER_IP, 6443)
    kubeconfig = str(kube.agent_kubeconfig(tmp_path / "agent.kubeconfig", url))
    kube.create_node("n1")
    yield rig, node, kubeconfig


@pytest.mark.root
def test_probes_listen_on_loopback_only_by_default(
    node_and_kubeconfig: tuple[Rig, Node, str],
) -> None:
    rig, node, kubeconfig = node_and_kubeconfig
    agent = AgentProcess(node, kubeconfig)
    try:
        assert wait_for(
            lambda: curl(node, "http://127.0.0.1:9441/healthz")[:2] == (200, "ok\n"), 30
        )
        code, _, _ = curl(rig.switch, f"http://{node.ip}:9441/healthz", timeout=3)
        assert code == 0, "another host on the node's LAN reached the probes"
        assert curl(node, f"http://{node.ip}:9441/metrics", timeout=3)[0] == 0
    finally:
        agent.stop()


@pytest.mark.root
def test_metrics_alone_where_asked(node_and_kubeconfig: tuple[Rig, Node, str]) -> None:
    """--metrics-address serves /metrics alone (e.g. for a Prometheus scraping the node)."""
    rig, node, kubeconfig = node_and_kubeconfig
    agent = AgentProcess(node, kubeconfig, "--metrics-address", ":9442")
    try:
        wait_for(lambda: curl(rig.switch, f"http://{node.ip}:9442/metrics")[0] == 200, 30)
        code, body, _ = curl(rig.switch, f"http://{node.ip}:9442/metrics")
        assert code == 200 and "underlay_agent_ready" in body, body
        assert curl(rig.switch, f"http://{node.ip}:9442/healthz")[0] == 404
        assert curl(rig.switch, f"http://{node.ip}:9441/healthz", timeout=3)[0] == 0
    finally:
        agent.stop()


SLOW_CLIENTS = textwrap.dedent(
    """
    import socket, sys
    socks, closed = [], 0
    for _ in range(int(sys.argv[1])):
        s = socket.socket()
        s.settimeout(10)
        try:
            s.connect(("127.0.0.1", 9441))
            s.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: node\\r\\n")  # never the empty line
            socks.append(s)
        except OSError:
            closed += 1
    print("held", len(socks), "refused", closed, flush=True)
    sys.stdin.readline()  # released: the empty line, then read the answers
    answered = 0
    for s in socks:
        try:
            s.sendall(b"\\r\\n")
        except OSError:
            continue
    for s in socks:
        try:
            answered += bool(s.recv(65536))
        except OSError:
            pass
    print("answered", answered, flush=True)
    """
)


@pytest.mark.root
def test_healthz_answers_within_the_probe_timeout_while_4000_slow_clients_hold_on(
    node_and_kubeconfig: tuple[Rig, Node, str],
) -> None:
    """4,000 clients connect and send half a request each, then hold; /healthz answers in
    well under the DaemonSet's 5 s probe timeout, the agent's threads stay bounded; when the
    4,000 are released at once, /healthz still answers in time."""
    _rig, node, kubeconfig = node_and_kubeconfig
    agent = AgentProcess(node, kubeconfig)
    slow = None
    try:
        wait_for(lambda: curl(node, "http://127.0.0.1:9441/healthz")[0] == 200, 30)
        threads0, rss0 = agent.threads(), agent.rss_kib()
        slow = node.popen(
            sys.executable, "-c", SLOW_CLIENTS, "4000",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert slow.stdout is not None and slow.stdin is not None
        held = slow.stdout.readline()
        assert held.startswith("held"), held
        threads, rss = agent.threads(), agent.rss_kib()
        worst = max(curl(node, "http://127.0.0.1:9441/healthz")[2] for _ in range(3))
        code, body, _ = curl(node, "http://127.0.0.1:9441/healthz")
        assert (code, body) == (200, "ok\n"), body
        slow.stdin.write("\n")
        slow.stdin.flush()
        released = [curl(node, "http://127.0.0.1:9441/healthz") for _ in range(3)]
        answered = slow.stdout.readline()
        print(
            f"4,000 slow clients: {held.strip()}; agent threads {threads0} -> {threads}, RSS "
            f"{rss0 // 1024} -> {rss // 1024} MiB; /healthz worst {worst:.3f} s held, "
            f"{max(r[2] for r in released):.3f} s released ({answered.strip()})"
        )
        assert threads <= threads0 + 4, f"threads {threads0} -> {threads}"
        assert rss - rss0 < 16 * 1024, f"RSS grew {(rss - rss0) / 1024:.1f} MiB"
        assert worst < 2.0, f"/healthz took {worst:.1f} s while the slow clients held on"
        assert all(r[0] == 200 and r[2] < 5.0 for r in released), released
    finally:
        if slow is not None:
            slow.kill()
            slow.wait(10)
        agent.stop()


def test_a_flood_of_probes_makes_one_cni_call_at_a_time(tmp_path: Path) -> None:
    """Each /healthz made its own CNI connection: 40 probes at once made 40. Now probes that
    arrive while a check runs share its answer."""
    sock = str(tmp_path / "agent.sock")
    cni = CniAgent("n1")
    server = CniServer(sock, cni)
    server.start()
    try:
        health = AgentHealth(sock, "n1", bridges=False)
        answers: list[str | None] = []
        start = threading.Barrier(40)

        def probe() -> None:
            start.wait()
            answers.append(health.healthz())

        threads = [threading.Thread(target=probe) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert answers == [None] * 40
        assert server.accepted <= 4, f"{server.accepted} CNI connections for 40 probes"
        assert health.healthz() is None and health.readyz() is None  # later ones check afresh
        server.stop()
        assert health.healthz() is not None, "a stopped CNI server is noticed at once"
    finally:
        server.stop()
        cni.close()


def test_idle_and_oversized_requests_are_answered_and_closed() -> None:
    """A client that sends nothing gets 408 after the read timeout (it held a thread for
    ever before); one whose header never ends within 8 KiB gets 431."""
    import socket

    from reconciler.httpserver import HttpServer

    http = HttpServer("127.0.0.1:0", lambda: "", lambda: None, lambda: None, read_timeout=1.0)
    port = int(http.start().rsplit(":", 1)[1])
    try:
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        t0 = time.monotonic()
        assert idle.recv(100).startswith(b"HTTP/1.1 408 ")
        assert 0.5 < time.monotonic() - t0 < 4
        idle.close()
        big = socket.create_connection(("127.0.0.1", port), timeout=5)
        big.sendall(b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 9000)
        assert big.recv(100).startswith(b"HTTP/1.1 431 ")
        big.close()
    finally:
        http.stop()
