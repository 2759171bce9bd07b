"""Load the operators' Git repository: every ``.yaml``/``.yml`` document, with positions.

Input: a repository root and optional paths inside it. Output: :class:`LoadResult` with the
:class:`Document` objects of the kinds operators commit (``vocab.USER_KINDS``) and the
:class:`Problem` list of everything that could not be loaded. Nothing here talks to git or the
cluster; the same files give the same result.

Loading is defensive because the files come from pull requests:

- pyyaml's libyaml parser (``CSafeLoader``) composes the node graph; our own builder turns
  nodes into plain data (dict/list/str/int/float/bool/None) and records the 1-based
  line/column of every node, so a problem found later (JSON Schema, semantic rules) can be
  mapped back to ``file:line:column``.
- Duplicate mapping keys are errors (YAML 1.2 forbids them; pyyaml silently keeps the last).
- Aliases are expanded with a node budget per file (a "billion laughs" file stops at the
  budget, in milliseconds, before any memory grows); recursive aliases are refused; nesting
  is bounded (libyaml itself refuses flow nesting deeper than 1000).
- Files above ``max_file_bytes`` are not read; non-UTF-8 files, non-regular files (FIFOs,
  devices) and paths or symlinks that resolve outside the root are refused.
- Empty files, empty documents (``---`` alone) and comment-only files are fine.
- YAML 1.1 scalars resolve as Kubernetes' own YAML reader (go-yaml) does: ``yes`` is a bool,
  ``0x10`` an int; timestamps stay strings; ``<<`` merge keys are honoured.

Namespaces: Git has no "current namespace", so for a namespaced kind without
``metadata.namespace`` the loader applies kubectl's default context namespace, ``default``,
both in :attr:`Document.namespace` and in ``Document.obj`` (so every later stage sees the same
namespace); the validator adds a ``namespace-defaulted`` warning so the choice is visible.
Cluster-scoped kinds have ``namespace`` None.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from reconciler import vocab
from reconciler.vocab import Resource

try:  # libyaml bindings: ~10x faster parsing, same marks
    from yaml import CSafeLoader as _YamlLoader
except ImportError:  # pragma: no cover - pyyaml built without libyaml
    from yaml import SafeLoader as _YamlLoader  # type: ignore[assignment]

__all__ = [
    "DEFAULT_MAX_ALIAS_NODES",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_NODES",
    "DEFAULT_NAMESPACE",
    "ERROR",
    "MAX_SAFE_INTEGER",
    "WARNING",
    "YAML_SUFFIXES",
    "Document",
    "JSONPath",
    "LoadResult",
    "Problem",
    "dump_yaml",
    "format_path",
    "load_repo",
    "load_text",
]

DEFAULT_MAX_FILE_BYTES = 4 * 1024 * 1024
"""Files larger than this (bytes) are refused unread (rule ``file-too-large``)."""

DEFAULT_MAX_NODES = 250_000
"""Most YAML nodes built from one file, aliases expanded (``node-limit``)."""

DEFAULT_MAX_ALIAS_NODES = 50_000
"""Most YAML nodes one file may build by expanding aliases (``alias-expansion-limit``)."""

DEFAULT_MAX_DEPTH = 64
"""Deepest nesting of mappings/sequences accepted in one document (``nesting-limit``)."""

MAX_SAFE_INTEGER = vocab.MAX_SAFE_INTEGER
"""Largest integer magnitude accepted in a document (``number-out-of-range`` beyond it).

