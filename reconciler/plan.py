"""Plan: compare the desired objects with what the cluster holds and decide every action.

Pure function of (desired, observed): no I/O. Comparison follows what GitOps tools learned the
hard way (reference/gitops.md): only fields we set are compared (server defaults and fields
other managers own never cause drift), and fields we applied before but no longer set (read from
our entry in ``metadata.managedFields``) count as drift to remove.

Safety rules decided here, shown in the plan as ``blocked`` with the reason:
- an object that exists without this instance's ownership labels is never updated or pruned; a
  desired object that collides with one (same kind and name) is a *collision*, which stops the
  whole pass before any write (all-or-nothing), with the ``kubectl label`` command that adopts it;
- prune only touches objects that carry the label AND are in this instance's inventory (with
  the uid recorded there), never an object someone copied the labels onto;
- a revision that renders no object prunes nothing unless ``allow_empty`` (Argo CD allowEmpty);
- a SpiderIPPool that still has allocations is never pruned, nor shrunk below them; one whose
  ``status.allocatedIPs`` cannot be read may have allocations, so it is neither pruned nor shrunk;
- ``spec.subnet`` and ``spec.ipVersion`` of a SpiderIPPool are immutable (Spiderpool);
- a SpiderIPPool is not created or grown over the addresses of a pool that stays in the cluster
  as it is (not in Git, or kept because its prune or update is blocked): two pools would hand
  out the same address;
- a SpiderMultusConfig naming a pool that is blocked is not written either (nor its NAD), so the
  cluster never holds a Multus config that allocates from a pool that is not what Git says.

Drift: a difference on an object whose Git body did not change since this instance applied it
(same inventory digest) was made in the cluster, by hand. It is reverted like any update
(self-heal), or with ``self_heal=False`` only reported (op ``drifted``). A ``spec`` field of a
user kind that Git leaves unset but the cluster has is a difference too (``Change.foreign``),
unless it equals the CRD schema's default (the API server filled it in): server-side apply cannot
remove a field another manager owns, so apply removes it with a merge patch.
"""

from __future__ import annotations

import bisect
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
    """One field difference: ``path`` (dotted), ``before`` (None if absent), ``after`` (None if removed).

    ``foreign``: a removal of a field Git does not set and this reconciler never applied (set by
    hand or by another manager); server-side apply cannot remove it, a merge patch does.
    """

    path: str
    before: Any
    after: Any
    foreign: bool = False
    parts: tuple[str, ...] = ()
    """The path as its keys (set for ``foreign`` changes: map keys may contain dots)."""


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
    collision: bool = False
    """The object exists in the cluster without this instance's labels: nothing of the pass
    is applied (see :attr:`Plan.collisions`)."""

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
    instance: str = vocab.DEFAULT_INSTANCE

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
    def collisions(self) -> list[Action]:
        """Desired objects that exist in the cluster without this instance's labels. Any of
        them stops the whole pass before the first write (all-or-nothing)."""
        return [a for a in self.actions if a.collision]

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


