"""Overlapping SpiderIPPools never hand out one address twice (the IPAM's own guarantee).

Spiderpool refuses pools whose ``spec.ips`` overlap in its admission webhook; underlay has
none, so such pools exist (made by hand, by another reconciler instance, or a pool renamed in
Git whose old copy is kept while it has allocations). The IPAM then hands out no address that
another pool of the family covers (its ``ips - excludeIPs`` or its ``status.allocatedIPs``),
keeps a pod's own address on a retried ADD, and says which pools and ranges overlap when a pool
has nothing left. Real ``Ipam`` engines (each with its own ``kubernetes`` client, as agents on
different nodes) and two agent processes served through the installed shim, as the agent's
ServiceAccount against the real control plane (tests/controlplane), through the test's proxy.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import netaddr
import pytest
from node_agent.cni.errors import CniError
from node_agent.ipam import Ipam

from reconciler.ippool import allocated_ips
from tests.integration.test_ipam_kube import Cluster, cluster, req, start_cni_agents
from tests.ipamload import run_ipam_shim

__all__ = ["cluster"]  # the fixture, shared with test_ipam_kube
LIST_POOLS = r"/spiderippools$"


def lists(c: Cluster) -> int:
    """LIST requests of every SpiderIPPool the agents under test made (through the proxy)."""
    return len(c.kube.requests("GET", LIST_POOLS))


def records(c: Cluster, pool: str) -> dict[str, dict[str, Any]]:
    return allocated_ips(c.status(pool))


def in_range(ip: str, first: str, last: str) -> bool:
    return netaddr.IPAddress(ip) in netaddr.IPRange(first, last)


def engine(c: Cluster, node: str, **kw: Any) -> Ipam:
    """An engine with its own API client, as the agent of ``node`` has."""
    c.node(node)
    return Ipam(c.agent_client(), node, **kw)


def test_two_overlapping_pools_never_give_one_address_twice(cluster: Cluster) -> None:
    """pool-a 131-140 and pool-b 136-145, served by agents on two nodes: the shared 136-140
    goes to nobody, each pool hands out its own part, then says what overlaps; one LIST of the
    pools per agent, not one per ADD."""
    cluster.pool("pool-a", ips="172.18.30.131-172.18.30.140")
    cluster.pool("pool-b", ips="172.18.30.136-172.18.30.145")
    e1, e2 = engine(cluster, "n1"), engine(cluster, "n2")
    got: dict[str, str] = {}
    for i in range(10):
        pool, eng = ("pool-a", e1) if i % 2 == 0 else ("pool-b", e2)
        name = f"p{i}"
        got[name] = eng.allocate(req(name, cluster.pod(name), default_ipv4_ippool=[pool]))[0].ip
    assert len(set(got.values())) == 10
    a, b = records(cluster, "pool-a"), records(cluster, "pool-b")
    assert sorted(a, key=netaddr.IPAddress) == [f"172.18.30.{n}" for n in range(131, 136)]
    assert sorted(b, key=netaddr.IPAddress) == [f"172.18.30.{n}" for n in range(141, 146)]
    assert not set(a) & set(b)
    for pool, other, eng in (("pool-a", "pool-b", e1), ("pool-b", "pool-a", e2)):
        uid = cluster.pod(f"x-{pool}")
        with pytest.raises(CniError) as e:
            eng.allocate(req(f"x-{pool}", uid, default_ipv4_ippool=[pool]))
        assert e.value.code == 101
        assert (
            f"SpiderIPPool {pool}: 172.18.30.136-172.18.30.140 are also in SpiderIPPool {other}"
            in e.value.msg
        ), e.value.msg
        assert "the other 5 of its 10 IPs are taken (5 allocation records)" in e.value.msg
        assert cluster.endpoint(f"x-{pool}") is None
    assert (e1.index_refreshes, e2.index_refreshes) == (1, 1)
    assert lists(cluster) == 2
    # releasing gives the address back to its own pool only
    e1.release(req("p0", a["172.18.30.131"]["podUid"]))
    uid = cluster.pod("again")
    assert e2.allocate(req("again", uid, default_ipv4_ippool=["pool-a"]))[0].ip == "172.18.30.131"


def test_concurrent_adds_on_two_nodes_into_overlapping_pools(cluster: Cluster) -> None:
    """Two engines race, each alternating between two pools that share 172.18.31.50-99: every
    address distinct, none from the shared range, and each pool's records are its own."""
    cluster.pool("left", ips="172.18.31.0-172.18.31.99")
    cluster.pool("right", ips="172.18.31.50-172.18.31.149")
    engines = [engine(cluster, "n1"), engine(cluster, "n2")]
    uids = cluster.pods([f"p{i}" for i in range(60)])
    got: dict[str, str] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(k, 60, 2):
                pool = "left" if (i // 2) % 2 == 0 else "right"
                name = f"p{i}"
                got[name] = (
                    engines[k].allocate(req(name, uids[name], default_ipv4_ippool=[pool]))[0].ip
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(got) == 60 and len(set(got.values())) == 60
    assert not [ip for ip in got.values() if in_range(ip, "172.18.31.50", "172.18.31.99")]
    left, right = records(cluster, "left"), records(cluster, "right")
    assert not set(left) & set(right)
    assert set(left) | set(right) == set(got.values())
    assert all(in_range(ip, "172.18.31.0", "172.18.31.49") for ip in left)
    assert all(in_range(ip, "172.18.31.100", "172.18.31.149") for ip in right)


def test_two_agent_processes_through_the_shim(cluster: Cluster, tmp_path: Path) -> None:
    """60 concurrent ADDs through the underlay-ipam shim of two agent processes, into two
    pools sharing 172.18.32.20-39: distinct addresses outside the shared range; then DEL."""
    cluster.pool("one", ips="172.18.32.0-172.18.32.39")
    cluster.pool("two", ips="172.18.32.20-172.18.32.79")
    pods = list(cluster.pods([f"c{i}" for i in range(60)]).items())
    agents = start_cni_agents(cluster, tmp_path)
    results: dict[str, tuple[int, bytes]] = {}

    def call(i: int, command: str) -> None:
        name, uid = pods[i]
        conf = {
            "cniVersion": "1.0.0",
            "name": "macvlan-conf",
            "type": "macvlan",
            "ipam": {"type": "underlay-ipam", "default_ipv4_ippool": ["one" if i < 30 else "two"]},
        }
        results[name] = run_ipam_shim(agents[i % 2].bin_dir, conf, command, f"cid{i}", name, uid)

    try:
        for command in ("ADD", "DEL"):
            results.clear()
            threads = [threading.Thread(target=call, args=(i, command)) for i in range(60)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if command == "ADD":
                # "one" has 20 addresses of its own (0-19): 10 of its 30 pods find none
                ok = {n: json.loads(out)["ips"][0]["address"] for n, (rc, out) in results.items() if rc == 0}  # fmt: skip
                failed = {n: json.loads(out) for n, (rc, out) in results.items() if rc != 0}
                assert len(ok) == 50 and len(set(ok.values())) == 50
                assert sorted(failed) == sorted(f"c{i}" for i in range(30) if f"c{i}" not in ok)
                assert all(
                    f["code"] == 101
                    and "SpiderIPPool one: 172.18.32.20-172.18.32.39 are also in SpiderIPPool two"
                    in f["msg"]
                    for f in failed.values()
                ), list(failed.values())[:2]
                ips = [a.split("/")[0] for a in ok.values()]
                assert not [ip for ip in ips if in_range(ip, "172.18.32.20", "172.18.32.39")]
                one, two = records(cluster, "one"), records(cluster, "two")
                assert len(one) == 20 and len(two) == 30 and not set(one) & set(two)
                assert set(one) | set(two) == set(ips)
            else:
                assert all(rc == 0 for rc, _ in results.values())
                assert records(cluster, "one") == {} and records(cluster, "two") == {}
    finally:
        for agent in agents:
            agent.stop()


def test_pool_covered_by_another_fails_with_a_clear_error(cluster: Cluster) -> None:
    """A pool inside another hands out nothing and names the other pool and the range; the
    outer pool skips the inner range. An address recorded in a pool's status outside its
    spec.ips (the pool was shrunk by hand) covers it too."""
    cluster.pool("outer", ips="172.18.30.131-172.18.30.140")
    cluster.pool("inner", ips="172.18.30.133-172.18.30.135")
    eng = engine(cluster, "n1")
    uid = cluster.pod("p0")
    with pytest.raises(CniError) as e:
        eng.allocate(req("p0", uid, default_ipv4_ippool=["inner"]))
    assert e.value.code == 101
    assert e.value.msg.startswith(
        "IP pool exhausted: SpiderIPPool inner: 172.18.30.133-172.18.30.135 are also in "
        "SpiderIPPool outer; an address that another SpiderIPPool covers is never handed out"
    ), e.value.msg
    assert "default/p0" in e.value.msg
    assert records(cluster, "inner") == {} and cluster.endpoint("p0") is None
    got = [
        eng.allocate(req(n, cluster.pod(n), default_ipv4_ippool=["outer"]))[0].ip
        for n in ("p1", "p2", "p3")
    ]
    assert got == ["172.18.30.131", "172.18.30.132", "172.18.30.136"]

    # "outer" shrunk by hand to 132-140 keeps its record of 131: "edge" (131) is covered by it
    cluster.pools.merge_patch("outer", None, {"spec": {"ips": ["172.18.30.132-172.18.30.140"]}})
    cluster.pool("edge", ips="172.18.30.131")
    uid = cluster.pod("p4")
    with pytest.raises(CniError) as e:
        eng.allocate(req("p4", uid, default_ipv4_ippool=["edge"]))
    assert "SpiderIPPool edge: 172.18.30.131 is also in SpiderIPPool outer" in e.value.msg


def test_retried_add_keeps_its_address_in_the_overlap(cluster: Cluster) -> None:
    """A pod holding an address that a pool created later also covers gets it again on a
    retried ADD (on either node) and on the ADD of a new sandbox; the new pool gives nothing
    of the overlap to anyone."""
    cluster.pool("pool-a", ips="172.18.30.131-172.18.30.140")
    eng = engine(cluster, "n1")
    uid = cluster.pod("p1")
    assert eng.allocate(req("p1", uid, default_ipv4_ippool=["pool-a"]))[0].ip == "172.18.30.131"
    cluster.pool("pool-b", ips="172.18.30.131-172.18.30.135")
    other = engine(cluster, "n2")
    uid2 = cluster.pod("p2")
    with pytest.raises(CniError) as e:  # pool-b lies inside pool-a
        other.allocate(req("p2", uid2, default_ipv4_ippool=["pool-b"]))
    assert "SpiderIPPool pool-b: 172.18.30.131-172.18.30.135 are also in SpiderIPPool pool-a" in (
        e.value.msg
    )
    for eng_, cid in ((eng, "cid-p1"), (other, "cid-p1"), (eng, "sandbox-2")):
        r = req("p1", uid, default_ipv4_ippool=["pool-a"])
        r.container_id = cid
        assert eng_.allocate(r)[0].ip == "172.18.30.131"
    # n2 listed the pools after pool-b was made: pool-a's ADDs there skip pool-b's range
    assert other.allocate(req("p2", uid2, default_ipv4_ippool=["pool-a"]))[0].ip == (
        "172.18.30.136"
    )
    assert {ip: r["podUid"] for ip, r in records(cluster, "pool-a").items()} == {
        "172.18.30.131": uid,
        "172.18.30.136": uid2,
    }
    assert records(cluster, "pool-b") == {}
    ep = cluster.endpoint("p1")
    assert ep is not None and ep["status"]["current"]["ips"][0]["containerID"] == "sandbox-2"


def test_new_overlapping_pool_created_after_the_index_is_seen(cluster: Cluster) -> None:
    """The index of pools is reused for an hour here: a pool created after it was listed is
    not in it, so its first ADD lists again and sees the older pool; the older pool's ADDs
    then see the new one too."""
    cluster.pool("old", ips="172.18.30.131-172.18.30.140")
    eng = engine(cluster, "n1", gateway_ttl=3600)
    assert eng.allocate(req("p1", cluster.pod("p1"), default_ipv4_ippool=["old"]))[0].ip == (
        "172.18.30.131"
    )
    assert lists(cluster) == 1
    cluster.pool("new", ips="172.18.30.136-172.18.30.145")
    got = [
        eng.allocate(req(n, cluster.pod(n), default_ipv4_ippool=["new"]))[0].ip
        for n in ("q1", "q2")
    ]
    assert got == ["172.18.30.141", "172.18.30.142"]
    assert lists(cluster) == 2
    got = [
        eng.allocate(req(n, cluster.pod(n), default_ipv4_ippool=["old"]))[0].ip
        for n in ("p2", "p3", "p4", "p5")
    ]
    assert got == ["172.18.30.132", "172.18.30.133", "172.18.30.134", "172.18.30.135"]
    with pytest.raises(CniError) as e:
        eng.allocate(req("p6", cluster.pod("p6"), default_ipv4_ippool=["old"]))
    assert "SpiderIPPool old: 172.18.30.136-172.18.30.140 are also in SpiderIPPool new" in (
        e.value.msg
    )
    assert lists(cluster) == 2  # steady state: no LIST per ADD


def test_pool_grown_into_a_newer_pool_is_seen_at_once(cluster: Cluster) -> None:
    """Agent n2 listed the pools before pool "mid" existed; agent n1 hands out 136 from "mid";
    then "low" is edited to grow over 136-140. n2's next ADD from "low" sees the new
    generation of "low", lists again, and skips mid's range (its index would otherwise be
    trusted for an hour)."""
    cluster.pool("low", ips="172.18.30.131-172.18.30.135")
    cluster.pool("high", ips="172.18.30.141-172.18.30.145")
    e1 = engine(cluster, "n1", gateway_ttl=3600)
    e2 = engine(cluster, "n2", gateway_ttl=3600)
    assert e2.allocate(req("p1", cluster.pod("p1"), default_ipv4_ippool=["low"]))[0].ip == (
        "172.18.30.131"
    )
    cluster.pool("mid", ips="172.18.30.136-172.18.30.140")
    assert e1.allocate(req("m1", cluster.pod("m1"), default_ipv4_ippool=["mid"]))[0].ip == (
        "172.18.30.136"
    )
    grown = cluster.pools.merge_patch(
        "low", None, {"spec": {"ips": ["172.18.30.131-172.18.30.140"]}}
    )
    assert grown["metadata"]["generation"] == 2
    before = e2.index_refreshes
    got = [
        e2.allocate(req(n, cluster.pod(n), default_ipv4_ippool=["low"]))[0].ip
        for n in ("p2", "p3", "p4", "p5")
    ]
    assert got == ["172.18.30.132", "172.18.30.133", "172.18.30.134", "172.18.30.135"]
    assert e2.index_refreshes == before + 1
    with pytest.raises(CniError) as e:
        e2.allocate(req("p6", cluster.pod("p6"), default_ipv4_ippool=["low"]))
    assert "SpiderIPPool low: 172.18.30.136-172.18.30.140 are also in SpiderIPPool mid" in (
        e.value.msg
    )
    assert set(records(cluster, "mid")) == {"172.18.30.136"}
    assert not set(records(cluster, "low")) & set(records(cluster, "mid"))


def test_ipv6_pools_overlap_per_family(cluster: Cluster) -> None:
    """IPv6 pools are checked among IPv6 pools: a dual-stack pod gets fd00::20 from "v6-b"
    (fd00::18-1f are also in "v6-a") and the lowest IPv4 address, which no IPv6 pool can
    cover."""
    cluster.pool("v4", ips="172.18.30.131-172.18.30.140")
    for name, ips in (("v6-a", "fd00::10-fd00::1f"), ("v6-b", "fd00::18-fd00::27")):
        cluster.pool(name, ips=ips, subnet="fd00::/64", gateway="fd00::1", ipVersion=6)
    eng = engine(cluster, "n1")
    uid = cluster.pod("p1")
    got = eng.allocate(req("p1", uid, default_ipv4_ippool=["v4"], default_ipv6_ippool=["v6-b"]))
    assert [(a.pool, a.address) for a in got] == [
        ("v4", "172.18.30.131/16"),
        ("v6-b", "fd00::20/64"),
    ]
    uid = cluster.pod("p2")
    assert eng.allocate(req("p2", uid, default_ipv6_ippool=["v6-a"]))[0].ip == "fd00::10"
