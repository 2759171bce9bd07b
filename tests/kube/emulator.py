"""A strict Kubernetes API server emulator for tests: real ``kubernetes`` client, plain HTTP.

No kube-apiserver can run here, so every test that needs a cluster talks to this emulator with
the real ``kubernetes`` Python client through a kubeconfig it writes. It serves the REST API of
the built-in kinds the project uses (core/v1 namespaces, pods, nodes, configmaps, secrets,
services, events; coordination.k8s.io/v1 leases; events.k8s.io/v1 events;
apiextensions.k8s.io/v1 customresourcedefinitions) and of every CRD created in it, with the
API server's semantics: resourceVersion and optimistic concurrency, generation, status
subresources, schema validation and pruning, merge/JSON/strategic/apply patches, server-side
apply with managed fields and conflicts, dry run, finalizers, garbage collection, label and
field selectors, list and watch with bookmarks and 410 Gone (see ``store.py``).

Test controls that are not part of the Kubernetes API live under ``/__emulator/``: fault
injection, the request log, history compaction, registering kinds.

Python use::

    emu = Emulator()
    emu.start()                      # serves on 127.0.0.1:<free port> in background threads
    emu.write_kubeconfig(path)       # kubernetes.config.load_kube_config(path) works
    emu.register(vocab.OVS_BRIDGE)   # or emu.install_crds(["deploy/crds"])
    ...
    emu.stop()

Process use (for e2e tests)::

    python -m tests.kube.emulator --listen 127.0.0.1:0 \
        [--netns-listen /run/netns/X:172.18.0.2:6443] [--crds PATH ...] \
        [--register-underlay-kinds] [--kubeconfig OUT] [--netns-kubeconfig OUT]

prints the URL it serves on the first line of stdout (then ``netns <path> <url>`` per extra
listener) and serves until SIGTERM/SIGINT.

HTTP controls (process mode): ``POST /__emulator/faults`` ``{"path": regex, "method": "PUT",
"status": 503, "retryAfter": 1, "hang": 2.0, "drop": false, "count": 1}``, ``GET``/``DELETE``
the same path to list/clear; ``GET /__emulator/requests[?method=&path=&writes=true]``,
``DELETE`` to reset; ``POST /__emulator/compact``; ``POST /__emulator/close-watches[?plural=]``;
``POST /__emulator/register`` ``{"group", "version", "kind", "plural", "namespaced", "status",
"shortNames", "schema"}``; ``GET /__emulator/healthz``.

Where the emulator knowingly differs from a real API server (v1.33):

- Strategic merge patch knows the merge keys of a fixed table of built-in lists (containers,
  env, ports, volumeMounts, volumes, conditions, addresses, ownerReferences, finalizers...);
  other lists are replaced; ``$setElementOrder`` is ignored (new items are appended).
- Server-side apply follows structured-merge-diff, but built-in kinds take their list/map
  semantics from the same fixed table (other lists atomic); no cap of 10 Update managers.
- Propagation policy Foreground behaves like Background; Orphan strips the owner references
  from dependents synchronously (no "orphan"/"foregroundDeletion" finalizers are added).
  The garbage collector identifies owners by uid only and runs at once in a background
  thread (``wait_idle()``); namespace and CRD deletion empty them synchronously in the DELETE.
- LIST pages (limit/continue) come from the current state, not a snapshot at the first page's
  resourceVersion; ``resourceVersion``/``resourceVersionMatch`` on LIST are ignored (always
  the most recent state, never 410/504).
- BOOKMARKs every ``bookmark_interval`` seconds (real: about a minute); watches never end on
  their own unless ``timeoutSeconds`` or ``watch_timeout`` is set.
- CRD validation rules (CEL ``x-kubernetes-validations``) are not evaluated, validation
  ratcheting is not implemented, ``format`` checks cover a common subset; schema error texts
  follow kube-openapi's classic wording.
- Built-in kinds are type-checked and pruned against the client's models and validated for
  names, required fields, pod containers/images, pod spec immutability and config keys only;
  defaults are a subset (pods, containers, services, secrets, namespaces, nodes).
- core/v1 and events.k8s.io/v1 Events are separate collections (real: one, converted).
- CRD version conversion: strategy None only; CRDs are Established in the create response.
- No authentication/authorization (tokens are accepted and ignored), admission webhooks,
  protobuf, Table output, OpenAPI documents or aggregated discovery (legacy discovery only).
- Bound pods: graceful deletion is confirmed at once by an emulated kubelet (MODIFIED with
  deletionTimestamp, then DELETED).
- JSON object keys keep insertion order (real: sorted for custom resources).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import yaml

from reconciler.vocab import ALL_CUSTOM, Resource
from tests.kube import errors as E
from tests.kube.errors import ApiError
from tests.kube.resources import VERBS, ResourceType
from tests.kube.store import Op, Store, Watcher, socket_closed

KUBE_VERSION = {
    "major": "1",
    "minor": "33",
    "emulationMajor": "1",
    "emulationMinor": "33",
    "minCompatibilityMajor": "1",
    "minCompatibilityMinor": "32",
    "gitVersion": "v1.33.0",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-04-23T00:00:00Z",
    "goVersion": "go1.24.2",
    "compiler": "gc",
    "platform": "linux/amd64",
}
"""What ``/version`` reports (the emulator follows Kubernetes 1.33 behaviour)."""

CLONE_NEWNET = 0x40000000
CONTROL_PREFIX = "/__emulator/"


@dataclass
class Fault:
    """Make the next ``count`` requests matching ``method`` and ``path`` misbehave.

    ``path`` is a regular expression searched in the URL path (query excluded); ``method``
    None matches any verb. Effects, in order: sleep ``hang`` seconds; then drop the connection
    without an answer (``drop``), or answer ``status`` (500/503/429...) with a Status body and
    ``Retry-After: retry_after``; with neither, the request is then served normally (a slow
    server).
    """

    path: str
    method: str | None = None
    count: int = 1
    status: int | None = None
    retry_after: int | None = None
    hang: float = 0.0
    drop: bool = False
    message: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method.upper() == method) and bool(
            re.search(self.path, path)
        )


@dataclass(frozen=True)
class RequestRecord:
    """One served request: verb, path, raw query, parsed query, content type, response code.

    ``code`` is 0 for a dropped connection; ``fault`` says what was injected, if anything.
    """

    method: str
    path: str
    query: str
    params: dict[str, str]
    content_type: str
    code: int
    user_agent: str
    time: float
    fault: str | None = None

    @property
    def is_write(self) -> bool:
        """POST/PUT/PATCH/DELETE (dry-run requests included)."""
        return self.method in ("POST", "PUT", "PATCH", "DELETE")


_STATUS_REASON = {
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
    409: "Conflict",
    404: "NotFound",
    403: "Forbidden",
    401: "Unauthorized",
}


def _version_key(v: str) -> tuple[int, int, int, str]:
    """Kubernetes version priority: GA > beta > alpha, higher numbers first (sort ascending)."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", v)
    if not m:
        return (3, 0, 0, v)
    major = int(m.group(1))
    stage = {"alpha": 2, "beta": 1, None: 0}[m.group(2)]
    minor = int(m.group(3) or 0)
    return (stage, -major, -minor, v)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(
        self, addr: tuple[str, int], emulator: Emulator, sock: socket.socket | None = None
    ) -> None:
        self.emulator = emulator
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        if sock is None:
            super().__init__(addr, _Handler)
        else:
            self.address_family = sock.family
            super().__init__(addr, _Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that go away mid-response (timeouts, dropped watches) are normal."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = 1 << 16
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Go's net/http (kube-apiserver) sets TCP_NODELAY; without it Nagle + delayed ACK add
        # ~40 ms to every response written as headers then body.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.conns_lock:
            self.server.conns.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.server.conns_lock:
            self.server.conns.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_OPTIONS(self) -> None:
        self._handle()

    # ---- plumbing --------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _send(
        self,
        code: int,
        body: Any,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        ctype: str = "application/json",
    ) -> None:
        data = raw if raw is not None else json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Audit-Id", os.urandom(8).hex())
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _handle(self) -> None:
        emu = self.server.emulator
        split = urlsplit(self.path)
        path = split.path
        params = dict(parse_qsl(split.query, keep_blank_values=True))
        body = self._body()
        ctype = self.headers.get("Content-Type", "")
        if path.startswith(CONTROL_PREFIX):
            try:
                code, payload = emu._control(self.command, path, params, body)
            except ApiError as e:
                code, payload = e.code, e.status()
            self._send(code, payload)
            return
        fault = emu._take_fault(self.command, path)
        started = time.time()

        def log(code: int, what: str | None) -> None:
            emu._log(
                RequestRecord(
                    self.command, path, split.query, params, ctype.split(";")[0].strip(), code,
                    self.headers.get("User-Agent", ""), started, what,
                )
            )  # fmt: skip

        if fault is not None:
            if fault.hang:
                time.sleep(fault.hang)
            if fault.drop:
                log(0, "drop")
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault.status:
                reason = _STATUS_REASON.get(fault.status, "InternalError")
                msg = fault.message or f"injected fault: {fault.status} {reason}"
                err = ApiError(fault.status, reason, msg)
                headers = {}
                if fault.retry_after is not None:
                    headers["Retry-After"] = str(fault.retry_after)
                    err.details = {"retryAfterSeconds": fault.retry_after}
                log(fault.status, f"status {fault.status}")
                self._send(fault.status, err.status(), headers)
                return
        try:
            result = emu._dispatch(
                self.command, path, params, body, ctype, self.headers.get("User-Agent", "")
            )
        except ApiError as e:
            log(e.code, "hang" if fault else None)
            self._send(e.code, e.status(), e.headers)
            return
        except Exception as e:
            err = E.internal(f"{type(e).__name__}: {e}")
            log(500, "hang" if fault else None)
            self._send(500, err.status())
            return
        if isinstance(result, _WatchResult):
            log(200, "hang" if fault else None)
            self._stream(result)
            return
        code, payload, headers = result
        log(code, "hang" if fault else None)
        if isinstance(payload, bytes):
            self._send(code, None, headers, raw=payload, ctype="text/plain; charset=utf-8")
        else:
            self._send(code, payload, headers)

    def _stream(self, res: _WatchResult) -> None:
        emu = self.server.emulator
        store = emu.store
        w = res.watcher
        rt = res.rt
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()

        def chunk(obj: Any) -> None:
            data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def bookmark(rv: int, initial_end: bool = False) -> None:
            md: dict[str, Any] = {"resourceVersion": str(rv)}
            if initial_end:
                md["annotations"] = {"k8s.io/initial-events-end": "true"}
            chunk(
                {
                    "type": "BOOKMARK",
                    "object": {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": md},
                }
            )

        limits = [t for t in (res.timeout, emu.watch_timeout) if t]
        deadline = time.monotonic() + min(limits) if limits else None
        next_bm = time.monotonic() + emu.bookmark_interval
        try:
            while not emu._stopping.is_set():
                wait = 0.2
                if deadline is not None:
                    wait = max(0.0, min(wait, deadline - time.monotonic()))
                try:
                    typ, obj = w.q.get(timeout=wait) if wait > 0 else w.q.get_nowait()
                except queue.Empty:
                    typ, obj = "", None
                if typ == "CLOSE":
                    break
                if typ == "ERROR":
                    chunk({"type": "ERROR", "object": obj})
                    break
                if typ == "BOOKMARK-INITIAL":
                    bookmark(obj, True)
                    continue
                if typ:
                    chunk({"type": typ, "object": Store.render(rt, obj)})
                    continue
                t = time.monotonic()
                if deadline is not None and t >= deadline:
                    if res.bookmarks:
                        rv = store.idle_bookmark_rv(w)
                        if rv is not None:
                            bookmark(rv)
                    break
                if res.bookmarks and t >= next_bm:
                    rv = store.idle_bookmark_rv(w)
                    if rv is not None:
                        bookmark(rv)
                    next_bm = t + emu.bookmark_interval
                if socket_closed(self.connection):
                    self.close_connection = True
                    return
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        finally:
            store.unwatch(w)


@dataclass
class _WatchResult:
    watcher: Watcher
    rt: ResourceType
    timeout: float | None
    bookmarks: bool


class Emulator:
    """The Kubernetes API server emulator (see the module docstring).

    ``history_size`` bounds the watch history (older resourceVersions get 410 Gone);
    ``bookmark_interval`` (seconds) paces BOOKMARK events for watches that allow them;
    ``watch_timeout`` (seconds) ends every watch stream after that long even without
    ``timeoutSeconds``, as the API server's own request timeout does (None: never).
    Thread-safe; serve from several listeners at once (``start`` + ``listen_in_netns``).
    """

    def __init__(
        self,
        *,
        history_size: int = 10000,
        bookmark_interval: float = 1.0,
        watch_timeout: float | None = None,
    ) -> None:
        self.store = Store(history_size)
        self.bookmark_interval = bookmark_interval
        self.watch_timeout = watch_timeout
        self.url: str | None = None
        self.kubeconfig: Path | None = None
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self._faults: list[Fault] = []
        self._faults_lock = threading.Lock()
        self._requests: deque[RequestRecord] = deque(maxlen=200_000)
        self._requests_lock = threading.Lock()
        self._stopping = threading.Event()

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = a free port) in background threads; returns the URL."""
        srv = _Server((host, port), self)
        self._serve(srv)
        h, p = srv.server_address[:2]
        self.url = f"http://{_hostport(str(h), int(p))}"
        return self.url

    def _serve(self, srv: _Server) -> None:
        t = threading.Thread(
            target=srv.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name="emulator-http",
        )
        t.start()
        self._servers.append(srv)
        self._threads.append(t)

    def listen_in_netns(self, netns_path: str, host: str, port: int = 0) -> str:
        """Open an extra listener inside the network namespace ``netns_path`` (e.g.
        ``/run/netns/u1234-sw``) on ``host:port``, served from the same store; returns its URL.

        The socket is created by a short-lived thread that enters the namespace with
        ``setns(CLONE_NEWNET)``, binds and listens, and returns to its original namespace; a
        socket keeps the namespace it was created in. Raises OSError (naming the namespace)
        when the namespace cannot be entered or the address cannot be bound.
        """
        result: dict[str, Any] = {}

        def worker() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
            try:
                target = os.open(netns_path, os.O_RDONLY)
            except OSError as e:
                os.close(own)
                result["error"] = OSError(
                    e.errno, f"cannot open network namespace {netns_path}: {e.strerror}"
                )
                return
            try:
                if libc.setns(target, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    result["error"] = OSError(err, f"setns({netns_path}): {os.strerror(err)}")
                    return
                try:
                    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
                    sock = socket.socket(fam, socket.SOCK_STREAM)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((host, port))
                    sock.listen(256)
                    result["sock"] = sock
                except OSError as e:
                    result["error"] = OSError(
                        e.errno, f"cannot listen on {host}:{port} in {netns_path}: {e.strerror}"
                    )
                finally:
                    if libc.setns(own, CLONE_NEWNET) != 0:
                        result["fatal"] = True
            finally:
                os.close(target)
                os.close(own)

        t = threading.Thread(target=worker, name="emulator-setns")
        t.start()
        t.join()
        if "error" in result:
            raise result["error"]
        sock = result["sock"]
        srv = _Server((host, port), self, sock=sock)
        self._serve(srv)
        h, p = sock.getsockname()[:2]
        return f"http://{_hostport(h, p)}"

    def stop(self) -> None:
        """Stop every listener, end watches, close open connections."""
        self._stopping.set()
        self.store.close()
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
            with srv.conns_lock:
                conns = list(srv.conns)
            for c in conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> Emulator:
        if self.url is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- client configuration -----------------------------------------------------------

    def write_kubeconfig(self, path: str | os.PathLike[str], server_url: str | None = None) -> Path:
        """Write a kubeconfig for ``server_url`` (default: ``self.url``) with a bearer token.

        ``kubernetes.config.load_kube_config(path)`` loads it; the token is accepted and ignored.
        """
        url = server_url or self.url
        if url is None:
            raise RuntimeError("emulator not started: call start() or pass server_url")
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": url}}],
            "users": [{"name": "emulator", "user": {"token": "emulator-token"}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "emulator", "namespace": "default"},
                }
            ],
            "current-context": "emulator",
            "preferences": {},
        }
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if server_url is None:
            self.kubeconfig = p
        return p

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` loaded from this emulator's kubeconfig."""
        from kubernetes import client, config

        if self.kubeconfig is None:
            raise RuntimeError("write_kubeconfig() first")
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        return client.ApiClient(cfg)

    # ---- resource types --------------------------------------------------------------------

    def register(self, resource: Resource, schema: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create (or update) a CRD serving ``resource``; returns the stored CRD.

        ``schema`` is its ``openAPIV3Schema``; without one, objects are stored as-is
        (``x-kubernetes-preserve-unknown-fields``). ApiError 422 when the CRD is invalid.
        """
        names: dict[str, Any] = {
            "kind": resource.kind,
            "plural": resource.plural,
            "singular": resource.kind.lower(),
            "listKind": resource.kind + "List",
        }
        if resource.short_names:
            names["shortNames"] = list(resource.short_names)
        version: dict[str, Any] = {
            "name": resource.version,
            "served": True,
            "storage": True,
            "schema": {
                "openAPIV3Schema": schema
                or {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            },
        }
        if resource.status:
            version["subresources"] = {"status": {}}
        crd = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{resource.plural}.{resource.group}"},
            "spec": {
                "group": resource.group,
                "names": names,
                "scope": "Namespaced" if resource.namespaced else "Cluster",
                "versions": [version],
            },
        }
        return self.apply_crd(crd)

    def apply_crd(self, crd: dict[str, Any]) -> dict[str, Any]:
        """Create ``crd``, or replace the spec of an existing CRD of that name."""
        rt = self.store.lookup("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        assert rt is not None
        name = (crd.get("metadata") or {}).get("name", "")
        try:
            existing = self.store.get(Op(rt, None, name))
        except ApiError:
            return self.store.create(Op(rt, None, user_agent="emulator"), crd)
        body = dict(existing)
        body["spec"] = crd.get("spec")
        return self.store.update(Op(rt, None, name, user_agent="emulator"), body)

    def install_crds(self, paths: Iterable[str | os.PathLike[str]]) -> list[str]:
        """Create every CustomResourceDefinition found in ``paths`` (files, or directories
        holding ``*.yaml``/``*.yml``); returns their names. ValueError names a file holding a
        document that is not a CRD; ApiError when a CRD is invalid.
        """
        names = []
        for p in paths:
            p = Path(p)
            files = sorted([*p.glob("*.yaml"), *p.glob("*.yml")]) if p.is_dir() else [p]
            for f in files:
                for doc in yaml.safe_load_all(f.read_text()):
                    if doc is None:
                        continue
                    if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                        raise ValueError(f"{f}: not a CustomResourceDefinition: {str(doc)[:80]}")
                    names.append(self.apply_crd(doc)["metadata"]["name"])
        return names

    # ---- test controls ---------------------------------------------------------------------

    def inject_fault(
        self,
        path: str,
        *,
        method: str | None = None,
        status: int | None = None,
        count: int = 1,
        retry_after: int | None = None,
        hang: float = 0.0,
        drop: bool = False,
        message: str | None = None,
    ) -> Fault:
        """Make the next ``count`` requests matching ``method``/``path`` fail (see Fault)."""
        re.compile(path)
        f = Fault(path, method, count, status, retry_after, hang, drop, message)
        with self._faults_lock:
            self._faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self._faults_lock:
            self._faults.clear()

    def faults(self) -> list[Fault]:
        """Faults still armed (with their remaining counts)."""
        with self._faults_lock:
            return [Fault(**asdict(f)) for f in self._faults]

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._faults_lock:
            for f in self._faults:
                if f.count > 0 and f.matches(method, path):
                    f.count -= 1
                    if f.count == 0:
                        self._faults.remove(f)
                    return f
        return None

    def _log(self, rec: RequestRecord) -> None:
        with self._requests_lock:
            self._requests.append(rec)

    def requests(
        self, method: str | None = None, path: str | None = None, *, writes: bool = False
    ) -> list[RequestRecord]:
        """Requests served so far (oldest first), optionally filtered by verb, path regex,
        or to writes only (POST/PUT/PATCH/DELETE). Control requests are not logged."""
        with self._requests_lock:
            recs = list(self._requests)
        return [
            r
            for r in recs
            if (method is None or r.method == method.upper())
            and (path is None or re.search(path, r.path))
            and (not writes or r.is_write)
        ]

    def reset_requests(self) -> None:
        with self._requests_lock:
            self._requests.clear()

    def compact(self) -> None:
        """Drop the watch history: watches from any older resourceVersion get 410 Gone."""
        self.store.compact()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait for the garbage collector to finish queued work; False on timeout."""
        return self.store.wait_idle(timeout)

    def open_watches(self, plural: str | None = None) -> int:
        """Number of watch streams currently open (on resource ``plural`` if given)."""
        with self.store.lock:
            return sum(len(ws) for gr, ws in self.store.watchers.items() if plural in (None, gr[1]))

    def close_watches(self, plural: str | None = None) -> int:
        """End every open watch stream (on resource ``plural`` if given) cleanly, as an API
        server restart or request timeout does; clients must watch again. Returns how many."""
        with self.store.lock:
            closed = 0
            for gr, ws in list(self.store.watchers.items()):
                if plural in (None, gr[1]):
                    for w in list(ws):
                        w.close()
                        closed += 1
                    ws.clear()
        return closed

    def wait_for_watches(
        self, count: int = 1, plural: str | None = None, timeout: float = 10.0
    ) -> bool:
        """Wait until at least ``count`` watches (on ``plural``) are open; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.open_watches(plural) >= count:
                return True
            time.sleep(0.01)
        return False

    @property
    def resource_version(self) -> int:
        """The current global resourceVersion."""
        return self.store.rv

    # ---- HTTP dispatch ---------------------------------------------------------------------

    def _control(
        self, method: str, path: str, params: dict[str, str], body: bytes
    ) -> tuple[int, Any]:
        what = path[len(CONTROL_PREFIX) :].strip("/")
        if what == "requests":
            if method == "DELETE":
                self.reset_requests()
                return 200, {"requests": []}
            recs = self.requests(
                params.get("method"), params.get("path"), writes=params.get("writes") == "true"
            )
            return 200, {"requests": [asdict(r) for r in recs]}
        if what == "faults":
            if method == "DELETE":
                self.clear_faults()
                return 200, {"faults": []}
            if method == "POST":
                try:
                    d = json.loads(body or b"{}")
                    f = self.inject_fault(
                        d["path"],
                        method=d.get("method"),
                        status=d.get("status"),
                        count=int(d.get("count", 1)),
                        retry_after=d.get("retryAfter"),
                        hang=float(d.get("hang", 0)),
                        drop=bool(d.get("drop", False)),
                        message=d.get("message"),
                    )
                except (ValueError, KeyError, TypeError, re.error) as e:
                    raise E.bad_request(f"bad fault: {e}") from None
                return 201, {"fault": asdict(f)}
            return 200, {"faults": [asdict(f) for f in self.faults()]}
        if what == "close-watches" and method == "POST":
            return 200, {"closed": self.close_watches(params.get("plural"))}
        if what == "compact" and method == "POST":
            self.compact()
            return 200, {"resourceVersion": str(self.store.rv)}
        if what == "register" and method == "POST":
            try:
                d = json.loads(body or b"{}")
                res = Resource(
                    d["group"], d["version"], d["kind"], d["plural"], bool(d["namespaced"]),
                    bool(d.get("status", True)), tuple(d.get("shortNames") or ()),
                )  # fmt: skip
            except (ValueError, KeyError, TypeError) as e:
                raise E.bad_request(f"bad resource: {e}") from None
            return 201, self.register(res, d.get("schema"))
        if what == "healthz":
            return 200, {"status": "ok", "resourceVersion": str(self.store.rv)}
        raise E.not_found_path()

    def _dispatch(
        self, method: str, path: str, params: dict[str, str], body: bytes, ctype: str, ua: str
    ) -> Any:
        parts = [unquote(p) for p in path.split("/") if p]
        if method == "HEAD":
            method = "GET"
        if not parts:
            return (
                200,
                {
                    "paths": [
                        "/api",
                        "/api/v1",
                        "/apis",
                        "/healthz",
                        "/livez",
                        "/readyz",
                        "/version",
                    ]
                },
                {},
            )
        head = parts[0]
        if head in ("healthz", "readyz", "livez") and len(parts) == 1:
            return 200, b"ok", {}
        if head == "version" and len(parts) == 1:
            return 200, dict(KUBE_VERSION), {}
        if head == "api":
            if len(parts) == 1:
                return (
                    200,
                    {
                        "kind": "APIVersions",
                        "versions": ["v1"],
                        "serverAddressByClientCIDRs": [
                            {
                                "clientCIDR": "0.0.0.0/0",
                                "serverAddress": (self.url or "").split("//")[-1],
                            }
                        ],
                    },
                    {},
                )
            group, version, rest = "", parts[1], parts[2:]
        elif head == "apis":
            if len(parts) == 1:
                return 200, self._group_list(), {}
            group = parts[1]
            if len(parts) == 2:
                g = self._group(group)
                if g is None:
                    raise E.not_found_path()
                return 200, g, {}
            version, rest = parts[2], parts[3:]
        else:
            raise E.not_found_path()
        if not rest:
            rl = self._resource_list(group, version)
            if rl is None:
                raise E.not_found_path()
            return 200, rl, {}
        return self._resource(method, group, version, rest, params, body, ctype, ua)

    def _group_list(self) -> dict[str, Any]:
        groups: dict[str, set[str]] = {}
        for rt in self.store.all_types():
            if rt.group:
                groups.setdefault(rt.group, set()).add(rt.version)
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [self._group_obj(g, vs) for g, vs in sorted(groups.items())],
        }

    @staticmethod
    def _group_obj(group: str, versions: set[str]) -> dict[str, Any]:
        ordered = sorted(versions, key=_version_key)
        vs = [{"groupVersion": f"{group}/{v}", "version": v} for v in ordered]
        return {"name": group, "versions": vs, "preferredVersion": vs[0]}

    def _group(self, group: str) -> dict[str, Any] | None:
        versions = {rt.version for rt in self.store.all_types() if rt.group == group}
        if not group or not versions:
            return None
        return {"kind": "APIGroup", "apiVersion": "v1", **self._group_obj(group, versions)}

    def _resource_list(self, group: str, version: str) -> dict[str, Any] | None:
        types = sorted(
            (rt for rt in self.store.all_types() if rt.group == group and rt.version == version),
            key=lambda rt: rt.plural,
        )
        if not types:
            return None
        resources: list[dict[str, Any]] = []
        for rt in types:
            r: dict[str, Any] = {
                "name": rt.plural,
                "singularName": rt.singular,
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": list(VERBS),
            }
            if rt.short_names:
                r["shortNames"] = list(rt.short_names)
            if rt.categories:
                r["categories"] = list(rt.categories)
            resources.append(r)
            if rt.status:
                resources.append(
                    {
                        "name": f"{rt.plural}/status",
                        "singularName": "",
                        "namespaced": rt.namespaced,
                        "kind": rt.kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }

    def _resource(
        self,
        method: str,
        group: str,
        version: str,
        rest: list[str],
        params: dict[str, str],
        body: bytes,
        ctype: str,
        ua: str,
    ) -> Any:
        ns: str | None = None
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (group == "" and len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            ns = rest[1]
            rest = rest[2:]
        if len(rest) > 3:
            raise E.not_found_path()
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        rt = self.store.lookup(group, version, plural)
        if rt is None:
            raise E.not_found_path()
        if ns is not None and not rt.namespaced:
            raise E.not_found_path()
        if name is not None and rt.namespaced and ns is None:
            raise E.not_found_path()
        if sub and (sub != "status" or not rt.status):
            raise E.not_found_path()
        op = Op(rt, ns, name, sub, params, ua)
        store = self.store
        if name is None:
            if method == "GET":
                if params.get("watch") in ("true", "1"):
                    return self._watch(op)
                return 200, store.list_objects(op), {}
            if method == "POST":
                if rt.namespaced and ns is None:
                    raise E.method_not_allowed()
                obj = store.create(op, _json_body(body, ctype))
                return 201, obj, _warnings(op)
            if method == "DELETE":
                if rt.namespaced and ns is None:
                    raise E.method_not_allowed()
                return 200, store.delete_collection(op, _json_body(body) if body else None), {}
            raise E.method_not_allowed()
        if method == "GET":
            if params.get("watch") in ("true", "1"):
                op.query["fieldSelector"] = ",".join(
                    x for x in (params.get("fieldSelector", ""), f"metadata.name={name}") if x
                )
                return self._watch(op)
            return 200, store.get(op), {}
        if method == "PUT":
            return 200, store.update(op, _json_body(body, ctype)), _warnings(op)
        if method == "PATCH":
            obj, code = store.patch(op, body, ctype)
            return code, obj, _warnings(op)
        if method == "DELETE" and not sub:
            obj, code = store.delete(op, _json_body(body) if body else None)
            return code, obj, {}
        raise E.method_not_allowed()

    def _watch(self, op: Op) -> _WatchResult:
        timeout = None
        if op.query.get("timeoutSeconds"):
            try:
                timeout = float(op.query["timeoutSeconds"])
            except ValueError:
                raise E.bad_request(
                    f"invalid timeoutSeconds: {op.query['timeoutSeconds']}"
                ) from None
        w = self.store.watch(op)
        bm = op.query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        return _WatchResult(w, op.rt, timeout, bm)


def _json_body(body: bytes, ctype: str = "application/json") -> Any:
    """Decode a request body sent as JSON or (``application/yaml``) YAML."""
    try:
        if "yaml" in ctype.split(";")[0]:
            return yaml.safe_load(body.decode() or "null")
        return json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise E.bad_request(f"couldn't get version/kind; json parse error: {e}") from None


def _warnings(op: Op) -> dict[str, str]:
    """RFC 7234 ``Warning`` header as the API server sends it (code 299, agent "-")."""
    if not op.warnings:
        return {}
    quoted = ('299 - "' + w.replace("\\", "\\\\").replace('"', '\\"') + '"' for w in op.warnings)
    return {"Warning": ", ".join(quoted)}


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- process mode --------------------------------------------------------------------------------


def _parse_listen(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    """Run the emulator as a process (see the module docstring)."""
    ap = argparse.ArgumentParser(
        prog="python -m tests.kube.emulator", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 = any free port)")
    ap.add_argument(
        "--netns-listen", action="append", default=[], metavar="NETNS:HOST:PORT",
        help="extra listener inside a network namespace, e.g. /run/netns/x-sw:172.18.0.2:6443",
    )  # fmt: skip
    ap.add_argument(
        "--crds",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATH",
        help="CRD files or directories",
    )
    ap.add_argument(
        "--register-underlay-kinds",
        action="store_true",
        help="register every kind of reconciler.vocab.ALL_CUSTOM (no schema) unless --crds defined it",
    )
    ap.add_argument("--kubeconfig", help="write a kubeconfig for the --listen URL here")
    ap.add_argument(
        "--netns-kubeconfig", help="write a kubeconfig for the first --netns-listen URL here"
    )
    ap.add_argument("--history", type=int, default=10000, help="watch history size (events)")
    ap.add_argument(
        "--bookmark-interval", type=float, default=1.0, help="seconds between BOOKMARKs"
    )
    ap.add_argument(
        "--watch-timeout", type=float, default=None, help="end every watch after this many seconds"
    )
    args = ap.parse_args(argv)

    emu = Emulator(
        history_size=args.history,
        bookmark_interval=args.bookmark_interval,
        watch_timeout=args.watch_timeout,
    )
    if args.crds:
        emu.install_crds(args.crds)
    if args.register_underlay_kinds:
        for res in ALL_CUSTOM:
            if emu.store.lookup(res.group, res.version, res.plural) is None:
                emu.register(res)
    host, port = _parse_listen(args.listen)
    url = emu.start(host, port)
    extra = []
    for spec in args.netns_listen:
        nspath, hostport = spec.split(":", 1)
        h, p = _parse_listen(hostport)
        extra.append((nspath, emu.listen_in_netns(nspath, h, p)))
    if args.kubeconfig:
        emu.write_kubeconfig(args.kubeconfig)
    if args.netns_kubeconfig and extra:
        emu.write_kubeconfig(args.netns_kubeconfig, server_url=extra[0][1])
    print(url, flush=True)
    for nspath, u in extra:
        print(f"netns {nspath} {u}", flush=True)
    done = threading.Event()

    def _stop(*_: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    done.wait()
    emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
