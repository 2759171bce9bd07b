"""The node agent's CNI endpoint: a bounded unix-socket server and the plugin dispatcher.

:class:`CniServer` accepts one shim connection per CNI call (protocol in
:mod:`node_agent.cni.shim`), decodes it into a :class:`~node_agent.cni.request.CniRequest`
and hands it to :class:`CniAgent`, which dispatches on the config's ``type``:
``underlay-ovs`` (:mod:`node_agent.cni.ovs_plugin`) or ``underlay-ipam``
(:mod:`node_agent.cni.ipam_plugin`). Several pods attach at once; calls for the same container
and interface are serialised.

Limits (the defaults below; see :class:`CniServer`): only peers running as uid 0 are served
(``SO_PEERCRED``; others get code 111 and a line in the log); at most ``max_connections``
connections are open (more get code 11 at once); a request must arrive whole within
``read_timeout`` s and be at most :data:`MAX_ENV` + :data:`MAX_STDIN` bytes; at most
``max_calls`` calls run at once, and at most ``buffer_budget`` bytes of requests are held at
once (a request waits for room, within its read deadline). Connections are read by one asyncio
event loop, so an idle or slow connection costs a file descriptor and a few KiB, never a thread.

Errors become CNI error JSON (:mod:`node_agent.cni.errors`) with a non-zero exit, except DEL:
DEL exits 0 and reports what it could not clean on stderr (DESIGN.md, "IPAM"), unless the
request itself was refused (:class:`~node_agent.cni.request.Refused`: malformed, or naming the
node's own network namespace), which is an error for every command. An unexpected exception
in a handler is answered with code 999 naming its class; a connection is never closed without
an answer.

Run standalone (tests, until ``underlay agent`` embeds it)::

    python -m node_agent.cni.server --socket /run/underlay/agent.sock \\
        --ovsdb unix:/var/run/openvswitch/db.sock --kubeconfig kc.yaml --node-name n1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
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
    INVALID_ENV,
    PEER_REFUSED,
    TRY_AGAIN_LATER,
    UNEXPECTED,
    CniError,
)
from .netns import NetnsGuard, NotNetns
from .records import AttachmentStore, default_state_dir
from .request import CniRequest, Refused, decode_env_block, decode_request
from .result import render_json, version_reply

log = logging.getLogger(__name__)

MAX_ENV = 64 << 10
"""Largest CNI_* environment block a request may carry (bytes)."""
MAX_STDIN = 1 << 20
"""Largest network config a request may carry (bytes; real ones are a few KiB)."""
MAX_CONNECTIONS = 256
"""Connections open at once; one more is answered code 11 and closed."""
MAX_CALLS = 32
"""Calls executing at once (worker threads); complete requests beyond wait, without a thread."""
BUFFER_BUDGET = 4 << 20
"""Bytes of request bodies held at once, across all connections."""
READ_TIMEOUT = 10.0
"""Seconds a request has to arrive whole (the shim sends it at once)."""
WRITE_TIMEOUT = 10.0
"""Seconds the peer has to take the answer."""
LOCK_TIMEOUT = 30.0
"""Seconds a call waits for another call of the same container and interface (then code 11)."""

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
    fails the CNI call with code 11). ``state_dir``: where ADD records the veth it made
    (:mod:`node_agent.cni.records`; None keeps the records in memory). ``managed_bridges_only``:
    an ADD may attach pods only to bridges the node agent made for an OvsBridge (code 112
    otherwise). CNI_NETNS is refused when it is not a network namespace or is the agent's own,
    the initial one or ``host_netns`` (:class:`node_agent.cni.netns.NetnsGuard`).
    ``lock_timeout``: seconds a call waits for another call of the same container and
    interface before it fails with code 11.
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
        state_dir: str | None = None,
        managed_bridges_only: bool = False,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self.node_name = node_name
        self.lock_timeout = lock_timeout
        self.netns_guard = NetnsGuard((host_netns,) if host_netns else ())
        self.records = AttachmentStore(state_dir)
        self.managed_bridges_only = managed_bridges_only
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
    def _serialised(self, key: tuple[str, str], timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the lock of one (container, interface); Refused 11 when another call holds it
        for more than ``timeout`` s (the runtime retries, a DEL included)."""
        with self._lock:
            entry = self._busy.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            if not entry[0].acquire(timeout=timeout):
                raise Refused(
                    TRY_AGAIN_LATER,
                    f"another call for container {key[0]} interface {key[1]} has been running "
                    f"for more than {timeout:g} s; try again later",
                )
            try:
                yield
            finally:
                entry[0].release()
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

    def check_netns(self, req: CniRequest) -> None:
        """Refuse (Refused 4) a CNI_NETNS that exists but is not a network namespace, or is
        one no pod lives in (:class:`~node_agent.cni.netns.NetnsGuard`); record its identity in
        ``req.netns_id``. A missing path passes: DEL tolerates it, ADD refuses it itself."""
        if not req.netns:
            return
        try:
            req.netns_id = tuple(self.netns_guard.check(req.netns))  # type: ignore[assignment]
        except FileNotFoundError:
            return
        except NotNetns as exc:
            raise Refused(INVALID_ENV, f"CNI_NETNS {exc}: refused") from exc
        except OSError as exc:
            raise Refused(
                INVALID_ENV, f"CNI_NETNS {req.netns} cannot be opened: {exc.strerror or exc}"
            ) from exc

    def handle(self, req: CniRequest) -> tuple[int, bytes, bytes]:
        """Run one decoded call; returns ``(exit status, stdout bytes, stderr bytes)``."""
        if req.command == "VERSION":
            import json

            return 0, json.dumps(version_reply()).encode() + b"\n", b""
        start = time.monotonic()
        try:
            handlers = self.plugins[self.plugin_for(req)]
            self.check_netns(req)
            with self._serialised((req.container_id, req.ifname), self.lock_timeout):
                result = handlers[req.command](self, req)
        except Exception as exc:
            # in another frame: a local here holding exc would make a reference cycle
            # (exc -> traceback -> this frame -> exc) that keeps the parsed config alive
            return self._failure(req, exc, start)
        ms = (time.monotonic() - start) * 1000
        log.info("%s %s -> ok (%.1f ms)", req.plugin_type, req.describe(), ms)
        if req.command == "ADD":
            return 0, render_json(result or {}, req.version), b""
        return 0, b"", b""

    def _failure(self, req: CniRequest, exc: Exception, start: float) -> tuple[int, bytes, bytes]:
        """The answer to a call that raised ``exc`` (see :meth:`handle`)."""
        err = (
            exc
            if isinstance(exc, CniError)
            else CniError(UNEXPECTED, f"{type(exc).__name__}: {exc}")
        )
        if not isinstance(exc, CniError):
            log.error("%s %s failed", req.plugin_type, req.describe(), exc_info=exc)
        ms = (time.monotonic() - start) * 1000
        if req.command == "DEL" and not isinstance(exc, Refused):
            log.warning(
                "%s %s incomplete (%.1f ms): %s", req.plugin_type, req.describe(), ms, err.msg
            )
            note = (
                f"{req.plugin_type}: DEL of container {req.container_id} interface "
                f"{req.ifname} incomplete (left for garbage collection): {err.msg}\n"
            )
            return 0, b"", note.encode(errors="backslashreplace")
        log.info(
            "%s %s -> error %d (%.1f ms): %s",
            req.plugin_type,
            req.describe(),
            err.code,
            ms,
            err.msg,
        )
        return 1, err.to_json(req.version), b""

    def handle_raw(self, env: dict[str, str], stdin: bytes) -> tuple[int, bytes, bytes]:
        """Decode ``env`` + ``stdin`` and run the call. A request refused in decoding is a CNI
        error for every command (DEL included: nothing was done); an unexpected exception is
        code 999 naming its class. Never raises."""
        try:
            req = decode_request(env, stdin)
        except CniError as exc:
            log.info("%s refused: %s", env.get("CNI_COMMAND", "call"), exc.msg)
            return 1, exc.to_json(_guess_version(stdin)), b""
        except Exception as exc:  # a bug in decoding: answered, never a closed connection
            log.exception("decoding a CNI request failed")
            err = CniError(UNEXPECTED, f"{type(exc).__name__}: {exc}")
            return 1, err.to_json(_guess_version(stdin)), b""
        try:
            return self.handle(req)
        except Exception as exc:
            log.exception("%s failed", req.describe())
            err = CniError(UNEXPECTED, f"{type(exc).__name__}: {exc}")
            return 1, err.to_json(req.version), b""


