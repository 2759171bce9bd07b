"""The HTTP endpoint of the reconciler and the node agent: ``/metrics``, ``/healthz``, ``/readyz``.

``/metrics`` answers the Prometheus text format (:mod:`reconciler.metrics`). ``/healthz`` (the
liveness probe) and ``/readyz`` (readiness) answer 200 ``ok`` or 503 with the reason, from
callables the program provides: a probe returns None when healthy, else a one-line reason.
An endpoint given as None is not served (404): the agent's ``--metrics-address`` serves
``/metrics`` alone.

Slow or idle clients cannot starve the probes: one asyncio event loop reads every connection
(an open connection costs a file descriptor and a few KiB, never a thread); a request must
arrive within ``read_timeout`` s (else 408) with at most :data:`MAX_HEADER` bytes of header;
at most ``max_connections`` connections are open, and one more closes the connection that has
been sending its request longest (a probe sends its request at once, so it is never the
oldest), or is answered 503 when every open one is being answered; at most ``workers`` requests are answered at once, in worker threads; every answer
closes its connection. Requests are parsed by the standard library's
``http.server.BaseHTTPRequestHandler``, run on the bytes read.
Source: Kubernetes "Configure Liveness, Readiness and Startup Probes"; the API server's
``/healthz``/``/readyz`` convention (plain ``ok``); RFC 9110 (408, 431).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any

from reconciler.metrics import CONTENT_TYPE

log = logging.getLogger("underlay.http")

Probe = Callable[[], str | None]

MAX_HEADER = 8192
"""Most bytes of request line and headers a request may send (431 beyond)."""
MAX_CONNECTIONS = 256
"""Connections open at once by default."""
READ_TIMEOUT = 5.0
"""Seconds a client has to send its whole request by default (408 after)."""
WRITE_TIMEOUT = 5.0
"""Seconds a client has to take its answer."""
WORKERS = 4
"""Requests answered at once by default (threads)."""


def parse_address(addr: str) -> tuple[str, int]:
    """``:8080``, ``0.0.0.0:8080``, ``[::1]:8080`` or ``127.0.0.1:0`` -> (host, port).

    An empty host means every IPv4 address (``0.0.0.0``). Raises ValueError naming the address
    when it has no valid port.
    """
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid address {addr!r}: use [HOST]:PORT, e.g. :8080")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class _Exchange(BaseHTTPRequestHandler):
    """One request, parsed and answered on in-memory files (no socket)."""

    owner: HttpServer
    raw: bytes

    def __init__(self, raw: bytes, client: tuple[str, int], owner: HttpServer) -> None:
        self.raw, self.owner = raw, owner
        self.out = io.BytesIO()
        super().__init__(None, client, None)  # type: ignore[arg-type]

    def setup(self) -> None:
        self.rfile = io.BytesIO(self.raw)
        self.wfile = self.out

    def finish(self) -> None:
        return

    def log_message(self, format: str, *args: Any) -> None:  # quiet: probes every 5 s
        return

    def do_GET(self) -> None:
        owner = self.owner
        path = self.path.split("?", 1)[0]
        if path == "/metrics" and owner.metrics is not None:
            self._send(200, owner.metrics(), CONTENT_TYPE)
        elif path in ("/healthz", "/livez", "/readyz") and (
            probe := owner.readyz if path == "/readyz" else owner.healthz
        ):
            try:
                why = probe()
            except Exception as exc:  # a probe that fails is a failed probe
                why = f"probe error: {exc}"
            if why is None:
                self._send(200, "ok\n")
            else:
                self._send(503, why.rstrip("\n") + "\n")
        else:
            self._send(404, f"not found: {', '.join(owner.paths)}\n")

    def _send(self, code: int, text: str, ctype: str = "text/plain; charset=utf-8") -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


async def _read_request(conn: socket.socket) -> bytes | None:
    """Request line and headers, up to the empty line, read into a buffer that grows from 512
    bytes up to :data:`MAX_HEADER`; None when the client closed first; ValueError when they do
    not fit. Empty lines before the request line are skipped (RFC 9112 section 2.2)."""
    loop = asyncio.get_running_loop()
    buf = bytearray(512)
    have = 0
    while True:
        if have == len(buf):
            if have >= MAX_HEADER:
                raise ValueError("request header too long")
            buf.extend(bytes(min(have, MAX_HEADER - have)))
        with memoryview(buf) as view:
            n = await loop.sock_recv_into(conn, view[have:])
        if n == 0:
            return None
        have += n
        data = bytes(buf[:have]).lstrip(b"\r\n")
        if b"\r\n\r\n" in data or b"\n\n" in data:
            return data


async def _finish(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel the connection tasks still running and wait for them (their connections close)."""
    pending = list(tasks)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _status(code: int, reason: str) -> bytes:
    text = f"{reason}\n".encode()
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(text)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + text


