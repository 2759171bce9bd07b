"""Every name field is matched as a whole: a trailing newline, a NUL or 256 characters is an
error, in the validator (schemas and rules) and in the node agent.

Python's ``re`` lets ``$`` match before a final newline, so ``^[A-Za-z0-9_.-]+$`` accepted
``"br9\\n"``: ``underlay validate --strict`` passed it, ``agent --noop`` planned
``/etc/netplan/60-underlay-br9\\n.yaml`` and a real run made an OVS bridge named ``br9\\n``.
The schemas' patterns keep their ECMA-262 meaning (``$`` is the end of the string, as the
API server's Go regexps have it); the validator evaluates them so.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reconciler.loader import load_text
from reconciler.validation import ecma_regex, validate

BRIDGE: dict[str, Any] = {
    "apiVersion": "underlay.dev/v1alpha1",
    "kind": "OvsBridge",
    "metadata": {"name": "br1", "labels": {"team": "net"}},
    "spec": {
        "bridge": "br1",
        "uplinks": ["eth0"],
        "nodeSelector": {"zone": "a"},
        "nodeOverrides": [{"nodeName": "n1", "uplinks": ["eth1"]}],
    },
}
POOL: dict[str, Any] = {
    "apiVersion": "spiderpool.spidernet.io/v2beta1",
    "kind": "SpiderIPPool",
    "metadata": {"name": "pool1", "labels": {"team": "net"}},
    "spec": {
        "subnet": "172.18.0.0/16",
        "ips": ["172.18.30.131-172.18.30.140"],
        "gateway": "172.18.0.1",
        "multusName": ["kube-system/ovs-conf", "kube-system/mv-conf"],
        "nodeName": ["n1"],
        "namespaceName": ["default"],
        "nodeAffinity": {
            "matchLabels": {"zone": "a"},
            "matchExpressions": [{"key": "rack", "operator": "In", "values": ["r1"]}],
        },
    },
}
OVS_SMC: dict[str, Any] = {
    "apiVersion": "spiderpool.spidernet.io/v2beta1",
    "kind": "SpiderMultusConfig",
    "metadata": {
        "name": "ovs-conf",
        "namespace": "kube-system",
        "labels": {"team": "net"},
        "annotations": {"multus.spidernet.io/cr-name": "ovs-conf"},
    },
    "spec": {
        "cniType": "ovs",
        "ovs": {"bridge": "br1", "ippools": {"ipv4": ["pool1"]}},
    },
}
MACVLAN_SMC: dict[str, Any] = {
    "apiVersion": "spiderpool.spidernet.io/v2beta1",
    "kind": "SpiderMultusConfig",
    "metadata": {"name": "mv-conf", "namespace": "kube-system"},
    "spec": {
        "cniType": "macvlan",
        "macvlan": {"master": ["eth0"], "ippools": {"ipv4": ["pool1"]}},
    },
}
BASE = {"bridge": BRIDGE, "pool": POOL, "ovs-smc": OVS_SMC, "macvlan-smc": MACVLAN_SMC}

# (document, path to a string value, or to a mapping whose first key is replaced: "key")
FIELDS: list[tuple[str, tuple[Any, ...]]] = [
    ("bridge", ("metadata", "name")),
    ("bridge", ("metadata", "labels", "key")),
    ("bridge", ("metadata", "labels", "team")),
    ("bridge", ("spec", "bridge")),
    ("bridge", ("spec", "uplinks", 0)),
    ("bridge", ("spec", "nodeSelector", "key")),
    ("bridge", ("spec", "nodeSelector", "zone")),
    ("bridge", ("spec", "nodeOverrides", 0, "nodeName")),
    ("bridge", ("spec", "nodeOverrides", 0, "uplinks", 0)),
    ("pool", ("metadata", "name")),
    ("pool", ("metadata", "labels", "key")),
    ("pool", ("metadata", "labels", "team")),
    ("pool", ("spec", "multusName", 0)),
    ("pool", ("spec", "nodeName", 0)),
    ("pool", ("spec", "namespaceName", 0)),
    ("pool", ("spec", "nodeAffinity", "matchLabels", "key")),
    ("pool", ("spec", "nodeAffinity", "matchLabels", "zone")),
    ("pool", ("spec", "nodeAffinity", "matchExpressions", 0, "key")),
    ("pool", ("spec", "nodeAffinity", "matchExpressions", 0, "values", 0)),
    ("ovs-smc", ("metadata", "name")),
    ("ovs-smc", ("metadata", "namespace")),
    ("ovs-smc", ("metadata", "labels", "key")),
    ("ovs-smc", ("metadata", "annotations", "multus.spidernet.io/cr-name")),
    ("ovs-smc", ("spec", "ovs", "bridge")),
    ("ovs-smc", ("spec", "ovs", "ippools", "ipv4", 0)),
    ("macvlan-smc", ("spec", "macvlan", "master", 0)),
]


def _bad_values(good: str) -> dict[str, str]:
    return {
        "trailing-newline": good + "\n",
        "nul": good[:1] + "\0" + good[1:],
        "256-characters": (good.replace("/", "") * 256)[:256],
    }


def _replace(doc: dict[str, Any], path: tuple[Any, ...], how: str) -> tuple[dict[str, Any], str]:
    doc = copy.deepcopy(doc)
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if last == "key":  # the first key of the mapping
        good, value = next(iter(parent.items()))
        bad = _bad_values(good)[how]
        del parent[good]
        parent[bad] = value
        return doc, bad
    bad = _bad_values(parent[last])[how]
    parent[last] = bad
    return doc, bad


def _problems(docs: list[dict[str, Any]]) -> list[Any]:
    text = "\n---\n".join(json.dumps(d) for d in docs)  # JSON is YAML: "\n", "\u0000" escaped
    loaded = load_text(text, "net.yaml")
    return [*loaded.problems, *validate(loaded.documents, strict=True)]


def test_the_base_documents_are_clean() -> None:
    assert [p.format() for p in _problems(list(BASE.values()))] == []


@pytest.mark.parametrize("how", ["trailing-newline", "nul", "256-characters"])
@pytest.mark.parametrize(
    ("which", "path"), FIELDS, ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else v
)
def test_every_name_field_is_matched_whole(which: str, path: tuple[Any, ...], how: str) -> None:
    bad_doc, bad = _replace(BASE[which], path, how)
    docs = [bad_doc if name == which else d for name, d in BASE.items()]
    errors = [p for p in _problems(docs) if p.severity == "error"]
    assert errors, f"{which} {'.'.join(map(str, path))} = {bad!r} passed validation"


def test_ecma_dollar_is_the_end_of_the_string() -> None:
    assert ecma_regex("^[a-z]+$").search("br") and not ecma_regex("^[a-z]+$").search("br\n")
    # escaped dollars and dollars inside a character class are literal
    assert ecma_regex(r"^a\$$").search("a$") and not ecma_regex(r"^a\$$").search("a$\n")
    assert ecma_regex("^[$]+$").search("$$") and not ecma_regex("^[$]+$").search("$\n")
    assert ecma_regex(r"^[\]$]+$").search("]$") and not ecma_regex(r"^[\]$]+$").search("]\n")


def test_validate_strict_refuses_a_bridge_named_with_a_newline(tmp_path: Path) -> None:
    """The reproduction of the issue, through the command line."""
    (tmp_path / "br.yaml").write_text(
        "apiVersion: underlay.dev/v1alpha1\nkind: OvsBridge\nmetadata: {name: br9}\n"
        'spec: {bridge: "br9\\n", uplinks: [eth0], persistence: netplan}\n'
    )
    underlay = str(Path(sys.executable).parent / "underlay")
    p = subprocess.run(
        [underlay, "validate", "--strict", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    assert p.returncode == 1, p.stdout + p.stderr
    assert "spec.bridge" in p.stdout, p.stdout


# --- the node agent -----------------------------------------------------------------------
AGENT_BAD = ["br9\n", "br\x009", "b" * 256]


@pytest.mark.parametrize("bad", AGENT_BAD, ids=["trailing-newline", "nul", "256-characters"])
@pytest.mark.parametrize("where", ["bridge", "uplink", "override-uplink"])
def test_the_agent_refuses_such_names_before_touching_the_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, bad: str
) -> None:
    """An OvsBridge from the cluster (a CRD without our patterns would let it in) with such a
    name: ``--noop`` says it is invalid and plans no file; the enactment path refuses it the
    same way (InvalidBridge). No OVSDB is given: reading the node would fail the test."""
    from node_agent import bridges, daemon

    obj = copy.deepcopy(BRIDGE)
    if where == "bridge":
        obj["spec"]["bridge"] = bad
    elif where == "uplink":
        obj["spec"]["uplinks"] = [bad]
        del obj["spec"]["nodeOverrides"]  # n1's override would replace the uplinks
    else:
        obj["spec"]["nodeOverrides"][0]["uplinks"] = [bad]
    node = bridges.NodeContext(name="n1", ovsdb=None, root=tmp_path)
    assert daemon.noop(None, node, objects=[obj], labels={"zone": "a"}) == 0
    out = capsys.readouterr().out
    assert "60-underlay" not in out and "netplan" not in out, out
    if len(bad) > 15 and "\n" not in bad and "\0" not in bad:  # a length: node-local check
        assert "invalid" in out and "256 characters" in out, out
    else:
        with pytest.raises(bridges.InvalidBridge, match="is not a network interface name"):
            bridges.DesiredBridge.from_object(obj, "n1")
        assert "OvsBridge br1: invalid:" in out and repr(bad)[:20] in out, out
    # a DesiredBridge made some other way is refused by the node-local validation too
    desired = bridges.DesiredBridge(object_name="br1", name=bad, uplinks=("eth0",))
    assert bridges.plan(desired, node).invalid, "planned a bridge named with a newline"


@pytest.mark.parametrize("item", ["zone=a\nb", "zo\nne=a", "zo\x00ne=a", "zone=" + "a" * 256])
def test_node_labels_of_the_agent_are_matched_whole(item: str) -> None:
    import argparse

    from node_agent.agent_args import node_labels

    with pytest.raises(argparse.ArgumentTypeError):
        node_labels(item)
    assert node_labels("zone=a,kubernetes.io/hostname=n1") == {
        "zone": "a",
        "kubernetes.io/hostname": "n1",
    }