def _guess_version(stdin: bytes) -> str:
    """The config's cniVersion for an error answer, when the config is small enough to parse
    again; else the default."""
    import json

    from .request import MAX_COLLECTIONS

    if len(stdin) > 65536 or stdin.count(b"{") + stdin.count(b"[") > MAX_COLLECTIONS:
        return CNI_DEFAULT_VERSION
    try:
        v = json.loads(stdin).get("cniVersion")
    except Exception:
        return CNI_DEFAULT_VERSION
    return v if isinstance(v, str) and len(v) <= 16 else CNI_DEFAULT_VERSION


class _Budget:
    """Bytes of request bodies held at once (asyncio; one event loop): :meth:`take` waits
    until ``n`` fits."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._changed = asyncio.Condition()

    async def take(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + n <= self.total or self.used == 0)
            self.used += n

    async def give(self, n: int) -> None:
        async with self._changed:
            self.used -= n
            self._changed.notify_all()


class _Throttled:
    """A warning logged at most once per ``interval`` s, with the count of the ones held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval, self.last, self.held = interval, -interval, 0

    def warn(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.held += 1
            return
        held, self.held, self.last = self.held, 0, now
        log.warning(msg + (f" (and {held} more like it since)" if held else ""), *args)


def _answer(status: int, out: bytes, err: bytes) -> bytes:
    return b"%d %d %d\n" % (status, len(out), len(err)) + out + err


def _refusal(code: int, msg: str) -> bytes:
    return _answer(1, CniError(code, msg).to_json(CNI_DEFAULT_VERSION), b"")


def peer_credentials(sock: Any) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of unix socket ``sock``
    (``SO_PEERCRED``: the credentials it had when it called connect(2)). Source: unix(7)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class CniServer:
    """Unix-socket server for the CNI shims; ``start()`` serves in a background thread.

    ``socket_path`` is created with mode ``mode`` (default 0600: only root, i.e. the
    container runtime, may call), its directory with 0755. A stale socket file left by a dead
    agent is replaced; a live one raises RuntimeError naming the path. Usable as a context
    manager.

    Limits (see the module docstring; defaults :data:`MAX_CONNECTIONS`, :data:`MAX_CALLS`,
    :data:`BUFFER_BUDGET`, :data:`READ_TIMEOUT`, :data:`WRITE_TIMEOUT`): ``peer_uid`` is the
    only uid served (SO_PEERCRED; the runtime runs as root), ``max_connections`` open at once,
    ``max_calls`` executing at once, ``buffer_budget`` bytes of requests held at once,
    ``read_timeout``/``write_timeout`` s per request and answer. Memory under a flood is thus
    bounded: a connection reads at most :data:`HEAD_MAX` bytes until it has room in
    ``buffer_budget`` for its whole request, which it then reads into one buffer; requests
    held at once take at most ``buffer_budget`` bytes plus what they parse into (at most
    about 12 bytes per byte: :data:`node_agent.cni.request.MAX_COLLECTIONS`).
    Source: unix(7) (SO_PEERCRED).
    """

    def __init__(
        self,
        socket_path: str,
        agent: CniAgent,
        *,
        mode: int = 0o600,
        peer_uid: int = 0,
        max_connections: int = MAX_CONNECTIONS,
        max_calls: int = MAX_CALLS,
        buffer_budget: int = BUFFER_BUDGET,
        read_timeout: float = READ_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self.socket_path = socket_path
        self.agent = agent
        self.mode = mode
        self.peer_uid = peer_uid
        self.max_connections = max_connections
        self.max_calls = max_calls
        self.buffer_budget = buffer_budget
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.open_connections = 0
        """Connections open now."""
        self.accepted = 0
        """Connections accepted since start."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stopped: asyncio.Event | None = None
        self._refused = _Throttled()
        self._crowded = _Throttled()

    def _bind(self) -> socket.socket:
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
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~self.mode)
        try:
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.setblocking(False)
        return sock

    def start(self) -> None:
        """Bind, listen and serve in a daemon thread; returns once connections are accepted.

        Raises RuntimeError when another process serves ``socket_path``, OSError when the
        path cannot be bound.
        """
        if self._thread is not None:
            return
        sock = self._bind()
        self._pool = ThreadPoolExecutor(max_workers=self.max_calls, thread_name_prefix="cni-call")
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(sock, ready))
            except BaseException as exc:  # pragma: no cover - reported to start()
                failed.append(exc)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="cni-server", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]
        log.info("serving CNI calls on %s", self.socket_path)

    async def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        self._stopped = asyncio.Event()
        self._reading: dict[socket.socket, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._calls = asyncio.Semaphore(self.max_calls)
        self._budget = _Budget(self.buffer_budget)
        sock.listen(1024)
        accepting = asyncio.ensure_future(self._accept(sock))
        ready.set()
        await self._stopped.wait()
        accepting.cancel()
        await asyncio.gather(accepting, return_exceptions=True)
        sock.close()
        # calls already running finish and answer (up to 5 s), then the rest is cut
        deadline = time.monotonic() + 5.0
        while self.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        pending = list(self._tasks)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and the like: wait for connections to close
                self._crowded.warn("CNI socket %s: accept failed: %s", self.socket_path, exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = loop.create_task(self._client(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _client(self, conn: socket.socket) -> None:
        self.open_connections += 1
        self.accepted += 1
        loop = asyncio.get_running_loop()
        try:
            answer = await self._exchange(conn)
            if answer is not None:
                await asyncio.wait_for(loop.sock_sendall(conn, answer), self.write_timeout)
        except (OSError, TimeoutError):
            pass  # the shim was killed or stopped reading: nothing more to tell it
        except asyncio.CancelledError:
            pass  # evicted (it was told why) or stop(): ending normally keeps asyncio quiet
        finally:
            self._reading.pop(conn, None)
            self.open_connections -= 1
            conn.close()

    def _make_room(self) -> bool:
        """At the connection limit, close the connection that has been reading its request
        longest (a shim sends its request at once: that one is stalled), telling it why;
        False when none is reading (then the new connection is refused)."""
        if not self._reading:
            return False
        oldest = next(iter(self._reading))
        task = self._reading.pop(oldest)
        with contextlib.suppress(OSError):  # best effort: a refusal fits the socket buffer
            oldest.send(
                _refusal(
                    TRY_AGAIN_LATER,
                    f"closed: {self.max_connections} connections are open on the underlay "
                    "agent's CNI socket and this one had not sent its request; try again later",
                )
            )
        task.cancel()
        return True

    def _call(self, conn: socket.socket, env: dict[str, str], stdin: bytes) -> None:
        """In a worker thread: run the call and send its answer from there (the event loop
        does not watch this socket any more), sparing the answer a trip through the loop."""
        status, out, err = self.agent.handle_raw(env, stdin)
        with contextlib.suppress(OSError):  # the shim was killed or stopped reading
            conn.settimeout(self.write_timeout)
            conn.sendall(_answer(status, out, err))

    async def _exchange(self, conn: socket.socket) -> bytes | None:
        """Read and run one request; returns the answer still to send (a refusal), or None
        when the worker thread answered."""
        if self.open_connections > self.max_connections and not self._make_room():
            self._crowded.warn(
                "CNI socket %s: %d connections open, the limit is %d: refusing more",
                self.socket_path,
                self.open_connections - 1,
                self.max_connections,
            )
            return _refusal(
                TRY_AGAIN_LATER,
                f"the underlay agent has {self.max_connections} CNI connections open; "
                "try again later",
            )
        try:
            pid, uid, _gid = peer_credentials(conn)
        except OSError as exc:
            return _refusal(PEER_REFUSED, f"cannot read the caller's credentials: {exc}")
        if uid != self.peer_uid:
            self._refused.warn(
                "CNI socket %s: refused a call from pid %d running as uid %d (only uid %d "
                "is served)",
                self.socket_path,
                pid,
                uid,
                self.peer_uid,
            )
            return _refusal(
                PEER_REFUSED,
                f"the underlay agent serves CNI calls from uid {self.peer_uid} only (the "
                f"container runtime); this process runs as uid {uid}",
            )
        task = asyncio.current_task()
        assert task is not None
        taken = 0
        self._reading[conn] = task
        try:
            try:
                async with asyncio.timeout(self.read_timeout):
                    head, rest = await _read_head(conn)
                    nenv, nstdin = _parse_head(head)
                    await self._budget.take(nenv + nstdin)
                    taken = nenv + nstdin
                    body = await _read_body(conn, rest, taken)
            except TimeoutError:
                return _refusal(
                    DECODE_FAILURE, f"the request did not arrive within {self.read_timeout:g} s"
                )
            except CniError as exc:
                return _refusal(exc.code, exc.msg)
            finally:
                self._reading.pop(conn, None)
            try:
                env = decode_env_block(bytes(body[:nenv]))
            except CniError as exc:
                return _refusal(exc.code, exc.msg)
            stdin = bytes(memoryview(body)[nenv:])
            del body
            async with self._calls:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._pool, self._call, conn, env, stdin)
            return None
        finally:
            if taken:
                await self._budget.give(taken)

    def stop(self) -> None:
        """Stop accepting calls, let running ones answer (up to 5 s), remove the socket file
        (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopped.set)
        thread.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def __enter__(self) -> CniServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


HEAD_MAX = 64
"""Longest request header line (``CNI1 <envlen> <stdinlen>``, with its newline)."""


async def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    """The header line and what came after it in the same reads (at most :data:`HEAD_MAX`
    bytes are read before the newline); CniError 6 when the peer closes first or the line is
    too long."""
    loop = asyncio.get_running_loop()
    buf = bytearray(HEAD_MAX)
    have = 0
    while True:
        n = await loop.sock_recv_into(conn, memoryview(buf)[have:])
        if n == 0:
            raise CniError(DECODE_FAILURE, f"request cut short ({have} bytes of the header)")
        have += n
        end = buf.find(b"\n", 0, have)
        if end >= 0:
            return bytes(buf[: end + 1]), bytes(buf[end + 1 : have])
        if have == HEAD_MAX:
            raise CniError(DECODE_FAILURE, "request header too long")


async def _read_body(conn: socket.socket, rest: bytes, size: int) -> bytearray:
    """``size`` bytes of request, starting with ``rest`` (read with the header), read into one
    buffer of that size; CniError 6 when the peer closes first."""
    loop = asyncio.get_running_loop()
    if len(rest) > size:
        raise CniError(DECODE_FAILURE, "request longer than its header says")
    body = bytearray(size)
    body[: len(rest)] = rest
    have = len(rest)
    view = memoryview(body)
    while have < size:
        n = await loop.sock_recv_into(conn, view[have:])
        if n == 0:
            raise CniError(DECODE_FAILURE, f"request cut short ({have} of {size} bytes)")
        have += n
    view.release()
    return body


def _parse_head(head: bytes) -> tuple[int, int]:
    """``CNI1 <envlen> <stdinlen>\\n`` -> (envlen, stdinlen); CniError 6 when malformed or over
    :data:`MAX_ENV`/:data:`MAX_STDIN`."""
    parts = head.split()
    if len(head) > 64:
        raise CniError(DECODE_FAILURE, "request header too long")
    if len(parts) != 3 or parts[0] != b"CNI1" or not parts[1].isdigit() or not parts[2].isdigit():
        raise CniError(DECODE_FAILURE, f"unknown request header {head[:40]!r}")
    nenv, nstdin = int(parts[1]), int(parts[2])
    if nenv > MAX_ENV:
        raise CniError(
            DECODE_FAILURE, f"request too large: {nenv} bytes of environment (at most {MAX_ENV})"
        )
    if nstdin > MAX_STDIN:
        raise CniError(
            DECODE_FAILURE,
            f"request too large: a network config of {nstdin} bytes (at most {MAX_STDIN})",
        )
    return nenv, nstdin


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
    p.add_argument(
        "--state-dir",
        default=None,
        help="where ADD records the veths it made (default: the socket path without its "
        "extension + .attachments)",
    )
    p.add_argument(
        "--managed-bridges-only",
        action="store_true",
        help="attach pods only to OVS bridges the node agent made for an OvsBridge",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    from reconciler.logs import setup

    setup("text", verbose=False)
    logging.getLogger().setLevel(logging.INFO if a.verbose else logging.WARNING)
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
        state_dir=a.state_dir or default_state_dir(a.socket),
        managed_bridges_only=a.managed_bridges_only,
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
