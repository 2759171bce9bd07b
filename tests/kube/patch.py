"""PATCH bodies: JSON merge patch, JSON patch and strategic merge patch.

- ``application/merge-patch+json``: RFC 7386.
- ``application/json-patch+json``: RFC 6902 (add, remove, replace, move, copy, test; JSON
  pointers per RFC 6901 with ``~0``/``~1`` escapes), error texts as evanphx/json-patch words them.
- ``application/strategic-merge-patch+json`` (built-in kinds only): maps merge recursively,
  ``null`` deletes, lists whose Go field declares ``patchStrategy=merge`` merge by their
  ``patchMergeKey`` (others are replaced), primitive merge lists are unioned; directives
  ``$patch: replace|delete|merge``, ``$retainKeys`` and ``$deleteFromPrimitiveList/<f>`` are
  honoured, ``$setElementOrder/<f>`` is accepted and ignored (new items are appended).
  Source: Kubernetes "Update API Objects in Place Using kubectl patch";
  k8s.io/apimachinery/pkg/util/strategicpatch.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.kube.shapes import Shape


class PatchError(Exception):
    """The patch cannot be applied to the document (the message names the operation and path)."""


class PatchDecodeError(Exception):
    """The patch body is not a patch of the declared type (-> 400)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new document, ``target`` is not modified."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


# ---- RFC 6902 --------------------------------------------------------------------------------


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str):
        raise PatchError(f"invalid path: {path!r}")
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f'JSON pointer must be empty or start with a "/": {path}')
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list[Any], token: str, path: str, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token[0] == "0"):
        raise PatchError(f"Unable to access invalid index: {token}: {path}")
    i = int(token)
    limit = len(container) if allow_end else len(container) - 1
    if i > limit:
        raise PatchError(f"Unable to access invalid index: {i}: {path}")
    return i


def _parent(doc: Any, tokens: list[str], op: str, path: str) -> Any:
    cur = doc
    for t in tokens[:-1]:
        if isinstance(cur, dict) and t in cur:
            cur = cur[t]
        elif isinstance(cur, list) and t.isdigit() and int(t) < len(cur):
            cur = cur[int(t)]
        else:
            raise PatchError(
                f'{op} operation does not apply: doc is missing path: "{path}": missing value'
            )
    return cur


def _get(doc: Any, path: str, op: str) -> Any:
    cur = doc
    for t in _pointer(path):
        if isinstance(cur, dict) and t in cur:
            cur = cur[t]
        elif isinstance(cur, list) and t.isdigit() and int(t) < len(cur):
            cur = cur[int(t)]
        else:
            raise PatchError(
                f"{op} operation does not apply: doc is missing from path: {path}: missing value"
            )
    return cur


def _add(doc: Any, path: str, value: Any, op: str = "add") -> Any:
    tokens = _pointer(path)
    if not tokens:
        return value
    parent = _parent(doc, tokens, op, path)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, path, True), value)
    else:
        raise PatchError(
            f'{op} operation does not apply: doc is missing path: "{path}": missing value'
        )
    return doc


