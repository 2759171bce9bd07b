"""The reconciler pipeline and its loop.

One pass: source -> load -> validate -> render -> observe -> plan -> apply -> report. Each
stage is a module with plain data in and out (DESIGN.md); this module strings them together
and owns the decisions between them:

- a revision with any validation error applies nothing; the cluster keeps the last good
  revision, which is still enforced (drift is reverted against it);
- load/validate/render run only when the source moved (Git head, or the files of a local
  directory); observe and plan run on every pass, so drift is found every interval;
- the status object (GitSync, :mod:`reconciler.status`), Events and metrics are updated only
  when something changed, so a pass that changes nothing writes nothing at all;
- passes run every ``interval`` (+/- jitter), at once when the GitSync's
  ``underlay.dev/reconcile-requested-at`` annotation changes or (``--watch``) a local file
  changes, and after a failure with exponential backoff;
- with leader election only the Lease holder runs passes; every write is guarded.

:func:`run_pass` is the stateless pass ``underlay plan`` uses; :class:`Reconciler` is the
stateful one ``underlay apply`` and ``underlay reconcile`` use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubernetes import client, watch

from reconciler import ippool, kube, render, vocab
from reconciler.apply import Outcome, api_message, execute
from reconciler.cache import ObjectCache
from reconciler.events import NORMAL, WARNING, EventRecorder
from reconciler.inventory import Entry, Inventory, desired_digest
from reconciler.leader import LeaderElector, LeadershipLost
from reconciler.metrics import ReconcilerMetrics
from reconciler.plan import Action, Op, Plan, make_plan, owned_by
from reconciler.source import Checkout, fetch
from reconciler.status import (
    ANNO_RECONCILE_REQUESTED,
    MAX_LISTED,
    MAX_PROBLEMS,
    READY,
    RECONCILING,
    STALLED,
    GitSyncs,
    condition,
    set_condition,
)

log = logging.getLogger("underlay.reconcile")

OBSERVED = (*vocab.USER_KINDS, vocab.NETWORK_ATTACHMENT_DEFINITION)


# --- the stateless pass (underlay plan) ------------------------------------------------------


@dataclass
class PassResult:
    """Everything one pass produced; ``outcome`` is None when nothing was applied."""

    revision: str
    documents: list[Any] = field(default_factory=list)
    problems: list[Any] = field(default_factory=list)
    desired: list[render.Desired] = field(default_factory=list)
    plan: Plan | None = None
    outcome: Outcome | None = None

    @property
    def errors(self) -> list[Any]:
        """The problems of severity ``error``."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def converged(self) -> bool:
        """True when the cluster now matches the revision (nothing failed, nothing blocked)."""
        if self.errors or self.plan is None:
            return False
        if self.plan.blocked:
            return False
        return self.outcome is None or self.outcome.ok


def load_and_validate(
    root: Path,
    paths: list[Path] | None,
    *,
    strict: bool,
    ignore_unknown_kinds: bool = False,
    cache: dict[str, dict[Any, Any]] | None = None,
) -> tuple[list[Any], list[Any]]:
    """Load every YAML document under ``paths`` (default: ``root``) and validate them.

    Returns (documents, problems); problems include warnings. Under ``strict`` warnings
    count as errors (their severity is raised). ``cache`` (kept between passes): per-file
    and per-document results of unchanged files are reused (see
    :func:`reconciler.validation.validate_repo`); the rules across documents always run.
    """
    from reconciler.validation import validate_repo

    return validate_repo(
        root, paths, strict=strict, ignore_unknown_kinds=ignore_unknown_kinds, cache=cache
    )


