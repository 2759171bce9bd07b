"""Sockets in the rig's network namespaces, and a TCP relay that carries the API server there.

A socket keeps the network namespace it was created in, so a short-lived thread enters the
namespace with ``setns(CLONE_NEWNET)``, creates and binds the socket, and goes back; the rest of
the process never leaves its own namespace. :class:`Relay` listens on the rig's API address
(inside the switch namespace) and relays every connection, byte for byte, to the real
kube-apiserver on loopback: TLS runs end to end between the agent and the server, as a node
reaches an API server over its network.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from typing import Any

CLONE_NEWNET = 0x40000000


def listen_socket(
    host: str, port: int = 0, netns: str | None = None, backlog: int = 512
) -> socket.socket:
    """A listening TCP socket on ``host:port``, created inside the network namespace at path
    ``netns`` (``/run/netns/<name>``) when given. OSError names the namespace or address."""

    def make() -> socket.socket:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(backlog)
        except OSError as e:
            sock.close()
            where = f" in {netns}" if netns else ""
            raise OSError(e.errno, f"cannot listen on {host}:{port}{where}: {e.strerror}") from e
        return sock

    if netns is None:
        return make()
    result: dict[str, Any] = {}

    def worker() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        try:
            target = os.open(netns, os.O_RDONLY)
        except OSError as e:
            os.close(own)
            result["error"] = OSError(
                e.errno, f"cannot open network namespace {netns}: {e.strerror}"
            )
            return
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                result["error"] = OSError(err, f"setns({netns}): {os.strerror(err)}")
                return
            try:
                result["sock"] = make()
            except OSError as e:
                result["error"] = e
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:
                    os.abort()  # this thread would stay in the wrong namespace
        finally:
            os.close(target)
            os.close(own)

    t = threading.Thread(target=worker, name="setns-listen")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["sock"]  # type: ignore[no-any-return]


class Relay:
    """Relay TCP connections from ``host:port`` (in ``netns``) to ``target`` (host, port).

    :attr:`url` is ``https://host:port``. :meth:`stop` closes the listener and every relayed
    connection.
    """

    def __init__(
        self, target: tuple[str, int], host: str, port: int, netns: str | None = None
    ) -> None:
        self.target = target
        self.sock = listen_socket(host, port, netns)
        h, p = self.sock.getsockname()[:2]
        self.url = f"https://{h}:{p}"
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="relay").start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        with self._lock:
            if self._stopped:
                conn.close()
                upstream.close()
                return
            self._conns.update((conn, upstream))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=pump, args=(upstream, conn), daemon=True, name="relay-down")
        t.start()
        pump(conn, upstream)
        t.join()
        with self._lock:
            self._conns.discard(conn)
            self._conns.discard(upstream)
        conn.close()
        upstream.close()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
