"""Decode-time processing of objects: pruning, defaulting, canonicalization and validation.

``normalize`` walks a value along its ``Shape`` the way the API server processes a request
body for a structural schema: unknown fields are dropped (unless preserve-unknown-fields),
``null`` values of non-nullable fields are dropped, defaults are filled in, quantities and
timestamps of built-in kinds are canonicalized, then the value validations of the schema run
(type, required, enum, pattern, min/max, lengths, items, list-type set/map uniqueness...).
Sources: Kubernetes API concepts "structural schema", "pruning", "defaulting";
k8s.io/apiextensions-apiserver/pkg/apiserver/schema; kube-openapi validate (messages).

Also the metadata rules every kind shares: object names (DNS-1123 subdomain / label,
DNS-1035 label), label and annotation keys and values, finalizers, ownerReferences
(k8s.io/apimachinery/pkg/api/validation/objectmeta.go).
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime as _dt
import ipaddress
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from tests.kube import quantity
from tests.kube.errors import FieldError
from tests.kube.shapes import DEDUCED, Shape

DROP = object()
"""Returned by ``normalize`` for a value that must disappear from its parent."""


@dataclass
class Ctx:
    """What one ``normalize`` pass found.

    ``errors`` become a 422 Invalid, ``bad`` (decode errors of built-in kinds) a 400 BadRequest,
    ``unknown`` lists pruned fields (for fieldValidation Warn/Strict). ``defaults=False`` and
    ``required=False`` serve apply configurations, which are partial; ``prune=False`` reports
    undeclared fields in ``undeclared`` instead of dropping them, and keeps ``null`` values.
    """

    errors: list[FieldError] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    undeclared: list[str] = field(default_factory=list)
    defaults: bool = True
    required: bool = True
    prune: bool = True


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


_GO_JSON = {
    "null": "null",
    "boolean": "bool",
    "integer": "number",
    "number": "number",
    "string": "string",
    "array": "array",
    "object": "object",
}
_GO_TYPE = {
    "string": "string",
    "integer": "int64",
    "number": "float64",
    "boolean": "bool",
    "object": "struct",
    "array": "slice",
}


def _type_error(v: Any, want: str, shape: Shape, path: str, ctx: Ctx) -> object:
    actual = _json_type(v)
    if shape.builtin:
        ctx.bad.append(
            f"json: cannot unmarshal {_GO_JSON[actual]} into Go struct field {path} "
            f"of type {_GO_TYPE.get(want, want)}"
        )
    else:
        ctx.errors.append(
            FieldError(
                "FieldValueTypeInvalid",
                path,
                f'{path} in body must be of type {want}: "{actual}"',
                actual,
                True,
            )
        )
    return v


def normalize(v: Any, shape: Shape | None, path: str, ctx: Ctx) -> Any:
    """Prune, default, canonicalize and validate ``v``; return the new value or ``DROP``."""
    if shape is None or shape is DEDUCED:
        return v
    if v is None:
        if shape.nullable or not ctx.prune:
            return None  # apply configurations keep null: it means "remove, and own"
        return DROP
    # ---- type
    if shape.int_or_string:
        if isinstance(v, bool) or not isinstance(v, int | str):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                return _type_error(
                    v, "integer-or-string" if not shape.builtin else "string", shape, path, ctx
                )
    elif shape.type == "object":
        if not isinstance(v, dict):
            return _type_error(v, "object", shape, path, ctx)
        v = _normalize_object(v, shape, path, ctx)
    elif shape.type == "array":
        if not isinstance(v, list):
            return _type_error(v, "array", shape, path, ctx)
        v = _normalize_array(v, shape, path, ctx)
    elif shape.type == "string":
        if shape.special == "quantity":
            try:
                return quantity.canonical(v)
            except quantity.QuantityError as e:
                ctx.bad.append(f"{path}: {e}")
                return v
        if not isinstance(v, str):
            return _type_error(v, "string", shape, path, ctx)
        if shape.special in ("time", "microtime"):
            return _canonical_time(v, shape.special, path, ctx)
        if shape.special == "bytes":
            try:
                base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                ctx.bad.append(f"{path}: illegal base64 data")
            return v
    elif shape.type == "integer":
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            return _type_error(v, "integer", shape, path, ctx)
    elif shape.type == "number":
        if isinstance(v, bool) or not isinstance(v, int | float):
            return _type_error(v, "number", shape, path, ctx)
    elif shape.type == "boolean":
        if not isinstance(v, bool):
            return _type_error(v, "boolean", shape, path, ctx)
    elif shape.type is None and not shape.preserve and isinstance(v, dict | list):
        # an untyped, non-preserving node keeps scalars only (structural schema rule)
        pass
    _validate_value(v, shape, path, ctx)
    return v


def _canonical_time(v: str, kind: str, path: str, ctx: Ctx) -> str:
    try:
        t = _dt.datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        ctx.bad.append(f'parsing time "{v}" as "2006-01-02T15:04:05Z07:00": cannot parse ({path})')
        return v
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    t = t.astimezone(_dt.UTC)
    if kind == "microtime":
        return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _normalize_object(v: dict[str, Any], shape: Shape, path: str, ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {}
    props = shape.props
    for k, cv in v.items():
        cpath = _join(path, k)
        if props is not None and k in props:
            nv = normalize(cv, props[k], cpath, ctx)
        elif shape.additional is not None:
            nv = normalize(cv, shape.additional, cpath, ctx)
        elif shape.preserve or shape.type is None:
            nv = cv
        else:
            if ctx.prune:
                ctx.unknown.append(cpath)
                continue
            ctx.undeclared.append(cpath)
            nv = cv
        if nv is DROP:
            continue
        out[k] = nv
    if ctx.defaults and props:
        for k, cs in props.items():
            if k not in out and cs.has_default:
                nv = normalize(copy.deepcopy(cs.default), cs, _join(path, k), ctx)
                if nv is not DROP:
                    out[k] = nv
    if ctx.required:
        for r in shape.required:
            if r not in out:
                ctx.errors.append(FieldError("FieldValueRequired", _join(path, r)))
    return out


def _normalize_array(v: list[Any], shape: Shape, path: str, ctx: Ctx) -> list[Any]:
    out: list[Any] = []
    for i, item in enumerate(v):
        ipath = f"{path}[{i}]"
        if item is None and shape.items is not None and not shape.items.nullable:
            if shape.items is not DEDUCED and shape.items.type is not None:
                _type_error(None, shape.items.type, shape.items, ipath, ctx)
            out.append(item)
            continue
        nv = normalize(item, shape.items, ipath, ctx)
        out.append(None if nv is DROP else nv)
    if shape.list_type == "set":
        seen: list[Any] = []
        for i, item in enumerate(out):
            if item in seen:
                ctx.errors.append(FieldError("FieldValueDuplicate", f"{path}[{i}]", "", item, True))
            else:
                seen.append(item)
    elif shape.list_type == "map" and shape.list_keys:
        seen_keys: list[tuple[Any, ...]] = []
        for i, item in enumerate(out):
            if not isinstance(item, dict):
                continue
            key = tuple(item.get(k) for k in shape.list_keys)
            if key in seen_keys:
                shown = (
                    "map[string]interface {}{"
                    + ", ".join(f'"{k}":{_go_value(item.get(k))}' for k in shape.list_keys)
                    + "}"
                )
                ctx.errors.append(
                    FieldError("FieldValueDuplicate", f"{path}[{i}]", "", _Raw(shown), True)
                )
            else:
                seen_keys.append(key)
    return out


class _Raw(str):
    """A value printed as-is in a field error."""


def _go_value(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v)


# ---- value validations ------------------------------------------------------------------


def _validate_value(v: Any, shape: Shape, path: str, ctx: Ctx) -> None:
    s = shape.schema
    if shape.enum is not None and v not in shape.enum:
        supported = ", ".join(_quote(e) for e in shape.enum)
        ctx.errors.append(
            FieldError("FieldValueNotSupported", path, f"supported values: {supported}", v, True)
        )
    if s:
        _validate_keywords(v, s, path, ctx)
    for kw, subs in shape.sub.items():
        _validate_combinator(v, kw, subs, path, ctx)


def _quote(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v)


def _invalid(ctx: Ctx, path: str, v: Any, detail: str) -> None:
    if isinstance(v, dict | list):
        v = _Raw(_json_type(v))
    ctx.errors.append(FieldError("FieldValueInvalid", path, detail, v, True))


def _validate_keywords(v: Any, s: dict[str, Any], path: str, ctx: Ctx) -> None:
    if isinstance(v, str):
        n = len(v)
        if "minLength" in s and n < s["minLength"]:
            _invalid(ctx, path, v, f"{path} in body should be at least {s['minLength']} chars long")
        if "maxLength" in s and n > s["maxLength"]:
            ctx.errors.append(
                FieldError(
                    "FieldValueTooLong", path, f"may not be more than {s['maxLength']} bytes"
                )
            )
        pat = s.get("_pattern")
        if pat is not None and not pat.search(v):
            _invalid(ctx, path, v, f"{path} in body should match '{s['pattern']}'")
        fmt = s.get("format")
        if fmt and not _format_ok(fmt, v):
            _invalid(ctx, path, v, f"{path} in body must be of type {fmt}: {_quote(v)}")
    if isinstance(v, int | float) and not isinstance(v, bool):
        if "minimum" in s:
            m = s["minimum"]
            if s.get("exclusiveMinimum") and v <= m:
                _invalid(ctx, path, v, f"{path} in body should be greater than {m}")
            elif v < m:
                _invalid(ctx, path, v, f"{path} in body should be greater than or equal to {m}")
        if "maximum" in s:
            m = s["maximum"]
            if s.get("exclusiveMaximum") and v >= m:
                _invalid(ctx, path, v, f"{path} in body should be less than {m}")
            elif v > m:
                _invalid(ctx, path, v, f"{path} in body should be less than or equal to {m}")
        if s.get("multipleOf"):
            q = v / s["multipleOf"]
            if abs(q - round(q)) > 1e-9:
                _invalid(ctx, path, v, f"{path} in body should be a multiple of {s['multipleOf']}")
        fmt = s.get("format")
        if fmt == "int32" and not -(2**31) <= v < 2**31:
            _invalid(ctx, path, v, f"{path} in body must be of type int32: {v}")
    if isinstance(v, list):
        if "minItems" in s and len(v) < s["minItems"]:
            _invalid(
                ctx, path, len(v), f"{path} in body should have at least {s['minItems']} items"
            )
        if "maxItems" in s and len(v) > s["maxItems"]:
            ctx.errors.append(
                FieldError(
                    "FieldValueTooMany",
                    path,
                    f"must have at most {s['maxItems']} items",
                    len(v),
                    True,
                )
            )
        if s.get("uniqueItems"):
            seen: list[Any] = []
            for item in v:
                if item in seen:
                    _invalid(ctx, path, v, f"{path} in body shouldn't contain duplicates")
                    break
                seen.append(item)
    if isinstance(v, dict):
        if "minProperties" in s and len(v) < s["minProperties"]:
            _invalid(
                ctx, path, v, f"{path} in body should have at least {s['minProperties']} properties"
            )
        if "maxProperties" in s and len(v) > s["maxProperties"]:
            ctx.errors.append(
                FieldError(
                    "FieldValueTooMany",
                    path,
                    f"must have at most {s['maxProperties']} items",
                    len(v),
                    True,
                )
            )


_MAC = re.compile(
    r"^([0-9a-fA-F]{2}[:-]){5}[0-9a-fA-F]{2}$|^([0-9a-fA-F]{2}[:-]){7}[0-9a-fA-F]{2}$"
)
_HOSTNAME = re.compile(
    r"^[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?)*$"
)


def _format_ok(fmt: str, v: str) -> bool:
    """The string formats kube-openapi checks (others pass, as unknown formats do there)."""
    try:
        if fmt == "ipv4":
            ipaddress.IPv4Address(v)
        elif fmt == "ipv6":
            ipaddress.IPv6Address(v)
        elif fmt == "cidr":
            ipaddress.ip_network(v, strict=False)
            return "/" in v
        elif fmt == "uuid":
            uuid.UUID(v)
        elif fmt == "mac":
            return bool(_MAC.match(v))
        elif fmt == "hostname":
            return len(v) <= 255 and bool(_HOSTNAME.match(v))
        elif fmt == "date-time":
            _dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
            return "T" in v or "t" in v
        elif fmt == "date":
            _dt.date.fromisoformat(v)
        elif fmt == "byte":
            base64.b64decode(v, validate=True)
    except ValueError:
        return False
    return True


def _matches(v: Any, sub: Shape) -> bool:
    c = Ctx(defaults=False)
    if sub.type is not None or sub.int_or_string:
        normalize(copy.deepcopy(v), sub, "x", c)
    else:
        _validate_value(v, sub, "x", c)
        if isinstance(v, dict):
            for r in sub.required:
                if r not in v:
                    return False
            for k, cs in (sub.props or {}).items():
                if k in v and not _matches(v[k], cs):
                    return False
    return not c.errors and not c.bad


def _validate_combinator(v: Any, kw: str, subs: list[Shape], path: str, ctx: Ctx) -> None:
    ok = [_matches(v, s) for s in subs]
    if kw == "allOf" and not all(ok):
        _invalid(ctx, path, v, f"{path} in body must validate all the schemas (allOf)")
    elif kw == "anyOf" and not any(ok):
        _invalid(ctx, path, v, f"{path} in body must validate at least one schema (anyOf)")
    elif kw == "oneOf" and ok.count(True) != 1:
        _invalid(ctx, path, v, f"{path} in body must validate one and only one schema (oneOf)")
    elif kw == "not" and ok and ok[0]:
        _invalid(ctx, path, v, f"{path} in body must not validate the schema (not)")


# ---- names and metadata -------------------------------------------------------------------

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QNAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_DNS1035_MSG = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
    "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)


def name_errors(name: str, rule: str, path: str = "metadata.name") -> list[FieldError]:
    """Errors for object name ``name`` under ``rule`` ("subdomain", "label", "dns1035", "path")."""
    errs: list[FieldError] = []
    if rule == "path":
        if name in (".", ".."):
            errs.append(FieldError("FieldValueInvalid", path, f'may not be "{name}"', name, True))
        for bad in ("/", "%"):
            if bad in name:
                errs.append(
                    FieldError("FieldValueInvalid", path, f"may not contain '{bad}'", name, True)
                )
        return errs
    limit = 253 if rule == "subdomain" else 63
    if len(name) > limit:
        errs.append(
            FieldError(
                "FieldValueInvalid", path, f"must be no more than {limit} characters", name, True
            )
        )
    regex, msg = {
        "subdomain": (DNS1123_SUBDOMAIN, _SUBDOMAIN_MSG),
        "label": (DNS1123_LABEL, _LABEL_MSG),
        "dns1035": (DNS1035_LABEL, _DNS1035_MSG),
    }[rule]
    if not regex.match(name):
        errs.append(FieldError("FieldValueInvalid", path, msg, name, True))
    return errs


def qualified_name_errors(key: str, path: str) -> list[FieldError]:
    """Errors for a label/annotation key or finalizer ("prefix/name", name <= 63 chars)."""
    prefix, _, name = key.rpartition("/")
    errs: list[FieldError] = []
    if "/" in key and not prefix:
        errs.append(
            FieldError("FieldValueInvalid", path, "prefix part must be non-empty", key, True)
        )
    elif prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        errs.append(
            FieldError("FieldValueInvalid", path, "prefix part " + _SUBDOMAIN_MSG, key, True)
        )
    if key.count("/") > 1:
        errs.append(
            FieldError(
                "FieldValueInvalid",
                path,
                "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and "
                "must start and end with an alphanumeric character (e.g. 'MyName',  or "
                "'my.name',  or '123-abc', regex used for validation is "
                "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain "
                "prefix and '/' (e.g. 'example.com/MyName')",
                key,
                True,
            )
        )
        return errs
    if not name:
        errs.append(FieldError("FieldValueInvalid", path, "name part must be non-empty", key, True))
    elif len(name) > 63:
        errs.append(
            FieldError(
                "FieldValueInvalid", path, "name part must be no more than 63 characters", key, True
            )
        )
    elif not _QNAME.match(name):
        errs.append(
            FieldError(
                "FieldValueInvalid",
                path,
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
                "start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or "
                "'123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')",
                key,
                True,
            )
        )
    return errs


def metadata_errors(md: dict[str, Any]) -> list[FieldError]:
    """Labels, annotations, finalizers and ownerReferences rules of ObjectMeta."""
    errs: list[FieldError] = []
    for k, val in (md.get("labels") or {}).items():
        errs += qualified_name_errors(k, "metadata.labels")
        if isinstance(val, str) and (len(val) > 63 or not _LABEL_VALUE.match(val)):
            errs.append(
                FieldError(
                    "FieldValueInvalid",
                    "metadata.labels",
                    "a valid label must be an empty string or consist of alphanumeric characters, "
                    "'-', '_' or '.', and must start and end with an alphanumeric character (e.g. "
                    "'MyValue',  or 'my_value',  or '12345', regex used for validation is "
                    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
                    if len(val) <= 63
                    else "must be no more than 63 characters",
                    val,
                    True,
                )
            )
    total = 0
    for k, val in (md.get("annotations") or {}).items():
        errs += qualified_name_errors(k.lower(), "metadata.annotations")
        total += len(k) + len(val if isinstance(val, str) else "")
    if total > 256 * 1024:
        errs.append(
            FieldError(
                "FieldValueTooLong", "metadata.annotations", "may not be more than 262144 bytes"
            )
        )
    for i, f in enumerate(md.get("finalizers") or []):
        if isinstance(f, str):
            errs += qualified_name_errors(f, f"metadata.finalizers[{i}]")
    controllers = 0
    for i, ref in enumerate(md.get("ownerReferences") or []):
        if not isinstance(ref, dict):
            continue
        p = f"metadata.ownerReferences[{i}]"
        for req in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(req):
                errs.append(
                    FieldError(
                        "FieldValueInvalid",
                        f"{p}.{req}",
                        f"{req} must not be empty",
                        ref.get(req, ""),
                        True,
                    )
                )
        if ref.get("controller"):
            controllers += 1
    if controllers > 1:
        errs.append(
            FieldError(
                "FieldValueInvalid",
                "metadata.ownerReferences",
                "Only one reference can have Controller set to true",
                _Raw("[...]"),
                True,
            )
        )
    return errs