def _remove(doc: Any, path: str, op: str = "remove") -> tuple[Any, Any]:
    tokens = _pointer(path)
    if not tokens:
        raise PatchError(f"{op} operation does not apply: doc is missing path: {path}")
    parent = _parent(doc, tokens, op, path)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(
                f'{op} operation does not apply: doc is missing path: "{path}": missing value'
            )
        return doc, parent.pop(last)
    if isinstance(parent, list):
        return doc, parent.pop(_index(parent, last, path, False))
    raise PatchError(f'{op} operation does not apply: doc is missing path: "{path}": missing value')


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def json_patch(doc: Any, ops: Any) -> Any:
    """Apply RFC 6902 ``ops`` to a deep copy of ``doc``; PatchError when an op fails."""
    if not isinstance(ops, list):
        raise PatchDecodeError(
            "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
        )
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict):
            raise PatchDecodeError("json: cannot unmarshal into jsonpatch.Operation")
        kind = op.get("op")
        path = op.get("path")
        if not isinstance(path, str):
            raise PatchDecodeError(f"missing or invalid path in operation {op}")
        if kind == "add":
            if "value" not in op:
                raise PatchError("add operation does not apply: missing value")
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            doc, _ = _remove(doc, path)
        elif kind == "replace":
            if "value" not in op:
                raise PatchError("replace operation does not apply: missing value")
            tokens = _pointer(path)
            if not tokens:
                doc = copy.deepcopy(op["value"])
                continue
            parent = _parent(doc, tokens, "replace", path)
            last = tokens[-1]
            if isinstance(parent, dict) and last in parent:
                parent[last] = copy.deepcopy(op["value"])
            elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
                parent[int(last)] = copy.deepcopy(op["value"])
            else:
                raise PatchError(
                    f"replace operation does not apply: doc is missing key: {path}: missing value"
                )
        elif kind == "move":
            frm = _from(op)
            _get(doc, frm, "move")
            doc, value = _remove(doc, frm, "move")
            doc = _add(doc, path, value, "move")
        elif kind == "copy":
            value = copy.deepcopy(_get(doc, _from(op), "copy"))
            doc = _add(doc, path, value, "copy")
        elif kind == "test":
            try:
                current = _get(doc, path, "test")
            except PatchError:
                current = _MISSING
            if current is _MISSING or not _equal(current, op.get("value")):
                raise PatchError(f"testing value {path} failed: test failed")
        else:
            raise PatchError(f"Unexpected kind: {kind}")
    return doc


_MISSING = object()


def _from(op: dict[str, Any]) -> str:
    frm = op.get("from")
    if not isinstance(frm, str):
        raise PatchDecodeError(f"missing or invalid from in operation {op}")
    return frm


# ---- strategic merge patch ------------------------------------------------------------------

_DELETE = object()


def strategic_merge_patch(original: Any, patch: Any, shape: Shape | None) -> Any:
    """Apply a strategic merge patch to ``original`` (not modified) along ``shape``."""
    r = _smp(original, patch, shape)
    return {} if r is _DELETE else r


def _strip(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _strip(x) for k, x in v.items() if not k.startswith("$") and x is not None}
    if isinstance(v, list):
        return [_strip(x) for x in v]
    return v


def _smp(original: Any, patch: Any, shape: Shape | None) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return _DELETE
    if directive == "replace":
        return _strip(patch)
    if not isinstance(original, dict):
        original = {}
    out = dict(original)
    for k, pv in patch.items():
        if k.startswith("$setElementOrder/") or k in ("$patch", "$retainKeys"):
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            f = k.split("/", 1)[1]
            if isinstance(out.get(f), list) and isinstance(pv, list):
                out[f] = [x for x in out[f] if x not in pv]
            continue
        cs = shape.child(k)[0] if shape is not None else None
        if pv is None:
            out.pop(k, None)
            continue
        ov = out.get(k)
        if isinstance(pv, list) and cs is not None and cs.patch_merge:
            out[k] = _merge_list(ov if isinstance(ov, list) else [], pv, cs)
        elif isinstance(pv, dict):
            r = _smp(ov if isinstance(ov, dict) else {}, pv, cs)
            if r is _DELETE:
                out.pop(k, None)
            else:
                out[k] = r
        else:
            out[k] = copy.deepcopy(pv)
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _merge_list(orig: list[Any], patch: list[Any], shape: Shape) -> list[Any]:
    key = shape.merge_key
    if key is None:
        out = list(orig)
        for x in patch:
            if isinstance(x, dict) and x.get("$patch") == "replace":
                return [y for y in patch if not (isinstance(y, dict) and "$patch" in y)]
            if x not in out:
                out.append(copy.deepcopy(x))
        return out
    if any(isinstance(x, dict) and x.get("$patch") == "replace" for x in patch):
        return [_strip(x) for x in patch if not (isinstance(x, dict) and "$patch" in x)]
    out = [copy.deepcopy(x) for x in orig]
    for item in patch:
        if not isinstance(item, dict):
            continue
        kv = item.get(key)
        idx = next((i for i, o in enumerate(out) if isinstance(o, dict) and o.get(key) == kv), None)
        if item.get("$patch") == "delete":
            out = [o for o in out if not (isinstance(o, dict) and o.get(key) == kv)]
            continue
        if idx is None:
            out.append(_strip(item))
        else:
            r = _smp(out[idx], item, shape.items)
            if r is _DELETE:
                del out[idx]
            else:
                out[idx] = r
    return out
