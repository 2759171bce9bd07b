"""Semantic rules shared by every kind, and the cross-document index the other rules use.

Kubernetes API conventions: object names are DNS-1123 subdomains, namespaces DNS-1123 labels,
label keys qualified names with values of at most 63 characters (k8s.io/apimachinery
validation). Every rule here reads plain data and never assumes the schema passed: values of
the wrong type are skipped (the schema reports them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from reconciler import vocab
from reconciler.loader import WARNING, Document, Problem

# matched with fullmatch() only: re's "$" also matches before a final newline
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


@dataclass
class PoolInfo:
    """What the SpiderIPPool rules parsed from one pool (netaddr objects), for cross checks.

    ``net``: the subnet (canonical network) or None; ``family``: 4, 6 or None;
    ``entries``: (field path, (version, first, last)) of the valid ``ips`` entries;
    ``allocatable``: merged (version, first, last) integer spans of ips minus excludeIPs;
    ``gateway``: the parsed gateway (netaddr.IPAddress) or None; ``route_gws``: (field path,
    parsed route gw) of the valid route gateways.
    """

    doc: Document
    net: Any = None
    family: int | None = None
    entries: list[tuple[tuple[str | int, ...], Any]] = field(default_factory=list)
    allocatable: list[tuple[int, int, int]] = field(default_factory=list)
    gateway: Any = None
    route_gws: list[tuple[tuple[str | int, ...], Any]] = field(default_factory=list)


@dataclass
class Context:
    """Indexes over all documents of one validation run.

    ``pools``: SpiderIPPool by name; ``nads``: SpiderMultusConfig by (namespace, name of the
    NetworkAttachmentDefinition it renders); ``bridges``: OvsBridge by the bridge name it
    makes; ``pool_info``: parsed pools (filled by the SpiderIPPool rules); ``partial``: the
    documents are only some files of the repository (see :attr:`scope`).
    """

    documents: list[Document]
    pools: dict[str, list[Document]] = field(default_factory=dict)
    nads: dict[tuple[str, str], list[Document]] = field(default_factory=dict)
    bridges: dict[str, list[Document]] = field(default_factory=dict)
    pool_info: dict[int, PoolInfo] = field(default_factory=dict)
    partial: bool = False

    @property
    def scope(self) -> str:
        """Where references were looked for: "the repository" or "the files checked"."""
        return "the files checked" if self.partial else "the repository"

    def outside_note(self, what: str, done: str = "managed") -> str:
        """Hint tail for a reference not found: where else ``what`` may legitimately be
        ``done`` ("managed", "made")."""
        if self.partial:
            return (
                f"fine if {what} is {done} outside Git or defined in a file not checked here: a "
                "pre-commit hook passes only the changed files, so CI should check the whole "
                "repository"
            )
        return f"fine if {what} is {done} outside Git"

    @classmethod
    def build(cls, documents: Iterable[Document], *, partial: bool = False) -> Context:
        """Index ``documents`` (all kinds; documents without a name are left out)."""
        ctx = cls(list(documents), partial=partial)
        for d in ctx.documents:
            if d.name is None:
                continue
            if d.resource is vocab.SPIDER_IPPOOL:
                ctx.pools.setdefault(d.name, []).append(d)
            elif d.resource is vocab.SPIDER_MULTUS_CONFIG and d.namespace is not None:
                ctx.nads.setdefault((d.namespace, nad_name(d)), []).append(d)
            elif d.resource is vocab.OVS_BRIDGE:
                b = bridge_name(d)
                if b is not None:
                    ctx.bridges.setdefault(b, []).append(d)
        return ctx


def nad_name(doc: Document) -> str:
    """Name of the NetworkAttachmentDefinition a SpiderMultusConfig renders.

    Spiderpool: the ``multus.spidernet.io/cr-name`` annotation, else ``metadata.name``.
    """
    cr = doc.get(("metadata", "annotations", vocab.ANNO_SMC_CR_NAME))
    if isinstance(cr, str) and cr:
        return cr
    return doc.name or ""


def bridge_name(doc: Document) -> str | None:
    """Bridge an OvsBridge makes: ``spec.bridge``, else ``metadata.name`` (None if neither)."""
    b = doc.get(("spec", "bridge"))
    if isinstance(b, str) and b:
        return b
    return doc.name


def suggest_dns1123(name: str, max_len: int = 253, label: bool = False) -> str:
    """A DNS-1123 name close to ``name``: lower-cased, other characters turned into ``-``."""
    s = name.lower()
    s = re.sub(r"[^a-z0-9.-]" if not label else r"[^a-z0-9-]", "-", s)
    s = re.sub(r"-{2,}", "-", s).strip("-.")
    return s[:max_len].rstrip("-.") or "name"


def check_dns1123(
    doc: Document, path: tuple[str | int, ...], value: Any, what: str, *, label: bool = False
) -> list[Problem]:
    """``value`` must be a DNS-1123 subdomain (or label): rule ``name-not-dns1123``."""
    if not isinstance(value, str) or not value:
        return []
    limit = 63 if label else 253
    pattern = DNS1123_LABEL if label else DNS1123_SUBDOMAIN
    form = "DNS-1123 label" if label else "DNS-1123 subdomain"
    if len(value) <= limit and pattern.fullmatch(value):
        return []
    reason = (
        f"is {len(value)} characters, more than {limit}"
        if len(value) > limit
        else "may only hold lower-case letters, digits, '-'"
        + ("" if label else " and '.'")
        + ", starting and ending with a letter or digit"
    )
    return [
        doc.problem(
            path,
            rule="name-not-dns1123",
            message=f'{what} "{value}" is not a {form}: it {reason}',
            hint=f"write {suggest_dns1123(value, limit, label)}",
        )
    ]


def _qualified_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not DNS1123_SUBDOMAIN.fullmatch(prefix)):
        return f'prefix "{prefix}" is not a DNS-1123 subdomain'
    if not name:
        return "name part is empty"
    if len(name) > 63:
        return f"name part is {len(name)} characters, more than 63"
    if not _QUALIFIED_NAME.fullmatch(name):
        return "name part may only hold letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
    return None


def check_label_map(
    doc: Document,
    path: tuple[str | int, ...],
    labels: Any,
    *,
    values: bool = True,
    what: str = "label",
) -> list[Problem]:
    """Keys (and, with ``values``, values) of a label map: rule ``label-invalid``."""
    if not isinstance(labels, dict):
        return []
    out: list[Problem] = []
    for k, v in labels.items():
        reason = _qualified_key_problem(k)
        if reason:
            out.append(
                doc.problem(
                    (*path, k),
                    rule="label-invalid",
                    message=f'{what} key "{k}" is not valid: {reason}',
                    hint="write a key like example.com/name",
                    at_key=True,
                )
            )
        if values and isinstance(v, str) and (len(v) > 63 or not _LABEL_VALUE.fullmatch(v)):
            out.append(
                doc.problem(
                    (*path, k),
                    rule="label-invalid",
                    message=f'{what} value "{v}" is not valid: at most 63 letters, digits, '
                    "'-', '_' or '.', starting and ending with a letter or digit",
                    hint="shorten it or replace the other characters with '-'",
                )
            )
    return out


def check_metadata(doc: Document) -> list[Problem]:
    """Name, namespace, labels and annotation keys of any document; ``namespace-defaulted``."""
    out = check_dns1123(doc, ("metadata", "name"), doc.get(("metadata", "name")), "name")
    if doc.resource.namespaced:
        if doc.namespace_defaulted:
            out.append(
                doc.problem(
                    ("metadata",),
                    rule="namespace-defaulted",
                    severity=WARNING,
                    message=f'namespace is missing; {doc.kind} is namespaced, so it goes into "default"',
                    hint="add namespace: default, or the namespace you mean",
                    at_key=True,
                )
            )
        else:
            out += check_dns1123(
                doc,
                ("metadata", "namespace"),
                doc.get(("metadata", "namespace")),
                "namespace",
                label=True,
            )
    out += check_label_map(doc, ("metadata", "labels"), doc.get(("metadata", "labels")))
    out += check_label_map(
        doc,
        ("metadata", "annotations"),
        doc.get(("metadata", "annotations")),
        values=False,
        what="annotation",
    )
    if "status" in doc.obj:
        out.append(
            doc.problem(
                ("status",),
                rule="status-ignored",
                severity=WARNING,
                message="status is written by the cluster; the reconciler ignores it here",
                hint="remove status",
                at_key=True,
            )
        )
    return out


def check_duplicates(ctx: Context) -> list[Problem]:
    """Same kind/namespace/name defined twice: rule ``duplicate-object`` on each repeat."""
    first: dict[tuple[str, str | None, str], Document] = {}
    out: list[Problem] = []
    for d in ctx.documents:
        if d.name is None:
            continue
        key = (d.kind, d.namespace, d.name)
        if key not in first:
            first[key] = d
            continue
        f = first[key]
        line, col = f.mark(("metadata", "name"))
        out.append(
            d.problem(
                ("metadata", "name"),
                rule="duplicate-object",
                message=f"{d.ref()} is already defined at {f.path}:{line}:{col}",
                hint="rename one of them or delete the copy",
            )
        )
    return out


def selectors_overlap(a: Any, b: Any) -> bool:
    """Whether two equality node selectors (``{label: value}``) can select one node.

    Absent or empty selects every node. Two selectors are disjoint only when they require
    different values for the same label.
    """
    if not isinstance(a, dict) or not isinstance(b, dict):
        return True
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def duplicates(a: Document, b: Document) -> bool:
    """Whether two documents define the same object (kind/namespace/name): the pair gets one
    ``duplicate-object`` error, never cross-object problems against itself."""
    return a.name is not None and a.key() == b.key()


_IFNAME_BAD = re.compile(r"[/:\s]")


def ifname_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Linux network interface name, or None when it can.

    Linux ``dev_valid_name()`` (net/core/dev.c): not empty, shorter than IFNAMSIZ (16, so at
    most 15 characters), not "." or "..", no "/", ":" or whitespace; and no control character
    (a NUL would cut the name short).
    """
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return f'"{name}" names a directory in /sys/class/net and /proc/sys/net, never an interface'
    if len(name) > 15:
        return f"it has {len(name)} characters; Linux allows at most 15 (IFNAMSIZ 16 with the NUL)"
    if _IFNAME_BAD.search(name):
        return "Linux interface names may not hold '/', ':' or whitespace"
    if not name.isprintable():
        return "it holds a control character (a NUL ends the name for the kernel)"
    return None


