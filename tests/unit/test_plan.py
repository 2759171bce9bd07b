"""Plan: SSA-aware diff, prune of owned and inventoried objects only, pool safety rules,
drift classification, the empty-revision guard."""

from __future__ import annotations

import copy
import json
from typing import Any

from reconciler import render, vocab
from reconciler.inventory import Entry, Inventory, digest
from reconciler.plan import Op, diff, format_plan, make_plan, managed_paths

POOL = {
    "apiVersion": "spiderpool.spidernet.io/v2beta1",
    "kind": "SpiderIPPool",
    "metadata": {"name": "ippool-test"},
    "spec": {
        "ips": ["172.18.30.131-172.18.30.140"],
        "subnet": "172.18.0.0/16",
        "gateway": "172.18.0.1",
    },
}


def live_of(
    body: dict[str, Any], *, uid: str = "u1", fields: dict[str, Any] | None = None, **status: Any
) -> dict[str, Any]:
    """What the API server returns after an apply of ``body`` (server defaults added)."""
    obj = copy.deepcopy(body)
    obj["metadata"].update({"uid": uid, "resourceVersion": "7", "generation": 1})
    obj["spec"].setdefault("disable", False)  # a server-side default we never set
    if fields is not None:
        obj["metadata"]["managedFields"] = [
            {
                "manager": "underlay",
                "operation": "Apply",
                "fieldsType": "FieldsV1",
                "fieldsV1": fields,
            }
        ]
    if status:
        obj["status"] = status
    return obj


def desired(*docs: dict[str, Any]) -> list[render.Desired]:
    return render.render(list(docs), "underlay")


def test_against_empty_cluster_everything_is_created() -> None:
    plan = make_plan(desired(POOL), {}, against_empty=True)
    assert [a.op for a in plan.actions] == [Op.CREATE]
    text = format_plan(plan)
    assert "No cluster configured" in text and "+ create    SpiderIPPool ippool-test" in text
    assert plan.summary().startswith("1 to create")


def test_server_defaults_do_not_cause_drift() -> None:
    d = desired(POOL)
    live = live_of(d[0].body)
    plan = make_plan(d, {d[0].key: live})
    assert [a.op for a in plan.actions] == [Op.UNCHANGED]
    assert not plan.has_changes


def test_hand_edit_is_drift_and_listed_field_by_field() -> None:
    d = desired(POOL)
    live = live_of(d[0].body)
    live["spec"]["gateway"] = "172.18.0.254"
    (a,) = make_plan(d, {d[0].key: live}).actions
    assert a.op is Op.UPDATE
    assert [(c.path, c.before, c.after) for c in a.changes] == [
        ("spec.gateway", "172.18.0.254", "172.18.0.1")
    ]


def test_field_we_applied_and_git_dropped_is_removed() -> None:
    d = desired(POOL)
    fields = {"f:spec": {"f:gateway": {}, "f:ips": {}, "f:subnet": {}, "f:vlan": {}}}
    live = live_of(d[0].body, fields=fields)
    live["spec"]["vlan"] = 30
    (a,) = make_plan(d, {d[0].key: live}).actions
    assert [(c.path, c.before, c.after) for c in a.changes] == [("spec.vlan", 30, None)]


def test_managed_paths_fold_list_items() -> None:
    live = {"metadata": {"managedFields": [
        {"manager": "underlay", "operation": "Apply", "fieldsV1": {"f:spec": {"f:routes": {"k:{\"dst\":\"10.0.0.0/8\"}": {".": {}}}}}},
        {"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:spec": {"f:default": {}}}},
    ]}}  # fmt: skip
    assert managed_paths(live, "underlay") == {("spec", "routes")}


def inv(*names: str, uid: str = "u1") -> Inventory:
    return Inventory(Entry(vocab.SPIDER_IPPOOL, None, n, uid) for n in names)


