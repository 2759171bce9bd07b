"""The emulator's REST basics, driven by the real kubernetes client: discovery, resource
versions, errors as Status objects, status subresources, generation, names and scopes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from tests.kube.emulator import Emulator
from tests.kube.helpers import GROUP, Kube, clients, crd, raw, status_of, widget


@pytest.fixture
def kube(apiserver: Emulator) -> Kube:
    k = clients(apiserver)
    k.apiext.create_custom_resource_definition(crd(short_names=("wd",)))
    return k


def _raw(emu: Emulator, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(emu.url + path, data=data, method=method)  # type: ignore[operator]
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw.startswith(b"{") else raw
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_discovery_lists_builtins_and_crds(apiserver: Emulator, kube: Kube) -> None:
    core = {r.name: r for r in kube.core.get_api_resources().resources}
    assert core["pods"].namespaced and core["pods"].kind == "Pod"
    assert "watch" in core["pods"].verbs and "patch" in core["pods"].verbs
    assert core["pods"].short_names == ["po"]
    assert core["pods/status"].verbs == ["get", "patch", "update"]
    assert not core["nodes"].namespaced and "nodes/status" in core
    assert "configmaps/status" not in core
    groups = {g.name: g for g in client.ApisApi(kube.api).get_api_versions().groups}
    preferred = groups["coordination.k8s.io"].preferred_version
    assert preferred is not None and preferred.version == "v1"
    assert groups[GROUP].versions[0].group_version == f"{GROUP}/v1"
    res = client.CustomObjectsApi(kube.api).get_api_resources(GROUP, "v1")
    by_name = {r.name: r for r in res.resources}
    assert by_name["widgets"].kind == "Widget" and by_name["widgets"].short_names == ["wd"]
    assert "widgets/status" in by_name
    assert client.VersionApi(kube.api).get_code().git_version.startswith("v1.")
    for probe in ("/healthz", "/readyz", "/livez"):
        assert _raw(apiserver, "GET", probe) == (200, b"ok")
    # the dynamic client resolves kinds through discovery alone
    dyn = DynamicClient(kube.api)
    widgets = dyn.resources.get(api_version=f"{GROUP}/v1", kind="Widget")
    widgets.create(body=widget("w1"), namespace="default")
    assert [i.metadata.name for i in widgets.get(namespace="default").items] == ["w1"]


def test_every_write_gets_a_new_resource_version(kube: Kube) -> None:
    w = kube.widgets()
    seen = []
    obj = w.create(widget("w1"))
    seen.append(obj["metadata"]["resourceVersion"])
    obj["spec"]["mtu"] = 1400
    obj = w.replace("w1", obj)
    seen.append(obj["metadata"]["resourceVersion"])
    obj = w.patch("w1", {"metadata": {"labels": {"a": "b"}}})
    seen.append(obj["metadata"]["resourceVersion"])
    obj["status"] = {"phase": "Ready"}
    obj = w.replace_status("w1", obj)
    seen.append(obj["metadata"]["resourceVersion"])
    cm = kube.core.create_namespaced_config_map(
        "default", {"metadata": {"name": "c"}, "data": {"k": "v"}}
    )
    seen.append(cm.metadata.resource_version)
    deleted = w.delete("w1")
    seen.append(deleted["metadata"]["resourceVersion"])
    assert all(s.isdigit() for s in seen)
    nums = [int(s) for s in seen]
    assert nums == sorted(nums) and len(set(nums)) == len(nums)
    listed = kube.widgets().list()
    assert int(listed["metadata"]["resourceVersion"]) >= nums[-1]


def test_create_sets_server_fields(kube: Kube) -> None:
    body = widget("w1")
    body["metadata"].update(
        uid="client-set", generation=7, creationTimestamp="2000-01-01T00:00:00Z"
    )
    obj = kube.widgets().create(body)
    md = obj["metadata"]
    assert md["uid"] != "client-set" and len(md["uid"]) == 36
    assert md["generation"] == 1
    assert md["creationTimestamp"] != "2000-01-01T00:00:00Z" and md["creationTimestamp"].endswith(
        "Z"
    )
    assert obj["spec"]["mtu"] == 1500  # schema default


def test_create_existing_name_is_409_already_exists(kube: Kube) -> None:
    kube.widgets().create(widget("w1"))
    with pytest.raises(ApiException) as ei:
        kube.widgets().create(widget("w1"))
    st = status_of(ei.value)
    assert st["code"] == 409 and st["reason"] == "AlreadyExists"
    assert st["message"] == f'widgets.{GROUP} "w1" already exists'
    assert st["details"] == {"name": "w1", "group": GROUP, "kind": "widgets"}
    kube.core.create_namespace({"metadata": {"name": "n2"}})
    with pytest.raises(ApiException) as ei:
        kube.core.create_namespace({"metadata": {"name": "n2"}})
    assert status_of(ei.value)["message"] == 'namespaces "n2" already exists'


def test_missing_object_is_404_with_details(kube: Kube) -> None:
    with pytest.raises(ApiException) as ei:
        kube.widgets().get("nope")
    st = status_of(ei.value)
    assert st["reason"] == "NotFound" and st["code"] == 404
    assert st["message"] == f'widgets.{GROUP} "nope" not found'
    assert st["details"] == {"name": "nope", "group": GROUP, "kind": "widgets"}
    with pytest.raises(ApiException) as ei:
        kube.core.read_namespaced_pod("ghost", "default")
    assert status_of(ei.value)["details"] == {"name": "ghost", "group": "", "kind": "pods"}
    for call in (
        lambda: kube.widgets().replace("nope", widget("nope")),
        lambda: kube.widgets().patch("nope", {"spec": {"mtu": 1000}}),
        lambda: kube.widgets().delete("nope"),
    ):
        with pytest.raises(ApiException) as ei:
            call()
        assert ei.value.status == 404


def test_stale_resource_version_is_409_conflict(kube: Kube) -> None:
    w = kube.widgets()
    first = w.create(widget("w1"))
    newer = dict(first, spec={"bridge": "br1", "mtu": 1400})
    w.replace("w1", newer)
    stale = dict(first, spec={"bridge": "br1", "mtu": 1300})
    with pytest.raises(ApiException) as ei:
        w.replace("w1", stale)
    st = status_of(ei.value)
    assert st["reason"] == "Conflict"
    assert st["message"] == (
        f'Operation cannot be fulfilled on widgets.{GROUP} "w1": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    assert st["details"] == {"name": "w1", "group": GROUP, "kind": "widgets"}
    assert w.get("w1")["spec"]["mtu"] == 1400
    with pytest.raises(ApiException) as ei:  # the status subresource checks it too
        w.replace_status("w1", dict(stale, status={"phase": "x"}))
    assert ei.value.status == 409
    with pytest.raises(ApiException) as ei:  # and a patch carrying a resourceVersion
        w.patch(
            "w1",
            {
                "metadata": {"resourceVersion": first["metadata"]["resourceVersion"]},
                "spec": {"mtu": 1000},
            },
        )
    assert ei.value.status == 409


def test_put_without_resource_version_is_unconditional(kube: Kube) -> None:
    w = kube.widgets()
    w.create(widget("w1"))
    body = widget("w1", mtu=2000)
    assert "resourceVersion" not in body["metadata"]
    assert w.replace("w1", body)["spec"]["mtu"] == 2000


def test_status_subresource_separates_spec_and_status(kube: Kube) -> None:
    w = kube.widgets()
    created = w.create(dict(widget("w1"), status={"phase": "Smuggled"}))
    assert "status" not in created  # create cannot set status
    created["status"] = {"phase": "Ignored"}
    created["spec"]["mtu"] = 1400
    after_main = w.replace("w1", created)
    assert "status" not in after_main and after_main["spec"]["mtu"] == 1400
    after_main["status"] = {"phase": "Ready"}
    after_main["spec"]["mtu"] = 9000
    after_main["metadata"]["labels"] = {"ignored": "yes"}
    after_status = w.replace_status("w1", after_main)
    assert after_status["status"] == {"phase": "Ready"}
    assert after_status["spec"]["mtu"] == 1400  # /status never changes spec...
    assert "labels" not in after_status["metadata"]  # ...nor metadata of a custom resource
    assert after_status["metadata"]["generation"] == 2
    patched = w.patch_status("w1", {"status": {"phase": "Degraded"}, "spec": {"mtu": 68}})
    assert patched["status"]["phase"] == "Degraded" and patched["spec"]["mtu"] == 1400
    got = w.get("w1")
    assert (
        kube.custom.get_namespaced_custom_object_status(GROUP, "v1", "default", "widgets", "w1")
        == got
    )


def test_node_status_subresource_and_quantities(kube: Kube) -> None:
    node = kube.core.create_node({"metadata": {"name": "n1"}, "status": {"capacity": {"cpu": "2"}}})
    assert node.status.capacity == {"cpu": "2"}  # nodes may be created with status
    node.status.capacity["underlay.dev/br1"] = "1000"
    replaced = kube.core.replace_node_status("n1", node)
    assert replaced.status.capacity == {"cpu": "2", "underlay.dev/br1": "1k"}  # canonical quantity
    replaced.status.capacity = {"cpu": "64"}
    replaced.metadata.labels = {"role": "worker"}
    main = kube.core.replace_node("n1", replaced)
    assert main.status.capacity["cpu"] == "2" and main.metadata.labels == {"role": "worker"}
    patched = kube.core.patch_node_status(
        "n1",
        [{"op": "add", "path": "/status/capacity/underlay.dev~1br2", "value": "2048Mi"}],
    )
    assert patched.status.capacity["underlay.dev/br2"] == "2Gi"


def test_generation_follows_spec_only(apiserver: Emulator, kube: Kube) -> None:
    w = kube.widgets()
    w.create(widget("w1"))
    assert w.patch("w1", {"metadata": {"labels": {"x": "y"}}})["metadata"]["generation"] == 1
    assert w.patch_status("w1", {"status": {"phase": "Ready"}})["metadata"]["generation"] == 1
    assert w.patch("w1", {"spec": {"mtu": 1400}})["metadata"]["generation"] == 2
    assert w.patch("w1", {"spec": {"mtu": 1400}})["metadata"]["generation"] == 2
    assert w.patch("w1", {"spec": {"mode": "auto"}})["metadata"]["generation"] == 3
    # without a status subresource, status is ordinary content and bumps generation
    kube.apiext.create_custom_resource_definition(crd("Plain", "plains", status=False))
    c = kube.custom
    c.create_namespaced_custom_object(GROUP, "v1", "default", "plains", {
        "apiVersion": f"{GROUP}/v1", "kind": "Plain", "metadata": {"name": "p"}, "spec": {"bridge": "b"},
        "status": {"phase": "A"},
    })  # fmt: skip
    got = c.get_namespaced_custom_object(GROUP, "v1", "default", "plains", "p")
    assert got["status"] == {"phase": "A"}
    again = c.patch_namespaced_custom_object(
        GROUP, "v1", "default", "plains", "p", {"status": {"phase": "B"}}
    )
    assert again["metadata"]["generation"] == 2
    with pytest.raises(ApiException) as ei:
        c.get_namespaced_custom_object_status(GROUP, "v1", "default", "plains", "p")
    assert ei.value.status == 404


def test_names_are_validated(kube: Kube) -> None:
    with pytest.raises(ApiException) as ei:
        kube.widgets().create(widget("Bad_Name"))
    st = status_of(ei.value)
    assert st["code"] == 422 and st["reason"] == "Invalid"
    assert st["details"]["causes"][0]["field"] == "metadata.name"
    assert st["details"]["causes"][0]["reason"] == "FieldValueInvalid"
    assert "RFC 1123 subdomain" in st["message"]
    body = widget("x")
    del body["metadata"]["name"]
    with pytest.raises(ApiException) as ei:
        kube.widgets().create(body)
    st = status_of(ei.value)
    assert st["details"]["causes"][0] == {
        "reason": "FieldValueRequired",
        "message": "Required value: name or generateName is required",
        "field": "metadata.name",
    }
    body["metadata"]["generateName"] = "gen-"
    made = kube.widgets().create(body)
    assert made["metadata"]["name"].startswith("gen-") and len(made["metadata"]["name"]) == 9
    with pytest.raises(ApiException) as ei:  # namespaces are DNS-1123 labels
        kube.core.create_namespace({"metadata": {"name": "a.b"}})
    assert ei.value.status == 422
    with pytest.raises(ApiException) as ei:
        kube.core.create_namespaced_config_map(
            "default", {"metadata": {"name": "c", "labels": {"bad key!": "v"}}}
        )
    assert status_of(ei.value)["details"]["causes"][0]["field"] == "metadata.labels"


def test_url_and_body_must_agree(kube: Kube) -> None:
    w = kube.widgets()
    w.create(widget("w1"))
    with pytest.raises(ApiException) as ei:
        w.replace("w1", widget("w2"))
    st = status_of(ei.value)
    assert st["code"] == 400 and st["reason"] == "BadRequest"
    assert st["message"] == "the name of the object (w2) does not match the name on the URL (w1)"
    kube.core.create_namespace({"metadata": {"name": "other"}})
    with pytest.raises(ApiException) as ei:
        w.create(widget("w3", namespace="other"))
    assert status_of(ei.value)["message"] == (
        "the namespace of the provided object does not match the namespace sent on the request"
    )
    with pytest.raises(ApiException) as ei:
        w.create(dict(widget("w4"), kind="Gadget"))
    assert ei.value.status == 400
    with pytest.raises(ApiException) as ei:
        w.create({"metadata": {"name": "w5"}, "spec": {"bridge": "b"}})  # no apiVersion/kind
    assert ei.value.status == 400
    with pytest.raises(ApiException) as ei:
        w.create(dict(widget("w6"), metadata={"name": "w6", "resourceVersion": "5"}))
    assert (
        status_of(ei.value)["message"]
        == "resourceVersion should not be set on objects to be created"
    )


def test_namespace_must_exist(kube: Kube) -> None:
    with pytest.raises(ApiException) as ei:
        kube.widgets("nowhere").create(widget("w1", namespace="nowhere"))
    st = status_of(ei.value)
    assert st["code"] == 404 and st["message"] == 'namespaces "nowhere" not found'


def test_unregistered_resource_is_404(kube: Kube) -> None:
    for call in (
        lambda: kube.custom.list_namespaced_custom_object(GROUP, "v1", "default", "gadgets"),
        lambda: kube.custom.list_namespaced_custom_object(GROUP, "v9", "default", "widgets"),
        lambda: kube.custom.list_cluster_custom_object("nothing.example.com", "v1", "things"),
        lambda: client.CustomObjectsApi(kube.api).get_api_resources("nothing.example.com", "v1"),
    ):
        with pytest.raises(ApiException) as ei:
            call()
        st = status_of(ei.value)
        assert st["reason"] == "NotFound"
        assert st["message"] == "the server could not find the requested resource"


def test_scope_is_enforced_by_the_url(apiserver: Emulator, kube: Kube) -> None:
    kube.core.create_node({"metadata": {"name": "n1"}})
    assert _raw(apiserver, "GET", "/api/v1/namespaces/default/nodes/n1")[0] == 404
    assert _raw(apiserver, "GET", "/api/v1/nodes/n1")[0] == 200
    kube.widgets().create(widget("w1"))
    assert _raw(apiserver, "GET", f"/apis/{GROUP}/v1/widgets/w1")[0] == 404
    kube.core.create_namespace({"metadata": {"name": "b"}})
    kube.widgets("b").create(widget("w2", namespace="b"))
    everywhere = kube.custom.list_cluster_custom_object(GROUP, "v1", "widgets")
    assert sorted(
        (i["metadata"]["namespace"], i["metadata"]["name"]) for i in everywhere["items"]
    ) == [
        ("b", "w2"),
        ("default", "w1"),
    ]
    cluster_obj = kube.core.create_node({"metadata": {"name": "n2", "namespace": "ignored"}})
    assert cluster_obj.metadata.namespace is None


def test_unsupported_verbs_are_405(apiserver: Emulator, kube: Kube) -> None:
    kube.widgets().create(widget("w1"))
    code, body = _raw(
        apiserver, "POST", f"/apis/{GROUP}/v1/namespaces/default/widgets/w1", widget("w1")
    )
    assert code == 405 and body["reason"] == "MethodNotAllowed" and body["kind"] == "Status"
    code, body = _raw(
        apiserver, "PUT", f"/apis/{GROUP}/v1/namespaces/default/widgets", widget("w1")
    )
    assert code == 405
    code, body = _raw(apiserver, "DELETE", f"/apis/{GROUP}/v1/namespaces/default/widgets/w1/status")
    assert code == 405


def test_errors_are_status_objects_for_every_code(apiserver: Emulator, kube: Kube) -> None:
    for method, path, want in (
        ("GET", "/apis/nothing/v1", 404),
        ("GET", "/api/v2/pods", 404),
        ("GET", "/api/v1/pods?labelSelector=a%20in%20(", 400),
        ("GET", "/api/v1/pods?fieldSelector=spec.bogus%3Dx", 400),
    ):
        code, body = _raw(apiserver, method, path)
        assert code == want, path
        assert body["kind"] == "Status" and body["status"] == "Failure" and body["code"] == want


def test_builtin_objects_decode_into_client_models(apiserver: Emulator, kube: Kube) -> None:
    """Built-in kinds are pruned, defaulted and type-checked as the API server does, so typed
    reads of the client's (extra="forbid") models always succeed."""
    code, _ = _raw(apiserver, "POST", "/api/v1/namespaces/default/pods", {
        "metadata": {"name": "p1", "annotations": {"a": "b"}},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "ports": [{"containerPort": 80}], "bogus": 1}]},
    })  # fmt: skip
    assert code == 201
    pod = kube.core.read_namespaced_pod("p1", "default")
    assert pod.status.phase == "Pending"
    c = pod.spec.containers[0]
    assert c.ports[0].protocol == "TCP" and c.image_pull_policy == "IfNotPresent"
    assert pod.spec.restart_policy == "Always"
    lease = kube.coord.create_namespaced_lease("default", {
        "metadata": {"name": "l"}, "spec": {"holderIdentity": "me", "renewTime": "2024-05-01T10:00:00.5Z"},
    })  # fmt: skip
    assert lease.spec.holder_identity == "me"
    code, body = raw(kube, "GET", "/apis/coordination.k8s.io/v1/namespaces/default/leases/l")
    assert body["spec"]["renewTime"] == "2024-05-01T10:00:00.500000Z"  # MicroTime
    secret = kube.core.create_namespaced_secret(
        "default", {"metadata": {"name": "s"}, "stringData": {"k": "v"}}
    )
    assert secret.data == {"k": "dg=="} and secret.type == "Opaque"
    with pytest.raises(ApiException) as ei:
        kube.core.create_namespaced_pod(
            "default", {"metadata": {"name": "p2"}, "spec": {"containers": []}}
        )
    assert status_of(ei.value)["details"]["causes"][0]["field"] == "spec.containers"
    code, body = _raw(apiserver, "POST", "/apis/coordination.k8s.io/v1/namespaces/default/leases", {
        "metadata": {"name": "l2"}, "spec": {"leaseDurationSeconds": "ten"},
    })  # fmt: skip
    assert (
        code == 400 and body["reason"] == "BadRequest" and "leaseDurationSeconds" in body["message"]
    )


def test_yaml_request_bodies(apiserver: Emulator, kube: Kube) -> None:
    req = urllib.request.Request(
        f"{apiserver.url}/api/v1/namespaces/default/configmaps",
        data=b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-yaml\ndata:\n  k: v\n",
        method="POST",
        headers={"Content-Type": "application/yaml"},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 201
    assert kube.core.read_namespaced_config_map("from-yaml", "default").data == {"k": "v"}
