"""Validate loaded documents: JSON Schema (Draft 2020-12, ``schemas/``) plus semantic rules.

``validate(documents)`` returns every :class:`~reconciler.loader.Problem` across all documents;
``validate_repo(root)`` loads and validates in one call and is what ``underlay validate`` and
the reconciler run (the reconciler applies nothing while any error exists).

JSON Schema errors are mapped back to ``file:line:column`` through the loader's marks: unknown
and missing fields point at the mapping key, wrong values at the value. Messages say what is
wrong and the hint what to write instead (a close spelling for a typo such as ``gatway``).
Semantic rules live in ``rules_common``, ``rules_ippool``, ``rules_multus`` and
``rules_bridge``; rule ids are listed in ``reconciler.rules.RULES``.

Schema features used (all map onto Kubernetes structural schemas, see reconciler.crdgen):
type, properties, required, items, enum, pattern, minimum/maximum, minLength/maxLength,
minItems/maxItems, additionalProperties (false or a schema), default, description, format
(date-time, in status only), anyOf (OvsBridge.spec.maxUnavailable, int-or-string) and the
``x-kubernetes-*`` annotations. No ``$ref``.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError

from reconciler import vocab
from reconciler.loader import (
    DEFAULT_MAX_FILE_BYTES,
    ERROR,
    Document,
    Problem,
    load_repo,
)
from reconciler.rules import RULES
from reconciler.rules_bridge import check_bridge, check_bridge_conflicts
from reconciler.rules_common import Context, check_duplicates, check_metadata
from reconciler.rules_ippool import check_addresses_across_pools, check_overlaps, check_pool
from reconciler.rules_multus import check_nad_names, check_smc
from reconciler.vocab import Resource

__all__ = [
    "Problem",
    "finalize",
    "has_errors",
    "load_schema",
    "schema_dir",
    "schema_file",
    "schema_problems",
    "validate",
    "validate_repo",
    "validator_for",
]


def schema_file(res: Resource) -> str:
    """File name of ``res``'s schema: ``<group>_<version>_<Kind>.json``."""
    return f"{res.group}_{res.version}_{res.kind}.json"


def schema_dir() -> Path:
    """Directory holding the JSON Schemas: the ``reconciler.schemas`` package (``schemas/``)."""
    return Path(str(resources.files("reconciler.schemas")))


@functools.cache
def load_schema(res: Resource) -> dict[str, Any]:
    """The JSON Schema of ``res`` (raises FileNotFoundError naming the file)."""
    path = schema_dir() / schema_file(res)
    if not path.is_file():
        raise FileNotFoundError(f"schema {path} is missing")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@functools.cache
