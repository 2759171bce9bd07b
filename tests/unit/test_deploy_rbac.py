"""deploy/rbac.yaml covers every request the code sends, and grants nothing the reconciler
does not use.

The reconciler runs as a process (``underlay reconcile --leader-elect``, then ``underlay apply``
and ``underlay plan``) through a scenario that exercises every kind of write it makes (create,
update, drift revert, prune, pool status counts, GitSync status, Events, Lease, annotation
watch); the agent's Kubernetes-only parts (IPAM allocate/check/release, IPAM GC, rollout slot
Leases) run in-process. Each request in the emulator's log is turned into the RBAC attributes
the API server authorizes (verb, API group, resource, subresource, namespace, name) and checked
against the ServiceAccount's ClusterRole and Role, as the RBAC authorizer does.
Source: Kubernetes "Authorization" (request attributes, verbs from HTTP methods) and "Using
RBAC Authorization"; server-side apply that creates needs ``create`` as well as ``patch``.
"""

from __future__ import annotations

import datetime as dt
import re
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from reconciler import kube, vocab
from reconciler.status import ANNO_RECONCILE_REQUESTED
from tests.integration.test_reconcile import UNDERLAY, Process, pool_ips, wait_for
from tests.kube.emulator import RequestRecord
from tests.unit.test_apply import NS, QUICK, World, pool

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Attrs:
    """The RBAC request attributes of one API request."""

    verb: str
    group: str
    resource: str
    subresource: str
    namespace: str | None
    name: str | None

    def __str__(self) -> str:
        res = self.resource + (f"/{self.subresource}" if self.subresource else "")
        where = f" in {self.namespace}" if self.namespace else ""
        return f"{self.verb} {self.group or 'core'}/{res} {self.name or ''}{where}"


def attributes(r: RequestRecord) -> list[Attrs]:
    """RBAC attributes of a request (two for a server-side apply that created the object)."""
    parts = [p for p in r.path.split("/") if p]
    if parts[0] == "api":
        group, rest = "", parts[2:]
    elif parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        return []
    ns = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        ns, rest = rest[1], rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else ""
    if r.method == "GET":
        verb = "get" if name else ("watch" if r.params.get("watch") in ("true", "1") else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(r.method, "")
        if r.method == "DELETE":
            verb = "delete" if name else "deletecollection"
    out = [Attrs(verb, group, resource, sub, ns, name)]
    if verb == "patch" and r.content_type == "application/apply-patch+yaml" and r.code == 201:
        out.append(Attrs("create", group, resource, sub, ns, name))
    return out


@dataclass(frozen=True)
class Rule:
    groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    names: frozenset[str]
    namespace: str | None  # None: cluster-wide (ClusterRoleBinding)

    def allows(self, a: Attrs) -> bool:
        res = a.resource + (f"/{a.subresource}" if a.subresource else "")
        return (
            a.group in self.groups
            and res in self.resources
            and a.verb in self.verbs
            and (not self.names or a.name in self.names)
            and (self.namespace is None or a.namespace == self.namespace)
        )


def rules_for(service_account: str) -> list[Rule]:
    """The rules bound to ``service_account`` by the bindings in deploy/rbac.yaml."""
    objs = [d for d in yaml.safe_load_all((ROOT / "deploy/rbac.yaml").read_text()) if d]
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in objs}
    out = []
    for b in objs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == service_account for s in b["subjects"]
        ):
            continue
        ns = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        ref = b["roleRef"]
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        for r in role["rules"]:
            out.append(
                Rule(
                    frozenset(r["apiGroups"]),
                    frozenset(r["resources"]),
                    frozenset(r["verbs"]),
                    frozenset(r.get("resourceNames") or []),
                    ns,
                )
            )
    return out


def denied(requests: Iterable[RequestRecord], rules: list[Rule]) -> list[str]:
    return sorted(
        {str(a) for r in requests for a in attributes(r) if not any(x.allows(a) for x in rules)}
    )


