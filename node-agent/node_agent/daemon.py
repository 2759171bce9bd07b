"""``underlay agent``: the node agent process.

One process per node (DaemonSet, hostNetwork, privileged). It
- watches OvsBridge objects and makes this node's bridges match the ones that select it
  (:mod:`node_agent.bridges`: OVS through ovsdbapp, links through pyroute2, persistence files),
  repairing drift that OVSDB monitoring or the file watcher reports;
- records the per-node outcome in OvsBridgeEnactment ``<node>.<bridge>`` (conditions Ready,
  Progressing, Failing; as kubernetes-nmstate's NodeNetworkConfigurationEnactment) and publishes
  the Node extended resource ``underlay.dev/<bridge>`` while the bridge is Ready (as ovs-cni's
  marker does);
- serves the underlay-ovs / underlay-ipam CNI plugins on a unix socket.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import logging
import os
import signal
import socket
import threading
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client, watch

from node_agent import bridges, ovsdb
from reconciler import kube, vocab

log = logging.getLogger("underlay.agent")

COND_READY, COND_PROGRESSING, COND_FAILING = "Ready", "Progressing", "Failing"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``underlay agent``."""
    p.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME") or socket.gethostname(),
        help="this node's name in Kubernetes (default: $NODE_NAME, else the hostname)",
    )
    p.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then in-cluster)",
    )
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument(
        "--ovsdb", default=ovsdb.DEFAULT_REMOTE, help="OVSDB to manage (default: %(default)s)"
    )
    p.add_argument(
        "--socket",
        default=vocab.DEFAULT_AGENT_SOCKET,
        help="unix socket the CNI plugins call (default: %(default)s)",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help="directory that stands for the node's / when writing netplan/NetworkManager files (default: /)",
    )
    p.add_argument(
        "--cni-bin-dir",
        type=Path,
        help="install the underlay-ovs and underlay-ipam plugins into this directory at start (e.g. /opt/cni/bin)",
    )
    p.add_argument(
        "--cni-python",
        default="/usr/bin/python3",
        help="interpreter the installed plugins run with (default: %(default)s)",
    )
    p.add_argument(
        "--resync",
        type=float,
        default=60.0,
        help="seconds between full re-checks of the node against the OvsBridges (default: %(default)s)",
    )
    p.add_argument(
        "--noop",
        action="store_true",
        help="print what would change on this node and the files it would write, change nothing, exit",
    )
    p.add_argument(
        "--no-probe",
        action="store_true",
        help="skip the gateway/API server probes after a change (not recommended)",
    )
    p.add_argument(
        "--no-bridges", action="store_true", help="serve the CNI plugins only; leave bridges alone"
    )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_server_address(api: client.ApiClient) -> tuple[str, int] | None:
    """(host, port) of the API server the client talks to, for the reachability probe."""
    url = urllib.parse.urlsplit(api.configuration.host)
    if not url.hostname:
        return None
    return url.hostname, url.port or (443 if url.scheme == "https" else 80)


def conditions(
    ready: bool, reason: str, message: str, *, failing: bool, progressing: bool = False
) -> list[dict[str, str]]:
    """The three enactment conditions (Kubernetes API conventions, "Typical status properties")."""

    def c(t: str, v: bool) -> dict[str, str]:
        return {"type": t, "status": "True" if v else "False", "reason": reason, "message": message}

    return [c(COND_READY, ready), c(COND_PROGRESSING, progressing), c(COND_FAILING, failing)]


