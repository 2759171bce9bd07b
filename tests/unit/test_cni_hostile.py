"""The CNI socket against hostile and broken callers (issue 10, items 3, 4 and 6).

No OVS and no rig: the agent's CNI server serves a unix socket in a temporary directory, in
this process or as ``python -m node_agent.cni.server`` (to measure its threads and memory),
and the installed shim is executed as a runtime executes it. Every test here failed on the
server before this change: a thread per connection and no deadline, 16 MiB buffered per
connection, no peer check, handler exceptions closing the connection, which the shim reported
as "agent unreachable" (code 11, retry forever).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.cni.install import install_shims
from node_agent.cni.server import CniAgent, CniServer

PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
ROOT = Path(__file__).resolve().parents[2]
NO_BRIDGE = {"cniVersion": "1.0.0", "name": "n", "type": "underlay-ovs"}  # code 7, no side effect


@pytest.fixture
def bins(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    install_shims(d, str(tmp_path / "agent.sock"), python=PYTHON)
    return d


@pytest.fixture
def agent() -> Iterator[CniAgent]:
    a = CniAgent("n1")
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def server(tmp_path: Path, agent: CniAgent) -> Iterator[CniServer]:
    srv = CniServer(str(tmp_path / "agent.sock"), agent, read_timeout=2.0)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def shim(
    bins: Path,
    command: str,
    stdin: bytes | dict[str, Any],
    *,
    prefix: tuple[str, ...] = (),
    timeout: float = 30,
    **env: str | bytes,
) -> tuple[int, dict[str, Any] | None, bytes]:
    """Execute the installed underlay-ovs shim; (exit status, stdout JSON or None, stderr)."""
    e: dict[str | bytes, str | bytes] = {
        "CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/none",
        "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni",
        "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p1;K8S_POD_UID=u1",
    }  # fmt: skip
    e.update({f"CNI_{k.upper()}": v for k, v in env.items()})
    data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    p = subprocess.run(
        [*prefix, str(bins / "underlay-ovs")],
        input=data,
        env={os.fsencode(k): os.fsencode(v) for k, v in e.items()},
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else None), p.stderr


def frame(env: dict[str, str], stdin: bytes) -> bytes:
    block = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
    return b"CNI1 %d %d\n" % (len(block), len(stdin)) + block + stdin


def read_answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\n")
    status, nout, _nerr = (int(x) for x in head.split())
    return status, json.loads(body[:nout])


# --- item 4: input that killed the handler -----------------------------------------------------
def test_an_undecodable_ifname_is_code_4(bins: Path, server: CniServer) -> None:
    rc, out, _ = shim(bins, "ADD", NO_BRIDGE, ifname=b"\xff\xfe")
    assert (rc, out and out["code"]) == (1, 4), out
    assert out and "CNI_IFNAME" in out["msg"] and "UTF-8" in out["msg"]


def test_deeply_nested_json_is_code_6(bins: Path, server: CniServer) -> None:
    rc, out, _ = shim(bins, "ADD", b"[" * 100_000)
    assert (rc, out and out["code"]) == (1, 6), out
    rc, out, _ = shim(bins, "ADD", b"[" * 5_000 + b"]" * 5_000)  # under the count: recursion
    assert (rc, out and out["code"]) == (1, 6), out
    assert out and "nested too deeply" in out["msg"]


def test_stdin_over_the_limit_is_code_6_not_agent_unreachable(
    bins: Path, server: CniServer
) -> None:
    """The agent answers at the header and stops reading; the shim, whose send then breaks,
    still reads and prints that answer."""
    big = b'{"cniVersion":"1.0.0","type":"underlay-ovs","x":"' + b"a" * (17 << 20) + b'"}'
    rc, out, _ = shim(bins, "ADD", big)
    assert (rc, out and out["code"]) == (1, 6), out
    assert out and "request too large" in out["msg"] and "at most 1048576" in out["msg"]


def test_an_unexpected_exception_is_code_999_naming_it(
    bins: Path, server: CniServer, agent: CniAgent
) -> None:
    """A plugin whose handler raises (registered in the agent's plugin table, as ours are)."""

    def boom(_agent: CniAgent, _req: Any) -> None:
        raise KeyError("bridge")

    agent.plugins["underlay-boom"] = {"ADD": boom, "DEL": boom, "CHECK": boom}
    rc, out, _ = shim(bins, "ADD", {**NO_BRIDGE, "type": "underlay-boom"})
    assert (rc, out) == (1, {"cniVersion": "1.0.0", "code": 999, "msg": "KeyError: 'bridge'"})
    rc, out, err = shim(bins, "DEL", {**NO_BRIDGE, "type": "underlay-boom"})
    assert rc == 0 and out is None and b"KeyError" in err  # DEL: answered, left for GC


def test_a_refused_del_is_an_error_not_a_silent_success(bins: Path, server: CniServer) -> None:
    """Malformed input is refused for every command; DEL used to exit 0 ("not executed")."""
    rc, out, _ = shim(bins, "DEL", NO_BRIDGE, containerid="c1/../x")
    assert (rc, out and out["code"]) == (1, 4), out


def test_an_agent_that_closes_without_answer_is_not_called_unreachable(
    bins: Path, tmp_path: Path
) -> None:
    """Reached but no answer (the agent stopped mid-call): code 11 saying so; no socket at
    all: code 11 "unreachable, is the agent running?"."""
    rc, out, _ = shim(bins, "ADD", NO_BRIDGE)
    assert rc == 1 and out and out["code"] == 11 and "unreachable" in out["msg"]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "agent.sock"))
    listener.listen()

    def close_at_once() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    t = threading.Thread(target=close_at_once)
    t.start()
    try:
        rc, out, _ = shim(bins, "ADD", NO_BRIDGE)
    finally:
        t.join(10)
        listener.close()
    assert rc == 1 and out and out["code"] == 11, out
    assert "gave no answer" in out["msg"] and "unreachable" not in out["msg"], out
    assert "running" not in out["details"], out


