"""IPAM pure logic: pool sets, lowest free IP, Spiderpool status records, pool choice, filters."""

from __future__ import annotations

import json
from typing import Any

import netaddr
import pytest
from hypothesis import given
from hypothesis import strategies as st
from node_agent import ipam
from node_agent.cni import errors
from node_agent.cni.errors import CniError

from reconciler import ippool

SPEC = {
    "subnet": "172.18.0.0/16",
    "ips": ["172.18.30.131-172.18.30.140"],
    "gateway": "172.18.0.1",
}


def pod(
    ns: str = "default",
    name: str = "p1",
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": ns,
            "name": name,
            "uid": "u1",
            "annotations": annotations or {},
            "labels": labels or {},
        }
    }


def pool(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {**SPEC, **spec}}


def no_ns() -> dict[str, Any]:
    return {}


def no_pools() -> list[dict[str, Any]]:
    return []


# --- sets and counts -------------------------------------------------------------------------
def test_pool_ips_ranges_minus_excludes() -> None:
    spec = {
        **SPEC,
        "ips": ["172.18.30.131-172.18.30.140", "172.18.30.150"],
        "excludeIPs": ["172.18.30.133-172.18.30.134"],
    }
    assert ippool.allocatable(spec).size == 9
    assert netaddr.IPAddress("172.18.30.133") not in ippool.allocatable(spec)
    assert netaddr.IPAddress("172.18.30.150") in ippool.allocatable(spec)


def test_ip_set_rejects_garbage_naming_entry() -> None:
    with pytest.raises(ValueError, match=r"172\.18\.30\.x"):
        ippool.ipset(["172.18.30.x"])


def test_pool_family_inferred_from_subnet() -> None:
    assert ipam.pool_family({"subnet": "fd00::/64"}) == 6
    assert ipam.pool_family({"subnet": "10.0.0.0/8"}) == 4
    assert ipam.pool_family({"subnet": "10.0.0.0/8", "ipVersion": 6}) == 6


# --- lowest free -----------------------------------------------------------------------------
def test_lowest_free_picks_lowest_and_skips_taken_and_excluded() -> None:
    assert ipam.lowest_free(SPEC, []) == "172.18.30.131"
    assert ipam.lowest_free(SPEC, ["172.18.30.131", "172.18.30.133"]) == "172.18.30.132"
    spec = {**SPEC, "excludeIPs": ["172.18.30.131"]}
    assert ipam.lowest_free(spec, []) == "172.18.30.132"


def test_lowest_free_never_returns_gateway() -> None:
    spec = {"subnet": "10.0.0.0/29", "ips": ["10.0.0.1-10.0.0.3"], "gateway": "10.0.0.1"}
    assert ipam.lowest_free(spec, []) == "10.0.0.2"


def test_lowest_free_full_pool_is_none() -> None:
    taken = [str(ip) for ip in netaddr.IPRange("172.18.30.131", "172.18.30.140")]
    assert ipam.lowest_free(SPEC, taken) is None


def test_lowest_free_ipv6() -> None:
    spec = {"subnet": "fd00::/64", "ips": ["fd00::10-fd00::12"]}
    assert ipam.lowest_free(spec, ["fd00::10"]) == "fd00::11"


@given(st.sets(st.integers(min_value=0, max_value=40)))
def test_lowest_free_is_minimum_of_free_set(taken_offsets: set[int]) -> None:
    spec = {"subnet": "10.1.0.0/24", "ips": ["10.1.0.10-10.1.0.40"], "excludeIPs": ["10.1.0.20"]}
    allowed = ippool.allocatable(spec)
    taken = [str(netaddr.IPAddress("10.1.0.0") + 10 + o) for o in taken_offsets]
    free = sorted(int(ip) for ip in allowed if str(ip) not in taken)
    got = ipam.lowest_free(spec, taken)
    assert got == (str(netaddr.IPAddress(free[0])) if free else None)