def test_prune_only_touches_objects_with_our_instance_label() -> None:
    d = desired(POOL)
    ours = live_of(render.render([{**POOL, "metadata": {"name": "old"}}], "underlay")[0].body)
    # pools that stay must not overlap ours (test_apply_safety: no pool over a kept one)
    elsewhere = {**POOL["spec"], "ips": ["172.18.40.1-172.18.40.9"]}
    other_instance = live_of(
        render.render([{**POOL, "metadata": {"name": "blue"}, "spec": elsewhere}], "blue")[0].body
    )
    unlabelled = live_of({**POOL, "metadata": {"name": "hand-made"}, "spec": elsewhere})
    observed = {
        ("SpiderIPPool", None, "old"): ours,
        ("SpiderIPPool", None, "blue"): other_instance,
        ("SpiderIPPool", None, "hand-made"): unlabelled,
    }
    plan = make_plan(d, observed, inventory=inv("old", "blue", "hand-made"))
    assert [(a.op, a.name) for a in plan.actions] == [(Op.CREATE, "ippool-test"), (Op.PRUNE, "old")]


def test_labelled_object_outside_the_inventory_is_never_pruned() -> None:
    """Someone copied our labels onto their pool: labels alone are not ownership."""
    elsewhere = {**POOL["spec"], "ips": ["172.18.40.1-172.18.40.9"]}  # not over ours
    copied = live_of(
        render.render([{**POOL, "metadata": {"name": "copied"}, "spec": elsewhere}], "underlay")[
            0
        ].body
    )
    observed = {("SpiderIPPool", None, "copied"): copied}
    d = desired(POOL)
    for inventory in (None, inv("ippool-test")):
        plan = make_plan(d, observed, inventory=inventory)
        assert [(a.op, a.name) for a in plan.actions] == [(Op.CREATE, "ippool-test")]
        assert plan.not_in_inventory == [("SpiderIPPool", None, "copied")]
        assert "not in its inventory, so they are never pruned: SpiderIPPool copied" in format_plan(
            plan
        )


def test_inventoried_object_recreated_by_someone_else_is_not_pruned() -> None:
    old = live_of(
        render.render([{**POOL, "metadata": {"name": "old"}}], "underlay")[0].body, uid="new-uid"
    )
    plan = make_plan(
        desired(POOL), {("SpiderIPPool", None, "old"): old}, inventory=inv("old", uid="old-uid")
    )
    a = plan.actions[1]
    assert a.op is Op.BLOCKED and a.blocked_op is Op.PRUNE
    assert "recreated since this reconciler applied it (uid old-uid, now new-uid)" in a.reason


def test_empty_revision_prunes_nothing_unless_allowed() -> None:
    old = live_of(render.render([POOL], "underlay")[0].body)
    observed = {("SpiderIPPool", None, "ippool-test"): old}
    plan = make_plan([], observed, inventory=inv("ippool-test"))
    (a,) = plan.actions
    assert a.op is Op.BLOCKED and a.blocked_op is Op.PRUNE and "--allow-empty" in a.reason
    assert not plan.has_changes
    plan = make_plan([], observed, inventory=inv("ippool-test"), allow_empty=True)
    assert [a.op for a in plan.actions] == [Op.PRUNE]


def test_hand_edit_is_drift_when_git_did_not_change_the_object() -> None:
    d = desired(POOL)
    live = live_of(d[0].body)
    live["spec"]["gateway"] = "172.18.0.254"
    applied = Inventory([Entry(vocab.SPIDER_IPPOOL, None, "ippool-test", "u1", digest(d[0].body))])
    (a,) = make_plan(d, {d[0].key: live}, inventory=applied).actions
    assert a.op is Op.UPDATE and a.drift and a.reason == "changed in the cluster"
    assert "[drift: changed in the cluster, reverting]" in format_plan(
        make_plan(d, {d[0].key: live}, inventory=applied)
    )
    # self-heal off: reported, not written
    plan = make_plan(d, {d[0].key: live}, inventory=applied, self_heal=False)
    (a,) = plan.actions
    assert a.op is Op.DRIFTED and a.drift and not plan.has_changes
    assert plan.summary().endswith("1 drifted (not reverted)")
    # Git changed the object since it was applied: an update, not drift
    stale = Inventory([Entry(vocab.SPIDER_IPPOOL, None, "ippool-test", "u1", "0" * 16)])
    (a,) = make_plan(d, {d[0].key: live}, inventory=stale).actions
    assert a.op is Op.UPDATE and not a.drift