def read_inventory(api: client.ApiClient, namespace: str, name: str) -> Inventory:
    """The inventory in GitSync ``namespace/name``'s status; empty when it (or its CRD) is absent."""
    try:
        obj = kube.Objects(api, vocab.GIT_SYNC).get(name, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return Inventory()
        raise
    return Inventory.from_status(obj.get("status"))


def run_pass(
    root: Path,
    paths: list[Path] | None,
    api: client.ApiClient | None,
    *,
    revision: str = "local",
    instance: str = vocab.DEFAULT_INSTANCE,
    strict: bool = False,
    prune: bool = True,
    apply: bool = True,
    ignore_unknown_kinds: bool = False,
    out: Callable[[str], None] = print,
    inventory: Inventory | None = None,
    allow_empty: bool = False,
    self_heal: bool = True,
) -> PassResult:
    """Run one pass over the checkout at ``root`` without recording status (``underlay plan``).

    With ``api`` None the plan is made against an empty cluster and nothing is applied.
    ``inventory`` decides what may be pruned (None: nothing). Returns a PassResult; raises
    kube.MissingCRD or the client's ApiException/urllib3 errors when the cluster cannot be
    observed.
    """
    res = PassResult(revision)
    res.documents, res.problems = load_and_validate(
        root, paths, strict=strict, ignore_unknown_kinds=ignore_unknown_kinds
    )
    if res.errors:
        return res
    res.desired = render.render(res.documents, instance)
    observed = kube.observe(api, OBSERVED) if api is not None else {}
    res.plan = make_plan(
        res.desired, observed, instance=instance, prune=prune, against_empty=api is None,
        inventory=inventory, allow_empty=allow_empty, self_heal=self_heal,
    )  # fmt: skip
    if apply and api is not None and res.plan.has_changes:
        res.outcome = execute(api, res.plan, log=out)
    return res


def fetch_source(repo: str, ref: str, cache_dir: Path | None = None) -> Checkout:
    """Fetch ``ref`` of ``repo`` (see :func:`reconciler.source.fetch`)."""
    return fetch(repo, ref, cache_dir=cache_dir)


def jittered(interval: float, jitter: float = 0.1) -> float:
    """``interval`` seconds +/- ``jitter`` (fraction), so replicas do not poll in lockstep."""
    return max(0.0, interval * (1 + random.uniform(-jitter, jitter)))


def backoff(failures: int, base: float, cap: float) -> float:
    """Seconds before the next try after ``failures`` consecutive failed passes (>= 1):
    ``base * 2**(failures-1)``, capped at ``cap``, with 10 % jitter."""
    return jittered(min(cap, base * 2 ** max(0, failures - 1)))


def sleep_until(deadline: float, wake: Callable[[], bool] | None = None, step: float = 0.2) -> None:
    """Sleep until ``deadline`` (monotonic seconds) or until ``wake()`` returns True."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (wake is not None and wake()):
            return
        time.sleep(min(step, left))


# --- sources -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One revision of the source on disk.

    ``revision``: the commit SHA, or ``local@<digest>`` for a plain directory; ``key`` decides
    whether the pipeline must run again (equal key: same content as last time).
    """

    root: Path
    paths: list[Path] | None
    revision: str
    key: str
    signer: str | None = None
    """Who signed the commit, when verification is configured (``GPG key ...``/``SSH ... key``)."""


class Source(Protocol):
    """Where the YAML comes from; ``resolve()`` raises SourceError/OSError when unreachable."""

    def resolve(self) -> Snapshot:
        """The current revision on disk; raises SourceError/OSError when unreachable."""
        ...

    def describe(self) -> dict[str, str]:
        """What the status shows as ``source`` (credentials redacted)."""
        ...

    @property
    def watch_path(self) -> Path | None:
        """A local path ``--watch`` can watch, or None."""
        ...


def tree_fingerprint(root: Path, paths: Iterable[Path] | None = None) -> str:
    """SHA-256 over the relative names and contents of every YAML file under ``paths`` (or
    ``root``), hidden directories skipped: changes exactly when a file is edited, added,
    removed or renamed, and is the same for the same files anywhere (about 5 ms per MiB)."""
    h = hashlib.sha256()
    for base in paths or [root]:
        if base.is_file():
            files: list[Path] = [base]
        else:
            files = []
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files.extend(
                    Path(dirpath) / f for f in sorted(filenames) if f.endswith((".yaml", ".yml"))
                )
        for f in files:
            try:
                data = f.read_bytes()
            except OSError:
                continue
            rel = f.relative_to(root) if f.is_relative_to(root) else f
            h.update(f"{rel}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()


class DirSource:
    """A local directory (or file) used in place; revision ``local@<12 hex of the fingerprint>``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def resolve(self) -> Snapshot:
        """The current revision on disk; raises SourceError/OSError when unreachable."""
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} does not exist")
        root = self.path if self.path.is_dir() else self.path.parent
        paths = None if self.path.is_dir() else [self.path]
        fp = tree_fingerprint(root, paths)
        return Snapshot(root, paths, f"local@{fp[:12]}", fp)

    def describe(self) -> dict[str, str]:
        """What the status shows as ``source`` (credentials redacted)."""
        return {"path": str(self.path)}

    @property
    def watch_path(self) -> Path | None:
        """A local path ``--watch`` can watch, or None."""
        return self.path


class GitSource:
    """A Git repository: ``url`` at ``ref``, optionally only ``subpath`` inside it.

    Each resolve asks the remote for the ref's commit first (:func:`reconciler.source.ls_remote`,
    nothing downloaded) and fetches only when it moved or the work tree is not there yet.
    ``credentials()`` (optional) is called on every resolve, so a rotated Secret is picked up;
    so is ``verification()`` (optional; a :class:`reconciler.signatures.Verification`): the
    head commit must be signed by one of its keys (SignatureError otherwise), and a head already
    accepted is verified again when the allowed keys change. ``fetch_kwargs`` go to
    :func:`reconciler.source.fetch` (e.g. ``verify``).
    """

    def __init__(
        self,
        url: str,
        ref: str = "main",
        subpath: str | None = None,
        cache_dir: Path | None = None,
        credentials: Callable[[], Any] | None = None,
        verification: Callable[[], Any] | None = None,
        **fetch_kwargs: Any,
    ) -> None:
        self.url, self.ref, self.subpath, self.cache_dir = url, ref, subpath, cache_dir
        self.credentials = credentials
        self.verification = verification
        self.fetch_kwargs = fetch_kwargs
        self._last: Snapshot | None = None
        self._verified_with: Any = None

    def resolve(self) -> Snapshot:
        """The current revision on disk; raises SourceError/OSError when unreachable, and
        SignatureError when verification is configured and the head commit does not verify."""
        from reconciler import source

        creds = self.credentials() if self.credentials is not None else None
        auth = {"credentials": creds} if creds is not None else {}
        kw = dict(self.fetch_kwargs)
        if self.verification is not None:
            kw["verify"] = self.verification()
        if (
            self._last is not None
            and self._last.root.is_dir()
            and kw.get("verify") == self._verified_with
        ):
            head = source.ls_remote(self.url, self.ref, **auth)
            if head is not None and head == self._last.revision:
                return self._last
        co = fetch(self.url, self.ref, cache_dir=self.cache_dir, **auth, **kw)
        self._verified_with = kw.get("verify")
        paths = [co.path / self.subpath] if self.subpath else None
        if paths and not paths[0].exists():
            raise FileNotFoundError(
                f"{self.subpath} does not exist in {co.url} at {co.revision[:12]}"
            )
        if co.revision == "local":  # a plain directory given as --repo: its files are the revision
            fp = tree_fingerprint(co.path, paths)
            return Snapshot(co.path, paths, f"local@{fp[:12]}", fp)
        key = co.revision + ("/" + self.subpath if self.subpath else "")
        self._last = Snapshot(co.path, paths, co.revision, key, co.signature)
        return self._last

    def describe(self) -> dict[str, str]:
        """What the status shows as ``source`` (credentials redacted)."""
        from reconciler.source import redact

        d = {"url": redact(self.url), "ref": self.ref}
        if self.subpath:
            d["path"] = self.subpath
        return d

    @property
    def watch_path(self) -> Path | None:
        """A local path ``--watch`` can watch, or None."""
        return None


def git_credentials(
    api: client.ApiClient | None, namespace: str, secret: str | None
) -> Callable[[], Any]:
    """A provider of Git credentials for :class:`GitSource`: those of the Secret ``secret`` in
    ``namespace`` (keys ``username``, ``password``/``token``, ``ca.crt``, ``identity``,
    ``known_hosts``), over those of the environment (``UNDERLAY_GIT_*``). A missing Secret
    is not an error (public repositories need none). Read on every call: a rotated Secret
    takes effect at the next pass. Raises SourceError for an unreadable Secret value.
    """
    from reconciler.source import credentials_from_env, credentials_from_secret

    def provide() -> Any:
        """The credentials to use now (None: none)."""
        env = credentials_from_env()
        if api is None or not secret:
            return env
        try:
            obj = kube.request(api, "GET", f"/api/v1/namespaces/{namespace}/secrets/{secret}")
        except client.ApiException as exc:
            if exc.status == 404:
                return env
            raise
        creds = credentials_from_secret(obj.get("data"), name=f"{namespace}/{secret}")
        return creds.merged(env) if not creds.empty else env

    return provide


def verification_provider(
    api: client.ApiClient | None,
    namespace: str,
    secret: str | None,
    static: Any = None,
) -> Callable[[], Any]:
    """A provider of the allowed signing keys for :class:`GitSource`: ``static`` (a
    :class:`reconciler.signatures.Verification` from files, or None) plus the keys of Secret
    ``secret`` in ``namespace`` when given (armored OpenPGP public keys under any key, SSH
    signers under ``allowed_signers``; Flux's ``verify.secretRef``). Read on every call, so a
    rotated Secret takes effect at the next pass. Raises SignatureError when the Secret is
    missing or holds no usable key (verification was asked for: nothing is accepted without
    it), SourceError when a value is malformed.
    """
    from reconciler.signatures import SignatureError, verification_from_secret

    def provide() -> Any:
        """The Verification to use now."""
        if not secret:
            return static
        if api is None:
            raise SignatureError(
                f"verification Secret {namespace}/{secret} cannot be read: no cluster configured"
            )
        try:
            obj = kube.request(api, "GET", f"/api/v1/namespaces/{namespace}/secrets/{secret}")
        except client.ApiException as exc:
            if exc.status == 404:
                raise SignatureError(
                    f"verification Secret {namespace}/{secret} not found: no revision is "
                    "accepted until it exists"
                ) from None
            raise
        v = verification_from_secret(obj.get("data"), name=f"Secret {namespace}/{secret}")
        return v.merged(static)

    return provide


# --- the stateful reconciler ---------------------------------------------------------------


@dataclass
class Options:
    """Behaviour of a :class:`Reconciler` (the flags of ``underlay apply``/``reconcile``)."""

    instance: str = vocab.DEFAULT_INSTANCE
    namespace: str = "default"
    interval: float = 60.0
    jitter: float = 0.1
    prune: bool = True
    allow_empty: bool = False
    self_heal: bool = True
    strict: bool = False
    ignore_unknown_kinds: bool = False
    backoff_base: float = 1.0
    identity: str = "underlay"


@dataclass
class Rendered:
    """The pipeline's output for one source key: problems, and desired objects when valid."""

    key: str
    revision: str
    problems: list[Any]
    desired: list[render.Desired] | None

    @property
    def errors(self) -> list[Any]:
        """The problems of severity ``error``."""
        return [p for p in self.problems if p.severity == "error"]


@dataclass
class PassReport:
    """What one :meth:`Reconciler.run_once` did (for the CLI, logs and tests)."""

    revision: str = ""
    rendered: Rendered | None = None
    plan: Plan | None = None
    outcome: Outcome | None = None
    error: str | None = None
    reason: str = ""
    skipped_pipeline: bool = False
    quiet: bool = False
    """Nothing the plan reads changed since the last pass, which wrote nothing: its plan is
    this pass's plan (no diff, no status to compute)."""
    status_written: int = 0
    suspended: bool = False
    aborted: bool = False
    duration: float = 0.0

    @property
    def failed(self) -> bool:
        """True when the pass hit an error worth a backoff (source, API, apply, invalid)."""
        return self.error is not None

    @property
    def converged(self) -> bool:
        """The cluster matches the revision: nothing failed, blocked or left drifted."""
        if self.error is not None or self.plan is None:
            return False
        if self.plan.blocked or self.plan.count(Op.DRIFTED):
            return False
        return self.outcome is None or self.outcome.ok


class Reconciler:
    """Reconciles one source into the cluster, recording status, Events and metrics.

    ``api`` should retry transient errors (:func:`reconciler.kube.api_client` with a
    RetryPolicy). ``elector`` (optional) guards every write. ``out`` receives the per-object
    lines (created/updated/pruned/blocked) that ``underlay apply`` prints; ``problems_out`` the
    validation problems of a newly rendered revision (default: logged). With ``cache`` (a
    started :class:`reconciler.cache.ObjectCache` of :data:`OBSERVED`) passes read the cluster
    from the watch cache instead of listing it; without, or until it synced, they LIST.
    """

    def __init__(
        self,
        api: client.ApiClient,
        source: Source,
        opts: Options,
        *,
        metrics: ReconcilerMetrics | None = None,
        elector: LeaderElector | None = None,
        out: Callable[[str], None] | None = None,
        problems_out: Callable[[list[Any]], None] | None = None,
        cache: ObjectCache | None = None,
    ) -> None:
        self.api, self.source, self.opts = api, source, opts
        self.problems_out = problems_out
        self.cache = cache
        self.metrics = metrics or ReconcilerMetrics()
        self.elector = elector
        self.out = out or log.info
        self.guard = elector.check if elector is not None else None
        self.gitsync = GitSyncs(api, opts.namespace, opts.instance, opts.instance, self.guard)
        self.events = EventRecorder(api, opts.namespace, opts.identity)
        self.wake = threading.Event()
        self.stop_event = threading.Event()
        self._rendered: Rendered | None = None
        self._good: Rendered | None = None
        self._memo: dict[Any, Any] = {}  # plan's diff memo, kept between passes
        # per-file and per-document results of load, validate and render, by content: a
        # commit that changes one file parses, checks and renders that file only
        self._pipeline_cache: dict[str, dict[Any, Any]] = {}
        self._render_cache: dict[Any, Any] = {}
        self._inv_cache: tuple[Any, Inventory] | None = None
        self._quiet: tuple[tuple[Any, ...], Plan | None] | None = None
        self._signed: tuple[str, str] | None = None  # (revision, who signed it) when verified
        self._lock = threading.Lock()
        self.pass_started: float | None = None
        self.last_pass_ended: float | None = None
        self.api_ok = False
        self.passes = 0

    # ---- pipeline (cached by source key) ---------------------------------------------------

    def _render(self, snap: Snapshot) -> tuple[Rendered, bool]:
        """Load, validate and render ``snap`` unless its key was rendered last; (result, cached)."""
        if self._rendered is not None and self._rendered.key == snap.key:
            return self._rendered, True
        docs, problems = load_and_validate(
            snap.root, snap.paths, strict=self.opts.strict,
            ignore_unknown_kinds=self.opts.ignore_unknown_kinds, cache=self._pipeline_cache,
        )  # fmt: skip
        errors = [p for p in problems if p.severity == "error"]
        desired = (
            None if errors else render.render(docs, self.opts.instance, cache=self._render_cache)
        )
        self._rendered = Rendered(snap.key, snap.revision, problems, desired)
        if desired is not None:
            self._good = self._rendered
        if self.problems_out is not None:
            self.problems_out(problems)
        else:
            for p in problems:
                (log.error if p.severity == "error" else log.warning)(p.format())
        return self._rendered, False

    def _inventory(self, gs: GitSyncs) -> Inventory:
        """The inventory in the GitSync's status, parsed once per resourceVersion."""
        rv = ((gs.obj or {}).get("metadata") or {}).get("resourceVersion")
        if rv is not None and self._inv_cache is not None and self._inv_cache[0] == rv:
            return self._inv_cache[1]
        inv = Inventory.from_status(gs.status)
        self._inv_cache = (rv, inv)
        return inv

    # ---- one pass ------------------------------------------------------------------------

    def run_once(self) -> PassReport:
        """One full pass (see the module docstring). Never raises for cluster or source
        errors: they are in the report, the status, an Event and the metrics."""
        rep = PassReport()
        started = time.monotonic()
        self.pass_started = started
        try:
            self._pass(rep)
        except LeadershipLost as exc:
            rep.aborted, rep.error, rep.reason = True, str(exc), "LeadershipLost"
            log.warning("pass aborted: %s", exc)
        except Exception as exc:
            rep.error = _describe_error(exc, self.api)
            rep.reason = rep.reason or _reason_of(exc)
            log.error("pass failed (%s): %s", rep.reason, rep.error)
            self._record_failure(rep)
        finally:
            rep.duration = time.monotonic() - started
            self.pass_started = None
            self.last_pass_ended = time.monotonic()
            self.passes += 1
            if not rep.aborted and not rep.suspended:
                result = "failure" if rep.failed else "success"
                self.metrics.duration.observe(rep.duration, result=result)
                self.metrics.passes.inc(result=result)
                if not rep.failed:
                    self.metrics.last_success.set(time.time())
        return rep

    def _pass(self, rep: PassReport) -> None:
        opts = self.opts
        gs = self.gitsync
        gs.ensure()
        self.api_ok = True
        if gs.suspended:
            rep.suspended = True
            log.info("GitSync %s/%s is suspended: no pass", opts.namespace, opts.instance)
            return
        requested = gs.requested_at
        prev = gs.status
        inventory = self._inventory(gs)
        try:
            snap = self.source.resolve()
        except Exception as exc:
            from reconciler.signatures import SignatureError

            if isinstance(exc, SignatureError):
                rep.reason, rep.revision = "VerificationFailed", exc.revision
                raise _Stage("VerificationFailed", exc) from exc
            rep.reason = "SourceFailed"
            raise _Stage("SourceFailed", exc) from exc
        rep.revision = snap.revision
        self._signed = (snap.revision, snap.signer) if snap.signer else None
        rendered, cached = self._render(snap)
        rep.rendered, rep.skipped_pipeline = rendered, cached
        target = rendered if rendered.desired is not None else self._good
        # observe every kind we may write or prune; a kind nobody uses may lack its CRD
        if self.cache is not None and self.cache.synced:
            observed, missing = self.cache.snapshot()
        else:
            observed, missing = kube.observe_served(self.api, OBSERVED)
        desired = list(target.desired or []) if target is not None else []
        needed = {d.resource.kind for d in desired}
        for res in missing:
            if res.kind in needed:
                rep.reason = "MissingCRD"
                raise kube.MissingCRD(res)
        # nothing the plan reads changed since a pass that wrote nothing: same plan, same status
        quiet = (
            rendered.key,
            target.key if target is not None else None,
            ((gs.obj or {}).get("metadata") or {}).get("resourceVersion"),
            _signature(observed),
            tuple(r.kind for r in missing),
        )
        if self._quiet is not None and self._quiet[0] == quiet:
            rep.plan, rep.quiet = self._quiet[1], True
            self._set_error(rep, rendered, None)
            return
        plan: Plan | None = None
        outcome: Outcome | None = None
        if target is not None:
            plan = make_plan(
                desired, observed, instance=opts.instance, prune=opts.prune,
                inventory=inventory, allow_empty=opts.allow_empty, self_heal=opts.self_heal,
                memo=self._memo,
            )  # fmt: skip
            rep.plan = plan
            if plan.collisions:  # refused whole: nothing is written (all-or-nothing)
                outcome = rep.outcome = execute(self.api, plan, log=self.out, guard=self.guard)
            elif plan.has_changes:
                if plan.count(Op.CREATE):
                    # crash safety: what this pass creates is in the inventory before it
                    # exists (a pass that only updates or prunes has nothing to add)
                    self._record_pending(prev, inventory, plan, target, rendered, rep)
                outcome = execute(self.api, plan, log=self.out, guard=self.guard)
                rep.outcome = outcome
                if self.cache is not None:
                    for done in outcome.done:
                        if done.op is Op.PRUNE:
                            self.cache.forget(done.key, done.live)
                        elif done.key in outcome.live:
                            self.cache.record(outcome.live[done.key])
            inventory = next_inventory(inventory, plan, outcome, observed, opts.instance)
        status = self._status(prev, rendered, target, plan, outcome, inventory, requested)
        self._events(prev, status, rendered, plan, outcome)
        self._count(plan, outcome, inventory, status)
        self._pool_gauges(observed, outcome)
        if gs.write(status):
            rep.status_written += 1
        self._quiet = None
        if outcome is None:  # the cluster is as observed: remember what this pass saw
            rv = ((gs.obj or {}).get("metadata") or {}).get("resourceVersion")
            self._quiet = ((*quiet[:2], rv, *quiet[3:]), plan)
        self._set_error(rep, rendered, outcome)

    def _record_pending(
        self,
        prev: dict[str, Any],
        inventory: Inventory,
        plan: Plan,
        target: Rendered,
        rendered: Rendered,
        rep: PassReport,
    ) -> None:
        """Status before the first write: Reconciling, and the inventory with every object
        about to be created, so a crash mid-apply leaves nothing unaccounted for."""
        gs = self.gitsync
        working = dict(prev)
        working["conditions"] = set_condition(
            list(prev.get("conditions") or []), RECONCILING, True, "Progressing",
            f"applying revision {target.revision}", gs.generation,
        )  # fmt: skip
        working["inventory"] = _pending_inventory(inventory, plan).to_list()
        working["lastAttemptedRevision"] = rendered.revision
        if gs.write(working):
            rep.status_written += 1

    @staticmethod
    def _set_error(rep: PassReport, rendered: Rendered, outcome: Outcome | None) -> None:
        if rendered.desired is None:
            rep.error = f"revision {rendered.revision} is invalid ({len(rendered.errors)} error(s))"
            rep.reason = "ValidationFailed"
        elif outcome is not None and outcome.refused:
            rep.error = (
                f"{len(outcome.refused)} object(s) of revision {rendered.revision} exist in the "
                "cluster without this instance's labels: nothing applied"
            )
            rep.reason = "OwnershipConflict"
        elif outcome is not None and outcome.dry_run_failed:
            rep.error, rep.reason = "the API server rejected the dry run", "DryRunFailed"
        elif outcome is not None and not outcome.ok:
            rep.error, rep.reason = "some objects failed to apply or prune", "ApplyFailed"

    # ---- status --------------------------------------------------------------------------

    def _status(
        self,
        prev: dict[str, Any],
        rendered: Rendered,
        target: Rendered | None,
        plan: Plan | None,
        outcome: Outcome | None,
        inventory: Inventory,
        requested: str | None,
    ) -> dict[str, Any]:
        gen = self.gitsync.generation
        st: dict[str, Any] = {}
        if gen is not None:
            st["observedGeneration"] = gen
        st["source"] = self.source.describe()
        st["lastAttemptedRevision"] = rendered.revision
        if self._signed is not None:
            st["signature"] = {"revision": self._signed[0], "signer": self._signed[1]}
        applied = prev.get("lastAppliedRevision")
        ok_apply = outcome is None or outcome.ok
        if rendered.desired is not None and plan is not None and ok_apply:
            applied = rendered.revision
        if applied:
            st["lastAppliedRevision"] = applied
        handled = requested or prev.get("lastHandledReconcileAt")
        if handled:
            st["lastHandledReconcileAt"] = handled
        old_inv = self._inv_cache[1] if self._inv_cache is not None else None
        if old_inv is not None and inventory == old_inv and "inventory" in prev:
            st["inventory"] = prev["inventory"]  # unchanged: no need to rebuild 1000s of dicts
        else:
            st["inventory"] = inventory.to_list()
        blocked = _all_blocked(plan, outcome)
        if blocked:
            st["blocked"] = [
                {**_ref_dict(a), "op": (a.blocked_op or a.op).value, "reason": why}
                for a, why in blocked[:MAX_LISTED]
            ]
        if plan is not None and plan.drifted:
            st["drift"] = [
                {
                    **_ref_dict(a),
                    "reverted": a.op is not Op.DRIFTED
                    and outcome is not None
                    and any(d is a for d in outcome.done),
                    "fields": [c.path for c in a.changes][:20] or [a.reason],
                }
                for a in plan.drifted[:MAX_LISTED]
            ]
        ready, reason, message, stalled = self._verdict(rendered, target, plan, outcome)
        if not ready and reason not in ("Blocked", "DriftDetected"):
            err: dict[str, Any] = {
                "revision": rendered.revision,
                "reason": reason,
                "message": message,
            }
            if rendered.errors:
                err["problems"] = [p.format() for p in rendered.errors[:MAX_PROBLEMS]]
            st["lastError"] = err
        conds = kstatus_conditions(
            list(prev.get("conditions") or []), ready, reason, message, stalled, gen
        )
        st["conditions"] = conds
        return st

    def _verdict(
        self,
        rendered: Rendered,
        target: Rendered | None,
        plan: Plan | None,
        outcome: Outcome | None,
    ) -> tuple[bool, str, str, bool]:
        """(ready, reason, message, stalled) for the Ready/Stalled conditions."""
        rev = rendered.revision
        if rendered.desired is None:
            errs = rendered.errors
            first = "; ".join(p.format() for p in errs[:3])
            kept = (
                f"the cluster keeps revision {target.revision}" if target is not None
                else "nothing was ever applied"
            )  # fmt: skip
            return (
                False,
                "ValidationFailed",
                f"revision {rev} has {len(errs)} error(s), nothing applied, {kept}: {first}",
                True,
            )
        assert plan is not None
        if plan.collisions:
            first = "; ".join(f"{a.ref()}: {a.reason}" for a in plan.collisions[:3])
            return (
                False, "OwnershipConflict",
                f"nothing of revision {rev} applied: {len(plan.collisions)} object(s) exist in "
                f"the cluster without this instance's labels: {first}",
                True,
            )  # fmt: skip
        if outcome is not None and outcome.dry_run_failed:
            first = "; ".join(f"{a.ref()}: {m}" for a, m in outcome.dry_run_failed[:3])
            return (
                False, "DryRunFailed",
                f"the API server rejected revision {rev} in the dry run, nothing applied: {first}",
                True,
            )  # fmt: skip
        if outcome is not None and (outcome.failed or outcome.skipped):
            bad = [f"{a.ref()}: {m}" for a, m in outcome.failed] + [
                f"{a.ref()}: {m}" for a, m in outcome.skipped
            ]
            return (
                False, "ApplyFailed",
                f"{len(bad)} object(s) of revision {rev} not applied: {'; '.join(bad[:3])}", False,
            )  # fmt: skip
        n = sum(1 for a in plan.actions if a.desired is not None)
        blocked = _all_blocked(plan, outcome)
        if blocked:
            first = "; ".join(f"{a.ref()}: {why}" for a, why in blocked[:3])
            return (
                False, "Blocked",
                f"revision {rev} applied except {len(blocked)} blocked action(s): {first}",
                True,
            )  # fmt: skip
        if plan.count(Op.DRIFTED):
            refs = ", ".join(a.ref() for a in plan.actions if a.op is Op.DRIFTED)
            return (
                False, "DriftDetected",
                f"revision {rev} applied, but objects were changed in the cluster and self-heal "
                f"is off: {refs}",
                False,
            )  # fmt: skip
        return True, "ReconciliationSucceeded", f"Applied revision {rev} ({n} objects)", False

    def _record_failure(self, rep: PassReport) -> None:
        """Status and Event for a pass that raised (source, API, missing CRD)."""
        try:
            gs = self.gitsync
            if gs.obj is None:
                return
            prev = gs.status
            gen = gs.generation
            st = dict(prev)
            stalled = rep.reason in ("MissingCRD", "VerificationFailed")
            message = rep.error or "unknown error"
            st["source"] = self.source.describe()
            if gen is not None:
                st["observedGeneration"] = gen
            if rep.revision:
                st["lastAttemptedRevision"] = rep.revision
            st["lastError"] = {
                "revision": rep.revision or prev.get("lastAttemptedRevision", ""),
                "reason": rep.reason,
                "message": message,
            }
            st["conditions"] = kstatus_conditions(
                list(prev.get("conditions") or []), False, rep.reason, message, stalled, gen
            )
            old = condition(prev, READY) or {}
            if (old.get("reason"), old.get("message")) != (rep.reason, message):
                self.events.emit(gs.obj, WARNING, rep.reason, message)
            if gs.write(st):
                rep.status_written += 1
        except LeadershipLost:
            raise
        except Exception as exc:
            log.warning("could not record the failure in the status: %s", _describe_error(exc))

    # ---- events and metrics ------------------------------------------------------------------

    def _events(
        self,
        prev: dict[str, Any],
        status: dict[str, Any],
        rendered: Rendered,
        plan: Plan | None,
        outcome: Outcome | None,
    ) -> None:
        obj = self.gitsync.obj
        applied = False
        if outcome is not None and outcome.done:
            c = outcome.count
            self.events.emit(
                obj, NORMAL, "Applied",
                f"revision {rendered.revision}: {c(Op.CREATE)} created, {c(Op.UPDATE)} updated, "
                f"{c(Op.PRUNE)} pruned",
            )  # fmt: skip
            applied = True
        drift_said = False
        if plan is not None and plan.drifted:
            new = {(a.key, tuple(c.path for c in a.changes)) for a in plan.drifted}
            old = {
                ((d.get("kind"), d.get("namespace"), d.get("name")), tuple(d.get("fields") or []))
                for d in prev.get("drift") or []
            }
            if new != old or any(a.op is not Op.DRIFTED for a in plan.drifted):
                parts = [
                    f"{a.ref()} ({', '.join(c.path for c in a.changes) or a.reason})"
                    for a in plan.drifted[:10]
                ]
                verb = "reverted" if self.opts.self_heal else "not reverted (self-heal is off)"
                msg = f"changed in the cluster, {verb}: {'; '.join(parts)}"
                self.events.emit(obj, WARNING, "DriftDetected", msg)
                drift_said = True
                for a in plan.drifted:
                    log.warning(
                        "drift: %s %s: %s", a.ref(), a.reason, ", ".join(c.path for c in a.changes)
                    )
        old_ready = condition(prev, READY) or {}
        new_ready = condition(status, READY) or {}
        key = ("status", "reason", "message")
        if tuple(old_ready.get(k) for k in key) != tuple(new_ready.get(k) for k in key):
            if new_ready.get("status") != "True":
                if new_ready.get("reason") == "DriftDetected" and drift_said:
                    return  # the DriftDetected Event above says it all
                self.events.emit(
                    obj, WARNING, str(new_ready.get("reason")), str(new_ready.get("message"))
                )
            elif not applied:
                self.events.emit(
                    obj, NORMAL, str(new_ready.get("reason")), str(new_ready.get("message"))
                )

    def _count(
        self,
        plan: Plan | None,
        outcome: Outcome | None,
        inventory: Inventory,
        status: dict[str, Any],
    ) -> None:
        m = self.metrics
        if outcome is not None:
            for a in outcome.done:
                if a.op is Op.PRUNE:
                    m.pruned.inc(kind=a.resource.kind)
                else:
                    m.applied.inc(kind=a.resource.kind, op=a.op.value)
        if plan is not None:
            for a in plan.drifted:
                m.drift.inc(kind=a.resource.kind)
            m.blocked.set(len(_all_blocked(plan, outcome)))
        m.inventory.set(len(inventory))
        rev = status.get("lastAppliedRevision")
        if rev:
            m.revision.replace({(str(rev),): 1})

    def _pool_gauges(self, observed: dict[Any, dict[str, Any]], outcome: Outcome | None) -> None:
        """Per-pool allocated/total gauges from the SpiderIPPools seen (and just written)."""
        pools = dict(observed)
        if outcome is not None:
            pools.update(outcome.live)
            for done in outcome.done:
                if done.op is Op.PRUNE:
                    pools.pop(done.key, None)
        alloc: dict[tuple[str, ...], float] = {}
        total: dict[tuple[str, ...], float] = {}
        for (kind, _ns, name), obj in pools.items():
            if kind != vocab.SPIDER_IPPOOL.kind:
                continue
            st = obj.get("status") or {}
            a = st.get("allocatedIPCount")
            t = st.get("totalIPCount")
            if a is None:
                try:
                    a = len(ippool.allocated_ips(st))
                except (ValueError, TypeError):
                    a = 0
            if t is None:
                try:
                    t = ippool.allocatable(obj.get("spec") or {}).size
                except (ValueError, TypeError):
                    t = 0
            alloc[(name,)] = float(a)
            total[(name,)] = float(t)
        self.metrics.pool_allocated.replace(alloc)
        self.metrics.pool_total.replace(total)

    # ---- the loop --------------------------------------------------------------------------

    def request_pass(self) -> None:
        """Run a pass as soon as possible (annotation, file change, new leadership)."""
        self.wake.set()

    def stop(self) -> None:
        """Ask the thread to end."""
        self.stop_event.set()
        self.wake.set()

    def run_forever(self) -> None:
        """Pass after pass until :meth:`stop`: every interval (jittered), at once on
        :meth:`request_pass`, with backoff after failures, only while leading (if electing).

        The interval runs from the start of a pass (fixed rate: the repository is polled every
        interval, however long the last pass took, and never two passes at once); the backoff
        after a failure runs from its end.
        """
        failures = 0
        next_due = 0.0
        was_leader = False
        last_full_gc = time.monotonic()
        while not self.stop_event.is_set():
            if self.elector is not None:
                leading = self.elector.is_leader()
                self.metrics.leader.set(1 if leading else 0)
                if not leading:
                    was_leader = False
                    self.wake.wait(timeout=min(1.0, self.elector.cfg.retry_period))
                    self.wake.clear()
                    continue
                if not was_leader:
                    was_leader, next_due = True, 0.0
            now = time.monotonic()
            if now >= next_due or self.wake.is_set():
                self.wake.clear()
                started = time.monotonic()
                rep = self.run_once()
                if rep.aborted:
                    continue
                if rep.rendered is not None and not rep.skipped_pipeline:
                    full = time.monotonic() - last_full_gc > FULL_GC_EVERY
                    settle_heap(full=full)
                    if full:
                        last_full_gc = time.monotonic()
                failures = failures + 1 if rep.failed else 0
                if failures:
                    delay = backoff(failures, self.opts.backoff_base, self.opts.interval)
                    log.info("next try in %.1fs (failure %d)", delay, failures)
                    next_due = time.monotonic() + delay
                else:
                    next_due = started + jittered(self.opts.interval, self.opts.jitter)
            self.wake.wait(timeout=max(0.0, next_due - time.monotonic()))

    # ---- probes ----------------------------------------------------------------------------

    def healthz(self, stuck_after: float) -> str | None:
        """None when healthy; a reason when a pass has been running for ``stuck_after`` s."""
        started = self.pass_started
        if started is not None and time.monotonic() - started > stuck_after:
            return f"a reconcile pass has been running for {time.monotonic() - started:.0f}s"
        return None

    def readyz(self) -> str | None:
        """None when this replica reached the API server (as leader or as standby)."""
        if self.elector is not None and self.elector.api_ok:
            return None
        if self.api_ok:
            return None
        return "the Kubernetes API server has not answered yet"


FULL_GC_EVERY = 600.0
"""Seconds between full collections of the objects :func:`settle_heap` froze."""


def settle_heap(full: bool = False) -> None:
    """Exempt the objects alive now from later cyclic garbage collections (``gc.freeze()``).

    A new revision leaves hundreds of thousands of long-lived objects (documents, the caches
    of load/validate/render, desired objects); a full collection of the cyclic collector
    scans all of them, about 0.3 s for 5,000 documents, at whatever moment the allocation
    counters trigger it: in the middle of the next commit's pass. Frozen, they are never
    scanned (reference counting still frees them as usual), so collections stay small.
    ``full``: first unfreeze and collect everything, so cycles that died since the last full
    collection are freed (the loop does it every :data:`FULL_GC_EVERY` seconds, after a pass,
    about 0.3 s). Source: Python docs, ``gc.freeze``.
    """
    import gc

    if full:
        gc.unfreeze()
        gc.collect()
    gc.freeze()


# --- watchers --------------------------------------------------------------------------------


class GitSyncWatch:
    """Watches GitSync ``namespace/name`` and calls ``on_request()`` when its
    ``underlay.dev/reconcile-requested-at`` annotation takes a value not handled yet, or its
    generation moves past ``status.observedGeneration`` (spec edited, e.g. suspend).

    LIST then WATCH from the list's resourceVersion; on 410 Gone or a dropped stream it lists
    again (Kubernetes API concepts, "Efficient detection of changes").
    """

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        name: str,
        on_request: Callable[[], None],
        timeout_seconds: int = 300,
    ) -> None:
        self.custom: Any = client.CustomObjectsApi(api)
        self.namespace, self.name = namespace, name
        self.on_request = on_request
        self.timeout_seconds = timeout_seconds
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run in a daemon thread."""
        self._thread = threading.Thread(target=self._run, daemon=True, name="gitsync-watch")
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end."""
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _check(self, obj: dict[str, Any]) -> None:
        md = obj.get("metadata") or {}
        st = obj.get("status") or {}
        req = (md.get("annotations") or {}).get(ANNO_RECONCILE_REQUESTED)
        gen, seen = md.get("generation"), st.get("observedGeneration")
        if (req and req != st.get("lastHandledReconcileAt")) or (
            gen is not None and seen is not None and gen != seen
        ):
            self.on_request()

    def _run(self) -> None:
        r = vocab.GIT_SYNC
        sel = f"metadata.name={self.name}"
        failures = 0
        while not self._stop.is_set():
            try:
                lst = self.custom.list_namespaced_custom_object(
                    r.group, r.version, self.namespace, r.plural, field_selector=sel,
                    _preload_content=False,
                )  # fmt: skip
                import json

                data = json.loads(lst.data)
                for item in data.get("items") or []:
                    self._check(item)
                rv = data["metadata"]["resourceVersion"]
                self._watch = watch.Watch()
                for ev in self._watch.stream(
                    self.custom.list_namespaced_custom_object, r.group, r.version,
                    self.namespace, r.plural, field_selector=sel, resource_version=rv,
                    timeout_seconds=self.timeout_seconds, allow_watch_bookmarks=True,
                    _request_timeout=self.timeout_seconds + 30,
                ):  # fmt: skip
                    failures = 0
                    if self._stop.is_set():
                        break
                    if ev.get("type") in ("ADDED", "MODIFIED") and isinstance(
                        ev.get("object"), dict
                    ):
                        self._check(ev["object"])
            except Exception as exc:
                if self._stop.is_set():
                    return
                failures += 1
                log.debug("GitSync watch: %s", exc)
                self._stop.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))