_OPERATORS_WITH_VALUES = ("In", "NotIn")
_OPERATORS_WITHOUT_VALUES = ("Exists", "DoesNotExist")


def check_label_selector(
    doc: Document, path: tuple[str | int, ...], selector: Any
) -> list[Problem]:
    """A metav1.LabelSelector (k8s.io/apimachinery ValidateLabelSelector).

    ``matchLabels`` keys are qualified names and values label values (``label-invalid``);
    each ``matchExpressions`` entry has a qualified ``key``, operators In/NotIn need a non-empty
    ``values`` list, Exists/DoesNotExist must not have values (``label-selector-invalid``),
    and every value is a label value (``label-invalid``).
    """
    if not isinstance(selector, dict):
        return []
    out = check_label_map(doc, (*path, "matchLabels"), selector.get("matchLabels"))
    exprs = selector.get("matchExpressions")
    if not isinstance(exprs, list):
        return out
    for i, expr in enumerate(exprs):
        if not isinstance(expr, dict):
            continue
        base = (*path, "matchExpressions", i)
        key = expr.get("key")
        if isinstance(key, str) and key:
            reason = _qualified_key_problem(key)
            if reason:
                out.append(
                    doc.problem(
                        (*base, "key"),
                        rule="label-invalid",
                        message=f'label key "{key}" is not valid: {reason}',
                        hint="write a key like example.com/name",
                    )
                )
        op = expr.get("operator")
        values = expr.get("values")
        if op in _OPERATORS_WITH_VALUES and (values is None or values == []):
            out.append(
                doc.problem(
                    (*base, "values") if "values" in expr else (*base, "operator"),
                    rule="label-selector-invalid",
                    message=f"operator {op} needs at least one value (Kubernetes refuses to "
                    "evaluate a selector with an empty In or NotIn list)",
                    hint=f"add values: [<label value>], or use operator "
                    f"{'Exists' if op == 'In' else 'DoesNotExist'} to test only the key",
                )
            )
        elif op in _OPERATORS_WITHOUT_VALUES and isinstance(values, list) and values:
            out.append(
                doc.problem(
                    (*base, "values"),
                    rule="label-selector-invalid",
                    message=f"operator {op} tests only whether the key is present and must not "
                    "have values",
                    hint=f"remove values, or use operator {'In' if op == 'Exists' else 'NotIn'} "
                    "to match these values",
                    at_key=True,
                )
            )
        if isinstance(values, list):
            for j, v in enumerate(values):
                if isinstance(v, str) and (len(v) > 63 or not _LABEL_VALUE.fullmatch(v)):
                    out.append(
                        doc.problem(
                            (*base, "values", j),
                            rule="label-invalid",
                            message=f'label value "{v}" is not valid: at most 63 letters, digits, '
                            "'-', '_' or '.', starting and ending with a letter or digit",
                            hint="shorten it or replace the other characters with '-'",
                        )
                    )
    return out
