"""A fault-injecting HTTPS proxy in front of the real kube-apiserver.

The real server will not make some faults on demand: a storm of 409 Conflicts, 5xx, 429 with
``Retry-After``, a connection cut in the middle of a write, a watch that ends or expires, the
API down while an agent probes it. :class:`FaultProxy` terminates TLS with a certificate from
the control plane's CA (so clients trust it as they trust the server), forwards each request to
the server over its own TLS connection, and relays the answer, streaming watches as they come.
Everything it does not inject it forwards untouched: it never answers a request itself except
with an armed :class:`Fault`, and the bodies of injected errors are ``Status`` objects shaped
as the server's own (Kubernetes API conventions, "Response Status Kind").

It also records every request (:meth:`FaultProxy.requests`), which is how a test checks that a
pass wrote nothing. Clients authenticate with bearer tokens (ServiceAccount tokens from
TokenRequest, or the control plane's static admin token): a proxy that terminates TLS cannot
pass a client certificate on.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import ssl
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.controlplane.netns import listen_socket
from tests.controlplane.pki import Pair

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
STATUS_REASON = {
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalError",
    502: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclass
class Fault:
    """Make the next ``count`` requests matching ``method`` and ``path`` misbehave.

    ``path`` is a regular expression searched in the URL path (query excluded); ``method``
    None matches any verb. Effects, in order:

    - sleep ``hang`` seconds (a slow server; alone, the request is then forwarded);
    - ``drop``: cut the connection without forwarding the request;
    - ``drop_after``: forward it, let the server act on it, then cut the connection before the
      answer reaches the client (a write that happened, though the client cannot know);
    - ``status``: answer ``status`` (409, 429, 500, 503...) with a Status body, and
      ``Retry-After: retry_after`` when set, without forwarding;
    - ``gone``: for a watch, answer 200 with one ERROR event holding a 410 ``Expired`` Status,
      as the server does when the watched resourceVersion is older than its history.
    """

    path: str
    method: str | None = None
    count: int = 1
    status: int | None = None
    retry_after: int | None = None
    hang: float = 0.0
    drop: bool = False
    drop_after: bool = False
    gone: bool = False
    message: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method.upper() == method) and bool(
            re.search(self.path, path)
        )


@dataclass(frozen=True)
class RequestRecord:
    """One request through the proxy: verb, path, raw and parsed query, content type, the
    answer's status code (0 when the connection was cut), user agent, time, and ``fault``
    (what was injected, if anything)."""

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

    @property
    def is_watch(self) -> bool:
        return self.params.get("watch") in ("true", "1") or "/watch/" in self.path


def status_body(code: int, message: str, retry_after: int | None = None) -> dict[str, Any]:
    """A ``Status`` failure object as kube-apiserver writes one."""
    reason = STATUS_REASON.get(code, "InternalError")
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if retry_after is not None:
        body["details"] = {"retryAfterSeconds": retry_after}
    return body


class _Watch:
    """An open watch stream being relayed (closed by :meth:`FaultProxy.close_watches`)."""

    def __init__(self, path: str, upstream: http.client.HTTPSConnection) -> None:
        self.path = path
        self.upstream = upstream

    def close(self) -> None:
        sock = self.upstream.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512
    allow_reuse_address = True

    def __init__(self, sock: socket.socket, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.address_family = sock.family
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away is not the test's business


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        proxy = self.server.proxy
        # answers go out as several writes (status and headers, then the body): without
        # TCP_NODELAY, Nagle holds the body until the client ACKs the headers, which it
        # delays (up to 40 ms): every request through the proxy took 40 ms more
        with contextlib.suppress(OSError):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request.settimeout(30)
        self.request = proxy.server_ctx.wrap_socket(self.request, server_side=True)
        self.request.settimeout(None)
        super().setup()
        self._upstream: http.client.HTTPSConnection | None = None
        with proxy.lock:
            proxy.conns.add(self.request)

    def finish(self) -> None:
        with self.server.proxy.lock:
            self.server.proxy.conns.discard(self.request)
        if self._upstream is not None:
            self._upstream.close()
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _cut(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send_json(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _handle(self) -> None:
        proxy = self.server.proxy
        split = urlsplit(self.path)
        params = dict(parse_qsl(split.query, keep_blank_values=True))
        body = self._body()
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
        started = time.time()

        def log(code: int, what: str | None) -> None:
            proxy._log(
                RequestRecord(
                    self.command, split.path, split.query, params, ctype, code,
                    self.headers.get("User-Agent", ""), started, what,
                )
            )  # fmt: skip

        if proxy.is_down:
            log(0, "down")
            self._cut()
            return
        fault = proxy._take_fault(self.command, split.path)
        what = None
        if fault is not None:
            if fault.hang:
                time.sleep(fault.hang)
                what = "hang"
            if fault.drop:
                log(0, "drop")
                self._cut()
                return
            if fault.status:
                msg = (
                    fault.message
                    or f"injected fault: {fault.status} {STATUS_REASON.get(fault.status, '')}"
                )
                headers = (
                    {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
                )
                log(fault.status, f"status {fault.status}")
                self._send_json(
                    fault.status, status_body(fault.status, msg, fault.retry_after), headers
                )
                return
            if fault.gone:
                log(200, "gone")
                event = {
                    "type": "ERROR",
                    "object": status_body(410, fault.message or "too old resource version"),
                }
                event["object"]["reason"] = "Expired"
                data = json.dumps(event).encode() + b"\n"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        watch = params.get("watch") in ("true", "1") or "/watch/" in split.path
        try:
            upstream = self._connect(fresh=watch)
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            resp = upstream.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self._upstream = None
            log(502, f"upstream {type(exc).__name__}")
            self._send_json(502, status_body(502, f"fault proxy: upstream unreachable: {exc}"))
            return
        if fault is not None and fault.drop_after:
            with contextlib.suppress(OSError, http.client.HTTPException):
                resp.read()
            log(0, "drop_after")
            self._cut()
            return
        log(resp.status, what)
        self._relay(resp, upstream, split.path if watch else None)

    def _connect(self, fresh: bool) -> http.client.HTTPSConnection:
        proxy = self.server.proxy
        host, port = proxy.upstream
        if fresh:
            return http.client.HTTPSConnection(host, port, context=proxy.client_ctx, timeout=None)
        if self._upstream is None:
            self._upstream = http.client.HTTPSConnection(
                host, port, context=proxy.client_ctx, timeout=120
            )
        return self._upstream

    def _relay(
        self,
        resp: http.client.HTTPResponse,
        upstream: http.client.HTTPSConnection,
        watch_path: str | None,
    ) -> None:
        proxy = self.server.proxy
        self.send_response(resp.status, resp.reason)
        length = resp.getheader("Content-Length")
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        if length is not None:
            self.send_header("Content-Length", length)
            self.end_headers()
            data = resp.read()
            if self.command != "HEAD":
                self.wfile.write(data)
            if resp.will_close:
                self._upstream = None
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        watch = _Watch(watch_path, upstream) if watch_path else None
        if watch is not None:
            with proxy.lock:
                proxy.watches.append(watch)
        try:
            while True:
                try:
                    chunk = resp.read1(65536)
                except (OSError, http.client.HTTPException, ValueError):
                    chunk = b""
                if not chunk:
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        finally:
            if watch is not None:
                with proxy.lock, contextlib.suppress(ValueError):
                    proxy.watches.remove(watch)
                upstream.close()
            elif resp.will_close:
                self._upstream = None


class FaultProxy:
    """The proxy in front of ``upstream`` (``https://host:port`` of kube-apiserver).

    ``serving`` is its own certificate (from the control plane's CA, with SANs for every address
    it listens on); ``ca_file`` verifies the server. :meth:`listen` opens a listener (in a rig
    namespace if asked) and returns its URL; one proxy may listen on several addresses.
    """

    def __init__(self, upstream: str, ca_file: Path, serving: Pair) -> None:
        u = urlsplit(upstream)
        assert u.hostname and u.port, upstream
        self.upstream = (u.hostname, u.port)
        self.client_ctx = ssl.create_default_context(cafile=str(ca_file))
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.load_cert_chain(str(serving.cert), str(serving.key))
        self.server_ctx.set_alpn_protocols(["http/1.1"])
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.watches: list[_Watch] = []
        self._faults: list[Fault] = []
        self._requests: list[RequestRecord] = []
        self._servers: list[tuple[_Server, str, int, str | None]] = []
        self.is_down = False
        self.url = ""

    # ---- listeners --------------------------------------------------------------------------

    def listen(self, host: str = "127.0.0.1", port: int = 0, netns: str | None = None) -> str:
        """Listen on ``host:port`` (in network namespace ``netns``); returns ``https://host:port``."""
        sock = listen_socket(host, port, netns)
        h, p = sock.getsockname()[:2]
        self._serve(sock, host, int(p), netns)
        url = f"https://{h}:{p}"
        if not self.url:
            self.url = url
        return url

    def _serve(self, sock: socket.socket, host: str, port: int, netns: str | None) -> None:
        srv = _Server(sock, self)
        threading.Thread(
            target=srv.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name="fault-proxy",
        ).start()
        self._servers.append((srv, host, port, netns))

    def _close_listeners(self) -> list[tuple[str, int, str | None]]:
        closed = []
        for srv, host, port, netns in self._servers:
            srv.shutdown()
            srv.server_close()
            closed.append((host, port, netns))
        self._servers.clear()
        return closed

    def cut_connections(self) -> int:
        """Cut every open client connection (watches included); returns how many."""
        with self.lock:
            conns = list(self.conns)
            watches = list(self.watches)
        for w in watches:
            w.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        return len(conns)

    def down(self) -> None:
        """The API goes away: listeners closed (connection refused) and open connections cut."""
        self.is_down = True
        self._down_addrs = self._close_listeners()
        self.cut_connections()

    def up(self) -> None:
        """Listen again on the same addresses after :meth:`down`."""
        for host, port, netns in getattr(self, "_down_addrs", []):
            self._serve(listen_socket(host, port, netns), host, port, netns)
        self._down_addrs = []
        self.is_down = False

    def stop(self) -> None:
        self._close_listeners()
        self.cut_connections()

    # ---- faults -----------------------------------------------------------------------------

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
        drop_after: bool = False,
        gone: bool = False,
        message: str | None = None,
    ) -> Fault:
        """Arm a :class:`Fault` for the next ``count`` requests matching ``method``/``path``."""
        re.compile(path)
        f = Fault(path, method, count, status, retry_after, hang, drop, drop_after, gone, message)
        with self.lock:
            self._faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def faults(self) -> list[Fault]:
        """Faults still armed, with their remaining counts."""
        with self.lock:
            return [Fault(**asdict(f)) for f in self._faults]

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self._faults:
                if f.count > 0 and f.matches(method, path):
                    f.count -= 1
                    if f.count == 0:
                        self._faults.remove(f)
                    return f
        return None

    # ---- the request log --------------------------------------------------------------------

    def _log(self, rec: RequestRecord) -> None:
        with self.lock:
            self._requests.append(rec)

    def requests(
        self, method: str | None = None, path: str | None = None, *, writes: bool = False
    ) -> list[RequestRecord]:
        """Requests so far (oldest first), filtered by verb, path regex, or writes only."""
        with self.lock:
            recs = list(self._requests)
        return [
            r
            for r in recs
            if (method is None or r.method == method.upper())
            and (path is None or re.search(path, r.path))
            and (not writes or r.is_write)
        ]

    def reset_requests(self) -> None:
        with self.lock:
            self._requests.clear()

    # ---- watches ----------------------------------------------------------------------------

    def open_watches(self, plural: str | None = None) -> int:
        """Watch streams being relayed now (on resource ``plural`` if given)."""
        with self.lock:
            return sum(1 for w in self.watches if plural is None or _plural_of(w.path) == plural)

    def close_watches(self, plural: str | None = None) -> int:
        """End open watch streams (on ``plural``) cleanly, as a server's watch timeout does;
        clients must watch again. Returns how many."""
        with self.lock:
            hit = [w for w in self.watches if plural is None or _plural_of(w.path) == plural]
        for w in hit:
            w.close()
        return len(hit)

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


def _plural_of(path: str) -> str:
    """The resource plural of an API path (``/apis/g/v/namespaces/ns/pools`` -> ``pools``)."""
    parts = [p for p in path.split("/") if p and p != "watch"]
    rest = parts[2:] if parts and parts[0] == "api" else parts[3:]
    if len(rest) >= 2 and rest[0] == "namespaces":
        rest = rest[2:]
    return rest[0] if rest else (parts[-1] if parts else "")