# --- Spiderpool status records ---------------------------------------------------------------
def test_status_is_spiderpool_format() -> None:
    records = {
        "172.18.30.132": {"pod": "default/b", "podUid": "u2"},
        "172.18.30.131": {"pod": "default/a", "podUid": "u1"},
    }
    status = ippool.pool_status(SPEC, records)
    assert isinstance(status["allocatedIPs"], str)
    assert json.loads(status["allocatedIPs"]) == records
    assert list(json.loads(status["allocatedIPs"])) == ["172.18.30.131", "172.18.30.132"]
    assert status["allocatedIPCount"] == 2
    assert status["totalIPCount"] == 10
    assert ippool.allocated_ips(status) == records


def test_empty_status_has_no_allocated_ips() -> None:
    status = ippool.pool_status(SPEC, {})
    assert "allocatedIPs" not in status
    assert status == {"allocatedIPCount": 0, "totalIPCount": 10}
    assert ippool.allocated_ips(status) == {}
    assert ippool.allocated_ips(None) == {}


def test_decode_rejects_non_object() -> None:
    with pytest.raises(ValueError):
        ippool.allocated_ips({"allocatedIPs": "[1, 2]"})


# --- label selectors -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("selector", "labels", "want"),
    [
        (None, {}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        (
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["x", "y"]}]},
            {"zone": "y"},
            True,
        ),
        ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["x"]}]}, {}, False),
        ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["x"]}]}, {}, True),
        ({"matchExpressions": [{"key": "zone", "operator": "Exists"}]}, {"zone": ""}, True),
        ({"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}, {"zone": "a"}, False),
    ],
)
def test_selector_matches(selector: Any, labels: dict[str, str], want: bool) -> None:
    assert ipam.selector_matches(selector, labels) is want


def test_selector_unknown_operator() -> None:
    with pytest.raises(ValueError, match="Gt"):
        ipam.selector_matches({"matchExpressions": [{"key": "a", "operator": "Gt"}]}, {})


# --- Multus networks -------------------------------------------------------------------------
def test_network_selections_short_and_json_forms() -> None:
    assert ipam.parse_network_selections("kube-system/macvlan@eth9, ovs-conf", "app") == [
        ("kube-system", "macvlan", "eth9"),
        ("app", "ovs-conf", "net2"),
    ]
    value = json.dumps([{"name": "a"}, {"name": "b", "namespace": "x", "interface": "n9"}])
    assert ipam.parse_network_selections(value, "app") == [("app", "a", "net1"), ("x", "b", "n9")]


def test_pod_network_per_interface() -> None:
    p = pod(ns="app", annotations={
        "v1.multus-cni.io/default-network": "ovs-conf",
        "k8s.v1.cni.cncf.io/networks": "kube-system/macvlan-conf, second",
    })  # fmt: skip
    assert ipam.pod_network(p, "eth0") == "kube-system/ovs-conf"
    assert ipam.pod_network(p, "net1") == "kube-system/macvlan-conf"
    assert ipam.pod_network(p, "net2") == "app/second"
    assert ipam.pod_network(p, "net3") is None
    assert ipam.pod_network(pod(), "eth0") is None


# --- pool choice -----------------------------------------------------------------------------
ALL_SOURCES = {
    "ipam.spidernet.io/ippools": json.dumps(
        [
            {"interface": "net1", "ipv4": ["from-ippools-net1"]},
            {"interface": "eth0", "ipv4": ["from-ippools"], "ipv6": ["v6-ippools"]},
        ]
    ),
    "ipam.spidernet.io/ippool": json.dumps({"ipv4": ["from-ippool"]}),
}
NS = {
    "metadata": {
        "name": "default",
        "annotations": {"ipam.spidernet.io/default-ipv4-ippool": '["from-ns"]'},
    }
}
CONF = {"default_ipv4_ippool": ["from-conf"]}
DEFAULT_POOLS = [
    pool("zz-default", default=True),
    pool("aa-default", default=True),
    pool("not-default"),
    {"metadata": {"name": "v6-default"}, "spec": {"subnet": "fd00::/64", "default": True}},
]


