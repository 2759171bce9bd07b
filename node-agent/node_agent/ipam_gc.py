"""Garbage collection of leaked IP allocations and SpiderEndpoints.

A DEL that never arrives (agent down, node crash, runtime bug) leaves an allocation record in a
SpiderIPPool and a SpiderEndpoint behind: the "leaked IPs after agent crashes" Spiderpool users
report. DEL itself never fails the runtime (DESIGN.md, "IPAM"), so this pass is what returns
those addresses.

A record ``{ip: {"pod": "<ns>/<name>", "podUid": <uid>}}`` is a leak when the Pod
``<ns>/<name>`` does not exist, has another UID (deleted and recreated), or has finished
(phase Succeeded or Failed). A pod is read before its IP is allocated (the IPAM needs its
annotations), so a live allocation always has its Pod: nothing that is still in use matches.
Every leak is confirmed by reading its Pod again right before the write (a StatefulSet pod
recreated under the same name during the pass is seen), and removal is a compare-and-swap on
the pool's resourceVersion, so GC running on several nodes at once, or next to allocations,
never loses or duplicates a record. A SpiderEndpoint is deleted when its ``status.current.uid``
is such a pod, with a resourceVersion precondition. Allocations are per pod UID; the container
IDs in SpiderEndpoint entries (which sandbox holds an interface) do not change what is a leak:
a pod's new sandbox takes over its records, so a live pod keeps them whichever sandbox it runs.

:class:`GcLoop` runs :func:`collect` in a thread: once at start, then every ``interval``
seconds (default 5 minutes).
Source: reference/spiderpool.md (SpiderIPPool status, SpiderEndpoint); Kubernetes API
conventions, "Concurrency Control and Consistency".
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client

from reconciler import ippool, vocab
from reconciler.kube import Objects

log = logging.getLogger("underlay.ipam.gc")

FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass
class GcReport:
    """What one pass released: ``ips`` [(pool, ip, "ns/pod", reason)], ``endpoints`` ["ns/name"]."""

    ips: list[tuple[str, str, str, str]] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)


class _Pods:
    """Pod lookups for one pass, each pod read at most once unless ``fresh`` is asked."""

    def __init__(self, core: client.CoreV1Api, request_timeout: float) -> None:
        self.core = core
        self.timeout = request_timeout
        self.seen: dict[str, Any] = {}

    def get(self, ref: str, *, fresh: bool = False) -> Any:
        if fresh or ref not in self.seen:
            ns, _, name = ref.partition("/")
            try:
                self.seen[ref] = self.core.read_namespaced_pod(
                    name, ns, _request_timeout=self.timeout
                )
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
                self.seen[ref] = None
        return self.seen[ref]

    def leak_reason(self, ref: str, uid: str, *, fresh: bool = False) -> str:
        """Why the allocation of pod ``ref`` with ``uid`` is a leak, or "" when it is in use."""
        pod = self.get(ref, fresh=fresh)
        if pod is None:
            return "pod not found"
        if uid and pod.metadata.uid != uid:
            return f"pod was recreated (uid {pod.metadata.uid}, record {uid})"
        phase = pod.status.phase if pod.status else None
        if phase in FINISHED_PHASES:
            return f"pod has finished ({phase})"
        return ""


def collect(
    api: client.ApiClient, *, max_attempts: int = 20, request_timeout: float = 30.0
) -> GcReport:
    """One GC pass over every SpiderIPPool and SpiderEndpoint; returns what was released.

    ``request_timeout``: seconds per API request. Raises the client's ApiException (or a
    urllib3 error) for errors other than a lost compare-and-swap (409), which is retried
    against a fresh read up to ``max_attempts`` times per pool.
    """
    pods = _Pods(client.CoreV1Api(api), request_timeout)
    kw: dict[str, Any] = {"_request_timeout": request_timeout}
    report = GcReport()
    pools = Objects(api, vocab.SPIDER_IPPOOL)
    for pool in pools.list(**kw)["items"]:
        name = pool["metadata"]["name"]
        confirmed: set[tuple[str, str]] = set()
        for _ in range(max_attempts):
            try:
                records = ippool.allocated_ips(pool.get("status"))
            except ValueError as exc:
                log.warning(
                    "SpiderIPPool %s: unreadable status.allocatedIPs (%s): skipped", name, exc
                )
                break
            leaks = {}
            for ip, rec in records.items():
                ref, uid = str(rec.get("pod", "")), str(rec.get("podUid", ""))
                reason = pods.leak_reason(ref, uid)
                if reason and (ref, uid) not in confirmed:
                    # the cached lookup may predate a pod recreated under the same name
                    reason = pods.leak_reason(ref, uid, fresh=True)
                    if reason:
                        confirmed.add((ref, uid))
                if reason:
                    leaks[ip] = (ref, reason)
            if not leaks:
                break
            keep = {ip: rec for ip, rec in records.items() if ip not in leaks}
            status = {k: v for k, v in (pool.get("status") or {}).items() if k != "allocatedIPs"}
            try:
                status.update(ippool.pool_status(pool.get("spec") or {}, keep))
            except ValueError as exc:
                log.warning("SpiderIPPool %s: malformed spec (%s): skipped", name, exc)
                break
            try:
                pools.replace_status({**pool, "status": status}, **kw)
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
                pool = pools.get(name, **kw)
                continue
            for ip, (pod, reason) in leaks.items():
                report.ips.append((name, ip, pod, reason))
                log.info("released leaked IP %s of SpiderIPPool %s (%s: %s)", ip, name, pod, reason)
            break
    endpoints = Objects(api, vocab.SPIDER_ENDPOINT)
    for ep in endpoints.list(**kw)["items"]:
        md = ep["metadata"]
        ref = f"{md['namespace']}/{md['name']}"
        uid = str(((ep.get("status") or {}).get("current") or {}).get("uid", ""))
        if not pods.leak_reason(ref, uid) or not (reason := pods.leak_reason(ref, uid, fresh=True)):
            continue
        try:
            endpoints.delete(
                md["name"],
                md["namespace"],
                # the RV precondition: an ADD that rewrote the endpoint since we read it wins
                body=client.V1DeleteOptions(
                    preconditions=client.V1Preconditions(resource_version=md["resourceVersion"])
                ),
                **kw,
            )
        except client.ApiException as exc:
            if exc.status not in (404, 409):
                raise
            continue
        report.endpoints.append(ref)
        log.info("deleted SpiderEndpoint %s (%s)", ref, reason)
    return report


class GcLoop:
    """Runs :func:`collect` in a daemon thread: once right after :meth:`start`, then every
    ``interval`` seconds (each wait jittered by +-``jitter`` of it, so the agents of many
    nodes do not all list the pools at the same moment), until :meth:`stop`.

    ``api`` is a ``kubernetes.client.ApiClient``. A failing pass is logged and counted
    (``failures``, ``last_error``); the next one runs as scheduled. ``last_report`` is the
    GcReport of the last successful pass, ``passes`` how many passes ran.
    """

    def __init__(
        self,
        api: client.ApiClient,
        interval: float = 300.0,
        *,
        jitter: float = 0.1,
        request_timeout: float = 30.0,
    ) -> None:
        self.api = api
        self.interval = interval
        self.jitter = jitter
        self.request_timeout = request_timeout
        self.passes = 0
        self.failures = 0
        self.last_error = ""
        self.last_report: GcReport | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> GcReport | None:
        """One pass now (in the caller's thread); None when it failed (logged)."""
        try:
            report = collect(self.api, request_timeout=self.request_timeout)
        except Exception as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("IPAM garbage collection pass failed: %s", self.last_error)
            return None
        finally:
            self.passes += 1
        self.last_report = report
        return report

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            wait = self.interval * (1 + random.uniform(-self.jitter, self.jitter))
            self._stop.wait(max(0.0, wait))

    def start(self) -> None:
        """Start the thread (the first pass runs at once). Idempotent."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ipam-gc", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the pass in progress, if any (waits up to ``timeout`` s). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
