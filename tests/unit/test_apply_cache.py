"""The reconciler's LIST+WATCH cache against the API emulator: it follows other clients'
changes, resumes after 410 Gone with a fresh LIST, reports a missing CRD until it is installed,
and never lets an older event replace a newer object this process wrote."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler import kube, vocab
from reconciler.cache import ObjectCache
from reconciler.controller import OBSERVED
from tests.kube.emulator import Emulator

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


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[Emulator]:
    e = Emulator()
    e.start()
    e.write_kubeconfig(tmp_path / "kubeconfig")
    e.install_crds(
        [p for p in sorted((ROOT / "deploy/crds").glob("*.yaml")) if "spidermultus" not in p.name]
    )
    try:
        yield e
    finally:
        e.stop()


def test_follows_changes_relists_after_410_and_finds_a_late_crd(emu: Emulator) -> None:
    api = emu.api_client()
    pools = kube.Objects(api, vocab.SPIDER_IPPOOL)
    pools.create(pool("before"))
    cache = ObjectCache(
        kube.api_client(str(emu.kubeconfig)), OBSERVED, timeout_seconds=1, retry=0.2
    )
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
        kube.Objects(api, vocab.SPIDER_IPPOOL).api.replace_cluster_custom_object(
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
        # the watch ends (timeout 1 s) and its resume is held up; meanwhile a pool is created
        # and the history compacted: the resume gets 410 Gone, and a fresh LIST finds the pool
        emu.inject_fault(r"/spiderippools$", method="GET", hang=1.0)
        wait_for(lambda: emu.open_watches("spiderippools") == 0, 5)
        pools.create(pool("during", 3))
        emu.compact()
        wait_for(lambda: ("SpiderIPPool", None, "during") in cache.snapshot()[0], 10)
        assert cache.lists >= lists + 1  # the 410 made a fresh LIST (a loaded machine may add one)
        # the CRD installed later is found at the next retry
        emu.install_crds([ROOT / "deploy/crds/spidermultusconfigs.spiderpool.spidernet.io.yaml"])
        wait_for(lambda: cache.snapshot()[1] == [], 10)
    finally:
        cache.stop()


def test_own_writes_win_over_older_events(emu: Emulator) -> None:
    cache = ObjectCache(emu.api_client(), OBSERVED, retry=0.2)
    cache.start()
    try:
        assert cache.wait_synced(10)
        pools = kube.Objects(emu.api_client(), vocab.SPIDER_IPPOOL)
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
    emu: Emulator,
) -> None:
    """The reconciler records the answer to its own write after the write; if someone deleted
    the object in between and the watch already delivered the DELETED, recording the older
    answer must not put it back (it did: the deleted object stayed in the cache, so the
    reconciler never re-created it; found in a loaded CI run)."""
    api = emu.api_client()
    pools = kube.Objects(api, vocab.SPIDER_IPPOOL)
    cache = ObjectCache(kube.api_client(str(emu.kubeconfig)), OBSERVED, timeout_seconds=30)
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