def diff(
    desired: Mapping[str, Any],
    live: Mapping[str, Any],
    manager: str,
    resource: Resource | None = None,
) -> list[Change]:
    """Field changes needed to make ``live`` carry ``desired`` (server-side apply semantics).

    A desired leaf that differs or is missing is a change; a leaf ``manager`` owns in ``live``
    that ``desired`` no longer sets is a removal. With ``resource`` (one of ``vocab.USER_KINDS``)
    a ``spec`` field ``live`` has and ``desired`` leaves unset is a removal too
    (``foreign=True``), unless it equals the default of ``resource``'s schema (see
    :func:`foreign_changes`). Everything else in ``live`` is left alone.
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
    if resource is not None and resource in vocab.USER_KINDS:
        seen = {c.path for c in changes}
        changes += [c for c in foreign_changes(desired, live, resource) if c.path not in seen]
    return changes


def foreign_changes(
    desired: Mapping[str, Any], live: Mapping[str, Any], resource: Resource
) -> list[Change]:
    """Removals of ``spec`` fields that ``live`` has and ``desired`` (Git) leaves unset.

    Walks ``live.spec`` alongside ``desired.spec``: a key Git does not set is reported
    (``Change(path, live value, None, foreign=True)``) unless its value is what the API server
    fills in, the default of ``resource``'s JSON Schema (``schemas/``, the CRD's structural
    defaults), or an object made only of such defaults. Lists are atomic (compared whole by
    :func:`diff`); maps are walked key by key, as server-side apply treats them. Sources:
    Kubernetes API concepts, "Server-Side Apply" (field management, merge strategy) and CRD
    "Defaulting".
    """
    out: list[Change] = []
    live_spec = live.get("spec")
    if not isinstance(live_spec, dict):
        return out
    want_spec = desired.get("spec")
    schema = _spec_schema(resource)
    _walk_foreign(
        live_spec, want_spec if isinstance(want_spec, dict) else {}, ("spec",), schema, out
    )
    return out


def _walk_foreign(
    have: dict[str, Any],
    want: dict[str, Any],
    path: tuple[str, ...],
    schema: Mapping[str, Any],
    out: list[Change],
) -> None:
    props: Mapping[str, Any] = _props(schema)
    extra = schema.get("additionalProperties")
    for key, value in have.items():
        sub = props.get(key) if key in props else (extra if isinstance(extra, dict) else {})
        sub = sub if isinstance(sub, dict) else {}
        p = (*path, str(key))
        if key in want:
            if isinstance(value, dict) and isinstance(want[key], dict):
                _walk_foreign(value, want[key], p, sub, out)
            continue
        if _defaulted(value, sub):
            continue
        out.append(Change(".".join(p), value, None, foreign=True, parts=p))


def _props(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    p = schema.get("properties")
    return p if isinstance(p, Mapping) else {}


def _defaulted(value: Any, schema: Mapping[str, Any]) -> bool:
    """True when ``value`` is what the API server would fill in by itself: the schema's
    ``default``, or an object whose every field is defaulted (``{}`` included)."""
    if "default" in schema and _same(value, schema["default"]):
        return True
    if isinstance(value, dict):
        props = _props(schema)
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            sub = props.get(k) if k in props else (extra if isinstance(extra, dict) else None)
            if not isinstance(sub, dict) or not _defaulted(v, sub):
                return False
        return True
    return False


_SPEC_SCHEMAS: dict[str, dict[str, Any]] = {}


def _spec_schema(resource: Resource) -> dict[str, Any]:
    """The ``spec`` part of ``resource``'s JSON Schema (``schemas/``; {} when it has none)."""
    got = _SPEC_SCHEMAS.get(resource.kind)
    if got is None:
        from reconciler.validation import load_schema

        try:
            spec = load_schema(resource).get("properties", {}).get("spec") or {}
        except FileNotFoundError:
            spec = {}
        got = _SPEC_SCHEMAS[resource.kind] = spec if isinstance(spec, dict) else {}
    return got


# --- safety rules -----------------------------------------------------------------------


def owned_by(live: Mapping[str, Any], instance: str) -> bool:
    """True when ``live`` carries the ownership labels of reconciler ``instance``."""
    labels = (live.get("metadata") or {}).get("labels") or {}
    return (
        labels.get(vocab.LABEL_INSTANCE) == instance
        and labels.get(vocab.LABEL_MANAGED_BY) == vocab.MANAGED_BY_VALUE
    )


def collision_reason(resource: Resource, live: Mapping[str, Any], instance: str) -> str:
    """Why a desired object that exists without ``instance``'s labels is not applied, and the
    ``kubectl label`` command that adopts it (Kubernetes labels; ``--overwrite`` because the
    object may carry another instance's value)."""
    md = live.get("metadata") or {}
    labels = md.get("labels") or {}
    other = labels.get(vocab.LABEL_INSTANCE)
    owner = (
        f"it belongs to reconciler instance {other!r}"
        if other and other != instance
        else f"it lacks the labels {vocab.LABEL_INSTANCE}={instance} and "
        f"{vocab.LABEL_MANAGED_BY}={vocab.MANAGED_BY_VALUE}"
    )
    ns = f" -n {md['namespace']}" if resource.namespaced and md.get("namespace") else ""
    cmd = (
        f"kubectl label{ns} {resource.plural}.{resource.group} {md.get('name', '')} "
        f"{vocab.LABEL_INSTANCE}={instance} "
        f"{vocab.LABEL_MANAGED_BY}={vocab.MANAGED_BY_VALUE} --overwrite"
    )
    return (
        f"exists in the cluster but is not managed by this reconciler ({owner}); nothing is "
        f"applied while it collides with Git. To adopt it: {cmd}; or rename the object in Git"
    )


