"""Helpers for the emulator's own tests: real ``kubernetes`` clients and a test CRD."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.kube.emulator import Emulator

GROUP = "test.underlay.dev"
VERSION = "v1"

WIDGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["bridge"],
            "properties": {
                "bridge": {"type": "string", "pattern": "^[a-z][a-z0-9]*$", "maxLength": 15},
                "mtu": {"type": "integer", "minimum": 68, "maximum": 9000, "default": 1500},
                "mode": {"type": "string", "enum": ["netplan", "networkmanager", "none", "auto"]},
                "ports": {
                    "type": "array",
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["name"],
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}, "vlan": {"type": "integer"}},
                    },
                },
                "tags": {
                    "type": "array",
                    "x-kubernetes-list-type": "set",
                    "items": {"type": "string"},
                },
                "uplinks": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                "options": {"type": "object", "additionalProperties": {"type": "string"}},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "port": {"x-kubernetes-int-or-string": True},
                "note": {"type": "string", "nullable": True},
                "address": {"type": "string", "format": "ipv4"},
            },
        },
        "status": {
            "type": "object",
            "properties": {
                "phase": {"type": "string"},
                "allocatedIPs": {"type": "string"},
                "allocatedIPCount": {"type": "integer"},
                "capacity": {"type": "object", "additionalProperties": {"type": "integer"}},
                "conditions": {
                    "type": "array",
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["type"],
                    "items": {
                        "type": "object",
                        "required": ["type"],
                        "properties": {"type": {"type": "string"}, "status": {"type": "string"}},
                    },
                },
            },
        },
    },
}


def crd(
    kind: str = "Widget",
    plural: str = "widgets",
    *,
    group: str = GROUP,
    namespaced: bool = True,
    schema: dict[str, Any] | None = None,
    status: bool = True,
    versions: tuple[str, ...] = (VERSION,),
    short_names: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A CustomResourceDefinition body (first version is the storage version)."""
    vs = []
    for i, v in enumerate(versions):
        ver: dict[str, Any] = {
            "name": v,
            "served": True,
            "storage": i == 0,
            "schema": {
                "openAPIV3Schema": copy.deepcopy(schema if schema is not None else WIDGET_SCHEMA)
            },
        }
        if status:
            ver["subresources"] = {"status": {}}
        vs.append(ver)
    names: dict[str, Any] = {"kind": kind, "plural": plural}
    if short_names:
        names["shortNames"] = list(short_names)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "names": names,
            "scope": "Namespaced" if namespaced else "Cluster",
            "versions": vs,
        },
    }


def widget(name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    """A Widget custom object with ``spec.bridge`` defaulting to ``br1``."""
    spec.setdefault("bridge", "br1")
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


@dataclass
class Kube:
    """Typed API objects of the real client, configured from the emulator's kubeconfig."""

    api: client.ApiClient
    core: Any
    custom: Any
    coord: Any
    apiext: Any
    events: Any

    def widgets(self, ns: str = "default") -> WidgetsApi:
        return WidgetsApi(self.custom, ns)


class WidgetsApi:
    """Shorthand for CustomObjectsApi calls on test Widgets in one namespace."""

    def __init__(self, custom: Any, ns: str) -> None:
        self.c = custom
        self.ns = ns

    def create(self, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self.c.create_namespaced_custom_object(
            GROUP, VERSION, self.ns, "widgets", body, **kw
        )

    def get(self, name: str) -> dict[str, Any]:
        return self.c.get_namespaced_custom_object(GROUP, VERSION, self.ns, "widgets", name)

    def replace(self, name: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self.c.replace_namespaced_custom_object(
            GROUP, VERSION, self.ns, "widgets", name, body, **kw
        )

    def replace_status(self, name: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self.c.replace_namespaced_custom_object_status(
            GROUP, VERSION, self.ns, "widgets", name, body, **kw
        )

    def patch(self, name: str, body: Any, **kw: Any) -> dict[str, Any]:
        return self.c.patch_namespaced_custom_object(
            GROUP, VERSION, self.ns, "widgets", name, body, **kw
        )

    def patch_status(self, name: str, body: Any, **kw: Any) -> dict[str, Any]:
        return self.c.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.ns, "widgets", name, body, **kw
        )

    def apply(
        self, body: dict[str, Any], manager: str = "test", force: bool | None = None, **kw: Any
    ) -> dict[str, Any]:
        if force is not None:
            kw["force"] = force
        return self.patch(
            body["metadata"]["name"], body, field_manager=manager,
            _content_type="application/apply-patch+yaml", **kw,
        )  # fmt: skip

    def apply_status(
        self, body: dict[str, Any], manager: str = "test", **kw: Any
    ) -> dict[str, Any]:
        return self.patch_status(
            body["metadata"]["name"], body, field_manager=manager,
            _content_type="application/apply-patch+yaml", **kw,
        )  # fmt: skip

    def delete(self, name: str, **kw: Any) -> dict[str, Any]:
        return self.c.delete_namespaced_custom_object(
            GROUP, VERSION, self.ns, "widgets", name, **kw
        )

    def list(self, **kw: Any) -> dict[str, Any]:
        return self.c.list_namespaced_custom_object(GROUP, VERSION, self.ns, "widgets", **kw)


def clients(emu: Emulator) -> Kube:
    """Build the real client from ``emu.kubeconfig`` (as product code would)."""
    assert emu.kubeconfig is not None
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(emu.kubeconfig), client_configuration=cfg)
    api = client.ApiClient(cfg)
    return Kube(
        api,
        client.CoreV1Api(api),
        client.CustomObjectsApi(api),
        client.CoordinationV1Api(api),
        client.ApiextensionsV1Api(api),
        client.EventsV1Api(api),
    )


def raw(kube: Kube, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Send a request the typed client would refuse to build (it validates bodies itself)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    req = kube.api.param_serialize(method, path, header_params=headers, body=body)
    resp = kube.api.call_api(*req)
    data = resp.read()
    return resp.status, json.loads(data) if data else None


def status_of(exc: ApiException) -> dict[str, Any]:
    """The Status body of an API error."""
    assert exc.body, exc
    body = json.loads(exc.body)
    assert body["kind"] == "Status" and body["apiVersion"] == "v1" and body["status"] == "Failure"
    assert body["code"] == exc.status
    assert body["metadata"] == {}
    assert isinstance(body, dict)
    return body