class BridgeAgent:
    """Keeps this node's bridges equal to the OvsBridge objects that select it.

    ``sync()`` does one full pass (idempotent); ``run()`` loops: a watch on OvsBridge objects,
    OVSDB and file watchers, and a periodic resync all wake it. Thread-safe: one pass at a time.
    """

    def __init__(
        self,
        api: client.ApiClient,
        node: bridges.NodeContext,
        *,
        resync: float = 60.0,
        run_probes: bool = True,
    ) -> None:
        self.api = api
        self.node = node
        self.resync = resync
        self.run_probes = run_probes
        self.bridges_api = kube.Objects(api, vocab.OVS_BRIDGE)
        self.enactments = kube.Objects(api, vocab.OVS_BRIDGE_ENACTMENT)
        self.core = client.CoreV1Api(api)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._watchers: list[Any] = []
        self._watched: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self.last_results: dict[str, str] = {}

    # --- one pass ---------------------------------------------------------------------------

    def node_labels(self) -> dict[str, str]:
        """Labels of this node's Node object ({} with a warning when it does not exist)."""
        try:
            node = self.core.read_node(self.node.name)
        except client.ApiException as exc:
            if exc.status == 404:
                log.warning(
                    "Node %s not found in the cluster: nodeSelectors see no labels", self.node.name
                )
                return {}
            raise
        return dict((node.metadata.labels if node.metadata else None) or {})

    def _enactment_name(self, bridge_object: str) -> str:
        return f"{self.node.name}.{bridge_object}"

    def sync(self) -> dict[str, str]:
        """Make the node match every OvsBridge; returns {OvsBridge name: outcome status}."""
        with self._lock:
            return self._sync()

    def _sync(self) -> dict[str, str]:
        labels = self.node_labels()
        objs = self.bridges_api.list()["items"]
        mine = self.enactments.list(
            label_selector=f"{vocab.LABEL_ENACTMENT_NODE}={self.node.name}"
        )["items"]
        enacted = {e["metadata"]["labels"].get(vocab.LABEL_ENACTMENT_BRIDGE): e for e in mine}
        outcomes: dict[str, str] = {}
        selected: dict[str, bridges.DesiredBridge] = {}
        for obj in objs:
            oname = obj["metadata"]["name"]
            try:
                desired = bridges.DesiredBridge.for_node(obj, self.node.name, labels)
            except bridges.InvalidBridge as exc:
                outcomes[oname] = "invalid"
                self._report(
                    obj,
                    None,
                    conditions(False, "Invalid", str(exc), failing=True),
                    enacted.get(oname),
                )
                continue
            if desired is None:
                continue
            selected[oname] = desired
            result = bridges.enact(desired, self.node, run_probes=self.run_probes)
            outcomes[oname] = result.status
            self._log_result(oname, result)
            self._report(obj, desired, self._conditions(result), enacted.get(oname), result)
            self._capacity(
                desired.name, result.status in (bridges.STATUS_CHANGED, bridges.STATUS_UNCHANGED)
            )
        for oname, enactment in enacted.items():
            if oname in selected or oname is None:
                continue
            outcomes[oname] = self._remove(oname, enactment)
        self._watch_drift(list(selected.values()))
        self.last_results = outcomes
        return outcomes

    @staticmethod
    def _conditions(result: bridges.EnactResult) -> list[dict[str, str]]:
        st = result.status
        if st == bridges.STATUS_CHANGED:
            return conditions(True, "Enacted", "; ".join(result.changes), failing=False)
        if st == bridges.STATUS_UNCHANGED:
            return conditions(True, "Enacted", "node matches the OvsBridge", failing=False)
        reason = {
            bridges.STATUS_INVALID: "Invalid",
            bridges.STATUS_ROLLED_BACK: "ProbeFailed",
            bridges.STATUS_FAILED: "Failed",
        }.get(st, "Failed")
        return conditions(False, reason, result.reason or st, failing=True)

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

    def _report(
        self,
        obj: Mapping[str, Any],
        desired: bridges.DesiredBridge | None,
        conds: list[dict[str, str]],
        current: dict[str, Any] | None,
        result: bridges.EnactResult | None = None,
    ) -> None:
        """Create or update OvsBridgeEnactment <node>.<bridge>; writes only when status changes."""
        oname = obj["metadata"]["name"]
        name = self._enactment_name(oname)
        old_status = (current or {}).get("status") or {}
        old_conds = {c["type"]: c for c in old_status.get("conditions") or []}
        for c in conds:
            prev = old_conds.get(c["type"])
            same = prev is not None and prev.get("status") == c["status"]
            c["lastTransitionTime"] = (
                prev.get("lastTransitionTime", _now()) if same and prev else _now()
            )
        status: dict[str, Any] = {
            "node": self.node.name,
            "bridge": desired.name if desired else (obj.get("spec") or {}).get("bridge") or oname,
            "observedGeneration": obj["metadata"].get("generation"),
            "desiredState": copy.deepcopy(obj),
            "conditions": conds,
        }
        status["desiredState"]["metadata"] = {"name": oname}
        if result is not None:
            if result.changes:
                status["lastChanges"] = list(result.changes)
            elif old_status.get("lastChanges"):
                status["lastChanges"] = old_status["lastChanges"]
            if result.rollback:
                status["lastRollback"] = list(result.rollback)
        if current is not None and _same_status(old_status, status):
            return
        if current is None:
            body = {
                "apiVersion": vocab.UNDERLAY_API_VERSION,
                "kind": vocab.OVS_BRIDGE_ENACTMENT.kind,
                "metadata": {
                    "name": name,
                    "labels": {
                        vocab.LABEL_ENACTMENT_NODE: self.node.name,
                        vocab.LABEL_ENACTMENT_BRIDGE: oname,
                    },
                },
            }
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
                self.enactments.replace_status(body)
                return
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
                current = self.enactments.get(name)

    def _remove(self, oname: str, enactment: dict[str, Any]) -> str:
        """Take a bridge this node no longer should have off the node; returns the outcome."""
        snapshot = (enactment.get("status") or {}).get("desiredState")
        if not snapshot:
            self.enactments.delete(enactment["metadata"]["name"])
            return "forgotten"
        desired = bridges.DesiredBridge.from_object(snapshot, self.node.name)
        res = bridges.remove(desired, self.node)
        if res.status == bridges.STATUS_BLOCKED:
            log.warning(
                "OvsBridge %s: removal from %s blocked: %s", oname, self.node.name, res.reason
            )
            self._report(
                snapshot,
                desired,
                conditions(False, "RemovalBlocked", res.reason or "", failing=True),
                enactment,
            )
            return res.status
        for change in res.changes:
            log.info("OvsBridge %s: %s", oname, change)
        self._capacity(desired.name, False)
        with contextlib.suppress(client.ApiException):
            self.enactments.delete(enactment["metadata"]["name"])
        log.info("OvsBridge %s: removed from %s", oname, self.node.name)
        return res.status

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

    # --- drift watchers -----------------------------------------------------------------

    def _watch_drift(self, selected: list[bridges.DesiredBridge]) -> None:
        names = tuple(sorted(d.name for d in selected))
        paths = tuple(sorted(p for d in selected for p in bridges.watched_paths(d, self.node)))
        if (names, paths) == self._watched:
            return
        for w in self._watchers:
            w.stop()
        self._watchers = []
        self._watched = (names, paths)
        if names:
            self._watchers.append(bridges.OvsdbWatcher(self.node.ovsdb, names, self._drifted))
        if paths:
            self._watchers.append(bridges.FileWatcher(self.node.root, list(paths), self._drifted))

    def _drifted(self, what: str) -> None:
        log.info("drift on %s: %s changed; repairing", self.node.name, what)
        self.wake.set()

    # --- loop -------------------------------------------------------------------------------

    def _watch_bridges(self) -> None:
        """Wake the loop on every OvsBridge change (list+watch, resumes from resourceVersion)."""
        rv = ""
        while not self.stopping.is_set():
            r = vocab.OVS_BRIDGE
            try:
                if not rv:
                    rv = self.bridges_api.list()["metadata"]["resourceVersion"]
                w = watch.Watch()
                for ev in w.stream(
                    self.bridges_api.api.list_cluster_custom_object,
                    r.group,
                    r.version,
                    r.plural,
                    resource_version=rv,
                    timeout_seconds=30,
                ):
                    if self.stopping.is_set():
                        w.stop()
                        return
                    obj = ev["object"]
                    if ev["type"] == "ERROR":
                        rv = ""
                        break
                    rv = obj["metadata"]["resourceVersion"]
                    log.debug("OvsBridge %s %s", obj["metadata"].get("name"), ev["type"])
                    self.wake.set()
            except client.ApiException as exc:
                if exc.status == 410:
                    rv = ""
                    continue
                log.warning("watch of OvsBridges failed: %s; retrying", exc.reason)
                self.stopping.wait(2)
            except Exception as exc:
                log.warning("watch of OvsBridges failed: %s; retrying", exc)
                self.stopping.wait(2)

    def run(self) -> None:
        """Loop until :meth:`stop`: a pass at start, on every wake-up and every ``resync`` s."""
        t = threading.Thread(target=self._watch_bridges, name="ovsbridge-watch", daemon=True)
        t.start()
        delay = 1.0
        while not self.stopping.is_set():
            self.wake.clear()
            try:
                self.sync()
                delay = 1.0
                timeout = self.resync
            except Exception as exc:
                log.error("bridge pass failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
                timeout, delay = delay, min(delay * 2, 30.0)
            self.wake.wait(timeout)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        for w in self._watchers:
            w.stop()


def _same_status(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    def strip(s: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(s)
        d["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"}
            for c in s.get("conditions") or []
        ]
        return d

    return strip(old) == strip(new)


def noop(api: client.ApiClient, node: bridges.NodeContext) -> int:
    """Print what the agent would change on this node and the files it would write."""
    core = client.CoreV1Api(api)
    try:
        md = core.read_node(node.name).metadata
        labels = dict((md.labels if md else None) or {})
    except client.ApiException:
        labels = {}
    objs = kube.Objects(api, vocab.OVS_BRIDGE).list()["items"]
    any_change = False
    for obj in objs:
        try:
            desired = bridges.DesiredBridge.for_node(obj, node.name, labels)
        except bridges.InvalidBridge as exc:
            print(f"OvsBridge {obj['metadata']['name']}: invalid: {exc}")
            continue
        if desired is None:
            print(f"OvsBridge {obj['metadata']['name']}: does not select node {node.name}")
            continue
        p = bridges.plan(desired, node)
        any_change |= not p.empty
        print(f"OvsBridge {obj['metadata']['name']}:")
        print(bridges.format_plan(p))
    if not objs:
        print("no OvsBridge objects in the cluster")
    print("no changes" if not any_change else "(noop: nothing was changed)")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``underlay agent``; returns an exit code."""
    api = kube.api_client(args.kubeconfig, args.context)
    ovs_api = ovsdb.connect(args.ovsdb)
    node = bridges.NodeContext(
        name=args.node_name, ovsdb=ovs_api, root=args.root, api_server=api_server_address(api)
    )
    if args.noop:
        return noop(api, node)
    from node_agent.cni.install import install_shims
    from node_agent.cni.server import CniAgent, CniServer

    if args.cni_bin_dir:
        for path in install_shims(args.cni_bin_dir, args.socket, python=args.cni_python):
            log.info("installed CNI plugin %s", path)
    server = CniServer(args.socket, CniAgent(args.node_name, ovs_api=ovs_api, kube=api))
    server.start()
    log.info("serving CNI on %s for node %s", args.socket, args.node_name)
    agent = BridgeAgent(api, node, resync=args.resync, run_probes=not args.no_probe)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    try:
        if args.no_bridges:
            agent.stopping.wait()
        else:
            agent.run()
    except KeyboardInterrupt:
        pass
    finally:
        agent.stop()
        server.stop()
        ovsdb.disconnect(ovs_api)
    log.info("agent on %s stopped", args.node_name)
    return 0
