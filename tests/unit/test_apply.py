"""Apply, prune, drift and status against the real control plane, from real Git repositories.

Every test drives :class:`reconciler.controller.Reconciler` (what ``underlay apply`` and
``underlay reconcile`` run) over a Git repository with real commits, against kube-apiserver,
kube-controller-manager and etcd (tests/controlplane) as the reconciler's ServiceAccount, and
checks the cluster, the GitSync status, the Events and the fault proxy's request log (what was
written, in which order, with or without dryRun).
"""

from __future__ import annotations

import copy
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import git
import yaml
from kubernetes import client

from reconciler import kube, vocab
from reconciler.controller import GitSource, Options, PassReport, Reconciler
from reconciler.plan import Op, format_plan
from reconciler.retry import RetryPolicy
from tests.controlplane.cluster import Kube
from tests.controlplane.proxy import RequestRecord

ROOT = Path(__file__).resolve().parents[2]
NS = "underlay-system"

BRIDGE = """\
apiVersion: underlay.dev/v1alpha1
kind: OvsBridge
metadata:
  name: br1
spec:
  uplinks: [eth0]
"""


def pool(name: str, third: int, ips: str = "10-20", gateway: str | None = None) -> str:
    first, last = ips.split("-")
    gw = gateway or f"10.{third}.0.1"
    return textwrap.dedent(f"""\
        apiVersion: spiderpool.spidernet.io/v2beta1
        kind: SpiderIPPool
        metadata:
          name: {name}
        spec:
          subnet: 10.{third}.0.0/16
          ips: ["10.{third}.0.{first}-10.{third}.0.{last}"]
          gateway: {gw}
        """)


