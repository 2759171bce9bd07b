"""Connectivity probes run after a bridge change (kubernetes-nmstate's probes, in Python).

Two probes, retried until they pass or ``timeout`` seconds have gone by:

- ``gateway``: the default gateway answers ICMP echo (RFC 792 / RFC 4443), sent from a raw
  socket (the agent is privileged; no ``ping`` binary is run);
- ``api-server``: a TCP connection to the API server's host:port is accepted.

Sockets are opened inside the node's network namespace when ``netns`` names one (tests);
in production the agent is in the host namespace and passes None.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pyroute2 import netns as pr_netns

PROBE_GATEWAY = "gateway"
PROBE_API_SERVER = "api-server"

_ns_lock = threading.Lock()


@dataclass(frozen=True)
class ProbeTargets:
    """What to probe: ``gateway`` IP (None: skip), ``api_server`` (host, port) (None: skip),
    ``timeout`` seconds for all probes together (OvsBridge spec.probeTimeoutSeconds)."""

    gateway: str | None = None
    api_server: tuple[str, int] | None = None
    timeout: float = 20.0


@dataclass(frozen=True)
class ProbeResult:
    """``ok``; ``failed``: name of the first probe that failed (:data:`PROBE_GATEWAY` or
    :data:`PROBE_API_SERVER`) or None; ``detail``: text for logs; ``elapsed``: seconds."""

    ok: bool
    failed: str | None = None
    detail: str = ""
    elapsed: float = 0.0


@contextlib.contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the body with this thread inside network namespace ``netns`` (None: no change).

    setns(2) applies to the calling thread only; sockets created inside keep that namespace.
    """
    if not netns:
        yield
        return
    with _ns_lock:
        pr_netns.pushns(netns)
        try:
            yield
        finally:
            pr_netns.popns()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_echo(addr: str, timeout: float = 1.0, netns: str | None = None) -> bool:
    """True when ``addr`` (IPv4 or IPv6) answers one ICMP echo request within ``timeout`` s.

    Raw socket (needs CAP_NET_RAW); the identifier is random so concurrent probes do not mix.
    Raises OSError only when the socket cannot be created.
    """
    v6 = ":" in addr
    family = socket.AF_INET6 if v6 else socket.AF_INET
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    with in_netns(netns):
        sock = socket.socket(family, socket.SOCK_RAW, proto)
    ident = int.from_bytes(os.urandom(2), "big")
    payload = b"underlay-probe" + os.urandom(8)
    req_type, rep_type = (128, 129) if v6 else (8, 0)
    header = struct.pack("!BBHHH", req_type, 0, 0, ident, 1)
    csum = 0 if v6 else _checksum(header + payload)  # the kernel fills ICMPv6 checksums
    packet = struct.pack("!BBHHH", req_type, 0, csum, ident, 1) + payload
    deadline = time.monotonic() + timeout
    try:
        sock.setblocking(False)
        try:
            sock.sendto(packet, (addr, 0))
        except OSError:
            return False  # e.g. ENETUNREACH while routes are missing
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            data, src = sock.recvfrom(2048)
            if src[0] != addr:
                continue
            icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]
            if len(icmp) >= 8:
                rtype, _, _, rid, _ = struct.unpack("!BBHHH", icmp[:8])
                if rtype == rep_type and rid == ident and icmp[8:] == payload:
                    return True
        return False
    finally:
        sock.close()


def tcp_connect(host: str, port: int, timeout: float = 1.0, netns: str | None = None) -> bool:
    """True when ``host``:``port`` accepts a TCP connection within ``timeout`` seconds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with in_netns(netns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _retry(check: Callable[[float], bool], deadline: float) -> bool:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        attempt = min(1.0, left)
        start = time.monotonic()
        if check(attempt):
            return True
        # do not spin when a check fails fast (e.g. connection refused)
        time.sleep(
            max(0.0, min(0.2, deadline - time.monotonic(), attempt - (time.monotonic() - start)))
        )


def run_probes(targets: ProbeTargets, netns: str | None = None) -> ProbeResult:
    """Run the gateway probe, then the API server probe, retrying each until it passes; all
    within ``targets.timeout`` seconds. Returns the first failure (the later probe is not run).
    """
    start = time.monotonic()
    deadline = start + targets.timeout
    if targets.gateway is not None:
        gw = targets.gateway
        if not _retry(lambda t: icmp_echo(gw, t, netns), deadline):
            return ProbeResult(
                False,
                PROBE_GATEWAY,
                f"default gateway {gw} did not answer ICMP echo within {targets.timeout:g} s",
                time.monotonic() - start,
            )
    if targets.api_server is not None:
        host, port = targets.api_server
        if not _retry(lambda t: tcp_connect(host, port, t, netns), deadline):
            return ProbeResult(
                False,
                PROBE_API_SERVER,
                f"API server {host}:{port} did not accept TCP within {targets.timeout:g} s",
                time.monotonic() - start,
            )
    return ProbeResult(True, None, "probes passed", time.monotonic() - start)
