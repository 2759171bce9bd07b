"""Property-based tests (hypothesis): random valid SpiderIPPools.

- a random valid pool (IPv4 or IPv6 unicast subnet, disjoint ranges of at most 5,000
  addresses in all, excludes, gateway, routes through a router that is not a pod address)
  validates clean, and stays valid and equal after load -> dump -> load;
- breaking its subnet's canonical form is reported at the subnet's line and column;
- the cross-pool overlap sweep finds exactly the pairs a brute-force netaddr.IPSet check finds.
"""

from __future__ import annotations

from typing import Any

import netaddr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.loader import dump_yaml, load_text
from reconciler.rules_ippool import MAX_POOL_RECORDS, RESERVED_BLOCKS
from reconciler.validation import validate

NAME = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")


def _address(net: netaddr.IPNetwork, offset: int, full: bool) -> str:
    ip = netaddr.IPAddress(net.first + offset, net.version)
    if full and ip.version == 6:
        return ip.format(netaddr.ipv6_full)  # non-canonical spellings are fine in ips
    return str(ip)


@st.composite
def subnets(draw: st.DrawFn) -> netaddr.IPNetwork:
    version = draw(st.sampled_from([4, 6]))
    prefix = draw(st.integers(8, 28) if version == 4 else st.integers(64, 124))
    # pods need unicast addresses (subnet-reserved): IPv4 1-126 and 128-223 outside
    # 169/8 (a /8 there would hold 169.254/16); IPv6 2000::/3 (global) and fc00::/7 (ULA)
    if version == 4:
        value = draw(st.integers(0x01000000, 0x7EFFFFFF) | st.integers(0x80000000, 0xDFFFFFFF))
        if value >> 24 == 169:
            value ^= 1 << 24  # 169/8 -> 168/8
    else:
        value = draw(
            st.integers(0x2000 << 112, (0x4000 << 112) - 1)
            | st.integers(0xFC00 << 112, (0xFE00 << 112) - 1)
        )
    net = netaddr.IPNetwork((value, prefix), version=version).cidr
    assert not any(
        b.version == version and b.first <= net.last and net.first <= b.last
        for b, _what in RESERVED_BLOCKS
    )
    return net


@st.composite
def pools(draw: st.DrawFn, net: netaddr.IPNetwork | None = None) -> dict[str, Any]:
    net = net if net is not None else draw(subnets())
    size = net.size
    # disjoint ranges inside the subnet: sorted distinct offsets taken in pairs
    cuts = sorted(
        draw(
            st.sets(st.integers(1, size - 2), min_size=2, max_size=8).filter(
                lambda s: len(s) % 2 == 0
            )
        )
    )
    full = draw(st.booleans())
    # at most 4 ranges of 1,000 addresses: within Spiderpool's 5,000 records (pool-too-large)
    ranges = [(cuts[i], min(cuts[i + 1], cuts[i] + 999)) for i in range(0, len(cuts), 2)]
    assert sum(b - a + 1 for a, b in ranges) <= MAX_POOL_RECORDS
    ips = [
        _address(net, a, full) if a == b else f"{_address(net, a, full)}-{_address(net, b, full)}"
        for a, b in ranges
    ]
    spec: dict[str, Any] = {"subnet": str(net), "ips": ips}
    excludes: list[str] = []
    for a, b in ranges:
        if draw(st.booleans()):
            lo = draw(st.integers(a, b))
            hi = draw(st.integers(lo, b))
            excludes.append(
                _address(net, lo, False)
                if lo == hi
                else f"{_address(net, lo, False)}-{_address(net, hi, False)}"
            )
    gateway_offset = draw(st.integers(1, size - 2))
    if draw(st.booleans()):
        spec["gateway"] = _address(net, gateway_offset, False)
        if any(a <= gateway_offset <= b for a, b in ranges):
            excludes.append(spec["gateway"])  # a gateway inside ips must be excluded
    routes = []
    for dst in draw(st.lists(subnets(), max_size=3)):
        if dst.version != net.version or dst.prefixlen == 0 or dst == net:
            continue  # no default route (use gateway), no route to the pool's own subnet
        if any(r["dst"] == str(dst) for r in routes):
            continue
        gw_offset = draw(st.integers(1, size - 2))
        routes.append({"dst": str(dst), "gw": _address(net, gw_offset, False)})
        if any(a <= gw_offset <= b for a, b in ranges):
            excludes.append(routes[-1]["gw"])  # a router is not a pod: keep it out of IPAM
    if excludes:
        # excluded entries may overlap each other only if distinct; keep one per address run
        merged = netaddr.IPSet()
        unique = []
        for e in excludes:
            first, _, last = e.partition("-")
            r = netaddr.IPRange(first, last or first)
            if not any(ip in merged for ip in (r[0], r[-1])) and not (merged & netaddr.IPSet(r)):
                unique.append(e)
                merged.add(r)
        spec["excludeIPs"] = unique
    if draw(st.booleans()):
        spec["ipVersion"] = net.version
    if routes:
        spec["routes"] = routes
    if draw(st.booleans()):
        spec["default"] = draw(st.booleans())
    return {
        "apiVersion": "spiderpool.spidernet.io/v2beta1",
        "kind": "SpiderIPPool",
        "metadata": {"name": draw(NAME)},
        "spec": spec,
    }


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(pools())
def test_random_valid_pool_is_clean_and_round_trips(pool: dict[str, Any]) -> None:
    first = load_text(dump_yaml([pool]), "pool.yaml")
    assert first.problems == []
    assert validate(first.documents) == []
    (doc,) = first.documents
    assert doc.obj == pool
    second = load_text(dump_yaml([doc.obj]), "again.yaml")
    assert second.problems == [] and validate(second.documents) == []
    assert second.documents[0].obj == pool
    assert dump_yaml([second.documents[0].obj]) == dump_yaml([pool])


