"""``underlay agent``: the node agent process.

One process per node (DaemonSet, hostNetwork, privileged). It
- watches OvsBridge objects (and its own Node's labels) and makes this node's bridges match
  the ones that select it (:mod:`node_agent.bridges`: OVS through ovsdbapp, links through
  pyroute2, persistence files), within the rollout limits of :mod:`node_agent.rollout`
  (``maxUnavailable`` slots as Leases; a Failing node aborts the rollout for the others);
- repairs drift that OVSDB monitoring (including a reconnect to a replaced database) or the
  file watcher reports, in a repair thread of its own that needs no API call (the drift may
  have cut the node off the API server, and the full pass may be stuck on it), then records it
  in the enactment; at start it replays what the replay records under
  ``/var/lib/underlay/bridges`` say this node carried (reboot replay) the same way;
- records the per-node outcome in OvsBridgeEnactment ``<node>.<bridge>`` with the conditions
  Ready, Progressing, Failing, Pending and Aborted (as kubernetes-nmstate's
  NodeNetworkConfigurationEnactment, with Ready for its Available), plus ``Degraded`` about the
  datapath of the bridge the node carries (True, and a Warning Event, when ``datapathType:
  auto`` fell back to ``netdev``), and publishes the Node extended resource
  ``underlay.dev/<bridge>: 1000`` while the bridge is Ready (as ovs-cni's marker does);
- takes bridges off the node when their OvsBridge is deleted or stops selecting it, once no
  pod ports remain;
- serves the underlay-ovs / underlay-ipam CNI plugins on a unix socket.

Enactment ``status`` (written only when it changes, so an agent restart writes nothing):
``node``, ``bridge``, ``observedGeneration``, ``desiredState`` (the OvsBridge), ``conditions``;
``enactedGeneration`` / ``enactedState`` (the OvsBridge last enacted successfully here: what
drift repair and removal act on); ``lastChanges``; ``lastRollback`` and ``failedProbe`` (after
a rollback); ``lastRepair`` (``time``, ``trigger``, ``drift``, ``changes``, ``seconds``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import logging
import random
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, watch

from node_agent import agent_args, bridges, ovs, ovsdb, persistence, rollout
from reconciler import kube, vocab
from reconciler.events import WARNING, EventRecorder

log = logging.getLogger("underlay.agent")

COND_READY = "Ready"
COND_PROGRESSING = "Progressing"
COND_FAILING = "Failing"
COND_PENDING = "Pending"
COND_ABORTED = "Aborted"
CONDITION_TYPES = (COND_READY, COND_PROGRESSING, COND_FAILING, COND_PENDING, COND_ABORTED)
"""Enactment condition types (kubernetes-nmstate: Available, Progressing, Failing, Pending,
Aborted; ours says Ready for Available)."""

REASON_ENACTED = "Enacted"
REASON_INVALID = "Invalid"
REASON_PROBE_FAILED = "ProbeFailed"
REASON_FAILED = "Failed"
"""A change was attempted and failed (rolled back): not retried until the OvsBridge changes."""
REASON_ERROR = "Error"
"""The node could not be read or checked (e.g. OVSDB unreachable): retried every pass."""
REASON_ENACTING = "Enacting"
REASON_WAITING = "WaitingForSlot"
REASON_ABORTED = "RolloutAborted"
REASON_REMOVAL_BLOCKED = "RemovalBlocked"
REASON_REMOVAL_FAILED = "RemovalFailed"

COND_DEGRADED = "Degraded"
"""Not one of the five above (it may be True next to any of them, Ready included): whether the
bridge this node carries runs as it should. Set when the bridge is enacted or repaired, kept
as it was by every other status (the bridge on the node has not changed then)."""
REASON_NETDEV_DATAPATH = "NetdevDatapath"
"""Degraded True: ``datapathType: auto`` fell back to the userspace datapath."""
REASON_KERNEL_DATAPATH = "KernelDatapath"
REASON_NETDEV_REQUESTED = "NetdevRequested"
"""Degraded False: the userspace datapath because spec.datapathType asks for it."""
EVENT_NAMESPACE = "default"
"""Where the agent's Events about enactments go: enactments are cluster-scoped, and the API
server takes a core/v1 Event about an object without a namespace only in ``default``."""
EVENT_COMPONENT = "underlay-agent"
EVENT_CONTROLLER = "underlay.dev/agent"

DEFAULT_LEASE_NAMESPACE = "kube-system"
"""Where slot Leases live when $POD_NAMESPACE is not set (exists in every cluster; the
DaemonSet sets POD_NAMESPACE to its own namespace through the downward API)."""
API_ERRORS: tuple[type[BaseException], ...] = (client.ApiException, urllib3.exceptions.HTTPError)
"""Errors of the Kubernetes API (HTTP status or transport): they end a pass, which is retried
with backoff; every other error belongs to one bridge and is reported on its enactment."""

MAX_BACKOFF = 30.0
HEARTBEAT_SECONDS = 5.0
"""Longest wait of the idle bridge loop between two heartbeats (see BridgeAgent.liveness)."""
LABEL_VALUE_MAX = 63
"""Longest label value (Kubernetes "Labels and Selectors"); OvsBridge names label enactments."""


class NodeNotFound(RuntimeError):
    """This agent's Node object does not exist (wrong --node-name, or not registered yet)."""


add_arguments = agent_args.add_arguments
"""Options of ``underlay agent``: :func:`node_agent.agent_args.add_arguments` (a light module,
so building the CLI parser does not import this one)."""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_server_address(api: client.ApiClient) -> tuple[str, int] | None:
    """(host, port) of the API server the client talks to, for the reachability probe."""
    url = urllib.parse.urlsplit(api.configuration.host)
    if not url.hostname:
        return None
    return url.hostname, url.port or (443 if url.scheme == "https" else 80)


RETRY_STATUS = (429, 500, 502, 503, 504)
"""HTTP statuses a request is retried on (Kubernetes API conventions: 429 and 5xx are
transient; 429/503 may carry Retry-After)."""


