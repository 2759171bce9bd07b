"""``/healthz``, ``/readyz`` and ``/metrics`` of ``underlay agent`` (the DaemonSet's probes).

The agent runs as a process inside a rig node against the real control plane (as in
test_agent.py); the endpoints are fetched with curl from inside the node's namespace at
127.0.0.1 and the default port 9441, as the kubelet probes the DaemonSet's hostNetwork pod
(deploy/agent.yaml: probes on host 127.0.0.1); the node's LAN address does not answer. The CNI
server's socket is a real unix socket: removed, or replaced by one that never answers.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from kubernetes import client
from node_agent import agent_args
from node_agent.cni.server import CniAgent, CniServer
from node_agent.daemon import AgentHealth, cni_check

from reconciler.httpserver import HttpServer
from tests.controlplane.cluster import Kube
from tests.integration.test_agent import (
    AGENT_NAMESPACE,
    IPS,
    UNDERLAY,
    World,
    ovs_bridge,
    world_fixture,  # noqa: F401 - the ``world`` fixture
)
from tests.rig import Node, wait_for

PORT = int(agent_args.DEFAULT_HTTP_ADDRESS.rsplit(":", 1)[1])


def get(node: Node, path: str, host: str | None = None) -> tuple[int, str]:
    """(HTTP status, body) of ``GET http://<host, default 127.0.0.1>:9441<path>`` from inside
    ``node``; status 0 when nothing answered."""
    url = f"http://{host or '127.0.0.1'}:{PORT}{path}"
    out = node.run(
        "curl", "-s", "-m", "10", "-o", "-", "-w", "\n%{http_code}", url, check=False, timeout=15
    ).stdout
    body, _, code = out.rpartition("\n")
    return int(code or 0), body


def wait_status(node: Node, path: str, code: int, timeout: float = 20.0, contains: str = "") -> str:
    """Wait until ``path`` answers ``code`` with a body containing ``contains``; returns the
    body."""
    got: list[tuple[int, str]] = []

    def check() -> bool:
        got.append(get(node, path))
        return got[-1][0] == code and contains in got[-1][1]

    wait_for(check, timeout, f"{path} answering {code} (last: {got[-1:] or 'none'})")
    return got[-1][1]


def test_ready_only_after_the_first_pass_alive_throughout(world: World) -> None:
    """No Node object yet: the first pass cannot finish (NodeNotFound), so /readyz says why
    while /healthz is ok (the loop turns, the CNI server answers); once the Node exists the
    pass finishes: /readyz ok, and /metrics tells the outcome."""
    w = world
    n1 = w.node("n1")
    w.cluster.core.delete_node("n1", body=client.V1DeleteOptions())
    w.cluster.apply_bridge(ovs_bridge())
    a = w.agent("n1")

    body = wait_status(n1, "/readyz", 503, contains="NodeNotFound")
    assert body.startswith("the first bridge pass on node n1 has not finished: NodeNotFound:"), body
    assert body.count("\n") == 1, "one line"
    assert get(n1, "/healthz") == (200, "ok\n")
    code, text = get(n1, "/metrics")
    assert code == 200 and "underlay_agent_ready 0" in text, text
    assert not [x for x in text.splitlines() if x.startswith("underlay_agent_last_pass")], text

    started = time.time()
    w.cluster.add_node("n1")
    w.cluster.wait_condition("n1", "Ready")
    assert wait_status(n1, "/readyz", 200) == "ok\n"
    assert get(n1, "/healthz") == (200, "ok\n")
    code, text = get(n1, "/metrics")
    assert code == 200 and "underlay_agent_ready 1" in text, text
    line = next(x for x in text.splitlines() if x.startswith("underlay_agent_last_pass_timestamp"))
    assert float(line.split()[1]) >= started
    assert 'underlay_agent_ovsbridges{outcome="' in text, text
    # loopback only: another host on the node's segment cannot reach the probes
    assert get(n1, "/healthz", host=n1.ip)[0] == 0
    assert a.proc.poll() is None


def test_healthz_fails_when_the_cni_socket_is_gone_or_does_not_answer(world: World) -> None:
    """The CNI socket removed (the plugins cannot reach the agent): /healthz and /readyz fail
    naming it. A socket that accepts but never answers (a hung server) fails too: a bare
    connect would have passed."""
    w = world
    n1 = w.node("n1")
    w.cluster.apply_bridge(ovs_bridge())
    a = w.agent("n1")
    w.cluster.wait_condition("n1", "Ready")
    assert wait_status(n1, "/readyz", 200) == "ok\n"
    assert get(n1, "/healthz") == (200, "ok\n")

    Path(a.socket).unlink()
    code, body = get(n1, "/healthz")
    assert code == 503, body
    assert body == f"CNI server on {a.socket} cannot be reached: No such file or directory\n"
    code, body = get(n1, "/readyz")
    assert code == 503 and a.socket in body, body

    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        hung.bind(a.socket)
        hung.listen(8)  # connections queue in the backlog; nobody accepts or answers
        t0 = time.monotonic()
        code, body = get(n1, "/healthz")
        assert code == 503, body
        assert body == f"CNI server on {a.socket} did not answer a VERSION call within 2s\n"
        assert 1.5 < time.monotonic() - t0 < 8
    finally:
        hung.close()
    assert a.proc.poll() is None


def test_healthz_fails_when_the_cni_server_is_stopped(kube: Kube, tmp_path: Path) -> None:
    """The agent's CNI server itself (CniServer, as the agent runs it, in this process, as the
    agent's ServiceAccount) and the agent's health endpoint on loopback: ok while it serves;
    stopped, /healthz and /readyz fail naming the socket; started again, ok."""
    sock = str(tmp_path / "agent.sock")
    cni = CniAgent("n1", kube=kube.api_client(kube.agent_kubeconfig()))
    server = CniServer(sock, cni)
    health = AgentHealth(sock, "n1", bridges=False)
    http = HttpServer("127.0.0.1:0", health.metrics, health.healthz, health.readyz)
    url = http.start()
    try:

        def fetch(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url + path, timeout=10) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        assert fetch("/healthz")[0] == 503  # not started yet
        server.start()
        assert fetch("/healthz") == (200, "ok\n")
        assert fetch("/readyz") == (200, "ok\n")
        assert cni_check(sock) is None
        server.stop()
        code, body = fetch("/healthz")
        assert (code, body) == (503, f"CNI server on {sock} cannot be reached: No such file or "
                                     "directory\n")  # fmt: skip
        assert fetch("/readyz")[0] == 503
        server.start()
        assert fetch("/healthz") == (200, "ok\n")
    finally:
        http.stop()
        server.stop()
        cni.close()


def test_healthz_fails_while_a_pass_is_stuck(world: World) -> None:
    """A pass stuck in a request the API server does not answer for longer than
    --stuck-after: /healthz fails saying so; once it returns, ok again. /readyz stays ok (the
    first pass was done)."""
    w = world
    n1 = w.node("n1")
    w.cluster.apply_bridge(ovs_bridge())
    a = w.agent("n1", "--stuck-after", "2", resync=0.5)
    w.cluster.wait_condition("n1", "Ready")
    assert wait_status(n1, "/healthz", 200) == "ok\n"

    w.cluster.kube.inject_fault("/ovsbridges$", method="GET", hang=9, count=1)
    body = wait_status(n1, "/healthz", 503, timeout=15)
    assert body.startswith("a bridge pass on node n1 has been running for "), body
    assert body.endswith("s (limit 2s)\n"), body
    assert get(n1, "/readyz") == (200, "ok\n")
    assert wait_status(n1, "/healthz", 200, timeout=20) == "ok\n"
    assert a.proc.poll() is None


def test_http_address_taken_or_off(world: World) -> None:
    """Port 9441 already taken on the node: the agent says so and exits 2 before it changes
    anything (no CNI socket, no bridge); --http-address '' serves nothing."""
    w = world
    n1 = w.node("n1")
    w.cluster.apply_bridge(ovs_bridge())
    taken = n1.listen_tcp("0.0.0.0", PORT)
    try:
        out = n1.run(
            "env", f"POD_NAMESPACE={AGENT_NAMESPACE}",
            UNDERLAY, "agent", "--node-name", "n1", "--kubeconfig", w.cluster.node_kubeconfig,
            "--ovsdb", n1.ovsdb, "--socket", str(n1.rundir / "agent.sock"),
            "--root", str(n1.root), check=False, timeout=60,
        )  # fmt: skip
    finally:
        taken.close()
    assert out.returncode == 2, out.stdout + out.stderr
    assert (
        f"underlay agent: error: --http-address {agent_args.DEFAULT_HTTP_ADDRESS}: cannot serve "
        "/healthz and /readyz: Address already in use"
    ) in out.stderr, out.stderr
    assert not (n1.rundir / "agent.sock").exists()
    assert "br1" not in n1.vsctl("list-br").split()
    assert w.cluster.enactment("n1") is None

    w.agent("n1", "--http-address", "")
    w.cluster.wait_condition("n1", "Ready")
    assert get(n1, "/healthz")[0] == 0
    assert get(n1, "/readyz", host=IPS["n1"])[0] == 0


def test_a_bad_http_address_is_an_error_before_anything_starts(world: World) -> None:
    n1 = world.node("n1")
    for addr in ("9441", "host:port", ":70000"):
        out = n1.run(
            "env", f"POD_NAMESPACE={AGENT_NAMESPACE}",
            UNDERLAY, "agent", "--node-name", "n1", "--kubeconfig", world.cluster.node_kubeconfig,
            "--ovsdb", n1.ovsdb, "--socket", str(n1.rundir / "agent.sock"),
            "--root", str(n1.root), "--http-address", addr, check=False, timeout=60,
        )  # fmt: skip
        assert out.returncode == 2 and f"invalid address {addr!r}" in out.stderr, out.stderr
        assert not (n1.rundir / "agent.sock").exists()