def test_object_deleted_by_hand_is_drift_and_recreated() -> None:
    d = desired(POOL)
    applied = Inventory([Entry(vocab.SPIDER_IPPOOL, None, "ippool-test", "u1", digest(d[0].body))])
    (a,) = make_plan(d, {}, inventory=applied).actions
    assert a.op is Op.CREATE and a.drift and a.reason == "deleted in the cluster"
    (a,) = make_plan(d, {}, inventory=applied, self_heal=False).actions
    assert a.op is Op.DRIFTED


def test_existing_object_without_our_label_is_never_updated() -> None:
    d = desired(POOL)
    live = live_of(POOL)  # same name, applied by someone else: no labels
    (a,) = make_plan(d, {d[0].key: live}).actions
    assert a.op is Op.BLOCKED and a.blocked_op is Op.UPDATE
    assert vocab.LABEL_INSTANCE in a.reason


def test_pool_with_allocations_is_not_pruned() -> None:
    gone = live_of(
        render.render([POOL], "underlay")[0].body,
        allocatedIPs=json.dumps({"172.18.30.131": {"pod": "default/a", "podUid": "x"}}),
        allocatedIPCount=1,
    )
    plan = make_plan(
        [],
        {("SpiderIPPool", None, "ippool-test"): gone},
        inventory=inv("ippool-test"),
        allow_empty=True,
    )
    (a,) = plan.actions
    assert a.op is Op.BLOCKED and a.blocked_op is Op.PRUNE
    assert "1 allocated IP(s) (pods default/a)" in a.reason


def test_pool_is_not_shrunk_below_its_allocations() -> None:
    small = copy.deepcopy(POOL)
    small["spec"]["ips"] = ["172.18.30.131-172.18.30.135"]
    d = desired(small)
    live = live_of(
        desired(POOL)[0].body,
        allocatedIPs=json.dumps({"172.18.30.139": {"pod": "default/b", "podUid": "y"}}),
    )
    (a,) = make_plan(d, {d[0].key: live}).actions
    assert a.op is Op.BLOCKED
    assert a.reason.startswith(
        "would remove allocated IPs from the pool: 172.18.30.139 (default/b)"
    )


def test_subnet_is_immutable() -> None:
    moved = copy.deepcopy(POOL)
    moved["spec"].update(subnet="172.19.0.0/16", gateway="172.19.0.1", ips=["172.19.0.10"])
    d = desired(moved)
    (a,) = make_plan(d, {d[0].key: live_of(desired(POOL)[0].body)}).actions
    assert a.op is Op.BLOCKED and "spec.subnet is immutable" in a.reason


def test_nad_owner_reference_uses_the_live_smc_uid() -> None:
    smc = {
        "apiVersion": "spiderpool.spidernet.io/v2beta1",
        "kind": "SpiderMultusConfig",
        "metadata": {"name": "ovs-conf", "namespace": "kube-system"},
        "spec": {"cniType": "ovs", "ovs": {"bridge": "br1"}},
    }
    d = desired(smc)
    smc_live = live_of(d[0].body, uid="smc-uid")
    nad_live = live_of(d[1].body, uid="nad-uid")  # no ownerReferences: drift
    plan = make_plan(d, {d[0].key: smc_live, d[1].key: nad_live})
    nad_action = plan.actions[1]
    assert nad_action.op is Op.UPDATE
    assert nad_action.changes[0].path == "metadata.ownerReferences"
    assert nad_action.changes[0].after[0]["uid"] == "smc-uid"


def test_diff_of_identical_objects_is_empty() -> None:
    d = desired(POOL)[0].body
    assert diff(d, live_of(d), "underlay") == []


