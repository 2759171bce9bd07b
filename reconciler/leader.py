"""Leader election on a coordination.k8s.io/v1 Lease, so one reconciler replica writes at a time.

The algorithm is client-go's ``leaderelection`` with a ``LeaseLock``:

- a candidate reads the Lease; absent -> it creates it holding it; held by another holder
  whose record has not changed for ``leaseDurationSeconds`` (measured on the candidate's own
  monotonic clock since it last saw the record change, so clocks need not agree) -> it takes it
  over; every write carries the read ``resourceVersion``, so two candidates never both win
  (the loser gets 409 Conflict);
- the leader renews (``renewTime``) every ``retry_period``; when it has not renewed for
  ``renew_deadline`` it stops leading. :meth:`LeaderElector.check` raises :class:`LeadershipLost`
  once the last renewal is older than ``renew_deadline``, which is shorter than the lease
  duration others wait, so a leader stops writing before anyone else can start;
- on a clean stop the leader releases the Lease (empty ``holderIdentity``, client-go's
  ``ReleaseOnCancel``) so a standby takes over at its next retry instead of after a lease.

``kubernetes.leaderelection`` (in the client package) was not used: it reads the process-wide
default client configuration, calls ``sys.exit`` on bad settings, cannot be stopped or release
its Lease, and needs whole-second periods, which makes the two-process tests slow.
Defaults: 35 s lease, 30 s renew deadline, 5 s retry (reference/gitops.md); all configurable.
Source: client-go ``tools/leaderelection`` (LeaderElector.tryAcquireOrRenew, release);
Kubernetes API reference, coordination.k8s.io/v1 Lease (holderIdentity, leaseDurationSeconds,
acquireTime, renewTime, leaseTransitions).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client

log = logging.getLogger("underlay.leader")


class LeadershipLost(RuntimeError):
    """This replica is no longer (or not yet) the leader: it must not write."""


@dataclass(frozen=True)
class ElectionConfig:
    """Lease name/namespace, this candidate's identity and the timings (seconds).

    Invariants (client-go): lease_duration > renew_deadline > retry_period > 0.
    Raises ValueError naming the setting that breaks them.
    """

    name: str
    namespace: str
    identity: str
    lease_duration: float = 35.0
    renew_deadline: float = 30.0
    retry_period: float = 5.0

    def __post_init__(self) -> None:
        if not self.retry_period > 0:
            raise ValueError(f"leader election retry period must be > 0 (got {self.retry_period})")
        if not self.renew_deadline > self.retry_period:
            raise ValueError(
                f"leader election renew deadline ({self.renew_deadline}s) must be longer than "
                f"the retry period ({self.retry_period}s)"
            )
        if not self.lease_duration > self.renew_deadline:
            raise ValueError(
                f"leader election lease duration ({self.lease_duration}s) must be longer than "
                f"the renew deadline ({self.renew_deadline}s)"
            )
        if not self.identity:
            raise ValueError("leader election identity must not be empty")


def default_identity() -> str:
    """``$POD_NAME`` (the Deployment sets it), else ``<hostname>_<random>`` (client-go style)."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _micro_time(t: float | None = None) -> str:
    """metav1.MicroTime: RFC 3339 with microseconds, UTC."""
    d = dt.datetime.fromtimestamp(time.time() if t is None else t, dt.UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Runs the election in a thread (:meth:`start`) and answers :meth:`is_leader`/:meth:`check`.

    ``on_change(leading)`` is called from the election thread when leadership is gained or lost.
    ``api`` should be a client with short timeouts and no retries of its own: the election loop
    is the retry.
    """

    def __init__(
        self,
        api: client.ApiClient,
        cfg: ElectionConfig,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.coord: Any = client.CoordinationV1Api(api)
        self.cfg = cfg
        self.on_change = on_change
        self._lock = threading.Lock()
        self._leading = False
        self._renewed_at = 0.0  # monotonic time of our last successful acquire/renew
        self._observed: tuple[Any, ...] | None = None  # (holder, renewTime, rv) last seen
        self._observed_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.transitions = 0
        self.last_error: str | None = None
        self.api_ok = False

    # ---- queries -------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """True while leading and the last renewal is younger than the renew deadline."""
        with self._lock:
            return self._leading and time.monotonic() - self._renewed_at < self.cfg.renew_deadline

    def check(self) -> None:
        """Raise LeadershipLost unless :meth:`is_leader` (call before every write)."""
        if not self.is_leader():
            raise LeadershipLost(
                f"{self.cfg.identity} does not hold Lease {self.cfg.namespace}/{self.cfg.name}"
            )

    @property
    def holder(self) -> str | None:
        """The holder identity last seen on the Lease."""
        with self._lock:
            return self._observed[0] if self._observed else None

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Run the election in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, daemon=True, name="leader-election")
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        """Stop the election thread; with ``release`` give the Lease up if we hold it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.retry_period + 10)
        was = self._set_leading(False)
        if release and was:
            self.release()

    def _set_leading(self, leading: bool) -> bool:
        with self._lock:
            was = self._leading
            self._leading = leading
            if leading:
                self._renewed_at = time.monotonic()
        if was != leading:
            self.transitions += 1
            log.info(
                "%s %s Lease %s/%s",
                self.cfg.identity,
                "acquired" if leading else "lost",
                self.cfg.namespace,
                self.cfg.name,
            )
            if self.on_change is not None:
                try:
                    self.on_change(leading)
                except Exception:
                    log.exception("leadership change callback failed")
        return was

    def _run(self) -> None:
        cfg = self.cfg
        while not self._stop.is_set():
            if self.try_acquire_or_renew():
                if not self._leading:
                    self._set_leading(True)
                else:
                    with self._lock:
                        self._renewed_at = time.monotonic()
                wait = cfg.retry_period
            else:
                if self._leading and time.monotonic() - self._renewed_at >= cfg.renew_deadline:
                    self._set_leading(False)
                # followers poll with jitter (client-go: wait.JitterUntil(retryPeriod, 1.2))
                wait = cfg.retry_period * (1 + (0 if self._leading else random.uniform(0, 0.2)))
                if self._leading:  # renewing: try again sooner, within the deadline
                    left = cfg.renew_deadline - (time.monotonic() - self._renewed_at)
                    wait = max(0.05, min(cfg.retry_period, left))
            self._stop.wait(wait)

    # ---- the Lease -----------------------------------------------------------------------

    def _read(self) -> dict[str, Any] | None:
        try:
            resp = self.coord.read_namespaced_lease(
                self.cfg.name, self.cfg.namespace, _preload_content=False
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data: dict[str, Any] = json.loads(resp.data)
        return data

    def try_acquire_or_renew(self) -> bool:
        """One round of client-go's tryAcquireOrRenew; True when we hold the Lease after it.

        Never raises for API or transport errors (recorded in ``last_error``, returns False).
        """
        cfg = self.cfg
        now = time.time()
        try:
            lease = self._read()
            self.api_ok = True
            if lease is None:
                spec = self._spec(None, now)
                body: dict[str, Any] = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": cfg.name, "namespace": cfg.namespace},
                    "spec": spec,
                }
                self.coord.create_namespaced_lease(cfg.namespace, body, _preload_content=False)
                self._observe(cfg.identity, spec["renewTime"], spec["leaseDurationSeconds"])
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
            self._observe(*record)
            duration = float(spec.get("leaseDurationSeconds") or cfg.lease_duration)
            if (
                holder
                and holder != cfg.identity
                and time.monotonic() - self._observed_at < duration
            ):
                return False  # held by someone else and not expired
            lease["spec"] = self._spec(spec, now)
            self.coord.replace_namespaced_lease(
                cfg.name, cfg.namespace, lease, _preload_content=False
            )
            self.last_error = None
            return True
        except client.ApiException as exc:
            self.api_ok = exc.status not in (0, 500, 502, 503, 504)
            self.last_error = f"{exc.status} {exc.reason}"
            if exc.status != 409:
                log.warning("leader election: Lease %s/%s: %s", cfg.namespace, cfg.name, exc.reason)
            return False
        except Exception as exc:  # transport errors: timeouts, resets, refused connections
            self.api_ok = False
            self.last_error = str(exc)
            log.warning("leader election: Lease %s/%s: %s", cfg.namespace, cfg.name, exc)
            return False

    def _observe(self, *record: Any) -> None:
        with self._lock:
            if record != self._observed:
                self._observed = record
                self._observed_at = time.monotonic()

    def _spec(self, old: dict[str, Any] | None, now: float) -> dict[str, Any]:
        old = old or {}
        mine = old.get("holderIdentity") == self.cfg.identity
        spec = dict(old)
        spec.update(
            holderIdentity=self.cfg.identity,
            leaseDurationSeconds=max(1, math.ceil(self.cfg.lease_duration)),
            renewTime=_micro_time(now),
            acquireTime=old.get("acquireTime")
            if mine and old.get("acquireTime")
            else _micro_time(now),
            leaseTransitions=int(old.get("leaseTransitions") or 0) + (0 if mine or not old else 1),
        )
        return spec

    def release(self) -> bool:
        """Give the Lease up if we hold it (holderIdentity emptied); True when released."""
        try:
            lease = self._read()
            if (
                lease is None
                or (lease.get("spec") or {}).get("holderIdentity") != self.cfg.identity
            ):
                return False
            spec = dict(lease.get("spec") or {})
            spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=_micro_time())
            lease["spec"] = spec
            self.coord.replace_namespaced_lease(
                self.cfg.name, self.cfg.namespace, lease, _preload_content=False
            )
            log.info(
                "%s released Lease %s/%s", self.cfg.identity, self.cfg.namespace, self.cfg.name
            )
            return True
        except Exception as exc:
            log.warning("could not release Lease %s/%s: %s", self.cfg.namespace, self.cfg.name, exc)
            return False
