"""Apply keeps its safety promises at the moment of the write, from real Git repositories
against the real control plane (found by the hostile tester):

- an IP is never handed out twice: a pool that received an allocation after the plan looked
  at it is neither pruned nor shrunk (resourceVersion preconditions, 409 -> judged again);
- a wrong commit never breaks a running pod: a commit whose objects collide with objects this
  instance does not own applies nothing at all; a Multus config never allocates from a pool
  that is not what Git says; an unreadable pool status blocks that pool only, with its name;
- what Git says is what the cluster has: spec fields set by hand that Git leaves unset are
  drift, reverted (and reported), with no endless drift afterwards.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from reconciler import kube, vocab
from reconciler.controller import PassReport
from reconciler.plan import format_plan
from tests.unit.test_apply import BRIDGE, NS, QUICK, World, applied, pool, smc

POOLS = ("spiderpool.spidernet.io", "v2beta1", "spiderippools")


def set_records(world: World, name: str, records: dict[str, Any] | str | None) -> None:
    """Write a pool's allocation records as the agents' IPAM does: status CAS on the read
    resourceVersion (retried on 409)."""
    objs = kube.Objects(world.api, vocab.SPIDER_IPPOOL)
    for _ in range(20):
        live = objs.get(name)
        st = dict(live.get("status") or {})
        st.pop("allocatedIPs", None)
        if isinstance(records, str):
            st["allocatedIPs"] = records
        elif records:
            st["allocatedIPs"] = json.dumps(records)
            st["allocatedIPCount"] = len(records)
        else:
            st["allocatedIPCount"] = 0
        live["status"] = st
        try:
            objs.replace_status(live)
            return
        except kube.client.ApiException as exc:
            if exc.status != 409:
                raise
    raise AssertionError("could not write the pool status")


def web(ip: str, pod: str = "default/web") -> dict[str, Any]:
    return {ip: {"pod": pod, "podUid": "uid-" + pod.split("/")[1]}}


def during_held_request(world: World, rec: Any, path: str, method: str, act: Any) -> PassReport:
    """Run a pass while the API server holds the first ``method`` on ``path`` for a second;
    ``act()`` runs while it is held (after the plan looked at the cluster, before the write
    is carried out)."""
    world.kube.inject_fault(path, method=method, hang=1.0)
    out: dict[str, PassReport] = {}
    t = threading.Thread(target=lambda: out.setdefault("rep", rec.run_once()))
    t.start()
    deadline = time.monotonic() + 20
    while world.kube.faults():  # taken: the request is in flight, held by the API server
        assert time.monotonic() < deadline, "the pass never sent the request"
        time.sleep(0.01)
    act()
    t.join(30)
    return out["rep"]


def test_prune_race_a_pool_allocated_during_the_delete_is_not_deleted(world: World) -> None:
    world.commit({"bridge.yaml": BRIDGE, "pool-a.yaml": pool("pool-a", 1)})
    rec = world.reconciler()
    assert rec.run_once().converged
    world.commit({"pool-a.yaml": None}, "drop the pool")
    rep = during_held_request(
        world, rec, r"/spiderippools/pool-a$", "DELETE",
        lambda: set_records(world, "pool-a", web("10.1.0.12")),
    )  # fmt: skip
    assert world.get(vocab.SPIDER_IPPOOL, "pool-a") is not None, "deleted with a pod's IP in it"
    assert rep.outcome is not None and not rep.converged
    ((a, why),) = rep.outcome.blocked
    assert a.ref() == "SpiderIPPool pool-a"
    assert "still has 1 allocated IP(s) (pods default/web); not pruned" in why
    assert world.status()["blocked"] == [
        {"kind": "SpiderIPPool", "name": "pool-a", "op": "prune", "reason": why}
    ]
    assert world.condition("Ready")["reason"] == "Blocked"
    assert ("SpiderIPPool", None, "pool-a") in world.inventory_keys()
    # the pod leaves: the next pass prunes the pool
    set_records(world, "pool-a", None)
    rep = rec.run_once()
    assert applied(rep) == ["prune SpiderIPPool pool-a"] and rep.converged
    assert world.get(vocab.SPIDER_IPPOOL, "pool-a") is None


def test_shrink_race_is_judged_again_against_the_pool_as_written(world: World) -> None:
    world.commit({"pool-a.yaml": pool("pool-a", 1)})
    rec = world.reconciler()
    assert rec.run_once().converged
    world.commit({"pool-a.yaml": pool("pool-a", 1, ips="10-15")}, "shrink")
    # an allocation in the part that leaves lands while the dry run is held
    rep = during_held_request(
        world, rec, r"/spiderippools/pool-a$", "PATCH",
        lambda: set_records(world, "pool-a", web("10.1.0.19")),
    )  # fmt: skip
    live = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert live is not None and live["spec"]["ips"] == ["10.1.0.10-10.1.0.20"]
    assert rep.outcome is not None
    ((_, why),) = rep.outcome.blocked
    assert why.startswith("would remove allocated IPs from the pool: 10.1.0.19 (default/web)")
    assert world.condition("Ready")["reason"] == "Blocked"
    # an allocation in the part that stays: the write is retried on the new version and lands
    set_records(world, "pool-a", None)
    rep = during_held_request(
        world, rec, r"/spiderippools/pool-a$", "PATCH",
        lambda: set_records(world, "pool-a", web("10.1.0.12")),
    )  # fmt: skip
    assert rep.converged, rep.error
    live = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert live is not None and live["spec"]["ips"] == ["10.1.0.10-10.1.0.15"]
    assert json.loads(live["status"]["allocatedIPs"]) == web("10.1.0.12")
    assert live["status"]["totalIPCount"] == 6 and live["status"]["allocatedIPCount"] == 1


def test_collision_applies_nothing_and_says_how_to_adopt(world: World) -> None:
    """Someone else's pool and NAD have the names of objects in Git: nothing of the commit
    is written (not even the bridge or the Multus config), until they are adopted."""
    foreign_pool = {
        "apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
        "metadata": {"name": "pool-a"},
        "spec": {"subnet": "10.1.0.0/16", "ips": ["10.1.0.100-10.1.0.110"]},
    }  # fmt: skip
    kube.Objects(world.api, vocab.SPIDER_IPPOOL).create(foreign_pool)
    world.custom.create_namespaced_custom_object(
        "k8s.cni.cncf.io", "v1", "kube-system", "network-attachment-definitions",
        {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
         "metadata": {"name": "net-a", "namespace": "kube-system"},
         "spec": {"config": '{"cniVersion":"0.3.1","name":"net-a","type":"macvlan"}'}},
    )  # fmt: skip
    world.commit(QUICK)
    rec = world.reconciler()
    world.reset_requests()
    rep = rec.run_once()
    assert rep.reason == "OwnershipConflict" and not rep.converged
    assert rep.outcome is not None and {a.ref() for a in rep.outcome.refused} == {
        "SpiderIPPool pool-a",
        "NetworkAttachmentDefinition kube-system/net-a",
    }
    touched = [w for w in world.writes() if "gitsyncs" not in w[1] and "/events" not in w[1]]
    assert touched == [], "no write and no dry run of any object"
    assert world.get(vocab.OVS_BRIDGE, "br1") is None
    assert world.get(vocab.SPIDER_MULTUS_CONFIG, "net-a", "kube-system") is None
    ready, stalled = world.condition("Ready"), world.condition("Stalled")
    assert ready["reason"] == "OwnershipConflict" and stalled["status"] == "True"
    assert "kubectl label spiderippools.spiderpool.spidernet.io pool-a" in ready["message"]
    assert (
        "kubectl label -n kube-system network-attachment-definitions.k8s.cni.cncf.io net-a "
        "underlay.dev/instance=underlay app.kubernetes.io/managed-by=underlay --overwrite"
    ) in ready["message"]
    assert {b["name"] for b in world.status()["blocked"]} == {"pool-a", "net-a"}
    assert ("Warning", "OwnershipConflict", ready["message"]) in world.events()
    assert world.inventory_keys() == set()
    # adopting them (the labels from the message) lets the next pass apply everything
    labels = {"metadata": {"labels": {
        vocab.LABEL_INSTANCE: "underlay", vocab.LABEL_MANAGED_BY: "underlay",
    }}}  # fmt: skip
    world.custom.patch_cluster_custom_object(*POOLS, "pool-a", labels)
    world.custom.patch_namespaced_custom_object(
        "k8s.cni.cncf.io", "v1", "kube-system", "network-attachment-definitions", "net-a", labels
    )
    rep = rec.run_once()
    assert rep.converged, (rep.error, rep.plan and format_plan(rep.plan), world.lines)
    live = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert live is not None and live["spec"]["ips"] == ["10.1.0.10-10.1.0.20"]
    assert world.inventory_keys() == world.labelled()


def test_blocked_shrink_holds_back_the_multus_config_using_the_pool(world: World) -> None:
    world.commit(QUICK)
    rec = world.reconciler()
    assert rec.run_once().converged
    set_records(world, "pool-a", web("10.1.0.19"))
    vlan_smc = smc("net-a", "pool-a").replace("bridge: br1", "bridge: br1\n    vlan: 30")
    world.commit(
        {"pool-a.yaml": pool("pool-a", 1, ips="10-15"), "smc.yaml": vlan_smc,
         "pool-b.yaml": pool("pool-b", 2)},
        "shrink pool-a, move net-a to vlan 30, add pool-b",
    )  # fmt: skip
    rep = rec.run_once()
    assert rep.plan is not None and rep.reason == "" and not rep.converged
    blocked = {a.ref(): (a.blocked_op, a.reason) for a in rep.plan.blocked}
    assert blocked["SpiderIPPool pool-a"][1].startswith("would remove allocated IPs")
    assert (
        "uses SpiderIPPool pool-a, which is blocked"
        in blocked["SpiderMultusConfig kube-system/net-a"][1]
    )
    assert (
        "SpiderMultusConfig kube-system/net-a is blocked"
        in blocked["NetworkAttachmentDefinition kube-system/net-a"][1]
    )
    assert applied(rep) == ["create SpiderIPPool pool-b"]  # the rest applies
    live = world.get(vocab.SPIDER_MULTUS_CONFIG, "net-a", "kube-system")
    assert live is not None and live["spec"]["ovs"].get("vlan", 0) == 0
    nad = world.get(vocab.NETWORK_ATTACHMENT_DEFINITION, "net-a", "kube-system")
    assert nad is not None and '"vlan"' not in nad["spec"]["config"]
    # the pod leaves: pool, Multus config and NAD follow Git together
    set_records(world, "pool-a", None)
    rep = rec.run_once()
    assert rep.converged and sorted(applied(rep)) == [
        "update NetworkAttachmentDefinition kube-system/net-a",
        "update SpiderIPPool pool-a",
        "update SpiderMultusConfig kube-system/net-a",
    ]


def test_unreadable_pool_status_blocks_that_pool_only_and_names_it(world: World) -> None:
    world.commit(
        {"keep.yaml": BRIDGE, "a.yaml": pool("a", 1), "b.yaml": pool("b", 2),
         "d.yaml": pool("d", 4)}
    )  # fmt: skip
    rec = world.reconciler()
    assert rec.run_once().converged
    # a record key with a trailing space (it crashed every pass), truncated JSON, the same
    # trailing space on a pool that only grows
    set_records(world, "a", json.dumps({"10.1.0.20 ": {"pod": "default/y", "podUid": "v"}}))
    set_records(world, "b", '{"10.2.0.11": {"pod": "default/z", "podUid": "w"}')
    set_records(world, "d", json.dumps({"10.4.0.11 ": {"pod": "default/x", "podUid": "u"}}))
    world.commit(
        {"a.yaml": pool("a", 1, ips="10-18"), "b.yaml": None, "c.yaml": pool("c", 3),
         "d.yaml": pool("d", 4, ips="10-30")},
        "shrink a, drop b, add c, grow d",
    )  # fmt: skip
    rep = rec.run_once()
    assert rep.error is None or rep.reason == "Blocked", rep.error
    assert sorted(applied(rep)) == ["create SpiderIPPool c", "update SpiderIPPool d"]
    assert rep.plan is not None
    blocked = {a.ref(): a.reason for a in rep.plan.blocked}
    assert blocked["SpiderIPPool a"].startswith(
        "would remove allocated IPs from the pool: 10.1.0.20 (default/y)"
    )
    assert "status.allocatedIPs is not valid JSON" in blocked["SpiderIPPool b"]
    assert "not pruned" in blocked["SpiderIPPool b"]
    assert world.get(vocab.SPIDER_IPPOOL, "b") is not None
    ready = world.condition("Ready")
    assert ready["reason"] == "Blocked"
    assert "SpiderIPPool a:" in ready["message"] and "SpiderIPPool b:" in ready["message"]
    d = world.get(vocab.SPIDER_IPPOOL, "d")
    assert d is not None and d["status"]["totalIPCount"] == 21
    assert d["status"]["allocatedIPs"] == json.dumps(
        {"10.4.0.11 ": {"pod": "default/x", "podUid": "u"}}
    ), "apply never rewrites allocation records"


def test_fields_set_by_hand_that_git_leaves_unset_are_reverted_once(world: World) -> None:
    world.commit(QUICK)
    rec = world.reconciler()
    assert rec.run_once().converged
    assert rec.run_once().outcome is None
    world.custom.patch_cluster_custom_object(
        *POOLS, "pool-a", {"spec": {"disable": True, "excludeIPs": ["10.1.0.10-10.1.0.20"]}},
        field_manager="kubectl-patch",
    )  # fmt: skip
    rep = world.reconciler(self_heal=False).run_once()
    assert rep.plan is not None and [a.ref() for a in rep.plan.drifted] == ["SpiderIPPool pool-a"]
    live = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert live is not None and live["spec"]["disable"] is True, "self-heal off: reported only"
    assert world.status()["drift"][0] == {
        "kind": "SpiderIPPool", "name": "pool-a", "reverted": False,
        "fields": ["spec.disable", "spec.excludeIPs"],
    }  # fmt: skip
    world.reset_requests()
    rep = rec.run_once()
    assert rep.converged and applied(rep) == ["update SpiderIPPool pool-a"], rep.error
    live = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert live is not None
    assert live["spec"]["disable"] is False  # removed, then defaulted by the API server
    assert "excludeIPs" not in live["spec"]
    patches = [r for r in world.requests(writes=True) if "/spiderippools/pool-a" in r.path]
    assert [r.content_type for r in patches if "dryRun" not in r.params][:2] == [
        "application/merge-patch+json", "application/apply-patch+yaml",
    ]  # fmt: skip
    drift = world.status()["drift"][0]
    assert drift["reverted"] and drift["fields"] == ["spec.disable", "spec.excludeIPs"]
    assert any(
        e[1] == "DriftDetected" and "spec.disable, spec.excludeIPs" in e[2] for e in world.events()
    )
    # no endless drift: the report clears, then a pass writes nothing
    rec.run_once()
    world.reset_requests()
    rep = rec.run_once()
    assert rep.outcome is None and rep.converged and world.writes() == []
    # a field set by hand to its default is not drift: nothing to write
    world.custom.patch_cluster_custom_object(
        *POOLS, "pool-a", {"spec": {"default": False}}, field_manager="kubectl-patch"
    )
    world.reset_requests()
    rep = rec.run_once()
    assert rep.outcome is None and rep.converged
    assert [w for w in world.writes() if "/events" not in w[1]] == []


def test_plan_shows_unset_fields_and_collisions(world: World) -> None:
    """The plan CLI shows what apply does: a hand-set field is an update, a collision says
    nothing would be applied."""
    import subprocess
    import sys

    underlay = str(Path(sys.executable).parent / "underlay")
    world.commit(QUICK)
    assert world.reconciler().run_once().converged
    world.custom.patch_cluster_custom_object(
        *POOLS, "pool-a", {"spec": {"disable": True}}, field_manager="kubectl-patch"
    )
    args = [underlay, "plan", "--repo", str(world.origin_dir), "--kubeconfig", world.kubeconfig,
            "-n", NS, "--cache-dir", str(world.tmp / "plan-cache")]  # fmt: skip
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "spec.disable: true -> (absent)" in p.stdout
    assert "[drift: changed in the cluster, reverting]" in p.stdout
    kube.Objects(world.api, vocab.SPIDER_IPPOOL).create(
        {"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
         "metadata": {"name": "pool-z"}, "spec": {"subnet": "10.26.0.0/16"}}
    )  # fmt: skip
    world.commit({"pool-z.yaml": pool("pool-z", 26)})
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert "! blocked   SpiderIPPool pool-z" in p.stdout
    assert "Nothing would be applied: 1 object(s)" in p.stdout, p.stdout


def test_a_pool_is_not_created_over_a_kept_pool_with_allocations(world: World) -> None:
    """Renaming a pool in Git while it has allocations: the old pool is kept (its prune is
    blocked) and the new one, over the same range, is held back with it, so no address can be
    handed out by both; once the old pool is released, the rename goes through."""
    world.commit({"bridge.yaml": BRIDGE, "pool-a.yaml": pool("pool-a", 1)})
    rec = world.reconciler()
    assert rec.run_once().converged
    set_records(world, "pool-a", web("10.1.0.10"))
    world.commit(
        {"pool-a.yaml": None, "pool-b.yaml": pool("pool-b", 1, ips="15-30"),
         "smc.yaml": smc("net-b", "pool-b")},
        "rename pool-a to pool-b",
    )  # fmt: skip
    rep = rec.run_once()
    assert rep.plan is not None and not rep.converged
    blocked = {a.ref(): (a.blocked_op, a.reason) for a in rep.plan.blocked}
    assert blocked["SpiderIPPool pool-a"][1].startswith("still has 1 allocated IP(s)")
    op, why = blocked["SpiderIPPool pool-b"]
    assert op is not None and op.value == "create"
    assert why.startswith(
        "its addresses overlap SpiderIPPool pool-a (10.1.0.15-10.1.0.20), which stays in the "
        "cluster because its prune is blocked: still has 1 allocated IP(s)"
    ), why
    assert (
        "uses SpiderIPPool pool-b, which is blocked"
        in (blocked["SpiderMultusConfig kube-system/net-b"][1])
    )
    assert rep.outcome is None and world.get(vocab.SPIDER_IPPOOL, "pool-b") is None
    assert "its addresses overlap SpiderIPPool pool-a" in format_plan(rep.plan)
    # plan --exit-code: nothing to apply, but the cluster does not match Git: exit 1
    import subprocess
    import sys

    underlay = str(Path(sys.executable).parent / "underlay")
    args = [underlay, "plan", "--repo", str(world.origin_dir), "--kubeconfig", world.kubeconfig,
            "-n", NS, "--cache-dir", str(world.tmp / "plan-cache"), "--exit-code"]  # fmt: skip
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Nothing to apply, but the cluster does not match Git" in p.stdout, p.stdout
    assert "No changes" not in p.stdout
    set_records(world, "pool-a", None)  # the pod left
    rep = rec.run_once()
    assert rep.converged and sorted(applied(rep)) == [
        "create NetworkAttachmentDefinition kube-system/net-b",
        "create SpiderIPPool pool-b",
        "create SpiderMultusConfig kube-system/net-b",
        "prune SpiderIPPool pool-a",
    ]


def test_swapping_ranges_holds_back_the_pool_that_would_cover_a_kept_range(world: World) -> None:
    """pool-a holds 10.1.0.10 and Git swaps the ranges of pool-a and pool-b: pool-a's shrink
    is blocked (it keeps 10-19) and pool-b's move onto 10-19 is held back too."""
    world.commit(
        {"bridge.yaml": BRIDGE, "pool-a.yaml": pool("pool-a", 1, ips="10-19"),
         "pool-b.yaml": pool("pool-b", 1, ips="20-29")}
    )  # fmt: skip
    rec = world.reconciler()
    assert rec.run_once().converged
    set_records(world, "pool-a", web("10.1.0.10"))
    world.commit(
        {"pool-a.yaml": pool("pool-a", 1, ips="20-29"), "pool-b.yaml": pool("pool-b", 1, ips="10-19")},
        "swap",
    )  # fmt: skip
    rep = rec.run_once()
    assert rep.plan is not None
    blocked = {a.ref(): a.reason for a in rep.plan.blocked}
    assert blocked["SpiderIPPool pool-a"].startswith("would remove allocated IPs")
    assert blocked["SpiderIPPool pool-b"].startswith(
        "its addresses overlap SpiderIPPool pool-a (10.1.0.10-10.1.0.19), which stays in the "
        "cluster because its update is blocked"
    )
    assert rep.outcome is None  # nothing written
    live = world.get(vocab.SPIDER_IPPOOL, "pool-b")
    assert live is not None and live["spec"]["ips"] == ["10.1.0.20-10.1.0.29"]


def test_a_pool_is_not_created_over_a_pool_made_by_hand(world: World) -> None:
    """A pool that is not in Git (made by hand, not ours) keeps its addresses: a pool in Git
    over them is held back; the rest of the revision applies."""
    objs = kube.Objects(world.api, vocab.SPIDER_IPPOOL)
    objs.create(
        {"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
         "metadata": {"name": "by-hand"},
         "spec": {"subnet": "10.1.0.0/16", "ips": ["10.1.0.18-10.1.0.25"]}}
    )  # fmt: skip
    world.commit({"bridge.yaml": BRIDGE, "pool-a.yaml": pool("pool-a", 1)})
    rep = world.reconciler().run_once()
    assert rep.plan is not None
    blocked = {a.ref(): a.reason for a in rep.plan.blocked}
    assert blocked["SpiderIPPool pool-a"].startswith(
        "its addresses overlap SpiderIPPool by-hand (10.1.0.18-10.1.0.20), which stays in the "
        "cluster because it is in the cluster but not in Git"
    )
    assert applied(rep) == ["create OvsBridge br1"]