Kubernetes stores int64, but JSON clients (kubectl's JavaScript-based UIs, jq, many languages)
read numbers as IEEE 754 doubles: only integers up to 2^53-1 are exact (RFC 8259 section 6,
Kubernetes API conventions "Primitive types"). No field of our kinds needs more."""

_MAX_INT_TEXT = 64
"""Integer scalars with more significant characters than this are out of range unconverted
(int() refuses more than 4300 digits, and sexagesimal 1:2:3... grows quadratically)."""

DEFAULT_NAMESPACE = "default"
"""Namespace given to a namespaced object without ``metadata.namespace`` (kubectl's default)."""

YAML_SUFFIXES = (".yaml", ".yml")

JSONPath = tuple[str | int, ...]
"""Path of a node inside a document: mapping keys and sequence indexes, e.g. ('spec','ips',0)."""

ERROR = "error"
WARNING = "warning"

# --- problems -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One finding about the repository, pointing at ``file:line:column``.

    ``severity`` is ``"error"`` (the reconciler applies nothing) or ``"warning"`` (allowed
    unless ``--strict``). ``file`` is relative to the repository root (posix), ``line`` and
    ``column`` are 1-based. ``kind``/``namespace``/``name`` name the object when known;
    ``field`` is a JSON path such as ``spec.ips[0]``; ``hint`` says what to write instead;
    ``rule`` is a stable identifier (see ``reconciler.rules.RULES``).
    """

    severity: str
    file: str
    line: int = 1
    column: int = 1
    kind: str | None = None
    namespace: str | None = None
    name: str | None = None
    field: str = ""
    message: str
    hint: str = ""
    rule: str

    def object_ref(self) -> str:
        """``Kind namespace/name``, ``Kind name``, ``Kind`` or "" when no object is known."""
        if not self.kind:
            return ""
        if self.name is None:
            return self.kind
        if self.namespace:
            return f"{self.kind} {self.namespace}/{self.name}"
        return f"{self.kind} {self.name}"

    def format(self) -> str:
        """One line: ``file:line:col: severity: Kind name field: message (hint)``.

        Example: ``pools.yaml:7:11: error: SpiderIPPool ippool-test spec.subnet: "172.18.0.1/16"
        is not a canonical CIDR: host bits are set (write 172.18.0.0/16)``.
        """
        who = self.object_ref()
        subject = " ".join(p for p in (who, self.field) if p)
        text = f"{self.file}:{self.line}:{self.column}: {self.severity}: "
        if subject:
            text += f"{subject}: "
        text += self.message
        if self.hint:
            text += f" ({self.hint})"
        return text

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (for JSON output)."""
        return {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "field": self.field,
            "message": self.message,
            "hint": self.hint,
            "rule": self.rule,
        }

    def as_error(self) -> Problem:
        """The same problem with severity ``error`` (what ``--strict`` does to warnings)."""
        return self if self.severity == ERROR else replace(self, severity=ERROR)

    def sort_key(self) -> tuple[str, int, int, str, str]:
        """Order: file, line, column, rule, message."""
        return (self.file, self.line, self.column, self.rule, self.message)


_SIMPLE_KEY = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def format_path(path: Iterable[str | int]) -> str:
    """JSON path tuple -> text: ``('spec','ips',0)`` -> ``spec.ips[0]``.

    Keys that are not plain identifiers are quoted in brackets:
    ``metadata.annotations["multus.spidernet.io/cr-name"]``.
    """
    out: list[str] = []
    for p in path:
        if isinstance(p, int):
            out.append(f"[{p}]")
        elif p and _SIMPLE_KEY.issuperset(p) and (p[0].isalpha() or p[0] == "_"):
            out.append(f".{p}" if out else p)
        else:
            out.append('["' + p.replace("\\", "\\\\").replace('"', '\\"') + '"]')
    return "".join(out)


# --- documents ------------------------------------------------------------------------------

Mark = tuple[int, int]


@dataclass(eq=False)
class Document:
    """One YAML document of a user kind, as plain data plus source positions.

    ``path``: file relative to the root (posix); ``index``: 0-based number of the document in
    that file (empty documents count); ``obj``: the data (dict); ``resource``: its
    ``vocab.Resource``; ``namespace``: None for cluster-scoped kinds, else
    ``metadata.namespace`` or ``"default"`` (see module docstring); ``name``: ``metadata.name``
    when it is a string, else None. ``marks``/``key_marks`` map JSON paths to 1-based
    ``(line, column)`` of the value node and of the mapping key naming it; ``raw`` maps the
    path of each scalar YAML resolved to something other than a string (a number, boolean or
    null) to its text as written, e.g. ``5.10`` for the float 5.1 (hints quote what the user
    wrote, not what YAML made of it).
    """

    path: str
    index: int
    obj: dict[str, Any]
    resource: Resource
    name: str | None
    namespace: str | None
    marks: dict[JSONPath, Mark] = field(repr=False, default_factory=dict)
    key_marks: dict[JSONPath, Mark] = field(repr=False, default_factory=dict)
    namespace_defaulted: bool = False
    raw: dict[JSONPath, str] = field(repr=False, default_factory=dict)

    @property
    def kind(self) -> str:
        """``kind`` of the document, e.g. ``SpiderIPPool``."""
        return self.resource.kind

    @property
    def api_version(self) -> str:
        """``apiVersion`` of the document, e.g. ``spiderpool.spidernet.io/v2beta1``."""
        return self.resource.api_version

    def key(self) -> tuple[str, str | None, str | None]:
        """(kind, namespace, name): identity of the object in the cluster."""
        return (self.kind, self.namespace, self.name)

    def ref(self) -> str:
        """``Kind namespace/name`` or ``Kind name`` for messages."""
        if self.namespace:
            return f"{self.kind} {self.namespace}/{self.name}"
        return f"{self.kind} {self.name}"

    def location(self) -> str:
        """``file:line`` of the document start."""
        return f"{self.path}:{self.mark(())[0]}"

    def mark(self, path: Sequence[str | int]) -> Mark:
        """1-based (line, column) of the node at ``path``, else of its nearest existing parent."""
        p = tuple(path)
        marks = self.marks
        while p not in marks and p:
            p = p[:-1]
        return marks.get(p, (1, 1))

    def key_mark(self, path: Sequence[str | int]) -> Mark:
        """Position of the mapping key that names ``path`` (``subnet`` in ``subnet: x``).

        For sequence items and the document root this is the node itself; falls back to the
        nearest existing parent like :meth:`mark`.
        """
        p = tuple(path)
        while p:
            if p in self.key_marks:
                return self.key_marks[p]
            if p in self.marks:
                return self.marks[p]
            p = p[:-1]
        return self.marks.get((), (1, 1))

    def get(self, path: Sequence[str | int], default: Any = None) -> Any:
        """Value at ``path`` in ``obj`` or ``default`` when any step is missing or mistyped."""
        cur: Any = self.obj
        for p in path:
            if isinstance(p, int):
                if not isinstance(cur, list) or not -len(cur) <= p < len(cur):
                    return default
            elif not isinstance(cur, dict) or p not in cur:
                return default
            cur = cur[p]
        return cur

    def problem(
        self,
        path: Sequence[str | int],
        *,
        rule: str,
        message: str,
        hint: str = "",
        severity: str = ERROR,
        at_key: bool = False,
    ) -> Problem:
        """A :class:`Problem` about this document at ``path`` (the key's position if ``at_key``)."""
        line, col = self.key_mark(path) if at_key else self.mark(path)
        return Problem(
            severity=severity,
            file=self.path,
            line=line,
            column=col,
            kind=self.kind,
            namespace=self.namespace,
            name=self.name,
            field=format_path(path),
            message=message,
            hint=hint,
            rule=rule,
        )


@dataclass
class LoadResult:
    """What :func:`load_repo` found: documents of user kinds, problems, files read."""

    documents: list[Document] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


# --- building plain data from the node graph ------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_STR, _NULL, _BOOL, _INT, _FLOAT = (_TAG + t for t in ("str", "null", "bool", "int", "float"))
_TIMESTAMP, _SEQ, _MAP, _MERGE = (_TAG + t for t in ("timestamp", "seq", "map", "merge"))
_CONSTRUCTOR = SafeConstructor()


class _Abort(Exception):
    """Stop building the current file (a limit was hit); carries the problem."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class _Builder:
    """Turns composed YAML nodes into plain data, recording marks and problems.

    One builder per file: ``budget`` is shared by all documents of the file.
    """

    def __init__(self, file: str, max_nodes: int, max_depth: int, max_alias_nodes: int) -> None:
        self.file = file
        self.budget = max_nodes
        self.max_nodes = max_nodes
        self.alias_budget = max_alias_nodes
        self.max_alias_nodes = max_alias_nodes
        self._in_alias = 0
        self.max_depth = max_depth
        self.problems: list[Problem] = []
        self.marks: dict[JSONPath, Mark] = {}
        self.key_marks: dict[JSONPath, Mark] = {}
        self.raw: dict[JSONPath, str] = {}
        self._seen: set[int] = set()
        self._active: set[int] = set()

    def _problem(self, node: Node, rule: str, message: str, hint: str = "") -> Problem:
        m = node.start_mark
        return Problem(
            severity=ERROR,
            file=self.file,
            line=m.line + 1,
            column=m.column + 1,
            message=message,
            hint=hint,
            rule=rule,
        )

    def document(self, node: Node) -> Any:
        """Plain data of one document; its marks are in ``marks``/``key_marks`` afterwards."""
        self.marks = {}
        self.key_marks = {}
        self.raw = {}
        self._seen = set()
        self._active = set()
        self._in_alias = 0
        return self._build(node, (), 0)

    def _build(self, node: Node, path: JSONPath, depth: int) -> Any:
        self.budget -= 1
        if self._in_alias:
            self.alias_budget -= 1
            if self.alias_budget < 0:
                raise _Abort(
                    self._problem(
                        node,
                        "alias-expansion-limit",
                        "expanding the aliases of this file builds more than "
                        f"{self.max_alias_nodes} YAML nodes; refusing to load it (an alias bomb?)",
                        "write the repeated parts out, or split the file",
                    )
                )
        if self.budget < 0:
            raise _Abort(
                self._problem(
                    node,
                    "node-limit",
                    f"file has more than {self.max_nodes} YAML nodes; refusing to load it",
                    "split the file",
                )
            )
        m = node.start_mark
        self.marks[path] = (m.line + 1, m.column + 1)
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if depth >= self.max_depth:
            raise _Abort(
                self._problem(
                    node,
                    "nesting-limit",
                    f"nesting deeper than {self.max_depth} levels; refusing to load it",
                )
            )
        ident = id(node)
        if ident in self._active:
            raise _Abort(
                self._problem(
                    node,
                    "recursive-alias",
                    "an alias refers to a node that contains it (recursive alias)",
                    "remove the self-reference",
                )
            )
        aliased = ident in self._seen
        if aliased:
            self._in_alias += 1
        else:
            self._seen.add(ident)
        self._active.add(ident)
        try:
            if isinstance(node, SequenceNode):
                if node.tag != _SEQ:
                    self._unsupported_tag(node)
                return [self._build(c, (*path, i), depth + 1) for i, c in enumerate(node.value)]
            assert isinstance(node, MappingNode)
            if node.tag != _MAP:
                self._unsupported_tag(node)
            return self._mapping(node, path, depth)
        finally:
            self._active.discard(ident)
            if aliased:
                self._in_alias -= 1

    def _unsupported_tag(self, node: Node) -> None:
        self.problems.append(
            self._problem(
                node,
                "unsupported-yaml-tag",
                f"YAML tag {node.tag} is not supported in Kubernetes documents",
                "remove the tag",
            )
        )

    def _scalar(self, node: ScalarNode, path: JSONPath) -> Any:
        tag = node.tag
        if tag in (_STR, _TIMESTAMP):
            return node.value
        self.raw[path] = node.value
        if tag == _NULL:
            return None
        if tag == _BOOL:
            return SafeConstructor.bool_values[node.value.lower()]
        if tag == _INT:
            return self._int(node, path)
        if tag == _FLOAT:
            return self._float(node, path)
        self._unsupported_tag(node)
        return node.value

    def _int(self, node: ScalarNode, path: JSONPath) -> int | str | None:
        """An int of magnitude at most MAX_SAFE_INTEGER; None (with a problem) beyond it; the text itself
        when it only looks like an int (``0b_``), as go-yaml keeps it a string."""
        text = node.value.replace("_", "")
        body = text.lstrip("+-")
        if body[:2].lower() in ("0x", "0b", "0o"):
            body = body[2:]
        if len(body.lstrip("0")) > _MAX_INT_TEXT:
            self._out_of_range(node, path)
            return None
        try:
            value: int = _CONSTRUCTOR.construct_yaml_int(node)
        except ValueError:
            return node.value
        if abs(value) > MAX_SAFE_INTEGER:
            self._out_of_range(node, path)
            return None
        return value

    def _float(self, node: ScalarNode, path: JSONPath) -> float | str | None:
        """A finite float; None (with a problem) for .inf, .nan or an overflow like 1e999."""
        try:
            value: float = _CONSTRUCTOR.construct_yaml_float(node)
        except ValueError:
            return node.value
        if not math.isfinite(value):
            self.problems.append(
                replace(
                    self._problem(
                        node,
                        "number-out-of-range",
                        f"number {_short(node.value)} is not finite: JSON and Kubernetes "
                        "cannot store infinity or NaN",
                        "write a finite number",
                    ),
                    field=format_path(path),
                )
            )
            return None
        return value

    def _out_of_range(self, node: ScalarNode, path: JSONPath) -> None:
        self.problems.append(
            replace(
                self._problem(
                    node,
                    "number-out-of-range",
                    f"integer {_short(node.value)} is out of range: Kubernetes clients read "
                    f"integers exactly only up to 2^53-1 ({MAX_SAFE_INTEGER}) in magnitude",
                    "write a number within the field's range",
                ),
                field=format_path(path),
            )
        )

    def _key(self, node: Node) -> str | None:
        if isinstance(node, ScalarNode):
            if node.tag == _STR:
                return node.value
            if node.tag in (_INT, _BOOL, _NULL, _FLOAT, _TIMESTAMP):
                self.problems.append(
                    self._problem(
                        node,
                        "non-string-key",
                        f"mapping key {node.value!r} is read as {node.tag.rsplit(':', 1)[-1]}, "
                        "not as a string",
                        f'quote it: "{node.value}":',
                    )
                )
                return node.value
        self.problems.append(
            self._problem(
                node,
                "non-string-key",
                "mapping keys must be plain strings",
                "write the key as a string",
            )
        )
        return None

    def _mapping(self, node: MappingNode, path: JSONPath, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        first: dict[str, Mark] = {}
        merges: list[Node] = []
        for knode, vnode in node.value:
            if knode.tag == _MERGE:
                merges.append(vnode)
                continue
            key = self._key(knode)
            if key is None:
                continue
            km = knode.start_mark
            kmark = (km.line + 1, km.column + 1)
            if key in first:
                line, col = first[key]
                self.problems.append(
                    Problem(
                        severity=ERROR,
                        file=self.file,
                        line=kmark[0],
                        column=kmark[1],
                        field=format_path((*path, key)),
                        message=f'duplicate key "{key}" (first at line {line}, column {col})',
                        hint="keep one of them",
                        rule="duplicate-key",
                    )
                )
                continue
            first[key] = kmark
            sub = (*path, key)
            self.key_marks[sub] = kmark
            out[key] = self._build(vnode, sub, depth + 1)
        for mnode in merges:
            self._merge(out, mnode, path, depth)
        return out

    def _merge(self, out: dict[str, Any], mnode: Node, path: JSONPath, depth: int) -> None:
        """YAML 1.1 merge key ``<<``: keys of the merged mapping(s) that are not set explicitly."""
        sources = mnode.value if isinstance(mnode, SequenceNode) else [mnode]
        for src in sources:
            if not isinstance(src, MappingNode):
                self.problems.append(
                    self._problem(
                        src,
                        "yaml-syntax",
                        "a merge key (<<) needs a mapping or a list of mappings",
                    )
                )
                continue
            merged = self._build(src, (*path, "<<"), depth)
            # marks of the merged subtree were recorded under "<<"; re-home them
            prefix = len(path) + 1
            for p in [p for p in self.marks if p[:prefix] == (*path, "<<")]:
                self.marks.setdefault((*path, *p[prefix:]), self.marks.pop(p))
            for p in [p for p in self.key_marks if p[:prefix] == (*path, "<<")]:
                self.key_marks.setdefault((*path, *p[prefix:]), self.key_marks.pop(p))
            if isinstance(merged, dict):
                for k, v in merged.items():
                    out.setdefault(k, v)


def _short(text: str) -> str:
    """``text`` for a message, elided in the middle when longer than 24 characters."""
    if len(text) <= 24:
        return text
    return f"{text[:10]}...{text[-6:]} ({len(text)} characters)"


# --- reading files --------------------------------------------------------------------------


def _line_col(data: bytes, offset: int) -> Mark:
    line = data.count(b"\n", 0, offset) + 1
    col = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return line, col


def _known_kinds_text() -> str:
    by_version: dict[str, list[str]] = {}
    for r in vocab.USER_KINDS:
        by_version.setdefault(r.api_version, []).append(r.kind)
    return "; ".join(f"{', '.join(k)} ({v})" for v, k in by_version.items())


_NOT_IN_GIT = {
    vocab.SPIDER_ENDPOINT.key(): "the node agent writes it for each pod",
    vocab.OVS_BRIDGE_ENACTMENT.key(): "the node agent writes it for each node and bridge",
    vocab.GIT_SYNC.key(): "the reconciler writes it (its own status)",
    vocab.NETWORK_ATTACHMENT_DEFINITION.key(): "the reconciler renders it from a SpiderMultusConfig",
}
_OUR_GROUPS = {vocab.SPIDERPOOL_GROUP, vocab.UNDERLAY_GROUP}
_USER_BY_KIND = {r.kind: r for r in vocab.USER_KINDS}


def _classify(
    file: str,
    index: int,
    obj: Any,
    marks: dict[JSONPath, Mark],
    key_marks: dict[JSONPath, Mark],
    ignore_unknown_kinds: bool,
    raw: dict[JSONPath, str] | None = None,
) -> tuple[Document | None, list[Problem]]:
    """Turn one built document into a Document of a user kind, or problems."""
    start = marks.get((), (1, 1))

    def at(path: JSONPath, rule: str, message: str, hint: str, kind: str | None = None) -> Problem:
        line, col = key_marks.get(path) or marks.get(path) or start
        return Problem(
            severity=ERROR,
            file=file,
            line=line,
            column=col,
            kind=kind,
            field=format_path(path) if path else "",
            message=message,
            hint=hint,
            rule=rule,
        )

    if not isinstance(obj, dict):
        what = "a list" if isinstance(obj, list) else f"a {type(obj).__name__} scalar"
        return None, [
            at(
                (),
                "document-not-mapping",
                f"document {index} is {what}, not a Kubernetes object",
                "write a mapping with apiVersion, kind, metadata and spec",
            )
        ]
    api_version = obj.get("apiVersion")
    kind = obj.get("kind")
    problems: list[Problem] = []
    if not isinstance(api_version, str) or not api_version:
        problems.append(
            at(
                ("apiVersion",) if "apiVersion" in obj else (),
                "missing-apiversion",
                "document has no apiVersion"
                if "apiVersion" not in obj
                else "apiVersion must be a non-empty string",
                "add apiVersion: spiderpool.spidernet.io/v2beta1 or underlay.dev/v1alpha1",
            )
        )
    if not isinstance(kind, str) or not kind:
        problems.append(
            at(
                ("kind",) if "kind" in obj else (),
                "missing-kind",
                "document has no kind" if "kind" not in obj else "kind must be a non-empty string",
                f"add kind: one of {', '.join(r.kind for r in vocab.USER_KINDS)}",
            )
        )
    if problems:
        return None, problems
    assert isinstance(api_version, str) and isinstance(kind, str)
    res = vocab.BY_KEY.get((api_version, kind))
    if res is None or res not in vocab.USER_KINDS:
        return None, _unknown_kind(at, api_version, kind, res, ignore_unknown_kinds)
    md = obj.get("metadata")
    name = md.get("name") if isinstance(md, dict) else None
    namespace: str | None = None
    defaulted = False
    if res.namespaced:
        ns = md.get("namespace") if isinstance(md, dict) else None
        if isinstance(md, dict) and "namespace" not in md:
            md["namespace"] = DEFAULT_NAMESPACE
            defaulted = True
            ns = DEFAULT_NAMESPACE
        namespace = ns if isinstance(ns, str) else None
    doc = Document(
        path=file,
        index=index,
        obj=obj,
        resource=res,
        name=name if isinstance(name, str) else None,
        namespace=namespace,
        marks=marks,
        key_marks=key_marks,
        namespace_defaulted=defaulted,
        raw=raw if raw is not None else {},
    )
    return doc, []


def _unknown_kind(
    at: Any, api_version: str, kind: str, res: Resource | None, ignore: bool
) -> list[Problem]:
    if res is not None:  # one of ours, but not something operators commit
        if ignore:
            return []
        return [
            at(
                ("kind",),
                "unknown-kind",
                f"{kind} does not belong in Git: {_NOT_IN_GIT.get(res.key(), 'it is status')}",
                "remove this document",
                kind,
            )
        ]
    user = _USER_BY_KIND.get(kind)
    if user is not None:  # right kind, wrong apiVersion: never skipped
        return [
            at(
                ("apiVersion",),
                "wrong-apiversion",
                f"{kind} is read as apiVersion {user.api_version}, not {api_version}",
                f"apiVersion: {user.api_version}",
                kind,
            )
        ]
    group = api_version.rpartition("/")[0]
    close = difflib.get_close_matches(
        kind.lower(), [k.lower() for k in _USER_BY_KIND], n=1, cutoff=0.8
    )
    suggestion = next((k for k in _USER_BY_KIND if close and k.lower() == close[0]), None)
    if ignore and not (group in _OUR_GROUPS and suggestion):
        return []
    hint = (
        f"did you mean kind: {suggestion}?"
        if suggestion
        else "pass --ignore-unknown-kinds to skip kinds underlay does not manage"
    )
    return [
        at(
            ("kind",),
            "unknown-kind",
            f"unknown kind {kind} ({api_version}); underlay reads {_known_kinds_text()}",
            hint,
            kind,
        )
    ]


def load_text(
    text: str | bytes,
    file: str = "<string>",
    *,
    ignore_unknown_kinds: bool = False,
    max_nodes: int = DEFAULT_MAX_NODES,
    max_alias_nodes: int = DEFAULT_MAX_ALIAS_NODES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> LoadResult:
    """Load the YAML documents of one file's content (``bytes`` must be UTF-8).

    ``file`` is the name used in documents and problems. Never raises for bad input: every
    failure is a :class:`Problem` (rules ``not-utf8``, ``yaml-syntax``, ``duplicate-key``,
    ``alias-expansion-limit``, ``node-limit``, ``nesting-limit``, ``recursive-alias``,
    ``unsupported-yaml-tag``, ``non-string-key``, ``document-not-mapping``,
    ``missing-apiversion``, ``missing-kind``, ``unknown-kind``, ``wrong-apiversion``).
    """
    result = LoadResult(files=[file])
    if isinstance(text, bytes):
        data = text
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line, col = _line_col(data, exc.start)
            result.problems.append(
                Problem(
                    severity=ERROR,
                    file=file,
                    line=line,
                    column=col,
                    message=f"file is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                    hint="save the file as UTF-8",
                    rule="not-utf8",
                )
            )
            return result
    if text.startswith("\ufeff"):
        text = text[1:]
    builder = _Builder(file, max_nodes, max_depth, max_alias_nodes)
    index = -1
    try:
        for index, node in enumerate(yaml.compose_all(text, Loader=_YamlLoader)):
            if node is None or (isinstance(node, ScalarNode) and node.tag == _NULL):
                continue
            obj = builder.document(node)
            doc, problems = _classify(
                file,
                index,
                obj,
                builder.marks,
                builder.key_marks,
                ignore_unknown_kinds,
                builder.raw,
            )
            result.problems.extend(problems)
            if doc is not None:
                result.documents.append(doc)
                builder.problems = [
                    replace(p, kind=doc.kind, namespace=doc.namespace, name=doc.name)
                    for p in builder.problems
                ]
            result.problems.extend(builder.problems)
            builder.problems = []
    except _Abort as exc:
        result.problems.append(exc.problem)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = exc.problem or "invalid YAML"
        context = f" {exc.context}" if exc.context else ""
        if exc.context and exc.context_mark and exc.context_mark is not mark:
            context += f" at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}"
        result.problems.append(
            Problem(
                severity=ERROR,
                file=file,
                line=line,
                column=col,
                message=f"YAML syntax error: {what}{(',' + context) if context else ''}",
                hint=_syntax_hint(what, text, mark, exc.context_mark),
                rule="yaml-syntax",
            )
        )
    except yaml.reader.ReaderError as exc:  # control characters and the like
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        result.problems.append(
            Problem(
                severity=ERROR,
                file=file,
                line=line,
                column=col,
                message=f"YAML syntax error: character U+{char:04X} is not allowed ({exc.reason})",
                hint="remove the control character",
                rule="yaml-syntax",
            )
        )
    result.problems.extend(builder.problems)
    return result


def _syntax_hint(problem: str, text: str, mark: Any, context_mark: Any = None) -> str:
    """What to write instead, for the YAML syntax errors people make most."""
    lines = text.splitlines()
    line = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
    if "could not find expected ':'" in problem and context_mark is not None:
        return (
            f'line {context_mark.line + 1} has no ": " after its key: write a space after '
            'the colon ("gateway: 172.18.0.1"), or quote the value if it is not a key'
        )
    if "mapping values are not allowed" in problem and mark is not None:
        indent = len(line) - len(line.lstrip(" "))
        for n in range(mark.line - 1, -1, -1):
            above = lines[n]
            if not above.strip() or above.lstrip().startswith("#"):
                continue
            up = len(above) - len(above.lstrip(" "))
            if indent > up and ": " in above.strip() and not above.rstrip().endswith(":"):
                return (
                    f"this key is indented {indent} spaces, deeper than the key on line {n + 1} "
                    f"({up} spaces), so YAML reads it as part of that value: indent it "
                    f"{up} spaces like its neighbour, or quote the value if it contains ': '"
                )
            break
    if "\t" in line[: (mark.column + 1) if mark is not None else 0] or (
        "cannot start any token" in problem and line[mark.column : mark.column + 1] == "\t"
    ):
        return "indent with spaces: YAML does not allow tabs for indentation"
    if "mapping values are not allowed" in problem:
        return "quote the value if it contains ': ', or put the key on its own line"
    if any(
        k in problem for k in ("expected key", "expected <block end>", "expected '-' indicator")
    ):
        return "check this line's indentation against the lines above: YAML nests by indentation"
    if "expected ',' or ']'" in problem or "expected ',' or '}'" in problem:
        return "separate the items with commas and close the bracket the message points at"
    if "found undefined alias" in problem:
        return "define the anchor (&name) before using the alias (*name)"
    if "found unexpected end of stream" in problem or "unclosed" in problem:
        return "close the quote or bracket opened here"
    return ""


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def load_repo(
    root: Path | str,
    paths: Sequence[Path | str] | None = None,
    *,
    ignore_unknown_kinds: bool = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_nodes: int = DEFAULT_MAX_NODES,
    max_alias_nodes: int = DEFAULT_MAX_ALIAS_NODES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    cache: dict[Any, LoadResult] | None = None,
) -> LoadResult:
    """Load every ``.yaml``/``.yml`` document under ``paths`` (default: the whole ``root``).

    ``paths`` are files or directories, relative to ``root`` or absolute; files named
    explicitly are read whatever their suffix. Directories are walked in sorted order,
    skipping entries whose name starts with ``.`` (``.git``, ``.github``...). Symlinks are
    followed only while they resolve inside ``root`` (else ``symlink-outside-root``); a path
    given outside ``root`` is refused (``path-outside-root``); a missing one is
    ``path-not-found``. Files over ``max_file_bytes`` are refused unread (``file-too-large``).

    Only documents of ``vocab.USER_KINDS`` become :class:`Document`; other kinds are
    ``unknown-kind`` errors unless ``ignore_unknown_kinds`` (see :func:`load_text`).
    Raises ``NotADirectoryError`` when ``root`` is not a directory; never raises for file
    content.

    ``cache`` (optional, kept by the caller between calls, e.g. the reconciler's loop): the
    result of each file by (path, SHA-256 of its bytes, limits); a file whose bytes did not
    change is not parsed again and yields the *same* :class:`Document` objects (documents are
    never changed after loading). The cache is rewritten to hold exactly this call's files.
    """
    root_abs = os.path.abspath(root)
    if not os.path.isdir(root_abs):
        raise NotADirectoryError(f"repository root {root} is not a directory")
    root_real = os.path.realpath(root_abs)
    result = LoadResult()
    files: list[tuple[str, str]] = []  # (relative posix path, real path)
    seen_files: set[str] = set()

    def refuse(rel: str, rule: str, message: str, hint: str = "") -> None:
        result.problems.append(
            Problem(severity=ERROR, file=rel, message=message, hint=hint, rule=rule)
        )

    def rel_of(abs_path: str) -> str:
        return Path(os.path.relpath(abs_path, root_abs)).as_posix()

    def add_file(abs_path: str, real: str) -> None:
        rel = rel_of(abs_path)
        if rel in seen_files:
            return
        seen_files.add(rel)
        files.append((rel, real))

    def walk(dir_abs: str, visited: set[str]) -> None:
        try:
            entries = sorted(os.scandir(dir_abs), key=lambda e: e.name)
        except OSError as exc:
            refuse(rel_of(dir_abs), "io-error", f"cannot read directory: {exc.strerror}")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            abs_path = os.path.join(dir_abs, entry.name)
            is_yaml = entry.name.lower().endswith(YAML_SUFFIXES)
            if entry.is_symlink():
                real = os.path.realpath(abs_path)
                if not _is_within(real, root_real):
                    if is_yaml or os.path.isdir(real):
                        refuse(
                            rel_of(abs_path),
                            "symlink-outside-root",
                            "symlink points outside the repository; refusing to follow it",
                            "commit the file itself",
                        )
                    continue
            else:
                real = abs_path
            try:
                st = os.stat(real)
            except OSError:
                if is_yaml:
                    refuse(rel_of(abs_path), "io-error", "broken symlink")
                continue
            if stat.S_ISDIR(st.st_mode):
                real_dir = os.path.realpath(real)
                if real_dir in visited:
                    continue
                walk(abs_path, visited | {real_dir})
            elif is_yaml:
                add_file(abs_path, real)

    for p in paths if paths is not None else [Path(".")]:
        abs_path = os.path.abspath(os.path.join(root_abs, p))
        shown = Path(os.path.relpath(abs_path, root_abs)).as_posix()
        if not _is_within(abs_path, root_abs):
            refuse(
                Path(p).as_posix(),
                "path-outside-root",
                f"path is outside the repository root {Path(root).as_posix()}",
                "pass paths inside the root, or set the root",
            )
            continue
        real = os.path.realpath(abs_path)
        if not _is_within(real, root_real):
            refuse(
                shown,
                "symlink-outside-root",
                "path resolves outside the repository (symlink); refusing to follow it",
                "commit the file itself",
            )
            continue
        if not os.path.exists(real):
            refuse(shown, "path-not-found", "no such file or directory")
            continue
        if os.path.isdir(real):
            walk(abs_path, {real})
        else:
            add_file(abs_path, real)

    used: dict[Any, LoadResult] = {}
    for rel, real in files:
        result.files.append(rel)
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            refuse(rel, "io-error", f"cannot open file: {exc.strerror}")
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                refuse(rel, "not-a-regular-file", "not a regular file (FIFO, socket or device)")
                continue
            if st.st_size > max_file_bytes:
                refuse(
                    rel,
                    "file-too-large",
                    f"file is {st.st_size} bytes, over the {max_file_bytes}-byte limit; not read",
                    "split it into smaller files",
                )
                continue
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(max_file_bytes + 1)
        except OSError as exc:
            refuse(rel, "io-error", f"cannot read file: {exc.strerror}")
            continue
        finally:
            os.close(fd)
        if len(data) > max_file_bytes:
            refuse(
                rel,
                "file-too-large",
                f"file grew over the {max_file_bytes}-byte limit while read; not loaded",
                "split it into smaller files",
            )
            continue
        key = None
        if cache is not None:
            digest = hashlib.sha256(data).digest()
            key = (rel, digest, ignore_unknown_kinds, max_nodes, max_alias_nodes, max_depth)
            hit = cache.get(key)
            if hit is not None:
                used[key] = hit
                result.documents.extend(hit.documents)
                result.problems.extend(hit.problems)
                continue
        one = load_text(
            data,
            rel,
            ignore_unknown_kinds=ignore_unknown_kinds,
            max_nodes=max_nodes,
            max_alias_nodes=max_alias_nodes,
            max_depth=max_depth,
        )
        if key is not None:
            used[key] = one
        result.documents.extend(one.documents)
        result.problems.extend(one.problems)
    if cache is not None:
        cache.clear()
        cache.update(used)
    return result


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """Safe dumper that keeps key order and writes multi-line strings as blocks."""


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar(_STR, data, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(objs: Iterable[Any]) -> str:
    """Render plain objects as a multi-document YAML stream (``---`` between documents).

    Key order is kept; the output loads back to equal data with :func:`load_text`.
    """
    return yaml.dump_all(
        list(objs), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
