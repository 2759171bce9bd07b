"""Leader election on a real coordination.k8s.io/v1 Lease (the real control plane, as the
reconciler's ServiceAccount with deploy/rbac.yaml, through the fault proxy).

In-process electors pin the algorithm (one leader at a time, takeover after the lease
expires, a leader that cannot renew stops before anyone else may start, release on stop);
two ``underlay reconcile --leader-elect`` processes show that only the leader writes and that
the standby takes over when the leader is killed or stops.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from reconciler import kube as rk
from reconciler import vocab
from reconciler.leader import ElectionConfig, LeaderElector, LeadershipLost
from reconciler.retry import RetryPolicy
from tests.controlplane.cluster import Kube
from tests.integration.test_reconcile import Process, pool_ips, wait_for
from tests.unit.test_apply import NS, QUICK, World, pool

LEASE = "underlay-reconciler-underlay"


@pytest.fixture
def kubeconfig(kube: Kube, tmp_path: Path) -> str:
    """The reconciler's ServiceAccount through the test's fault proxy."""
    return str(kube.reconciler_kubeconfig(tmp_path / "reconciler.kubeconfig"))


def elector(kubeconfig: str, identity: str, **timing: float) -> LeaderElector:
    api = rk.api_client(kubeconfig, retry=RetryPolicy(attempts=1, timeout=0.5))
    cfg = ElectionConfig("lock", NS, identity, **timing)
    return LeaderElector(api, cfg)


def lease(kube: Kube, name: str = "lock", ns: str = NS) -> Any:
    return kube.coord.read_namespaced_lease(name, ns).spec


class Sampler:
    """Samples is_leader() of several electors every 5 ms; ``both`` counts overlaps."""

    def __init__(self, *electors: LeaderElector) -> None:
        self.electors = electors
        self.both = 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if sum(e.is_leader() for e in self.electors) > 1:
                self.both += 1
            time.sleep(0.005)

    def close(self) -> int:
        self.stop.set()
        self.t.join()
        return self.both


TIMING = {"lease_duration": 3.0, "renew_deadline": 2.0, "retry_period": 0.2}


def test_one_leader_and_takeover_after_the_lease_expires(kube: Kube, kubeconfig: str) -> None:
    a, b = elector(kubeconfig, "a", **TIMING), elector(kubeconfig, "b", **TIMING)
    a.start()
    wait_for(a.is_leader, 30, "a leads")
    b.start()
    sampler = Sampler(a, b)
    time.sleep(1.0)
    assert a.is_leader() and not b.is_leader()
    with pytest.raises(LeadershipLost):
        b.check()
    a.check()
    assert lease(kube).holder_identity == "a"
    # a crashes (stops renewing, does not release): b waits out the lease, then takes over
    t0 = time.monotonic()
    a.stop(release=False)
    wait_for(b.is_leader, 30, "b takes over")
    took = time.monotonic() - t0
    assert took >= 2.8, f"took over after {took:.1f}s, before the 3 s lease ran out"
    spec = lease(kube)
    assert spec.holder_identity == "b" and spec.lease_transitions == 1
    assert sampler.close() == 0
    # b stops cleanly: the Lease is released, a new candidate gets it within a retry period
    c = elector(kubeconfig, "c", **TIMING)
    c.start()
    time.sleep(0.5)
    assert not c.is_leader()
    t0 = time.monotonic()
    b.stop(release=True)
    assert lease(kube).holder_identity in ("", "c")
    wait_for(c.is_leader, 30, "c takes over")
    assert time.monotonic() - t0 < 2.5, "released: no need to wait out the 3 s lease"
    c.stop()


def test_a_leader_that_cannot_renew_stops_before_another_can_start(
    kube: Kube, kubeconfig: str
) -> None:
    a, b = elector(kubeconfig, "a", **TIMING), elector(kubeconfig, "b", **TIMING)
    a.start()
    wait_for(a.is_leader, 30, "a leads")
    b.start()
    sampler = Sampler(a, b)
    time.sleep(0.5)
    # a's renewals fail (the API server answers 500 to its Lease writes); b's reads still work
    kube.inject_fault(r"/leases/lock$", method="PUT", status=500, count=1000)
    t0 = time.monotonic()
    wait_for(lambda: not a.is_leader(), 30, "a steps down")
    stepped = time.monotonic() - t0
    assert stepped < 3.0, f"stepped down after {stepped:.1f}s, not within the lease"
    with pytest.raises(LeadershipLost):
        a.check()
    kube.clear_faults()
    wait_for(lambda: a.is_leader() or b.is_leader(), 30, "someone leads again")
    assert sampler.close() == 0, "two leaders at the same time"
    a.stop()
    b.stop()


def test_timings_are_validated() -> None:
    with pytest.raises(ValueError, match="renew deadline"):
        ElectionConfig("l", "ns", "me", lease_duration=5, renew_deadline=5, retry_period=1)
    with pytest.raises(ValueError, match="retry period"):
        ElectionConfig("l", "ns", "me", lease_duration=5, renew_deadline=2, retry_period=2)
    cfg = ElectionConfig("l", "ns", "me")
    assert (cfg.lease_duration, cfg.renew_deadline, cfg.retry_period) == (35, 30, 5)


# --- two reconciler processes ------------------------------------------------------------------


@pytest.fixture
def world(kube: Kube, tmp_path: Path) -> Iterator[World]:
    w = World(kube, tmp_path)
    procs: list[Process] = []
    w.procs = procs  # type: ignore[attr-defined]
    try:
        yield w
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)


ELECT = (
    "--leader-elect", "--leader-elect-lease-duration", "4s",
    "--leader-elect-renew-deadline", "3s", "--leader-elect-retry-period", "0.25s",
    "--interval", "1s",
)  # fmt: skip


def replica(world: World, identity: str) -> Process:
    p = Process(world, "--repo", str(world.origin_dir), *ELECT, identity=identity)
    world.procs.append(p)  # type: ignore[attr-defined]
    return p


def holder(world: World) -> str | None:
    try:
        spec = client.CoordinationV1Api(world.api).read_namespaced_lease(LEASE, NS).spec
    except client.ApiException:
        return None
    return spec.holder_identity  # type: ignore[no-any-return]


def writers(world: World, since: float = 0.0) -> set[str]:
    """Replicas (from the User-Agent) that wrote anything but their Lease since ``since``."""
    return {
        r.user_agent.rsplit("(", 1)[-1].rstrip(")")
        for r in world.requests(writes=True)
        if r.time >= since and "/leases/" not in r.path and "underlay/" in r.user_agent
    }


def test_only_the_leader_writes_and_the_standby_takes_over(world: World) -> None:
    world.commit(QUICK)
    a = replica(world, "a")
    wait_for(lambda: holder(world) == "a", 30, f"a leads ({a.log})")
    # what an operator sees: the server's Table for leases has a HOLDER column
    table = world.kube.kubectl("get", "lease", LEASE, "-n", NS).stdout.splitlines()
    assert table[0].split() == ["NAME", "HOLDER", "AGE"], table
    assert table[1].split()[:2] == [LEASE, "a"], table
    wait_for(lambda: pool_ips(world, "pool-a"), 30, "first apply")
    b = replica(world, "b")
    wait_for(lambda: b.http("/readyz")[0] == 200, 30, f"standby ready ({b.log})")
    wait_for(lambda: "underlay_leader 1" in a.http("/metrics")[1], 30, "a reports leading")
    assert "underlay_leader 0" in b.http("/metrics")[1]
    # both run; a new commit is applied by the leader only
    world.commit({"pool-a.yaml": pool("pool-a", 1, ips="10-30")})
    wait_for(lambda: pool_ips(world, "pool-a") == ["10.1.0.10-10.1.0.30"], 30, "commit applied")
    # drift is reverted by the leader only
    world.custom.patch_cluster_custom_object(
        "spiderpool.spidernet.io", "v2beta1", "spiderippools", "pool-a",
        {"spec": {"gateway": "10.1.0.254"}},
    )  # fmt: skip
    wait_for(
        lambda: (world.get(vocab.SPIDER_IPPOOL, "pool-a") or {})["spec"]["gateway"] == "10.1.0.1", 30, "drift reverted",
    )  # fmt: skip
    time.sleep(1.0)
    assert writers(world) == {"a"}
    assert not any(r.is_write for r in world.requests(path="/leases/") if "(b)" in r.user_agent), (
        "a standby only reads a Lease that is held"
    )

    # the leader dies without releasing: b takes over once the 4 s lease ran out
    killed = time.time()
    a.stop(signal.SIGKILL)
    world.commit({"pool-a.yaml": pool("pool-a", 1, ips="10-40")})
    wait_for(lambda: holder(world) == "b", 30, f"b takes over ({b.log})")
    took = time.time() - killed
    assert took >= 3.5, f"took over after {took:.1f}s, before the 4 s lease ran out"
    wait_for(lambda: pool_ips(world, "pool-a") == ["10.1.0.10-10.1.0.40"], 30, "b applies")
    assert writers(world, since=killed) == {"b"}
    assert "underlay_leader 1" in b.http("/metrics")[1]
    assert world.condition("Ready")["status"] == "True"

    # b stops cleanly: it releases the Lease and c takes over without waiting out the lease
    c = replica(world, "c")
    wait_for(lambda: c.http("/readyz")[0] == 200, 30, "c ready")
    stopped = time.time()
    assert b.stop() == 0
    wait_for(lambda: holder(world) == "c", 30, "c takes over")
    assert time.time() - stopped < 3.5, "released: no need to wait out the 4 s lease"
    world.commit({"pool-a.yaml": pool("pool-a", 1, ips="10-50")})
    wait_for(lambda: pool_ips(world, "pool-a") == ["10.1.0.10-10.1.0.50"], 30, "c applies")
    assert writers(world, since=stopped + 0.5) <= {"c"}
    spec = client.CoordinationV1Api(world.api).read_namespaced_lease(LEASE, NS).spec
    assert spec.lease_transitions == 2 and spec.lease_duration_seconds == 4
