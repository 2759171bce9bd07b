"""deploy/rbac.yaml lets the reconciler and the agent do what they do, and grants nothing the
reconciler does not use.

The real kube-apiserver enforces the RBAC: the reconciler runs as its ServiceAccount (``underlay
reconcile --leader-elect``, then ``underlay apply`` and ``underlay plan``) through a scenario that
exercises every kind of write it makes (create, update, drift revert, prune, pool status counts,
GitSync status, Events, Lease, annotation watch), and the agent's Kubernetes-only parts (IPAM
allocate/check/release, IPAM GC, rollout slot Leases) run in-process as the agent's
ServiceAccount; no request may be answered 403. What the server cannot say is whether a grant
is needed: each request in the fault proxy's log is turned into the RBAC attributes the API
server authorizes (verb, API group, resource, subresource, namespace, name), and every grant of
the reconciler's roles must be used by one. The mapping itself is checked against the server's
own authorizer (SubjectAccessReview). Sources: Kubernetes "Authorization" (request attributes,
verbs from HTTP methods) and "Using RBAC Authorization"; server-side apply that creates needs
``create`` as well as ``patch``.
"""

from __future__ import annotations

import datetime as dt
import re
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from reconciler import kube as rk
from reconciler import vocab
from reconciler.status import ANNO_RECONCILE_REQUESTED
from tests.controlplane.cluster import AGENT_SA, RECONCILER_SA, Kube
from tests.controlplane.proxy import RequestRecord
from tests.integration.test_reconcile import UNDERLAY, Process, pool_ips, wait_for
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


def allowed(kube: Kube, service_account: tuple[str, str], a: Attrs) -> bool:
    """What the real authorizer says about ``a`` for ``service_account`` (namespace, name):
    a SubjectAccessReview, as ``kubectl auth can-i --as`` asks it."""
    ns, name = service_account
    attrs: dict[str, Any] = {"verb": a.verb, "group": a.group, "resource": a.resource}
    if a.subresource:
        attrs["subresource"] = a.subresource
    if a.namespace:
        attrs["namespace"] = a.namespace
    if a.name:
        attrs["name"] = a.name
    body = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{ns}:{name}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}",
                       "system:authenticated"],
            "resourceAttributes": attrs,
        },
    }  # fmt: skip
    out = rk.request(kube.api, "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body)
    return bool(out["status"].get("allowed"))


def forbidden(requests: Iterable[RequestRecord]) -> list[str]:
    """Requests the API server answered 403 Forbidden."""
    return [f"{r.method} {r.path}" for r in requests if r.code == 403]


def test_the_attribute_mapping(kube: Kube) -> None:
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
    # the rules as read from deploy/rbac.yaml decide as the server's authorizer does
    rules = rules_for("underlay-reconciler")
    cases = [
        ("GET", "/api/v1/namespaces/underlay-system/secrets/other", False),
        ("GET", "/api/v1/namespaces/underlay-system/secrets/underlay-git-credentials", True),
        ("POST", "/api/v1/namespaces/default/events", False),  # only in its own namespace
        ("POST", "/api/v1/namespaces/underlay-system/events", True),
        ("PUT", "/apis/spiderpool.spidernet.io/v2beta1/spiderippools/p/status", True),
        ("PUT", "/apis/spiderpool.spidernet.io/v2beta1/spiderippools/p", False),
        ("GET", "/apis/underlay.dev/v1alpha1/ovsbridges/br1", False),
    ]
    for method, path, expect in cases:
        (a,) = attributes(rec(method, path))
        assert (not denied([rec(method, path)], rules)) is expect, str(a)
        assert allowed(kube, RECONCILER_SA, a) is expect, f"the server disagrees: {a}"


def test_reconciler_rbac_covers_every_request_and_nothing_more(world: World) -> None:
    w = world
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
                 "--namespace", NS, "--cache-dir", str(w.tmp / "c")],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert r.returncode in (0, 1), r.stderr
        ours = [r for r in w.requests() if r.user_agent.startswith("underlay/")]
        assert len(ours) > 50
        assert forbidden(ours) == [], "the API server refused these with deploy/rbac.yaml"
        assert "forbidden" not in p.log.read_text().lower()
        # the mapping below is at least as strict as the server: what it allowed, it allows
        rules = rules_for("underlay-reconciler")
        assert denied([r for r in ours if r.code and r.code < 400], rules) == []
        # least privilege: every grant is used (the Git credentials Secret is read on every
        # fetch, absent here), except the pool re-read after a 409 Conflict on its status
        # counts (the agents' IPAM writing at the same moment), which this scenario cannot time
        assert unused(ours, rules) <= {("spiderpool.spidernet.io", "spiderippools", "get")}
    finally:
        for proc in procs:
            proc.stop(signal.SIGKILL)


def test_agent_ipam_and_rollout_requests_are_covered(kube: Kube, tmp_path: Path) -> None:
    from node_agent import ipam_gc, rollout
    from node_agent.ipam import Ipam, IpamRequest

    api = rk.api_client(str(kube.agent_kubeconfig(tmp_path / "agent.kubeconfig")))
    api.user_agent = "underlay-agent-test"
    core = kube.core
    kube.create_node("n1")
    rk.Objects(kube.api, vocab.SPIDER_IPPOOL).create(
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
    wait_for(lambda: not core.list_namespaced_pod("default", field_selector="metadata.name=b").items,
             30, "pod b deleted")  # fmt: skip
    ipam_gc.collect(api)
    slots = rollout.Slots(api, NS, "n1")
    slot, _ = slots.acquire("br1", 1)
    assert slot is not None
    slots.release(slot)
    ours = [r for r in kube.requests() if r.user_agent == "underlay-agent-test"]
    kinds = {re.sub(r"/[^/]+$", "", r.path) for r in ours}
    assert any("leases" in k for k in kinds) and any("spiderendpoints" in k for k in kinds)
    assert forbidden(ours) == [], "the API server refused these with deploy/rbac.yaml"
    pool_live = rk.Objects(kube.api, vocab.SPIDER_IPPOOL).get("p")
    assert pool_live["status"]["allocatedIPCount"] == 0, "GC released b's address"


def test_agent_daemon_calls_are_granted(kube: Kube) -> None:
    """The daemon's own calls (bridges, enactments, Node) need OVS to run; their verbs, read
    from node_agent/daemon.py, must be granted: the server's authorizer says so."""
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
        Attrs("create", "", "events", "", "default", None),  # Warning NetdevDatapath
    ]
    missing = [str(a) for a in needed if not allowed(kube, AGENT_SA, a)]
    assert missing == []
    # and nothing more than deploy/ says: not the other kinds' writes, not Secrets
    for a in (
        Attrs("patch", "underlay.dev", "ovsbridges", "", None, "br1"),
        Attrs("get", "", "secrets", "", NS, "underlay-git-credentials"),
        Attrs("update", "", "nodes", "", None, "n1"),
    ):
        assert not allowed(kube, AGENT_SA, a), str(a)
    src = (ROOT / "node-agent/node_agent/daemon.py").read_text()
    assert 'EVENT_NAMESPACE = "default"' in src
    rules = rules_for("underlay-agent")
    assert not any(
        r.allows(Attrs("create", "", "events", "", "underlay-system", None)) for r in rules
    ), "the agent's Events go to default only"
    for call in ("read_node(", "read_node_status(", "patch_node_status(", "list_node"):
        assert call in src, f"daemon.py no longer calls {call}: update this list and the RBAC"
