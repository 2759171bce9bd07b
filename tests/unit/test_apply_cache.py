"""The reconciler's LIST+WATCH cache against the real control plane (as the reconciler's
ServiceAccount, through the fault proxy): it follows other clients' changes, resumes after the
server's 410 Expired with a fresh LIST, reports a missing CRD until it is installed, and never
lets an older event replace a newer object this process wrote."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler import vocab
from reconciler.cache import ObjectCache
from reconciler.controller import OBSERVED
from tests.controlplane.cluster import Kube
from tests.unit.test_apply import delete_crd

ROOT = Path(__file__).resolve().parents[2]


def wait_for(pred: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := pred():
            return v
        time.sleep(0.02)
    raise AssertionError("timed out")


def pool(name: str, third: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": vocab.SPIDERPOOL_API_VERSION,
        "kind": "SpiderIPPool",
        "metadata": {"name": name},
        "spec": {"subnet": f"10.{third}.0.0/24", "ips": [f"10.{third}.0.10"]},
    }


SMC_CRD = "spidermultusconfigs.spiderpool.spidernet.io"
POOL_CRD = "spiderippools.spiderpool.spidernet.io"


@pytest.fixture
def cache_api(kube: Kube, tmp_path: Path) -> Any:
    """The reconciler's ServiceAccount through the test's fault proxy."""
    return kube.api_client(kube.reconciler_kubeconfig(tmp_path / "reconciler.kubeconfig"))


def test_follows_changes_relists_after_410_and_finds_a_late_crd(kube: Kube, cache_api: Any) -> None:
    delete_crd(kube.api, SMC_CRD)  # installed again below, and by the fixture's reset
    pools = _pools(kube)
    pools.create(pool("before"))
    cache = ObjectCache(cache_api, OBSERVED, timeout_seconds=1, retry=0.2)
    cache.start()
    try:
        assert cache.wait_synced(10)
        objs, missing = cache.snapshot()
        assert ("SpiderIPPool", None, "before") in objs
        assert missing == [vocab.SPIDER_MULTUS_CONFIG]
        lists = cache.lists
        # other clients' creates, updates and deletes arrive through the watch, no LIST
        pools.create(pool("after", 2))
        live = pools.get("before")
        live["spec"]["ips"] = ["10.1.0.11"]
        pools.api.replace_cluster_custom_object(
            "spiderpool.spidernet.io", "v2beta1", "spiderippools", "before", live
        )
        wait_for(lambda: ("SpiderIPPool", None, "after") in cache.snapshot()[0])
        wait_for(
            lambda: (
                cache.snapshot()[0][("SpiderIPPool", None, "before")]["spec"]["ips"]
                == ["10.1.0.11"]
            )
        )
        pools.delete("after")
        wait_for(lambda: ("SpiderIPPool", None, "after") not in cache.snapshot()[0])
        assert cache.lists == lists, "events, not lists"
        expired = cache.expired
        # the watch ends (timeout 1 s) and its resume is held up by the proxy; meanwhile the
        # pool CRD is deleted and installed again (the server's watch cache of pools starts
        # over, at a later resourceVersion) and a pool is created: the held resume asks for a
        # resourceVersion the server calls too old (410 Expired), and a fresh LIST finds the
        # pool (and no longer the pools that went with the old CRD)
        kube.inject_fault(r"/spiderippools$", method="GET", hang=4.0)
        wait_for(lambda: not kube.faults(), 5)  # taken: the resume is held
        delete_crd(kube.api, POOL_CRD)
        kube.cp.install()
        _pools(kube).create(pool("during", 3))
        wait_for(lambda: ("SpiderIPPool", None, "during") in cache.snapshot()[0], 20)
        assert ("SpiderIPPool", None, "before") not in cache.snapshot()[0]
        assert cache.expired > expired, "the server's 410 Expired, not a failure"
        assert cache.lists >= lists + 1  # the 410 made a fresh LIST (a loaded machine may add one)
        # the Multus config CRD, installed above, is found at the next retry
        wait_for(lambda: cache.snapshot()[1] == [], 10)
    finally:
        cache.stop()


def test_a_watch_answered_with_410_lists_again_at_once(kube: Kube, cache_api: Any) -> None:
    """The proxy answers the resume of a watch with the ERROR event a server sends when the
    resourceVersion is older than its history (after etcd compaction): the cache lists again
    at once, as for the server's own 410, instead of backing off as after an error."""
    cache = ObjectCache(cache_api, OBSERVED, timeout_seconds=1, retry=30)
    cache.start()
    try:
        assert cache.wait_synced(10)
        lists, expired = cache.lists, cache.expired
        kube.inject_fault(r"/spiderippools$", method="GET", gone=True, hang=0.5)
        wait_for(lambda: not kube.faults(), 5)
        _pools(kube).create(pool("later", 4))
        wait_for(lambda: ("SpiderIPPool", None, "later") in cache.snapshot()[0], 10)
        assert cache.expired == expired + 1 and cache.lists >= lists + 1
        kind = cache.kinds["SpiderIPPool"]
        assert kind.error is None
    finally:
        cache.stop()


