"""Custom resources against their CRD's structural schema: validation (422 with causes),
pruning of unknown fields, defaulting, nullable, int-or-string, list types; CRD checks."""

from __future__ import annotations

import json
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


def _causes(exc: ApiException) -> dict[str, tuple[str, str]]:
    st = status_of(exc)
    assert st["code"] == 422 and st["reason"] == "Invalid"
    assert st["details"]["kind"] == "Widget" and st["details"]["group"] == GROUP
    return {c["field"]: (c["reason"], c["message"]) for c in st["details"]["causes"]}


@pytest.mark.parametrize(
    ("spec", "field", "reason", "message"),
    [
        (
            {"bridge": "Br!"},
            "spec.bridge",
            "FieldValueInvalid",
            "Invalid value: \"Br!\": spec.bridge in body should match '^[a-z][a-z0-9]*$'",
        ),
        (
            {"bridge": "b" * 16},
            "spec.bridge",
            "FieldValueTooLong",
            "Too long: may not be more than 15 bytes",
        ),
        (
            {"mtu": 67},
            "spec.mtu",
            "FieldValueInvalid",
            "Invalid value: 67: spec.mtu in body should be greater than or equal to 68",
        ),
        (
            {"mtu": 9001},
            "spec.mtu",
            "FieldValueInvalid",
            "Invalid value: 9001: spec.mtu in body should be less than or equal to 9000",
        ),
        (
            {"mtu": "1500"},
            "spec.mtu",
            "FieldValueTypeInvalid",
            'Invalid value: "string": spec.mtu in body must be of type integer: "string"',
        ),
        (
            {"mode": "magic"},
            "spec.mode",
            "FieldValueNotSupported",
            'Unsupported value: "magic": supported values: "netplan", "networkmanager", "none", "auto"',
        ),
        (
            {"uplinks": []},
            "spec.uplinks",
            "FieldValueInvalid",
            "Invalid value: 0: spec.uplinks in body should have at least 1 items",
        ),
        (
            {"uplinks": ["a", 1]},
            "spec.uplinks[1]",
            "FieldValueTypeInvalid",
            'Invalid value: "integer": spec.uplinks[1] in body must be of type string: "integer"',
        ),
        ({"tags": ["a", "a"]}, "spec.tags[1]", "FieldValueDuplicate", 'Duplicate value: "a"'),
        (
            {"ports": [{"name": "p"}, {"name": "p"}]},
            "spec.ports[1]",
            "FieldValueDuplicate",
            'Duplicate value: map[string]interface {}{"name":"p"}',
        ),
        ({"ports": [{"vlan": 1}]}, "spec.ports[0].name", "FieldValueRequired", "Required value"),
        (
            {"options": {"k": 1}},
            "spec.options.k",
            "FieldValueTypeInvalid",
            'Invalid value: "integer": spec.options.k in body must be of type string: "integer"',
        ),
        (
            {"address": "10.0.0.300"},
            "spec.address",
            "FieldValueInvalid",
            'Invalid value: "10.0.0.300": spec.address in body must be of type ipv4: "10.0.0.300"',
        ),
        (
            {"port": True},
            "spec.port",
            "FieldValueTypeInvalid",
            'Invalid value: "boolean": spec.port in body must be of type integer-or-string: "boolean"',
        ),
    ],
)
def test_schema_violations_are_422_with_field_causes(
    kube: Kube, spec: dict[str, Any], field: str, reason: str, message: str
) -> None:
    with pytest.raises(ApiException) as ei:
        kube.widgets().create(widget("w1", **spec))
    causes = _causes(ei.value)
    assert causes[field] == (reason, message)
    assert kube.widgets().list()["items"] == []


def test_every_error_is_reported_at_once(kube: Kube) -> None:
    body = widget("w1", mtu=1, mode="x")
    del body["spec"]["bridge"]
    with pytest.raises(ApiException) as ei:
        kube.widgets().create(body)
    causes = _causes(ei.value)
    assert set(causes) == {"spec.bridge", "spec.mtu", "spec.mode"}
    st = status_of(ei.value)
    assert st["message"].startswith(f'Widget.{GROUP} "w1" is invalid: [')
    with pytest.raises(ApiException) as ei:
        kube.widgets().create(
            {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "w2"}}
        )
    assert _causes(ei.value) == {"spec": ("FieldValueRequired", "Required value")}


def test_unknown_fields_are_pruned_with_a_warning(apiserver: Emulator, kube: Kube) -> None:
    body = widget(
        "w1",
        unknown="x",
        extra={"free": {"form": [1, {"x": None}]}},
        ports=[{"name": "p", "junk": 1}],
    )
    body["metadata"]["bogus"] = "dropped"
    body["topLevel"] = 1
    got = kube.widgets().create(body)
    assert "unknown" not in got["spec"] and "topLevel" not in got and "bogus" not in got["metadata"]
    assert got["spec"]["extra"] == {"free": {"form": [1, {"x": None}]}}  # preserve-unknown-fields
    assert got["spec"]["ports"] == [{"name": "p"}]
    _, code, headers = kube.custom.create_namespaced_custom_object_with_http_info(
        GROUP, "v1", "default", "widgets", dict(widget("w2"), topLevel=1)
    )
    assert code == 201 and headers["Warning"] == '299 - "unknown field \\"topLevel\\""'
    with pytest.raises(ApiException) as ei:
        kube.widgets().create(dict(widget("w3"), topLevel=1), field_validation="Strict")
    st = status_of(ei.value)
    assert st["code"] == 400 and st["message"] == 'strict decoding error: unknown field "topLevel"'


