"""Rollout of one OvsBridge across nodes: at most ``maxUnavailable`` nodes change it at once,
and a node that failed stops the rollout for the others. Coordination goes through the
Kubernetes API only; agents never talk to each other.

Design (kubernetes-nmstate's NodeNetworkConfigurationPolicy rollout, with Leases instead of a
counter in the policy's status, so a thousand nodes never contend on one object):

- **Slots.** ``maxUnavailable`` = N (an int, or a percentage of the nodes the nodeSelector
  selects, rounded up and at least 1, as a DaemonSet's ``rollingUpdate.maxUnavailable``;
  default 1). Slot ``i`` (0 <= i < N) of OvsBridge ``B`` is the ``coordination.k8s.io/v1``
  Lease ``underlay-rollout.<B>.<i>`` in the agent's namespace. A node changes ``B`` only while
  it holds a slot. Taking a slot is atomic on the API server: *create* of an absent Lease
  (409 AlreadyExists = somebody else won), or *update* with the read ``resourceVersion`` of a
  Lease whose holder is empty or expired (409 Conflict = somebody else won). So at most N
  agents hold slots of ``B`` at any time (Kubernetes API conventions, concurrency control).
  The holder renews ``spec.renewTime`` every ``leaseDurationSeconds``/3 while it works and
  deletes the Lease (precondition: its resourceVersion) when done.
- **Failure stops the rollout.** A node whose change was rolled back (or failed) writes its
  OvsBridgeEnactment ``Failing`` for generation G *before* it releases its slot. Every agent
  reads the other nodes' enactments of ``B`` before it asks for a slot and again once it holds
  one; any enactment Failing at the current generation G means: do not change, report
  ``Aborted`` naming that node. Because the failed node's write happens before its release and
  the next holder reads after its acquire, the next holder always sees it. The rollout stays
  stopped until the OvsBridge changes (new ``metadata.generation``); enactments Failing at an
  older generation do not count. The failed node itself does not try that generation again
  (each try would disturb it for ``probeTimeoutSeconds``); it keeps, and repairs, the state
  it had. Any Failing counts, also Invalid (uplink missing on that node) and Error (node
  could not be read): strict, as kubernetes-nmstate; ``nodeOverrides`` or a ``nodeSelector``
  are the way to leave a node out.
- **What needs a slot.** Moving the node to a generation it has not enacted yet. Nodes
  already matching (empty plan), drift repairs of the generation they enacted, invalid input
  (nothing is changed) and removals do not take a slot.

Limits: expiry compares the holder's ``renewTime`` with the reader's clock (clock skew between
nodes shortens or lengthens a dead holder's slot, as with client-go leader election); an agent
that dies while changing its node blocks one slot for ``leaseDurationSeconds`` and then the
rollout goes on without knowing that node's outcome; lowering ``maxUnavailable`` while slots
with higher indexes are held lets those holders finish (briefly more than N); a Failing node
that is down but still in the cluster keeps the rollout stopped until the OvsBridge changes
(enactments are owned by their Node, so deleting the Node collects them and frees the rollout);
waiting agents poll for a free slot (``--rollout-retry`` seconds, jittered) rather than watch.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client

log = logging.getLogger("underlay.agent.rollout")

LEASE_PREFIX = "underlay-rollout"
DEFAULT_MAX_UNAVAILABLE = 1
DEFAULT_LEASE_SECONDS = 30
LABEL_LEASE_BRIDGE = "underlay.dev/rollout-of"
"""Label on slot Leases: name of the OvsBridge they are slots of."""

_MICROTIME = "%Y-%m-%dT%H:%M:%S.%fZ"


class RolloutError(RuntimeError):
    """A slot Lease could not be read or written for a reason other than losing a race."""


def max_unavailable(value: Any, selected_nodes: int) -> int:
    """Nodes that may change a bridge at once, from OvsBridge ``spec.maxUnavailable``.

    ``value``: None (default 1), an int >= 1, or a percentage string "1%".."100%" of
    ``selected_nodes`` (rounded up, as DaemonSet rollingUpdate.maxUnavailable; at least 1).
    Raises ValueError naming the value when it is neither.
    """
    if value is None:
        return DEFAULT_MAX_UNAVAILABLE
    if isinstance(value, bool):
        raise ValueError(f"maxUnavailable {value!r} is not an integer or a percentage")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"maxUnavailable {value} must be at least 1")
        return value
    if isinstance(value, str) and value.endswith("%"):
        try:
            pct = int(value[:-1])
        except ValueError:
            pct = -1
        if not 1 <= pct <= 100:
            raise ValueError(f"maxUnavailable {value!r} must be a percentage from 1% to 100%")
        return max(1, math.ceil(pct * max(selected_nodes, 0) / 100))
    raise ValueError(f"maxUnavailable {value!r} is not an integer or a percentage")


def lease_name(bridge_object: str, index: int) -> str:
    """Name of slot ``index`` of OvsBridge ``bridge_object`` (a DNS subdomain, <= 253 chars;
    long names are shortened with a hash so two OvsBridges never share slots)."""
    name = f"{LEASE_PREFIX}.{bridge_object}.{index}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(bridge_object.encode()).hexdigest()[:16]
    return f"{LEASE_PREFIX}.{bridge_object[:200]}-{digest}.{index}"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _microtime(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime(_MICROTIME)


def _expired(lease: Any, now: datetime.datetime) -> bool:
    spec = lease.spec
    if spec is None or not spec.holder_identity:
        return True
    renewed = spec.renew_time or spec.acquire_time
    if renewed is None or spec.lease_duration_seconds is None:
        return True
    if renewed.tzinfo is None:
        renewed = renewed.replace(tzinfo=datetime.UTC)
    return bool(renewed + datetime.timedelta(seconds=spec.lease_duration_seconds) < now)


# --- failing peers --------------------------------------------------------------------------


def _condition(enactment: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    for c in (enactment.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None


def failing_peers(
    enactments: Iterable[Mapping[str, Any]], node: str, generation: int | None
) -> list[tuple[str, str]]:
    """(node, message) of every other node whose enactment is Failing at ``generation``.

    ``enactments``: OvsBridgeEnactment objects of one OvsBridge (as the API returns them).
    Only ``status.observedGeneration == generation`` counts, so a new generation of the
    OvsBridge resumes a stopped rollout. Sorted by node name.
    """
    out = []
    for e in enactments:
        status = e.get("status") or {}
        peer = status.get("node") or e["metadata"]["name"].split(".", 1)[0]
        if peer == node or status.get("observedGeneration") != generation:
            continue
        failing = _condition(e, "Failing")
        if failing is not None and failing.get("status") == "True":
            out.append((peer, str(failing.get("message") or failing.get("reason") or "")))
    return sorted(out)


# --- slots ----------------------------------------------------------------------------------


@dataclass
class Slot:
    """A held slot: Lease ``name`` in ``namespace`` at ``resource_version``."""

    name: str
    namespace: str
    resource_version: str
    duration: int
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    lost: bool = False


class Slots:
    """Takes and gives back the rollout slots (Leases) of OvsBridges for one node.

    ``api``: kubernetes ApiClient; ``namespace``: where the Leases live (the agent's);
    ``identity``: holderIdentity (the node name); ``lease_seconds``: leaseDurationSeconds;
    ``timeout``: (connect, read) seconds of each request. Source: coordination.k8s.io/v1
    Lease; Kubernetes API conventions, concurrency control and consistency.
    """

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        identity: str,
        *,
        lease_seconds: int = DEFAULT_LEASE_SECONDS,
        timeout: tuple[float, float] = (5.0, 15.0),
    ) -> None:
        self.coord: Any = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.timeout = timeout

    def _body(
        self, name: str, bridge_object: str, transitions: int, rv: str | None
    ) -> dict[str, Any]:
        now = _microtime(_now())
        md: dict[str, Any] = {
            "name": name,
            "namespace": self.namespace,
        }
        if len(bridge_object) <= 63:
            md["labels"] = {LABEL_LEASE_BRIDGE: bridge_object}
        if rv is not None:
            md["resourceVersion"] = rv
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": md,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self.lease_seconds,
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }

    def acquire(self, bridge_object: str, count: int) -> tuple[Slot | None, list[str]]:
        """Take a free slot of ``bridge_object`` among the first ``count``.

        Returns (slot, []) on success, or (None, holders) when every slot is held by another
        live holder (names of the holders). A lost race on one slot moves on to the next.
        Raises kubernetes ApiException for other API errors.
        """
        holders: list[str] = []
        now = _now()
        for i in range(count):
            name = lease_name(bridge_object, i)
            try:
                lease = self.coord.read_namespaced_lease(
                    name, self.namespace, _request_timeout=self.timeout
                )
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
                try:
                    made = self.coord.create_namespaced_lease(
                        self.namespace,
                        self._body(name, bridge_object, 0, None),
                        _request_timeout=self.timeout,
                    )
                except client.ApiException as exc2:
                    if exc2.status == 409:
                        holders.append("(just taken)")
                        continue
                    raise
                return self._held(made), []
            spec = lease.spec
            holder = spec.holder_identity if spec else None
            if holder and holder != self.identity and not _expired(lease, now):
                holders.append(holder)
                continue
            transitions = (spec.lease_transitions or 0) if spec else 0
            if holder != self.identity:
                transitions += 1
            try:
                made = self.coord.replace_namespaced_lease(
                    name,
                    self.namespace,
                    self._body(name, bridge_object, transitions, lease.metadata.resource_version),
                    _request_timeout=self.timeout,
                )
            except client.ApiException as exc:
                if exc.status in (409, 404):
                    holders.append("(just taken)")
                    continue
                raise
            if holder and holder != self.identity:
                log.warning("took over expired rollout slot %s from %s", name, holder)
            return self._held(made), []
        return None, holders

    def _held(self, lease: Any) -> Slot:
        slot = Slot(
            lease.metadata.name,
            self.namespace,
            lease.metadata.resource_version,
            int(lease.spec.lease_duration_seconds),
        )
        t = threading.Thread(
            target=self._renew_loop, args=(slot,), name=f"renew-{slot.name}", daemon=True
        )
        slot._thread = t
        t.start()
        return slot

    def _renew_loop(self, slot: Slot) -> None:
        while not slot._stop.wait(max(1.0, slot.duration / 3)):
            try:
                lease = self.coord.read_namespaced_lease(
                    slot.name, self.namespace, _request_timeout=self.timeout
                )
                if (
                    lease.metadata.resource_version != slot.resource_version
                    or lease.spec.holder_identity != self.identity
                ):
                    slot.lost = True
                    log.error("rollout slot %s was taken by another holder", slot.name)
                    return
                body = self.coord.api_client.sanitize_for_serialization(lease)
                body["spec"]["renewTime"] = _microtime(_now())
                made = self.coord.replace_namespaced_lease(
                    slot.name, self.namespace, body, _request_timeout=self.timeout
                )
                slot.resource_version = made.metadata.resource_version
            except client.ApiException as exc:
                if exc.status in (404, 409):
                    slot.lost = True
                    log.error("rollout slot %s lost while renewing: %s", slot.name, exc.reason)
                    return
                log.warning("renewing rollout slot %s failed: %s", slot.name, exc.reason)
            except Exception as exc:  # transient network error: try again next period
                log.warning("renewing rollout slot %s failed: %s", slot.name, exc)

    def release(self, slot: Slot) -> None:
        """Give ``slot`` back: stop renewing and delete the Lease if it is still ours
        (precondition resourceVersion). Never raises: an unreleased slot expires."""
        slot._stop.set()
        if slot._thread is not None:
            slot._thread.join(timeout=self.timeout[0] + self.timeout[1])
        if slot.lost:
            return
        try:
            self.coord.delete_namespaced_lease(
                slot.name,
                self.namespace,
                body=client.V1DeleteOptions(
                    preconditions=client.V1Preconditions(resource_version=slot.resource_version)
                ),
                _request_timeout=self.timeout,
            )
        except Exception as exc:
            log.warning(
                "could not release rollout slot %s (it expires in %d s): %s",
                slot.name,
                slot.duration,
                getattr(exc, "reason", exc),
            )
