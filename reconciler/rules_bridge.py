"""Semantic rules of OvsBridge (underlay.dev/v1alpha1, schemas/underlay.dev_v1alpha1_OvsBridge.json).

The bridge name (``spec.bridge``, else ``metadata.name``) is also a Linux interface name (at
most 15 characters, IFNAMSIZ - 1); an uplink is listed once and is not the bridge itself;
``nodeOverrides`` name each node once. Across objects, two OvsBridges whose equality
``nodeSelector``s can select one node may not make the same bridge or share an uplink NIC.
"""

from __future__ import annotations

import re
from typing import Any

from reconciler.loader import Document, Problem
from reconciler.rules_common import Context, bridge_name, selectors_overlap

IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
"""Linux interface names we accept: 1-15 characters of letters, digits, ``_ . -``."""


def check_bridge(doc: Document, ctx: Context) -> list[Problem]:
    """Per-object rules (see module docstring)."""
    out: list[Problem] = []
    spec = doc.get(("spec",))
    if not isinstance(spec, dict):
        return out
    bridge = bridge_name(doc)
    if "bridge" not in spec and doc.name is not None and not IFNAME.match(doc.name):
        out.append(
            doc.problem(
                ("metadata", "name"),
                rule="bridge-name-invalid",
                message=f'without spec.bridge the bridge is named "{doc.name}", which is not a '
                "Linux interface name (1-15 letters, digits, '_', '.', '-')",
                hint="set spec.bridge to a name of at most 15 characters, e.g. br1",
            )
        )
    uplinks = spec.get("uplinks")
    if isinstance(uplinks, list):
        out += _check_uplinks(doc, ("spec", "uplinks"), uplinks, bridge)
    overrides = spec.get("nodeOverrides")
    if isinstance(overrides, list):
        seen: dict[str, int] = {}
        for i, o in enumerate(overrides):
            if not isinstance(o, dict):
                continue
            node = o.get("nodeName")
            if isinstance(node, str):
                if node in seen:
                    out.append(
                        doc.problem(
                            ("spec", "nodeOverrides", i, "nodeName"),
                            rule="node-override-duplicate",
                            message=f"node {node} already has an override "
                            f"(spec.nodeOverrides[{seen[node]}])",
                            hint="merge the two overrides",
                        )
                    )
                else:
                    seen[node] = i
            if isinstance(o.get("uplinks"), list):
                out += _check_uplinks(
                    doc, ("spec", "nodeOverrides", i, "uplinks"), o["uplinks"], bridge
                )
    return out


def _check_uplinks(
    doc: Document, base: tuple[str | int, ...], uplinks: list[Any], bridge: str | None
) -> list[Problem]:
    out: list[Problem] = []
    seen: dict[str, int] = {}
    for i, nic in enumerate(uplinks):
        if not isinstance(nic, str):
            continue
        if nic in seen:
            out.append(
                doc.problem(
                    (*base, i),
                    rule="uplink-duplicate",
                    message=f"uplink {nic} is listed twice (also at index {seen[nic]})",
                    hint="list each NIC once",
                )
            )
            continue
        seen[nic] = i
        if nic == bridge:
            out.append(
                doc.problem(
                    (*base, i),
                    rule="uplink-is-bridge",
                    message=f"uplink {nic} is the bridge itself",
                    hint="name the node's physical NIC, e.g. eth0",
                )
            )
    return out


def _where(doc: Document, path: tuple[str | int, ...]) -> str:
    line, col = doc.mark(path)
    return f"{doc.path}:{line}:{col}"


def check_bridge_conflicts(ctx: Context) -> list[Problem]:
    """``bridge-conflict`` and ``uplink-conflict`` between OvsBridges that can share a node.

    Pairs are compared with selectors extracted once; a thousand per-rack bridges on one
    uplink name (disjoint selectors) cost half a million cheap dict comparisons.
    """
    out: list[Problem] = []
    order = {id(d): i for i, d in enumerate(ctx.documents)}
    selector = {
        id(d): d.get(("spec", "nodeSelector")) for docs in ctx.bridges.values() for d in docs
    }
    for name, docs in ctx.bridges.items():
        docs = sorted(docs, key=lambda d: order[id(d)])
        for k, d in enumerate(docs):
            if d.name is None:
                continue
            other = next(
                (
                    e
                    for e in docs[:k]
                    if e.name != d.name and selectors_overlap(selector[id(d)], selector[id(e)])
                ),
                None,
            )
            if other is not None:
                path = ("spec", "bridge") if d.get(("spec", "bridge")) else ("metadata", "name")
                opath = (
                    ("spec", "bridge") if other.get(("spec", "bridge")) else ("metadata", "name")
                )
                out.append(
                    d.problem(
                        path,
                        rule="bridge-conflict",
                        message=f"bridge {name} is also made by {other.ref()} "
                        f"({_where(other, opath)}) on nodes both select",
                        hint="keep one OvsBridge per bridge, or give the nodeSelectors different values for one label",
                    )
                )
    bridges = sorted(
        ((d, name) for name, docs in ctx.bridges.items() for d in docs),
        key=lambda t: order[id(t[0])],
    )
    owners: dict[str, list[tuple[Document, int, str, Any]]] = {}
    for d, bname in bridges:
        uplinks = d.get(("spec", "uplinks"))
        if not isinstance(uplinks, list):
            continue
        sel = selector[id(d)]
        for i, nic in enumerate(uplinks):
            if not isinstance(nic, str):
                continue
            for e, j, ename, esel in owners.get(nic, ()):
                if e is d or ename == bname:
                    continue  # same object, or a bridge-conflict already reported
                if selectors_overlap(sel, esel):
                    out.append(
                        d.problem(
                            ("spec", "uplinks", i),
                            rule="uplink-conflict",
                            message=f"uplink {nic} is also an uplink of {e.ref()} "
                            f"({_where(e, ('spec', 'uplinks', j))}) on nodes both select",
                            hint="a NIC can be the uplink of one bridge only; use another NIC or disjoint nodeSelectors",
                        )
                    )
                    break
            owners.setdefault(nic, []).append((d, i, bname, sel))
    return out