# --- item 3: peers, deadlines, concurrency, memory -----------------------------------------
def test_a_peer_other_than_root_is_refused_and_logged(
    bins: Path, server: CniServer, caplog: pytest.LogCaptureFixture
) -> None:
    """uid 65534 with CAP_DAC_OVERRIDE passes the socket's 0600 mode (it completed a full ADD
    before); SO_PEERCRED says who it is."""
    caplog.set_level(logging.WARNING, logger="node_agent.cni.server")
    nobody = (
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
        "--inh-caps=+dac_override", "--ambient-caps=+dac_override", PYTHON, "-IS",
    )  # fmt: skip
    rc, out, _ = shim(bins, "ADD", NO_BRIDGE, prefix=nobody)
    assert rc == 1 and out and out["code"] == 111, out
    assert "uid 0 only" in out["msg"] and "uid 65534" in out["msg"]
    assert any("running as uid 65534" in r.getMessage() for r in caplog.records), caplog.text
    rc, out, _ = shim(bins, "ADD", NO_BRIDGE)  # root is served
    assert out and out["code"] == 7


def test_a_request_that_never_arrives_is_answered_at_the_deadline(server: CniServer) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(server.socket_path)
    s.sendall(b"CNI1 10 10\n")  # a header, then nothing
    t0 = time.monotonic()
    status, err = read_answer(s)
    s.close()
    assert status == 1 and err["code"] == 6 and "did not arrive within 2 s" in err["msg"]
    assert 1.5 < time.monotonic() - t0 < 6


def test_a_del_waits_for_a_stuck_call_of_its_container_only_so_long(
    bins: Path, tmp_path: Path, agent: CniAgent
) -> None:
    """Calls of one container and interface are serialised; one that hangs makes the next
    fail with code 11 (try again) after the lock timeout, never wait behind it for ever."""
    release = threading.Event()

    def hang(_agent: CniAgent, _req: Any) -> None:
        release.wait(30)

    agent.plugins["underlay-hang"] = {"ADD": hang, "DEL": hang, "CHECK": hang}
    agent.lock_timeout = 2.0
    srv = CniServer(str(tmp_path / "agent.sock"), agent)
    srv.start()
    try:
        first = threading.Thread(
            target=shim, args=(bins, "ADD", {**NO_BRIDGE, "type": "underlay-hang"})
        )
        first.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        rc, out, _ = shim(bins, "DEL", {**NO_BRIDGE, "type": "underlay-hang"}, timeout=60)
        waited = time.monotonic() - t0
        assert rc == 1 and out and out["code"] == 11 and "try again later" in out["msg"], out
        assert 1.5 < waited < 10
    finally:
        release.set()
        first.join(30)
        srv.stop()


