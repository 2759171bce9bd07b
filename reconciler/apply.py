"""Apply: carry out a :class:`reconciler.plan.Plan` against the cluster.

Creates and updates are server-side apply with field manager ``underlay`` and ``force`` (the
Git revision wins over hand edits: self-heal). Before the first write every object is sent once
with ``dryRun=All`` so that an object the API server would reject stops the whole pass with
nothing written (all-or-nothing; reference/gitops.md). Prunes delete with a uid precondition so
an object recreated under the same name by someone else is never deleted.
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


@dataclass
class Outcome:
    """What one apply pass did: actions done, actions that failed (with the API's message)."""

    done: list[Action] = field(default_factory=list)
    failed: list[tuple[Action, str]] = field(default_factory=list)
    dry_run_failed: list[tuple[Action, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.dry_run_failed


def api_message(exc: Exception) -> str:
    """The API server's own message from an ApiException body, else ``str(exc)``."""
    if isinstance(exc, client.ApiException):
        try:
            body = json.loads(exc.body or "{}")
            return f"{exc.status} {body.get('reason', '')}: {body.get('message', '')}".strip()
        except (ValueError, TypeError):
            return f"{exc.status} {exc.reason}"
    return str(exc)


def _body(a: Action, uids: dict[Key, str]) -> dict[str, Any]:
    assert a.desired is not None
    body = a.desired.body
    owner = a.desired.owner
    if owner is not None and owner in uids:
        body = with_owner(body, {}, owner, uids[owner])
    return body


def _sync_pool_counts(
    api: client.ApiClient, live: dict[str, Any], log: Callable[[str], None]
) -> None:
    """Keep ``status.totalIPCount``/``allocatedIPCount`` right after the pool's spec changed.

    Compare-and-swap on the resourceVersion read (the agents' IPAM writes the same status);
    on 409 re-read and retry. Allocation records are never touched here.
    """
    objs = Objects(api, vocab.SPIDER_IPPOOL)
    for _ in range(10):
        status = dict(live.get("status") or {})
        records = ippool.allocated_ips(status)
        want = ippool.pool_status(live.get("spec") or {}, records)
        if all(status.get(k) == v for k, v in want.items()):
            return
        body = {**live, "status": {**status, **want}}
        try:
            objs.replace_status(body)
            return
        except client.ApiException as exc:
            if exc.status != 409:
                log(
                    f"could not update status of SpiderIPPool {live['metadata']['name']}: {api_message(exc)}"
                )
                return
        live = objs.get(live["metadata"]["name"])


def execute(
    api: client.ApiClient,
    plan: Plan,
    *,
    manager: str = vocab.FIELD_MANAGER,
    log: Callable[[str], None] = print,
    dry_run_first: bool = True,
) -> Outcome:
    """Apply every create/update and prune of ``plan``; skip blocked and unchanged actions.

    Returns an Outcome; never raises for API errors of single objects (they are recorded in
    ``failed`` and the pass goes on with the rest, except during the dry run, which stops the
    pass before any write). ``log`` receives one line per change.
    """
    out = Outcome()
    uids: dict[Key, str] = {}
    for a in plan.actions:
        if a.live is not None and (uid := a.live.get("metadata", {}).get("uid")):
            uids[a.key] = uid
    writes = [a for a in plan.actions if a.op in (Op.CREATE, Op.UPDATE)]
    if dry_run_first:
        for a in writes:
            if a.desired and a.desired.owner and a.desired.owner not in uids:
                continue  # its owner is created in this pass; the real apply validates it
            try:
                Objects(api, a.resource).apply(_body(a, uids), manager, dry_run=True)
            except client.ApiException as exc:
                out.dry_run_failed.append((a, api_message(exc)))
        if out.dry_run_failed:
            for a, msg in out.dry_run_failed:
                log(f"dry run rejected {a.ref()}: {msg}")
            log("nothing applied: the API server rejected the dry run")
            return out
    for a in writes:
        try:
            live = Objects(api, a.resource).apply(_body(a, uids), manager)
        except client.ApiException as exc:
            out.failed.append((a, api_message(exc)))
            log(f"failed to apply {a.ref()}: {api_message(exc)}")
            continue
        uids[a.key] = live["metadata"]["uid"]
        if a.resource is vocab.SPIDER_IPPOOL:
            _sync_pool_counts(api, live, log)
        out.done.append(a)
        if a.op is Op.CREATE:
            log(f"created {a.ref()}")
        else:
            log(f"updated {a.ref()} ({', '.join(c.path for c in a.changes)})")
    for a in plan.actions:
        if a.op is not Op.PRUNE:
            continue
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
