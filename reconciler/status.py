"""The GitSync status object: one per reconciler instance, in the reconciler's namespace.

``GitSync <instance>`` (``underlay.dev/v1alpha1``, namespaced) is where an instance reports what
it did, so ``kubectl get gitsync`` answers "is the network what Git says?" Shape of ``status``::

    observedGeneration: 3              # metadata.generation this status answers for
    lastAttemptedRevision: 9f1c...     # the newest revision a pass tried
    lastAppliedRevision: 2b7e...       # the newest revision fully applied (cluster matches it)
    lastHandledReconcileAt: "2025-..." # value of the reconcile-requested-at annotation handled
    source: {url: https://***@git.example/net.git, ref: main, path: clusters/a}
    conditions:                        # kstatus: Ready, Reconciling, Stalled (metav1.Condition)
    - {type: Ready, status: "True", reason: ReconciliationSucceeded, message: ..., ...}
    inventory: [{apiVersion, kind, namespace?, name, uid?, digest?}]  # see reconciler.inventory
    blocked: [{kind, namespace?, name, op, reason}]         # actions refused for safety
    drift: [{kind, namespace?, name, reverted, fields}]     # hand edits the last pass found
    lastError: {revision, reason, message, problems: [file:line:col: message, ...]}

A pass writes the status only when it differs from what is stored (lastTransitionTime of a
condition changes only when its status does), so a pass that changes nothing writes nothing.
Writes go to the status subresource with the read resourceVersion (compare-and-swap); on 409 the
object is re-read and the status written again.
Sources: Kubernetes API conventions ("Typical status properties", metav1.Condition); kstatus
(sigs.k8s.io/cli-utils/pkg/kstatus: Ready, Reconciling, Stalled); Flux GitRepository and
Kustomization status (lastAppliedRevision, lastAttemptedRevision, lastHandledReconcileAt).
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client

from reconciler import vocab
from reconciler.kube import Objects

ANNO_RECONCILE_REQUESTED = "underlay.dev/reconcile-requested-at"
"""Annotation on the GitSync that asks for a pass now (any new value; Flux's
``reconcile.fluxcd.io/requestedAt``). ``kubectl annotate gitsync underlay
underlay.dev/reconcile-requested-at="$(date -Is)" --overwrite``."""

READY, RECONCILING, STALLED = "Ready", "Reconciling", "Stalled"
CONDITION_TYPES = (READY, RECONCILING, STALLED)

MAX_MESSAGE = 32768
MAX_PROBLEMS = 10
MAX_LISTED = 100
"""At most this many entries in ``blocked`` and ``drift`` (the count is in the condition)."""


def now_rfc3339() -> str:
    """The current UTC time as Kubernetes writes metav1.Time (seconds, ``Z``)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]],
    ctype: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """Return ``conditions`` with ``ctype`` set; lastTransitionTime moves only on a status change.

    metav1.Condition shape: type, status ("True"/"False"), observedGeneration, lastTransitionTime,
    reason (CamelCase), message.
    """
    value = "True" if status else "False"
    out = [dict(c) for c in conditions if c.get("type") != ctype]
    old = next((c for c in conditions if c.get("type") == ctype), None)
    ltt = old.get("lastTransitionTime") if old and old.get("status") == value else None
    cond: dict[str, Any] = {
        "type": ctype,
        "status": value,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "lastTransitionTime": ltt or now or now_rfc3339(),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    out.append(cond)
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    out.sort(key=lambda c: (order.get(c.get("type", ""), 99), c.get("type", "")))
    return out


def condition(status: Mapping[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    """The condition ``ctype`` of a status, or None."""
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return dict(c)
    return None


class GitSyncs:
    """Reads, creates and writes the status of ``GitSync <name>`` in ``namespace``.

    Errors: the client's ApiException (404 when the GitSync CRD is not installed is turned
    into :class:`reconciler.kube.MissingCRD` by :meth:`ensure`).
    """

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        name: str,
        instance: str,
        guard: Callable[[], None] | None = None,
    ) -> None:
        self.api = api
        self.objs = Objects(api, vocab.GIT_SYNC)
        self.namespace, self.name, self.instance = namespace, name, instance
        self.guard = guard
        self.obj: dict[str, Any] | None = None

    def get(self) -> dict[str, Any] | None:
        """GET the GitSync (None when absent); remembers it."""
        try:
            self.obj = self.objs.get(self.name, self.namespace)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            self.obj = None
        return self.obj

    def ensure(self) -> dict[str, Any]:
        """GET the GitSync, creating it (empty spec) when absent; returns it.

        Raises MissingCRD when the API server does not serve GitSync, ApiException otherwise.
        """
        from reconciler.kube import MissingCRD

        if self._unchanged():
            assert self.obj is not None
            return self.obj
        try:
            self.obj = self.objs.get(self.name, self.namespace)
            return self.obj
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            if _not_served(exc):
                raise MissingCRD(vocab.GIT_SYNC) from exc
        if self.guard is not None:
            self.guard()
        body = {
            "apiVersion": vocab.GIT_SYNC.api_version,
            "kind": vocab.GIT_SYNC.kind,
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {
                    vocab.LABEL_MANAGED_BY: vocab.MANAGED_BY_VALUE,
                    vocab.LABEL_INSTANCE: self.instance,
                },
            },
            "spec": {},
        }
        try:
            self.obj = self.objs.create(body)
        except client.ApiException as exc:
            if exc.status == 404 and _not_served(exc):
                raise MissingCRD(vocab.GIT_SYNC) from exc
            if exc.status == 404:
                raise NamespaceMissing(
                    f"cannot create GitSync {self.namespace}/{self.name}: namespace "
                    f"{self.namespace} does not exist (create it, or pass --namespace)"
                ) from None
            if exc.status != 409:  # 409: created meanwhile (another replica, a retried POST)
                raise
            self.obj = self.objs.get(self.name, self.namespace)
        return self.obj

    def _unchanged(self) -> bool:
        """True when the GitSync read or written last is still the stored one: its metadata
        alone, from the API server's watch cache (``resourceVersion=0``), carries the same
        resourceVersion.

        The status holds the inventory, one entry per object applied: with thousands of
        objects the GitSync is a megabyte, and reading it whole on every pass cost more than
        the rest of a pass that changes nothing (a quorum read of 6,500 entries: 240 ms on a
        busy control plane, its metadata alone 120 ms, from the watch cache 1 ms). Any change
        to the object, by anyone, changes its resourceVersion. The watch cache may lag the
        latest write by moments: an older version there means a full read; a change it has
        not seen yet is seen by the next pass (the GitSync watch, which requests a pass for
        an annotation or a spec change, reads the same cache), and a status write against a
        version that moved on is refused (409) and read again.
        """
        from reconciler.kube import METADATA_ONLY, request

        rv = ((self.obj or {}).get("metadata") or {}).get("resourceVersion")
        if not rv:
            return False
        r = vocab.GIT_SYNC
        path = f"/apis/{r.group}/{r.version}/namespaces/{self.namespace}/{r.plural}/{self.name}"
        try:
            meta = request(
                self.api, "GET", path, query={"resourceVersion": "0"}, accept=METADATA_ONLY
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return False  # gone (or its CRD): the full read says which
            raise
        return bool((meta.get("metadata") or {}).get("resourceVersion") == rv)

    @property
    def status(self) -> dict[str, Any]:
        """A copy of the stored ``status`` (empty when none)."""
        return dict((self.obj or {}).get("status") or {})

    @property
    def generation(self) -> int | None:
        """``metadata.generation`` of the GitSync read last."""
        g = ((self.obj or {}).get("metadata") or {}).get("generation")
        return int(g) if g is not None else None

    @property
    def requested_at(self) -> str | None:
        """The reconcile-requested-at annotation's value, if set."""
        ann = ((self.obj or {}).get("metadata") or {}).get("annotations") or {}
        v = ann.get(ANNO_RECONCILE_REQUESTED)
        return str(v) if v else None

    @property
    def suspended(self) -> bool:
        """True when ``spec.suspend`` is set: no pass runs."""
        return bool(((self.obj or {}).get("spec") or {}).get("suspend"))

    def write(self, status: dict[str, Any]) -> bool:
        """Store ``status`` unless it equals the stored one; returns True when it wrote.

        CAS on the resourceVersion read; on 409 re-read and try again (up to 5 times).
        """
        for _ in range(5):
            if self.obj is None:
                self.ensure()
            assert self.obj is not None
            if (self.obj.get("status") or {}) == status:
                return False
            if self.guard is not None:
                self.guard()
            body = copy.deepcopy(self.obj)
            body["status"] = status
            try:
                self.obj = self.objs.replace_status(body)
                return True
            except client.ApiException as exc:
                if exc.status == 500 and "request is too large" in str(exc.body or ""):
                    raise StatusTooLarge(self.namespace, self.name, status) from None
                if exc.status != 409:
                    raise
                self.get()
        raise RuntimeError(
            f"could not write the status of GitSync {self.namespace}/{self.name}: "
            "it kept changing (409 Conflict five times)"
        )


class NamespaceMissing(RuntimeError):
    """The namespace the GitSync belongs in does not exist."""


class StatusTooLarge(RuntimeError):
    """The GitSync status is larger than the API server stores (its inventory lists every
    object applied, about 180 bytes each; etcd keeps objects up to 1.5 MiB by default)."""

    def __init__(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        import json

        size = len(json.dumps(status, separators=(",", ":")))
        entries = len(status.get("inventory") or [])
        super().__init__(
            f"cannot write the status of GitSync {namespace}/{name}: the API server refuses "
            f"an object this large ({size / 1048576:.1f} MiB, {entries} inventory entries; "
            "etcd stores up to 1.5 MiB by default): split the repository over several "
            "instances (--instance, one path each), about 8,000 objects at most per instance"
        )


def _not_served(exc: client.ApiException) -> bool:
    """True when a 404 means "no such resource type" rather than "no such object"."""
    import json

    try:
        details = json.loads(exc.body or "{}").get("details") or {}
    except (ValueError, TypeError):
        return False
    # the API server names the object in details.name for a missing object; a missing
    # resource type answers a bare 404 "the server could not find the requested resource"
    return not details.get("name")