def pool_records(live: Mapping[str, Any]) -> tuple[dict[netaddr.IPAddress, dict[str, Any]], str]:
    """Allocation records of a live SpiderIPPool, keyed by parsed address, and a problem.

    Returns ``(records, problem)``; ``problem`` is "" when ``status.allocatedIPs`` was read in
    full, else says what could not be read (not JSON, not an object of records, keys that are
    not IP addresses, or ``allocatedIPCount`` above the records listed): the pool may then
    hold allocations this function cannot see, and callers must assume it does. Keys are parsed
    leniently (surrounding blanks are ignored). Never raises. Source: reference/spiderpool.md
    (``status.allocatedIPs`` is a JSON string mapping IP -> {pod, podUid}).
    """
    status = live.get("status")
    status = status if isinstance(status, Mapping) else {}
    raw = status.get("allocatedIPs")
    records: dict[netaddr.IPAddress, dict[str, Any]] = {}
    if raw:
        try:
            data = json.loads(raw) if isinstance(raw, str) else raw
        except (ValueError, RecursionError) as exc:
            return {}, f"status.allocatedIPs is not valid JSON ({exc})"
        if not isinstance(data, Mapping):
            return {}, "status.allocatedIPs is not a JSON object of allocation records"
        bad: list[str] = []
        for key, rec in data.items():
            try:
                ip = netaddr.IPAddress(str(key).strip())
            except (netaddr.AddrFormatError, ValueError, TypeError):
                bad.append(repr(key))
                continue
            records[ip] = dict(rec) if isinstance(rec, Mapping) else {}
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            return records, f"status.allocatedIPs has keys that are not IP addresses: {shown}"
    count = status.get("allocatedIPCount")
    if isinstance(count, int) and not isinstance(count, bool) and count > len(records):
        return records, (
            f"status.allocatedIPCount is {count} but status.allocatedIPs lists {len(records)}"
        )
    return records, ""


