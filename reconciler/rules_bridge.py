"""Semantic rules of OvsBridge (underlay.dev/v1alpha1, schemas/underlay.dev_v1alpha1_OvsBridge.json).

Per object: the bridge name (``spec.bridge``, else ``metadata.name``) and every uplink are
Linux interface names (Linux ``dev_valid_name()``: at most 15 characters, IFNAMSIZ - 1; not
"." or ".."; the schema pattern refuses "/", ":" and whitespace); an uplink is listed once
and is not the bridge itself; ``nodeOverrides`` name each node once; ``metadata.name`` is at
most 63 characters, because the node agent puts it in the ``underlay.dev/bridge`` label of
every OvsBridgeEnactment; ``nodeSelector`` keys and values are valid labels; a bridge named
like a physical NIC (eth*, en*, ib*, wl*, bond*) gets a warning.

Across objects, for OvsBridges whose equality ``nodeSelector``s can select one node: they may
not make the same bridge, and no NIC is an uplink of two bridges on any node, taking
``nodeOverrides`` into account (an override replaces the uplinks on its node). No bridge may
be named like an uplink of another OvsBridge. Two documents that duplicate one object are
never compared with each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from reconciler import vocab
from reconciler.loader import WARNING, Document, Problem
from reconciler.rules_common import (
    Context,
    bridge_name,
    check_dns1123,
    check_label_map,
    duplicates,
    ifname_problem,
    selectors_overlap,
)

IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
"""Linux interface names we accept: 1-15 characters of letters, digits, ``_ . -`` (fullmatch)."""

NIC_LIKE = re.compile(r"^(eth|en|ib|wl|bond)")
"""Prefixes of the names Linux and udev give physical NICs and bonds (``bridge-name-like-nic``)."""

LABEL_VALUE_MAX = 63
"""Longest label value (Kubernetes API conventions); OvsBridge names become one."""

HOSTNAME_LABEL = "kubernetes.io/hostname"
"""Well-known node label holding the node name (a nodeSelector on it selects one node)."""


def _bridge_path(doc: Document) -> tuple[str, ...]:
    return ("spec", "bridge") if doc.get(("spec", "bridge")) else ("metadata", "name")


def check_bridge(doc: Document, ctx: Context) -> list[Problem]:
    """Per-object rules (see module docstring)."""
    out: list[Problem] = []
    if doc.name is not None and len(doc.name) > LABEL_VALUE_MAX:
        out.append(
            doc.problem(
                ("metadata", "name"),
                rule="bridge-object-name-invalid",
                message=f"OvsBridge name has {len(doc.name)} characters: the node agent labels "
                f"each OvsBridgeEnactment {vocab.LABEL_ENACTMENT_BRIDGE}=<name>, and label "
                f"values are at most {LABEL_VALUE_MAX} characters",
                hint=f"write a name of at most {LABEL_VALUE_MAX} characters, e.g. "
                f"{doc.name[:LABEL_VALUE_MAX].rstrip('-.')}",
            )
        )
    spec = doc.get(("spec",))
    if not isinstance(spec, dict):
        return out
    bridge = bridge_name(doc)
    explicit = spec.get("bridge")
    if "bridge" not in spec and doc.name is not None and not IFNAME.fullmatch(doc.name):
        out.append(
            doc.problem(
                ("metadata", "name"),
                rule="bridge-name-invalid",
                message=f'without spec.bridge the bridge is named "{doc.name}", which is not a '
                "Linux interface name (1-15 letters, digits, '_', '.', '-')",
                hint="set spec.bridge to a name of at most 15 characters, e.g. br1",
            )
        )
    elif isinstance(explicit, str) and explicit in (".", ".."):
        out.append(
            doc.problem(
                ("spec", "bridge"),
                rule="bridge-name-invalid",
                message=f'bridge "{explicit}" is not a Linux interface name: '
                f"{ifname_problem(explicit)}",
                hint="write a name such as br1",
            )
        )
    out += check_label_map(doc, ("spec", "nodeSelector"), spec.get("nodeSelector"))
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
                out += check_dns1123(
                    doc, ("spec", "nodeOverrides", i, "nodeName"), node, "node name"
                )
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
        if nic in (".", ".."):
            out.append(
                doc.problem(
                    (*base, i),
                    rule="uplink-name-invalid",
                    message=f'uplink "{nic}" is not a Linux interface name: {ifname_problem(nic)}',
                    hint="write the NIC's name as `ip link` shows it on the node, e.g. eth0",
                )
            )
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


@dataclass
class _Uplinks:
    """Where one OvsBridge puts which NIC: its default uplinks (every node it selects that has
    no override with uplinks) and, per overridden node, the override's uplinks."""

    doc: Document
    bridge: str
    selector: Any
    default: list[tuple[str, tuple[str | int, ...]]]
    per_node: dict[str, list[tuple[str, tuple[str | int, ...]]]]

    @classmethod
    def of(cls, doc: Document, bridge: str) -> _Uplinks:
        def nics(
            value: Any, base: tuple[str | int, ...]
        ) -> list[tuple[str, tuple[str | int, ...]]]:
            if not isinstance(value, list):
                return []
            return [(n, (*base, i)) for i, n in enumerate(value) if isinstance(n, str)]

        per_node: dict[str, list[tuple[str, tuple[str | int, ...]]]] = {}
        overrides = doc.get(("spec", "nodeOverrides"))
        for i, o in enumerate(overrides if isinstance(overrides, list) else ()):
            if isinstance(o, dict) and isinstance(o.get("nodeName"), str) and "uplinks" in o:
                per_node.setdefault(
                    o["nodeName"], nics(o["uplinks"], ("spec", "nodeOverrides", i, "uplinks"))
                )
        return cls(
            doc,
            bridge,
            doc.get(("spec", "nodeSelector")),
            nics(doc.get(("spec", "uplinks")), ("spec", "uplinks")),
            per_node,
        )

    def may_select(self, node: str) -> bool:
        """False only when the nodeSelector pins another node by ``kubernetes.io/hostname``."""
        sel = self.selector
        return not (isinstance(sel, dict) and sel.get(HOSTNAME_LABEL, node) != node)

    @property
    def pinned(self) -> str | None:
        """The one node a ``kubernetes.io/hostname`` nodeSelector selects, else None."""
        sel = self.selector
        node = sel.get(HOSTNAME_LABEL) if isinstance(sel, dict) else None
        return node if isinstance(node, str) else None

    def on(self, node: str | None) -> list[tuple[str, tuple[str | int, ...]]]:
        """Uplinks on ``node`` (None: a node without an override)."""
        if node is not None and node in self.per_node:
            return self.per_node[node]
        return self.default


