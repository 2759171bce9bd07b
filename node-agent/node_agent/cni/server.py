"""The node agent's CNI endpoint: a threaded unix-socket server and the plugin dispatcher.

:class:`CniServer` accepts one shim connection per CNI call (protocol in
:mod:`node_agent.cni.shim`), decodes it into a :class:`~node_agent.cni.request.CniRequest`
and hands it to :class:`CniAgent`, which dispatches on the config's ``type``:
``underlay-ovs`` (:mod:`node_agent.cni.ovs_plugin`) or ``underlay-ipam``
(:mod:`node_agent.cni.ipam_plugin`). Each connection is served in its own thread, so several
pods attach at once; calls for the same container and interface are serialised.

Errors become CNI error JSON (:mod:`node_agent.cni.errors`) with a non-zero exit, except DEL:
DEL always exits 0 and reports what it could not clean on stderr (DESIGN.md, "IPAM").

Run standalone (tests, until ``underlay agent`` embeds it)::

    python -m node_agent.cni.server --socket /run/underlay/agent.sock \\
        --ovsdb unix:/var/run/openvswitch/db.sock --kubeconfig kc.yaml --node-name n1
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from reconciler.vocab import CNI_DEFAULT_VERSION, CNI_IPAM_TYPE, CNI_OVS_TYPE, DEFAULT_AGENT_SOCKET

from .errors import (
    DECODE_FAILURE,
    INTERNAL,
    INVALID_CONFIG,
    TRY_AGAIN_LATER,
    CniError,
)
from .request import CniRequest, decode_env_block, decode_request
from .result import render_json, version_reply

log = logging.getLogger(__name__)

MAX_ENV = 1 << 20
MAX_STDIN = 16 << 20

Handler = Callable[["CniAgent", CniRequest], "dict[str, Any] | None"]


class CniAgent:
    """Executes CNI calls for this node: holds the OVSDB connection, Kubernetes client, IPAM.

    ``node_name`` is this node's Kubernetes Node name. OVSDB: pass a connected ovsdbapp API as
    ``ovs_api`` or, better, a remote (``unix:/path``) as ``ovsdb``: the agent then opens its
    own connection on first use, monitoring only the columns the plugins need
    (:func:`node_agent.cni.ports.connect`). Kubernetes:
    ``kube`` is a ``kubernetes.client.ApiClient`` (needed by underlay-ipam). ``host_netns``
    is the path of the node's network namespace when this process runs elsewhere (tests run
    the agent in-process); None means the process's own namespace. ``purge_interval``
    (seconds) rate-limits the background purge of dead pod ports. ``api_timeout`` (seconds)
    bounds every Kubernetes API request of the IPAM (a request the server does not answer
    fails the CNI call with code 11).
    """

    def __init__(
        self,
        node_name: str,
        *,
        ovsdb: str | None = None,
        ovs_api: Any = None,
        kube: Any = None,
        host_netns: str | None = None,
        ovsdb_timeout: float = 10.0,
        purge_interval: float = 10.0,
        api_timeout: float = 10.0,
    ) -> None:
        self.node_name = node_name
        self.ovsdb_remote = ovsdb
        self._ovs = ovs_api
        self._own_ovs = False
        self.kube = kube
        self.host_netns = host_netns
        self.ovsdb_timeout = ovsdb_timeout
        self.purge_interval = purge_interval
        self.api_timeout = api_timeout
        """Seconds between opportunistic purges of dead pod ports (0: after every call)."""
        self.last_purge = 0.0
        self.bridge_gate: Callable[[str], str | None] | None = None
        """Asked before an ADD attaches a pod to an OVS bridge: None when it may, else why not
        (the bridge agent of the same process sets it to
        :meth:`node_agent.daemon.BridgeAgent.bridge_unready`: a bridge it is still creating
        or removing); the ADD then fails with code 11. None (standalone server): no check."""
        self._ipam: Any = None
        self._lock = threading.Lock()
        self._busy: dict[tuple[str, str], list[Any]] = {}
        self._running: set[str] = set()
        self._pending: dict[tuple[str, str], threading.Event] = {}
        self.executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="cni-work")
        """Worker threads for the parts of one call that run concurrently (IPAM, OVSDB)."""
        from . import ipam_plugin, ovs_plugin

        self.plugins: dict[str, dict[str, Handler]] = {
            CNI_OVS_TYPE: {
                "ADD": ovs_plugin.cmd_add,
                "DEL": ovs_plugin.cmd_del,
                "CHECK": ovs_plugin.cmd_check,
            },
            CNI_IPAM_TYPE: {
                "ADD": ipam_plugin.cmd_add,
                "DEL": ipam_plugin.cmd_del,
                "CHECK": ipam_plugin.cmd_check,
            },
        }

    # --- shared resources ---------------------------------------------------------------
    @property
    def ovs(self) -> Any:
        """The ovsdbapp Open_vSwitch API; connects on first use (CniError 11 if unreachable)."""
        with self._lock:
            if self._ovs is None:
                if not self.ovsdb_remote:
                    raise CniError(INTERNAL, "the agent has no OVSDB connection configured")
                from node_agent.ovsdb import OvsdbUnavailable

                from .ports import connect

                try:
                    self._ovs = connect(self.ovsdb_remote, timeout=self.ovsdb_timeout)
                except OvsdbUnavailable as exc:
                    raise CniError(TRY_AGAIN_LATER, str(exc)) from exc
                self._own_ovs = True
            return self._ovs

    @property
    def ipam(self) -> Any:
        """The :class:`node_agent.ipam.Ipam` engine (CniError 100 without a Kubernetes client)."""
        with self._lock:
            if self._ipam is None:
                if self.kube is None:
                    raise CniError(
                        INTERNAL, "the agent has no Kubernetes API configured (underlay-ipam)"
                    )
                from node_agent.ipam import Ipam

                self._ipam = Ipam(self.kube, self.node_name, request_timeout=self.api_timeout)
            return self._ipam

    def background(self, key: str, fn: Callable[[], object]) -> bool:
        """Run ``fn`` in a daemon thread unless a run under ``key`` is still going.

        Returns True when a run was started. Used for opportunistic housekeeping that must
        not delay a CNI answer (purging dead pod ports).
        """
        with self._lock:
            if key in self._running:
                return False
            self._running.add(key)

        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("background task %s failed", key)
            finally:
                with self._lock:
                    self._running.discard(key)

        threading.Thread(target=run, name=key, daemon=True).start()
        return True

    def defer(self, key: tuple[str, str], fn: Callable[[], object]) -> None:
        """Run ``fn`` in a daemon thread now; :meth:`wait_deferred` on ``key`` waits for it.

        Used for slow cleanup that must not delay a DEL answer (a veth delete waits for a
        kernel RCU grace period), keyed by ``(netns, ifname)`` so a following ADD of the same
        interface can wait for it.
        """
        done = threading.Event()
        with self._lock:
            self._pending[key] = done

        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("deferred cleanup %s failed", key)
            finally:
                done.set()
                with self._lock:
                    if self._pending.get(key) is done:
                        del self._pending[key]

        threading.Thread(target=run, name=f"defer:{key[1]}", daemon=True).start()

    def wait_deferred(self, key: tuple[str, str], timeout: float = 10.0) -> None:
        """Wait (up to ``timeout`` s) for deferred work registered under ``key``, if any."""
        with self._lock:
            done = self._pending.get(key)
        if done is not None:
            done.wait(timeout)

    def close(self) -> None:
        """Stop the worker threads; close the OVSDB connection if this agent opened it.

        Idempotent.
        """
        self.executor.shutdown(wait=False)
        with self._lock:
            if self._ipam is not None:
                self._ipam.close()
            if self._own_ovs and self._ovs is not None:
                from node_agent.ovsdb import disconnect

                disconnect(self._ovs)
                self._ovs = None
                self._own_ovs = False

    @contextlib.contextmanager
    def _serialised(self, key: tuple[str, str]) -> Iterator[None]:
        with self._lock:
            entry = self._busy.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    self._busy.pop(key, None)

    # --- dispatch -------------------------------------------------------------------------
    def plugin_for(self, req: CniRequest) -> str:
        """Which of our plugins a call is for.

        The config's ``type`` when it is ours (a runtime executing underlay-ovs or
        underlay-ipam as the main plugin); otherwise ``underlay-ipam`` when ``ipam.type`` is
        underlay-ipam (a foreign main plugin, e.g. bridge, executing us as its IPAM plugin,
        with its own whole config on stdin). Raises CniError 7 otherwise.
        """
        if req.plugin_type in self.plugins:
            return req.plugin_type
        ipam = req.config.get("ipam")
        if isinstance(ipam, dict) and ipam.get("type") == CNI_IPAM_TYPE:
            return CNI_IPAM_TYPE
        raise CniError(
            INVALID_CONFIG,
            f"plugin type {req.plugin_type!r} is not served by the underlay agent "
            f"(serves {', '.join(sorted(self.plugins))}, and ipam.type {CNI_IPAM_TYPE})",
        )

    def handle(self, req: CniRequest) -> tuple[int, bytes, bytes]:
        """Run one decoded call; returns ``(exit status, stdout bytes, stderr bytes)``."""
        if req.command == "VERSION":
            import json

            return 0, json.dumps(version_reply()).encode() + b"\n", b""
        start = time.monotonic()
        try:
            handlers = self.plugins[self.plugin_for(req)]
            with self._serialised((req.container_id, req.ifname)):
                result = handlers[req.command](self, req)
        except Exception as exc:
            err = (
                exc
                if isinstance(exc, CniError)
                else CniError(INTERNAL, f"{type(exc).__name__}: {exc}")
            )
            if not isinstance(exc, CniError):
                log.exception("%s %s failed", req.plugin_type, req.describe())
            ms = (time.monotonic() - start) * 1000
            if req.command == "DEL":
                log.warning(
                    "%s %s incomplete (%.1f ms): %s", req.plugin_type, req.describe(), ms, err.msg
                )
                note = (
                    f"{req.plugin_type}: DEL of container {req.container_id} interface "
                    f"{req.ifname} incomplete (left for garbage collection): {err.msg}\n"
                )
                return 0, b"", note.encode()
            log.info(
                "%s %s -> error %d (%.1f ms): %s",
                req.plugin_type,
                req.describe(),
                err.code,
                ms,
                err.msg,
            )
            return 1, err.to_json(req.version), b""
        ms = (time.monotonic() - start) * 1000
        log.info("%s %s -> ok (%.1f ms)", req.plugin_type, req.describe(), ms)
        if req.command == "ADD":
            return 0, render_json(result or {}, req.version), b""
        return 0, b"", b""

    def handle_raw(self, env: dict[str, str], stdin: bytes) -> tuple[int, bytes, bytes]:
        """Decode ``env`` + ``stdin`` and run the call (errors in decoding become CNI errors)."""
        try:
            req = decode_request(env, stdin)
        except CniError as exc:
            if env.get("CNI_COMMAND") == "DEL":
                return 0, b"", f"underlay: DEL not executed: {exc.msg}\n".encode()
            return 1, exc.to_json(_guess_version(stdin)), b""
        return self.handle(req)


def _guess_version(stdin: bytes) -> str:
    import json

    try:
        v = json.loads(stdin).get("cniVersion")
    except Exception:
        return CNI_DEFAULT_VERSION
    return v if isinstance(v, str) else CNI_DEFAULT_VERSION


def _read_request(sock: socket.socket) -> tuple[dict[str, str], bytes]:
    """Read ``CNI1 <envlen> <stdinlen>\\n`` + env + stdin; raises CniError 6 when malformed."""
    buf = b""
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise CniError(DECODE_FAILURE, "connection closed before the request header")
        buf += chunk
        if len(buf) > 64 and b"\n" not in buf[:64]:
            raise CniError(DECODE_FAILURE, "request header too long")
    head, _, rest = buf.partition(b"\n")
    parts = head.split()
    if len(parts) != 3 or parts[0] != b"CNI1" or not parts[1].isdigit() or not parts[2].isdigit():
        raise CniError(DECODE_FAILURE, f"unknown request header {head[:40]!r}")
    nenv, nstdin = int(parts[1]), int(parts[2])
    if nenv > MAX_ENV or nstdin > MAX_STDIN:
        raise CniError(DECODE_FAILURE, "request too large")
    want = nenv + nstdin
    chunks = [rest]
    have = len(rest)
    while have < want:
        chunk = sock.recv(min(262144, want - have))
        if not chunk:
            raise CniError(DECODE_FAILURE, f"request cut short ({have} of {want} bytes)")
        chunks.append(chunk)
        have += len(chunk)
    body = b"".join(chunks)
    return decode_env_block(body[:nenv]), body[nenv:want]


class _Handler(socketserver.BaseRequestHandler):
    server: _UnixServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            env, stdin = _read_request(sock)
        except CniError as exc:
            status, out, err = 1, exc.to_json(CNI_DEFAULT_VERSION), b""
        except OSError:
            return
        else:
            status, out, err = self.server.agent.handle_raw(env, stdin)
        with contextlib.suppress(OSError):  # the shim may have been killed meanwhile
            sock.sendall(b"%d %d %d\n" % (status, len(out), len(err)) + out + err)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    agent: CniAgent


class CniServer:
    """Unix-socket server for the CNI shims; ``start()`` serves in a background thread.

    ``socket_path`` is created with mode ``mode`` (default 0600: only root, i.e. the
    container runtime, may call), its directory with 0755. A stale socket file left by a dead
    agent is replaced; a live one raises RuntimeError naming the path. Usable as a context
    manager. Source: unix(7).
    """

    def __init__(self, socket_path: str, agent: CniAgent, *, mode: int = 0o600) -> None:
        self.socket_path = socket_path
        self.agent = agent
        self.mode = mode
        self._server: _UnixServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind, listen and serve in a daemon thread; returns once connections are accepted.

        Raises RuntimeError when another process serves ``socket_path``, OSError when the
        path cannot be bound.
        """
        if self._server is not None:
            return
        path = self.socket_path
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: nobody listens
            else:
                raise RuntimeError(f"another process already serves CNI calls on {path}")
            finally:
                probe.close()
        old = os.umask(0o777 & ~self.mode)
        try:
            server = _UnixServer(path, _Handler)
        finally:
            os.umask(old)
        server.agent = self.agent
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="cni-server",
            daemon=True,
        )
        self._thread.start()
        log.info("serving CNI calls on %s", path)

    def stop(self) -> None:
        """Stop accepting calls, wait for the accept loop, remove the socket file (idempotent).

        Calls already running finish in their own threads.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def __enter__(self) -> CniServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


IPAM_CONNECTIONS = 48
"""Kept-alive connections to the API server: one per request the CNI calls may have in flight
(the worker threads of CniAgent and of the IPAM engine)."""


def ipam_api_client(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """A ``kubernetes.client.ApiClient`` for the CNI calls: connection failures are retried
    twice, a request that was sent is never retried by the transport, and up to
    :data:`IPAM_CONNECTIONS` connections are kept alive.

    The generated client's default (urllib3 ``Retry(3)``) re-sends a PUT whose answer timed
    out, so one hung request would hold a CNI call for four request timeouts; the IPAM
    retries conflicts itself and the runtime retries a failed ADD. Its default pool keeps
    5 connections per CPU: on a small node, concurrent ADDs then close the connections
    beyond those after each request and make a new TLS connection for the next ("Connection
    pool is full, discarding connection"). Source: urllib3 ``Retry``, ``PoolManager``.
    """
    from kubernetes import client
    from urllib3.util.retry import Retry

    from reconciler.kube import load_configuration

    cfg = load_configuration(kubeconfig, context)
    cfg.retries = Retry(total=2, connect=2, read=0, status=0, other=0, redirect=0)
    cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, IPAM_CONNECTIONS)
    return client.ApiClient(cfg)


def main(argv: list[str] | None = None) -> int:
    """``python -m node_agent.cni.server``: serve until SIGTERM/SIGINT. Prints ``ready`` once listening."""
    p = argparse.ArgumentParser(
        prog="python -m node_agent.cni.server", description=__doc__.split("\n")[0]
    )
    p.add_argument("--socket", default=DEFAULT_AGENT_SOCKET, help="unix socket to serve")
    p.add_argument("--ovsdb", default="unix:/var/run/openvswitch/db.sock", help="OVSDB remote")
    p.add_argument(
        "--kubeconfig", default=None, help="kubeconfig (default: KUBECONFIG, in-cluster)"
    )
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""), help="this Node's name")
    p.add_argument(
        "--install-shims", metavar="BIN_DIR", default=None, help="install the shims there first"
    )
    p.add_argument(
        "--purge-interval", type=float, default=10.0, help="seconds between dead-port purges"
    )
    p.add_argument(
        "--api-timeout",
        type=float,
        default=10.0,
        help="seconds before an unanswered Kubernetes API request fails the CNI call (code 11)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not a.node_name:
        p.error("--node-name (or NODE_NAME) is required")
    kube = None
    from reconciler.kube import has_cluster_config

    if has_cluster_config(a.kubeconfig):
        kube = ipam_api_client(a.kubeconfig)
    if a.install_shims:
        from .install import install_shims

        install_shims(a.install_shims, a.socket)
    agent = CniAgent(
        a.node_name,
        ovsdb=a.ovsdb,
        kube=kube,
        purge_interval=a.purge_interval,
        api_timeout=a.api_timeout,
    )
    server = CniServer(a.socket, agent)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print("ready", flush=True)
    stop.wait()
    server.stop()
    agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
