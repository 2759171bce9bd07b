"""Apply: carry out a :class:`reconciler.plan.Plan` against the cluster.

Creates and updates are server-side apply with field manager ``underlay`` and ``force`` (the
Git revision wins over hand edits: self-heal). Before the first write every object to be written
is sent once with ``dryRun=All`` so that an object the API server would reject stops the whole
pass with nothing written (all-or-nothing; reference/gitops.md); an object whose owner is
created in the same pass is dry-run with a placeholder owner uid, since the owner has none
yet. Objects are written in plan order (bridges, pools, Multus configs, NADs), so a pool exists
before the Multus config that uses it; when a pool fails, the Multus configs naming it (and
their NADs) are not written in that pass. Prunes delete with a uid precondition so an object
recreated under the same name by someone else is never deleted. ``guard`` is called before
every write (leader election: it raises when this replica is no longer the leader).
Source: Kubernetes API concepts, "Server-Side Apply" and "Dry-run".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client

from reconciler import ippool, vocab
from reconciler.kube import Key, Objects
from reconciler.plan import Action, Op, Plan, with_owner

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"
"""Owner uid used in the dry run for an owner that this pass creates (it has no uid yet)."""


@dataclass
class Outcome:
    """What one apply pass did.

    ``done``: actions carried out; ``failed``: (action, the API's message) for writes and
    deletes that failed; ``dry_run_failed``: the dry run's rejections (then nothing was
    written); ``skipped``: (action, why) for writes not attempted because something they
    depend on failed; ``uids``: the uid of every object written, by key; ``live``: the object
    as the API server answered the write.
    """

    done: list[Action] = field(default_factory=list)
    failed: list[tuple[Action, str]] = field(default_factory=list)
    dry_run_failed: list[tuple[Action, str]] = field(default_factory=list)
    skipped: list[tuple[Action, str]] = field(default_factory=list)
    uids: dict[Key, str] = field(default_factory=dict)
    live: dict[Key, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing failed, was rejected in the dry run, or was skipped."""
        return not self.failed and not self.dry_run_failed and not self.skipped

    def count(self, op: Op) -> int:
        """How many actions of ``op`` were carried out."""
        return sum(1 for a in self.done if a.op is op)


def api_message(exc: Exception) -> str:
    """The API server's own message from an ApiException body, else ``str(exc)``."""
    if isinstance(exc, client.ApiException):
        try:
            body = json.loads(exc.body or "{}")
            return f"{exc.status} {body.get('reason', '')}: {body.get('message', '')}".strip()
        except (ValueError, TypeError):
            return f"{exc.status} {exc.reason}"
    return str(exc)


def _body(a: Action, uids: dict[Key, str], placeholder: bool = False) -> dict[str, Any]:
    assert a.desired is not None
    body = a.desired.body
    owner = a.desired.owner
    if owner is not None and owner in uids:
        body = with_owner(body, {}, owner, uids[owner])
    elif owner is not None and placeholder:
        body = with_owner(body, {}, owner, PLACEHOLDER_UID)
    return body


def _pools_used(a: Action) -> set[str]:
    """Pool names a SpiderMultusConfig's sections name in ``ippools`` (ipv4 and ipv6)."""
    if a.desired is None or a.resource is not vocab.SPIDER_MULTUS_CONFIG:
        return set()
    spec = a.desired.body.get("spec") or {}
    out: set[str] = set()
    for sec in spec.values():
        if isinstance(sec, dict) and isinstance(sec.get("ippools"), dict):
            for names in sec["ippools"].values():
                out.update(str(n) for n in names or [])
    return out