def pool_allocations(live: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Allocation records of a live SpiderIPPool by address text (empty when none; what could
    not be read is left out: use :func:`pool_records` to know whether something was)."""
    return {str(ip): rec for ip, rec in pool_records(live)[0].items()}


def _pods(records: Mapping[Any, Mapping[str, Any]], ips: Iterable[Any]) -> str:
    ips = list(ips)
    shown = ", ".join(f"{ip} ({records[ip].get('pod', '?')})" for ip in ips[:5])
    return shown + (f" and {len(ips) - 5} more" if len(ips) > 5 else "")


def pool_update_block(desired: Mapping[str, Any], live: Mapping[str, Any]) -> str:
    """Why a SpiderIPPool update may not be applied, or "" when it may.

    Immutable ``subnet``/``ipVersion``; allocated IPs must stay allocatable (Spiderpool: an
    allocated IP may not be removed from the pool); when the live status cannot be read in
    full, no address may leave the pool (it may be allocated). Never raises.
    """
    dspec, lspec = desired.get("spec") or {}, live.get("spec") or {}
    for f in ("subnet", "ipVersion"):
        if f in lspec and f in dspec and not _same_value(lspec[f], dspec[f]):
            return f"spec.{f} is immutable ({lspec[f]} -> {dspec[f]}); delete and recreate the pool"
    records, problem = pool_records(live)
    try:
        keep = ippool.allocatable(dspec)
    except (ValueError, TypeError, netaddr.AddrFormatError) as exc:
        return f"the addresses in Git cannot be read ({exc}); not applied"
    lost = sorted(ip for ip in records if ip not in keep)
    if lost:
        return (
            f"would remove allocated IPs from the pool: {_pods(records, lost)}; release them first"
        )
    if problem:
        try:
            removed = ippool.allocatable(lspec) - keep
        except (ValueError, TypeError, netaddr.AddrFormatError):
            removed = None  # the live addresses cannot be read: assume some leave
        if removed is None or removed.size:
            return (
                f"{problem}: the pool may hold allocations this reconciler cannot see, so no "
                "address is removed from it; repair or clear status.allocatedIPs first"
            )
    return ""


def _same_value(a: Any, b: Any) -> bool:
    """Equal as the API server stores them: numbers by value (4 and 4.0), the rest as text."""
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool | str):
        return not isinstance(b, bool) and a == b
    return str(a) == str(b)


def pool_prune_block(live: Mapping[str, Any]) -> str:
    """Why a live SpiderIPPool may not be deleted, or "". Never raises."""
    records, problem = pool_records(live)
    if records:
        pods = sorted({str(r.get("pod", "?")) for r in records.values()})
        shown = ", ".join(pods[:5]) + (f" and {len(pods) - 5} more" if len(pods) > 5 else "")
        extra = f"; also {problem}" if problem else ""
        return f"still has {len(records)} allocated IP(s) (pods {shown}){extra}; not pruned"
    if problem:
        return (
            f"{problem}: it may still hold allocations, so it is not pruned; repair or clear "
            "status.allocatedIPs first"
        )
    return ""


def pools_used(body: Mapping[str, Any]) -> set[str]:
    """Pool names a SpiderMultusConfig body's sections name in ``ippools`` (ipv4 and ipv6)."""
    spec = body.get("spec") or {}
    out: set[str] = set()
    if not isinstance(spec, Mapping):
        return out
    for sec in spec.values():
        if isinstance(sec, Mapping) and isinstance(sec.get("ippools"), Mapping):
            for names in sec["ippools"].values():
                if isinstance(names, list):
                    out.update(str(n) for n in names)
    return out


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
    that only revert hand edits into ``drifted`` (reported, not applied). A desired object that
    exists without this instance's labels is blocked as a collision (``Plan.collisions``: the
    whole pass is refused); a pool blocked for any reason blocks the Multus configs that name it
    and their NADs. A pool whose judgement fails (unreadable status) is blocked with the reason,
    never an exception: one pool never stops the plan of the others.

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
            a.op, a.blocked_op, a.collision = Op.BLOCKED, Op.UPDATE, True
            a.reason = collision_reason(d.resource, live, instance)
            actions.append(a)
            continue
        stamp = (live.get("metadata", {}).get("resourceVersion"), want, uid)
        seen = old_memo.get(key)
        if stamp[0] is not None and seen is not None and seen[0] == stamp:
            a.changes = list(seen[1])
        else:
            if uid and d.owner is not None:
                body = with_owner(body, observed.get(d.owner) or {}, d.owner, uid)
            a.changes = diff(body, live, manager, d.resource)
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
    _block_overlaps(actions, observed, wanted)
    _block_dependents(actions)
    if memo is not None:
        memo.clear()
        memo.update(new_memo)
    return Plan(
        actions, against_empty=against_empty, not_in_inventory=not_in_inventory, instance=instance
    )


Spans = tuple[tuple[int, int, int], ...]
"""(IP version, first, last) of each range of an IPSet, as integers."""

_COVERAGE: dict[str, tuple[netaddr.IPSet, Spans]] = {}
"""What :func:`_coverage` found, by the fields it reads (see there)."""
_COVERAGE_MAX = 100_000


def _coverage(pool: Mapping[str, Any]) -> tuple[netaddr.IPSet, Spans]:
    """What a live SpiderIPPool covers, and its ranges as integers: its allocatable addresses
    (none when they cannot be read: no IPAM hands those out) and every recorded one (read
    whatever the spec says).

    Remembered by the three fields it reads (``spec.ips``, ``spec.excludeIPs``,
    ``status.allocatedIPs``): a pass that writes a pool checks it against every pool that stays
    in the cluster, thousands of them that another instance or a person made, and working out
    an IPSet costs about a millisecond each (3,000 staying pools: seconds of every such pass).
    The set returned is shared: callers must not change it.
    """
    spec = pool.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    status = pool.get("status")
    status = status if isinstance(status, Mapping) else {}
    try:
        key = json.dumps(
            [spec.get("ips"), spec.get("excludeIPs"), status.get("allocatedIPs")],
            sort_keys=True, separators=(",", ":"),
        )  # fmt: skip
    except (TypeError, ValueError):
        key = None
    if key is not None and (hit := _COVERAGE.get(key)) is not None:
        return hit
    try:
        covered = ippool.allocatable(spec)
    except (ValueError, TypeError, netaddr.AddrFormatError):
        covered = netaddr.IPSet()
    records, _problem = pool_records(pool)
    ips = covered | netaddr.IPSet(records)
    out = (ips, tuple((r.version, r.first, r.last) for r in ips.iter_ipranges()))
    if key is not None:
        if len(_COVERAGE) >= _COVERAGE_MAX:
            _COVERAGE.clear()
        _COVERAGE[key] = out
    return out


