"""Plan: compare the desired objects with what the cluster holds and decide every action.

Pure function of (desired, observed): no I/O. Comparison follows what GitOps tools learned the
hard way (reference/gitops.md): only fields we set are compared (server defaults and fields
other managers own never cause drift), and fields we applied before but no longer set (read from
our entry in ``metadata.managedFields``) count as drift to remove.

Safety rules decided here, shown in the plan as ``blocked`` with the reason:
- an object that exists without this instance's ownership label is never updated or pruned;
- prune only touches objects that carry the label AND are in this instance's inventory (with
  the uid recorded there), never an object someone copied the labels onto;
- a revision that renders no object prunes nothing unless ``allow_empty`` (Argo CD allowEmpty);
- a SpiderIPPool that still has allocations is never pruned, nor shrunk below them;
- ``spec.subnet`` and ``spec.ipVersion`` of a SpiderIPPool are immutable (Spiderpool).

Drift: a difference on an object whose Git body did not change since this instance applied it
(same inventory digest) was made in the cluster, by hand. It is reverted like any update
(self-heal), or with ``self_heal=False`` only reported (op ``drifted``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import netaddr

from reconciler import ippool, vocab
from reconciler.inventory import Inventory, desired_digest
from reconciler.render import Desired
from reconciler.vocab import Resource

Key = tuple[str, str | None, str]
DiffMemo = dict[Key, tuple[tuple[Any, ...], list["Change"]]]


class Op(StrEnum):
    """What the plan does with one object."""

    CREATE = "create"
    UPDATE = "update"
    UNCHANGED = "unchanged"
    PRUNE = "prune"
    BLOCKED = "blocked"
    DRIFTED = "drifted"
    """Changed in the cluster by hand; reported, not reverted (self-heal off)."""


SYMBOL = {
    Op.CREATE: "+",
    Op.UPDATE: "~",
    Op.UNCHANGED: "=",
    Op.PRUNE: "-",
    Op.BLOCKED: "!",
    Op.DRIFTED: "*",
}


@dataclass
class Change:
    """One field difference: ``path`` (dotted), ``before`` (None if absent), ``after`` (None if removed)."""

    path: str
    before: Any
    after: Any


@dataclass
class Action:
    """One planned action on one object.

    ``desired`` is None for prunes; ``live`` is None for creates. ``changes`` lists the field
    differences of an update; ``reason`` says why an action is blocked. ``drift`` is True when
    the difference was made in the cluster (Git did not change the object since it was
    applied; a create of such an object means it was deleted by hand).
    """

    op: Op
    resource: Resource
    namespace: str | None
    name: str
    desired: Desired | None = None
    live: dict[str, Any] | None = None
    changes: list[Change] = field(default_factory=list)
    reason: str = ""
    blocked_op: Op | None = None
    drift: bool = False

    @property
    def key(self) -> Key:
        """(kind, namespace or None, name) of the object."""
        return (self.resource.kind, self.namespace, self.name)

    def ref(self) -> str:
        """``Kind namespace/name`` or ``Kind name``."""
        ns = self.namespace
        return f"{self.resource.kind} {ns + '/' if ns else ''}{self.name}"


@dataclass
class Plan:
    """All actions, in apply order (creates/updates in render order, then prunes in reverse)."""

    actions: list[Action]
    against_empty: bool = False
    not_in_inventory: list[Key] = field(default_factory=list)
    """Objects labelled as ours, not in Git, not in the inventory: never pruned, listed."""

    def count(self, op: Op) -> int:
        """How many actions have ``op``."""
        return sum(1 for a in self.actions if a.op is op)

    @property
    def has_changes(self) -> bool:
        """True when applying would write or delete something."""
        return any(a.op in (Op.CREATE, Op.UPDATE, Op.PRUNE) for a in self.actions)

    @property
    def blocked(self) -> list[Action]:
        """Actions refused for safety, with their reasons."""
        return [a for a in self.actions if a.op is Op.BLOCKED]

    @property
    def drifted(self) -> list[Action]:
        """Actions on objects changed (or deleted) in the cluster by hand, reverted or not."""
        return [a for a in self.actions if a.drift]

    def summary(self) -> str:
        """``N to create, N to update, N to prune, N blocked, N unchanged`` (+ ``N drifted``)."""
        text = (
            f"{self.count(Op.CREATE)} to create, {self.count(Op.UPDATE)} to update, "
            f"{self.count(Op.PRUNE)} to prune, {self.count(Op.BLOCKED)} blocked, "
            f"{self.count(Op.UNCHANGED)} unchanged"
        )
        if self.count(Op.DRIFTED):
            text += f", {self.count(Op.DRIFTED)} drifted (not reverted)"
        return text


# --- managedFields ------------------------------------------------------------------------


def managed_paths(live: Mapping[str, Any], manager: str) -> set[tuple[str, ...]]:
    """Leaf field paths ``manager`` owns through server-side apply, from ``managedFields``.

    fieldsV1 (Kubernetes API reference, ManagedFieldsEntry): nested ``f:<name>`` keys; ``k:``/``v:``
    entries (list items) are folded into their list, which we treat as one atomic value.
    """
    out: set[tuple[str, ...]] = set()
    for entry in (live.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") != manager or entry.get("operation") != "Apply":
            continue
        _walk_fields(entry.get("fieldsV1") or {}, (), out)
    return out


def _walk_fields(
    node: Mapping[str, Any], prefix: tuple[str, ...], out: set[tuple[str, ...]]
) -> None:
    children = [k for k in node if k.startswith("f:")]
    if not children or any(k.startswith(("k:", "v:")) for k in node):
        if prefix:
            out.add(prefix)
        return
    for k in children:
        _walk_fields(node[k] or {}, (*prefix, k[2:]), out)


# --- comparison -------------------------------------------------------------------------


def _leaves(obj: Any, prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield from _leaves(v, (*prefix, str(k)))
    else:
        yield prefix, obj


_MISSING = object()


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(obj, dict) or p not in obj:
            return _MISSING
        obj = obj[p]
    return obj


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


def compared_part(body: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an object the reconciler owns and compares: labels, annotations, owner refs, spec."""
    md = body.get("metadata") or {}
    out: dict[str, Any] = {"metadata": {}}
    for k in ("labels", "annotations", "ownerReferences"):
        if md.get(k):
            out["metadata"][k] = md[k]
    for k, v in body.items():
        if k not in ("apiVersion", "kind", "metadata", "status"):
            out[k] = v
    return out