class ServerProcess:
    """``python -m node_agent.cni.server`` as a process (its threads and RSS are its own)."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.socket = str(tmp_path / "agent.sock")
        self.log = tmp_path / "agent.log"
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node_agent.cni.server", "--socket", self.socket,
                 "--ovsdb", "unix:/nonexistent", "--node-name", "n1", "-v", *args],
                stdout=subprocess.PIPE, stderr=logf, cwd=ROOT,
            )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"ready", self.log.read_text()

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[ServerProcess]:
    p = ServerProcess(tmp_path)
    try:
        yield p
    finally:
        p.stop()


def test_held_connections_cost_no_threads_and_calls_still_get_through(
    bins: Path, proc: ServerProcess
) -> None:
    """2,000 connections that send half a header and hold (2,014 threads before): the agent's
    thread count stays bounded and a real call is answered at once."""
    threads0 = proc.status("Threads")
    held = []
    try:
        for _ in range(2000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(proc.socket)
            s.send(b"CNI1 1")
            held.append(s)
        time.sleep(1.0)
        threads = proc.status("Threads")
        t0 = time.monotonic()
        _, out, _ = shim(bins, "ADD", NO_BRIDGE)
        took = time.monotonic() - t0
    finally:
        for s in held:
            s.close()
    assert threads <= threads0 + 8, (threads0, threads)
    assert out and out["code"] == 7 and took < 5, (out, took)


def test_memory_is_bounded_under_a_flood(proc: ServerProcess) -> None:
    """60 connections each send a 1 MiB config (the largest allowed) but its last byte: the
    agent holds at most its buffer budget (4 MiB) of them; 16 MiB each were buffered before
    (20 connections took the agent from 153 to 428 MiB)."""
    rss0 = proc.status("VmRSS")
    payload = b"x" * ((1 << 20) - 1)  # one object for every sender: the test's memory is flat
    head = b"CNI1 0 %d\n" % (1 << 20)
    socks = []

    def send(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.sendall(head)
            s.sendall(payload)

    senders = []
    try:
        for _ in range(60):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(proc.socket)
            socks.append(s)
            t = threading.Thread(target=send, args=(s,), daemon=True)
            t.start()
            senders.append(t)
        time.sleep(3)
        peak = proc.status("VmHWM")
        rss = proc.status("VmRSS")
    finally:
        for s in socks:
            s.close()
    grew = (max(peak, rss) - rss0) / 1024
    assert grew < 24, f"RSS grew {grew:.1f} MiB under the flood"


# --- item 6: log injection and Kubernetes names ----------------------------------------------
def test_a_container_id_with_a_newline_is_refused_and_forges_no_log_line(
    tmp_path: Path, proc: ServerProcess
) -> None:
    bins = tmp_path / "bin"
    install_shims(bins, proc.socket, python=PYTHON)
    forged = "2026-01-01 00:00:00,000 INFO node_agent.cni.server: ADD container=x -> ok"
    rc, out, _ = shim(bins, "ADD", NO_BRIDGE, containerid="c1\n" + forged)
    assert (rc, out and out["code"]) == (1, 4), out
    assert out and "CNI_CONTAINERID" in out["msg"] and "container ID" in out["msg"]
    rc, out, _ = shim(bins, "ADD", NO_BRIDGE, containerid="c1\rforged")
    assert out and out["code"] == 4
    time.sleep(0.3)
    lines = proc.log.read_text().splitlines()
    assert not [ln for ln in lines if ln.startswith(forged[:20]) or ln.startswith("forged")], lines
    assert any("CNI_CONTAINERID" in ln and "\\n" in ln for ln in lines), lines


@pytest.mark.parametrize(
    "args",
    [
        "K8S_POD_NAMESPACE=default;K8S_POD_NAME=..",
        "K8S_POD_NAMESPACE=..;K8S_POD_NAME=p1",
        "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p1/../../x",
        "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p1\n",
        "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p1;K8S_POD_UID=u/1",
    ],
)
def test_pod_arguments_that_are_not_kubernetes_names_are_refused(
    bins: Path, server: CniServer, args: str
) -> None:
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "bridge", "ipam": {"type": "underlay-ipam"}}
    for command in ("ADD", "DEL"):
        rc, out, _ = shim(bins, command, conf, args=args)
        assert (rc, out and out["code"]) == (1, 4), (command, out)
        assert out and "CNI_ARGS K8S_POD_" in out["msg"]