class FileWatch:
    """Calls ``on_change()`` within ~0.1 s of any change under ``path`` (watchfiles; inotify)."""

    def __init__(self, path: Path, on_change: Callable[[], None], debounce_ms: int = 50) -> None:
        self.path, self.on_change, self.debounce_ms = path, on_change, debounce_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()

    def start(self) -> None:
        """Run in a daemon thread."""
        self._thread = threading.Thread(target=self._run, daemon=True, name="file-watch")
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end."""
        self._stop.set()

    def _run(self) -> None:
        import watchfiles

        self.ready.set()
        for _changes in watchfiles.watch(
            self.path, stop_event=self._stop, debounce=self.debounce_ms, step=20,
            yield_on_timeout=False, raise_interrupt=False,
        ):  # fmt: skip
            self.on_change()


# --- helpers -----------------------------------------------------------------------------------


def kstatus_conditions(
    conds: list[dict[str, Any]],
    ready: bool,
    reason: str,
    message: str,
    stalled: bool,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Ready/Reconciling/Stalled after a pass, kstatus style.

    Ready True: Reconciling and Stalled False. Not ready and ``stalled`` (needs a new revision
    or a person: invalid revision, missing CRD, blocked action, rejected dry run): Stalled True
    with the reason, Reconciling False. Not ready otherwise (transient: API or source errors,
    failed writes): Reconciling True ``ProgressingWithRetry``, Stalled False.
    """
    conds = set_condition(conds, READY, ready, reason, message, generation)
    retrying = not ready and not stalled
    conds = set_condition(
        conds, RECONCILING, retrying,
        "ProgressingWithRetry" if retrying else reason,
        message if retrying else "", generation,
    )  # fmt: skip
    return set_condition(conds, STALLED, stalled, reason, message if stalled else "", generation)