def smc(name: str, pool_name: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: spiderpool.spidernet.io/v2beta1
        kind: SpiderMultusConfig
        metadata:
          name: {name}
          namespace: kube-system
        spec:
          cniType: ovs
          ovs:
            bridge: br1
            ippools:
              ipv4: [{pool_name}]
        """)


class World:
    """The real control plane as the reconciler's tests see it (see tests/controlplane: CRDs
    from deploy/crds, namespace underlay-system, deploy/rbac.yaml) and an origin Git repository.

    :meth:`reconciler` builds the controller the CLI builds, authenticated as the reconciler's
    ServiceAccount (exactly deploy/rbac.yaml) through the test's fault proxy, whose request log
    :meth:`writes` reads. :attr:`api`, :attr:`core` and :attr:`custom` are the admin, straight
    to the server, for setup and assertions (never logged)."""

    def __init__(self, kube: Kube, tmp: Path) -> None:
        self.tmp = tmp
        self.kube = kube
        self.kubeconfig = str(kube.reconciler_kubeconfig(tmp / "reconciler.kubeconfig"))
        self.api = kube.api
        self.core = kube.core
        self.custom = kube.custom
        self.origin_dir = tmp / "origin"
        self.repo = git.Repo.init(self.origin_dir, initial_branch="main")
        with self.repo.config_writer() as cw:
            cw.set_value("user", "name", "Operator")
            cw.set_value("user", "email", "ops@example.com")
        self.lines: list[str] = []

    def commit(self, files: dict[str, str | None], message: str = "change") -> str:
        """Write (or, for None, delete) files in the origin and commit; returns the SHA."""
        for name, text in files.items():
            path = self.origin_dir / name
            if text is None:
                self.repo.index.remove([name], working_tree=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            self.repo.index.add([name])
        return str(self.repo.index.commit(message).hexsha)

    def reconciler(self, *, timeout: float = 5.0, **kw: Any) -> Reconciler:
        opts = Options(namespace=NS, identity="test", **kw)
        api = kube.api_client(
            self.kubeconfig, retry=RetryPolicy(base=0.05, cap=0.5, timeout=timeout)
        )
        source = GitSource(str(self.origin_dir), "main", cache_dir=self.tmp / "cache")
        return Reconciler(api, source, opts, out=self.lines.append)

    def get(self, res: vocab.Resource, name: str, ns: str | None = None) -> dict[str, Any] | None:
        try:
            return kube.Objects(self.api, res).get(name, ns)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def gitsync(self) -> dict[str, Any]:
        obj = self.get(vocab.GIT_SYNC, "underlay", NS)
        assert obj is not None
        return obj

    def status(self) -> dict[str, Any]:
        return dict(self.gitsync().get("status") or {})

    def condition(self, ctype: str) -> dict[str, Any]:
        """Condition ``ctype`` of the GitSync status ({} before the first status has it)."""
        return next((c for c in self.status().get("conditions") or [] if c["type"] == ctype), {})

    def events(self) -> list[tuple[str, str, str]]:
        """(type, reason, message) of the Events about the GitSync, oldest first."""
        evs = [
            e
            for e in self.core.list_namespaced_event(NS).items
            if e.involved_object.kind == vocab.GIT_SYNC.kind
        ]
        evs.sort(key=lambda e: e.metadata.name)
        return [(e.type, e.reason, e.message) for e in evs]

    def requests(
        self, method: str | None = None, path: str | None = None, *, writes: bool = False
    ) -> list[RequestRecord]:
        """What went through the proxy (the programs under test) since the last reset."""
        return self.kube.requests(method, path, writes=writes)

    def reset_requests(self) -> None:
        self.kube.reset_requests()

    def writes(self, *, dry_run: bool | None = None) -> list[tuple[str, str]]:
        """(method, path) of write requests since the last reset (dry runs included unless
        ``dry_run`` says otherwise)."""
        out = []
        for r in self.kube.requests(writes=True):
            is_dry = "dryRun" in r.params
            if dry_run is None or dry_run == is_dry:
                out.append((r.method, r.path))
        return out

    def labelled(self) -> set[tuple[str, str | None, str]]:
        """Every object in the cluster carrying the instance label, by key."""
        found = kube.observe(self.api, (*vocab.USER_KINDS, vocab.NETWORK_ATTACHMENT_DEFINITION))
        return {
            k
            for k, o in found.items()
            if (o["metadata"].get("labels") or {}).get(vocab.LABEL_INSTANCE) == "underlay"
        }

    def inventory_keys(self) -> set[tuple[str, str | None, str]]:
        return {
            (e["kind"], e.get("namespace"), e["name"]) for e in self.status().get("inventory", [])
        }

    def crd(self, name: str) -> dict[str, Any] | None:
        """The CustomResourceDefinition ``name`` as the server holds it, or None."""
        return crd(self.api, name)

    def delete_crd(self, name: str) -> None:
        """Delete CRD ``name`` (see :func:`delete_crd`)."""
        delete_crd(self.api, name)


def crd(api: Any, name: str) -> dict[str, Any] | None:
    """The CustomResourceDefinition ``name`` as the server holds it, or None."""
    try:
        return _raw(api, "GET", f"{CRD_PATH}/{name}")
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def delete_crd(api: Any, name: str, timeout: float = 60) -> None:
    """Delete a CRD of deploy/crds and wait until its resource is no longer served
    (tests/controlplane's reset installs it again after the test)."""
    _raw(api, "DELETE", f"{CRD_PATH}/{name}")
    plural, group = name.split(".", 1)
    res = next(r for r in vocab.ALL_CUSTOM if (r.plural, r.group) == (plural, group))
    path = f"/apis/{res.group}/{res.version}/{res.plural}"
    _wait(
        lambda: crd(api, name) is None and _status_of(api, path) == 404, timeout, f"CRD {name} gone"
    )


CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def _raw(api: Any, method: str, path: str, body: Any = None) -> Any:
    """One admin request by path (JSON); ApiException for a non-2xx answer."""
    return kube.request(api, method, path, body)


def _status_of(api: Any, path: str) -> int:
    try:
        _raw(api, "GET", path)
    except client.ApiException as exc:
        return int(exc.status)
    return 200


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


QUICK = {
    "bridge.yaml": BRIDGE,
    "pool-a.yaml": pool("pool-a", 1),
    "smc.yaml": smc("net-a", "pool-a"),
}


def applied(rep: PassReport) -> list[str]:
    assert rep.outcome is not None, rep.error
    return [f"{a.op.value} {a.ref()}" for a in rep.outcome.done]


# --- apply -------------------------------------------------------------------------------------


def test_first_pass_dry_runs_everything_then_writes_in_dependency_order(world: World) -> None:
    sha = world.commit(QUICK)
    rec = world.reconciler()
    rep = rec.run_once()
    assert rep.error is None and rep.converged
    assert applied(rep) == [
        "create OvsBridge br1",
        "create SpiderIPPool pool-a",
        "create SpiderMultusConfig kube-system/net-a",
        "create NetworkAttachmentDefinition kube-system/net-a",
    ]
    user = ("ovsbridges", "spiderippools", "spidermultusconfigs", "network-attachment-definitions")
    log = [r for r in world.requests(writes=True) if any(f"/{u}/" in r.path for u in user)]
    dry = [r for r in log if r.params.get("dryRun") == "All"]
    real = [r for r in log if "dryRun" not in r.params and r.method == "PATCH"]
    # the only other write: the pool's status counts (totalIPCount), right after its apply
    (counts,) = [r for r in log if r.method == "PUT"]
    assert counts.path.endswith("/spiderippools/pool-a/status")
    # every object (the NAD too, although its owner SMC did not exist yet) is dry-run first
    assert [next(u for u in user if f"/{u}/" in r.path) for r in dry] == list(user)
    assert max(r.time for r in dry) <= min(r.time for r in real)
    # pools before the Multus config that uses them; server-side apply as field manager underlay
    assert [next(u for u in user if f"/{u}/" in r.path) for r in real] == list(user)
    assert all(
        r.method == "PATCH"
        and r.content_type == "application/apply-patch+yaml"
        and r.params.get("fieldManager") == "underlay"
        and r.params.get("force") == "true"
        for r in real
    )
    nad = world.get(vocab.NETWORK_ATTACHMENT_DEFINITION, "net-a", "kube-system")
    smc_live = world.get(vocab.SPIDER_MULTUS_CONFIG, "net-a", "kube-system")
    assert nad is not None and smc_live is not None
    assert [r["uid"] for r in nad["metadata"]["ownerReferences"]] == [smc_live["metadata"]["uid"]]
    st = world.status()
    assert st["lastAppliedRevision"] == st["lastAttemptedRevision"] == sha
    assert world.inventory_keys() == world.labelled()
    assert world.events() == [
        ("Normal", "Applied", f"revision {sha}: 4 created, 0 updated, 0 pruned")
    ]

    # a pass over the same revision writes nothing at all: no object, no status, no Event
    world.reset_requests()
    again = rec.run_once()
    assert again.skipped_pipeline and again.outcome is None and again.converged
    assert not again.quiet, "the first pass after writes plans again"
    # nothing changed since a pass that wrote nothing: answered without diffing anything
    third = rec.run_once()
    assert third.quiet and third.converged and third.plan is again.plan
    assert world.writes() == []
    # nor does a fresh process (no cache), although server defaults were added to the objects
    assert smc_live["spec"].get("enableCoordinator") is True, "the CRD default was applied"
    fresh = world.reconciler().run_once()
    assert not fresh.skipped_pipeline and fresh.outcome is None and fresh.converged
    assert world.writes() == []


def test_dry_run_rejection_applies_nothing(world: World) -> None:
    """A NAD the API server refuses (here: a stricter CRD, as an admission policy would) stops
    the pass before the first write, although its owner is new in the same pass."""
    crd = yaml.safe_load(
        (ROOT / "deploy/crds/network-attachment-definitions.k8s.cni.cncf.io.yaml").read_text()
    )
    strict = copy.deepcopy(crd)
    props = strict["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    props["spec"]["properties"]["config"]["maxLength"] = 20
    live = world.crd(crd["metadata"]["name"])
    assert live is not None
    strict["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
    _raw(world.api, "PUT", f"{CRD_PATH}/{crd['metadata']['name']}", strict)
    # the server serves the new schema a moment after the update (its CRD handler is
    # rebuilt asynchronously): wait until it refuses a long config
    nad = vocab.NETWORK_ATTACHMENT_DEFINITION
    probe = {"apiVersion": vocab.NAD_API_VERSION, "kind": nad.kind,
             "metadata": {"name": "probe", "namespace": "kube-system"},
             "spec": {"config": "x" * 21}}  # fmt: skip

    def refused() -> bool:
        try:
            world.custom.create_namespaced_custom_object(
                nad.group, nad.version, "kube-system", nad.plural, probe, dry_run="All"
            )
        except client.ApiException as exc:
            return exc.status == 422
        return False

    _wait(refused, 30, "the stricter schema to be served")
    world.commit(QUICK)
    world.reset_requests()
    rep = world.reconciler().run_once()
    assert rep.reason == "DryRunFailed" and rep.outcome is not None
    ((a, msg),) = rep.outcome.dry_run_failed
    assert a.ref() == "NetworkAttachmentDefinition kube-system/net-a" and "422" in msg
    user_writes = [
        w for w in world.writes(dry_run=False) if "gitsyncs" not in w[1] and "events" not in w[1]
    ]
    assert user_writes == []
    assert world.get(vocab.OVS_BRIDGE, "br1") is None
    assert world.get(vocab.SPIDER_IPPOOL, "pool-a") is None
    ready, stalled = world.condition("Ready"), world.condition("Stalled")
    assert ready["status"] == "False" and ready["reason"] == "DryRunFailed"
    assert "NetworkAttachmentDefinition kube-system/net-a" in ready["message"]
    assert stalled["status"] == "True"
    assert world.inventory_keys() == set()


def test_missing_crd_is_named_and_nothing_is_written(world: World) -> None:
    world.delete_crd("ovsbridges.underlay.dev")
    world.commit(QUICK)
    rep = world.reconciler().run_once()
    assert rep.reason == "MissingCRD"
    assert rep.error is not None and "ovsbridges.underlay.dev" in rep.error
    assert "install the CustomResourceDefinition" in rep.error
    assert world.get(vocab.SPIDER_IPPOOL, "pool-a") is None
    ready = world.condition("Ready")
    assert ready["reason"] == "MissingCRD" and "ovsbridges.underlay.dev" in ready["message"]
    assert world.condition("Stalled")["status"] == "True"
    assert ("Warning", "MissingCRD", ready["message"]) in world.events()
    # a repository without OvsBridge does not need that CRD
    world.commit({"bridge.yaml": None, "smc.yaml": None})
    ok = world.reconciler().run_once()
    assert ok.error is None and ok.converged, ok.error
    assert world.get(vocab.SPIDER_IPPOOL, "pool-a") is not None


# --- prune -------------------------------------------------------------------------------------


def test_prune_deletes_only_inventoried_objects_that_carry_our_labels(world: World) -> None:
    world.commit({**QUICK, "pool-b.yaml": pool("pool-b", 2)})
    rec = world.reconciler()
    assert rec.run_once().converged
    # someone copies our labels onto their own pool; someone else strips them off pool-a
    copied = yaml.safe_load(pool("copied", 3))
    copied["metadata"]["labels"] = {
        vocab.LABEL_INSTANCE: "underlay",
        vocab.LABEL_MANAGED_BY: "underlay",
    }
    kube.Objects(world.api, vocab.SPIDER_IPPOOL).create(copied)
    world.commit({"pool-b.yaml": None, "pool-a.yaml": None, "smc.yaml": None})
    world.custom.patch_cluster_custom_object(
        "spiderpool.spidernet.io", "v1alpha1" if False else "v2beta1", "spiderippools", "pool-a",
        {"metadata": {"labels": {vocab.LABEL_INSTANCE: None}}},
    )  # fmt: skip
    rep = rec.run_once()
    assert rep.error is None, rep.error
    assert sorted(applied(rep)) == [
        "prune NetworkAttachmentDefinition kube-system/net-a",
        "prune SpiderIPPool pool-b",
        "prune SpiderMultusConfig kube-system/net-a",
    ]
    assert world.get(vocab.SPIDER_IPPOOL, "copied") is not None
    assert world.get(vocab.SPIDER_IPPOOL, "pool-a") is not None
    assert rep.plan is not None
    assert ("SpiderIPPool", None, "copied") in rep.plan.not_in_inventory
    assert world.inventory_keys() == {("OvsBridge", None, "br1")}


def test_failed_delete_stays_in_the_inventory_and_is_retried(world: World) -> None:
    world.commit({**QUICK, "pool-b.yaml": pool("pool-b", 2)})
    rec = world.reconciler()
    assert rec.run_once().converged
    world.commit({"pool-b.yaml": None})
    world.kube.inject_fault(r"/spiderippools/pool-b$", method="DELETE", status=500, count=50)
    rep = rec.run_once()
    assert rep.reason == "ApplyFailed"
    assert rep.outcome is not None and [a.ref() for a, _ in rep.outcome.failed] == [
        "SpiderIPPool pool-b"
    ]
    assert ("SpiderIPPool", None, "pool-b") in world.inventory_keys()
    assert world.condition("Ready")["reason"] == "ApplyFailed"
    assert world.condition("Reconciling")["status"] == "True"
    assert world.status()["lastAppliedRevision"] != world.status()["lastAttemptedRevision"]
    world.kube.clear_faults()
    rep = rec.run_once()
    assert rep.converged and applied(rep) == ["prune SpiderIPPool pool-b"]
    assert world.get(vocab.SPIDER_IPPOOL, "pool-b") is None
    assert world.inventory_keys() == world.labelled()
    assert world.condition("Ready")["status"] == "True"


def test_empty_revision_prunes_nothing_unless_allow_empty(world: World) -> None:
    world.commit(QUICK)
    assert world.reconciler().run_once().converged
    world.commit({name: None for name in QUICK} | {"README.md": "emptied\n"})
    rep = world.reconciler().run_once()
    assert rep.outcome is None and rep.plan is not None
    assert {a.op for a in rep.plan.actions} == {Op.BLOCKED}
    assert "--allow-empty" in format_plan(rep.plan)
    assert world.get(vocab.OVS_BRIDGE, "br1") is not None
    assert world.condition("Ready")["reason"] == "Blocked"
    assert len(world.status()["blocked"]) == 4
    rep = world.reconciler(allow_empty=True).run_once()
    assert rep.converged and len(applied(rep)) == 4
    assert world.labelled() == set() and world.inventory_keys() == set()


def test_pool_with_allocations_is_neither_pruned_nor_shrunk(world: World) -> None:
    world.commit({"pool-a.yaml": pool("pool-a", 1)})
    rec = world.reconciler()
    assert rec.run_once().converged
    live = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert live is not None
    records = {"10.1.0.19": {"pod": "default/web-0", "podUid": "u-web-0"}}
    live["status"] = {
        "allocatedIPs": json.dumps(records), "allocatedIPCount": 1, "totalIPCount": 11,
    }  # fmt: skip
    kube.Objects(world.api, vocab.SPIDER_IPPOOL).replace_status(live)
    world.commit({"pool-a.yaml": pool("pool-a", 1, ips="10-15")}, "shrink")
    rep = rec.run_once()
    assert rep.plan is not None and rep.outcome is None
    (a,) = rep.plan.blocked
    assert a.blocked_op is Op.UPDATE
    assert "would remove allocated IPs from the pool: 10.1.0.19 (default/web-0)" in a.reason
    assert "[update blocked: would remove allocated IPs" in format_plan(rep.plan)
    (b,) = world.status()["blocked"]
    assert b == {"kind": "SpiderIPPool", "name": "pool-a", "op": "update", "reason": a.reason}
    world.commit({"pool-a.yaml": None, "keep.yaml": BRIDGE}, "drop the pool")
    rep = rec.run_once()
    assert rep.plan is not None
    (a,) = rep.plan.blocked
    assert (
        a.blocked_op is Op.PRUNE and "still has 1 allocated IP(s) (pods default/web-0)" in a.reason
    )
    assert world.get(vocab.SPIDER_IPPOOL, "pool-a") is not None
    assert ("SpiderIPPool", None, "pool-a") in world.inventory_keys()
    ready = world.condition("Ready")
    assert ready["reason"] == "Blocked" and "still has 1 allocated IP(s)" in ready["message"]
    assert ("Warning", "Blocked", ready["message"]) in world.events()


# --- drift -------------------------------------------------------------------------------------


def _hand_edit_gateway(world: World, value: str) -> None:
    world.custom.patch_cluster_custom_object(
        "spiderpool.spidernet.io", "v2beta1", "spiderippools", "pool-a",
        {"spec": {"gateway": value}}, field_manager="kubectl-edit",
    )  # fmt: skip


def test_hand_edit_is_reported_and_reverted_on_the_next_pass(world: World) -> None:
    world.commit(QUICK)
    rec = world.reconciler()
    assert rec.run_once().converged
    assert rec.run_once().outcome is None  # a quiet state
    _hand_edit_gateway(world, "10.1.0.254")
    world.custom.delete_namespaced_custom_object(
        "k8s.cni.cncf.io", "v1", "kube-system", "network-attachment-definitions", "net-a"
    )
    world.reset_requests()
    rep = rec.run_once()
    assert rep.converged and not rep.quiet, rep.error
    assert sorted(applied(rep)) == [
        "create NetworkAttachmentDefinition kube-system/net-a",
        "update SpiderIPPool pool-a",
    ]
    pool_live = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert pool_live is not None and pool_live["spec"]["gateway"] == "10.1.0.1"
    assert world.get(vocab.NETWORK_ATTACHMENT_DEFINITION, "net-a", "kube-system") is not None
    drift = {d["name"]: d for d in world.status()["drift"]}
    assert drift["pool-a"] == {
        "kind": "SpiderIPPool", "name": "pool-a", "reverted": True, "fields": ["spec.gateway"],
    }  # fmt: skip
    assert drift["net-a"]["fields"] == ["deleted in the cluster"] and drift["net-a"]["reverted"]
    (ev,) = [e for e in world.events() if e[1] == "DriftDetected"]
    assert ev[0] == "Warning" and "SpiderIPPool pool-a (spec.gateway)" in ev[2]
    assert "reverted" in ev[2]
    assert any("reverting a change made in the cluster" in line for line in world.lines)
    # the next pass clears the drift report; the one after writes nothing
    rec.run_once()
    assert "drift" not in world.status()
    world.reset_requests()
    assert rec.run_once().outcome is None
    assert world.writes() == []


def test_no_self_heal_reports_drift_without_reverting(world: World) -> None:
    world.commit(QUICK)
    assert world.reconciler().run_once().converged
    _hand_edit_gateway(world, "10.1.0.254")
    rec = world.reconciler(self_heal=False)
    rep = rec.run_once()
    assert rep.outcome is None and rep.plan is not None
    assert [a.op for a in rep.plan.drifted] == [Op.DRIFTED]
    live = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert live is not None and live["spec"]["gateway"] == "10.1.0.254"
    ready = world.condition("Ready")
    assert ready["status"] == "False" and ready["reason"] == "DriftDetected"
    assert world.status()["drift"][0]["reverted"] is False
    assert len([e for e in world.events() if e[1] == "DriftDetected"]) == 1
    world.reset_requests()
    rec.run_once()  # same drift: reported once, no new Event, no write
    assert world.writes() == []
    # a Git change to the object is applied (and overwrites the hand edit)
    world.commit({"pool-a.yaml": pool("pool-a", 1, ips="10-30")})
    rep = rec.run_once()
    assert applied(rep) == ["update SpiderIPPool pool-a"] and rep.converged
    live = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert live is not None and live["spec"]["gateway"] == "10.1.0.1"


# --- status ------------------------------------------------------------------------------------


def test_invalid_revision_stalls_and_the_cluster_keeps_the_last_good_one(world: World) -> None:
    good = world.commit(QUICK)
    rec = world.reconciler()
    assert rec.run_once().converged
    bad = world.commit({"pool-a.yaml": pool("pool-a", 1, gateway="192.168.9.1")}, "typo")
    rep = rec.run_once()
    assert rep.reason == "ValidationFailed" and rep.outcome is None
    live = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert live is not None and live["spec"]["gateway"] == "10.1.0.1"
    st = world.status()
    assert st["lastAppliedRevision"] == good and st["lastAttemptedRevision"] == bad
    ready, stalled, reconciling = (world.condition(t) for t in ("Ready", "Stalled", "Reconciling"))
    assert ready["status"] == "False" and ready["reason"] == "ValidationFailed"
    assert f"revision {bad} has 1 error(s)" in ready["message"]
    assert f"the cluster keeps revision {good}" in ready["message"]
    assert "pool-a.yaml:" in ready["message"] and "192.168.9.1" in ready["message"]
    assert stalled["status"] == "True" and reconciling["status"] == "False"
    assert st["lastError"]["revision"] == bad
    assert st["lastError"]["problems"][0].startswith("pool-a.yaml:")
    assert [e[1] for e in world.events()].count("ValidationFailed") == 1
    # the last good revision is still enforced: drift is reverted while Git is broken
    _hand_edit_gateway(world, "10.1.0.254")
    world.reset_requests()
    rep = rec.run_once()
    assert rep.skipped_pipeline and applied(rep) == ["update SpiderIPPool pool-a"]
    assert [e[1] for e in world.events()].count("ValidationFailed") == 1
    fixed = world.commit({"pool-a.yaml": pool("pool-a", 1, ips="10-25")}, "fix")
    rep = rec.run_once()
    assert rep.converged
    st = world.status()
    assert st["lastAppliedRevision"] == st["lastAttemptedRevision"] == fixed
    assert "lastError" not in st
    assert world.condition("Ready")["status"] == "True"
    assert world.condition("Stalled")["status"] == "False"


def test_status_shape_and_generation(world: World) -> None:
    sha = world.commit(QUICK)
    rec = world.reconciler()
    rec.run_once()
    gs = world.gitsync()
    st = gs["status"]
    assert st["observedGeneration"] == gs["metadata"]["generation"]
    assert st["source"] == {"url": str(world.origin_dir), "ref": "main"}
    assert {c["type"] for c in st["conditions"]} == {"Ready", "Reconciling", "Stalled"}
    for c in st["conditions"]:
        assert c["observedGeneration"] == gs["metadata"]["generation"]
        assert c["lastTransitionTime"].endswith("Z") and c["reason"]
    ready = world.condition("Ready")
    assert ready["message"] == f"Applied revision {sha} (4 objects)"
    inv = st["inventory"]
    assert [e["kind"] for e in inv] == [
        "NetworkAttachmentDefinition", "SpiderIPPool", "SpiderMultusConfig", "OvsBridge",
    ]  # fmt: skip
    live_pool = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert live_pool is not None
    entry = next(e for e in inv if e["kind"] == "SpiderIPPool")
    assert entry["uid"] == live_pool["metadata"]["uid"] and len(entry["digest"]) == 16
    assert gs["metadata"]["labels"][vocab.LABEL_INSTANCE] == "underlay"
    # suspend: no pass at all
    world.custom.patch_namespaced_custom_object(
        "underlay.dev", "v1alpha1", NS, "gitsyncs", "underlay", {"spec": {"suspend": True}}
    )
    world.commit({"pool-b.yaml": pool("pool-b", 2)})
    rep = rec.run_once()
    assert rep.suspended and world.get(vocab.SPIDER_IPPOOL, "pool-b") is None


def test_a_pass_reads_the_whole_gitsync_only_when_it_changed(world: World) -> None:
    """The GitSync holds the inventory (a megabyte with thousands of objects): a pass reads its
    metadata from the server's watch cache and the whole object only when its resourceVersion
    moved, by anyone; a change someone else made is seen by the next pass."""
    world.commit(QUICK)
    rec = world.reconciler()
    assert rec.run_once().converged
    rec.run_once()  # the first pass after writes plans again
    assert rec.run_once().quiet
    path = r"/gitsyncs/underlay$"
    world.reset_requests()
    assert rec.run_once().quiet
    (meta,) = world.requests("GET", path)
    assert meta.params == {"resourceVersion": "0"}, "metadata from the watch cache"
    # someone asks for a pass (the annotation): the next pass reads it whole and handles it
    world.custom.patch_namespaced_custom_object(
        "underlay.dev", "v1alpha1", NS, "gitsyncs", "underlay",
        {"metadata": {"annotations": {"underlay.dev/reconcile-requested-at": "now"}}},
    )  # fmt: skip
    _wait(lambda: rec.gitsync._unchanged() is False, 10, "the watch cache to see the annotation")
    world.reset_requests()
    rep = rec.run_once()
    assert not rep.quiet and world.status()["lastHandledReconcileAt"] == "now"
    full = [r for r in world.requests("GET", path) if "resourceVersion" not in r.params]
    assert len(full) == 1, world.requests("GET", path)


def test_a_status_larger_than_the_server_stores_is_named_not_retried(world: World) -> None:
    """etcd keeps objects up to 1.5 MiB: a GitSync whose inventory lists 12,000 objects is
    refused by the real server (500, "etcdserver: request is too large"); the reconciler says
    so, with what to do, after one try (the same status is as large on every try)."""
    from reconciler.status import GitSyncs, StatusTooLarge

    api = kube.api_client(world.kubeconfig, retry=RetryPolicy(base=0.05, timeout=60))
    gs = GitSyncs(api, NS, "underlay", "underlay")
    gs.ensure()
    entry = {"apiVersion": vocab.SPIDERPOOL_API_VERSION, "kind": "SpiderIPPool",
             "uid": "0b8f5a8e-5d2c-4a57-9d0e-2f1f6f0c1a2b", "digest": "0123456789abcdef"}  # fmt: skip
    big = {"inventory": [{**entry, "name": f"pool-{i:05d}"} for i in range(12000)]}
    world.reset_requests()
    try:
        gs.write(big)
    except StatusTooLarge as exc:
        msg = str(exc)
    else:
        raise AssertionError("the server stored a 2 MiB object")
    assert "12000 inventory entries" in msg and "--instance" in msg, msg
    assert len(world.requests("PUT", r"/gitsyncs/underlay/status$")) == 1
    assert "inventory" not in world.status()