def test_status_without_properties_prunes_everything(kube: Kube) -> None:
    schema = {"type": "object", "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                                               "status": {"type": "object"}}}  # fmt: skip
    kube.apiext.create_custom_resource_definition(crd("Loose", "looses", schema=schema))
    c = kube.custom
    c.create_namespaced_custom_object(GROUP, "v1", "default", "looses", {
        "apiVersion": f"{GROUP}/v1", "kind": "Loose", "metadata": {"name": "l"}, "spec": {"any": {"thing": 1}},
    })  # fmt: skip
    got = c.patch_namespaced_custom_object_status(
        GROUP, "v1", "default", "looses", "l", {"status": {"phase": "x"}}
    )
    assert got["spec"] == {"any": {"thing": 1}} and got.get("status", {}) == {}


def test_defaults_nullable_and_null_pruning(kube: Kube) -> None:
    got = kube.widgets().create(widget("w1", note=None, mode=None))
    assert got["spec"]["mtu"] == 1500
    assert got["spec"]["note"] is None  # nullable: kept
    assert "mode" not in got["spec"]  # not nullable: null pruned
    got = kube.widgets().patch("w1", {"spec": {"mtu": None}})
    assert got["spec"]["mtu"] == 1500  # deleted, then defaulted again


def test_int_or_string(kube: Kube) -> None:
    assert kube.widgets().create(widget("a", port=80))["spec"]["port"] == 80
    assert kube.widgets().create(widget("b", port="http"))["spec"]["port"] == "http"


def test_objects_without_schema_are_stored_as_is(apiserver: Emulator, kube: Kube) -> None:
    from reconciler.vocab import Resource

    apiserver.register(Resource(GROUP, "v1", "Blob", "blobs", True, status=False))
    body = {"apiVersion": f"{GROUP}/v1", "kind": "Blob", "metadata": {"name": "b"},
            "spec": {"x": [1, "two", {"three": 3.5}]}, "data": {"deep": {"er": None}}}  # fmt: skip
    got = kube.custom.create_namespaced_custom_object(GROUP, "v1", "default", "blobs", body)
    assert got["spec"] == body["spec"] and got["data"] == body["data"]


def test_register_with_schema(apiserver: Emulator, kube: Kube) -> None:
    from reconciler.vocab import Resource

    schema = {"type": "object", "properties": {"spec": {"type": "object", "required": ["size"],
              "properties": {"size": {"type": "integer"}}}}}  # fmt: skip
    apiserver.register(Resource(GROUP, "v1", "Box", "boxes", False), schema)
    with pytest.raises(ApiException) as ei:
        kube.custom.create_cluster_custom_object(GROUP, "v1", "boxes", {
            "apiVersion": f"{GROUP}/v1", "kind": "Box", "metadata": {"name": "b"}, "spec": {},
        })  # fmt: skip
    assert status_of(ei.value)["details"]["causes"][0]["field"] == "spec.size"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda c: c["spec"]["versions"][0].pop("schema"),
            "spec.versions[0].schema.openAPIV3Schema",
        ),
        (
            lambda c: c["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
                "spec"
            ].pop("type"),
            "spec.versions[0].schema.openAPIV3Schema.properties[spec].type",
        ),
        (
            lambda c: c["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
                "spec"
            ].update(additionalProperties={"type": "string"}),
            "spec.versions[0].schema.openAPIV3Schema.properties[spec].additionalProperties",
        ),
        (
            lambda c: c["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
                "properties"
            ]["ports"].pop("x-kubernetes-list-map-keys"),
            "spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[ports].x-kubernetes-list-map-keys",
        ),
        (lambda c: c["metadata"].update(name="wrong.test.underlay.dev"), "metadata.name"),
        (lambda c: c["spec"].update(scope="Global"), "spec.scope"),
        (lambda c: c["spec"]["versions"][0].update(storage=False), "spec.versions"),
    ],
)
def test_invalid_crds_are_rejected(kube: Kube, mutate: Any, field: str) -> None:
    body = crd("Thing", "things")
    mutate(body)
    with pytest.raises(ApiException) as ei:
        kube.apiext.create_custom_resource_definition(json.loads(json.dumps(body)))
    st = status_of(ei.value)
    assert st["code"] == 422 and st["details"]["kind"] == "CustomResourceDefinition"
    assert field in [c["field"] for c in st["details"]["causes"]]
    with pytest.raises(ApiException) as ei:
        kube.custom.list_namespaced_custom_object(GROUP, "v1", "default", "things")
    assert ei.value.status == 404


def test_crd_schema_keeps_only_known_schema_keywords(kube: Kube) -> None:
    body = crd("Thing", "things")
    props = body["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]
    props["mtu"]["const"] = 5  # not a JSONSchemaProps field: dropped by the server
    code, _ = raw(kube, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body)
    assert code == 201
    stored = kube.api.sanitize_for_serialization(
        kube.apiext.read_custom_resource_definition(f"things.{GROUP}")
    )
    mtu = stored["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["mtu"]
    assert "const" not in mtu and mtu["maximum"] == 9000
