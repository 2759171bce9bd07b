"""Server-side apply and managed fields, as the API server's field manager computes them.

This is a port of the parts of sigs.k8s.io/structured-merge-diff (typed ToFieldSet, Compare,
Merge, RemoveItems; merge.Updater Update/Apply/prune) and of
k8s.io/apimachinery/pkg/util/managedfields (managed fields encoding, stripped metadata
fields, conflict errors) that a client can observe:

- a field path is a tuple of path elements spelled as in ``fieldsV1``: ``f:<field>``,
  ``k:{"key":value}`` (items of ``x-kubernetes-list-type: map`` lists), ``v:<json>`` (items of
  ``set`` lists), ``i:<n>``;
- every manager entry (manager, operation Apply/Update, subresource) owns a set of paths;
- Apply merges the configuration into the live object, removes what this manager applied last
  time and no longer applies unless someone else owns it, and fails with conflicts when it
  changes a field another manager owns (``force`` takes ownership instead);
- Update (PUT, merge/JSON/strategic patch, create) takes ownership of what it changed and
  removes changed fields from other managers.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Any

from tests.kube.shapes import DEDUCED, Shape

Path = tuple[str, ...]
MISSING: Any = object()

STRIPPED: frozenset[Path] = frozenset(
    [
        ("f:apiVersion",),
        ("f:kind",),
        ("f:metadata",),
        ("f:metadata", "f:name"),
        ("f:metadata", "f:namespace"),
        ("f:metadata", "f:creationTimestamp"),
        ("f:metadata", "f:selfLink"),
        ("f:metadata", "f:uid"),
        ("f:metadata", "f:clusterName"),
        ("f:metadata", "f:generation"),
        ("f:metadata", "f:managedFields"),
        ("f:metadata", "f:resourceVersion"),
    ]
)
"""Paths never recorded in managed fields (managedfields/internal/stripmeta.go)."""


class SSAError(Exception):
    """The object cannot be represented along its schema (bad list-map item, undeclared field)."""


@dataclass
class Conflict:
    """One field another manager owns: ``manager`` is that entry, ``path`` the field."""

    manager: Entry
    path: Path


class ConflictError(Exception):
    """Apply would change fields owned by other managers (409 with FieldManagerConflict causes)."""

    def __init__(self, conflicts: list[Conflict]) -> None:
        super().__init__(conflict_message(conflicts))
        self.conflicts = conflicts

    def causes(self) -> list[dict[str, str]]:
        return [
            {
                "reason": "FieldManagerConflict",
                "message": f"conflict with {c.manager.printed()}",
                "field": path_string(c.path),
            }
            for c in self.conflicts
        ]


def conflict_message(conflicts: list[Conflict]) -> str:
    """The Status message of an apply conflict (managedfields/internal/conflict.go)."""
    if len(conflicts) == 1:
        c = conflicts[0]
        return f"Apply failed with 1 conflict: conflict with {c.manager.printed()}: {path_string(c.path)}"
    by: dict[str, list[str]] = {}
    for c in conflicts:
        by.setdefault(c.manager.printed(), []).append(path_string(c.path))
    lines: list[str] = []
    for m in sorted(by):
        lines.append(f"conflicts with {m}:")
        lines.extend(f"- {p}" for p in by[m])
    return f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)


def _fmt_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def path_string(p: Path) -> str:
    """Human form of a path as fieldpath.Path.String prints it: ``.spec.ports[port=80]``."""
    out = []
    for pe in p:
        kind, body = pe[0], pe[2:]
        if kind == "f":
            out.append("." + body)
        elif kind == "k":
            keys = json.loads(body)
            out.append("[" + ",".join(f"{k}={_fmt_value(v)}" for k, v in keys.items()) + "]")
        elif kind == "v":
            out.append(f"[={_fmt_value(json.loads(body))}]")
        else:
            out.append(f"[{body}]")
    return "".join(out)


# ---- typed-value walks -------------------------------------------------------------------------


def _dumps(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _list_type(shape: Shape | None) -> str:
    if shape is None or shape is DEDUCED or shape.type != "array":
        return "atomic"
    return shape.list_type if shape.list_type in ("set", "map") else "atomic"


def _map_atomic(shape: Shape | None) -> bool:
    return shape is not None and shape.map_atomic


def item_pe(item: Any, shape: Shape) -> str:
    """Path element of one item of a set or map list."""
    if shape.list_type == "map":
        if not isinstance(item, dict):
            raise SSAError("associative list with keys has an element that is not a map")
        keys: dict[str, Any] = {}
        for k in sorted(shape.list_keys):
            if k in item:
                keys[k] = item[k]
                continue
            ks = shape.items.child(k)[0] if shape.items is not None else None
            if ks is not None and ks.has_default:
                keys[k] = ks.default
                continue
            raise SSAError(
                f'associative list with keys has an element that omits key field "{k}" '
                "(and doesn't have default value)"
            )
        return "k:" + _dumps(keys)
    return "v:" + _dumps(item)


def _child(shape: Shape | None, key: str) -> tuple[Shape | None, bool]:
    if shape is None:
        return DEDUCED, False
    return shape.child(key)


def to_field_set(
    v: Any, shape: Shape | None, path: Path = (), out: set[Path] | None = None
) -> set[Path]:
    """Fields ``v`` sets (typed.TypedValue.ToFieldSet); SSAError for undeclared fields."""
    if out is None:
        out = set()
    if isinstance(v, dict):
        if _map_atomic(shape):
            out.add(path)
            return out
        for k, cv in v.items():
            cs, declared = _child(shape, k)
            p = (*path, "f:" + k)
            if cs is None:
                raise SSAError(f"{path_string(p)}: field not declared in schema")
            to_field_set(cv, cs, p, out)
            if cv is None or (isinstance(cv, dict) and not cv) or not declared:
                out.add(p)
        return out
    if isinstance(v, list):
        if _list_type(shape) == "atomic":
            out.add(path)
            return out
        assert shape is not None
        seen: set[str] = set()
        for item in v:
            pe = item_pe(item, shape)
            p = (*path, pe)
            if pe in seen:
                out.add(p)
                continue
            seen.add(pe)
            to_field_set(item, shape.items, p, out)
            out.add(p)
        return out
    out.add(path)
    return out


def _empty(v: Any) -> bool:
    return v is MISSING or (isinstance(v, dict | list) and not v)


def compare(lhs: Any, rhs: Any, shape: Shape | None) -> tuple[set[Path], set[Path], set[Path]]:
    """``(added, modified, removed)`` paths from ``lhs`` to ``rhs`` (typed.Compare)."""
    added: set[Path] = set()
    modified: set[Path] = set()
    removed: set[Path] = set()
    _compare(lhs, rhs, shape, (), added, modified, removed)
    return added, modified, removed


def _compare(
    lhs: Any,
    rhs: Any,
    shape: Shape | None,
    path: Path,
    added: set[Path],
    modified: set[Path],
    removed: set[Path],
) -> None:
    lk = type(lhs) if lhs is not MISSING else None
    rk = type(rhs) if rhs is not MISSING else None
    kinds = {k for k in (lk, rk) if k is not None}
    leaf = True
    if kinds == {dict} and not _map_atomic(shape) and not (_empty(lhs) and _empty(rhs)):
        leaf = False
        ld = lhs if lhs is not MISSING else {}
        rd = rhs if rhs is not MISSING else {}
        for k in dict.fromkeys([*ld, *rd]):
            cs, _ = _child(shape, k)
            _compare(
                ld.get(k, MISSING),
                rd.get(k, MISSING),
                cs,
                (*path, "f:" + k),
                added,
                modified,
                removed,
            )
    elif kinds == {list} and _list_type(shape) != "atomic" and not (_empty(lhs) and _empty(rhs)):
        leaf = False
        assert shape is not None
        li = _index_items(lhs if lhs is not MISSING else [], shape)
        ri = _index_items(rhs if rhs is not MISSING else [], shape)
        for pe in dict.fromkeys([*li, *ri]):
            _compare(
                li.get(pe, MISSING),
                ri.get(pe, MISSING),
                shape.items,
                (*path, pe),
                added,
                modified,
                removed,
            )
    if leaf:
        if lhs is MISSING:
            added.add(path)
        elif rhs is MISSING:
            removed.add(path)
        elif not _same(lhs, rhs):
            modified.add(path)
        return
    if lhs is MISSING:
        added.add(path)
    elif rhs is MISSING:
        removed.add(path)


def _same(a: Any, b: Any) -> bool:
    return json_equal(a, b)


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values where ``true`` is not ``1`` (value.Equals)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(json_equal(v, b[k]) for k, v in a.items())
        )
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(b, dict | list):
        return False
    return bool(a == b)


def _index_items(items: list[Any], shape: Shape) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        pe = item_pe(item, shape)
        out.setdefault(pe, item)
    return out


def merge(lhs: Any, rhs: Any, shape: Shape | None) -> Any:
    """Merge configuration ``rhs`` into live ``lhs`` (typed.Merge): rhs wins on leaves."""
    if rhs is MISSING:
        return lhs
    if lhs is MISSING:
        return rhs
    if (
        isinstance(lhs, dict)
        and isinstance(rhs, dict)
        and not _map_atomic(shape)
        and not (not lhs and not rhs)
    ):
        out = {}
        for k in dict.fromkeys([*lhs, *rhs]):
            cs, _ = _child(shape, k)
            out[k] = merge(lhs.get(k, MISSING), rhs.get(k, MISSING), cs)
        return out
    if (
        isinstance(lhs, list)
        and isinstance(rhs, list)
        and _list_type(shape) != "atomic"
        and (lhs or rhs)
    ):
        assert shape is not None
        return _merge_list(lhs, rhs, shape)
    return rhs


def _merge_list(lhs: list[Any], rhs: list[Any], shape: Shape) -> list[Any]:
    """Port of mergingWalker.visitListItems: rhs order wins for shared items."""
    rpes = [item_pe(x, shape) for x in rhs]
    robs: dict[str, Any] = {}
    for pe, x in zip(rpes, rhs, strict=True):
        if pe in robs:
            raise SSAError(f"duplicate entries for key {path_string((pe,))}")
        robs[pe] = x
    lpes = [item_pe(x, shape) for x in lhs]
    lobs: dict[str, Any] = {}
    for pe, x in zip(lpes, lhs, strict=True):
        lobs[pe] = None if pe in lobs else x
    shared = [pe for pe in rpes if pe in lobs]
    nxt = shared.pop(0) if shared else None
    merged_r: set[str] = set()
    out: list[Any] = []
    li = ri = 0
    while li < len(lpes) or ri < len(rpes):
        if li < len(lpes) and ri < len(rpes):
            pe = lpes[li]
            if pe == rpes[ri]:
                merged_r.add(pe)
                lc = lobs.get(pe)
                out.append(merge(lc if lc is not None else MISSING, robs[pe], shape.items))
                li += 1
                ri += 1
                nxt = shared.pop(0) if shared else None
                continue
            if pe in robs and nxt is not None and nxt != pe:
                li += 1
                continue
        if li < len(lpes):
            pe = lpes[li]
            if pe not in robs:
                out.append(lhs[li])
                li += 1
                continue
            if pe in merged_r:
                li += 1
        if ri < len(rpes):
            pe = rpes[ri]
            merged_r.add(pe)
            lc = lobs.get(pe, MISSING)
            out.append(merge(lc if lc is not None else MISSING, robs[pe], shape.items))
            ri += 1
            if nxt is not None and nxt == pe:
                nxt = shared.pop(0) if shared else None
    return out


# ---- sets as tries -----------------------------------------------------------------------------


def _trie(paths: set[Path]) -> dict[Any, Any]:
    root: dict[Any, Any] = {}
    for p in paths:
        node = root
        for pe in p:
            node = node.setdefault(pe, {})
        node[None] = True
    return root


_GONE = object()


def remove_items(v: Any, paths: set[Path], shape: Shape | None) -> Any:
    """Remove ``paths`` (and everything under them) from ``v`` (typed.RemoveItems).

    Maps and lists left empty by the removal disappear from their parent.
    """
    if not paths:
        return v
    r = _remove(v, _trie(paths), shape)
    return {} if r is _GONE else r


def _remove(v: Any, node: dict[Any, Any], shape: Shape | None) -> Any:
    if isinstance(v, dict):
        if _map_atomic(shape):
            return v
        out = {}
        for k, cv in v.items():
            child = node.get("f:" + k)
            if child is None:
                out[k] = cv
                continue
            if child.get(None):
                continue
            nv = _remove(cv, child, _child(shape, k)[0])
            if nv is not _GONE:
                out[k] = nv
        return out if out else _GONE
    if isinstance(v, list):
        if _list_type(shape) == "atomic":
            return v
        assert shape is not None
        items = []
        for item in v:
            child = node.get(item_pe(item, shape))
            if child is None:
                items.append(item)
                continue
            if child.get(None):
                continue
            nv = _remove(item, child, shape.items)
            if nv is not _GONE:
                items.append(nv)
        return items if items else _GONE
    return v


def ensure_named(paths: set[Path], shape: Shape | None) -> set[Path]:
    """``paths`` plus every ancestor that is a declared struct field (EnsureNamedFieldsAreMembers)."""
    out = set(paths)
    for p in paths:
        cur = shape
        for i, pe in enumerate(p[:-1]):
            if pe.startswith("f:"):
                cs, declared = _child(cur, pe[2:])
                if declared:
                    out.add(p[: i + 1])
                cur = cs
            else:
                cur = cur.items if cur is not None else None
    return out


def exclude(paths: set[Path], prefixes: frozenset[Path]) -> set[Path]:
    """Drop every path that is in ``prefixes`` or below one of them (ExcludeFields)."""
    if not prefixes:
        return paths
    return {p for p in paths if not any(p[: len(x)] == x for x in prefixes)}


# ---- managed fields entries ------------------------------------------------------------------


def now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Entry:
    """One ``metadata.managedFields`` entry with its field set decoded."""

    manager: str
    operation: str
    api_version: str
    subresource: str = ""
    time: str | None = None
    fields: set[Path] = field(default_factory=set)

    def key(self) -> tuple[str, str, str, str]:
        return (
            self.manager,
            self.operation,
            self.subresource,
            self.api_version if self.operation == "Update" else "",
        )

    def printed(self) -> str:
        """How a conflict names this manager (managedfields/internal/conflict.go printManager)."""
        s = json.dumps(self.manager)
        if self.subresource:
            s += f' with subresource "{self.subresource}"'
        if self.operation == "Update":
            s += f" using {self.api_version}"
        return s


Managers = dict[tuple[str, str, str, str], Entry]


def _pe_sort_key(pe: str) -> tuple[int, str]:
    return (
        {"f": 0, "k": 1, "v": 2, "i": 3}.get(pe[0], 4),
        pe[2:] if pe[0] != "i" else pe[2:].zfill(12),
    )


def encode_fields(paths: set[Path]) -> dict[str, Any]:
    """fieldsV1 JSON of a set (fieldpath.Set.ToJSON): ``.`` marks a member that has children."""
    return _emit(_trie(paths))


def _emit(node: dict[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    children = [k for k in node if k is not None]
    if node.get(None) and children:
        out["."] = {}
    for k in sorted(children, key=_pe_sort_key):
        out[k] = _emit(node[k])
    return out


def decode_fields(fv1: Any, prefix: Path = ()) -> set[Path]:
    """Inverse of ``encode_fields``; raises SSAError on malformed input."""
    if not isinstance(fv1, dict):
        raise SSAError("fieldsV1 must be an object")
    out: set[Path] = set()
    for k, v in fv1.items():
        if k == ".":
            if prefix:
                out.add(prefix)
            continue
        if len(k) < 2 or k[1] != ":" or k[0] not in "fkvi":
            raise SSAError(f"unknown path element type in {k!r}")
        p = (*prefix, k)
        if not isinstance(v, dict):
            raise SSAError("fieldsV1 values must be objects")
        if not v:
            out.add(p)
        else:
            out |= decode_fields(v, p)
    return out


def decode(managed: Any) -> Managers:
    """Managers from ``metadata.managedFields``; malformed input yields no managers."""
    out: Managers = {}
    if not isinstance(managed, list):
        return out
    try:
        for e in managed:
            if not isinstance(e, dict) or not e:
                return {}
            ent = Entry(
                manager=str(e.get("manager", "")),
                operation=str(e.get("operation", "")),
                api_version=str(e.get("apiVersion", "")),
                subresource=str(e.get("subresource", "") or ""),
                time=e.get("time"),
                fields=decode_fields(e.get("fieldsV1") or {}),
            )
            if ent.operation not in ("Apply", "Update"):
                return {}
            out[ent.key()] = ent
    except SSAError:
        return {}
    return out


def encode(managers: Managers) -> list[dict[str, Any]]:
    """``metadata.managedFields`` list, sorted as the API server sorts it."""

    def sk(e: Entry) -> tuple[str, str, str, str, str]:
        return (e.operation, e.time or "", e.manager, e.api_version, e.subresource)

    out = []
    for e in sorted(managers.values(), key=sk):
        d: dict[str, Any] = {
            "manager": e.manager,
            "operation": e.operation,
            "apiVersion": e.api_version,
        }
        if e.time:
            d["time"] = e.time
        d["fieldsType"] = "FieldsV1"
        d["fieldsV1"] = encode_fields(e.fields)
        if e.subresource:
            d["subresource"] = e.subresource
        out.append(d)
    return out


def without_managed(obj: Any) -> Any:
    """Shallow copy of ``obj`` without ``metadata.managedFields``."""
    if not isinstance(obj, dict):
        return obj
    md = obj.get("metadata")
    if not isinstance(md, dict) or "managedFields" not in md:
        return obj
    o = dict(obj)
    o["metadata"] = {k: v for k, v in md.items() if k != "managedFields"}
    return o


def _update(
    live: Any,
    new: Any,
    shape: Shape,
    managers: Managers,
    workflow: tuple[str, str, str, str],
    force: bool,
    ignored: frozenset[Path],
) -> tuple[Managers, set[Path], set[Path], set[Path]]:
    """merge.Updater.update: strip others' ownership of what changed, raise on conflicts."""
    added, modified, removed = compare(live, new, shape)
    added, modified, removed = (
        exclude(added, ignored),
        exclude(modified, ignored),
        exclude(removed, ignored),
    )
    changed = added | modified
    conflicts: list[Conflict] = []
    out: Managers = {}
    for key, ent in managers.items():
        if key == workflow:
            out[key] = ent
            continue
        c = ent.fields & changed
        if c:
            conflicts.extend(Conflict(ent, p) for p in sorted(c, key=path_string))
        out[key] = Entry(
            ent.manager,
            ent.operation,
            ent.api_version,
            ent.subresource,
            ent.time,
            ent.fields - c - removed,
        )
    if conflicts and not force:
        conflicts.sort(key=lambda c: (c.manager.manager, path_string(c.path)))
        raise ConflictError(conflicts)
    out = {k: e for k, e in out.items() if e.fields}
    return out, added, modified, removed