def test_diff_memo_follows_resource_version_and_git() -> None:
    """The memo skips the diff of objects nobody wrote since the last pass, and only those."""
    d = desired(POOL)
    live = live_of(d[0].body)
    live["spec"]["gateway"] = "172.18.0.254"
    memo: dict = {}
    (a,) = make_plan(d, {d[0].key: live}, memo=memo).actions
    assert a.op is Op.UPDATE and list(memo) == [d[0].key]
    # the object was written (new resourceVersion) and is right again: diffed again, unchanged
    fixed = live_of(d[0].body)
    fixed["metadata"]["resourceVersion"] = "8"
    (a,) = make_plan(d, {d[0].key: fixed}, memo=memo).actions
    assert a.op is Op.UNCHANGED
    # Git changed the object: a new digest, diffed again although the live object did not move
    moved = copy.deepcopy(POOL)
    moved["spec"]["gateway"] = "172.18.0.2"
    d2 = desired(moved)
    (a,) = make_plan(d2, {d2[0].key: fixed}, memo=memo).actions
    assert a.op is Op.UPDATE and [c.path for c in a.changes] == ["spec.gateway"]
    # objects that left the plan leave the memo
    make_plan([], {}, memo=memo)
    assert memo == {}


# --- fields Git leaves unset, collisions, unreadable pool status, dependents -------------------


def test_field_git_leaves_unset_is_drift_unless_it_is_the_schema_default() -> None:
    """kubectl sets spec.disable and spec.excludeIPs, which Git never sets: a difference
    (removed by merge patch: foreign), while server defaults (disable: false) never are."""
    d = desired(POOL)
    live = live_of(d[0].body)  # disable: false, the CRD default
    assert make_plan(d, {d[0].key: live}).actions[0].op is Op.UNCHANGED
    live["spec"].update(disable=True, excludeIPs=["172.18.30.131-172.18.30.140"], default=False)
    applied = Inventory([Entry(vocab.SPIDER_IPPOOL, None, "ippool-test", "u1", digest(d[0].body))])
    (a,) = make_plan(d, {d[0].key: live}, inventory=applied).actions
    assert a.op is Op.UPDATE and a.drift
    assert [(c.path, c.before, c.after, c.foreign) for c in a.changes] == [
        ("spec.disable", True, None, True),
        ("spec.excludeIPs", ["172.18.30.131-172.18.30.140"], None, True),
    ]
    assert a.changes[0].parts == ("spec", "disable")
    # maps are compared key by key: a node selector key added by hand is a difference too
    bridge = {
        "apiVersion": "underlay.dev/v1alpha1", "kind": "OvsBridge", "metadata": {"name": "br1"},
        "spec": {"uplinks": ["eth0"], "nodeSelector": {"rack": "r1"}},
    }  # fmt: skip
    (db,) = desired(bridge)
    live_b = live_of(db.body)
    live_b["spec"].pop("disable")
    live_b["spec"].update(moveAddresses=True, persistence="auto")  # server defaults
    live_b["spec"]["nodeSelector"]["kubernetes.io/hostname"] = "n1"
    (b,) = make_plan([db], {db.key: live_b}).actions
    assert [(c.parts, c.foreign) for c in b.changes] == [
        (("spec", "nodeSelector", "kubernetes.io/hostname"), True)
    ]


def test_collision_blocks_with_the_command_that_adopts_the_object() -> None:
    d = desired(POOL)
    live = live_of(POOL)  # same name, made by someone else: no labels
    plan = make_plan(d, {d[0].key: live})
    (a,) = plan.collisions
    assert a.op is Op.BLOCKED and a.blocked_op is Op.UPDATE
    assert (
        "kubectl label spiderippools.spiderpool.spidernet.io ippool-test "
        "underlay.dev/instance=underlay app.kubernetes.io/managed-by=underlay --overwrite"
    ) in a.reason
    assert "Nothing would be applied: 1 object(s)" in format_plan(plan)
    blue = live_of(render.render([POOL], "blue")[0].body)
    (a,) = make_plan(d, {d[0].key: blue}).collisions
    assert "it belongs to reconciler instance 'blue'" in a.reason


def _with_status(body: dict[str, Any], **status: Any) -> dict[str, Any]:
    return live_of(body, **status)