def check_bridge_conflicts(ctx: Context) -> list[Problem]:
    """``bridge-conflict``, ``uplink-conflict``, ``bridge-is-uplink`` and the
    ``bridge-name-like-nic`` warning (see module docstring).

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
                out.append(
                    d.problem(
                        _bridge_path(d),
                        rule="bridge-conflict",
                        message=f"bridge {name} is also made by {other.ref()} "
                        f"({_where(other, _bridge_path(other))}) on nodes both select",
                        hint="keep one OvsBridge per bridge, or give the nodeSelectors different values for one label",
                    )
                )
    bridges = sorted(
        (_Uplinks.of(d, name) for name, docs in ctx.bridges.items() for d in docs),
        key=lambda u: order[id(u.doc)],
    )
    out += _uplink_conflicts(bridges)
    out += _bridge_names_vs_uplinks(bridges)
    return out


_Entry = tuple[int, "_Uplinks", str | None, tuple[str | int, ...]]
"""(sequence number, bridge, node scope (None: nodes without override), path of the NIC)."""


class _Owners:
    """The earlier entries of one NIC, indexed by the label keys of their nodeSelectors, so a
    bridge finds the entries whose selectors can meet its own without testing them all: a
    thousand per-rack bridges on one NIC cost a dict lookup each instead of 500k pair tests."""

    def __init__(self) -> None:
        self.everywhere: list[_Entry] = []  # no (or empty) nodeSelector: every node
        self.by_keys: dict[tuple[str, ...], dict[tuple[Any, ...], list[_Entry]]] = {}
        self.odd: list[_Entry] = []  # values of the wrong type (the schema reports them)

    def add(self, entry: _Entry) -> None:
        sel = entry[1].selector
        if not isinstance(sel, dict) or not sel:
            self.everywhere.append(entry)
            return
        if not all(isinstance(v, str) for v in sel.values()):
            self.odd.append(entry)
            return
        keys = tuple(sorted(sel))
        self.by_keys.setdefault(keys, {}).setdefault(tuple(sel[k] for k in keys), []).append(entry)

    def meeting(self, sel: Any) -> list[_Entry]:
        """Entries whose nodeSelector can select a node ``sel`` selects, in input order."""
        if (
            not isinstance(sel, dict)
            or not sel
            or not all(isinstance(v, str) for v in sel.values())
        ):
            found = self.everywhere + self.odd
            for groups in self.by_keys.values():
                for entries in groups.values():
                    found += entries
            found = [e for e in found if selectors_overlap(sel, e[1].selector)]
            return sorted(found, key=lambda e: e[0])
        found = self.everywhere + [e for e in self.odd if selectors_overlap(sel, e[1].selector)]
        for keys, groups in self.by_keys.items():
            shared = [i for i, k in enumerate(keys) if k in sel]
            if not shared:
                for entries in groups.values():
                    found += entries
            elif len(shared) == len(keys):
                found += groups.get(tuple(sel[k] for k in keys), ())
            else:
                for values, entries in groups.items():
                    if all(values[i] == sel[keys[i]] for i in shared):
                        found += entries
        return sorted(found, key=lambda e: e[0])


def _uplink_conflicts(bridges: list[_Uplinks]) -> list[Problem]:
    """``uplink-conflict``: one NIC on two bridges of one node, reported on the later entry.

    A node is either one an override names (finitely many, compared exactly) or any other
    node (both bridges use their default uplinks there; they meet when the selectors overlap,
    see :func:`reconciler.rules_common.selectors_overlap`).
    """
    out: list[Problem] = []
    owners: dict[str, _Owners] = {}
    seq = 0
    for u in bridges:
        entries = [(None, nic, path) for nic, path in u.default] + [
            (node, nic, path) for node, nics in u.per_node.items() for nic, path in nics
        ]
        for node, nic, path in entries:
            earlier = owners.get(nic)
            for _seq, e, enode, epath in earlier.meeting(u.selector) if earlier else ():
                if e.bridge == u.bridge:
                    continue  # bridge-conflict covers it
                where = _conflict_node(u, node, e, enode, nic)
                if where is False or duplicates(e.doc, u.doc):
                    continue  # duplicate-object covers it
                on = f" on node {where}" if isinstance(where, str) else " on nodes both select"
                out.append(
                    u.doc.problem(
                        path,
                        rule="uplink-conflict",
                        message=f"uplink {nic} is also an uplink of {e.doc.ref()} "
                        f"({_where(e.doc, epath)}){on}",
                        hint="a NIC can be the uplink of one bridge only; use another NIC"
                        + (
                            f" in the override for {where}"
                            if isinstance(where, str)
                            else " or disjoint nodeSelectors"
                        ),
                    )
                )
                break
        for node, nic, path in entries:
            owners.setdefault(nic, _Owners()).add((seq, u, node, path))
            seq += 1
    return out


def _conflict_node(
    u: _Uplinks, node: str | None, e: _Uplinks, enode: str | None, nic: str
) -> str | bool:
    """Where ``nic`` (an uplink of ``u`` on ``node`` and of ``e`` on ``enode``) is on both:
    a node name, True for "nodes both select" (both defaults), False for nowhere."""
    if node is None and enode is None:
        pinned = u.pinned or e.pinned
        if pinned is None:
            return True
        # the defaults of a pinned bridge apply on that one node only, unless overridden there
        if pinned in u.per_node or pinned in e.per_node:
            return False
        return pinned if u.may_select(pinned) and e.may_select(pinned) else False
    if node is not None and enode is not None:
        same = node == enode and u.may_select(node) and e.may_select(node)
        return node if same else False
    named = node if node is not None else enode
    assert named is not None
    generic = e if node is not None else u  # the one using its default uplinks there
    if named in generic.per_node or not (u.may_select(named) and e.may_select(named)):
        return False  # its override replaces the default uplinks on that node
    return named


def _bridge_names_vs_uplinks(bridges: list[_Uplinks]) -> list[Problem]:
    """``bridge-is-uplink`` against every other OvsBridge; else ``bridge-name-like-nic``."""
    uplink_of: dict[str, tuple[_Uplinks, tuple[str | int, ...]]] = {}
    for u in bridges:
        for nic, path in u.default + [p for nics in u.per_node.values() for p in nics]:
            uplink_of.setdefault(nic, (u, path))
    out: list[Problem] = []
    for u in bridges:
        if u.doc.name is None:
            continue
        hit = uplink_of.get(u.bridge)
        if hit is not None and hit[0] is not u and not duplicates(hit[0].doc, u.doc):
            e, epath = hit
            out.append(
                u.doc.problem(
                    _bridge_path(u.doc),
                    rule="bridge-is-uplink",
                    message=f"bridge {u.bridge} has the name of an uplink of {e.doc.ref()} "
                    f"({_where(e.doc, epath)}): the bridge's internal interface and that NIC "
                    "cannot both exist on a node",
                    hint=f"rename the bridge, e.g. {_suggest(u.bridge)}",
                )
            )
        elif NIC_LIKE.match(u.bridge):
            out.append(
                u.doc.problem(
                    _bridge_path(u.doc),
                    rule="bridge-name-like-nic",
                    severity=WARNING,
                    message=f"bridge {u.bridge} is named like a physical NIC: on a node that "
                    "has a NIC of that name the node agent refuses to make the bridge (Git "
                    "cannot tell which nodes have it)",
                    hint=f"name bridges apart from NICs, e.g. {_suggest(u.bridge)}",
                )
            )
    return out


def _suggest(bridge: str) -> str:
    """A bridge name that cannot be a NIC's: ``br-<name>`` when it fits 15 characters."""
    return f"br-{bridge}" if len(bridge) <= 12 else "br1"