def test_choice_order_each_source_beats_the_next() -> None:
    c = ipam.choose_pools(
        pod(annotations=ALL_SOURCES), lambda: NS, CONF, "eth0", lambda: DEFAULT_POOLS
    )
    assert (c.v4, c.v6) == (["from-ippools"], ["v6-ippools"])
    assert "ipam.spidernet.io/ippools" in c.source
    c = ipam.choose_pools(
        pod(annotations=ALL_SOURCES), lambda: NS, CONF, "net1", lambda: DEFAULT_POOLS
    )
    assert c.v4 == ["from-ippools-net1"]
    only_ippool = {"ipam.spidernet.io/ippool": ALL_SOURCES["ipam.spidernet.io/ippool"]}
    c = ipam.choose_pools(
        pod(annotations=only_ippool), lambda: NS, CONF, "eth0", lambda: DEFAULT_POOLS
    )
    assert (c.v4, c.v6) == (["from-ippool"], [])
    c = ipam.choose_pools(pod(), lambda: NS, CONF, "eth0", lambda: DEFAULT_POOLS)
    assert c.v4 == ["from-ns"] and "namespace default" in c.source
    c = ipam.choose_pools(pod(), no_ns, CONF, "eth0", lambda: DEFAULT_POOLS)
    assert c.v4 == ["from-conf"]
    c = ipam.choose_pools(pod(), no_ns, {}, "eth0", lambda: DEFAULT_POOLS)
    assert (c.v4, c.v6) == (["aa-default", "zz-default"], ["v6-default"])


def test_choice_interface_missing_from_ippools_falls_through() -> None:
    annos = {"ipam.spidernet.io/ippools": json.dumps([{"interface": "net1", "ipv4": ["x"]}])}
    c = ipam.choose_pools(pod(annotations=annos), no_ns, CONF, "eth0", no_pools)
    assert c.v4 == ["from-conf"]


def test_choice_default_pools_listed_only_when_needed() -> None:
    def boom() -> list[dict[str, Any]]:
        raise AssertionError("listed pools although a default was configured")

    assert ipam.choose_pools(pod(), no_ns, CONF, "eth0", boom).v4 == ["from-conf"]


def test_no_pool_selected_says_where_it_looked() -> None:
    with pytest.raises(CniError) as e:
        ipam.choose_pools(pod(), no_ns, {}, "eth0", lambda: [pool("p", default=False)])
    assert e.value.code == errors.NO_POOL_SELECTED
    for looked in (
        "ipam.spidernet.io/ippools",
        "ipam.spidernet.io/ippool",
        "default-ipv4-ippool",
        "default_ipv4_ippool",
        "spec.default=true",
        "default/p1",
        "eth0",
    ):
        assert looked in e.value.msg


def test_malformed_annotation_is_invalid_config() -> None:
    with pytest.raises(CniError) as e:
        ipam.choose_pools(
            pod(annotations={"ipam.spidernet.io/ippool": "{not json"}), no_ns, {}, "eth0", no_pools
        )
    assert e.value.code == errors.INVALID_CONFIG
    assert "ipam.spidernet.io/ippool" in e.value.msg or "IP pool annotation" in e.value.msg


# --- filters ---------------------------------------------------------------------------------
def reject(
    p: dict[str, Any],
    family: int = 4,
    the_pod: dict[str, Any] | None = None,
    ifname: str = "eth0",
    node_labels: dict[str, str] | None = None,
    ns_labels: dict[str, str] | None = None,
) -> str | None:
    return ipam.pool_rejection(
        p, family, pod=the_pod or pod(), ifname=ifname, node_name="n1",
        node=lambda: {"metadata": {"labels": node_labels or {}}},
        namespace=lambda: {"metadata": {"labels": ns_labels or {}}},
    )  # fmt: skip


