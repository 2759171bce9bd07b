"""Apply: carry out a :class:`reconciler.plan.Plan` against the cluster.

Creates and updates are server-side apply with field manager ``underlay`` and ``force`` (the
Git revision wins over hand edits: self-heal). Before the first write every object to be written
is sent once with ``dryRun=All`` so that an object the API server would reject stops the whole
pass with nothing written (all-or-nothing; reference/gitops.md); an object whose owner is
created in the same pass is dry-run with a placeholder owner uid, since the owner has none
yet. A plan with a collision (a desired object that exists without this instance's labels) is
refused as a whole before the dry run: nothing is written. Objects are written in plan order
(bridges, pools, Multus configs, NADs), so a pool exists before the Multus config that uses
it; when a pool fails or is blocked, the Multus configs naming it (and their NADs) are not
written in that pass.

The plan judged objects as it saw them; apply makes every safety decision hold at the moment
of the write (check-then-act): a SpiderIPPool update is sent with the ``resourceVersion`` the
plan judged (server-side apply honours it: 409 Conflict when the object changed since), and
every prune deletes with ``uid`` and ``resourceVersion`` preconditions. On 409 the object is
read again and judged again (still ours? allocations now in the way?): blocked with the
reason, or written with the new resourceVersion. A spec field set by hand that Git leaves
unset (``Change.foreign``) is removed with a JSON merge patch carrying the resourceVersion
(server-side apply cannot remove a field another manager owns), then the object is applied.
``guard`` is called before every write (leader election: it raises when this replica is no
longer the leader).
Sources: Kubernetes API concepts, "Server-Side Apply", "Dry-run" and "Concurrency control and
consistency" (resourceVersion, DeleteOptions preconditions).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client

from reconciler import ippool, vocab
from reconciler.kube import Key, Objects
from reconciler.plan import (
    Action,
    Change,
    Op,
    Plan,
    collision_reason,
    foreign_changes,
    owned_by,
    pool_prune_block,
    pool_records,
    pool_update_block,
    pools_used,
    with_owner,
)

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"
"""Owner uid used in the dry run for an owner that this pass creates (it has no uid yet)."""


@dataclass
class Outcome:
    """What one apply pass did.

    ``done``: actions carried out; ``failed``: (action, the API's message) for writes and
    deletes that failed; ``dry_run_failed``: the dry run's rejections (then nothing was
    written); ``skipped``: (action, why) for writes not attempted because something they
    depend on failed or was blocked; ``blocked``: (action, why) for actions the plan allowed
    but that were found unsafe at the moment of the write (the object changed since: 409, read
    again, judged again); ``refused``: the plan's collisions (then nothing was written);
    ``uids``: the uid of every object written, by key; ``live``: the object as the API server
    answered the write.
    """

    done: list[Action] = field(default_factory=list)
    failed: list[tuple[Action, str]] = field(default_factory=list)
    dry_run_failed: list[tuple[Action, str]] = field(default_factory=list)
    skipped: list[tuple[Action, str]] = field(default_factory=list)
    blocked: list[tuple[Action, str]] = field(default_factory=list)
    refused: list[Action] = field(default_factory=list)
    uids: dict[Key, str] = field(default_factory=dict)
    live: dict[Key, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing failed, was rejected, refused, blocked or skipped."""
        return not (
            self.failed or self.dry_run_failed or self.skipped or self.blocked or self.refused
        )

    def count(self, op: Op) -> int:
        """How many actions of ``op`` were carried out."""
        return sum(1 for a in self.done if a.op is op)


def api_message(exc: Exception) -> str:
    """The API server's own message from an ApiException body, else ``str(exc)``."""
    if isinstance(exc, client.ApiException):
        try:
            body = json.loads(exc.body or "{}")
            return f"{exc.status} {body.get('reason', '')}: {body.get('message', '')}".strip()
        except (ValueError, TypeError, AttributeError):
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


def _with_rv(body: dict[str, Any], rv: str) -> dict[str, Any]:
    """``body`` with ``metadata.resourceVersion`` set (a shallow copy; ``body`` is untouched)."""
    return {**body, "metadata": {**body["metadata"], "resourceVersion": rv}}


