"""A LIST+WATCH cache of the kinds the reconciler observes (a small client-go informer).

Listing every SpiderIPPool, SpiderMultusConfig, OvsBridge and NetworkAttachmentDefinition on
every pass costs seconds with thousands of objects (megabytes of JSON to encode, send and
decode). Instead one thread per kind lists once, then watches from the list's resourceVersion
and applies each ADDED/MODIFIED/DELETED event to an in-memory map; a pass reads a snapshot of
the map. A watch that ends is resumed from the last resourceVersion seen (bookmarks keep it
fresh); 410 (the server's ERROR event ``Expired``: the resourceVersion is older than its
history) means a fresh LIST at once, an error a fresh LIST after a backoff. A kind the API
server does not serve (404 on the LIST: no CRD) is reported as missing and listed again every
``retry`` seconds, so a CRD installed later is picked up.

Writes of this process are recorded at once (:meth:`ObjectCache.record` with the object the API
server answered, :meth:`ObjectCache.forget` after a delete), so the next pass never plans against
a cache that has not seen them yet; events older than what is cached are ignored (compared by
resourceVersion when both are integers, as etcd's are).
Source: client-go ``tools/cache`` (Reflector: ListAndWatch, resourceVersion, 410 Gone,
bookmarks); Kubernetes API concepts, "Efficient detection of changes".
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from kubernetes import client

from reconciler.vocab import Resource

log = logging.getLogger("underlay.cache")

Key = tuple[str, str | None, str]


def _rv(obj: dict[str, Any] | None) -> int | None:
    v = ((obj or {}).get("metadata") or {}).get("resourceVersion")
    return int(v) if isinstance(v, str) and v.isdigit() else None


class _Kind:
    def __init__(self, res: Resource) -> None:
        self.res = res
        self.objs: dict[Key, dict[str, Any]] = {}
        self.tombstones: dict[Key, int] = {}
        self.rv: str | None = None
        self.synced = threading.Event()
        self.missing = False
        self.error: str | None = None

    def key(self, obj: dict[str, Any]) -> Key:
        """(kind, namespace or None, name) of ``obj``."""
        md = obj.get("metadata") or {}
        return (self.res.kind, md.get("namespace") if self.res.namespaced else None, md["name"])


class ObjectCache:
    """Keeps every object of ``resources`` (all namespaces) in memory; see the module docstring.

    ``timeout_seconds``: server-side length of one watch; ``retry``: seconds between LISTs of a
    kind that is missing or failing. Thread-safe.
    """

    def __init__(
        self,
        api: client.ApiClient,
        resources: Iterable[Resource],
        *,
        timeout_seconds: int = 300,
        retry: float = 5.0,
    ) -> None:
        self.custom: Any = client.CustomObjectsApi(api)
        self.kinds = {r.kind: _Kind(r) for r in resources}
        self.timeout_seconds = timeout_seconds
        self.retry = retry
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._streams: list[Any] = []
        self._threads: list[threading.Thread] = []
        self.lists = 0
        """How many LISTs were made (initial and after 410/errors)."""
        self.expired = 0
        """How many watches the API server ended with 410 Expired (resourceVersion too old)."""

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start one list-and-watch thread per kind (daemon threads)."""
        for k in self.kinds.values():
            t = threading.Thread(
                target=self._run, args=(k,), daemon=True, name=f"cache-{k.res.plural}"
            )
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stop every thread (open watches are closed)."""
        self._stop.set()
        with self._lock:
            streams = list(self._streams)
        for resp in streams:
            _shutdown(resp)

    def wait_synced(self, timeout: float) -> bool:
        """True once every kind was listed (or found missing) at least once."""
        deadline = time.monotonic() + timeout
        for k in self.kinds.values():
            if not k.synced.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    @property
    def synced(self) -> bool:
        """True once every kind was listed (or found missing) at least once."""
        return all(k.synced.is_set() for k in self.kinds.values())

    # ---- reads and own writes ----------------------------------------------------------------

    def snapshot(self) -> tuple[dict[Key, dict[str, Any]], list[Resource]]:
        """(every cached object by key, the kinds the API server does not serve). The objects
        are shared: callers must not change them."""
        out: dict[Key, dict[str, Any]] = {}
        missing = []
        with self._lock:
            for k in self.kinds.values():
                if k.missing:
                    missing.append(k.res)
                out.update(k.objs)
        return out, missing

    def record(self, obj: dict[str, Any]) -> None:
        """Put an object this process just wrote (the API server's answer) into the cache."""
        k = self.kinds.get(str(obj.get("kind")))
        if k is None:
            return
        with self._lock:
            new = _rv(obj)
            try:
                seen = int(k.rv) if k.rv is not None else None
            except (TypeError, ValueError):
                seen = None
            if k.key(obj) not in k.objs and new is not None and seen is not None and new <= seen:
                # the watch is already past this version and the object is not here: it was
                # deleted since (its DELETED came before our write's answer was recorded)
                return
            self._put(k, obj)

    def forget(self, key: Key, last: dict[str, Any] | None) -> None:
        """Drop an object this process just deleted; ``last`` is its last known state (events
        up to its resourceVersion are stale and ignored)."""
        k = self.kinds.get(key[0])
        if k is None:
            return
        with self._lock:
            k.objs.pop(key, None)
            rv = _rv(last)
            if rv is not None:
                k.tombstones[key] = rv

    def _put(self, k: _Kind, obj: dict[str, Any]) -> None:
        key = k.key(obj)
        new = _rv(obj)
        old = _rv(k.objs.get(key))
        dead = k.tombstones.get(key)
        if new is not None and (
            (old is not None and new < old) or (dead is not None and new <= dead)
        ):
            return  # an event older than what we know
        obj.setdefault("apiVersion", k.res.api_version)
        obj.setdefault("kind", k.res.kind)
        k.objs[key] = obj
        k.tombstones.pop(key, None)

    # ---- the reflector ---------------------------------------------------------------------

    def _list(self, k: _Kind) -> None:
        r = k.res
        resp = self.custom.list_cluster_custom_object(
            r.group, r.version, r.plural, _preload_content=False
        )
        data = json.loads(resp.data)
        self.lists += 1
        with self._lock:
            fresh: dict[Key, dict[str, Any]] = {}
            for obj in data.get("items") or []:
                obj.setdefault("apiVersion", r.api_version)
                obj.setdefault("kind", r.kind)
                key = k.key(obj)
                mine = k.objs.get(key)
                # keep our own newer write if the list was served before it
                newer = mine is not None and (_rv(mine) or -1) > (_rv(obj) or -1)
                fresh[key] = mine if newer and mine is not None else obj
            k.objs = fresh
            k.rv = data["metadata"].get("resourceVersion")
            k.missing = False
            k.error = None
        k.synced.set()

    def _watch(self, k: _Kind) -> None:
        """One watch of ``k`` from its resourceVersion, applying events until it ends.

        The stream is read here rather than through ``kubernetes.watch.Watch``: that one,
        without deserializing, fails on the ERROR event an API server sends when the
        resourceVersion is too old (``KeyError: 'raw_object'``), so a 410 looked like a broken
        connection (backoff, no log of why). An ERROR event raises ApiException with its code.
        """
        r = k.res
        resp = self.custom.list_cluster_custom_object(
            r.group, r.version, r.plural, watch=True, resource_version=k.rv,
            timeout_seconds=self.timeout_seconds, allow_watch_bookmarks=True,
            _request_timeout=self.timeout_seconds + 30, _preload_content=False,
        )  # fmt: skip
        with self._lock:
            self._streams.append(resp)
        try:
            pending = b""
            for chunk in resp.stream(65536, decode_content=False):
                if self._stop.is_set():
                    return
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._line(k, line)
            if pending.strip() and not self._stop.is_set():
                self._line(k, pending)
        finally:
            with self._lock:
                if resp in self._streams:
                    self._streams.remove(resp)
            resp.close()
            resp.release_conn()

    def _line(self, k: _Kind, line: bytes) -> None:
        ev = json.loads(line)
        if ev.get("type") == "ERROR":
            st = ev.get("object") or {}
            code = st.get("code") if isinstance(st, dict) else None
            raise client.ApiException(
                status=int(code) if isinstance(code, int) else 500,
                reason=f"{st.get('reason', '')}: {st.get('message', '')}"
                if isinstance(st, dict)
                else str(st),
            )
        self._event(k, ev)

    def _run(self, k: _Kind) -> None:
        r = k.res
        need_list = True
        failures = 0
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list(k)
                    need_list = False
                    failures = 0
                self._watch(k)
            except client.ApiException as exc:
                if self._stop.is_set():
                    return
                need_list = True
                if exc.status == 404:
                    with self._lock:
                        k.missing, k.objs = True, {}
                    k.synced.set()
                    self._stop.wait(self.retry)
                    continue
                if exc.status == 410:
                    self.expired += 1
                    log.debug("watch of %s: %s; listing again", r.plural, exc.reason)
                    continue
                failures += 1
                k.error = f"{exc.status} {exc.reason}"
                log.warning("watch of %s: %s", r.plural, k.error)
                self._stop.wait(min(self.retry, 0.5 * 2**failures))
            except Exception as exc:  # dropped connections, timeouts
                if self._stop.is_set():
                    return
                failures += 1
                need_list = True
                k.error = str(exc)
                log.debug("watch of %s: %s", r.plural, exc)
                self._stop.wait(min(self.retry, 0.5 * 2**failures))

    def _event(self, k: _Kind, ev: dict[str, Any]) -> None:
        kind, obj = ev.get("type"), ev.get("object")
        if not isinstance(obj, dict):
            raise client.ApiException(status=500, reason=f"watch event without object: {kind}")
        if kind == "BOOKMARK":
            k.rv = (obj.get("metadata") or {}).get("resourceVersion") or k.rv
            return
        with self._lock:
            if kind in ("ADDED", "MODIFIED"):
                self._put(k, obj)
            elif kind == "DELETED":
                key = k.key(obj)
                cur = k.objs.get(key)
                if _rv(cur) is None or (_rv(obj) or 0) >= (_rv(cur) or 0):
                    k.objs.pop(key, None)
                k.tombstones.pop(key, None)
        k.rv = (obj.get("metadata") or {}).get("resourceVersion") or k.rv


def _shutdown(resp: Any) -> None:
    """Unblock a thread reading ``resp`` (a urllib3 response): shut its socket down."""
    import socket

    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
