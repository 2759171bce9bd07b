"""The reconciler pipeline and its loop.

One pass: source -> load -> validate -> render -> observe -> plan -> apply -> report. Each
stage is a module with plain data in and out (DESIGN.md); this module strings them together
and owns the decisions between them: a revision with any validation error applies nothing
and the cluster keeps the last good revision.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from reconciler import kube, render, vocab
from reconciler.apply import Outcome, execute
from reconciler.plan import Plan, make_plan
from reconciler.source import Checkout, fetch

log = logging.getLogger("underlay.reconcile")

OBSERVED = (*vocab.USER_KINDS, vocab.NETWORK_ATTACHMENT_DEFINITION)


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
    root: Path, paths: list[Path] | None, *, strict: bool, ignore_unknown_kinds: bool = False
) -> tuple[list[Any], list[Any]]:
    """Load every YAML document under ``paths`` (default: ``root``) and validate them.

    Returns (documents, problems); problems include warnings. Under ``strict`` warnings
    count as errors (their severity is raised).
    """
    from reconciler.validation import validate_repo

    return validate_repo(root, paths, strict=strict, ignore_unknown_kinds=ignore_unknown_kinds)


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
) -> PassResult:
    """Run one pass over the checkout at ``root``.

    With ``api`` None the plan is made against an empty cluster and nothing is applied.
    Returns a PassResult; raises kube.MissingCRD or the client's ApiException/urllib3 errors
    when the cluster cannot be observed.
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
        res.desired, observed, instance=instance, prune=prune, against_empty=api is None
    )
    if apply and api is not None and res.plan.has_changes:
        res.outcome = execute(api, res.plan, log=out)
    return res


def fetch_source(repo: str, ref: str, cache_dir: Path | None = None) -> Checkout:
    """Fetch ``ref`` of ``repo`` (see :func:`reconciler.source.fetch`)."""
    return fetch(repo, ref, cache_dir=cache_dir)


def jittered(interval: float, jitter: float = 0.1) -> float:
    """``interval`` seconds +/- ``jitter`` (fraction), so replicas do not poll in lockstep."""
    return max(0.0, interval * (1 + random.uniform(-jitter, jitter)))


def sleep_until(deadline: float, wake: Callable[[], bool] | None = None, step: float = 0.2) -> None:
    """Sleep until ``deadline`` (monotonic seconds) or until ``wake()`` returns True."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (wake is not None and wake()):
            return
        time.sleep(min(step, left))
