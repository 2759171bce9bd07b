"""Deletion with finalizers and preconditions, garbage collection, namespaces, CRD
registration, dry run."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from reconciler import vocab
from tests.kube.emulator import Emulator
from tests.kube.helpers import GROUP, Kube, clients, crd, raw, status_of, widget


@pytest.fixture
def kube(apiserver: Emulator) -> Kube:
    k = clients(apiserver)
    k.apiext.create_custom_resource_definition(crd())
    return k


def _owned_by(obj: dict[str, Any], kind: str = "Widget") -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": kind,
            "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"],
        }
    ]


def _gone(call: Any) -> bool:
    try:
        call()
    except ApiException as e:
        return e.status == 404
    return False


def test_finalizers_hold_deletion_until_removed(kube: Kube) -> None:
    ws = kube.widgets()
    body = widget("w1")
    body["metadata"]["finalizers"] = ["underlay.dev/cleanup"]
    created = ws.create(body)
    rv = created["metadata"]["resourceVersion"]
    deleting = ws.delete("w1")
    md = deleting["metadata"]
    assert md["deletionTimestamp"].endswith("Z") and md["deletionGracePeriodSeconds"] == 0
    assert md["generation"] == 2  # setting deletionTimestamp bumps generation
    assert ws.get("w1")["metadata"]["deletionTimestamp"] == md["deletionTimestamp"]
    assert ws.delete("w1")["metadata"]["resourceVersion"] == md["resourceVersion"]  # again: no-op
    with pytest.raises(ApiException) as ei:
        ws.patch("w1", {"metadata": {"finalizers": ["underlay.dev/cleanup", "other.dev/x"]}})
    assert status_of(ei.value)["details"]["causes"][0]["field"] == "metadata.finalizers"
    got = ws.patch("w1", {"metadata": {"deletionTimestamp": None}, "spec": {"mtu": 1400}})
    assert got["metadata"]["deletionTimestamp"] == md["deletionTimestamp"]  # not clearable
    ws.patch("w1", {"metadata": {"finalizers": None}})
    assert _gone(lambda: ws.get("w1"))
    w = watch.Watch()
    events = []
    for ev in w.stream(
        kube.custom.list_namespaced_custom_object,
        GROUP,
        "v1",
        "default",
        "widgets",
        resource_version=rv,
        timeout_seconds=5,
    ):
        events.append(ev["type"])
        if ev["type"] == "DELETED":
            w.stop()
    assert events == ["MODIFIED", "MODIFIED", "DELETED"]


def test_delete_preconditions(kube: Kube) -> None:
    ws = kube.widgets()
    obj = ws.create(widget("w1"))
    for pre in ({"uid": "not-the-uid"}, {"resourceVersion": "1"}):
        with pytest.raises(ApiException) as ei:
            ws.delete("w1", body=client.V1DeleteOptions(preconditions=client.V1Preconditions(**{
                "uid": pre.get("uid"), "resource_version": pre.get("resourceVersion"),
            })))  # fmt: skip
        st = status_of(ei.value)
        assert (
            st["code"] == 409
            and st["reason"] == "Conflict"
            and "Precondition failed" in st["message"]
        )
    ws.delete("w1", body=client.V1DeleteOptions(preconditions=client.V1Preconditions(
        uid=obj["metadata"]["uid"], resource_version=obj["metadata"]["resourceVersion"],
    )))  # fmt: skip
    assert _gone(lambda: ws.get("w1"))
    with pytest.raises(ApiException) as ei:
        ws.delete("w1")
    assert ei.value.status == 404


def test_delete_responses(kube: Kube) -> None:
    kube.widgets().create(widget("w1"))
    gone = kube.widgets().delete("w1")
    assert (
        gone["kind"] == "Widget" and gone["metadata"]["name"] == "w1"
    )  # custom resources return the object
    cm = kube.core.create_namespaced_config_map("default", {"metadata": {"name": "c"}})
    st = kube.core.delete_namespaced_config_map("c", "default")  # a dict in this client version
    assert st["kind"] == "Status" and st["status"] == "Success"
    assert st["details"] == {"name": "c", "group": "", "kind": "configmaps", "uid": cm.metadata.uid}


def test_garbage_collection_of_dependents(apiserver: Emulator, kube: Kube) -> None:
    ws = kube.widgets()
    owner = ws.create(widget("owner"))
    other = ws.create(widget("other"))
    dep = widget("dep")
    dep["metadata"]["ownerReferences"] = _owned_by(owner)
    ws.create(dep)
    kube.core.create_namespaced_config_map(
        "default", {"metadata": {"name": "cm", "ownerReferences": _owned_by(owner)}}
    )
    two = widget("two-owners")
    two["metadata"]["ownerReferences"] = _owned_by(owner) + _owned_by(other)
    ws.create(two)
    grand = widget("grandchild")
    grand["metadata"]["ownerReferences"] = _owned_by(ws.get("dep"))
    ws.create(grand)
    ws.delete("owner")  # background propagation by default
    assert apiserver.wait_idle()
    assert _gone(lambda: ws.get("dep"))
    assert _gone(lambda: ws.get("grandchild"))
    assert _gone(lambda: kube.core.read_namespaced_config_map("cm", "default"))
    survivor = ws.get("two-owners")
    assert [r["name"] for r in survivor["metadata"]["ownerReferences"]] == ["other"]
    # an object created with only dangling owner references is collected too
    dangling = widget("dangling")
    dangling["metadata"]["ownerReferences"] = [dict(_owned_by(owner)[0])]
    ws.create(dangling)
    assert apiserver.wait_idle()
    assert _gone(lambda: ws.get("dangling"))


def test_orphan_propagation_keeps_dependents(apiserver: Emulator, kube: Kube) -> None:
    ws = kube.widgets()
    owner = ws.create(widget("owner"))
    dep = widget("dep")
    dep["metadata"]["ownerReferences"] = _owned_by(owner)
    ws.create(dep)
    ws.delete("owner", propagation_policy="Orphan")
    assert apiserver.wait_idle()
    kept = ws.get("dep")
    assert "ownerReferences" not in kept["metadata"]


def test_namespace_deletion_empties_and_removes_it(kube: Kube) -> None:
    kube.core.create_namespace({"metadata": {"name": "team"}})
    ws = kube.widgets("team")
    ws.create(widget("plain", namespace="team"))
    held = widget("held", namespace="team")
    held["metadata"]["finalizers"] = ["underlay.dev/x"]
    ws.create(held)
    kube.core.create_namespaced_config_map("team", {"metadata": {"name": "c"}})
    ns = kube.core.delete_namespace("team")
    assert ns["status"]["phase"] == "Terminating" and ns["metadata"]["deletionTimestamp"]
    assert _gone(lambda: ws.get("plain"))
    assert _gone(lambda: kube.core.read_namespaced_config_map("c", "team"))
    assert kube.core.read_namespace("team").status.phase == "Terminating"
    with pytest.raises(ApiException) as ei:
        kube.core.create_namespaced_config_map("team", {"metadata": {"name": "new"}})
    st = status_of(ei.value)
    assert st["code"] == 403 and "is being terminated" in st["message"]
    ws.patch("held", {"metadata": {"finalizers": None}})
    assert _gone(lambda: kube.core.read_namespace("team"))
    assert kube.core.read_namespace("default").metadata.labels == {
        "kubernetes.io/metadata.name": "default"
    }


def test_crd_registration_and_removal(apiserver: Emulator, kube: Kube) -> None:
    made = kube.apiext.create_custom_resource_definition(
        crd("Gadget", "gadgets", namespaced=False, short_names=("gd",))
    )
    conds = {c.type: c.status for c in made.status.conditions}
    assert conds == {"NamesAccepted": "True", "Established": "True"}
    assert made.status.accepted_names.kind == "Gadget" and made.status.stored_versions == ["v1"]
    body = dict(widget("g1"), kind="Gadget", metadata={"name": "g1"})
    rv = kube.custom.create_cluster_custom_object(GROUP, "v1", "gadgets", body)["metadata"][
        "resourceVersion"
    ]
    resources = {
        r.name for r in client.CustomObjectsApi(kube.api).get_api_resources(GROUP, "v1").resources
    }
    assert "gadgets" in resources
    seen: list[str] = []

    def watch_it() -> None:
        w = watch.Watch()
        for ev in w.stream(
            kube.custom.list_cluster_custom_object,
            GROUP,
            "v1",
            "gadgets",
            resource_version=rv,
            timeout_seconds=5,
        ):
            seen.append(ev["type"])

    t = threading.Thread(target=watch_it)
    t.start()
    assert apiserver.wait_for_watches(1, "gadgets")
    kube.apiext.delete_custom_resource_definition(f"gadgets.{GROUP}")
    t.join(10)
    assert seen == ["DELETED"]  # its objects went with it, and the watch ended
    with pytest.raises(ApiException) as ei:
        kube.custom.list_cluster_custom_object(GROUP, "v1", "gadgets")
    assert status_of(ei.value)["message"] == "the server could not find the requested resource"
    assert _gone(lambda: kube.apiext.read_custom_resource_definition(f"gadgets.{GROUP}"))
    resources = {
        r.name for r in client.CustomObjectsApi(kube.api).get_api_resources(GROUP, "v1").resources
    }
    assert "gadgets" not in resources
    kube.apiext.create_custom_resource_definition(crd("Gadget", "gadgets", namespaced=False))
    assert kube.custom.list_cluster_custom_object(GROUP, "v1", "gadgets")["items"] == []


def test_crd_deletion_waits_for_finalized_objects(kube: Kube) -> None:
    held = widget("held")
    held["metadata"]["finalizers"] = ["underlay.dev/x"]
    kube.widgets().create(held)
    crd_obj = kube.apiext.delete_custom_resource_definition(f"widgets.{GROUP}")
    assert crd_obj["metadata"]["deletionTimestamp"]
    conds = {c["type"]: c["status"] for c in crd_obj["status"]["conditions"]}
    assert conds["Terminating"] == "True"
    with pytest.raises(ApiException) as ei:
        kube.widgets().create(widget("new"))
    assert ei.value.status == 405
    kube.widgets().patch("held", {"metadata": {"finalizers": None}})
    assert _gone(lambda: kube.apiext.read_custom_resource_definition(f"widgets.{GROUP}"))
    assert _gone(lambda: kube.widgets().list())


def test_crd_update_changes_schema_and_versions(kube: Kube) -> None:
    kube.widgets().create(widget("w1"))
    cur = kube.apiext.read_custom_resource_definition(f"widgets.{GROUP}")
    body = kube.api.sanitize_for_serialization(cur)
    v2 = dict(body["spec"]["versions"][0], name="v2", storage=False)
    body["spec"]["versions"].append(v2)
    kube.apiext.replace_custom_resource_definition(f"widgets.{GROUP}", body)
    got = kube.custom.get_namespaced_custom_object(GROUP, "v2", "default", "widgets", "w1")
    assert got["apiVersion"] == f"{GROUP}/v2"  # conversion strategy None
    assert kube.widgets().get("w1")["apiVersion"] == f"{GROUP}/v1"
    groups = {g.name: g for g in client.ApisApi(kube.api).get_api_versions().groups}
    preferred = groups[GROUP].preferred_version
    assert preferred is not None and preferred.version == "v2"
    assert [v.version for v in groups[GROUP].versions] == ["v2", "v1"]


def test_register_and_install_crds(apiserver: Emulator, kube: Kube, tmp_path: Path) -> None:
    made = apiserver.register(vocab.OVS_BRIDGE)
    assert made["spec"]["scope"] == "Cluster"
    obj = {"apiVersion": vocab.UNDERLAY_API_VERSION, "kind": "OvsBridge", "metadata": {"name": "br1"},
           "spec": {"anything": {"goes": [1, 2]}}, "status": {"dropped": True}}  # fmt: skip
    stored = kube.custom.create_cluster_custom_object(
        vocab.UNDERLAY_GROUP, vocab.UNDERLAY_VERSION, "ovsbridges", obj
    )
    assert stored["spec"] == {"anything": {"goes": [1, 2]}} and "status" not in stored
    docs = [crd("Alpha", "alphas"), crd("Beta", "betas", namespaced=False)]
    (tmp_path / "crds.yaml").write_text(yaml.safe_dump_all(docs))
    (tmp_path / "ignored.txt").write_text("not yaml")
    assert apiserver.install_crds([tmp_path]) == [f"alphas.{GROUP}", f"betas.{GROUP}"]
    assert kube.custom.list_cluster_custom_object(GROUP, "v1", "betas")["items"] == []
    (tmp_path / "bad.yml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap"}))
    with pytest.raises(ValueError, match=r"bad\.yml"):
        apiserver.install_crds([tmp_path / "bad.yml"])


def test_dry_run_validates_but_stores_nothing(apiserver: Emulator, kube: Kube) -> None:
    ws = kube.widgets()
    ws.create(widget("w1"))
    rv = apiserver.resource_version
    made = ws.create(widget("w2"), dry_run="All")
    assert made["metadata"]["uid"] and "resourceVersion" not in made["metadata"]
    with pytest.raises(ApiException) as ei:
        ws.create(widget("w3", mtu=1), dry_run="All")
    assert ei.value.status == 422
    cur = ws.get("w1")
    cur["spec"]["mtu"] = 1400
    assert ws.replace("w1", cur, dry_run="All")["spec"]["mtu"] == 1400
    assert ws.patch("w1", {"spec": {"mtu": 1300}}, dry_run="All")["metadata"]["generation"] == 2
    assert ws.apply(widget("w1", mtu=1200), "m", force=True, dry_run="All")["spec"]["mtu"] == 1200
    assert ws.delete("w1", dry_run="All")["metadata"]["name"] == "w1"
    assert apiserver.resource_version == rv
    assert ws.get("w1")["spec"]["mtu"] == 1500
    assert [i["metadata"]["name"] for i in ws.list()["items"]] == ["w1"]
    with pytest.raises(ApiException) as ei:
        ws.create(widget("w4"), dry_run="Some")
    assert ei.value.status == 400
    events = list(watch.Watch().stream(
        kube.custom.list_namespaced_custom_object, GROUP, "v1", "default", "widgets",
        resource_version=str(rv), timeout_seconds=1,
    ))  # fmt: skip
    assert events == []


def test_bound_pod_deletion_is_graceful(kube: Kube) -> None:
    rv = kube.core.list_namespaced_pod("default").metadata.resource_version
    for name, node in (("bound", "n1"), ("unbound", None)):
        spec: dict[str, Any] = {"containers": [{"name": "c", "image": "i"}]}
        if node:
            spec["nodeName"] = node
        kube.core.create_namespaced_pod("default", {"metadata": {"name": name}, "spec": spec})
    deleted = kube.core.delete_namespaced_pod("bound", "default")
    assert deleted.metadata.deletion_grace_period_seconds == 30
    kube.core.delete_namespaced_pod("unbound", "default")
    w = watch.Watch()
    types = []
    for ev in w.stream(
        kube.core.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=5
    ):
        types.append((ev["type"], ev["object"].metadata.name))
        if len(types) == 5:
            w.stop()
    assert types == [
        ("ADDED", "bound"), ("ADDED", "unbound"),
        ("MODIFIED", "bound"), ("DELETED", "bound"), ("DELETED", "unbound"),
    ]  # fmt: skip


def test_delete_collection(kube: Kube) -> None:
    for name, team in (("a", "x"), ("b", "y"), ("c", "x")):
        body = widget(name)
        body["metadata"]["labels"] = {"team": team}
        kube.widgets().create(body)
    kube.custom.delete_collection_namespaced_custom_object(
        GROUP, "v1", "default", "widgets", label_selector="team=x"
    )
    assert [i["metadata"]["name"] for i in kube.widgets().list()["items"]] == ["b"]


def test_project_crds_install_when_present(apiserver: Emulator) -> None:
    """The CRDs generated into deploy/crds pass the emulator's CRD validation (structural
    schemas, names, list types) when they exist."""
    crds = Path(__file__).resolve().parents[2] / "deploy" / "crds"
    if not crds.is_dir():
        pytest.skip("deploy/crds not generated yet")
    names = apiserver.install_crds([crds])
    assert names
    for name in names:
        plural, group = name.split(".", 1)
        version = next(
            v["name"]
            for v in clients(apiserver).api.sanitize_for_serialization(
                clients(apiserver).apiext.read_custom_resource_definition(name)
            )["spec"]["versions"]
            if v["storage"]
        )
        assert apiserver.store.lookup(group, version, plural) is not None


def test_cluster_wide_collection_writes_of_namespaced_kinds_are_405(
    apiserver: Emulator, kube: Kube
) -> None:
    code, body = raw(kube, "DELETE", f"/apis/{GROUP}/v1/widgets")
    assert code == 405 and body["reason"] == "MethodNotAllowed"
    code, body = raw(kube, "POST", f"/apis/{GROUP}/v1/widgets", widget("w1"))
    assert code == 405
