"""Inventory: the objects one reconciler instance applied, kept in its GitSync status.

Prune deletes an object only when it carries this instance's ownership labels AND is in the
inventory (with the same uid when one was recorded), so an object someone copied our labels
onto is never deleted (reference/gitops.md: Flux's inventory, Argo CD's tracking). Each entry
also records a digest of the body applied from Git: when the cluster differs from Git while
the digest still matches, Git did not change the object, someone else did: drift.

Entry shape (``status.inventory[]`` of the GitSync)::

    {"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
     "name": "ippool-test", "uid": "...", "digest": "3f2a9c0d17e4b5a6"}
    # plus "namespace" for namespaced kinds; "digest" absent when unknown

Pure data; no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reconciler import vocab
from reconciler.vocab import Resource

Key = tuple[str, str | None, str]


def digest(body: Mapping[str, Any]) -> str:
    """A short stable digest (16 hex digits of SHA-256) of a desired object's JSON form."""
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def desired_digest(d: Any) -> str:
    """:func:`digest` of a :class:`reconciler.render.Desired`'s body, computed once per object
    (kept in ``d.extra``; a Desired is never changed after render)."""
    cached = d.extra.get("digest")
    if cached is None:
        cached = d.extra["digest"] = digest(d.body)
    return str(cached)


@dataclass(frozen=True)
class Entry:
    """One inventory entry: the object's identity, its uid when known, the applied digest."""

    resource: Resource
    namespace: str | None
    name: str
    uid: str | None = None
    digest: str | None = None

    @property
    def key(self) -> Key:
        """(kind, namespace or None, name)."""
        return (self.resource.kind, self.namespace, self.name)

    def to_dict(self) -> dict[str, Any]:
        """The status form (see the module docstring)."""
        d: dict[str, Any] = {"apiVersion": self.resource.api_version, "kind": self.resource.kind}
        if self.namespace:
            d["namespace"] = self.namespace
        d["name"] = self.name
        if self.uid:
            d["uid"] = self.uid
        if self.digest:
            d["digest"] = self.digest
        return d

    def ref(self) -> str:
        """``Kind namespace/name`` or ``Kind name``."""
        ns = self.namespace
        return f"{self.resource.kind} {ns + '/' if ns else ''}{self.name}"


class Inventory:
    """A set of :class:`Entry` keyed by (kind, namespace, name), in a stable order."""

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self.entries: dict[Key, Entry] = {e.key: e for e in entries}

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Any:
        return iter(self.entries.values())

    def get(self, key: Key) -> Entry | None:
        """The entry of ``key``, or None."""
        return self.entries.get(key)

    def kinds(self) -> set[str]:
        """Kinds that have at least one entry."""
        return {k[0] for k in self.entries}

    def to_list(self) -> list[dict[str, Any]]:
        """Entries as status dicts, sorted by apiVersion, kind, namespace, name."""
        order = sorted(
            self.entries.values(),
            key=lambda e: (e.resource.api_version, e.resource.kind, e.namespace or "", e.name),
        )
        return [e.to_dict() for e in order]

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> Inventory:
        """Read ``status.inventory`` of a GitSync; entries of unknown kinds are skipped."""
        out = []
        for item in (status or {}).get("inventory") or []:
            if not isinstance(item, Mapping):
                continue
            res = vocab.BY_KEY.get((str(item.get("apiVersion")), str(item.get("kind"))))
            if res is None or not item.get("name"):
                continue
            ns = item.get("namespace") if res.namespaced else None
            out.append(
                Entry(res, ns, str(item["name"]), item.get("uid") or None, item.get("digest"))
            )
        return cls(out)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Inventory) and self.entries == other.entries

    def __repr__(self) -> str:
        return f"Inventory({len(self.entries)} entries)"