def configure_client(
    api: client.ApiClient,
    timeout: tuple[float, float] = (5.0, 30.0),
    retries: int = 3,
    max_delay: float = 2.0,
) -> client.ApiClient:
    """Make every request of ``api`` robust: a (connect, read) ``timeout`` in seconds unless
    the call passes its own ``_request_timeout`` (the generated client otherwise waits
    forever, and a node whose route to the API server is gone must not hang its agent), and up
    to ``retries`` quick retries on :data:`RETRY_STATUS` answers and transport errors
    (0.2 s doubling, or Retry-After, at most ``max_delay`` s each). Callers see the last
    answer; their own handling of 404/409 is unchanged. Returns ``api``."""
    call = api.call_api

    def call_api(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = timeout
        for attempt in range(retries + 1):
            delay = min(max_delay, 0.2 * 2**attempt)
            try:
                resp = call(*args, **kwargs)
            except urllib3.exceptions.HTTPError as exc:
                if attempt == retries:
                    raise
                log.debug("API request failed (%s); retry %d in %.1fs", exc, attempt + 1, delay)
                time.sleep(delay)
                continue
            if resp.status not in RETRY_STATUS or attempt == retries:
                return resp
            with contextlib.suppress(Exception):
                resp.read()
            with contextlib.suppress(TypeError, ValueError):
                delay = min(max_delay, float(resp.getheader("Retry-After") or delay))
            log.debug("API answered %s; retry %d in %.1fs", resp.status, attempt + 1, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    setattr(api, "call_api", call_api)  # noqa: B010 - instance attribute shadows the method
    return api


def conditions(
    active: str | None, reason: str, message: str, generation: int | None = None
) -> list[dict[str, Any]]:
    """The five enactment conditions: ``active`` True, the others False, all with ``reason``
    and ``message`` (metav1.Condition; Kubernetes API conventions, "Typical status
    properties"). ``lastTransitionTime`` is filled in when the status is written."""
    out = []
    for t in CONDITION_TYPES:
        c: dict[str, Any] = {
            "type": t,
            "status": "True" if t == active else "False",
            "reason": reason,
            "message": message,
        }
        if generation is not None:
            c["observedGeneration"] = generation
        out.append(c)
    return out


def condition_status(enactment: Mapping[str, Any] | None, ctype: str) -> Mapping[str, Any]:
    """Condition ``ctype`` of an enactment ({} when absent)."""
    for c in ((enactment or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return {}


def _trim(obj: Mapping[str, Any]) -> dict[str, Any]:
    """An OvsBridge as enactments record it: name, generation and spec."""
    md = obj.get("metadata") or {}
    out: dict[str, Any] = {
        "apiVersion": obj.get("apiVersion", vocab.UNDERLAY_API_VERSION),
        "kind": obj.get("kind", vocab.OVS_BRIDGE.kind),
        "metadata": {"name": md.get("name")},
        "spec": copy.deepcopy(obj.get("spec") or {}),
    }
    if md.get("generation") is not None:
        out["metadata"]["generation"] = md["generation"]
    return out


@dataclass
class _Trigger:
    """What woke a local pass: a description and when it was first seen (monotonic s)."""

    what: str
    since: float


class BridgeAgent:
    """Keeps this node's bridges equal to the OvsBridge objects that select it.

    ``api``: a kubernetes ApiClient for this agent alone (it gets default request timeouts);
    ``node``: where to act; ``resync``: seconds between full passes; ``run_probes``: probe
    gateway and API server after a change; ``lease_namespace``, ``rollout_retry`` (seconds),
    ``lease_seconds``: rollout slots (see :mod:`node_agent.rollout`).

    ``sync()`` does one full pass (idempotent; raises on API errors); ``local_pass()`` repairs
    drift of what this node enacted without the API; ``run()`` loops until :meth:`stop`.
    Thread-safe: one full pass at a time; node changes (full pass or repair thread) are
    serialised by a lock that is never held across an API call.
    """

    def __init__(
        self,
        api: client.ApiClient,
        node: bridges.NodeContext,
        *,
        resync: float = 60.0,
        run_probes: bool = True,
        lease_namespace: str = DEFAULT_LEASE_NAMESPACE,
        rollout_retry: float = 2.0,
        lease_seconds: int = rollout.DEFAULT_LEASE_SECONDS,
        request_timeout: tuple[float, float] = (5.0, 30.0),
    ) -> None:
        self.api = configure_client(api, request_timeout)
        self.node = node
        self.resync = resync
        self.run_probes = run_probes
        self.rollout_retry = rollout_retry
        self.bridges_api = kube.Objects(api, vocab.OVS_BRIDGE)
        self.enactments = kube.Objects(api, vocab.OVS_BRIDGE_ENACTMENT)
        self.core = client.CoreV1Api(api)
        self.slots = rollout.Slots(api, lease_namespace, node.name, lease_seconds=lease_seconds)
        self.events = EventRecorder(
            api,
            EVENT_NAMESPACE,
            node.name,
            component=EVENT_COMPONENT,
            controller=EVENT_CONTROLLER,
            redact=False,
        )
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self._api_due = threading.Event()
        self._lock = threading.Lock()
        """One full pass at a time."""
        self._node_lock = threading.RLock()
        """Held while the node is changed and ``_enacted`` updated with it (full pass and the
        repair thread); never held across a Kubernetes API call."""
        self._drift = threading.Event()
        self._trig_lock = threading.Lock()
        self._triggers: dict[str, _Trigger] = {}
        self._watchers: list[Any] = []
        self._watched: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self._enacted: dict[str, bridges.DesiredBridge] = {}
        # enactments an earlier run left unfinished, rolled back at start: bridge name ->
        # (what was being enacted, the rollback's result), reported instead of enacting the
        # same desired state again (it never passed its probe)
        self._recovered: dict[str, tuple[bridges.DesiredBridge, bridges.EnactResult]] = {}
        """OvsBridge name -> what this node last enacted successfully (repairs go back to it)."""
        self._failed: dict[str, int | None] = {}
        """OvsBridge name -> generation whose change failed here (not retried until it changes)."""
        self._repairs: dict[str, dict[str, Any]] = {}
        """OvsBridge name -> lastRepair record not yet written to the enactment."""
        self._blocked: set[str] = set()
        """OvsBridge names whose removal waits for pod ports to go (OVSDB changes retry it)."""
        self._unready_lock = threading.Lock()
        self._unready: dict[str, str] = {}
        """OVS bridge name -> why pods must not be attached to it now (see bridge_unready)."""
        self._labels: dict[str, str] | None = None
        self._node_uid: str | None = None
        self._pending = False
        self.last_results: dict[str, str] = {}
        self.heartbeat: float | None = None
        """Monotonic s of the bridge loop's last turn (:meth:`run`; at least every
        :data:`HEARTBEAT_SECONDS` while idle, not during a pass); None before it starts."""
        self.loop_ended = False
        self.pass_started: float | None = None
        """Monotonic s the full pass in progress started; None between passes."""
        self.synced = threading.Event()
        """Set once a full pass finished (this node's OvsBridges were all gone over)."""
        self.last_pass_end: float | None = None
        """Unix time the last full pass finished."""
        self.last_pass_error: str | None = None
        """Why the last full pass did not finish (one line), None after one that did."""

    # --- reading the cluster ------------------------------------------------------------------

    def node_labels(self) -> dict[str, str]:
        """Labels of this node's Node object. Raises NodeNotFound when it does not exist
        (without its Node the agent cannot tell which OvsBridges select it, so the pass
        changes nothing) and ApiException for other API errors."""
        try:
            node = self.core.read_node(self.node.name)
        except client.ApiException as exc:
            if exc.status == 404:
                raise NodeNotFound(
                    f"Node {self.node.name} does not exist in the cluster: no bridge is changed "
                    "or removed until it does (is --node-name right?)"
                ) from exc
            raise
        labels = dict((node.metadata.labels if node.metadata else None) or {})
        self._labels = labels
        self._node_uid = node.metadata.uid if node.metadata else None
        return labels

    def bridge_unready(self, bridge: str) -> str | None:
        """Why a pod must not be attached to OVS bridge ``bridge`` now, or None when it may.

        Not None while this agent creates ``bridge`` for the first time (until its probes
        passed: a failed probe rolls the new bridge back), while it removes ``bridge`` from the
        node (OvsBridge deleted, no longer selecting the node, or its spec.bridge renamed), and
        after a first-time bridge failed and was kept only for the pod ports plugged meanwhile
        (until it is enacted or removed). The CNI server of the same process asks this before
        an ADD (:attr:`node_agent.cni.server.CniAgent.bridge_gate`), which then fails with CNI
        code 11 (try again later). Thread-safe. Source: CNI spec 1.0.0, "Error" (code 11).
        """
        with self._unready_lock:
            return self._unready.get(bridge)

    def _set_unready(self, bridge: str, why: str | None) -> None:
        with self._unready_lock:
            if why is None:
                self._unready.pop(bridge, None)
            else:
                self._unready[bridge] = why

    def _enactment_name(self, bridge_object: str) -> str:
        return f"{self.node.name}.{bridge_object}"

    def _selected_nodes(self, desired: bridges.DesiredBridge) -> int:
        selector = ",".join(f"{k}={v}" for k, v in sorted(desired.node_selector.items()))
        return len(self.core.list_node(label_selector=selector).items)

    # --- one full pass -----------------------------------------------------------------------

    def sync(self, trigger: str = "resync") -> dict[str, str]:
        """Make the node match every OvsBridge; returns {OvsBridge name: outcome}.

        Outcomes: unchanged, changed, repaired, invalid, rolled-back, failed, pending,
        aborted, removed, absent, blocked, forgotten. Raises API_ERRORS when the API server
        cannot be read or written (nothing is removed then).
        """
        with self._lock:
            self.pass_started = time.monotonic()
            try:
                out = self._sync(trigger)
            except Exception as exc:
                self.last_pass_error = _api_error_text(exc)
                raise
            finally:
                self.pass_started = None
            self.last_pass_error = None
            self.last_pass_end = time.time()
            self.synced.set()
            return out

    def _sync(self, trigger: str) -> dict[str, str]:
        labels = self.node_labels()
        objs = self.bridges_api.list()["items"]
        mine = self.enactments.list(
            label_selector=f"{vocab.LABEL_ENACTMENT_NODE}={self.node.name}"
        )["items"]
        enacted = {e["metadata"]["labels"].get(vocab.LABEL_ENACTMENT_BRIDGE): e for e in mine}
        enacted.pop(None, None)
        for oname, e in enacted.items():  # after a restart: what this node had enacted
            state = (e.get("status") or {}).get("enactedState")
            if state and oname not in self._enacted:
                with contextlib.suppress(bridges.InvalidBridge), self._node_lock:
                    d = bridges.DesiredBridge.from_object(state, self.node.name)
                    self._enacted.setdefault(oname, d)
        self._pending = False
        outcomes: dict[str, str] = {}
        selected: set[str] = set()
        for obj in objs:
            oname = obj["metadata"]["name"]
            try:
                if len(oname) > LABEL_VALUE_MAX:
                    raise bridges.InvalidBridge(
                        f"OvsBridge {oname}: metadata.name is {len(oname)} characters; it labels "
                        f"the enactments, and label values are at most {LABEL_VALUE_MAX}"
                    )
                outcome, is_selected = self._reconcile(obj, labels, enacted.get(oname), trigger)
            except bridges.InvalidBridge as exc:  # cannot even be reported on an enactment
                log.error("%s", exc)
                outcome, is_selected = "invalid", False
            except client.ApiException as exc:
                if exc.status not in (400, 422):
                    raise
                # the API refuses something about this bridge: the other bridges go on
                log.error("OvsBridge %s: the API server refused a request: %s", oname, exc.reason)
                outcome, is_selected = "failed", oname in enacted
            except API_ERRORS:
                raise
            except Exception as exc:  # a local failure of this bridge; the others go on
                log.error("OvsBridge %s: %s", oname, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                self._report(
                    obj,
                    enacted.get(oname),
                    COND_FAILING,
                    REASON_ERROR,
                    f"{type(exc).__name__}: {exc}",
                )
                outcome, is_selected = "failed", True
            outcomes[oname] = outcome
            if is_selected:
                selected.add(oname)
        for oname, enactment in sorted(enacted.items()):
            if oname not in selected:
                outcomes[oname] = self._remove(oname, enactment)
        for oname in sorted(set(self._enacted) - selected - set(enacted)):
            # known only from a replay record (its enactment is gone): take it off too
            stub = {"metadata": {"name": self._enactment_name(oname)}, "status": {}}
            outcomes[oname] = self._remove(oname, stub)
        self._watch_drift()
        if outcomes != self.last_results:
            log.info(
                "pass on %s: %s",
                self.node.name,
                ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())) or "no OvsBridges",
            )
        self.last_results = outcomes
        return outcomes

    def _reconcile(
        self,
        obj: Mapping[str, Any],
        labels: Mapping[str, str],
        enactment: dict[str, Any] | None,
        trigger: str,
    ) -> tuple[str, bool]:
        """One OvsBridge on this node; returns (outcome, selects this node)."""
        oname = obj["metadata"]["name"]
        try:
            desired = bridges.DesiredBridge.for_node(obj, self.node.name, labels)
        except bridges.InvalidBridge as exc:
            self._report(obj, enactment, COND_FAILING, REASON_INVALID, str(exc))
            return bridges.STATUS_INVALID, True
        if desired is None:
            return "not-selected", False
        prev = self._renamed_from(oname, desired)
        if prev is not None:
            # spec.bridge changed: the old bridge goes (normal removal), then the new one is
            # made, both in one rollout slot. Checked before the old one is touched: reasons
            # the new bridge is invalid other than the old bridge itself.
            own = re.compile(rf"\b{re.escape(prev.name)}\b")
            reasons = [r for r in bridges.plan(desired, self.node).invalid if not own.search(r)]
            if reasons:
                return self._invalid(obj, desired, enactment, reasons, trigger, prev), True
            return self._rollout(obj, desired, enactment, trigger, replacing=prev), True
        p = bridges.plan(desired, self.node)
        if p.invalid:
            return self._invalid(obj, desired, enactment, list(p.invalid), trigger), True
        if p.empty:
            self._ready(obj, desired, enactment)
            return bridges.STATUS_UNCHANGED, True
        if self._enacted.get(oname) == desired:
            # drift of what this node already enacted: repair, no rollout slot needed
            status = self._repair(oname, desired, p, trigger)
            if status == "repaired":
                self._ready(obj, desired, enactment)
            else:
                self._report(obj, enactment, COND_FAILING, REASON_FAILED, status)
                self._capacity(desired.name, False)
            return ("repaired" if status == "repaired" else bridges.STATUS_FAILED), True
        return self._rollout(obj, desired, enactment, trigger), True

    def _invalid(
        self,
        obj: Mapping[str, Any],
        desired: bridges.DesiredBridge,
        enactment: dict[str, Any] | None,
        reasons: list[str],
        trigger: str,
        prev: bridges.DesiredBridge | None = None,
    ) -> str:
        """Report ``desired`` Invalid on this node; the node keeps what it had enacted."""
        oname = obj["metadata"]["name"]
        reason = "; ".join(reasons)
        if condition_status(enactment, COND_FAILING).get("message") != reason:
            log.error("OvsBridge %s: invalid on %s: %s", oname, self.node.name, reason)
        self._failed.pop(oname, None)
        self._repair_enacted(oname, trigger)  # keep what this node had, if anything
        self._report(obj, enactment, COND_FAILING, REASON_INVALID, reason)
        self._withdraw(desired, prev)
        return bridges.STATUS_INVALID

    def _withdraw(
        self, desired: bridges.DesiredBridge, prev: bridges.DesiredBridge | None = None
    ) -> None:
        """Withdraw the Node capacity of ``desired``'s bridge (and of ``prev``'s, the bridge
        it replaces after a spec.bridge rename)."""
        self._capacity(desired.name, False)
        if prev is not None and prev.name != desired.name:
            self._capacity(prev.name, False)

    def _renamed_from(
        self, oname: str, desired: bridges.DesiredBridge
    ) -> bridges.DesiredBridge | None:
        """The bridge this node enacted for OvsBridge ``oname`` when it is not ``desired``'s
        (spec.bridge changed), else None. An old bridge of which nothing is left on the node
        (removed before a restart) is forgotten here and its capacity withdrawn."""
        with self._node_lock:
            prev = self._enacted.get(oname)
            if prev is None or prev.name == desired.name:
                return None
            if bridges.plan_remove(prev, self.node).status != bridges.STATUS_ABSENT:
                return prev
            self._enacted.pop(oname, None)
        self._capacity(prev.name, False)
        return None

    def _ready(
        self,
        obj: Mapping[str, Any],
        desired: bridges.DesiredBridge,
        enactment: dict[str, Any] | None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        oname = obj["metadata"]["name"]
        with self._node_lock:
            self._enacted[oname] = desired
        self._failed.pop(oname, None)
        self._set_unready(desired.name, None)
        fields: dict[str, Any] = {
            "enactedGeneration": obj["metadata"].get("generation"),
            "enactedState": _trim(obj),
            "failedProbe": None,
        }
        fields.update(extra or {})
        self._report(
            obj,
            enactment,
            COND_READY,
            REASON_ENACTED,
            "node matches the OvsBridge",
            fields,
            bridge=desired.name,
            degraded=self._datapath_condition(desired),
        )
        self._capacity(desired.name, True)

    def _datapath_condition(self, desired: bridges.DesiredBridge) -> dict[str, str] | None:
        """The Degraded condition (status, reason, message) for the OVS bridge of ``desired``
        as it is on the node now, or None when OVS has no such bridge.

        True, reason NetdevDatapath, when ``datapathType: auto`` fell back to the userspace
        (netdev) datapath: ovs-vswitchd then forwards every packet itself, so throughput is
        lower, and pings sent from the node get duplicate replies. False otherwise (reason
        KernelDatapath, or NetdevRequested when spec.datapathType asks for netdev)."""
        state = ovs.read_bridge(self.node.ovsdb, desired.name)
        if state is None:
            return None
        name = desired.name
        if state.datapath_type != ovs.DATAPATH_NETDEV:
            dp = state.datapath_type or ovs.DATAPATH_SYSTEM
            return {
                "status": "False",
                "reason": REASON_KERNEL_DATAPATH,
                "message": f"OVS bridge {name} uses the {dp} datapath",
            }
        if desired.datapath_type == ovs.DATAPATH_NETDEV:
            return {
                "status": "False",
                "reason": REASON_NETDEV_REQUESTED,
                "message": f"OVS bridge {name} uses the userspace (netdev) datapath, as "
                "spec.datapathType asks",
            }
        why = ovs.kernel_datapath_missing(self.node.ovsdb) or "the kernel datapath was not usable"
        return {
            "status": "True",
            "reason": REASON_NETDEV_DATAPATH,
            "message": (
                f"OVS bridge {name} runs on the userspace (netdev) datapath, because {why}: "
                "ovs-vswitchd forwards every packet in userspace, so throughput is lower and "
                "pings sent from this node get duplicate replies (DUP!). Load the openvswitch "
                "kernel module for the kernel datapath, or set spec.datapathType: netdev to "
                "accept this one"
            ),
        }

    def _rollout(
        self,
        obj: Mapping[str, Any],
        desired: bridges.DesiredBridge,
        enactment: dict[str, Any] | None,
        trigger: str,
        *,
        replacing: bridges.DesiredBridge | None = None,
    ) -> str:
        """A change to a state this node has not enacted: only within a rollout slot, and not
        while another node is Failing at this generation (see :mod:`node_agent.rollout`).

        ``replacing``: the bridge this node enacted for the OvsBridge before its spec.bridge
        changed. It is taken off first, through the normal removal (:meth:`_take_off`: Pending
        RemovalBlocked while pod ports remain on it, before any slot is taken), then the new
        bridge is made in the same slot. Removal first: the new bridge may use the same uplink
        (which cannot be a port of two bridges, nor be in two persistence files), and the node
        is then as it was before the old bridge, with its addresses on the old uplink. When the
        new bridge fails (probe, invalid, error) the old one is put back as this node had
        enacted it (it passed its probes then), like the rollback of any other change."""
        oname = obj["metadata"]["name"]
        gen = obj["metadata"].get("generation")
        failing_here = condition_status(enactment, COND_FAILING)
        if self._failed.get(oname, -1) == gen or (
            failing_here.get("status") == "True"
            and failing_here.get("reason") in (REASON_PROBE_FAILED, REASON_FAILED)
            and failing_here.get("observedGeneration") == gen
            and gen is not None
        ):
            # this generation failed here; retried only when the OvsBridge changes
            self._failed[oname] = gen
            self._repair_enacted(oname, trigger)
            self._report(
                obj,
                enactment,
                COND_FAILING,
                failing_here.get("reason") or REASON_FAILED,
                failing_here.get("message")
                or f"the change to generation {gen} failed here; waiting for the OvsBridge to change",
            )
            self._withdraw(desired, replacing)
            return bridges.STATUS_FAILED
        if replacing is not None:
            why = bridges.removal_blocked(replacing, self.node)
            if why is not None:
                res = bridges.RemoveResult(replacing.name, bridges.STATUS_BLOCKED, why)
                return self._replace_stopped(obj, desired, replacing, enactment, res, trigger)
        peers = self._peers(oname)
        failing = rollout.failing_peers(peers, self.node.name, gen)
        if failing:
            return self._abort(obj, desired, enactment, failing, trigger)
        try:
            count = rollout.max_unavailable(
                (obj.get("spec") or {}).get("maxUnavailable"),
                self._selected_nodes(desired)
                if isinstance((obj.get("spec") or {}).get("maxUnavailable"), str)
                else 0,
            )
        except ValueError as exc:
            self._report(obj, enactment, COND_FAILING, REASON_INVALID, f"spec.{exc}")
            return bridges.STATUS_INVALID
        slot, holders = self.slots.acquire(oname, count)
        if slot is None:
            self._pending = True
            msg = (
                f"waiting for a rollout slot of OvsBridge {oname} (maxUnavailable {count}; "
                f"changing now: {', '.join(sorted(holders))})"
            )
            if condition_status(enactment, COND_PENDING).get("status") != "True":
                log.info("OvsBridge %s: %s", oname, msg)
            self._repair_enacted(oname, trigger)
            self._report(obj, enactment, COND_PENDING, REASON_WAITING, msg)
            self._withdraw(desired, replacing)
            return "pending"
        try:
            failing = rollout.failing_peers(self._peers(oname), self.node.name, gen)
            if failing:
                return self._abort(obj, desired, enactment, failing, trigger)
            log.info(
                "OvsBridge %s: changing %s (rollout slot %s)", oname, self.node.name, slot.name
            )
            what = "changing the node"
            if replacing is not None:
                what = f"replacing bridge {replacing.name} with {desired.name}"
            enactment = self._report(obj, enactment, COND_PROGRESSING, REASON_ENACTING, what)
            removed: list[str] = []
            if replacing is not None:
                res = self._take_off(oname, replacing, trigger)
                if res.status not in (bridges.STATUS_REMOVED, bridges.STATUS_ABSENT):
                    return self._replace_stopped(obj, desired, replacing, enactment, res, trigger)
                removed = [f"bridge {replacing.name}: {c}" for c in res.changes]
                for line in removed:
                    log.info("OvsBridge %s: %s", oname, line)
            result, kept, put_back = self._enact(oname, desired, replacing)
            self._log_result(oname, result)
            if result.status in (bridges.STATUS_CHANGED, bridges.STATUS_UNCHANGED):
                self._blocked.discard(oname)
                changes = removed + list(result.changes)
                self._ready(obj, desired, enactment, {"lastChanges": changes or None})
                if replacing is not None:
                    self._capacity(replacing.name, False)
                return result.status
            reason_text = result.reason or result.status
            rollback = list(result.rollback)
            if kept:
                reason_text += (
                    f"; bridge {desired.name} is kept without its uplink "
                    f"({', '.join(desired.uplinks)}) for the pod ports plugged meanwhile: {kept}"
                )
                rollback.append(f"kept OVS bridge {desired.name} for its pod ports: {kept}")
            if put_back:
                reason_text += f"; {put_back}"
                rollback = removed + rollback + [put_back]
            if result.status == bridges.STATUS_INVALID:
                if replacing is not None:
                    self._failed[oname] = gen  # not removed and put back again every pass
                self._report(
                    obj,
                    enactment,
                    COND_FAILING,
                    REASON_INVALID,
                    reason_text,
                    {"lastRollback": rollback or None} if replacing is not None else None,
                )
                self._withdraw(desired, replacing)
                return result.status
            self._failed[oname] = gen
            reason = (
                REASON_PROBE_FAILED
                if result.status == bridges.STATUS_ROLLED_BACK
                else REASON_FAILED
            )
            self._report(
                obj,
                enactment,
                COND_FAILING,
                reason,
                reason_text,
                {
                    "lastRollback": rollback or None,
                    "failedProbe": result.probe.failed if result.probe else None,
                },
            )
            self._withdraw(desired, replacing)
            return result.status
        finally:
            self.slots.release(slot)

    def _abort(
        self,
        obj: Mapping[str, Any],
        desired: bridges.DesiredBridge,
        enactment: dict[str, Any] | None,
        failing: list[tuple[str, str]],
        trigger: str,
    ) -> str:
        oname = obj["metadata"]["name"]
        msg = "rollout stopped: " + "; ".join(f"node {n} is Failing: {m}" for n, m in failing)
        if condition_status(enactment, COND_ABORTED).get("message") != msg:
            log.warning("OvsBridge %s: not changing %s: %s", oname, self.node.name, msg)
        self._repair_enacted(oname, trigger)
        self._report(obj, enactment, COND_ABORTED, REASON_ABORTED, msg)
        self._capacity(desired.name, False)
        return "aborted"

    def _enact(
        self,
        oname: str,
        desired: bridges.DesiredBridge,
        replacing: bridges.DesiredBridge | None,
    ) -> tuple[bridges.EnactResult, str | None, str | None]:
        """:func:`bridges.enact` under the node lock; returns (result, kept, put_back).

        A bridge that does not exist yet is not ready for pods until the enactment passed its
        probes (:meth:`bridge_unready`). When such a first-time bridge failed and pod ports
        were plugged meanwhile, OVS keeps it for them (:func:`ovs.restore_bridge`): ``kept``
        names those ports and the bridge stays unready. When it failed and ``replacing`` was
        taken off for it, ``replacing`` is put back (``put_back`` says how that went)."""
        kept = put_back = None
        with self._node_lock:
            first = ovs.read_bridge(self.node.ovsdb, desired.name) is None
            if first:
                self._set_unready(
                    desired.name,
                    f"OvsBridge {oname} is creating bridge {desired.name} on node "
                    f"{self.node.name} and has not finished (its probes decide whether it stays)",
                )
            try:
                recovered = self._recovered.pop(desired.name, None)
                if recovered is not None and recovered[0] == desired:
                    result = recovered[1]  # rolled back at start: not tried again unprobed
                else:
                    result = bridges.enact(desired, self.node, run_probes=self.run_probes)
                if result.status in (bridges.STATUS_CHANGED, bridges.STATUS_UNCHANGED):
                    self._enacted[oname] = desired  # before a repair could undo it
                    return result, None, None
                if first:
                    ports = ovs.pod_ports(self.node.ovsdb, desired.name)
                    if ports:
                        kept = ", ".join(
                            f"{p.name} (pod {p.external_ids.get(ovs.POD_UID_KEY, '?')}, "
                            f"{p.external_ids.get(ovs.POD_IFACE_KEY, '?')})"
                            for p in ports
                        )
                if replacing is not None:
                    put_back = self._put_back(oname, replacing)
            finally:
                if first:
                    self._set_unready(
                        desired.name,
                        f"the first enactment of bridge {desired.name} by OvsBridge {oname} "
                        f"failed on node {self.node.name}; it is kept only for the pod ports "
                        f"plugged meanwhile: {kept}"
                        if kept
                        else None,
                    )
        return result, kept, put_back

    def _put_back(self, oname: str, old: bridges.DesiredBridge) -> str:
        """Enact ``old`` again (no probes: it passed them when it was enacted) after the bridge
        that was to replace it failed; it stays what drift repair keeps. Returns a sentence."""
        self._enacted[oname] = old
        back = bridges.enact(old, self.node, run_probes=False)
        if back.status in (bridges.STATUS_CHANGED, bridges.STATUS_UNCHANGED):
            log.info("OvsBridge %s: put bridge %s back on %s", oname, old.name, self.node.name)
            return f"bridge {old.name} put back as this node had it"
        log.error("OvsBridge %s: putting bridge %s back failed: %s", oname, old.name, back.reason)
        return f"putting bridge {old.name} back failed: {back.reason}"

    def _take_off(
        self, oname: str, old: bridges.DesiredBridge, trigger: str
    ) -> bridges.RemoveResult:
        """:func:`bridges.remove` of ``old`` under the node lock, with ``old`` unready for pods
        meanwhile. Returns its result; an error is status ``failed`` with the reason, pod
        ports found at the last moment (:class:`ovs.PodPortsRemain`) status ``blocked`` (what
        the removal had already undone is repaired at once). A bridge removed or absent is
        forgotten in the same breath, so no repair builds it again."""
        self._set_unready(
            old.name,
            f"bridge {old.name} is being removed from node {self.node.name} "
            f"(OvsBridge {oname} no longer asks for it here)",
        )
        try:
            with self._node_lock:
                try:
                    res = bridges.remove(old, self.node)
                except ovs.PodPortsRemain as exc:
                    res = bridges.RemoveResult(
                        old.name,
                        bridges.STATUS_BLOCKED,
                        f"bridge {old.name} still has pod ports: {', '.join(exc.ports)}",
                    )
                    self._repair_enacted(oname, f"removal of {old.name} refused: pod ports")
                except Exception as exc:
                    log.error(
                        "OvsBridge %s: removal of %s from %s failed: %s",
                        oname,
                        old.name,
                        self.node.name,
                        exc,
                    )
                    res = bridges.RemoveResult(
                        old.name, bridges.STATUS_FAILED, f"{type(exc).__name__}: {exc}"
                    )
                gone = res.status in (bridges.STATUS_REMOVED, bridges.STATUS_ABSENT)
                if gone and self._enacted.get(oname) == old:
                    self._enacted.pop(oname)
        finally:
            self._set_unready(old.name, None)
        return res

    def _replace_stopped(
        self,
        obj: Mapping[str, Any],
        desired: bridges.DesiredBridge,
        old: bridges.DesiredBridge,
        enactment: dict[str, Any] | None,
        res: bridges.RemoveResult,
        trigger: str,
    ) -> str:
        """The old bridge of a spec.bridge rename could not be taken off (``res`` blocked or
        failed): Pending RemovalBlocked (retried when OVSDB changes) or Failing RemovalFailed;
        the old bridge stays as enacted, the new one is not made."""
        oname = obj["metadata"]["name"]
        self._repair_enacted(oname, trigger)
        msg = (
            f"spec.bridge changed from {old.name} to {desired.name}: bridge {old.name} must be "
            f"removed from node {self.node.name} first"
        )
        if res.status == bridges.STATUS_BLOCKED:
            self._blocked.add(oname)
            msg += f", and its removal is blocked: {res.reason}"
            if condition_status(enactment, COND_PENDING).get("message") != msg:
                log.warning("OvsBridge %s: %s", oname, msg)
            self._report(obj, enactment, COND_PENDING, REASON_REMOVAL_BLOCKED, msg)
        else:
            msg += f", and its removal failed: {res.reason}"
            self._report(obj, enactment, COND_FAILING, REASON_REMOVAL_FAILED, msg)
        self._withdraw(desired, old)
        return res.status

    def _peers(self, oname: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.enactments.list(
            label_selector=f"{vocab.LABEL_ENACTMENT_BRIDGE}={oname}"
        )["items"]
        return items

    # --- drift repair -------------------------------------------------------------------------

    def _repair(
        self, oname: str, desired: bridges.DesiredBridge, p: bridges.Plan, trigger: str
    ) -> str:
        """Put back what this node enacted (``desired``, whose plan ``p`` is not empty).

        No probe rollback: the state before a repair is the broken one, and ``desired`` is
        the state that passed its probes when it was enacted. Returns "repaired" or the
        reason it failed; the repair is logged and kept for ``status.lastRepair``.
        """
        drift = [f"{d.kind}: {d.detail}" for d in bridges.classify(p)]
        with self._node_lock:
            if self._enacted.get(oname) != desired:
                return "repaired"  # the other thread changed or removed it meanwhile
            result = bridges.enact(desired, self.node, run_probes=False)
        if result.status == bridges.STATUS_UNCHANGED:
            return "repaired"  # the other thread repaired it first
        if result.status != bridges.STATUS_CHANGED:
            log.error(
                "OvsBridge %s: repairing drift on %s failed: %s",
                oname,
                self.node.name,
                result.reason,
            )
            return f"repairing drift failed: {result.reason}"
        record: dict[str, Any] = {
            "time": _now(),
            "trigger": trigger,
            "drift": drift,
            "changes": list(result.changes),
            "seconds": round(result.duration, 3),
        }
        with self._trig_lock:
            self._repairs[oname] = record
        log.info(
            "OvsBridge %s: repaired drift on %s in %.2fs (trigger: %s): %s",
            oname,
            self.node.name,
            result.duration,
            trigger,
            "; ".join(drift),
        )
        return "repaired"

    def _repair_enacted(self, oname: str, trigger: str) -> str | None:
        """Repair drift of the state this node last enacted for ``oname`` (if any); used while
        a newer generation waits (Pending, Aborted, Failing) and by the local pass."""
        with self._node_lock:
            desired = self._enacted.get(oname)
            if desired is None:
                return None
            p = bridges.plan(desired, self.node)
            if p.invalid or p.empty:
                return None
            return self._repair(oname, desired, p, trigger)

    def local_pass(self, trigger: str) -> list[str]:
        """Repair drift of every bridge this node enacted, without the Kubernetes API (drift
        may have cut the node off it). Returns the OvsBridge names repaired; never raises."""
        repaired = []
        with self._node_lock:
            for oname in sorted(self._enacted):
                try:
                    if self._repair_enacted(oname, trigger) == "repaired":
                        repaired.append(oname)
                except Exception as exc:
                    log.error("OvsBridge %s: drift check failed: %s", oname, exc)
        return repaired

    # --- status -------------------------------------------------------------------------------

    def _report(
        self,
        obj: Mapping[str, Any],
        current: dict[str, Any] | None,
        active: str | None,
        reason: str,
        message: str,
        fields: Mapping[str, Any] | None = None,
        *,
        bridge: str | None = None,
        degraded: Mapping[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """Create or update OvsBridgeEnactment <node>.<bridge>; writes only when the status
        changes (conditions keep their lastTransitionTime while their status stays). Fields of
        the previous status are kept unless ``fields`` replaces them (None deletes), and so is
        the Degraded condition unless ``degraded`` (status, reason, message) sets it. A
        Degraded condition that turns True is also recorded as a Warning Event about the
        enactment. Returns the enactment as last written or read."""
        oname = obj["metadata"]["name"]
        gen = obj["metadata"].get("generation")
        name = self._enactment_name(oname)
        if current is not None and not (current.get("metadata") or {}).get("resourceVersion"):
            current = None  # a stub: the enactment does not exist (yet)
        old_status = (current or {}).get("status") or {}
        conds = conditions(active, reason, message, gen)
        old_conds = {c["type"]: c for c in old_status.get("conditions") or []}
        old_degraded = old_conds.get(COND_DEGRADED)
        if degraded is not None:
            conds.append({"type": COND_DEGRADED, **degraded, "observedGeneration": gen})
            if gen is None:
                conds[-1].pop("observedGeneration")
        elif old_degraded is not None:
            conds.append(dict(old_degraded))
        now = _now()
        for c in conds:
            prev = old_conds.get(c["type"])
            same = prev is not None and prev.get("status") == c["status"]
            c["lastTransitionTime"] = prev.get("lastTransitionTime", now) if same and prev else now
        status: dict[str, Any] = {
            k: v
            for k, v in old_status.items()
            if k not in ("conditions", "observedGeneration", "desiredState")
        }
        spec_bridge = (obj.get("spec") or {}).get("bridge")
        status.update(
            {
                "node": self.node.name,
                "bridge": bridge or spec_bridge or old_status.get("bridge") or oname,
                "observedGeneration": gen,
                "desiredState": _trim(obj),
                "conditions": conds,
            }
        )
        for k, v in (fields or {}).items():
            if v is None:
                status.pop(k, None)
            else:
                status[k] = v
        repair = self._repairs.get(oname)
        if repair is not None:
            status["lastRepair"] = repair
        if gen is None:
            status.pop("observedGeneration")
        if current is not None and _same_status(old_status, status):
            self._repair_reported(oname, repair)
            return current
        if current is None:
            body: dict[str, Any] = {
                "apiVersion": vocab.UNDERLAY_API_VERSION,
                "kind": vocab.OVS_BRIDGE_ENACTMENT.kind,
                "metadata": {
                    "name": name,
                    "labels": {
                        vocab.LABEL_ENACTMENT_NODE: self.node.name,
                        vocab.LABEL_ENACTMENT_BRIDGE: oname,
                    },
                },
                "spec": {"nodeName": self.node.name, "bridge": oname},
            }
            if self._node_uid:
                # a Node that leaves the cluster takes its enactments with it (garbage
                # collection), so its last Failing enactment no longer stops a rollout
                body["metadata"]["ownerReferences"] = [
                    {"apiVersion": "v1", "kind": "Node", "name": self.node.name,
                     "uid": self._node_uid}
                ]  # fmt: skip
            try:
                current = self.enactments.create(body)
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
                current = self.enactments.get(name)
        assert current is not None
        for _ in range(5):
            body = copy.deepcopy(current)
            body["status"] = status
            try:
                written = self.enactments.replace_status(body)
                self._repair_reported(oname, repair)
                self._degraded_event(written, old_degraded, conds)
                return written
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
                current = self.enactments.get(name)
        raise RuntimeError(f"OvsBridgeEnactment {name}: status kept conflicting (409)")

    def _degraded_event(
        self,
        enactment: Mapping[str, Any],
        before: Mapping[str, Any] | None,
        conds: list[dict[str, Any]],
    ) -> None:
        """A Warning Event about ``enactment`` when its Degraded condition just turned True
        (``before``: the condition as it was); best effort, as every Event."""
        now = next((c for c in conds if c["type"] == COND_DEGRADED), None)
        if now is None or now["status"] != "True":
            return
        if before is not None and before.get("status") == "True":
            return
        log.warning("%s: %s", enactment["metadata"]["name"], now["message"])
        self.events.emit(enactment, WARNING, now["reason"], now["message"])

    def _repair_reported(self, oname: str, record: dict[str, Any] | None) -> None:
        """Forget lastRepair ``record`` of ``oname`` now that the enactment holds it, unless the
        repair thread recorded a newer repair while the status was being written (that one
        goes into the next report; forgetting it lost it)."""
        with self._trig_lock:
            if record is not None and self._repairs.get(oname) is record:
                del self._repairs[oname]

    def _log_result(self, oname: str, result: bridges.EnactResult) -> None:
        if result.status == bridges.STATUS_UNCHANGED:
            log.debug("OvsBridge %s: unchanged", oname)
            return
        if result.status == bridges.STATUS_CHANGED:
            for change in result.changes:
                log.info("OvsBridge %s: %s", oname, change)
            log.info("OvsBridge %s: enacted on %s in %.2fs", oname, self.node.name, result.duration)
        else:
            log.error("OvsBridge %s: %s: %s", oname, result.status, result.reason)
            for line in result.rollback:
                log.info("OvsBridge %s: rollback: %s", oname, line)

    # --- removal ------------------------------------------------------------------------------

    def _remove(self, oname: str, enactment: dict[str, Any]) -> str:
        """Take a bridge this node no longer should have off the node; returns the outcome.

        Acts on what this node enacted (``status.enactedState``), or on a first-time bridge
        that failed and was kept for pod ports (its ``desiredState``, when that OVS bridge
        exists, was made by the agent and no other OvsBridge here has it); an enactment with
        neither (the node was never changed) is just deleted. Blocked while pod ports remain:
        the enactment then says Pending/RemovalBlocked with the reason and is retried when
        OVSDB changes or at the next pass.
        """
        status = enactment.get("status") or {}
        state = status.get("enactedState")
        desired = self._enacted.get(oname)
        if desired is None and state:
            try:
                desired = bridges.DesiredBridge.from_object(state, self.node.name)
            except bridges.InvalidBridge:
                desired = None
        if desired is None:
            desired = self._kept_for_pods(status)
        if desired is None:
            if status.get("bridge"):
                self._capacity(status["bridge"], False)
            self._delete_enactment(enactment)
            log.info("OvsBridge %s: forgot enactment %s", oname, enactment["metadata"]["name"])
            return "forgotten"
        obj = state or status.get("desiredState") or {"metadata": {"name": oname}}
        slot = None
        if bridges.removal_blocked(desired, self.node) is None:
            # taking a bridge off changes the node like creating it: at most maxUnavailable
            # nodes at once (the last value this node enacted; 1 when it had none)
            spec_mu = (obj.get("spec") or {}).get("maxUnavailable")
            try:
                count = rollout.max_unavailable(
                    spec_mu, self._selected_nodes(desired) if isinstance(spec_mu, str) else 0
                )
            except ValueError:
                count = 1
            slot, holders = self.slots.acquire(oname, count)
            if slot is None:
                self._pending = True
                msg = (
                    f"bridge {desired.name} is to be removed: waiting for a rollout slot of "
                    f"OvsBridge {oname} (maxUnavailable {count}; changing now: "
                    f"{', '.join(sorted(holders))})"
                )
                if condition_status(enactment, COND_PENDING).get("message") != msg:
                    log.info("OvsBridge %s: %s", oname, msg)
                self._report(obj, enactment, COND_PENDING, REASON_WAITING, msg, None)
                return "pending"
        try:
            res = self._take_off(oname, desired, "removal")
        finally:
            if slot is not None:
                self.slots.release(slot)
        if res.status == bridges.STATUS_FAILED:
            self._report(obj, enactment, COND_FAILING, REASON_REMOVAL_FAILED, res.reason or "")
            self._capacity(desired.name, False)
            return bridges.STATUS_FAILED
        if res.status == bridges.STATUS_BLOCKED:
            self._blocked.add(oname)
            if condition_status(enactment, COND_PENDING).get("message") != res.reason:
                log.warning(
                    "OvsBridge %s: removal from %s blocked: %s", oname, self.node.name, res.reason
                )
            self._report(
                obj, enactment, COND_PENDING, REASON_REMOVAL_BLOCKED, res.reason or "", None
            )
            self._capacity(desired.name, False)
            return res.status
        self._failed.pop(oname, None)
        self._repairs.pop(oname, None)
        self._blocked.discard(oname)
        for change in res.changes:
            log.info("OvsBridge %s: %s", oname, change)
        self._capacity(desired.name, False)
        self._delete_enactment(enactment)
        log.info("OvsBridge %s: removed from %s", oname, self.node.name)
        return res.status

    def _kept_for_pods(self, status: Mapping[str, Any]) -> bridges.DesiredBridge | None:
        """The DesiredBridge of an enactment that never enacted (``desiredState``) when its
        OVS bridge exists, was made by the agent and no other OvsBridge here has it: a
        first-time bridge that failed and was kept for pod ports (:meth:`_enact`)."""
        want = status.get("desiredState")
        if not want or not status.get("bridge"):
            return None
        try:
            d = bridges.DesiredBridge.from_object(want, self.node.name)
        except bridges.InvalidBridge:
            return None
        if d.name != status["bridge"] or any(e.name == d.name for e in self._enacted.values()):
            return None
        state = ovs.read_bridge(self.node.ovsdb, d.name)
        return d if state is not None and state.owned else None

    def _delete_enactment(self, enactment: Mapping[str, Any]) -> None:
        try:
            self.enactments.delete(enactment["metadata"]["name"])
        except client.ApiException as exc:
            if exc.status != 404:
                raise

    # --- Node capacity ------------------------------------------------------------------------

    def _capacity(self, bridge: str, present: bool) -> None:
        """Publish or withdraw the Node extended resource underlay.dev/<bridge> (ovs-cni marker)."""
        resource = f"{vocab.NODE_RESOURCE_PREFIX}{bridge}"
        try:
            node = self.core.read_node_status(self.node.name)
        except client.ApiException as exc:
            if exc.status == 404:
                return
            raise
        capacity = (node.status.capacity or {}) if node.status else {}
        has = resource in capacity
        if has == present:
            return
        key = resource.replace("~", "~0").replace("/", "~1")
        ops: list[dict[str, Any]] = []
        if present:
            if node.status is None or node.status.capacity is None:
                ops.append({"op": "add", "path": "/status/capacity", "value": {}})
            if node.status is None or node.status.allocatable is None:
                ops.append({"op": "add", "path": "/status/allocatable", "value": {}})
            value = str(vocab.NODE_RESOURCE_CAPACITY)
            ops += [
                {"op": "add", "path": f"/status/capacity/{key}", "value": value},
                {"op": "add", "path": f"/status/allocatable/{key}", "value": value},
            ]
        else:
            ops.append({"op": "remove", "path": f"/status/capacity/{key}"})
            if node.status and node.status.allocatable and resource in node.status.allocatable:
                ops.append({"op": "remove", "path": f"/status/allocatable/{key}"})
        self.core.patch_node_status(
            self.node.name, ops, _content_type="application/json-patch+json"
        )
        log.info("Node %s: %s %s", self.node.name, "published" if present else "withdrew", resource)

    # --- drift watchers -----------------------------------------------------------------------

    def _watch_drift(self) -> None:
        desired = sorted(list(self._enacted.values()), key=lambda d: d.name)
        names = tuple(sorted({d.name for d in desired}))
        paths: set[str] = set()
        for d in desired:
            try:
                paths.update(bridges.watched_paths(d, self.node))
            except Exception as exc:
                log.warning("cannot tell which files of bridge %s to watch: %s", d.name, exc)
        key = (names, tuple(sorted(paths)))
        if key == self._watched:
            return
        for w in self._watchers:
            w.stop()
        self._watchers = []
        self._watched = key
        if names:
            self._watchers.append(
                bridges.OvsdbWatcher(self.node.ovsdb, names, lambda b: self._drifted(f"ovsdb {b}"))
            )
        if paths:
            self._watchers.append(
                bridges.FileWatcher(
                    self.node.root, sorted(paths), lambda p: self._drifted(f"file {p}")
                )
            )

    def _drifted(self, what: str) -> None:
        """Watcher callback (ovsdbapp / watchfiles threads): queue a local pass."""
        with self._trig_lock:
            self._triggers.setdefault(what, _Trigger(what, time.monotonic()))
        log.debug("drift on %s: %s changed", self.node.name, what)
        self._drift.set()

    def _repair_loop(self) -> None:
        """Repair thread: a local pass as soon as a watcher reports drift, whatever the full
        pass is doing (it may be stuck on an API server the drift made unreachable)."""
        while not self.stopping.is_set():
            self._drift.wait()
            self._drift.clear()
            triggers = self._take_triggers()
            if self.stopping.is_set() or not triggers:
                continue
            if self.local_pass(", ".join(t.what for t in triggers)) or self._blocked:
                self._api_due.set()  # write lastRepair, or retry a blocked removal
                self.wake.set()

    def _take_triggers(self) -> list[_Trigger]:
        with self._trig_lock:
            out = sorted(self._triggers.values(), key=lambda t: t.since)
            self._triggers.clear()
        return out

    # --- API watches --------------------------------------------------------------------------

    def _watch(
        self,
        what: str,
        list_fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        on_event: Callable[[str, Any], None],
    ) -> None:
        """list+watch loop resuming from resourceVersion (410 Gone: list again); calls
        ``on_event(type, object)``. Runs until :meth:`stop`; API errors are retried."""
        rv = ""
        delay = 1.0
        while not self.stopping.is_set():
            try:
                if not rv:
                    listed = list_fn(*args, **kwargs)
                    rv = (
                        listed["metadata"]["resourceVersion"]
                        if isinstance(listed, dict)
                        else listed.metadata.resource_version
                    )
                w = watch.Watch()
                for ev in w.stream(
                    list_fn,
                    *args,
                    resource_version=rv,
                    timeout_seconds=30,
                    _request_timeout=(5, 60),
                    **kwargs,
                ):
                    if self.stopping.is_set():
                        w.stop()
                        return
                    obj = ev["object"]
                    if ev["type"] == "ERROR":
                        rv = ""
                        break
                    rv = (
                        obj["metadata"]["resourceVersion"]
                        if isinstance(obj, dict)
                        else obj.metadata.resource_version
                    )
                    on_event(ev["type"], obj)
                delay = 1.0
            except client.ApiException as exc:
                if exc.status == 410:
                    rv = ""
                    continue
                log.warning("watch of %s failed: %s; retrying in %.0fs", what, exc.reason, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF)
            except Exception as exc:
                log.warning("watch of %s failed: %s; retrying in %.0fs", what, exc, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF)

    def _on_bridge_event(self, etype: str, obj: Any) -> None:
        log.debug("OvsBridge %s %s", obj["metadata"].get("name"), etype)
        self._api_due.set()
        self.wake.set()

    def _on_node_event(self, etype: str, obj: Any) -> None:
        labels = dict((obj.metadata.labels if obj.metadata else None) or {})
        if labels != self._labels:
            log.debug("Node %s labels changed", self.node.name)
            self._api_due.set()
            self.wake.set()

    # --- liveness ---------------------------------------------------------------------------

    def liveness(self, stuck_after: float) -> str | None:
        """None while the bridge loop (:meth:`run`) turns; else a one-line reason: it has not
        started, it ended, or it gave no heartbeat for ``stuck_after`` s (a pass stuck that
        long, named with how long it has run). Thread-safe (reads only)."""
        now = time.monotonic()
        beat, started = self.heartbeat, self.pass_started
        if self.loop_ended:
            return f"the bridge loop of node {self.node.name} has ended"
        if beat is None:
            return f"the bridge loop of node {self.node.name} has not started"
        if now - beat <= stuck_after:
            return None
        if started is not None:
            return (
                f"a bridge pass on node {self.node.name} has been running for "
                f"{now - started:.0f}s (limit {stuck_after:g}s)"
            )
        return (
            f"the bridge loop of node {self.node.name} gave no heartbeat for {now - beat:.0f}s "
            f"(limit {stuck_after:g}s)"
        )

    # --- loop ---------------------------------------------------------------------------------

    def _recover_interrupted(self) -> None:
        """Roll back every enactment an earlier run left unfinished (see
        :func:`bridges.recover_interrupted`), log it, and keep each result to report on the
        OvsBridge's enactment when the same desired state comes up (it is not enacted again:
        it was interrupted before its probe passed). Caller holds ``_node_lock``."""
        journals: dict[str, bridges.DesiredBridge] = {}
        directory = persistence.node_path(self.node.root, bridges.RECORD_DIR)
        for path in directory.glob(f"*{bridges.JOURNAL_SUFFIX}") if directory.is_dir() else []:
            name = path.name[: -len(bridges.JOURNAL_SUFFIX)]
            with contextlib.suppress(ValueError):
                j = bridges.read_journal(self.node.root, name)
                if j is not None:
                    journals[name] = j.desired
        for res in bridges.recover_interrupted(self.node):
            log.warning("bridge %s on %s: %s", res.bridge, self.node.name, res.reason)
            for line in res.rollback:
                log.info("bridge %s rollback: %s", res.bridge, line)
            if res.bridge in journals and res.status == bridges.STATUS_ROLLED_BACK:
                self._recovered[res.bridge] = (journals[res.bridge], res)

    def run(self) -> None:
        """Loop until :meth:`stop`: a full pass at start, on OvsBridge or Node label changes,
        every ``resync`` s (every ``rollout_retry`` s while Pending); in its own thread, a local
        repair pass as soon as a watcher reports drift (replay records at start). API errors
        never end the loop: passes are retried with exponential backoff (1 s doubling to 30 s).
        Each turn of the loop (at least every :data:`HEARTBEAT_SECONDS`) sets :attr:`heartbeat`
        (see :meth:`liveness`)."""
        self.heartbeat = time.monotonic()
        self.loop_ended = False
        r = vocab.OVS_BRIDGE
        custom = client.CustomObjectsApi(self.api)
        threads = [
            threading.Thread(
                target=self._watch,
                args=(
                    "OvsBridges",
                    custom.list_cluster_custom_object,
                    (r.group, r.version, r.plural),
                    {},
                    self._on_bridge_event,
                ),
                name="ovsbridge-watch",
                daemon=True,
            ),
            threading.Thread(
                target=self._watch,
                args=(
                    f"Node {self.node.name}",
                    self.core.list_node,
                    (),
                    {"field_selector": f"metadata.name={self.node.name}"},
                    self._on_node_event,
                ),
                name="node-watch",
                daemon=True,
            ),
        ]
        repairer = threading.Thread(target=self._repair_loop, name="repair", daemon=True)
        threads.append(repairer)
        for t in threads:
            t.start()
        # an enactment an earlier run left unfinished (killed during its probe) is rolled back
        # first, to the state before it, so nothing unprobed stays on the node
        with self._node_lock:
            self._recover_interrupted()
        # reboot replay: what this node enacted is on disk; put it back before anything needs
        # the API server (after a reboot the route to it may be one of the things missing)
        with self._node_lock:
            for d in bridges.recorded_bridges(self.node.root):
                self._enacted.setdefault(d.object_name, d)
        if self._enacted:
            with contextlib.suppress(Exception):
                self._watch_drift()
            self._drifted("startup (replay records)")
        backoff = 1.0
        next_full = time.monotonic()
        while not self.stopping.is_set():
            self.heartbeat = time.monotonic()
            self.wake.clear()
            if self._api_due.is_set() or time.monotonic() >= next_full:
                self._api_due.clear()
                try:
                    self.sync("resync")
                    backoff = 1.0
                    wait = self.resync
                    if self._pending:
                        wait = min(wait, self.rollout_retry * random.uniform(0.75, 1.25))
                    next_full = time.monotonic() + wait
                except Exception as exc:
                    log.warning(
                        "bridge pass on %s failed: %s; retrying in %.0fs",
                        self.node.name,
                        _api_error_text(exc),
                        backoff,
                        exc_info=log.isEnabledFor(logging.DEBUG)
                        and not isinstance(exc, (*API_ERRORS, NodeNotFound)),
                    )
                    next_full = time.monotonic() + backoff
                    backoff = min(backoff * 2, MAX_BACKOFF)
            self.wake.wait(min(HEARTBEAT_SECONDS, max(0.0, next_full - time.monotonic())))
        self.loop_ended = True
        repairer.join(timeout=60)  # a repair in progress finishes before OVSDB is closed

    def stop(self) -> None:
        """Ask :meth:`run` to return (after the pass in progress) and stop the watchers."""
        self.stopping.set()
        self.wake.set()
        self._drift.set()
        for w in self._watchers:
            w.stop()
        self._watchers = []


def _api_error_text(exc: BaseException) -> str:
    if isinstance(exc, client.ApiException):
        return f"API server answered {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def _same_status(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    def strip(s: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(s)
        d["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"}
            for c in s.get("conditions") or []
        ]
        return d

    return strip(old) == strip(new)


# --- health endpoints -----------------------------------------------------------------------

CNI_CHECK_TIMEOUT = 2.0
"""Seconds the CNI server has to answer the health check's VERSION call."""


def cni_check(socket_path: str, timeout: float = CNI_CHECK_TIMEOUT) -> str | None:
    """Call the CNI server on ``socket_path`` as a shim does (protocol version 1 of
    :mod:`node_agent.cni.shim`) with ``CNI_COMMAND=VERSION`` and wait up to ``timeout`` s for
    its answer. None when it answered exit status 0; else a one-line reason naming the socket
    (missing, refused, no answer in time, a malformed answer). Never raises. A bare connect
    would not do: the kernel accepts unix connections into the backlog whether or not the
    server's accept loop still runs. Source: CNI spec 1.0.0, "VERSION"."""
    env, stdin = b"CNI_COMMAND=VERSION\0", b'{"cniVersion":"1.0.0"}'
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    data = b""
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(b"CNI1 %d %d\n" % (len(env), len(stdin)) + env + stdin)
        sock.shutdown(socket.SHUT_WR)
        while len(data) < 65536:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        return f"CNI server on {socket_path} did not answer a VERSION call within {timeout:g}s"
    except OSError as exc:
        return f"CNI server on {socket_path} cannot be reached: {exc.strerror or exc}"
    finally:
        sock.close()
    head = data.partition(b"\n")[0].split()
    if len(head) != 3 or head[0] != b"0":
        return f"CNI server on {socket_path} answered a VERSION call with {data[:60]!r}"
    return None


class AgentHealth:
    """What ``/healthz``, ``/readyz`` and ``/metrics`` of ``underlay agent`` answer (served by
    :class:`reconciler.httpserver.HttpServer`: 200 ``ok``, else 503 with the reason).

    ``cni_socket``: the CNI server's unix socket; ``node_name``: this node; ``agent``: the
    :class:`BridgeAgent` whose loop runs, set once it exists (:func:`run` serves the
    endpoints before); ``bridges``: False with ``--no-bridges`` (no bridge loop: the CNI
    server alone counts); ``stuck_after``: s a bridge pass may run before the agent is not
    alive. Probes return None when healthy, else one line naming what failed. One CNI call
    runs at a time for all of them: a probe that arrives while one runs shares its answer, so
    a flood of HTTP requests never becomes a flood of CNI connections. Source: Kubernetes
    "Configure Liveness, Readiness and Startup Probes".
    """

    def __init__(
        self,
        cni_socket: str,
        node_name: str,
        agent: BridgeAgent | None = None,
        *,
        bridges: bool = True,
        stuck_after: float = agent_args.DEFAULT_STUCK_AFTER,
        cni_timeout: float = CNI_CHECK_TIMEOUT,
    ) -> None:
        self.cni_socket, self.node_name, self.agent = cni_socket, node_name, agent
        self.bridges = bridges
        self.stuck_after, self.cni_timeout = stuck_after, cni_timeout
        self._cni_lock = threading.Lock()
        self._cni_running: threading.Event | None = None
        self._cni_answer: str | None = None

    def _cni(self) -> str | None:
        """:func:`cni_check`, single-flight: joins the check already running, if any."""
        with self._cni_lock:
            running = self._cni_running
            if running is None:
                running = self._cni_running = threading.Event()
                mine = True
            else:
                mine = False
        if not mine:
            running.wait(self.cni_timeout + 1)
            with self._cni_lock:
                return self._cni_answer
        answer = cni_check(self.cni_socket, self.cni_timeout)
        with self._cni_lock:
            self._cni_answer, self._cni_running = answer, None
        running.set()
        return answer

    def _loop(self) -> str | None:
        if not self.bridges:
            return None
        if self.agent is None:
            return f"the bridge loop of node {self.node_name} has not started"
        return self.agent.liveness(self.stuck_after)

    def healthz(self) -> str | None:
        """Liveness: the bridge loop turns (:meth:`BridgeAgent.liveness`) and the CNI server
        answers a call (:func:`cni_check`)."""
        why = [w for w in (self._loop(), self._cni()) if w]
        return "; ".join(why) or None

    def readyz(self) -> str | None:
        """Readiness: the first full pass over this node's OvsBridges finished and the CNI
        server answers a call."""
        why = []
        a = self.agent
        if self.bridges and (a is None or not a.synced.is_set()):
            text = f"the first bridge pass on node {self.node_name} has not finished"
            err = a.last_pass_error if a is not None else None
            why.append(text + (f": {err}" if err else ""))
        cni = self._cni()
        if cni:
            why.append(cni)
        return "; ".join(why) or None

    def metrics(self) -> str:
        """Prometheus text (format 0.0.4): ``underlay_agent_ready`` (1/0, as /readyz),
        ``underlay_agent_last_pass_timestamp_seconds`` (Unix time the last full pass ended)
        and ``underlay_agent_ovsbridges{outcome}`` (OvsBridges by outcome of that pass)."""
        from reconciler.metrics import Gauge, Registry

        reg = Registry()
        ready = Gauge("underlay_agent_ready", "1 when /readyz answers ok, else 0.")
        ready.set(0 if self.readyz() else 1)
        reg.add(ready)
        a = self.agent
        if a is not None:
            last = Gauge(
                "underlay_agent_last_pass_timestamp_seconds",
                "Unix time the last full bridge pass over this node's OvsBridges ended.",
            )
            if a.last_pass_end is not None:
                last.set(a.last_pass_end)
            outcomes = Gauge(
                "underlay_agent_ovsbridges",
                "OvsBridge objects by outcome of the last full pass on this node.",
                ["outcome"],
            )
            results = list(a.last_results.values())
            for outcome in sorted(set(results)):
                outcomes.set(results.count(outcome), outcome=outcome)
            reg.add(last)
            reg.add(outcomes)
        return reg.render()


# --- no-op mode -----------------------------------------------------------------------------


def load_bridges(path: Path) -> tuple[list[dict[str, Any]], list[str], list[str], int]:
    """OvsBridge objects of a repository directory or file, loaded and validated as the
    reconciler does (:func:`reconciler.validation.validate_repo`, every document, rules across
    files included). Returns (OvsBridge objects in file order, error lines, warning lines,
    number of documents of other kinds). Error and warning lines are ``file:line:col: ...``
    with ``file`` under ``path`` (or ``path`` itself when it is a file). Raises
    FileNotFoundError naming ``path`` when it does not exist."""
    from reconciler.validation import validate_repo

    if not path.exists():
        raise FileNotFoundError(f"--from {path}: no such file or directory")
    root, paths = (path, None) if path.is_dir() else (path.parent, [path])
    docs, problems = validate_repo(root, paths)
    shown = [dataclasses.replace(p, file=(root / p.file).as_posix()) for p in problems]
    errors = [p.format() for p in shown if p.severity == "error"]
    warnings = [p.format() for p in shown if p.severity != "error"]
    objs = [copy.deepcopy(d.obj) for d in docs if d.resource == vocab.OVS_BRIDGE]
    return objs, errors, warnings, len(docs) - len(objs)


def node_labels(api: client.ApiClient, name: str) -> dict[str, str] | None:
    """The labels of Node ``name`` (``{}`` when it has none); None, after saying so on stdout,
    when the Node does not exist. Raises ApiException for other API errors and urllib3's
    HTTPError when the API server cannot be reached."""
    try:
        md = client.CoreV1Api(api).read_node(name).metadata
    except client.ApiException as exc:
        if exc.status != 404:
            raise
        print(f"Node {name} not found in the cluster: nothing would be changed")
        return None
    return dict((md.labels if md else None) or {})


def noop(
    api: client.ApiClient | None,
    node: bridges.NodeContext,
    *,
    objects: list[dict[str, Any]] | None = None,
    labels: Mapping[str, str] | None = None,
    source: str = "the cluster",
) -> int:
    """Print what the agent would change on this node and the files it would write; change
    nothing (reads the API, OVSDB, links and files only).

    ``objects``: the OvsBridges to plan (None: listed from the cluster through ``api``);
    ``labels``: this node's labels for their nodeSelectors (None: its Node object's, read
    through ``api``); ``source`` names where the OvsBridges come from in the output. Bridges
    this node carries and should no longer have are known from its OvsBridgeEnactments (only
    when ``objects`` come from the cluster) and from its replay records. Returns 0, or 1 when
    the node's Node object is read and does not exist."""
    if labels is None:
        assert api is not None, "the Node's labels are read from the cluster"
        labels = node_labels(api, node.name)
        if labels is None:
            return 1
    mine: list[dict[str, Any]] = []
    if objects is None:
        assert api is not None, "OvsBridges are listed from the cluster"
        objs = kube.Objects(api, vocab.OVS_BRIDGE).list()["items"]
        mine = kube.Objects(api, vocab.OVS_BRIDGE_ENACTMENT).list(
            label_selector=f"{vocab.LABEL_ENACTMENT_NODE}={node.name}"
        )["items"]
    else:
        objs = objects
    any_change = False
    selected: set[str] = set()
    for obj in objs:
        oname = obj["metadata"]["name"]
        try:
            desired = bridges.DesiredBridge.for_node(obj, node.name, labels)
        except bridges.InvalidBridge as exc:
            print(f"OvsBridge {oname}: invalid: {exc}")
            selected.add(oname)
            continue
        if desired is None:
            print(f"OvsBridge {oname}: does not select node {node.name}")
            continue
        selected.add(oname)
        p = bridges.plan(desired, node)
        any_change |= not p.empty
        print(f"OvsBridge {oname}:")
        print(bridges.format_plan(p), end="")
    leaving: dict[str, bridges.DesiredBridge] = {}
    for e in mine:
        oname = e["metadata"].get("labels", {}).get(vocab.LABEL_ENACTMENT_BRIDGE)
        state = (e.get("status") or {}).get("enactedState")
        if not oname or oname in selected or not state:
            continue
        with contextlib.suppress(bridges.InvalidBridge):
            leaving[oname] = bridges.DesiredBridge.from_object(state, node.name)
    for d in bridges.recorded_bridges(node.root):  # known only from a replay record
        if d.object_name not in selected:
            leaving.setdefault(d.object_name, d)
    for oname, desired in sorted(leaving.items()):
        res = bridges.plan_remove(desired, node)
        print(f"OvsBridge {oname}: gone or no longer selects {node.name}:")
        if res.status == bridges.STATUS_BLOCKED:
            print(f"bridge {desired.name}: removal blocked: {res.reason}")
        elif res.status == bridges.STATUS_ABSENT:
            print(f"bridge {desired.name}: nothing left to remove")
        else:
            any_change = True
            print(f"bridge {desired.name}: remove")
            for c in res.changes:
                print(f"  [remove] {c}")
    if not objs and not leaving:
        print(f"no OvsBridge objects in {source}")
    print("no changes" if not any_change else "(noop: nothing was changed)")
    return 0


def run_noop(args: argparse.Namespace) -> int:
    """``underlay agent --noop``: OvsBridges from the cluster, or from ``--from`` (validated;
    exit 1 on errors, printed to stderr, without touching OVSDB or the cluster); node labels
    from ``--node-labels``, else the Node object when a cluster is configured (with ``--from``
    an unreachable API server counts as none), else empty, said so. Prints where each came
    from, then :func:`noop`. Returns its exit code."""
    objects: list[dict[str, Any]] | None = None
    source = "the cluster"
    if args.source is not None:
        objects, errors, warnings, others = load_bridges(args.source)
        for line in errors + warnings:
            print(line, file=sys.stderr)
        if errors:
            print(
                f"underlay agent --noop: --from {args.source}: {len(errors)} error(s): "
                "nothing planned",
                file=sys.stderr,
            )
            return 1
        source = str(args.source)
        print(
            f"OvsBridges: {len(objects)} from {source} (validated; "
            f"{others} document(s) of other kinds ignored)"
        )
    labels: dict[str, str] | None = args.node_labels
    api = None
    if labels is not None:
        shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "none"
        print(f"node {args.node_name} labels: {shown} (--node-labels)")
    elif args.source is None or kube.has_cluster_config(args.kubeconfig):
        api = kube.api_client(args.kubeconfig, args.context)
        if args.source is not None:
            configure_client(api, (3.0, 10.0), retries=0)
            try:
                labels = node_labels(api, args.node_name)
                if labels is None:
                    return 1
            except urllib3.exceptions.HTTPError as exc:
                why = kube.transport_error(exc, api) or str(exc)
                print(f"node {args.node_name} labels: none: {why}; treated as empty")
                labels = {}
            else:
                shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "none"
                print(f"node {args.node_name} labels: {shown} (Node {args.node_name})")
    else:
        labels = {}
        print(
            f"node {args.node_name} labels: none (no cluster configured and no --node-labels): "
            "treated as empty, so only OvsBridges without a nodeSelector select it"
        )
    if args.source is not None:
        print(
            "bridges to remove: known from this node's replay records only "
            "(OvsBridgeEnactments are not read with --from)"
        )
    ovs_api = ovsdb.connect(args.ovsdb)
    try:
        node = bridges.NodeContext(name=args.node_name, ovsdb=ovs_api, root=args.root)
        return noop(api, node, objects=objects, labels=labels, source=source)
    finally:
        ovsdb.disconnect(ovs_api)


# --- entry point ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Entry point of ``underlay agent``; returns an exit code. SIGTERM (and SIGINT) end it
    cleanly: the pass in progress finishes, watchers stop, the CNI socket is removed, the
    OVSDB connection is closed; exit code 0. ``--noop``: :func:`run_noop`.

    ``/healthz``, ``/readyz`` and ``/metrics`` (:class:`AgentHealth`) are served on
    ``--http-address`` (loopback by default) from the start (before OVSDB is connected; an
    address already taken is an error before anything else starts), and ``/metrics`` alone on
    ``--metrics-address`` when set; with ``--no-bridges`` only the CNI server counts."""
    for noisy in ("pyroute2", "watchfiles", "ovsdbapp", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    if args.noop:
        return run_noop(args)
    if args.source is not None or args.node_labels is not None:
        raise ValueError("--from and --node-labels go with --noop only")
    from reconciler.httpserver import HttpServer

    health = AgentHealth(
        args.socket, args.node_name, bridges=not args.no_bridges, stuck_after=args.stuck_after
    )
    servers: list[tuple[str, str, HttpServer]] = []  # the addresses are checked here, first
    if args.http_address:
        http = HttpServer(args.http_address, health.metrics, health.healthz, health.readyz)
        servers.append((f"--http-address {args.http_address}", "/healthz and /readyz", http))
    if args.metrics_address:
        metrics = HttpServer(args.metrics_address, health.metrics, None, None)
        servers.append((f"--metrics-address {args.metrics_address}", "/metrics", metrics))
    api = kube.api_client(args.kubeconfig, args.context)
    started: list[HttpServer] = []
    try:
        for option, what, srv in servers:
            try:
                srv.start()  # first: a port already taken leaves the node as it was
            except OSError as exc:
                raise RuntimeError(f"{option}: cannot serve {what}: {exc.strerror or exc}") from exc
            started.append(srv)
        return _serve(args, api, health)
    finally:
        for srv in started:
            srv.stop()


def _serve(args: argparse.Namespace, api: client.ApiClient, health: AgentHealth) -> int:
    """The agent proper (see :func:`run`): OVSDB, CNI plugins and server, GC, bridge loop."""
    ovs_api = ovsdb.connect(args.ovsdb)
    node = bridges.NodeContext(
        name=args.node_name, ovsdb=ovs_api, root=args.root, api_server=api_server_address(api)
    )
    from node_agent.cni.install import install_shims
    from node_agent.cni.server import CniAgent, CniServer, ipam_api_client
    from node_agent.ipam_gc import GcLoop

    if args.cni_bin_dir:
        for path in install_shims(args.cni_bin_dir, args.socket, python=args.cni_python):
            log.info("installed CNI plugin %s", path)
    # The CNI calls get their own API client (never re-sends a request that timed out) and
    # their own OVSDB connection, which monitors only the columns the plugins read.
    cni_api = ipam_api_client(args.kubeconfig, args.context)
    from node_agent.cni.records import default_state_dir

    cni = CniAgent(
        args.node_name,
        ovsdb=args.ovsdb,
        kube=cni_api,
        api_timeout=args.cni_api_timeout,
        state_dir=str(args.cni_state_dir or default_state_dir(args.socket)),
        managed_bridges_only=args.cni_managed_bridges_only,
    )
    agent = BridgeAgent(
        kube.api_client(args.kubeconfig, args.context),
        node,
        resync=args.resync,
        run_probes=not args.no_probe,
        lease_namespace=args.lease_namespace,
        rollout_retry=args.rollout_retry,
    )
    # before the first CNI call: no pod is attached to a bridge this agent is still making
    cni.bridge_gate = agent.bridge_unready
    server = CniServer(args.socket, cni)
    server.start()
    gc = GcLoop(cni_api, interval=args.gc_interval) if args.gc_interval > 0 else None
    if gc is not None:
        gc.start()
    log.info("serving CNI on %s for node %s", args.socket, args.node_name)

    health.agent = agent

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("agent on %s: %s received, stopping", args.node_name, signal.Signals(signum).name)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if args.no_bridges:
            agent.stopping.wait()
        else:
            agent.run()
    finally:
        if gc is not None:
            gc.stop()
        agent.stop()
        server.stop()
        cni.close()
        ovsdb.disconnect(ovs_api)
    log.info("agent on %s stopped", args.node_name)
    return 0