class _Stage(RuntimeError):
    """An error of a named stage (reason) wrapping the original exception."""

    def __init__(self, reason: str, exc: Exception) -> None:
        super().__init__(str(exc))
        self.reason, self.exc = reason, exc


def _reason_of(exc: Exception) -> str:
    if isinstance(exc, _Stage):
        return exc.reason
    if isinstance(exc, kube.MissingCRD):
        return "MissingCRD"
    return "ReconcileFailed"


def _describe_error(exc: Exception, api: Any = None) -> str:
    from reconciler.source import redact

    inner = exc.exc if isinstance(exc, _Stage) else exc
    if isinstance(inner, client.ApiException):
        return redact(api_message(inner))
    unreachable = kube.transport_error(inner, api)
    if unreachable is not None:
        return redact(unreachable)
    return redact(str(inner) or type(inner).__name__)


def _signature(observed: dict[Any, dict[str, Any]]) -> int:
    """Changes when any observed object is added, removed or written (its resourceVersion)."""
    return hash(
        frozenset(
            (k, (o.get("metadata") or {}).get("resourceVersion")) for k, o in observed.items()
        )
    )


def _all_blocked(plan: Plan | None, outcome: Outcome | None) -> list[tuple[Action, str]]:
    """(action, reason) of everything blocked: by the plan, then at the write (after a 409)."""
    out = [(a, a.reason) for a in plan.blocked] if plan is not None else []
    if outcome is not None:
        out += outcome.blocked
    return out