def _sync_pool_counts(
    api: client.ApiClient, live: dict[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    """Keep ``status.totalIPCount``/``allocatedIPCount`` right after the pool's spec changed.

    Compare-and-swap on the resourceVersion read (the agents' IPAM writes the same status);
    on 409 re-read and retry. Allocation records are never touched here. Returns the pool as
    last seen.
    """
    objs = Objects(api, vocab.SPIDER_IPPOOL)
    for _ in range(10):
        status = dict(live.get("status") or {})
        records = ippool.allocated_ips(status)
        want = ippool.pool_status(live.get("spec") or {}, records)
        if all(status.get(k) == v for k, v in want.items()):
            return live
        body = {**live, "status": {**status, **want}}
        try:
            return objs.replace_status(body)
        except client.ApiException as exc:
            if exc.status != 409:
                log(
                    f"could not update status of SpiderIPPool {live['metadata']['name']}: {api_message(exc)}"
                )
                return live
        live = objs.get(live["metadata"]["name"])
    return live


def execute(
    api: client.ApiClient,
    plan: Plan,
    *,
    manager: str = vocab.FIELD_MANAGER,
    log: Callable[[str], None] = print,
    dry_run_first: bool = True,
    guard: Callable[[], None] | None = None,
) -> Outcome:
    """Apply every create/update and prune of ``plan``; skip blocked, drifted and unchanged ones.

    Returns an Outcome; never raises for API errors of single objects (they are recorded in
    ``failed`` and the pass goes on with the rest, except during the dry run, which stops the
    pass before any write). ``guard()`` runs before every write and may raise to abort the pass
    (its exception propagates). ``log`` receives one line per change.
    """
    out = Outcome()
    uids: dict[Key, str] = {}
    for a in plan.actions:
        if a.live is not None and (uid := a.live.get("metadata", {}).get("uid")):
            uids[a.key] = uid
    writes = [a for a in plan.actions if a.op in (Op.CREATE, Op.UPDATE)]
    if dry_run_first and writes:
        for a in writes:
            if guard is not None:
                guard()
            try:
                Objects(api, a.resource).apply(
                    _body(a, uids, placeholder=True), manager, dry_run=True
                )
            except client.ApiException as exc:
                out.dry_run_failed.append((a, api_message(exc)))
        if out.dry_run_failed:
            for a, msg in out.dry_run_failed:
                log(f"dry run rejected {a.ref()}: {msg}")
            log("nothing applied: the API server rejected the dry run")
            return out
    failed_pools: set[str] = set()
    not_written: set[Key] = set()
    for a in writes:
        why = ""
        if a.desired is not None and a.desired.owner in not_written:
            why = f"its owner {a.desired.owner[0]} {a.desired.owner[2]} was not applied"
        elif bad := sorted(_pools_used(a) & failed_pools):
            why = f"SpiderIPPool {', '.join(bad)} it uses failed to apply"
        if why:
            out.skipped.append((a, why))
            not_written.add(a.key)
            log(f"skipped {a.ref()}: {why}")
            continue
        if guard is not None:
            guard()
        try:
            live = Objects(api, a.resource).apply(_body(a, uids), manager)
        except client.ApiException as exc:
            out.failed.append((a, api_message(exc)))
            not_written.add(a.key)
            if a.resource is vocab.SPIDER_IPPOOL:
                failed_pools.add(a.name)
            log(f"failed to apply {a.ref()}: {api_message(exc)}")
            continue
        uids[a.key] = out.uids[a.key] = live["metadata"]["uid"]
        if a.resource is vocab.SPIDER_IPPOOL:
            live = _sync_pool_counts(api, live, log)
        out.live[a.key] = live
        out.done.append(a)
        if a.op is Op.CREATE:
            log(f"created {a.ref()}" + (" (it had been deleted in the cluster)" if a.drift else ""))
        else:
            fields = ", ".join(c.path for c in a.changes)
            log(
                f"updated {a.ref()} ({fields})"
                + (" reverting a change made in the cluster" if a.drift else "")
            )
    for a in plan.actions:
        if a.op is not Op.PRUNE:
            continue
        if guard is not None:
            guard()
        uid = (a.live or {}).get("metadata", {}).get("uid")
        opts = client.V1DeleteOptions(
            propagation_policy="Background",
            preconditions=client.V1Preconditions(uid=uid) if uid else None,
        )
        try:
            Objects(api, a.resource).delete(a.name, a.namespace, body=opts)
        except client.ApiException as exc:
            if exc.status == 404:
                log(f"pruned {a.ref()} (already gone)")
                out.done.append(a)
                continue
            out.failed.append((a, api_message(exc)))
            log(f"failed to prune {a.ref()}: {api_message(exc)}")
            continue
        out.done.append(a)
        log(f"pruned {a.ref()}")
    for a in plan.blocked:
        log(f"blocked {a.ref()}: {a.reason}")
    return out
