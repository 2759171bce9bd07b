"""Robustness (hypothesis): bad content never crashes the validator.

Valid quick-start documents get a random subtree replaced by random data (any JSON-like
value, including wrong types and nulls); the YAML is dumped, loaded and validated. Every run
must return problems, not raise, and every problem must carry a known rule, a position inside
the file and the object it is about. Render never crashes on a config the validator passed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler import render
from reconciler.loader import dump_yaml, load_text
from reconciler.rules import RULES
from reconciler.validation import validate

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
BASE = [
    d.obj
    for f in sorted(QUICKSTART.glob("*.yaml"))
    for d in load_text(f.read_text(), f.name).documents
]
EXTRA: list[dict[str, Any]] = [
    {
        "apiVersion": "spiderpool.spidernet.io/v2beta1",
        "kind": "SpiderMultusConfig",
        "metadata": {"name": "m", "namespace": "default", "annotations": {"a": "b"}},
        "spec": {
            "cniType": "macvlan",
            "macvlan": {"master": ["eth0"], "vlanID": 5, "ippools": {"ipv4": ["ippool-test"]}},
            "ovs": {"bridge": "br1", "trunk": [{"minID": 1, "maxID": 2}]},
            "chainCNIJsonData": ["{}"],
            "customCNI": "{}",
        },
    },
    {
        "apiVersion": "spiderpool.spidernet.io/v2beta1",
        "kind": "SpiderIPPool",
        "metadata": {"name": "p6", "labels": {"x": "y"}},
        "spec": {
            "subnet": "fd00::/64",
            "ipVersion": 6,
            "ips": ["fd00::10-fd00::20"],
            "excludeIPs": ["fd00::15"],
            "gateway": "fd00::1",
            "routes": [{"dst": "fd01::/64", "gw": "fd00::2"}],
            "multusName": ["default/m"],
            "nodeAffinity": {"matchLabels": {"a": "b"}},
        },
    },
    {
        "apiVersion": "underlay.dev/v1alpha1",
        "kind": "OvsBridge",
        "metadata": {"name": "br2"},
        "spec": {
            "uplinks": ["eth1"],
            "nodeSelector": {"r": "1"},
            "nodeOverrides": [{"nodeName": "n1", "uplinks": ["eth2"]}],
            "maxUnavailable": "25%",
        },
    },
]

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["172.18.0.0/16", "10.0.0.1-10.0.0.0", "fd00::1", "0.0.0.0/0", "a/b/c", "br1"]),
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> list[dict[str, Any]]:
    docs = copy.deepcopy(BASE + EXTRA)
    for _ in range(draw(st.integers(1, 4))):
        doc = draw(st.sampled_from(docs))
        candidates = [p for p in paths(doc) if p and p[0] not in ("apiVersion", "kind")]
        path = draw(st.sampled_from(candidates))
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = draw(JSONISH)
    return docs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_documents_give_problems_not_exceptions(docs: list[dict[str, Any]]) -> None:
    text = dump_yaml(docs)
    res = load_text(text, "fuzz.yaml")
    problems = res.problems + validate(res.documents, strict=True)
    n_lines = text.count("\n") + 1
    for p in problems:
        assert p.rule in RULES, p.format()
        assert 1 <= p.line <= n_lines and p.column >= 1, p.format()
        assert p.severity == "error"
        assert p.message
        if p.rule not in ("non-string-key", "duplicate-key"):
            assert p.kind is not None, p.format()


CNI_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["type", "plugins", "name", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CNI_JSON, st.lists(CNI_JSON, max_size=2))
def test_render_never_crashes_on_validated_custom_cni(custom: Any, chain: list[Any]) -> None:
    """Whatever JSON customCNI/chainCNIJsonData hold: what validates renders, and render turns
    anything else into a ValueError naming the object, never a TypeError or a wrong config."""
    smc = {
        "apiVersion": "spiderpool.spidernet.io/v2beta1",
        "kind": "SpiderMultusConfig",
        "metadata": {"name": "custom", "namespace": "default"},
        "spec": {
            "cniType": "custom",
            "customCNI": json.dumps(custom),
            "chainCNIJsonData": [json.dumps(c) for c in chain],
        },
    }
    docs = load_text(dump_yaml([smc]), "smc.yaml").documents
    errors = [p for p in validate(docs) if p.severity == "error"]
    try:
        out = render.render(docs)
    except ValueError as exc:
        assert errors, f"render refused a config the validator passed: {exc}"
        assert "SpiderMultusConfig default/custom (smc.yaml:1)" in str(exc)
        return
    if not errors:
        conf = json.loads(out[-1].body["spec"]["config"])
        assert conf["plugins"] and all(
            isinstance(p, dict) and isinstance(p.get("type"), str) for p in conf["plugins"]
        )


HOSTNAME = "kubernetes.io/hostname"
SELECTORS = st.dictionaries(
    st.sampled_from(["rack", "zone", HOSTNAME]), st.sampled_from(["1", "2"]), max_size=2
).map(lambda d: {k: (f"n{v}" if k == HOSTNAME else v) for k, v in d.items()})
NICS = st.lists(st.sampled_from(["eth0", "eth1", "eth2"]), min_size=1, max_size=2, unique=True)


@st.composite
def bridge_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for i in range(draw(st.integers(2, 6))):
        spec: dict[str, Any] = {"bridge": draw(st.sampled_from(["br1", "br2", "br3", f"b{i}"]))}
        spec["uplinks"] = draw(NICS)
        sel = draw(SELECTORS)
        if sel:
            spec["nodeSelector"] = sel
        nodes = draw(st.lists(st.sampled_from(["n1", "n2"]), max_size=2, unique=True))
        if nodes:
            spec["nodeOverrides"] = [
                {"nodeName": n, **({"uplinks": draw(NICS)} if draw(st.booleans()) else {})}
                for n in nodes
            ]
        name = draw(st.sampled_from([f"o{i}", "dup"]))  # "dup": duplicates of one object
        out.append(
            {
                "apiVersion": "underlay.dev/v1alpha1",
                "kind": "OvsBridge",
                "metadata": {"name": name},
                "spec": spec,
            }
        )
    return out


def _brute_force_conflicts(bridges: list[dict[str, Any]]) -> set[tuple[int, str]]:
    """(document index, field) of every uplink entry that shares its NIC with an earlier
    OvsBridge (another bridge name, not a duplicate) on some node, by enumerating nodes: n1,
    n2 and an unnamed one, each with every combination of the rack and zone labels."""
    label_sets = [
        {k: v for k, v in (("rack", r), ("zone", z)) if v is not None}
        for r in (None, "1", "2")
        for z in (None, "1", "2")
    ]
    nodes = [(n, {**ls, HOSTNAME: n}) for n in ("n1", "n2", "other") for ls in label_sets]

    def entries_on(b: dict[str, Any], node: str) -> list[tuple[str, str]]:
        for i, o in enumerate(b["spec"].get("nodeOverrides", [])):
            if o["nodeName"] == node and "uplinks" in o:
                return [
                    (n, f"spec.nodeOverrides[{i}].uplinks[{j}]") for j, n in enumerate(o["uplinks"])
                ]
        return [(n, f"spec.uplinks[{j}]") for j, n in enumerate(b["spec"]["uplinks"])]

    found = set()
    for k, u in enumerate(bridges):
        for e in bridges[:k]:
            if e["spec"]["bridge"] == u["spec"]["bridge"] or (
                e["metadata"]["name"] == u["metadata"]["name"]
            ):
                continue
            for node, labels in nodes:
                if not all(
                    labels.get(a) == v
                    for s in (u, e)
                    for a, v in s["spec"].get("nodeSelector", {}).items()
                ):
                    continue
                theirs = {n for n, _p in entries_on(e, node)}
                found |= {(k, p) for n, p in entries_on(u, node) if n in theirs}
    return found


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bridge_sets())
def test_uplink_conflicts_match_brute_force_over_nodes(bridges: list[dict[str, Any]]) -> None:
    """The selector index and the per-node override logic of uplink-conflict find exactly the
    uplink entries that share a NIC with an earlier bridge on some node."""
    text = dump_yaml(bridges)
    docs = load_text(text, "b.yaml").documents
    starts = [d.mark(())[0] for d in docs]
    found = {
        (max(i for i, s in enumerate(starts) if s <= p.line), p.field)
        for p in validate(docs)
        if p.rule == "uplink-conflict"
    }
    assert found == _brute_force_conflicts(bridges)
