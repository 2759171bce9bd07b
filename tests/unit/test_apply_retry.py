"""Retries with exponential backoff on 429/5xx/timeouts/dropped connections, against the real
control plane behind the fault proxy; and a pass that converges through failures injected in
the middle of its apply, with nothing duplicated or orphaned."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client

from reconciler import kube as rk
from reconciler import vocab
from reconciler.controller import GitSource, Options, Reconciler
from reconciler.metrics import ReconcilerMetrics
from reconciler.retry import RetryPolicy, retry_after_seconds
from tests.controlplane.cluster import Kube
from tests.unit.test_apply import NS, QUICK, World, applied, pool

POOL_PATH = "/apis/spiderpool.spidernet.io/v2beta1/spiderippools"


@pytest.fixture
def kubeconfig(kube: Kube, tmp_path: Path) -> str:
    """The reconciler's ServiceAccount through the test's fault proxy."""
    return str(kube.reconciler_kubeconfig(tmp_path / "reconciler.kubeconfig"))


def retrying(kubeconfig: str, policy: RetryPolicy) -> tuple[Any, list[tuple[str, str, float]]]:
    seen: list[tuple[str, str, float]] = []
    api = rk.api_client(
        kubeconfig, retry=policy, on_retry=lambda m, p, r, d: seen.append((m, r, d))
    )
    return api, seen


def test_429_honours_retry_after(kube: Kube, kubeconfig: str) -> None:
    api, seen = retrying(kubeconfig, RetryPolicy(base=0.01, jitter=0))
    kube.inject_fault(POOL_PATH + "$", method="GET", status=429, retry_after=1, count=1)
    started = time.monotonic()
    rk.Objects(api, vocab.SPIDER_IPPOOL).list()
    assert time.monotonic() - started >= 0.95
    assert seen == [("GET", "429", 1.0)]
    codes = [r.code for r in kube.requests("GET", POOL_PATH + "$")]
    assert codes == [429, 200]


def test_5xx_backs_off_exponentially_then_gives_up(kube: Kube, kubeconfig: str) -> None:
    api, seen = retrying(kubeconfig, RetryPolicy(attempts=4, base=0.02, factor=2, jitter=0))
    kube.inject_fault(POOL_PATH + "$", method="GET", status=503, count=3)
    rk.Objects(api, vocab.SPIDER_IPPOOL).list()
    assert [(r, d) for _m, r, d in seen] == [("503", 0.02), ("503", 0.04), ("503", 0.08)]
    kube.inject_fault(POOL_PATH + "$", method="GET", status=500, count=10)
    with pytest.raises(client.ApiException) as info:
        rk.Objects(api, vocab.SPIDER_IPPOOL).list()
    assert info.value.status == 500
    assert len(kube.requests("GET", POOL_PATH + "$")) == 4 + 4
    # 409/404/422 are answers, not failures: never retried
    kube.clear_faults()
    seen.clear()
    with pytest.raises(client.ApiException) as info:
        rk.Objects(api, vocab.SPIDER_IPPOOL).get("absent")
    assert info.value.status == 404 and seen == []


def test_timeouts_and_dropped_connections_are_retried(kube: Kube, kubeconfig: str) -> None:
    api, seen = retrying(kubeconfig, RetryPolicy(base=0.01, timeout=0.5))
    objs = rk.Objects(api, vocab.SPIDER_IPPOOL)
    body = {
        "apiVersion": vocab.SPIDERPOOL_API_VERSION,
        "kind": "SpiderIPPool",
        "metadata": {"name": "p"},
        "spec": {"subnet": "10.0.0.0/24", "ips": ["10.0.0.10"]},
    }
    # the server applies after the client gave up; the retried apply finds it done
    kube.inject_fault(POOL_PATH + "/p$", method="PATCH", hang=1.0, count=1)
    kube.inject_fault(POOL_PATH + "/p$", method="GET", drop=True, count=1)
    live = objs.apply(body, "underlay")
    assert live["spec"]["ips"] == ["10.0.0.10"]
    assert objs.get("p")["metadata"]["uid"] == live["metadata"]["uid"]
    reasons = [r for _m, r, _d in seen]
    assert "ReadTimeoutError" in reasons and "ProtocolError" in reasons
    assert len(objs.list()["items"]) == 1
    # without retries the same faults surface as transport errors
    plain = rk.api_client(kubeconfig, retry=RetryPolicy(attempts=1, timeout=0.5))
    kube.inject_fault(POOL_PATH + "/p$", method="GET", hang=1.0, count=1)
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        rk.Objects(plain, vocab.SPIDER_IPPOOL).get("p")


def test_retry_after_header_forms() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    value = retry_after_seconds(later)
    assert value is not None and 25 <= value <= 31
    assert RetryPolicy().delay(1, retry_after=500) == 60.0  # capped


def _reconciler(world: World, out: Any, metrics: ReconcilerMetrics) -> Reconciler:
    api = rk.api_client(
        world.kubeconfig,
        retry=RetryPolicy(base=0.05, cap=0.5, timeout=0.8),
        on_retry=metrics.on_retry,
    )
    source = GitSource(str(world.origin_dir), "main", cache_dir=world.tmp / "cache")
    return Reconciler(api, source, Options(namespace=NS), metrics=metrics, out=out)


def _no_orphans(world: World) -> None:
    """Every object carrying our label is in the inventory, and every inventory entry exists
    with the uid recorded."""
    assert world.inventory_keys() == world.labelled()
    for e in world.status()["inventory"]:
        res = vocab.BY_KEY[(e["apiVersion"], e["kind"])]
        live = world.get(res, e["name"], e.get("namespace"))
        assert live is not None and live["metadata"]["uid"] == e["uid"]


def test_failures_in_the_middle_of_an_apply_converge(world: World) -> None:
    """Faults armed right after the pool is written (before the Multus config and the NAD):
    a hang past the client timeout (the server applies anyway), a 503 with Retry-After, a
    dropped connection. The pass converges; every object exists once, owned once, in the
    inventory; the next pass writes nothing."""
    world.commit({**QUICK, "pool-b.yaml": pool("pool-b", 2)})
    metrics = ReconcilerMetrics()
    lines: list[str] = []

    def out(line: str) -> None:
        lines.append(line)
        if line == "created SpiderIPPool pool-a":
            smc = r"/spidermultusconfigs/net-a$"
            world.kube.inject_fault(smc, method="PATCH", hang=1.5, count=1)
            world.kube.inject_fault(
                r"/network-attachment-definitions/net-a$", method="PATCH", status=503,
                retry_after=1, count=1,
            )  # fmt: skip
            world.kube.inject_fault(r"/spiderippools/pool-b$", method="PATCH", drop=True, count=1)
            world.kube.inject_fault(r"/spiderippools/pool-b/status$", method="PUT", status=429)

    rec = _reconciler(world, out, metrics)
    rep = rec.run_once()
    assert rep.error is None and rep.converged, rep.error
    assert sorted(applied(rep)) == [
        "create NetworkAttachmentDefinition kube-system/net-a",
        "create OvsBridge br1",
        "create SpiderIPPool pool-a",
        "create SpiderIPPool pool-b",
        "create SpiderMultusConfig kube-system/net-a",
    ]
    assert world.kube.faults() == [], "every fault was hit"
    nad = world.get(vocab.NETWORK_ATTACHMENT_DEFINITION, "net-a", "kube-system")
    smc = world.get(vocab.SPIDER_MULTUS_CONFIG, "net-a", "kube-system")
    assert nad is not None and smc is not None
    assert [r["uid"] for r in nad["metadata"]["ownerReferences"]] == [smc["metadata"]["uid"]]
    pool_b = world.get(vocab.SPIDER_IPPOOL, "pool-b")
    assert pool_b is not None and pool_b["status"]["totalIPCount"] == 11
    _no_orphans(world)
    retried = {k[0]: v for k, v in metrics.retries.values.items()}
    assert {"ReadTimeoutError", "503", "ProtocolError", "429"} <= set(retried)
    assert 'underlay_api_retries_total{reason="503"} 1' in metrics.render()
    world.kube.reset_requests()
    assert rec.run_once().outcome is None
    assert world.writes() == []


def test_exhausted_retries_leave_no_orphan_and_the_next_pass_converges(world: World) -> None:
    world.commit(QUICK)
    metrics = ReconcilerMetrics()

    def out(line: str) -> None:
        if line == "created SpiderIPPool pool-a":
            world.kube.inject_fault(
                r"/spidermultusconfigs/net-a$", method="PATCH", status=500, count=100
            )

    rec = _reconciler(world, out, metrics)
    rep = rec.run_once()
    assert rep.reason == "ApplyFailed" and rep.outcome is not None
    assert [a.ref() for a, _ in rep.outcome.failed] == ["SpiderMultusConfig kube-system/net-a"]
    # its NAD is not written without its owner
    assert [(a.ref(), why) for a, why in rep.outcome.skipped] == [
        (
            "NetworkAttachmentDefinition kube-system/net-a",
            "its owner SpiderMultusConfig net-a was not applied",
        )
    ]
    assert world.get(vocab.NETWORK_ATTACHMENT_DEFINITION, "net-a", "kube-system") is None
    _no_orphans(world)
    ready = world.condition("Ready")
    assert (
        ready["reason"] == "ApplyFailed"
        and "SpiderMultusConfig kube-system/net-a" in ready["message"]
    )
    assert world.condition("Reconciling")["reason"] == "ProgressingWithRetry"
    assert metrics.passes.get(result="failure") == 1
    world.kube.clear_faults()
    rep = rec.run_once()
    assert rep.converged
    _no_orphans(world)
    assert len(world.labelled()) == 4
    assert metrics.passes.get(result="success") == 1
