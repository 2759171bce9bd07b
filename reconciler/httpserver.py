"""The reconciler's HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz``.

``/metrics`` answers the Prometheus text format (:mod:`reconciler.metrics`). ``/healthz`` (the
Deployment's liveness probe) and ``/readyz`` (readiness) answer 200 ``ok`` or 503 with the
reason, from callables the controller provides: a probe returns None when healthy, else a
one-line reason. Standard library ``http.server`` in a daemon thread.
Source: Kubernetes "Configure Liveness, Readiness and Startup Probes"; the API server's
``/healthz``/``/readyz`` convention (plain ``ok``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from reconciler.metrics import CONTENT_TYPE

log = logging.getLogger("underlay.http")

Probe = Callable[[], str | None]


def parse_address(addr: str) -> tuple[str, int]:
    """``:8080``, ``0.0.0.0:8080``, ``[::1]:8080`` or ``127.0.0.1:0`` -> (host, port).

    Raises ValueError naming the address when it has no valid port.
    """
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid address {addr!r}: use [HOST]:PORT, e.g. :8080")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class HttpServer:
    """Serves the three endpoints on ``address`` until :meth:`stop`.

    ``metrics()`` returns the exposition text; ``healthz``/``readyz`` are probes (see module).
    ``url`` is the base URL once started (the port resolved when 0 was asked).
    """

    def __init__(
        self, address: str, metrics: Callable[[], str], healthz: Probe, readyz: Probe
    ) -> None:
        self.host, self.port = parse_address(address)
        self.metrics, self.healthz, self.readyz = metrics, healthz, readyz
        self._srv: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL once started (``http://host:port``)."""
        assert self._srv is not None, "not started"
        host, port = self._srv.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else str(host)
        return f"http://{shown}:{port}"

    def start(self) -> str:
        """Bind and serve in a daemon thread; returns the URL. OSError when the port is taken."""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet: probes every 5 s
                return

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, owner.metrics(), CONTENT_TYPE)
                elif path in ("/healthz", "/livez", "/readyz"):
                    probe = owner.readyz if path == "/readyz" else owner.healthz
                    try:
                        why = probe()
                    except Exception as exc:  # a probe that fails is a failed probe
                        why = f"probe error: {exc}"
                    if why is None:
                        self._send(200, "ok\n")
                    else:
                        self._send(503, why.rstrip("\n") + "\n")
                else:
                    self._send(404, "not found: /metrics, /healthz, /readyz\n")

            def _send(self, code: int, text: str, ctype: str = "text/plain; charset=utf-8") -> None:
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(data)

        family_host = self.host
        srv_cls = ThreadingHTTPServer
        if ":" in family_host:
            import socket

            class V6(ThreadingHTTPServer):
                address_family = socket.AF_INET6

            srv_cls = V6
        self._srv = srv_cls((family_host, self.port), Handler)
        self._srv.daemon_threads = True
        self._thread = threading.Thread(
            target=self._srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True, name="http"
        )
        self._thread.start()
        log.info("serving /metrics, /healthz, /readyz on %s", self.url)
        return self.url

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()
            self._srv = None