def update_managers(
    live: dict[str, Any] | None,
    new: dict[str, Any],
    shape: Shape,
    managers: Managers,
    manager: str,
    api_version: str,
    subresource: str,
    ignored: frozenset[Path] = frozenset(),
) -> Managers:
    """Managers after a non-apply write (create, PUT, merge/JSON/strategic patch) by ``manager``."""
    base = without_managed(live) if live is not None else {}
    placeholder = ("\0current-operation", "Update", "", "")
    out, added, modified, _ = _update(
        base, without_managed(new), shape, managers, placeholder, True, ignored
    )
    current = (added | modified) - STRIPPED
    current = exclude(current, ignored)
    if current:
        ent = Entry(manager, "Update", api_version, subresource, now(), set(current))
        prev = out.get(ent.key())
        if prev is not None:
            ent.fields |= prev.fields
        out[ent.key()] = ent
    return out


def apply_merge(
    live: dict[str, Any],
    config: dict[str, Any],
    shape: Shape,
    managers: Managers,
    manager: str,
    api_version: str,
    subresource: str,
    ignored: frozenset[Path] = frozenset(),
) -> tuple[dict[str, Any], Managers, tuple[str, str, str, str]]:
    """First half of Apply: merged object with omitted fields pruned, and the new managers.

    The caller normalizes the result, then calls ``apply_finish`` to check conflicts.
    """
    base = without_managed(live)
    cfg = without_managed(config)
    full_set = exclude(to_field_set(cfg, shape), ignored)
    config_set = full_set - STRIPPED
    merged = merge(base, cfg, shape)
    ent = Entry(manager, "Apply", api_version, subresource, None, config_set)
    key = ent.key()
    last = managers.get(key)
    if last is not None:
        ent.time = last.time
    new_managers = dict(managers)
    new_managers[key] = ent
    if last is not None and last.fields:
        # during the merge the applier owns its whole configuration, metadata.name included
        # (stripping happens afterwards), which keeps metadata itself from being pruned
        owned: set[Path] = set(full_set)
        for e in new_managers.values():
            owned |= e.fields
        merged_set = ensure_named(to_field_set(merged, shape), shape)
        drop = (ensure_named(last.fields, shape) & merged_set) - ensure_named(owned, shape)
        merged = remove_items(merged, drop, shape)
    return merged, new_managers, key


def apply_finish(
    live: dict[str, Any],
    final: dict[str, Any],
    shape: Shape,
    managers: Managers,
    key: tuple[str, str, str, str],
    force: bool,
    changed: bool,
    ignored: frozenset[Path] = frozenset(),
) -> Managers:
    """Second half of Apply: conflicts (ConflictError unless ``force``) and final managers."""
    out, *_ = _update(
        without_managed(live), without_managed(final), shape, managers, key, force, ignored
    )
    ent = out.get(key)
    if ent is not None and (changed or ent.time is None):
        out[key] = Entry(
            ent.manager, ent.operation, ent.api_version, ent.subresource, now(), ent.fields
        )
    return out