def _block_overlaps(
    actions: list[Action], observed: Mapping[Key, dict[str, Any]], wanted: set[Key]
) -> None:
    """Block a SpiderIPPool create or update whose addresses overlap a pool that stays in the
    cluster as it is after this pass: one not in Git (not ours, not in the inventory, or
    pruning disabled), one whose prune is blocked (it still has allocations), or one whose
    update is blocked (it keeps its live addresses). The validator already refuses overlaps
    between pools in Git; without this, renaming a pool that has allocations (the old one is
    kept, the new one created over the same range) would let both hand out one address.
    Spiderpool's admission webhook refuses such a pool; underlay has none, so the plan does."""
    writes = [
        a
        for a in actions
        if a.resource is vocab.SPIDER_IPPOOL
        and a.desired is not None
        and a.op in (Op.CREATE, Op.UPDATE)
    ]
    if not writes:  # a pass that writes no pool has nothing to check (and stays cheap)
        return
    pruned = {a.key for a in actions if a.op is Op.PRUNE}
    staying: dict[str, tuple[Mapping[str, Any], str]] = {}
    for a in actions:
        if a.resource is vocab.SPIDER_IPPOOL and a.op is Op.BLOCKED and a.live is not None:
            staying[a.name] = (a.live, _kept_because(a))
    for key, live in observed.items():
        if key[0] == vocab.SPIDER_IPPOOL.kind and key not in wanted and key not in pruned:
            staying.setdefault(key[2], (live, "it is in the cluster but not in Git, and is "
                               "not pruned by this reconciler"))  # fmt: skip
    if not staying:
        return
    coverage = {name: _coverage(pool) for name, (pool, _) in staying.items()}
    covered: dict[str, netaddr.IPSet] = {name: c[0] for name, c in coverage.items()}
    union = _Intervals.of_spans(span for c in coverage.values() for span in c[1])
    mine: dict[str, netaddr.IPSet] = {}
    for a in writes:
        try:
            mine[a.name] = ippool.allocatable(a.desired.body.get("spec") or {})  # type: ignore[union-attr]
        except (ValueError, TypeError, netaddr.AddrFormatError):
            continue  # the validator refuses these
    blocked_one = True
    while blocked_one:  # an update blocked here keeps its live addresses: check again
        blocked_one = False
        for a in writes:
            ips = mine.get(a.name)
            if a.op not in (Op.CREATE, Op.UPDATE) or ips is None or not union.overlaps(ips):
                continue
            for other, theirs in sorted(covered.items()):
                if other == a.name or not _Intervals([theirs]).overlaps(ips):
                    continue
                common = ips & theirs
                first = next(iter(common.iter_ipranges()))
                more = common.size - first.size
                shown = (str(first[0]) if first.size == 1 else str(first)) + (
                    f" and {more} more" if more else ""
                )
                a.blocked_op, a.op = a.op, Op.BLOCKED
                a.reason = (
                    f"its addresses overlap SpiderIPPool {other} ({shown}), which stays in the "
                    f"cluster because {staying[other][1]}; both pools would hand out the same "
                    f"addresses. Release or remove SpiderIPPool {other} first, or give this "
                    "pool other addresses"
                )
                if a.live is not None:  # an update held back: its live addresses stay
                    staying[a.name] = (a.live, _kept_because(a))
                    coverage[a.name] = _coverage(a.live)
                    covered[a.name] = coverage[a.name][0]
                    union = _Intervals.of_spans(span for c in coverage.values() for span in c[1])
                    blocked_one = True
                break