def diff(desired: Mapping[str, Any], live: Mapping[str, Any], manager: str) -> list[Change]:
    """Field changes needed to make ``live`` carry ``desired`` (server-side apply semantics).

    A desired leaf that differs or is missing is a change; a leaf ``manager`` owns in ``live``
    that ``desired`` no longer sets is a removal. Everything else in ``live`` is left alone.
    """
    want = compared_part(desired)
    changes: list[Change] = []
    wanted_paths = set()
    for path, value in _leaves(want):
        if not path or (isinstance(value, dict) and not value):
            continue
        wanted_paths.add(path)
        have = _get(live, path)
        if have is _MISSING or not _same(have, value):
            changes.append(Change(".".join(path), None if have is _MISSING else have, value))
    for path in sorted(managed_paths(live, manager)):
        if path[0] in ("apiVersion", "kind", "status") or path[:2] in (
            ("metadata", "name"),
            ("metadata", "namespace"),
        ):
            continue
        if any(path[: len(w)] == w or w[: len(path)] == path for w in wanted_paths):
            continue
        have = _get(live, path)
        if have is not _MISSING:
            changes.append(Change(".".join(path), have, None))
    return changes


# --- safety rules -----------------------------------------------------------------------


def owned_by(live: Mapping[str, Any], instance: str) -> bool:
    """True when ``live`` carries the ownership labels of reconciler ``instance``."""
    labels = (live.get("metadata") or {}).get("labels") or {}
    return (
        labels.get(vocab.LABEL_INSTANCE) == instance
        and labels.get(vocab.LABEL_MANAGED_BY) == vocab.MANAGED_BY_VALUE
    )