def test_filters() -> None:
    assert reject(pool("ok")) is None
    assert "disabled" in (reject(pool("d", disable=True)) or "")
    assert "IPv4 pool where an IPv6" in (reject(pool("f"), family=6) or "")
    assert "terminating" in (
        reject(
            {**pool("t"), "metadata": {"name": "t", "deletionTimestamp": "2024-01-01T00:00:00Z"}}
        )
        or ""
    )
    assert reject(pool("n", nodeName=["n1"])) is None
    assert "nodeName" in (reject(pool("n", nodeName=["n2"])) or "")
    aff = {"matchLabels": {"zone": "a"}}
    assert reject(pool("na", nodeAffinity=aff), node_labels={"zone": "a"}) is None
    assert "nodeAffinity" in (reject(pool("na", nodeAffinity=aff), node_labels={"zone": "b"}) or "")
    # nodeName beats nodeAffinity
    assert reject(pool("nb", nodeName=["n1"], nodeAffinity=aff), node_labels={"zone": "b"}) is None
    assert "namespaceName" in (reject(pool("ns", namespaceName=["other"])) or "")
    assert reject(pool("nsa", namespaceAffinity=aff), ns_labels={"zone": "a"}) is None
    assert "namespaceAffinity" in (reject(pool("nsa", namespaceAffinity=aff)) or "")
    assert "podAffinity" in (reject(pool("pa", podAffinity={"matchLabels": {"app": "x"}})) or "")
    assert (
        reject(
            pool("pa", podAffinity={"matchLabels": {"app": "x"}}), the_pod=pod(labels={"app": "x"})
        )
        is None
    )


def test_multus_name_filter() -> None:
    p = pod(
        annotations={
            "v1.multus-cni.io/default-network": "kube-system/ovs-conf",
            "k8s.v1.cni.cncf.io/networks": "other",
        }
    )
    assert (
        reject(pool("m", multusName=["ovs-conf"]), the_pod=p) is None
    )  # no namespace: kube-system
    assert reject(pool("m", multusName=["kube-system/ovs-conf"]), the_pod=p) is None
    why = reject(pool("m", multusName=["kube-system/ovs-conf"]), the_pod=p, ifname="net1") or ""
    assert "default/other" in why
    why = reject(pool("m", multusName=["kube-system/ovs-conf"])) or ""
    assert "none given" in why


def test_cni_result_has_gateway_and_default_route() -> None:
    a = ipam.Allocation(
        4, "172.18.30.131/16", "p", "172.18.0.1", [{"dst": "10.9.0.0/16", "gw": "172.18.0.254"}]
    )
    b = ipam.Allocation(6, "fd00::10/64", "p6", None, [])
    assert ipam.Ipam.to_cni_result([a, b]) == {
        "ips": [
            {"address": "172.18.30.131/16", "gateway": "172.18.0.1"},
            {"address": "fd00::10/64"},
        ],
        "routes": [
            {"dst": "0.0.0.0/0", "gw": "172.18.0.1"},
            {"dst": "10.9.0.0/16", "gw": "172.18.0.254"},
        ],
        "dns": {},
    }


@pytest.mark.parametrize("key", ["x", "172.18.30.131/16", "172.18.030.131", "", "fd00::0001"])
def test_lowest_free_rejects_non_canonical_record_keys(key: str) -> None:
    with pytest.raises(ipam.BadRecordKey) as e:
        ipam.lowest_free(SPEC, [key])
    assert repr(key) in str(e.value) and isinstance(e.value, ValueError)


def test_lowest_free_skips_reserved_gateways_of_its_family_only() -> None:
    spec = {"subnet": "10.0.0.0/24", "ips": ["10.0.0.1-10.0.0.4"]}
    assert ipam.lowest_free(spec, [], ["10.0.0.1", "10.0.0.2"]) == "10.0.0.3"
    # ::a00:1 has the integer value of 10.0.0.1 but is another family
    assert ipam.lowest_free(spec, [], ["::a00:1"]) == "10.0.0.1"


def test_pool_status_caps_total_at_json_safe_integer() -> None:
    huge = {"subnet": "fd00::/64", "ips": ["fd00::2-fd00::ffff:ffff:ffff:ffff"]}
    st = ippool.pool_status(huge, {"fd00::2": {"pod": "a/b", "podUid": "u"}})
    assert st["totalIPCount"] == 2**53 - 1 == ipam.MAX_SAFE_INTEGER
    assert st["allocatedIPCount"] == 1
    assert ippool.pool_status(SPEC, {})["totalIPCount"] == ippool.allocatable(SPEC).size