def _pools(kube: Kube) -> Any:
    from reconciler import kube as rk

    return rk.Objects(kube.api, vocab.SPIDER_IPPOOL)


def test_own_writes_win_over_older_events(kube: Kube, cache_api: Any) -> None:
    delete_crd(kube.api, SMC_CRD)
    cache = ObjectCache(cache_api, OBSERVED, retry=0.2)
    cache.start()
    try:
        assert cache.wait_synced(10)
        pools = _pools(kube)
        first = pools.create(pool("p"))
        body = copy.deepcopy(first)
        body["spec"]["ips"] = ["10.1.0.12"]
        second = pools.api.replace_cluster_custom_object(
            "spiderpool.spidernet.io", "v2beta1", "spiderippools", "p", body
        )
        key = ("SpiderIPPool", None, "p")
        cache.record(second)
        cache.record(copy.deepcopy(first))  # an older version arriving late is ignored
        assert cache.snapshot()[0][key]["spec"]["ips"] == ["10.1.0.12"]
        pools.delete("p")
        cache.forget(key, second)
        cache.record(copy.deepcopy(second))  # a stale event after our delete: still gone
        assert key not in cache.snapshot()[0]
        time.sleep(0.3)
        assert key not in cache.snapshot()[0], "the DELETED event keeps it gone"
        assert cache.snapshot()[1] == [vocab.SPIDER_MULTUS_CONFIG]
    finally:
        cache.stop()


def test_our_write_recorded_after_someone_deleted_the_object_does_not_bring_it_back(
    kube: Kube, cache_api: Any
) -> None:
    """The reconciler records the answer to its own write after the write; if someone deleted
    the object in between and the watch already delivered the DELETED, recording the older
    answer must not put it back (it did: the deleted object stayed in the cache, so the
    reconciler never re-created it; found in a loaded CI run)."""
    pools = _pools(kube)
    cache = ObjectCache(cache_api, OBSERVED, timeout_seconds=30)
    cache.start()
    try:
        assert cache.wait_synced(10)
        answer = pools.create(pool("mine"))  # our write; its answer is recorded later
        key = ("SpiderIPPool", None, "mine")
        wait_for(lambda: key in cache.snapshot()[0])
        pools.delete("mine")  # someone else, before the answer is recorded
        wait_for(lambda: key not in cache.snapshot()[0])
        cache.record(answer)
        assert key not in cache.snapshot()[0]
        # a write whose answer is newer than anything the watch saw is recorded as usual
        fresh = pools.create(pool("fresh", 2))
        cache.record(fresh)
        assert cache.snapshot()[0][("SpiderIPPool", None, "fresh")] is not None
    finally:
        cache.stop()
