"""LIST with label and field selectors, across namespaces, with limit/continue."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.kube.emulator import Emulator
from tests.kube.helpers import GROUP, Kube, clients, crd, raw, status_of, widget


@pytest.fixture
def kube(apiserver: Emulator) -> Kube:
    k = clients(apiserver)
    k.apiext.create_custom_resource_definition(crd())
    return k


def _names(listed: dict[str, Any]) -> list[str]:
    return [i["metadata"]["name"] for i in listed["items"]]


LABELS = {
    "a": {"app": "web", "tier": "front", "env": "prod"},
    "b": {"app": "web", "tier": "back"},
    "c": {"app": "db", "env": "dev"},
    "d": {},
    "e": {"app": "cache", "version": "7"},
}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=web", ["a", "b"]),
        ("app==web", ["a", "b"]),
        ("app!=web", ["c", "d", "e"]),
        ("app in (web,db)", ["a", "b", "c"]),
        ("app notin (web, db)", ["d", "e"]),
        ("env", ["a", "c"]),
        ("!env", ["b", "d", "e"]),
        ("app=web,tier=back", ["b"]),
        ("app,!tier", ["c", "e"]),
        ("version>5", ["e"]),
        ("version<5", []),
        ("", ["a", "b", "c", "d", "e"]),
    ],
)
def test_label_selectors(kube: Kube, selector: str, expected: list[str]) -> None:
    for name, labels in LABELS.items():
        body = widget(name)
        body["metadata"]["labels"] = labels
        kube.widgets().create(body)
    assert _names(kube.widgets().list(label_selector=selector)) == expected
    pods = kube.core.list_namespaced_config_map("default", label_selector=selector).items
    assert pods == []


@pytest.mark.parametrize(
    "bad", ["app in (", "app=(x", "!", "a b", "app in ()", "x=y,", "bad key=1", "a=b c"]
)
def test_malformed_label_selector_is_400(kube: Kube, bad: str) -> None:
    with pytest.raises(ApiException) as ei:
        kube.widgets().list(label_selector=bad)
    st = status_of(ei.value)
    assert st["code"] == 400 and st["reason"] == "BadRequest"


def test_field_selectors(kube: Kube) -> None:
    kube.core.create_namespace({"metadata": {"name": "other"}})
    for ns, name, node in (("default", "p1", "n1"), ("default", "p2", "n2"), ("other", "p3", "n1")):
        kube.core.create_namespaced_pod(ns, {
            "metadata": {"name": name}, "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
        })  # fmt: skip
    on_n1 = kube.core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1").items
    assert sorted(p.metadata.name for p in on_n1) == ["p1", "p3"]
    not_n1 = kube.core.list_pod_for_all_namespaces(field_selector="spec.nodeName!=n1").items
    assert [p.metadata.name for p in not_n1] == ["p2"]
    both = kube.core.list_pod_for_all_namespaces(
        field_selector="spec.nodeName==n1,metadata.namespace=other"
    )
    assert [p.metadata.name for p in both.items] == ["p3"]
    by_name = kube.core.list_namespaced_pod("default", field_selector="metadata.name=p2")
    assert [p.metadata.name for p in by_name.items] == ["p2"]
    phase = kube.core.list_pod_for_all_namespaces(field_selector="status.phase=Pending")
    assert len(phase.items) == 3
    kube.widgets().create(widget("w1"))
    kube.widgets().create(widget("w2"))
    assert _names(kube.widgets().list(field_selector="metadata.name=w2")) == ["w2"]
    assert _names(kube.widgets().list(field_selector="metadata.namespace=default")) == ["w1", "w2"]
    for bad in ("spec.bridge=br1", "spec.nodeName=n1"):
        with pytest.raises(ApiException) as ei:
            kube.widgets().list(field_selector=bad)
        assert status_of(ei.value)["message"] == f"field label not supported: {bad.split('=')[0]}"


def test_crd_selectable_fields(kube: Kube) -> None:
    body = crd("Gadget", "gadgets")
    body["spec"]["versions"][0]["selectableFields"] = [{"jsonPath": ".spec.bridge"}]
    kube.apiext.create_custom_resource_definition(body)
    for name, bridge in (("g1", "br1"), ("g2", "br2")):
        kube.custom.create_namespaced_custom_object(
            GROUP, "v1", "default", "gadgets", dict(widget(name, bridge=bridge), kind="Gadget")
        )
    got = kube.custom.list_namespaced_custom_object(
        GROUP, "v1", "default", "gadgets", field_selector="spec.bridge=br2"
    )
    assert _names(got) == ["g2"]


def test_list_kind_version_and_item_shape(kube: Kube) -> None:
    kube.widgets().create(widget("w1"))
    listed = kube.widgets().list()
    assert listed["kind"] == "WidgetList" and listed["apiVersion"] == f"{GROUP}/v1"
    assert listed["items"][0]["kind"] == "Widget"  # custom resource items carry their type
    code, body = raw(kube, "GET", "/api/v1/namespaces")
    assert code == 200
    assert body["kind"] == "NamespaceList" and body["apiVersion"] == "v1"
    assert "kind" not in body["items"][0]  # built-in list items do not


def test_limit_and_continue_page_through_everything(kube: Kube) -> None:
    for i in range(7):
        kube.widgets().create(widget(f"w{i}"))
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        page = (
            kube.widgets().list(limit=3, _continue=token) if token else kube.widgets().list(limit=3)
        )
        seen += _names(page)
        pages += 1
        token = page["metadata"].get("continue")
        if not token:
            break
        assert page["metadata"]["remainingItemCount"] == 7 - len(seen)
    assert seen == [f"w{i}" for i in range(7)] and pages == 3
    with pytest.raises(ApiException) as ei:
        kube.widgets().list(limit=3, _continue="not-a-token")
    assert ei.value.status == 400
