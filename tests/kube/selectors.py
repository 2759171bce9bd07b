"""Label and field selectors as the API server parses and applies them.

Label selectors: ``=``, ``==``, ``!=``, ``in (..)``, ``notin (..)``, ``key`` (exists),
``!key`` (does not exist), ``key>N``/``key<N``; comma means AND.
Field selectors: ``field=value``, ``field==value``, ``field!=value`` with backslash escapes.
Sources: k8s.io/apimachinery/pkg/labels/selector.go, pkg/fields/selector.go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.kube.errors import ApiError, bad_request
from tests.kube.validation import _LABEL_VALUE, qualified_name_errors

_SPECIAL = ("!=", "==", "=", "!", "(", ")", ",", ">", "<")


@dataclass(frozen=True)
class Requirement:
    """One label requirement; ``op`` is exists, !, =, !=, in, notin, gt, lt."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        has = self.key in labels
        if self.op == "exists":
            return has
        if self.op == "!":
            return not has
        if self.op in ("=", "in"):
            return has and labels[self.key] in self.values
        if self.op in ("!=", "notin"):
            return not has or labels[self.key] not in self.values
        if not has:
            return False
        try:
            lv = int(labels[self.key])
        except ValueError:
            return False
        return lv > int(self.values[0]) if self.op == "gt" else lv < int(self.values[0])


def _tokens(s: str) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c.isspace():
            i += 1
            continue
        for sp in _SPECIAL:
            if s.startswith(sp, i):
                out.append(sp)
                i += len(sp)
                break
        else:
            j = i
            while (
                j < len(s)
                and not s[j].isspace()
                and not any(s.startswith(sp, j) for sp in _SPECIAL)
            ):
                j += 1
            out.append(s[i:j])
            i = j
    return out


def _fail(detail: str) -> ApiError:
    return bad_request(f"unable to parse requirement: {detail}")


def parse_label_selector(s: str) -> list[Requirement]:
    """Parse a label selector; raises ApiError 400 BadRequest when malformed."""
    toks = _tokens(s)
    reqs: list[Requirement] = []
    i = 0

    def peek() -> str | None:
        return toks[i] if i < len(toks) else None

    while i < len(toks):
        neg = False
        if toks[i] == "!":
            neg = True
            i += 1
        key = peek()
        if key is None or key in _SPECIAL:
            raise _fail(f"found '{key or ''}', expected: identifier")
        i += 1
        errs = qualified_name_errors(key, "key")
        if errs:
            raise _fail(f"{errs[0]}")
        nxt = peek()
        if neg:
            if nxt not in (None, ","):
                raise _fail(f"found '{nxt}', expected: ',' or 'end of string'")
            reqs.append(Requirement(key, "!"))
        elif nxt in (None, ","):
            reqs.append(Requirement(key, "exists"))
        elif nxt in ("=", "==", "!="):
            i += 1
            val = peek()
            if val is None or val == ",":
                val = ""
            elif val in _SPECIAL:
                raise _fail(f"found '{val}', expected: identifier")
            else:
                i += 1
            _check_value(val)
            reqs.append(Requirement(key, "!=" if nxt == "!=" else "=", (val,)))
        elif nxt in ("in", "notin"):
            i += 1
            if peek() != "(":
                raise _fail(f"found '{peek() or ''}', expected: '('")
            i += 1
            vals: list[str] = []
            while True:
                t = peek()
                if t is None:
                    raise _fail("found '', expected: ',', ')' or identifier")
                if t == ")":
                    i += 1
                    break
                if t == ",":
                    i += 1
                    continue
                if t in _SPECIAL:
                    raise _fail(f"found '{t}', expected: ',', ')' or identifier")
                _check_value(t)
                vals.append(t)
                i += 1
            if not vals:
                raise _fail("for 'in', 'notin' operators, values set can't be empty")
            reqs.append(Requirement(key, nxt, tuple(vals)))
        elif nxt in (">", "<"):
            i += 1
            val = peek() or ""
            i += 1
            try:
                int(val)
            except ValueError:
                raise _fail(
                    f"for 'Gt', 'Lt' operators, the value must be an integer: {val}"
                ) from None
            reqs.append(Requirement(key, "gt" if nxt == ">" else "lt", (val,)))
        else:
            raise _fail(f"found '{nxt}', expected: in, notin, =, ==, !=, gt, lt")
        if i < len(toks):
            if toks[i] != ",":
                raise _fail(f"found '{toks[i]}', expected: ',' or 'end of string'")
            i += 1
            if i == len(toks):
                raise _fail("found '', expected: identifier")
    return reqs


def _check_value(v: str) -> None:
    if len(v) > 63 or not _LABEL_VALUE.match(v):
        raise _fail(
            f'values[0]: Invalid value: "{v}": a valid label must be an empty string or consist '
            "of alphanumeric characters, '-', '_' or '.', and must start and end with an "
            "alphanumeric character"
        )


def labels_match(reqs: list[Requirement], obj: dict[str, Any]) -> bool:
    """True when ``obj``'s ``metadata.labels`` satisfy every requirement."""
    if not reqs:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(r.matches(labels) for r in reqs)


@dataclass(frozen=True)
class FieldRequirement:
    """``field`` compared with ``value`` (``op`` is "=" or "!=")."""

    field: str
    op: str
    value: str


def _split_unescaped(s: str, sep: str) -> list[str]:
    parts, cur, i = [], [], 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            cur.append(s[i : i + 2])
            i += 2
            continue
        if c == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def parse_field_selector(s: str, supported: Callable[[str], bool]) -> list[FieldRequirement]:
    """Parse a field selector; 400 BadRequest for syntax errors or unsupported fields."""
    reqs: list[FieldRequirement] = []
    if not s.strip():
        return reqs
    for term in _split_unescaped(s, ","):
        if not term:
            continue
        for op in ("!=", "==", "="):
            idx = _find_unescaped(term, op)
            if idx >= 0:
                key = term[:idx].strip()
                val = _unescape(term[idx + len(op) :])
                if not supported(key):
                    raise bad_request(f"field label not supported: {key}")
                reqs.append(FieldRequirement(key, "!=" if op == "!=" else "=", val))
                break
        else:
            raise bad_request(f"invalid selector: '{s}'; can't understand '{term}'")
    return reqs


def _find_unescaped(s: str, op: str) -> int:
    i = 0
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        if s.startswith(op, i):
            return i
        i += 1
    return -1


def field_value(obj: dict[str, Any], path: str) -> str | None:
    """Value of dotted ``path`` in ``obj`` as the field selector compares it (a string)."""
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    if cur is None:
        return None
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def fields_match(reqs: list[FieldRequirement], obj: dict[str, Any]) -> bool:
    """True when ``obj`` satisfies every field requirement (missing fields compare as "")."""
    for r in reqs:
        v = field_value(obj, r.field) or ""
        if (v == r.value) != (r.op == "="):
            return False
    return True
