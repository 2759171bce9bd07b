"""PATCH: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic merge patch."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.kube.emulator import Emulator
from tests.kube.helpers import Kube, clients, crd, status_of, widget

JSON_PATCH = "application/json-patch+json"


@pytest.fixture
def kube(apiserver: Emulator) -> Kube:
    k = clients(apiserver)
    k.apiext.create_custom_resource_definition(crd())
    return k


def test_merge_patch_with_a_list_body_is_400(kube: Kube) -> None:
    kube.widgets().create(widget("w1"))
    with pytest.raises(ApiException) as ei:
        kube.widgets().patch(
            "w1", [{"op": "remove", "path": "/spec/mtu"}]
        )  # merge-patch by default
    assert status_of(ei.value)["code"] == 400


def test_merge_patch_merges_maps_replaces_lists_and_null_deletes(kube: Kube) -> None:
    w = kube.widgets()
    w.create(widget("w1", mode="auto", options={"a": "1", "b": "2"}, uplinks=["eth0", "eth1"]))
    got = w.patch(
        "w1", {"spec": {"options": {"b": None, "c": "3"}, "uplinks": ["eth2"], "mode": None}}
    )
    assert got["spec"]["options"] == {"a": "1", "c": "3"}
    assert got["spec"]["uplinks"] == ["eth2"]
    assert "mode" not in got["spec"]
    assert got["spec"]["bridge"] == "br1" and got["spec"]["mtu"] == 1500


def test_json_patch_operations(kube: Kube) -> None:
    w = kube.widgets()
    w.create(widget("w1", uplinks=["eth0"], options={"a/b": "x", "t~": "y"}))
    got = w.patch("w1", [
        {"op": "test", "path": "/spec/bridge", "value": "br1"},
        {"op": "add", "path": "/spec/uplinks/-", "value": "eth2"},
        {"op": "add", "path": "/spec/uplinks/1", "value": "eth1"},
        {"op": "replace", "path": "/spec/mtu", "value": 9000},
        {"op": "remove", "path": "/spec/options/a~1b"},
        {"op": "copy", "from": "/spec/options/t~0", "path": "/spec/options/copied"},
        {"op": "move", "from": "/spec/options/t~0", "path": "/spec/options/moved"},
        {"op": "add", "path": "/metadata/labels", "value": {"k": "v"}},
    ], _content_type=JSON_PATCH)  # fmt: skip
    assert got["spec"]["uplinks"] == ["eth0", "eth1", "eth2"]
    assert got["spec"]["mtu"] == 9000
    assert got["spec"]["options"] == {"copied": "y", "moved": "y"}
    assert got["metadata"]["labels"] == {"k": "v"}


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "test", "path": "/spec/bridge", "value": "other"}],
        [{"op": "replace", "path": "/spec/missing", "value": 1}],
        [{"op": "remove", "path": "/spec/missing"}],
        [{"op": "add", "path": "/spec/no/such/parent", "value": 1}],
        [{"op": "add", "path": "/spec/uplinks/9", "value": "x"}],
        [{"op": "frobnicate", "path": "/spec"}],
    ],
)
def test_failed_json_patch_is_422_and_changes_nothing(kube: Kube, ops: list[Any]) -> None:
    w = kube.widgets()
    before = w.create(widget("w1", uplinks=["eth0"]))
    with pytest.raises(ApiException) as ei:
        w.patch(
            "w1",
            [{"op": "replace", "path": "/spec/mtu", "value": 100}, *ops],
            _content_type=JSON_PATCH,
        )
    st = status_of(ei.value)
    assert st["code"] == 422 and st["reason"] == "Invalid"
    assert st["message"] == "the server rejected our request due to an error in our request"
    assert st["details"]["causes"][0]["reason"] == "UnexpectedServerResponse"
    assert w.get("w1") == before


def test_json_patch_on_escaped_status_key(kube: Kube) -> None:
    node = kube.core.create_node({"metadata": {"name": "n1"}})
    assert node.status.capacity is None and node.status.node_info.kubelet_version == ""
    kube.core.patch_node_status("n1", [{"op": "add", "path": "/status/capacity", "value": {}}])
    got = kube.core.patch_node_status(
        "n1", [{"op": "add", "path": "/status/capacity/underlay.dev~1br1", "value": "1000"}]
    )
    assert got.status.capacity == {"underlay.dev/br1": "1k"}
    got = kube.core.patch_node_status(
        "n1", [{"op": "remove", "path": "/status/capacity/underlay.dev~1br1"}]
    )
    assert not got.status.capacity


def test_strategic_merge_patch_on_builtins(kube: Kube) -> None:
    kube.core.create_namespaced_pod("default", {
        "metadata": {"name": "p", "finalizers": ["a.example.com/x"]},
        "spec": {"containers": [{"name": "app", "image": "app:1"}, {"name": "side", "image": "side:1"}]},
    })  # fmt: skip
    # containers merge by name: only app's image changes, side stays; finalizers are unioned
    got = kube.core.patch_namespaced_pod("p", "default", {
        "metadata": {"finalizers": ["b.example.com/y"], "labels": {"l": "1"}},
        "spec": {"containers": [{"name": "app", "image": "app:2"}]},
    })  # fmt: skip
    assert [(c.name, c.image) for c in got.spec.containers] == [
        ("app", "app:2"),
        ("side", "side:1"),
    ]
    assert got.metadata.finalizers == ["a.example.com/x", "b.example.com/y"]
    got = kube.core.patch_namespaced_pod("p", "default", {
        "metadata": {"$deleteFromPrimitiveList/finalizers": ["a.example.com/x"]},
    })  # fmt: skip
    assert got.metadata.finalizers == ["b.example.com/y"]
    # service ports merge by port; $patch: delete drops one
    kube.core.create_namespaced_service("default", {
        "metadata": {"name": "svc"}, "spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}]},
    })  # fmt: skip
    svc = kube.core.patch_namespaced_service("svc", "default", {
        "spec": {"ports": [{"port": 80, "name": "web"}, {"port": 8080, "name": "alt"}]},
    })  # fmt: skip
    assert [(p.port, p.name, p.protocol) for p in svc.spec.ports] == [
        (80, "web", "TCP"), (443, "https", "TCP"), (8080, "alt", "TCP"),
    ]  # fmt: skip
    svc = kube.core.patch_namespaced_service(
        "svc", "default", {"spec": {"ports": [{"port": 443, "$patch": "delete"}]}}
    )
    assert [p.port for p in svc.spec.ports] == [80, 8080]
    cm = kube.core.create_namespaced_config_map(
        "default", {"metadata": {"name": "c"}, "data": {"a": "1", "b": "2"}}
    )
    cm = kube.core.patch_namespaced_config_map("c", "default", {"data": {"a": None, "c": "3"}})
    assert cm.data == {"b": "2", "c": "3"}


def test_pod_spec_is_immutable_except_images(kube: Kube) -> None:
    kube.core.create_namespaced_pod("default", {
        "metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    })  # fmt: skip
    with pytest.raises(ApiException) as ei:
        kube.core.patch_namespaced_pod("p", "default", {"spec": {"nodeName": "elsewhere"}})
    st = status_of(ei.value)
    assert st["code"] == 422 and st["details"]["causes"][0]["reason"] == "FieldValueForbidden"


def test_strategic_merge_patch_is_refused_for_custom_resources(kube: Kube) -> None:
    kube.widgets().create(widget("w1"))
    with pytest.raises(ApiException) as ei:
        kube.widgets().patch(
            "w1", {"spec": {"mtu": 1000}}, _content_type="application/strategic-merge-patch+json"
        )
    st = status_of(ei.value)
    assert st["code"] == 415 and st["reason"] == "UnsupportedMediaType"
    assert "application/merge-patch+json" in st["message"]


def test_patch_result_is_validated(kube: Kube) -> None:
    kube.widgets().create(widget("w1"))
    with pytest.raises(ApiException) as ei:
        kube.widgets().patch("w1", {"spec": {"mtu": 1}})
    st = status_of(ei.value)
    assert st["code"] == 422 and st["details"]["causes"][0]["field"] == "spec.mtu"
    with pytest.raises(ApiException) as ei:
        kube.widgets().patch(
            "w1", [{"op": "remove", "path": "/spec/bridge"}], _content_type=JSON_PATCH
        )
    assert status_of(ei.value)["details"]["causes"][0] == {
        "reason": "FieldValueRequired", "message": "Required value", "field": "spec.bridge",
    }  # fmt: skip


def test_patch_changing_nothing_writes_nothing(apiserver: Emulator, kube: Kube) -> None:
    before = kube.widgets().create(widget("w1", mtu=1400))
    rv = apiserver.resource_version
    after = kube.widgets().patch("w1", {"spec": {"mtu": 1400}})
    assert after == before and apiserver.resource_version == rv
    after = kube.widgets().patch(
        "w1", [{"op": "replace", "path": "/spec/mtu", "value": 1400}], _content_type=JSON_PATCH
    )
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