def test_unreadable_pool_status_blocks_prune_and_shrink_never_crashes() -> None:
    ours = render.render([POOL], "underlay")[0].body
    cases = {
        "truncated JSON": '{"172.18.30.131": {"pod": "default/z"',
        "not an object": "[1, 2]",
        "a key that is no IP": json.dumps({"garbage": {"pod": "default/q"}}),
        "count above the records": None,
    }
    for what, raw in cases.items():
        st: dict[str, Any] = {"allocatedIPCount": 3} if raw is None else {"allocatedIPs": raw}
        live = _with_status(ours, **st)
        plan = make_plan(
            [], {("SpiderIPPool", None, "ippool-test"): live}, inventory=inv("ippool-test"),
            allow_empty=True,
        )  # fmt: skip
        (a,) = plan.actions
        assert a.op is Op.BLOCKED and a.blocked_op is Op.PRUNE, what
        assert "may still hold allocations" in a.reason, what
        small = copy.deepcopy(POOL)
        small["spec"]["ips"] = ["172.18.30.131-172.18.30.135"]
        d = desired(small)
        (a,) = make_plan(d, {d[0].key: live}).actions
        assert a.op is Op.BLOCKED and "no address is removed" in a.reason, what
        grown = copy.deepcopy(POOL)
        grown["spec"]["ips"] = ["172.18.30.131-172.18.30.150"]
        d = desired(grown)
        (a,) = make_plan(d, {d[0].key: live}).actions
        assert a.op is Op.UPDATE, what  # nothing leaves the pool: safe
    # a key with blanks around the address is that address (found by the tester: it crashed)
    live = _with_status(
        ours, allocatedIPs=json.dumps({"172.18.30.140 ": {"pod": "default/y", "podUid": "v"}})
    )
    small = copy.deepcopy(POOL)
    small["spec"]["ips"] = ["172.18.30.131-172.18.30.138"]
    d = desired(small)
    (a,) = make_plan(d, {d[0].key: live}).actions
    assert a.op is Op.BLOCKED and "172.18.30.140 (default/y)" in a.reason


def test_multus_config_naming_a_blocked_pool_is_blocked_with_its_nad() -> None:
    smc = {
        "apiVersion": "spiderpool.spidernet.io/v2beta1",
        "kind": "SpiderMultusConfig",
        "metadata": {"name": "ovs-conf", "namespace": "kube-system"},
        "spec": {"cniType": "ovs", "ovs": {"bridge": "br1", "ippools": {"ipv4": ["ippool-test"]}}},
    }
    moved = copy.deepcopy(POOL)
    moved["spec"].update(subnet="172.19.0.0/16", gateway="172.19.0.1", ips=["172.19.0.10"])
    d = desired(moved, smc)
    plan = make_plan(d, {d[0].key: live_of(desired(POOL)[0].body)})
    assert [(a.op, a.blocked_op, a.resource.kind) for a in plan.actions] == [
        (Op.BLOCKED, Op.UPDATE, "SpiderIPPool"),
        (Op.BLOCKED, Op.CREATE, "SpiderMultusConfig"),
        (Op.BLOCKED, Op.CREATE, "NetworkAttachmentDefinition"),
    ]
    assert "uses SpiderIPPool ippool-test, which is blocked (spec.subnet is immutable" in (
        plan.actions[1].reason
    )
    assert not plan.collisions and not plan.has_changes


def test_bridge_line_says_it_moves_the_uplinks_addresses_and_where_it_persists() -> None:
    bridge = {
        "apiVersion": "underlay.dev/v1alpha1",
        "kind": "OvsBridge",
        "metadata": {"name": "br1"},
        "spec": {"uplinks": ["eth0"], "nodeSelector": {"rack": "r1"}},
    }
    kept = {**bridge, "metadata": {"name": "br2"},
            "spec": {"uplinks": ["eth1"], "moveAddresses": False, "persistence": "none"}}  # fmt: skip
    text = format_plan(make_plan(desired(bridge, kept), {}, against_empty=True))
    assert (
        "OvsBridge br1  (bridge br1, uplinks eth0; moves eth0's addresses and routes to br1; "
        "persistence auto; nodes rack=r1)" in text
    ), text
    assert "OvsBridge br2  (bridge br2, uplinks eth1; persistence none; nodes all)" in text, text


def _pool(name: str, ips: list[str], **spec: Any) -> dict[str, Any]:
    p = copy.deepcopy(POOL)
    p["metadata"]["name"] = name
    p["spec"]["ips"] = ips
    p["spec"].update(spec)
    return p