@SETTINGS
@given(pools(), st.integers(1, 2**16))
def test_host_bits_in_subnet_are_reported_at_the_subnet(pool: dict[str, Any], host: int) -> None:
    net = netaddr.IPNetwork(pool["spec"]["subnet"])
    host = host % (net.size - 1) + 1
    pool["spec"]["subnet"] = f"{netaddr.IPAddress(net.first + host, net.version)}/{net.prefixlen}"
    (doc,) = load_text(dump_yaml([pool]), "p.yaml").documents
    problems = validate([doc])
    assert [p.rule for p in problems] == ["subnet-not-canonical"]
    assert (problems[0].line, problems[0].column) == doc.mark(("spec", "subnet"))
    assert problems[0].hint == f"write {net}"


@st.composite
def pool_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    net = draw(subnets().filter(lambda n: n.size >= 64))
    out = []
    for i in range(draw(st.integers(2, 6))):
        pool = draw(pools(net))
        pool["metadata"]["name"] = f"pool-{i}"
        pool["spec"].pop("gateway", None)
        pool["spec"].pop("excludeIPs", None)
        pool["spec"].pop("routes", None)  # a router of one pool may be a pod address of another
        out.append(pool)
    return out


def _ipset(pool: dict[str, Any]) -> netaddr.IPSet:
    s = netaddr.IPSet()
    for entry in pool["spec"]["ips"]:
        first, _, last = entry.partition("-")
        s.add(netaddr.IPRange(first, last or first))
    return s


@SETTINGS
@given(pool_sets())
def test_overlap_sweep_matches_brute_force(pools_: list[dict[str, Any]]) -> None:
    res = load_text(dump_yaml(pools_), "pools.yaml")
    problems = validate(res.documents)
    found = set()
    for p in problems:
        assert p.rule == "ip-overlap", p.format()
        other = p.message.split(" of SpiderIPPool ")[1].split(" ")[0]
        found.add(frozenset((p.name, other)))
    sets = [_ipset(p) for p in pools_]
    expected = {
        frozenset((pools_[i]["metadata"]["name"], pools_[j]["metadata"]["name"]))
        for i in range(len(sets))
        for j in range(i + 1, len(sets))
        if sets[i] & sets[j]
    }
    assert found == expected