def ecma_regex(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled so that ``$`` means what it means in a JSON Schema (ECMA-262
    without the ``m`` flag) and in the API server's Go regexps: the end of the string. Python's
    ``$`` also matches before a final newline, which let ``"br9\\n"`` pass
    ``^[A-Za-z0-9_.-]+$``; every ``$`` outside a character class and not escaped becomes
    ``\\Z``. Source: ECMA-262 "Assertion" (``$``); JSON Schema 2020-12 Validation, "pattern".
    """
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if pattern[i + 1 : i + 2] == "]" or pattern[i + 1 : i + 3] == "^]":
                out.append(pattern[i : i + (2 if pattern[i + 1] == "]" else 3)])
                i += len(out[-1])
                continue
        elif c == "$":
            out.append(r"\Z")
            i += 1
            continue
        out.append(c)
        i += 1
    return re.compile("".join(out))


def _pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Any:
    """The ``pattern`` keyword with :func:`ecma_regex` (jsonschema's own uses ``re.search``
    on the pattern as written); the same error message."""
    if validator.is_type(instance, "string") and not ecma_regex(patrn).search(instance):
        yield ValidationError(f"{instance!r} does not match {patrn!r}")


@functools.cache
def validator_for(res: Resource) -> jsonschema.protocols.Validator:
    """A Draft 2020-12 validator of ``res``'s schema (checked once, then cached), with
    ``pattern`` evaluated as JSON Schema means it (:func:`ecma_regex`)."""
    schema = load_schema(res)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    # JSON Schema counts 4.0 as an integer; Go (Spiderpool's structs, our CNI configs) does not,
    # and a NAD rendered with "vlan": 100.0 fails every pod ADD: a YAML float is never an integer
    checker = cls.TYPE_CHECKER.redefine("integer", _is_int)
    return jsonschema.validators.extend(
        cls, validators={"pattern": _pattern}, type_checker=checker
    )(schema)


def _is_int(_checker: Any, value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- JSON Schema errors -> problems ---------------------------------------------------------

_MISSING_HINT = {
    "subnet": "add subnet: 172.18.0.0/16",
    "uplinks": "add uplinks: [eth0]",
    "bridge": "add bridge: br1",
    "master": "add master: [eth0]",
    "name": "add name: <object name>",
    "spec": "add spec:",
    "metadata": "add metadata: with a name",
    "dst": "add dst: <network CIDR>",
    "gw": "add gw: <next hop inside the subnet>",
    "key": "add key: <label key>",
    "operator": "add operator: In, NotIn, Exists or DoesNotExist",
    "nodeName": "add nodeName: <node name>",
    "mode": "add mode: 1 (active-backup)",
}

_SERVER_FIELDS = {
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "ownerReferences",
    "finalizers",
    "generateName",
}

_PATTERN_TEXT = {
    "^[A-Za-z0-9_.-]+$": "an interface name (letters, digits, '_', '.', '-')",
    "^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\\.[0-7]$": "a PCI address like 0000:03:00.1",
    "^([0-9a-fA-F]{2}:[0-9a-fA-F]{2})?$": "two hex bytes like 0a:1b",
    "^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$": "a CNI network name (letters, digits, '_', '.', '-')",
    "^(100|[1-9][0-9]?)%$": "a percentage from 1% to 100%",
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$": "a DNS-1123 subdomain",
}

_TYPE_NAMES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    if isinstance(value, list):
        return "a list"
    return "a mapping"


def _type_hint(expected: list[str], value: Any, raw: str | None = None) -> str:
    """What to write instead of ``value`` for a JSON Schema ``type`` error; ``raw`` is the
    scalar's text as written in the YAML when YAML resolved it to a non-string (``5.10``,
    ``010``, ``1:30``), so a hint to quote it keeps what the user meant."""
    if isinstance(value, str) and ("integer" in expected or "number" in expected):
        if _INT_TEXT.fullmatch(value.strip()) or (
            "number" in expected and _NUMBER_TEXT.fullmatch(value.strip())
        ):
            return f"remove the quotes: {value.strip()}"
        if "integer" in expected and _NUMBER_TEXT.fullmatch(value.strip()):
            try:
                as_float = float(value)
            except ValueError:
                as_float = math.nan
            if as_float.is_integer():
                return f"write {int(as_float)}"
    if isinstance(value, str) and "boolean" in expected and value.lower() in ("true", "false"):
        return f"remove the quotes: {value.lower()}"
    if "string" in expected and isinstance(value, (int, float, bool)):
        text = (
            raw
            if raw is not None
            else (str(value).lower() if isinstance(value, bool) else str(value))
        )
        return f'quote it: "{text}"'
    if "integer" in expected and isinstance(value, float) and value.is_integer():
        return f"write {int(value)}"
    if "array" in expected and not isinstance(value, (list, dict)) and value is not None:
        return f"write a list: [{value}]"
    return f"write {' or '.join(_TYPE_NAMES.get(t, t) for t in expected)}"


_INT_TEXT = re.compile(r"[-+]?[0-9]+")
_NUMBER_TEXT = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")


def _closest(value: str, options: list[str]) -> str | None:
    """The option ``value`` most likely misspells: same letters in another case, else the one
    clearly closest (ties give None, so a hint never picks arbitrarily)."""
    for o in options:
        if o.lower() == value.lower():
            return o
    scored = sorted(
        ((difflib.SequenceMatcher(None, value.lower(), o.lower()).ratio(), o) for o in options),
        reverse=True,
    )
    if scored and scored[0][0] >= 0.75 and (len(scored) == 1 or scored[0][0] > scored[1][0]):
        return scored[0][1]
    return None


def _error_problems(doc: Document, err: ValidationError) -> list[Problem]:
    path = tuple(err.absolute_path)
    kw = err.validator
    schema = err.schema if isinstance(err.schema, dict) else {}
    value = err.instance
    if kw == "additionalProperties" and isinstance(value, dict):
        allowed = list(schema.get("properties", {}))
        out = []
        for key in value:
            if key in allowed:
                continue
            if path == ("metadata",) and key == "namespace":
                message = f"{doc.kind} is cluster-scoped: metadata.namespace is not allowed"
                hint = "remove namespace"
            elif path == ("metadata",) and key in _SERVER_FIELDS:
                message = f'unknown field "{key}": the API server sets it'
                hint = f"remove {key}"
            else:
                message = f'unknown field "{key}"'
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = (
                    f"did you mean {close[0]}?"
                    if close
                    else f"allowed here: {', '.join(allowed)}"
                    if allowed
                    else "remove it"
                )
            out.append(
                doc.problem(
                    (*path, key), rule="unknown-field", message=message, hint=hint, at_key=True
                )
            )
        return out
    if kw == "required" and isinstance(value, dict):
        return [
            doc.problem(
                (*path, name),
                rule="missing-field",
                message=f'missing required field "{name}"',
                hint=_MISSING_HINT.get(name, f"add {name}:"),
                at_key=True,
            )
            for name in err.validator_value
            if name not in value
        ]
    if kw == "type":
        raw = err.validator_value
        expected: list[str] = [str(t) for t in raw] if isinstance(raw, list) else [str(raw)]
        names = " or ".join(_TYPE_NAMES.get(t, t) for t in expected)
        return [
            doc.problem(
                path,
                rule="wrong-type",
                message=f"must be {names}, got {_describe(value)}",
                hint=_type_hint(expected, value, doc.raw.get(path)),
            )
        ]
    if kw == "enum":
        options = [str(o) for o in err.validator_value]
        pick = _closest(str(value), options)
        return [
            doc.problem(
                path,
                rule="invalid-value",
                message=f"{_describe(value)} is not one of {', '.join(options)}",
                hint=f"write {pick}" if pick else f"write one of {', '.join(options)}",
            )
        ]
    if kw == "pattern":
        what = _PATTERN_TEXT.get(err.validator_value, f"the pattern {err.validator_value}")
        return [
            doc.problem(
                path,
                rule="pattern-mismatch",
                message=f"{_describe(value)} is not {what}",
                hint=f"write {what}",
            )
        ]
    if kw in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if lo is not None and hi is not None:
            message = f"{value} is out of range {lo}-{hi}"
            hint = f"write a number from {lo} to {hi}"
        elif lo is not None:
            message, hint = f"{value} is below the minimum {lo}", f"write {lo} or more"
        else:
            message, hint = f"{value} is above the maximum {hi}", f"write {hi} or less"
        return [doc.problem(path, rule="out-of-range", message=message, hint=hint)]
    if kw in ("minLength", "maxLength", "minItems", "maxItems"):
        n = err.validator_value
        unit = "character" if "Length" in kw else "item"
        plural = "" if n == 1 else "s"
        size = len(value) if isinstance(value, (str, list)) else 0
        if kw == "minLength" and n == 1:
            message, hint = "must not be empty", "write a value"
        elif kw == "maxLength" and n == IFNAME_MAX and schema.get("pattern") == IFNAME_PATTERN:
            message = f'interface name "{value}" has {size} characters, at most {n}'
            hint = (
                "Linux allows at most 15 characters in an interface name: IFNAMSIZ is 16 bytes "
                "with the terminating NUL; write the name `ip link` shows on the node, or give "
                "the NIC a shorter name with a systemd .link file"
            )
        elif kw.startswith("min"):
            message = f"has {size} {unit}{'' if size == 1 else 's'}, needs at least {n}"
            hint = f"write at least {n} {unit}{plural}"
        else:
            message = f"has {size} {unit}{'' if size == 1 else 's'}, at most {n} allowed"
            hint = f"write at most {n} {unit}{plural}"
        return [doc.problem(path, rule="bad-length", message=message, hint=hint)]
    if kw in ("anyOf", "oneOf"):
        desc = schema.get("description", "")
        return [
            doc.problem(
                path,
                rule="invalid-value",
                message=f"{_describe(value)} is not valid here",
                hint=desc.rstrip(".") if desc else "see the schema",
            )
        ]
    return [doc.problem(path, rule="schema", message=err.message)]


IFNAME_PATTERN = "^[A-Za-z0-9_.-]+$"
"""Schema pattern of Linux interface names (bridge, uplinks, master, bond name)."""
IFNAME_MAX = 15
"""Longest Linux interface name: IFNAMSIZ (16) minus the terminating NUL."""

_SUPERSEDED = {
    # OvsBridge names: name-not-dns1123 and bridge-object-name-invalid say why and what to write
    (vocab.OVS_BRIDGE.kind, "metadata.name"): frozenset({"pattern-mismatch", "bad-length"}),
}
"""(kind, field) -> schema rules not reported there because a semantic rule explains them."""


_LABEL_MAPS = ("labels", "matchLabels", "nodeSelector")


def schema_problems(doc: Document) -> list[Problem]:
    """JSON Schema problems of one document, mapped to its file positions."""
    out: list[Problem] = []
    for err in validator_for(doc.resource).iter_errors(doc.obj):
        path = err.absolute_path
        if err.validator == "maxLength" and len(path) >= 2 and path[-2] in _LABEL_MAPS:
            continue  # label-invalid says it, with the label value rules
        out.extend(_error_problems(doc, err))
    if out:
        out = [p for p in out if p.rule not in _SUPERSEDED.get((doc.kind, p.field), ())]
    # a value of the wrong type also fails its enum/pattern/range: report the type only
    mistyped = {p.field for p in out if p.rule == "wrong-type"}
    if mistyped:
        out = [p for p in out if p.rule == "wrong-type" or p.field not in mistyped]
    return out


# --- running everything ---------------------------------------------------------------------

_PER_KIND = {
    vocab.SPIDER_IPPOOL.kind: check_pool,
    vocab.SPIDER_MULTUS_CONFIG.kind: check_smc,
    vocab.OVS_BRIDGE.kind: check_bridge,
}


def validate(
    documents: Iterable[Document],
    *,
    strict: bool = False,
    partial: bool = False,
    cache: dict[Any, Any] | None = None,
) -> list[Problem]:
    """Schema and semantic problems of ``documents`` (all of the repository, for cross rules).

    ``partial``: the documents are only some files of the repository (paths given on the
    command line, a pre-commit hook), so messages about missing references say "in the files
    checked" instead of "in the repository". Warnings become errors under ``strict``. Sorted
    by file, line, column. Never raises for bad content.

    ``cache`` (optional, kept by the caller between calls, with documents the loader reuses,
    see ``load_repo(cache=...)``): remembers, per :class:`Document` object, its schema and
    metadata problems, and for a SpiderIPPool its per-pool problems and parsed pool (which
    also depend on the set of Multus configs, part of the key). Every rule across documents
    runs on all of them each time. The cache is rewritten to hold exactly this call's entries.
    """
    docs = list(documents)
    ctx = Context.build(docs, partial=partial)
    problems: list[Problem] = []
    used: dict[Any, Any] = {}
    for d in docs:
        key: tuple[Any, ...] = (d, "document")
        got = cache.get(key) if cache is not None else None
        if got is None:
            got = schema_problems(d) + check_metadata(d)
        used[key] = got
        problems += got
    nads = None  # the Multus configs the pool rules look up, as one short comparable value
    if cache is not None:
        names = "\n".join(sorted(f"{ns}/{name}" for ns, name in ctx.nads))
        nads = (hashlib.sha256(names.encode()).hexdigest(), partial)
    # pools first: the Multus config rules read their parsed families
    for kind in (vocab.SPIDER_IPPOOL.kind, vocab.OVS_BRIDGE.kind, vocab.SPIDER_MULTUS_CONFIG.kind):
        check = _PER_KIND[kind]
        for d in docs:
            if d.kind != kind:
                continue
            if cache is None or kind != vocab.SPIDER_IPPOOL.kind:
                problems += check(d, ctx)
                continue
            key = (d, "pool", nads)
            hit = cache.get(key)
            if hit is not None:
                ctx.pool_info[id(d)] = hit[0]
            else:
                found = check(d, ctx)
                hit = (ctx.pool_info[id(d)], found)
            used[key] = hit
            problems += hit[1]
    if cache is not None:
        cache.clear()
        cache.update(used)
    problems += check_duplicates(ctx)
    problems += check_overlaps(ctx)
    problems += check_addresses_across_pools(ctx)
    problems += check_nad_names(ctx)
    problems += check_bridge_conflicts(ctx)
    return finalize(problems, strict=strict)


def finalize(problems: Iterable[Problem], *, strict: bool = False) -> list[Problem]:
    """Deduplicate and sort ``problems``; under ``strict`` every warning becomes an error.

    A number the loader could not keep (``number-out-of-range``) was replaced by null, so JSON
    Schema problems at the same position are dropped: they would only repeat it.
    """
    problems = list(problems)
    unkept = {(p.file, p.line, p.column) for p in problems if p.rule == "number-out-of-range"}
    if unkept:
        problems = [
            p
            for p in problems
            if (p.file, p.line, p.column) not in unkept or RULES[p.rule].stage != "schema"
        ]
    if strict:
        problems = [p.as_error() for p in problems]
    unique = dict.fromkeys(problems)
    return sorted(unique, key=Problem.sort_key)


def has_errors(problems: Sequence[Problem]) -> bool:
    """True when any problem is an error (the reconciler then applies nothing)."""
    return any(p.severity == ERROR for p in problems)


def validate_repo(
    root: Path | str,
    paths: Sequence[Path | str] | None = None,
    *,
    strict: bool = False,
    ignore_unknown_kinds: bool = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    partial: bool = False,
    cache: dict[str, dict[Any, Any]] | None = None,
) -> tuple[list[Document], list[Problem]]:
    """Load ``paths`` under ``root`` (default: all of it) and validate every document.

    Returns (documents, problems): loading and validation problems together, sorted, warnings
    raised to errors under ``strict``; ``partial`` as in :func:`validate`. Raises
    NotADirectoryError when ``root`` is not a directory. ``cache`` (optional, kept by the
    caller between calls): ``cache["load"]`` and ``cache["validate"]`` are passed to
    :func:`reconciler.loader.load_repo` and :func:`validate`.
    """
    c: dict[str, dict[Any, Any]] = cache if cache is not None else {}
    loaded = load_repo(
        root, paths, ignore_unknown_kinds=ignore_unknown_kinds, max_file_bytes=max_file_bytes,
        cache=c.setdefault("load", {}) if cache is not None else None,
    )  # fmt: skip
    problems = loaded.problems + validate(
        loaded.documents, partial=partial,
        cache=c.setdefault("validate", {}) if cache is not None else None,
    )  # fmt: skip
    return loaded.documents, finalize(problems, strict=strict)