class _Intervals:
    """Address ranges as sorted, merged integer intervals per IP version, for overlap checks
    in O(log n) per range (an IPSet intersection walks every range of both sets)."""

    def __init__(self, sets: Iterable[netaddr.IPSet]) -> None:
        self._merge((r.version, r.first, r.last) for ips in sets for r in ips.iter_ipranges())

    @classmethod
    def of_spans(cls, spans: Iterable[tuple[int, int, int]]) -> _Intervals:
        """The intervals of (IP version, first, last) ranges (see :func:`_coverage`)."""
        out = cls.__new__(cls)
        out._merge(spans)
        return out

    def _merge(self, spans_in: Iterable[tuple[int, int, int]]) -> None:
        by: dict[int, list[tuple[int, int]]] = {}
        for version, first, last in spans_in:
            by.setdefault(version, []).append((first, last))
        self._by: dict[int, tuple[list[int], list[int]]] = {}
        for version, spans in by.items():
            spans.sort()
            starts: list[int] = []
            ends: list[int] = []
            for first, last in spans:
                if ends and first <= ends[-1] + 1:
                    ends[-1] = max(ends[-1], last)
                else:
                    starts.append(first)
                    ends.append(last)
            self._by[version] = (starts, ends)

    def overlaps(self, ips: netaddr.IPSet) -> bool:
        """True when any address of ``ips`` is in these intervals."""
        for r in ips.iter_ipranges():
            found = self._by.get(r.version)
            if found is None:
                continue
            starts, ends = found
            i = bisect.bisect_right(starts, r.last) - 1
            if i >= 0 and ends[i] >= r.first:
                return True
        return False


def _kept_because(a: Action) -> str:
    return f"its {a.blocked_op.value if a.blocked_op else ''} is blocked: {a.reason}"


def _block_dependents(actions: list[Action]) -> None:
    """Block the writes that depend on a blocked one: a SpiderMultusConfig naming a pool whose
    create or update is blocked, and the NetworkAttachmentDefinition of a SpiderMultusConfig
    whose write is blocked (a Multus config must never allocate from a pool that is not what
    Git says)."""
    pools = {
        a.name: a.reason
        for a in actions
        if a.resource is vocab.SPIDER_IPPOOL and a.op is Op.BLOCKED and a.desired is not None
    }
    blocked_smc: dict[Key, str] = {}
    for a in actions:
        if a.desired is None or a.op not in (Op.CREATE, Op.UPDATE):
            continue
        why = ""
        if a.resource is vocab.SPIDER_MULTUS_CONFIG and pools:
            bad = sorted(pools_used(a.desired.body) & set(pools))
            if bad:
                why = f"it uses SpiderIPPool {bad[0]}, which is blocked ({pools[bad[0]]})"
        elif a.desired.owner is not None and a.desired.owner in blocked_smc:
            owner = a.desired.owner
            why = f"its SpiderMultusConfig {owner[1]}/{owner[2]} is blocked"
        if why:
            a.blocked_op, a.op, a.reason = a.op, Op.BLOCKED, why
            if a.resource is vocab.SPIDER_MULTUS_CONFIG:
                blocked_smc[a.key] = why


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
        uplinks = [str(u) for u in spec.get("uplinks") or []]
        bridge = spec.get("bridge") or d.name
        move = spec.get("moveAddresses", True) is not False
        sel = spec.get("nodeSelector") or {}
        nodes = ",".join(f"{k}={v}" for k, v in sel.items()) if isinstance(sel, dict) else ""
        return (
            f"bridge {bridge}, uplinks {','.join(uplinks)}"
            + (f"; moves {'/'.join(uplinks)}'s addresses and routes to {bridge}" if move else "")
            + f"; persistence {spec.get('persistence') or 'auto'}"
            + f"; nodes {nodes or 'all'}"
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
    if plan.collisions:
        refs = ", ".join(a.ref() for a in plan.collisions[:5])
        more = f" and {len(plan.collisions) - 5} more" if len(plan.collisions) > 5 else ""
        lines.append(
            f"  Nothing would be applied: {len(plan.collisions)} object(s) of this revision "
            f"exist in the cluster without this instance's labels ({refs}{more}); adopt or "
            "rename them first (see above)."
        )
    if plan.has_changes:
        head = ""
    elif plan.blocked or plan.count(Op.DRIFTED):
        head = "Nothing to apply, but the cluster does not match Git (see blocked/drifted). "
    else:
        head = "No changes. "
    lines.append(head + "Plan: " + plan.summary() + ".")
    return "\n".join(lines)


def _key_ref(key: Key) -> str:
    kind, ns, name = key
    return f"{kind} {ns + '/' if ns else ''}{name}"