def _ref_dict(a: Action) -> dict[str, Any]:
    d: dict[str, Any] = {"kind": a.resource.kind}
    if a.namespace:
        d["namespace"] = a.namespace
    d["name"] = a.name
    return d


def _pending_inventory(old: Inventory, plan: Plan) -> Inventory:
    """The inventory to record before the first write: the old one plus every object about to
    be created, so a crash mid-apply leaves nothing this instance created unaccounted for."""
    entries = dict(old.entries)
    for a in plan.actions:
        if a.op is Op.CREATE and a.key not in entries:
            entries[a.key] = Entry(a.resource, a.namespace, a.name)
    return Inventory(entries.values())


def next_inventory(
    old: Inventory,
    plan: Plan,
    outcome: Outcome | None,
    observed: dict[Any, dict[str, Any]],
    instance: str,
) -> Inventory:
    """The inventory after a pass (see :mod:`reconciler.inventory`).

    Desired objects that exist and are ours enter with the digest of the applied body; a failed
    or skipped write keeps the old entry; a pruned object leaves; a failed or blocked prune
    stays (retried next pass); an object that is gone, or no longer carries our labels, leaves.
    """
    done = {id(a) for a in outcome.done} if outcome is not None else set()
    uids = outcome.uids if outcome is not None else {}
    entries: dict[Any, Entry] = {}
    handled: set[Any] = set()
    for a in plan.actions:
        handled.add(a.key)
        prev = old.get(a.key)
        live_uid = (a.live or {}).get("metadata", {}).get("uid")
        if a.desired is not None:
            d = desired_digest(a.desired)
            if id(a) in done:
                entries[a.key] = Entry(a.resource, a.namespace, a.name, uids.get(a.key), d)
            elif a.op is Op.UNCHANGED:
                same = prev is not None and prev.uid == live_uid and prev.digest == d
                entries[a.key] = (
                    prev
                    if same and prev is not None
                    else Entry(a.resource, a.namespace, a.name, live_uid, d)
                )
            elif a.op is Op.BLOCKED:
                if a.live is not None and owned_by(a.live, instance):
                    entries[a.key] = prev or Entry(a.resource, a.namespace, a.name, live_uid)
            elif prev is not None and (a.live is not None or a.op is Op.DRIFTED):
                entries[a.key] = prev  # failed, skipped, not attempted, or drift left alone
        elif not (a.op is Op.PRUNE and id(a) in done) and prev is not None:
            entries[a.key] = prev
    for e in old:
        if e.key in handled:
            continue
        live = observed.get(e.key)
        if live is not None and owned_by(live, instance):
            entries[e.key] = e  # still ours, not desired, prune off: keep tracking it
    return Inventory(entries.values())