def test_an_update_held_back_for_overlap_keeps_its_live_addresses_for_the_next_check() -> None:
    """Pool a (ours, .131-.140) would move onto .150, which pool x (not in Git) holds: a is
    held back and keeps .131-.140, so pool c cannot be created over .136-.140 either."""
    a_live = live_of(render.render([_pool("a", ["172.18.30.131-172.18.30.140"])])[0].body)
    x_live = live_of(_pool("x", ["172.18.30.150-172.18.30.160"]), uid="ux")
    d = desired(
        _pool("a", ["172.18.30.131-172.18.30.135", "172.18.30.150"]),
        _pool("c", ["172.18.30.136-172.18.30.140"]),
    )
    plan = make_plan(d, {("SpiderIPPool", None, "a"): a_live, ("SpiderIPPool", None, "x"): x_live})
    ops = {a.name: (a.op, a.reason) for a in plan.actions}
    assert ops["a"][0] is Op.BLOCKED and "overlap SpiderIPPool x (172.18.30.150)" in ops["a"][1]
    assert ops["c"][0] is Op.BLOCKED
    assert ops["c"][1].startswith(
        "its addresses overlap SpiderIPPool a (172.18.30.136-172.18.30.140), which stays in the "
        "cluster because its update is blocked: its addresses overlap SpiderIPPool x"
    ), ops["c"][1]


def test_a_staying_pool_with_unreadable_ips_still_keeps_its_recorded_addresses() -> None:
    records = json.dumps({"172.18.30.133": {"pod": "default/a", "podUid": "x"}})
    x_live = live_of(_pool("x", ["garbage"]), uid="ux", allocatedIPs=records, allocatedIPCount=1)
    plan = make_plan(
        desired(_pool("c", ["172.18.30.131-172.18.30.140"])), {("SpiderIPPool", None, "x"): x_live}
    )
    (c,) = [a for a in plan.actions if a.name == "c"]
    assert c.op is Op.BLOCKED and "overlap SpiderIPPool x (172.18.30.133)" in (c.reason or "")


def test_a_staying_pool_whose_addresses_are_all_excluded_blocks_nothing() -> None:
    excluded = ["172.18.30.131-172.18.30.140"]
    x_live = live_of(_pool("x", excluded, excludeIPs=excluded), uid="ux")
    plan = make_plan(desired(_pool("c", excluded)), {("SpiderIPPool", None, "x"): x_live})
    assert [a.op for a in plan.actions if a.name == "c"] == [Op.CREATE]


def test_a_staying_pool_is_judged_on_what_it_holds_now_at_every_plan() -> None:
    """What a staying pool covers is remembered between plans (by the fields it is read from):
    the same pool, unchanged, is not worked out again, and a pool that changed (an allocation
    recorded, its range moved) is judged on what it holds now, never on what was remembered."""
    x_live = live_of(_pool("x", ["172.18.30.150-172.18.30.160"]), uid="ux")
    d = desired(_pool("c", ["172.18.30.131-172.18.30.140"]))
    for _ in range(2):  # nothing overlaps, remembered or not
        plan = make_plan(d, {("SpiderIPPool", None, "x"): x_live})
        assert [a.op for a in plan.actions if a.name == "c"] == [Op.CREATE]
    records = json.dumps({"172.18.30.133": {"pod": "default/a", "podUid": "p"}})
    held = live_of(_pool("x", ["172.18.30.150-172.18.30.160"]), uid="ux", allocatedIPs=records)
    plan = make_plan(d, {("SpiderIPPool", None, "x"): held})
    (c,) = [a for a in plan.actions if a.name == "c"]
    assert c.op is Op.BLOCKED and "overlap SpiderIPPool x (172.18.30.133)" in (c.reason or "")
    moved = live_of(_pool("x", ["172.18.30.139-172.18.30.160"]), uid="ux")
    plan = make_plan(d, {("SpiderIPPool", None, "x"): moved})
    (c,) = [a for a in plan.actions if a.name == "c"]
    assert c.op is Op.BLOCKED and "(172.18.30.139-172.18.30.140)" in (c.reason or "")
    plan = make_plan(d, {("SpiderIPPool", None, "x"): x_live})
    assert [a.op for a in plan.actions if a.name == "c"] == [Op.CREATE]