def removal_patch(changes: list[Change], rv: str | None) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that removes every ``foreign`` change's field: nested
    ``null`` values, plus ``metadata.resourceVersion`` ``rv`` as a precondition when given."""
    patch: dict[str, Any] = {}
    for c in changes:
        node = patch
        *parents, last = c.parts
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = None
    if rv:
        patch.setdefault("metadata", {})["resourceVersion"] = rv
    return patch


def _rv(obj: dict[str, Any] | None) -> str | None:
    v = ((obj or {}).get("metadata") or {}).get("resourceVersion")
    return str(v) if v else None


def _sync_pool_counts(
    api: client.ApiClient, live: dict[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    """Keep ``status.totalIPCount``/``allocatedIPCount`` right after the pool's spec changed.

    Compare-and-swap on the resourceVersion read (the agents' IPAM writes the same status);
    on 409 re-read and retry. ``status.allocatedIPs`` is never rewritten, and
    ``allocatedIPCount`` is left alone when the records cannot be read in full. Never raises:
    a failure is logged naming the pool. Returns the pool as last seen.
    """
    objs = Objects(api, vocab.SPIDER_IPPOOL)
    name = str(live.get("metadata", {}).get("name"))
    try:
        for _ in range(10):
            status = dict(live.get("status") or {})
            want: dict[str, Any] = {
                "totalIPCount": ippool.pool_status(live.get("spec") or {}, {})["totalIPCount"]
            }
            records, problem = pool_records(live)
            if not problem:
                want["allocatedIPCount"] = len(records)
            if all(status.get(k) == v for k, v in want.items()):
                return live
            body = {**live, "status": {**status, **want}}
            try:
                return objs.replace_status(body)
            except client.ApiException as exc:
                if exc.status != 409:
                    log(f"could not update status of SpiderIPPool {name}: {api_message(exc)}")
                    return live
            live = objs.get(name)
    except Exception as exc:  # never let one pool's status stop the pass
        log(f"could not update status of SpiderIPPool {name}: {api_message(exc)}")
    return live


def execute(
    api: client.ApiClient,
    plan: Plan,
    *,
    manager: str = vocab.FIELD_MANAGER,
    log: Callable[[str], None] = print,
    dry_run_first: bool = True,
    guard: Callable[[], None] | None = None,
    attempts: int = 5,
) -> Outcome:
    """Apply every create/update and prune of ``plan``; skip blocked, drifted and unchanged ones.

    Returns an Outcome; never raises for API errors of single objects (they are recorded in
    ``failed`` and the pass goes on with the rest, except during the dry run, which stops the
    pass before any write). A plan with collisions is refused whole (``Outcome.refused``,
    nothing written). ``attempts``: how often one object is judged again and rewritten after a
    409 Conflict before it counts as failed. ``guard()`` runs before every write and may raise
    to abort the pass (its exception propagates). ``log`` receives one line per change.
    """
    out = Outcome()
    if plan.collisions:
        out.refused = list(plan.collisions)
        for a in out.refused:
            log(f"collision {a.ref()}: {a.reason}")
        log(
            f"nothing applied: {len(out.refused)} object(s) of this revision exist in the "
            "cluster without this instance's labels"
        )
        return out
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
                objs = Objects(api, a.resource)
                foreign = [c for c in a.changes if c.foreign]
                if foreign and a.live is not None:
                    objs.merge_patch(
                        a.name, a.namespace, removal_patch(foreign, None),
                        field_manager=manager, dry_run=True,
                    )  # fmt: skip
                objs.apply(_body(a, uids, placeholder=True), manager, dry_run=True)
            except client.ApiException as exc:
                out.dry_run_failed.append((a, api_message(exc)))
        if out.dry_run_failed:
            for a, msg in out.dry_run_failed:
                log(f"dry run rejected {a.ref()}: {msg}")
            log("nothing applied: the API server rejected the dry run")
            return out
    # pools that are not what Git says after this pass: their users are not written
    unavailable: dict[str, str] = {
        a.name: f"blocked: {a.reason}"
        for a in plan.blocked
        if a.resource is vocab.SPIDER_IPPOOL and a.desired is not None
    }
    not_written: set[Key] = {a.key for a in plan.blocked}
    for a in writes:
        why = ""
        if a.desired is not None and a.desired.owner in not_written:
            why = f"its owner {a.desired.owner[0]} {a.desired.owner[2]} was not applied"
        elif a.resource is vocab.SPIDER_MULTUS_CONFIG and a.desired is not None:
            bad = sorted(pools_used(a.desired.body) & set(unavailable))
            if bad:
                why = f"SpiderIPPool {bad[0]} it uses was not applied ({unavailable[bad[0]]})"
        if why:
            out.skipped.append((a, why))
            not_written.add(a.key)
            log(f"skipped {a.ref()}: {why}")
            continue
        live, error, blocked = _write(api, a, uids, manager, plan.instance, attempts, guard)
        if live is None:
            not_written.add(a.key)
            if blocked:
                out.blocked.append((a, blocked))
                log(f"blocked {a.ref()}: {blocked}")
            else:
                out.failed.append((a, error))
                log(f"failed to apply {a.ref()}: {error}")
            if a.resource is vocab.SPIDER_IPPOOL:
                unavailable[a.name] = f"blocked: {blocked}" if blocked else f"failed: {error}"
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
        gone, error, blocked = _delete(api, a, plan.instance, attempts, guard)
        if blocked:
            out.blocked.append((a, blocked))
            log(f"blocked {a.ref()}: {blocked}")
        elif error:
            out.failed.append((a, error))
            log(f"failed to prune {a.ref()}: {error}")
        else:
            out.done.append(a)
            log(f"pruned {a.ref()}" + (" (already gone)" if gone else ""))
    for a in plan.blocked:
        log(f"blocked {a.ref()}: {a.reason}")
    return out


def _write(
    api: client.ApiClient,
    a: Action,
    uids: dict[Key, str],
    manager: str,
    instance: str,
    attempts: int,
    guard: Callable[[], None] | None,
) -> tuple[dict[str, Any] | None, str, str]:
    """Create or update one object; returns (live object, "", "") when written, else
    (None, error, "") or (None, "", why it is blocked now)."""
    objs = Objects(api, a.resource)
    body = _body(a, uids)
    current = a.live
    foreign = [c for c in a.changes if c.foreign]
    # a pool update must hold for the pool as the plan judged it (allocations): CAS on its RV
    cas = a.resource is vocab.SPIDER_IPPOOL and a.op is Op.UPDATE
    for attempt in range(attempts):
        if guard is not None and attempt:
            guard()
        rv = _rv(current)
        try:
            if foreign and current is not None:
                current = objs.merge_patch(
                    a.name, a.namespace, removal_patch(foreign, rv), field_manager=manager
                )
                rv = _rv(current)
            return objs.apply(_with_rv(body, rv) if cas and rv else body, manager), "", ""
        except client.ApiException as exc:
            if exc.status != 409 or current is None:
                return None, api_message(exc), ""
        # 409 Conflict: written by someone else since it was judged; judge it again
        try:
            fresh = objs.get(a.name, a.namespace)
        except client.ApiException as exc:
            if exc.status == 404:
                return None, "deleted while being applied; the next pass creates it again", ""
            return None, api_message(exc), ""
        if not owned_by(fresh, instance):
            return None, "", collision_reason(a.resource, fresh, instance)
        if cas and (why := pool_update_block(body, fresh)):
            return None, "", why
        foreign = foreign_changes(body, fresh, a.resource) if foreign else []
        current = fresh
    return None, f"changed by someone else on each of {attempts} tries (409 Conflict)", ""


def _delete(
    api: client.ApiClient,
    a: Action,
    instance: str,
    attempts: int,
    guard: Callable[[], None] | None,
) -> tuple[bool, str, str]:
    """Prune one object with uid and resourceVersion preconditions; returns (already gone,
    error, why it is blocked now); ("", "") on success."""
    objs = Objects(api, a.resource)
    current = a.live or {}
    planned_uid = (current.get("metadata") or {}).get("uid")
    for attempt in range(attempts):
        if guard is not None and attempt:
            guard()
        md = current.get("metadata") or {}
        pre = client.V1Preconditions(uid=md.get("uid"), resource_version=md.get("resourceVersion"))
        opts = client.V1DeleteOptions(propagation_policy="Background", preconditions=pre)
        try:
            objs.delete(a.name, a.namespace, body=opts)
            return False, "", ""
        except client.ApiException as exc:
            if exc.status == 404:
                return True, "", ""
            if exc.status != 409:
                return False, api_message(exc), ""
        # 409 Conflict: changed since the plan judged it; judge it again
        try:
            fresh = objs.get(a.name, a.namespace)
        except client.ApiException as exc:
            if exc.status == 404:
                return True, "", ""
            return False, api_message(exc), ""
        fresh_uid = (fresh.get("metadata") or {}).get("uid")
        if planned_uid and fresh_uid != planned_uid:
            return False, "", f"recreated while being pruned (uid {planned_uid}, now {fresh_uid})"
        if not owned_by(fresh, instance):
            return False, "", "no longer carries this instance's labels: not pruned"
        if a.resource is vocab.SPIDER_IPPOOL and (why := pool_prune_block(fresh)):
            return False, "", why
        current = fresh
    return False, f"changed by someone else on each of {attempts} tries (409 Conflict)", ""
