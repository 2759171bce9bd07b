"""Garbage collection of leaked IP allocations and SpiderEndpoints.

A DEL that never arrives (agent down, node crash, runtime bug) leaves an allocation record in a
SpiderIPPool and a SpiderEndpoint behind: the "leaked IPs after agent crashes" Spiderpool users
report. DEL itself never fails the runtime (DESIGN.md, "IPAM"), so this pass is what returns
those addresses.

A record ``{ip: {"pod": "<ns>/<name>", "podUid": <uid>}}`` is a leak when the Pod
``<ns>/<name>`` does not exist, has another UID (deleted and recreated), or has finished
(phase Succeeded or Failed). A pod is read before its IP is allocated (the IPAM needs its
annotations), so a live allocation always has its Pod: nothing that is still in use matches.
Removal is a compare-and-swap on the pool's resourceVersion, so GC running on several nodes at
once, or next to allocations, never loses or duplicates a record.
Source: reference/spiderpool.md (SpiderIPPool status, SpiderEndpoint); Kubernetes API
conventions, "Concurrency Control and Consistency".
"""

from __future__ import annotations

import logging
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
    """Pod lookups for one pass, each pod read at most once."""

    def __init__(self, core: client.CoreV1Api) -> None:
        self.core = core
        self.seen: dict[str, Any] = {}

    def get(self, ref: str) -> Any:
        if ref not in self.seen:
            ns, _, name = ref.partition("/")
            try:
                self.seen[ref] = self.core.read_namespaced_pod(name, ns)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
                self.seen[ref] = None
        return self.seen[ref]

    def leak_reason(self, ref: str, uid: str) -> str:
        """Why the allocation of pod ``ref`` with ``uid`` is a leak, or "" when it is in use."""
        pod = self.get(ref)
        if pod is None:
            return "pod not found"
        if uid and pod.metadata.uid != uid:
            return f"pod was recreated (uid {pod.metadata.uid}, record {uid})"
        phase = pod.status.phase if pod.status else None
        if phase in FINISHED_PHASES:
            return f"pod has finished ({phase})"
        return ""


def collect(api: client.ApiClient, *, max_attempts: int = 20) -> GcReport:
    """One GC pass over every SpiderIPPool and SpiderEndpoint; returns what was released.

    Raises the client's ApiException for errors other than a lost compare-and-swap (409), which
    is retried against a fresh read up to ``max_attempts`` times per pool.
    """
    pods = _Pods(client.CoreV1Api(api))
    report = GcReport()
    pools = Objects(api, vocab.SPIDER_IPPOOL)
    for pool in pools.list()["items"]:
        name = pool["metadata"]["name"]
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
                reason = pods.leak_reason(str(rec.get("pod", "")), str(rec.get("podUid", "")))
                if reason:
                    leaks[ip] = (str(rec.get("pod", "")), reason)
            if not leaks:
                break
            keep = {ip: rec for ip, rec in records.items() if ip not in leaks}
            status = {k: v for k, v in (pool.get("status") or {}).items() if k != "allocatedIPs"}
            status.update(ippool.pool_status(pool.get("spec") or {}, keep))
            try:
                pools.replace_status({**pool, "status": status})
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
                pool = pools.get(name)
                continue
            for ip, (pod, reason) in leaks.items():
                report.ips.append((name, ip, pod, reason))
                log.info("released leaked IP %s of SpiderIPPool %s (%s: %s)", ip, name, pod, reason)
            break
    endpoints = Objects(api, vocab.SPIDER_ENDPOINT)
    for ep in endpoints.list()["items"]:
        md = ep["metadata"]
        ref = f"{md['namespace']}/{md['name']}"
        uid = str(((ep.get("status") or {}).get("current") or {}).get("uid", ""))
        reason = pods.leak_reason(ref, uid)
        if not reason:
            continue
        try:
            endpoints.delete(
                md["name"],
                md["namespace"],
                # the RV precondition: an ADD that rewrote the endpoint since we read it wins
                body=client.V1DeleteOptions(
                    preconditions=client.V1Preconditions(resource_version=md["resourceVersion"])
                ),
            )
        except client.ApiException as exc:
            if exc.status not in (404, 409):
                raise
            continue
        report.endpoints.append(ref)
        log.info("deleted SpiderEndpoint %s (%s)", ref, reason)
    return report