def pool_allocations(live: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Allocation records of a live SpiderIPPool (empty when none or unreadable)."""
    try:
        return ippool.allocated_ips(live.get("status"))
    except (ValueError, TypeError):
        return {}


def pool_update_block(desired: Mapping[str, Any], live: Mapping[str, Any]) -> str:
    """Why a SpiderIPPool update may not be applied, or "" when it may.

    Immutable ``subnet``/``ipVersion``; allocated IPs must stay allocatable (Spiderpool: an
    allocated IP may not be removed from the pool).
    """
    dspec, lspec = desired.get("spec") or {}, live.get("spec") or {}
    for f in ("subnet", "ipVersion"):
        if f in lspec and f in dspec and str(lspec[f]) != str(dspec[f]):
            return f"spec.{f} is immutable ({lspec[f]} -> {dspec[f]}); delete and recreate the pool"
    records = pool_allocations(live)
    if records:
        keep = ippool.allocatable(dspec)
        lost = sorted((ip for ip in records if ip not in keep), key=netaddr.IPAddress)
        if lost:
            shown = ", ".join(f"{ip} ({records[ip].get('pod', '?')})" for ip in lost[:5])
            more = f" and {len(lost) - 5} more" if len(lost) > 5 else ""
            return f"would remove allocated IPs from the pool: {shown}{more}; release them first"
    return ""


def pool_prune_block(live: Mapping[str, Any]) -> str:
    """Why a live SpiderIPPool may not be deleted, or ""."""
    records = pool_allocations(live)
    if records:
        pods = sorted({r.get("pod", "?") for r in records.values()})
        shown = ", ".join(pods[:5]) + (f" and {len(pods) - 5} more" if len(pods) > 5 else "")
        return f"still has {len(records)} allocated IP(s) (pods {shown}); not pruned"
    return ""


# --- the plan ---------------------------------------------------------------------------


def make_plan(
    desired: list[Desired],
    observed: Mapping[Key, dict[str, Any]],
    *,
    instance: str = vocab.DEFAULT_INSTANCE,
    manager: str = vocab.FIELD_MANAGER,
    prune: bool = True,
    against_empty: bool = False,
    inventory: Inventory | None = None,
    allow_empty: bool = False,
    self_heal: bool = True,
    memo: DiffMemo | None = None,
) -> Plan:
    """Decide create/update/unchanged/prune/blocked/drifted for every desired and owned object.

    ``observed`` maps (kind, namespace, name) to live objects of the user kinds and NADs, every
    object of those kinds in the cluster (not only ours), so that a name collision with an
    object someone else owns is seen. ``inventory`` is what this instance applied before (None:
    nothing); prune candidates are live objects labelled with this instance, not desired, and
    in the inventory (same uid when one was recorded); labelled objects outside the inventory
    are listed in ``Plan.not_in_inventory`` and left alone. With no desired object at all and
    ``allow_empty`` False, prunes are blocked. ``self_heal`` False turns updates and re-creates
    that only revert hand edits into ``drifted`` (reported, not applied).

    ``memo`` (kept by the caller between passes) remembers each object's field changes by
    (live resourceVersion, desired digest, owner uid): an object nobody wrote since the last
    pass is not diffed again, which makes a no-op pass over thousands of objects cheap. The
    memo is rewritten to hold exactly this plan's desired objects.
    """
    inv = inventory if inventory is not None else Inventory()
    old_memo = dict(memo) if memo is not None else {}
    new_memo: DiffMemo = {}
    actions: list[Action] = []
    wanted: set[Key] = set()
    uids: dict[Key, str] = {}
    for d in desired:
        key = d.key  # a property: computed once per object
        wanted.add(key)
        live = observed.get(key)
        body = d.body
        entry = inv.get(key)
        want = desired_digest(d)
        git_unchanged = entry is not None and entry.digest is not None and entry.digest == want
        uid = None
        if d.owner is not None:
            owner_live = observed.get(d.owner)
            uid = (owner_live or {}).get("metadata", {}).get("uid") or uids.get(d.owner)
        a = Action(Op.CREATE, d.resource, key[1], key[2], desired=d, live=live)
        if live is None:
            if git_unchanged:
                a.drift = True
                a.reason = "deleted in the cluster"
                if not self_heal:
                    a.op = Op.DRIFTED
            actions.append(a)
            continue
        if uid_ := live.get("metadata", {}).get("uid"):
            uids[key] = uid_
        if not owned_by(live, instance):
            a.op, a.blocked_op = Op.BLOCKED, Op.UPDATE
            a.reason = (
                f"exists in the cluster without the label {vocab.LABEL_INSTANCE}={instance}: "
                "not managed by this reconciler, left untouched"
            )
            actions.append(a)
            continue
        stamp = (live.get("metadata", {}).get("resourceVersion"), want, uid)
        seen = old_memo.get(key)
        if stamp[0] is not None and seen is not None and seen[0] == stamp:
            a.changes = list(seen[1])
        else:
            if uid and d.owner is not None:
                body = with_owner(body, observed.get(d.owner) or {}, d.owner, uid)
            a.changes = diff(body, live, manager)
        new_memo[key] = (stamp, list(a.changes))
        if not a.changes:
            a.op = Op.UNCHANGED
        else:
            a.op = Op.UPDATE
            if git_unchanged and any(
                not c.path.startswith("metadata.ownerReferences") for c in a.changes
            ):
                a.drift = True
                a.reason = "changed in the cluster"
                if not self_heal:
                    a.op = Op.DRIFTED
            if d.resource is vocab.SPIDER_IPPOOL and (why := pool_update_block(body, live)):
                a.op, a.blocked_op, a.reason = Op.BLOCKED, Op.UPDATE, why
        actions.append(a)
    not_in_inventory: list[Key] = []
    if prune:
        order = {
            r.kind: i
            for i, r in enumerate((*vocab.USER_KINDS, vocab.NETWORK_ATTACHMENT_DEFINITION))
        }
        extra = [(k, v) for k, v in observed.items() if k not in wanted and owned_by(v, instance)]
        extra.sort(key=lambda kv: (-order.get(kv[0][0], 0), kv[0][1] or "", kv[0][2]))
        for key, live in extra:
            entry = inv.get(key)
            if entry is None:
                not_in_inventory.append(key)
                continue
            res = entry.resource
            a = Action(Op.PRUNE, res, key[1], key[2], live=live)
            live_uid = (live.get("metadata") or {}).get("uid")
            if entry.uid and live_uid and entry.uid != live_uid:
                a.op, a.blocked_op = Op.BLOCKED, Op.PRUNE
                a.reason = (
                    f"recreated since this reconciler applied it (uid {entry.uid}, now "
                    f"{live_uid}): not pruned"
                )
            elif not desired and not allow_empty:
                a.op, a.blocked_op = Op.BLOCKED, Op.PRUNE
                a.reason = (
                    "the revision renders no objects: nothing is pruned from an empty "
                    "revision unless --allow-empty"
                )
            elif res is vocab.SPIDER_IPPOOL and (why := pool_prune_block(live)):
                a.op, a.blocked_op, a.reason = Op.BLOCKED, Op.PRUNE, why
            actions.append(a)
    if memo is not None:
        memo.clear()
        memo.update(new_memo)
    return Plan(actions, against_empty=against_empty, not_in_inventory=not_in_inventory)


def with_owner(
    body: dict[str, Any], owner_live: Mapping[str, Any], owner: Key, uid: str
) -> dict[str, Any]:
    """Copy of ``body`` with a controller ownerReference to ``owner`` (kind, ns, name) of ``uid``."""
    res = next(r for r in vocab.ALL_CUSTOM if r.kind == owner[0])
    out = copy.deepcopy(body)
    out["metadata"]["ownerReferences"] = [
        {
            "apiVersion": res.api_version,
            "kind": res.kind,
            "name": owner[2],
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    return out


# --- text -------------------------------------------------------------------------------


def _short(v: Any) -> str:
    if v is None:
        return "(absent)"
    s = json.dumps(v, separators=(",", ":")) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def describe(d: Desired) -> str:
    """A one-line summary of a desired object's essential fields, for plan output."""
    spec = d.body.get("spec") or {}
    k = d.resource.kind
    if k == "SpiderIPPool":
        return f"subnet {spec.get('subnet')}, ips {','.join(spec.get('ips') or [])}" + (
            f", gateway {spec['gateway']}" if spec.get("gateway") else ""
        )
    if k == "SpiderMultusConfig":
        t = spec.get("cniType", "custom")
        sec = spec.get(t) or {}
        return f"cniType {t}" + (f", bridge {sec['bridge']}" if sec.get("bridge") else "")
    if k == "OvsBridge":
        return (
            f"bridge {spec.get('bridge') or d.name}, uplinks {','.join(spec.get('uplinks') or [])}"
        )
    if k == "NetworkAttachmentDefinition":
        return f"from {d.rendered_from}: {spec.get('config')}"
    return ""


def format_plan(plan: Plan, *, verbose: bool = False) -> str:
    """Human-readable plan: one line per object, field changes under updates, then a summary."""
    lines = []
    if plan.against_empty:
        lines.append("No cluster configured: planning against an empty cluster.")
    for a in plan.actions:
        if a.op is Op.UNCHANGED and not verbose:
            continue
        head = f"  {SYMBOL[a.op]} {a.op.value:<9} {a.ref()}"
        if a.desired is not None and a.op is Op.CREATE:
            head += f"  ({describe(a.desired)})"
        if a.op is Op.BLOCKED:
            head += f"  [{a.blocked_op.value if a.blocked_op else ''} blocked: {a.reason}]"
        elif a.drift:
            verb = "reverting" if a.op is not Op.DRIFTED else "not reverted: self-heal is off"
            head += f"  [drift: {a.reason}, {verb}]"
        lines.append(head)
        if a.desired is not None and a.desired.source and a.op is not Op.UNCHANGED:
            lines.append(f"      source {a.desired.source}")
        for c in a.changes:
            lines.append(f"      {c.path}: {_short(c.before)} -> {_short(c.after)}")
    if plan.not_in_inventory:
        shown = ", ".join(_key_ref(k) for k in plan.not_in_inventory[:5])
        more = (
            f" and {len(plan.not_in_inventory) - 5} more" if len(plan.not_in_inventory) > 5 else ""
        )
        lines.append(
            f"  note: {len(plan.not_in_inventory)} object(s) carry this instance's labels but are "
            f"not in its inventory, so they are never pruned: {shown}{more}"
        )
    lines.append(("No changes. " if not plan.has_changes else "") + "Plan: " + plan.summary() + ".")
    return "\n".join(lines)


def _key_ref(key: Key) -> str:
    kind, ns, name = key
    return f"{kind} {ns + '/' if ns else ''}{name}"
