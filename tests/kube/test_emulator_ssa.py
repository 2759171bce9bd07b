"""Server-side apply and managed fields, checked against the real client."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from tests.kube.emulator import Emulator
from tests.kube.helpers import GROUP, Kube, clients, crd, status_of, widget

APPLY = "application/apply-patch+yaml"


@pytest.fixture
def kube(apiserver: Emulator) -> Kube:
    k = clients(apiserver)
    k.apiext.create_custom_resource_definition(crd())
    return k


def _managers(obj: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m["manager"], m["operation"]): m for m in obj["metadata"].get("managedFields", [])}


def test_apply_creates_and_records_ownership(kube: Kube) -> None:
    body = widget("w1", ports=[{"name": "p1", "vlan": 10}], tags=["a"])
    body["metadata"]["labels"] = {"app": "x"}
    data, code, _ = kube.custom.patch_namespaced_custom_object_with_http_info(
        GROUP, "v1", "default", "widgets", "w1", body, field_manager="underlay", _content_type=APPLY
    )
    # 201 Created, as the API server answers; CustomObjectsApi only maps 200 to a body, so
    # callers of apply get None when apply created the object (real client behaviour too)
    assert code == 201 and data is None
    obj = kube.widgets().get("w1")
    assert obj["spec"]["mtu"] == 1500  # defaulted, owned by nobody
    assert obj["metadata"]["generation"] == 1
    (entry,) = obj["metadata"]["managedFields"]
    assert entry["manager"] == "underlay" and entry["operation"] == "Apply"
    assert entry["apiVersion"] == f"{GROUP}/v1" and entry["fieldsType"] == "FieldsV1"
    assert entry["time"].endswith("Z") and "subresource" not in entry
    assert entry["fieldsV1"] == {
        "f:metadata": {"f:labels": {"f:app": {}}},
        "f:spec": {
            "f:bridge": {},
            "f:ports": {'k:{"name":"p1"}': {".": {}, "f:name": {}, "f:vlan": {}}},
            "f:tags": {'v:"a"': {}},
        },
    }


def test_apply_updates_and_removes_what_it_no_longer_applies(kube: Kube) -> None:
    w = kube.widgets()
    first = widget("w1", mode="auto", mtu=1400, options={"a": "1", "b": "2"})
    first["metadata"]["labels"] = {"keep": "1", "drop": "1"}
    w.apply(first, "underlay")
    second = widget("w1", mtu=1400, options={"a": "1"})
    second["metadata"]["labels"] = {"keep": "1"}
    got = w.apply(second, "underlay")
    assert "mode" not in got["spec"] and got["spec"]["options"] == {"a": "1"}
    assert got["metadata"]["labels"] == {"keep": "1"}
    assert got["metadata"]["generation"] == 2
    # dropping mtu from the config removes it; the schema default then fills it again
    got = w.apply(widget("w1", options={"a": "1"}), "underlay")
    assert got["spec"]["mtu"] == 1500 and got["metadata"]["generation"] == 3


def test_apply_keeps_fields_others_own(kube: Kube) -> None:
    w = kube.widgets()
    w.apply(widget("w1", mode="auto"), "a")
    w.apply(widget("w1", mode="auto"), "b")  # same value: shared ownership, no conflict
    got = w.apply(widget("w1"), "a")
    assert got["spec"]["mode"] == "auto"  # b still owns it
    owned_by_b = _managers(got)[("b", "Apply")]["fieldsV1"]["f:spec"]
    assert (
        "f:mode" in owned_by_b
        and "f:mode" not in _managers(got)[("a", "Apply")]["fieldsV1"]["f:spec"]
    )
    # a field set by a non-apply writer is never removed by an applier that did not own it
    w.patch("w1", {"spec": {"options": {"z": "9"}}}, field_manager="kubectl-edit")
    got = w.apply(widget("w1"), "a")
    assert got["spec"]["options"] == {"z": "9"}


def test_apply_conflicts_without_force(kube: Kube) -> None:
    w = kube.widgets()
    w.apply(widget("w1", mtu=1400), "a")
    before = w.get("w1")
    with pytest.raises(ApiException) as ei:
        w.apply(widget("w1", mtu=9000), "b")
    st = status_of(ei.value)
    assert st["code"] == 409 and st["reason"] == "Conflict"
    assert st["message"] == 'Apply failed with 1 conflict: conflict with "a": .spec.mtu'
    assert st["details"]["causes"] == [
        {"reason": "FieldManagerConflict", "message": 'conflict with "a"', "field": ".spec.mtu"}
    ]
    assert w.get("w1") == before
    # a field owned by an Update manager conflicts too, naming its API version
    w.patch(
        "w1",
        {"spec": {"mode": "none"}, "metadata": {"labels": {"l": "x"}}},
        field_manager="kubectl-edit",
    )
    body = widget("w1", mtu=1400, mode="auto")
    body["metadata"]["labels"] = {"l": "y"}
    with pytest.raises(ApiException) as ei:
        w.apply(body, "a")
    st = status_of(ei.value)
    assert st["message"] == (
        'Apply failed with 2 conflicts: conflicts with "kubectl-edit" using test.underlay.dev/v1:\n'
        "- .metadata.labels.l\n- .spec.mode"
    )
    assert {c["field"] for c in st["details"]["causes"]} == {".spec.mode", ".metadata.labels.l"}


def test_force_apply_takes_ownership(kube: Kube) -> None:
    w = kube.widgets()
    w.apply(widget("w1", mtu=1400, mode="auto"), "a")
    got = w.apply(widget("w1", mtu=9000), "b", force=True)
    assert got["spec"]["mtu"] == 9000
    mgr = _managers(got)
    assert "f:mtu" in mgr[("b", "Apply")]["fieldsV1"]["f:spec"]
    assert "f:mtu" not in mgr[("a", "Apply")]["fieldsV1"]["f:spec"]
    # a no longer owns mtu, so omitting it does not remove b's value
    got = w.apply(widget("w1", mode="auto"), "a")
    assert got["spec"]["mtu"] == 9000


def test_noop_apply_changes_nothing_and_emits_no_event(apiserver: Emulator, kube: Kube) -> None:
    w = kube.widgets()
    body = widget("w1", mtu=1400, ports=[{"name": "p1"}])
    body["metadata"]["labels"] = {"a": "b"}
    w.apply(body, "underlay")
    first = w.get("w1")
    apiserver.reset_requests()
    again = w.apply(json.loads(json.dumps(body)), "underlay")
    assert again == first
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    assert (
        again["metadata"]["managedFields"][0]["time"]
        == first["metadata"]["managedFields"][0]["time"]
    )
    (req,) = apiserver.requests()
    assert req.method == "PATCH" and req.code == 200 and req.content_type == APPLY
    events = list(
        watch.Watch().stream(
            kube.custom.list_namespaced_custom_object, GROUP, "v1", "default", "widgets",
            resource_version=first["metadata"]["resourceVersion"], timeout_seconds=1,
        )
    )  # fmt: skip
    assert events == []


def test_apply_merges_associative_lists(kube: Kube) -> None:
    w = kube.widgets()
    w.apply(widget("w1", ports=[{"name": "p1", "vlan": 1}], tags=["a"]), "a")
    got = w.apply(widget("w1", ports=[{"name": "p2", "vlan": 2}], tags=["b"]), "b")
    assert got["spec"]["ports"] == [{"name": "p1", "vlan": 1}, {"name": "p2", "vlan": 2}]
    assert got["spec"]["tags"] == ["a", "b"]
    got = w.apply(widget("w1", ports=[]), "a")
    assert got["spec"]["ports"] == [{"name": "p2", "vlan": 2}] and got["spec"]["tags"] == ["b"]
    # an atomic list is owned as a whole: a different value from another manager conflicts
    w.apply(widget("w1", uplinks=["eth0"]), "a")
    with pytest.raises(ApiException) as ei:
        w.apply(widget("w1", uplinks=["eth0", "eth1"]), "b")
    assert status_of(ei.value)["details"]["causes"][0]["field"] == ".spec.uplinks"


def test_apply_request_errors(kube: Kube) -> None:
    w = kube.widgets()
    w.create(widget("w1"))
    with pytest.raises(ApiException) as ei:
        w.patch("w1", widget("w1"), _content_type=APPLY)
    st = status_of(ei.value)
    assert st["code"] == 422
    assert st["details"]["causes"][0] == {
        "reason": "FieldValueRequired", "message": "Required value: is required for apply patch", "field": "fieldManager",
    }  # fmt: skip
    with pytest.raises(ApiException) as ei:
        w.patch("w1", {"spec": {"mtu": 1000}}, force=True)
    assert status_of(ei.value)["code"] == 422
    with pytest.raises(ApiException) as ei:
        w.apply(widget("w1", undeclared=True), "m")
    st = status_of(ei.value)
    assert st["code"] == 400 and st["message"].endswith(
        ".spec.undeclared: field not declared in schema"
    )
    with pytest.raises(ApiException) as ei:
        w.apply({"metadata": {"name": "w1"}, "spec": {"bridge": "b"}}, "m")
    assert status_of(ei.value)["code"] == 400
    with pytest.raises(ApiException) as ei:
        w.apply(widget("w1", mtu="big"), "m")
    assert status_of(ei.value)["code"] == 422
    with pytest.raises(ApiException) as ei:
        w.apply(widget("w1", mtu=1), "m")  # merged result is validated
    assert status_of(ei.value)["details"]["causes"][0]["field"] == "spec.mtu"


def test_apply_to_status_subresource(kube: Kube) -> None:
    w = kube.widgets()
    w.apply(widget("w1"), "underlay")
    status = {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "w1", "namespace": "default"},
              "status": {"phase": "Ready", "conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip
    got = w.apply_status(status, "agent")
    assert got["status"]["phase"] == "Ready"
    entry = _managers(got)[("agent", "Apply")]
    assert entry["subresource"] == "status"
    assert entry["fieldsV1"] == {"f:status": {
        "f:conditions": {'k:{"type":"Ready"}': {".": {}, "f:status": {}, "f:type": {}}}, "f:phase": {},
    }}  # fmt: skip
    # status in a main-resource apply is ignored and not owned
    body = widget("w1")
    body["status"] = {"phase": "Hacked"}
    got = w.apply(body, "underlay")
    assert got["status"]["phase"] == "Ready"
    assert "f:status" not in _managers(got)[("underlay", "Apply")]["fieldsV1"]
    with pytest.raises(ApiException) as ei:  # apply to a missing object's status is 404
        w.apply_status(dict(status, metadata={"name": "nope", "namespace": "default"}), "agent")
    assert ei.value.status == 404


def test_non_apply_writes_record_update_managers(kube: Kube) -> None:
    w = kube.widgets()
    created = w.create(widget("w1", mode="auto"))
    (entry,) = created["metadata"]["managedFields"]
    assert (
        entry["manager"] == "OpenAPI-Generator" and entry["operation"] == "Update"
    )  # User-Agent prefix
    assert entry["fieldsV1"] == {"f:spec": {".": {}, "f:bridge": {}, "f:mode": {}, "f:mtu": {}}}
    got = w.patch("w1", {"spec": {"mode": "none", "options": {"k": "v"}}}, field_manager="editor")
    mgr = _managers(got)
    assert mgr[("editor", "Update")]["fieldsV1"] == {
        "f:spec": {"f:mode": {}, "f:options": {".": {}, "f:k": {}}}
    }
    assert mgr[("OpenAPI-Generator", "Update")]["fieldsV1"] == {
        "f:spec": {".": {}, "f:bridge": {}, "f:mtu": {}}
    }
    got["status"] = {"phase": "Up"}
    got = w.replace_status("w1", got, field_manager="agent")
    entry = _managers(got)[("agent", "Update")]
    assert entry["subresource"] == "status" and entry["fieldsV1"] == {
        "f:status": {".": {}, "f:phase": {}}
    }
    # managedFields: [{}] resets tracking
    got = w.patch("w1", {"metadata": {"managedFields": [{}]}})
    assert "managedFields" not in got["metadata"]


def test_apply_on_builtin_kinds(kube: Kube) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default"},
          "data": {"a": "1"}}  # fmt: skip
    kube.core.patch_namespaced_config_map(
        "c", "default", cm, field_manager="one", _content_type=APPLY
    )
    cm2 = dict(cm, data={"b": "2"})
    got = kube.core.patch_namespaced_config_map(
        "c", "default", cm2, field_manager="two", _content_type=APPLY
    )
    assert got.data == {"a": "1", "b": "2"}
    got = kube.core.patch_namespaced_config_map(
        "c", "default", dict(cm, data={}), field_manager="one", _content_type=APPLY
    )
    assert got.data == {"b": "2"}
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
            "status": {"capacity": {"underlay.dev/br1": "1000"}}}  # fmt: skip
    kube.core.create_node({"metadata": {"name": "n1"}})
    got = kube.core.patch_node_status(
        "n1", node, field_manager="underlay-agent", _content_type=APPLY
    )
    assert got.status.capacity == {"underlay.dev/br1": "1k"}
    again = kube.core.patch_node_status(
        "n1", node, field_manager="underlay-agent", _content_type=APPLY
    )
    assert again.metadata.resource_version == got.metadata.resource_version  # "1000" == "1k"


def test_managed_fields_edge_cases(kube: Kube) -> None:
    w = kube.widgets()
    w.apply(widget("w1", mtu=1400), "a")
    cur = w.get("w1")
    cur["metadata"]["managedFields"] = []  # empty means "unchanged", not "reset"
    cur["spec"]["mode"] = "auto"
    got = w.replace("w1", cur, field_manager="editor")
    assert {m["manager"] for m in got["metadata"]["managedFields"]} == {"a", "editor"}
    body = widget("w1")
    body["metadata"]["managedFields"] = got["metadata"]["managedFields"]
    with pytest.raises(ApiException) as ei:
        w.apply(body, "a")
    assert status_of(ei.value)["message"] == "metadata.managedFields must be nil"


def test_apply_null_removes_a_field_and_owns_it(kube: Kube) -> None:
    w = kube.widgets()
    w.patch("w1", widget("w1"), field_manager="a", _content_type=APPLY)
    w.patch("w1", {"spec": {"mode": "auto"}}, field_manager="editor")
    body = widget("w1", mode=None)
    got = w.apply(body, "a", force=True)
    assert "mode" not in got["spec"]
    assert "f:mode" in _managers(got)[("a", "Apply")]["fieldsV1"]["f:spec"]


def test_dropping_the_last_applied_label_keeps_metadata(kube: Kube) -> None:
    w = kube.widgets()
    body = widget("w1")
    body["metadata"]["labels"] = {"x": "1"}
    body["metadata"]["annotations"] = {"a": "1"}
    w.apply(body, "a")
    before = w.get("w1")
    got = w.apply(widget("w1"), "a")
    assert "labels" not in got["metadata"] and "annotations" not in got["metadata"]
    for k in ("name", "namespace", "uid", "creationTimestamp", "generation"):
        assert got["metadata"][k] == before["metadata"][k]
    assert _managers(got)[("a", "Apply")]["fieldsV1"] == {"f:spec": {"f:bridge": {}}}
    # metadata nobody owns (tracking was reset) survives when an applier drops its own label
    w.patch("w1", {"metadata": {"labels": {"keep": "1"}, "finalizers": ["x.dev/y"]}})
    assert "managedFields" not in w.patch("w1", {"metadata": {"managedFields": [{}]}})["metadata"]
    labelled = widget("w1")
    labelled["metadata"]["labels"] = {"x": "1"}
    w.apply(labelled, "a")
    got = w.apply(widget("w1"), "a")
    assert got["metadata"]["finalizers"] == ["x.dev/y"]
    assert got["metadata"]["uid"] == before["metadata"]["uid"]
