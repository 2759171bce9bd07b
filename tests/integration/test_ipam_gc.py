"""IPAM garbage collection against the real control plane: leaks go, live allocations stay.

The GC runs as the agent's ServiceAccount through the test's fault proxy. Pods are deleted as
their kubelet finishes them (grace period 0); the SpiderEndpoints of deleted pods are
kube-controller-manager's garbage collector's to delete (ownerReference to the Pod),
asynchronously, which the tests wait for.
"""

from __future__ import annotations

import json
import threading
import time

from node_agent.ipam import Ipam, IpamRequest
from node_agent.ipam_gc import GcLoop, collect

from reconciler.ippool import allocated_ips
from tests.integration.test_ipam_kube import Cluster, cluster, req
from tests.rig import wait_for

__all__ = ["cluster"]  # the fixture, shared with test_ipam_kube

POOL = {"default_ipv4_ippool": ["ippool-test"]}


def test_leaked_allocations_and_endpoints_are_released_live_ones_stay(cluster: Cluster) -> None:
    cluster.node("n1")
    cluster.pool("ippool-test")
    cluster.wait_gc_ready()
    ipam = Ipam(cluster.agent, "n1")
    uids = {name: cluster.pod(name) for name in ("live", "gone", "again", "done")}
    ips = {}
    for name, uid in uids.items():
        (a,) = ipam.allocate(req(name, uid, default_ipv4_ippool=["ippool-test"]))
        ips[name] = str(a.address).split("/")[0]
    # no DEL ever arrives for these three:
    cluster.delete_pod("gone")
    cluster.delete_pod("again")
    new_uid = cluster.pod("again")  # recreated under the same name
    pod = cluster.core.read_namespaced_pod("done", "default")
    pod.status.phase = "Succeeded"
    cluster.core.replace_namespaced_pod_status("done", "default", pod)
    # the endpoints of deleted pods go with them (ownerReference to the Pod; "again"'s names
    # its old UID), deleted by kube-controller-manager's garbage collector, asynchronously
    wait_for(
        lambda: [cluster.endpoint(n) for n in ("gone", "again")] == [None, None],
        30,
        "kube-controller-manager to collect the deleted pods' SpiderEndpoints",
    )

    report = collect(cluster.agent)

    released = {(pool, ip, pod) for pool, ip, pod, _ in report.ips}
    assert released == {
        ("ippool-test", ips["gone"], "default/gone"),
        ("ippool-test", ips["again"], "default/again"),
        ("ippool-test", ips["done"], "default/done"),
    }
    reasons = {pod: reason for _, _, pod, reason in report.ips}
    assert reasons["default/gone"] == "pod not found"
    assert reasons["default/again"].startswith(f"pod was recreated (uid {new_uid}")
    assert reasons["default/done"] == "pod has finished (Succeeded)"
    status = cluster.status("ippool-test")
    assert allocated_ips(status) == {ips["live"]: {"pod": "default/live", "podUid": uids["live"]}}
    assert status["allocatedIPCount"] == 1 and status["totalIPCount"] == 10
    # endpoints of deleted pods went with them (ownerReference to the Pod); a finished pod's
    # endpoint is GC's to delete
    assert report.endpoints == ["default/done"]
    assert cluster.endpoint("live") is not None
    assert [cluster.endpoint(n) for n in ("gone", "again", "done")] == [None, None, None]
    # a second pass finds nothing
    again = collect(cluster.agent)
    assert again.ips == [] and again.endpoints == []


def test_gc_racing_allocations_never_loses_a_record(cluster: Cluster) -> None:
    cluster.node("n1")
    cluster.pool("big", ips="172.18.40.1-172.18.40.200")
    ipam = Ipam(cluster.agent, "n1")
    pods = list(cluster.pods([f"p{i}" for i in range(40)]).items())
    stop = threading.Event()
    passes = []

    def gc_loop() -> None:
        while not stop.is_set():
            passes.append(collect(cluster.agent))

    t = threading.Thread(target=gc_loop)
    t.start()
    try:
        for name, uid in pods:
            ipam.allocate(req(name, uid, default_ipv4_ippool=["big"]))
    finally:
        stop.set()
        t.join()
    assert passes and all(not p.ips for p in passes), "GC released a live allocation"
    status = cluster.status("big")
    records = allocated_ips(status)
    assert len(records) == 40 == status["allocatedIPCount"]
    assert {r["podUid"] for r in records.values()} == {uid for _, uid in pods}
    assert json.loads(status["allocatedIPs"]) == records


def test_sandbox_switches_and_recreated_pods_keep_what_is_in_use(cluster: Cluster) -> None:
    """Container IDs in SpiderEndpoint entries: a pod whose sandbox was recreated keeps its
    record whichever sandbox holds it; a StatefulSet pod recreated under its name keeps the
    new UID's record and endpoint while the old UID's record (its DEL never came) goes."""
    cluster.node("n1")
    cluster.pool("ippool-test")
    cluster.wait_gc_ready()  # so that the Orphan deletion below orphans the endpoint
    ipam = Ipam(cluster.agent, "n1")
    uid = cluster.pod("web")
    (a,) = ipam.allocate(IpamRequest("default", "web", uid, "sandbox-A", "eth0", POOL))
    (b,) = ipam.allocate(IpamRequest("default", "web", uid, "sandbox-B", "eth0", POOL))
    assert a.ip == b.ip
    old = cluster.pod("db-0")
    (o,) = ipam.allocate(IpamRequest("default", "db-0", old, "db-old", "eth0", POOL))
    cluster.delete_pod("db-0", propagation_policy="Orphan")  # its endpoint stays
    new = cluster.pod("db-0")
    (n,) = ipam.allocate(IpamRequest("default", "db-0", new, "db-new", "eth0", POOL))

    report = collect(cluster.agent)

    assert [(ip, pod) for _, ip, pod, _ in report.ips] == [(o.ip, "default/db-0")]
    assert report.endpoints == []
    records = allocated_ips(cluster.status("ippool-test"))
    assert records == {
        b.ip: {"pod": "default/web", "podUid": uid},
        n.ip: {"pod": "default/db-0", "podUid": new},
    }
    for name, cid in (("web", "sandbox-B"), ("db-0", "db-new")):
        ep = cluster.endpoint(name)
        assert ep is not None
        assert [e["containerID"] for e in ep["status"]["current"]["ips"]] == [cid]


def test_gc_loop_passes_at_start_and_every_interval(cluster: Cluster) -> None:
    cluster.node("n1")
    cluster.pool("ippool-test")
    ipam = Ipam(cluster.agent, "n1")

    def leak(name: str) -> None:
        uid = cluster.pod(name)
        ipam.allocate(IpamRequest("default", name, uid, f"c-{name}", "eth0", POOL))
        cluster.delete_pod(name)  # and its DEL never comes

    leak("gone")
    loop = GcLoop(cluster.agent, interval=0.3, request_timeout=5)
    loop.start()
    try:
        wait_for(lambda: allocated_ips(cluster.status("ippool-test")) == {}, what="first pass")
        cluster.kube.inject_fault(r"/spiderippools$", method="GET", status=500, count=1)
        leak("gone-later")
        wait_for(lambda: loop.failures == 1, what="a failing pass")
        wait_for(lambda: allocated_ips(cluster.status("ippool-test")) == {}, what="a later pass")
        assert "500" in loop.last_error
        assert loop.last_report is not None
    finally:
        loop.stop()
    passes = loop.passes
    assert passes >= 3
    time.sleep(0.5)
    assert loop.passes == passes  # stopped