def unused(requests: Iterable[RequestRecord], rules: list[Rule]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) granted but never used by ``requests``."""
    used = {
        (a.group, a.resource + (f"/{a.subresource}" if a.subresource else ""), a.verb)
        for r in requests
        for a in attributes(r)
    }
    granted = {(g, res, v) for x in rules for g in x.groups for res in x.resources for v in x.verbs}
    return granted - used


def test_the_attribute_mapping() -> None:
    def rec(method: str, path: str, **kw: Any) -> RequestRecord:
        return RequestRecord(method, path, "", kw.pop("params", {}), kw.pop("ctype", ""),
                             kw.pop("code", 200), "", 0.0)  # fmt: skip

    assert [str(a) for a in attributes(rec("GET", "/api/v1/namespaces/x/pods/p"))] == [
        "get core/pods p in x"
    ]
    assert [str(a) for a in attributes(rec("GET", "/api/v1/nodes", params={"watch": "true"}))] == [
        "watch core/nodes "
    ]
    apply = rec("PATCH", "/apis/g.io/v1/things/t", ctype="application/apply-patch+yaml", code=201)
    assert [str(a) for a in attributes(apply)] == ["patch g.io/things t", "create g.io/things t"]
    assert [str(a) for a in attributes(rec("PUT", "/apis/g.io/v1/things/t/status"))] == [
        "update g.io/things/status t"
    ]
    rules = rules_for("underlay-reconciler")
    assert denied([rec("GET", "/api/v1/namespaces/underlay-system/secrets/other")], rules) == [
        "get core/secrets other in underlay-system"
    ]
    assert (
        denied(
            [rec("GET", "/api/v1/namespaces/underlay-system/secrets/underlay-git-credentials")],
            rules,
        )
        == []
    )
    assert denied([rec("POST", "/api/v1/namespaces/default/events")], rules) == [
        "create core/events  in default"
    ], "events only in the reconciler's own namespace"


def test_reconciler_rbac_covers_every_request_and_nothing_more(tmp_path: Path) -> None:
    w = World(tmp_path)
    procs: list[Process] = []
    try:
        w.commit({**QUICK, "pool-b.yaml": pool("pool-b", 2)})
        p = Process(w, "--repo", str(w.origin_dir), "--interval", "1s", "--leader-elect",
                    "--leader-elect-lease-duration", "3s", "--leader-elect-renew-deadline", "2s",
                    "--leader-elect-retry-period", "0.5s", identity="rbac")  # fmt: skip
        procs.append(p)
        wait_for(lambda: pool_ips(w, "pool-b"), 30, f"first apply ({p.log})")
        # drift (changed and deleted), then an update and the prune of every other kind
        w.custom.patch_cluster_custom_object(
            "spiderpool.spidernet.io", "v2beta1", "spiderippools", "pool-a",
            {"spec": {"gateway": "10.1.0.254"}},
        )  # fmt: skip
        w.custom.delete_cluster_custom_object("underlay.dev", "v1alpha1", "ovsbridges", "br1")
        try:
            wait_for(lambda: w.get(vocab.OVS_BRIDGE, "br1"), 60, "drift reverted")
        except AssertionError:  # seen once in a loaded CI run: keep what the reconciler said
            raise AssertionError(f"drift not reverted; log:\n{p.log.read_text()[-6000:]}") from None
        w.commit({
            "pool-a.yaml": pool("pool-a", 1, ips="10-30"), "pool-b.yaml": None,
            "smc.yaml": None, "bridge.yaml": None,
        })  # fmt: skip
        wait_for(lambda: w.get(vocab.OVS_BRIDGE, "br1") is None, 30, "prune")
        when = dt.datetime.now(dt.UTC).isoformat()
        w.custom.patch_namespaced_custom_object(
            "underlay.dev", "v1alpha1", NS, "gitsyncs", "underlay",
            {"metadata": {"annotations": {ANNO_RECONCILE_REQUESTED: when}}},
        )  # fmt: skip
        wait_for(lambda: w.status().get("lastHandledReconcileAt") == when, 30, "annotation")
        w.commit({"pool-a.yaml": pool("pool-a", 1, gateway="192.168.0.1")})
        wait_for(lambda: w.condition("Ready").get("reason") == "ValidationFailed", 30, "invalid")
        assert p.stop(signal.SIGTERM) == 0  # releases the Lease
        for cmd in ("plan", "apply"):
            r = subprocess.run(
                [UNDERLAY, cmd, "--repo", str(w.origin_dir), "--kubeconfig", w.kubeconfig,
                 "--namespace", NS, "--cache-dir", str(tmp_path / "c")],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert r.returncode in (0, 1), r.stderr
        ours = [r for r in w.emu.requests() if r.user_agent.startswith("underlay/")]
        assert len(ours) > 50
        rules = rules_for("underlay-reconciler")
        assert denied(ours, rules) == []
        # least privilege: every grant is used (the Git credentials Secret is read on every
        # fetch, absent here), except the pool re-read after a 409 Conflict on its status
        # counts (the agents' IPAM writing at the same moment), which this scenario cannot time
        assert unused(ours, rules) <= {("spiderpool.spidernet.io", "spiderippools", "get")}
    finally:
        for proc in procs:
            proc.stop(signal.SIGKILL)
        w.stop()


def test_agent_ipam_and_rollout_requests_are_covered(tmp_path: Path) -> None:
    from node_agent import ipam_gc, rollout
    from node_agent.ipam import Ipam, IpamRequest

    w = World(tmp_path)
    try:
        api = kube.api_client(w.kubeconfig)
        api.user_agent = "underlay-agent-test"
        core = client.CoreV1Api(w.api)
        core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
        kube.Objects(w.api, vocab.SPIDER_IPPOOL).create(
            {"apiVersion": vocab.SPIDERPOOL_API_VERSION, "kind": "SpiderIPPool",
             "metadata": {"name": "p"},
             "spec": {"subnet": "10.9.0.0/16", "ips": ["10.9.0.10-10.9.0.20"]}}
        )  # fmt: skip
        uids = {}
        for name in ("a", "b"):
            pod = core.create_namespaced_pod(
                "default",
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                 "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]}},
            )  # fmt: skip
            uids[name] = pod.metadata.uid
        ipam = Ipam(api, "n1")

        def req(name: str) -> IpamRequest:
            return IpamRequest("default", name, uids[name], f"cid-{name}", "eth0",
                               {"default_ipv4_ippool": ["p"]})  # fmt: skip

        for name in ("a", "b"):
            ipam.allocate(req(name))
        ipam.check(req("a"))
        ipam.release(req("a"))
        core.delete_namespaced_pod("b", "default", grace_period_seconds=0)
        ipam_gc.collect(api)
        slots = rollout.Slots(api, NS, "n1")
        slot, _ = slots.acquire("br1", 1)
        assert slot is not None
        slots.release(slot)
        ours = [r for r in w.emu.requests() if r.user_agent == "underlay-agent-test"]
        kinds = {re.sub(r"/[^/]+$", "", r.path) for r in ours}
        assert any("leases" in k for k in kinds) and any("spiderendpoints" in k for k in kinds)
        assert denied(ours, rules_for("underlay-agent")) == []
    finally:
        w.stop()


def test_agent_daemon_calls_are_granted() -> None:
    """The daemon's own calls (bridges, enactments, Node) need OVS to run; their verbs, read
    from node_agent/daemon.py, must be granted."""
    rules = rules_for("underlay-agent")
    needed = [
        Attrs("list", "underlay.dev", "ovsbridges", "", None, None),
        Attrs("watch", "underlay.dev", "ovsbridges", "", None, None),
        Attrs("list", "underlay.dev", "ovsbridgeenactments", "", None, None),
        Attrs("get", "underlay.dev", "ovsbridgeenactments", "", None, "n1.br1"),
        Attrs("create", "underlay.dev", "ovsbridgeenactments", "", None, None),
        Attrs("delete", "underlay.dev", "ovsbridgeenactments", "", None, "n1.br1"),
        Attrs("update", "underlay.dev", "ovsbridgeenactments", "status", None, "n1.br1"),
        Attrs("get", "", "nodes", "", None, "n1"),
        Attrs("list", "", "nodes", "", None, None),
        Attrs("watch", "", "nodes", "", None, None),
        Attrs("get", "", "nodes", "status", None, "n1"),
        Attrs("patch", "", "nodes", "status", None, "n1"),
    ]
    missing = [str(a) for a in needed if not any(r.allows(a) for r in rules)]
    assert missing == []
    src = (ROOT / "node-agent/node_agent/daemon.py").read_text()
    for call in ("read_node(", "read_node_status(", "patch_node_status(", "list_node"):
        assert call in src, f"daemon.py no longer calls {call}: update this list and the RBAC"
    time.sleep(0)