class HttpServer:
    """Serves the endpoints on ``address`` until :meth:`stop` (limits: see the module).

    ``metrics()`` returns the exposition text; ``healthz``/``readyz`` are probes (see module);
    any of them None is not served. ``url`` is the base URL once started (the port resolved
    when 0 was asked).
    """

    def __init__(
        self,
        address: str,
        metrics: Callable[[], str] | None,
        healthz: Probe | None,
        readyz: Probe | None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout: float = READ_TIMEOUT,
        workers: int = WORKERS,
    ) -> None:
        self.host, self.port = parse_address(address)
        self.metrics, self.healthz, self.readyz = metrics, healthz, readyz
        self.max_connections, self.read_timeout, self.workers = (
            max_connections,
            read_timeout,
            workers,
        )
        self.paths = [
            p
            for p, f in (("/metrics", metrics), ("/healthz", healthz), ("/readyz", readyz))
            if f is not None
        ]
        self.open_connections = 0
        """Connections open now."""
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._reading: dict[socket.socket, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """Base URL once started (``http://host:port``)."""
        assert self._sock is not None, "not started"
        host, port = self._sock.getsockname()[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else str(host)
        if ":" in shown:
            shown = f"[{shown}]"
        return f"http://{shown}:{port}"

    def start(self) -> str:
        """Bind and serve in a daemon thread; returns the URL. OSError when the port is taken."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._sock = socket.create_server((self.host, self.port), family=family, backlog=1024)
        self._sock.setblocking(False)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="http")
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(ready))
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="http")
        self._thread.start()
        ready.wait()
        log.info("serving %s on %s", ", ".join(self.paths), self.url)
        return self.url

    async def _serve(self, ready: threading.Event) -> None:
        assert self._sock is not None
        self._stopped = asyncio.Event()
        self._answering = asyncio.Semaphore(self.workers)
        accepting = asyncio.ensure_future(self._accept(self._sock))
        ready.set()
        await self._stopped.wait()
        accepting.cancel()
        await asyncio.gather(accepting, return_exceptions=True)
        await _finish(self._tasks)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError:  # EMFILE and the like: wait for connections to close
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = loop.create_task(self._client(conn, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _make_room(self) -> bool:
        """Close the connection that has been sending its request longest (see the module);
        False when none is still sending."""
        if not self._reading:
            return False
        oldest = next(iter(self._reading))
        task = self._reading.pop(oldest)
        with contextlib.suppress(OSError):
            oldest.send(_status(503, "Service Unavailable"))
        task.cancel()
        return True

    async def _client(self, conn: socket.socket, peer: Any) -> None:
        loop = asyncio.get_running_loop()
        self.open_connections += 1
        try:
            if self.open_connections > self.max_connections and not self._make_room():
                # every open one is being answered: come back later
                with contextlib.suppress(OSError):
                    conn.send(_status(503, "Service Unavailable"))
                return
            task = asyncio.current_task()
            assert task is not None
            self._reading[conn] = task
            try:
                async with asyncio.timeout(self.read_timeout):
                    raw = await _read_request(conn)
            except TimeoutError:
                raw, answer = None, _status(408, "Request Timeout")
            except ValueError:
                raw, answer = None, _status(431, "Request Header Fields Too Large")
            else:
                answer = b""
            finally:
                self._reading.pop(conn, None)
            if raw is not None:
                async with self._answering:
                    answer = await loop.run_in_executor(self._pool, self._respond, raw, peer)
            if answer:
                await asyncio.wait_for(loop.sock_sendall(conn, answer), WRITE_TIMEOUT)
        except (OSError, TimeoutError):
            pass  # the client went away or stopped reading
        except asyncio.CancelledError:
            pass  # evicted (told 503) or stop(): ending normally keeps asyncio quiet
        finally:
            self._reading.pop(conn, None)
            self.open_connections -= 1
            conn.close()

    def _respond(self, raw: bytes, peer: Any) -> bytes:
        try:
            return _Exchange(raw, peer[:2], self).out.getvalue()
        except Exception:
            log.exception("answering an HTTP request failed")
            return _status(500, "Internal Server Error")

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stopped is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stopped.set)
        thread.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if self._sock is not None:
            self._sock.close()
