"""Generate CustomResourceDefinitions from the JSON Schemas in ``schemas/``.

``schemas/`` (JSON Schema Draft 2020-12) is the single source of truth; the CRDs in
``deploy/crds/`` are this module's output and a test fails when they drift. The conversion
keeps the subset Kubernetes structural schemas accept (Kubernetes docs, "CustomResourceDefinition
- Specifying a structural schema"): ``additionalProperties: false`` is dropped (the API server
prunes unknown fields instead, which is why ``underlay validate`` exists), ``const`` becomes a
one-value ``enum``, ``["x", "null"]`` types become ``nullable``, local ``$ref`` are inlined,
int-or-string unions become ``x-kubernetes-int-or-string``; metadata is left to the server.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from reconciler import vocab
from reconciler.validation import load_schema
from reconciler.vocab import Resource

_DROP = {
    "$schema",
    "$id",
    "$defs",
    "$comment",
    "additionalProperties",
    "unevaluatedProperties",
    "examples",
}

PRINTER_COLUMNS: dict[str, list[dict[str, Any]]] = {
    "SpiderIPPool": [
        {"name": "VERSION", "type": "string", "jsonPath": ".spec.ipVersion"},
        {"name": "SUBNET", "type": "string", "jsonPath": ".spec.subnet"},
        {"name": "ALLOCATED-IP-COUNT", "type": "integer", "jsonPath": ".status.allocatedIPCount"},
        {"name": "TOTAL-IP-COUNT", "type": "integer", "jsonPath": ".status.totalIPCount"},
        {"name": "DEFAULT", "type": "boolean", "jsonPath": ".spec.default"},
        {"name": "DISABLE", "type": "boolean", "jsonPath": ".spec.disable", "priority": 1},
        {"name": "NodeName", "type": "string", "jsonPath": ".spec.nodeName", "priority": 1},
        {"name": "MultusName", "type": "string", "jsonPath": ".spec.multusName", "priority": 1},
    ],
    "SpiderEndpoint": [
        {"name": "INTERFACE", "type": "string", "jsonPath": ".status.current.ips[0].interface"},
        {"name": "IPV4POOL", "type": "string", "jsonPath": ".status.current.ips[0].ipv4Pool"},
        {"name": "IPV4", "type": "string", "jsonPath": ".status.current.ips[0].ipv4"},
        {"name": "IPV6POOL", "type": "string", "jsonPath": ".status.current.ips[0].ipv6Pool"},
        {"name": "IPV6", "type": "string", "jsonPath": ".status.current.ips[0].ipv6"},
        {"name": "NODE", "type": "string", "jsonPath": ".status.current.node"},
    ],
    "SpiderMultusConfig": [
        {"name": "CNITYPE", "type": "string", "jsonPath": ".spec.cniType"},
    ],
    "OvsBridge": [
        {"name": "BRIDGE", "type": "string", "jsonPath": ".spec.bridge"},
        {"name": "UPLINKS", "type": "string", "jsonPath": ".spec.uplinks"},
        {"name": "PERSISTENCE", "type": "string", "jsonPath": ".spec.persistence"},
    ],
    "OvsBridgeEnactment": [
        {
            "name": "NODE",
            "type": "string",
            "jsonPath": ".metadata.labels." + vocab.LABEL_ENACTMENT_NODE.replace(".", "\\."),
        },
        {
            "name": "BRIDGE",
            "type": "string",
            "jsonPath": ".metadata.labels." + vocab.LABEL_ENACTMENT_BRIDGE.replace(".", "\\."),
        },
        {
            "name": "READY",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        },
        {
            "name": "REASON",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
        },
    ],
    "GitSync": [
        {
            "name": "READY",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        },
        {"name": "REVISION", "type": "string", "jsonPath": ".status.lastAppliedRevision"},
    ],
}


def _resolve(node: Any, root: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            ref = node["$ref"]
            if not ref.startswith("#/"):
                raise ValueError(f"only local $ref can be converted to a CRD, got {ref}")
            target: Any = root
            for part in ref[2:].split("/"):
                target = target[part]
            merged = {
                **_resolve(copy.deepcopy(target), root),
                **{k: v for k, v in node.items() if k != "$ref"},
            }
            return merged
        return {k: _resolve(v, root) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root) for v in node]
    return node


def to_structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Convert one JSON Schema node (refs already inlined) into a CRD openAPIV3Schema node."""
    out: dict[str, Any] = {}
    if schema.get("x-kubernetes-int-or-string"):
        return {
            k: v
            for k, v in {
                "description": schema.get("description"),
                "x-kubernetes-int-or-string": True,
                "anyOf": [{"type": "integer"}, {"type": "string"}],
            }.items()
            if v is not None
        }
    for k, v in schema.items():
        if k in _DROP or k == "title":
            continue
        if k == "const":
            out["enum"] = [v]
        elif k == "type" and isinstance(v, list):
            types = [t for t in v if t != "null"]
            out["type"] = types[0]
            if "null" in v:
                out["nullable"] = True
        elif k == "properties":
            out["properties"] = {p: to_structural(s) for p, s in v.items()}
        elif k == "items":
            out["items"] = to_structural(v)
        elif k in ("anyOf", "oneOf", "allOf"):
            # logical junctors may only carry value validations, never types or structure
            out[k] = [
                {
                    kk: vv
                    for kk, vv in to_structural(s).items()
                    if kk
                    not in ("type", "description", "default", "nullable", "properties", "items")
                }
                for s in v
            ]
            out[k] = [s for s in out[k] if s]
            if not out[k]:
                del out[k]
        elif k == "not":
            continue
        else:
            out[k] = copy.deepcopy(v)
    ap = schema.get("additionalProperties")
    if isinstance(ap, dict) and "properties" not in schema:
        out["additionalProperties"] = to_structural(ap)
    if (
        out.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _metadata(schema: dict[str, Any]) -> dict[str, Any]:
    """CRD schema of ``metadata``: only name restrictions are allowed there (structural rule)."""
    name = (schema.get("properties") or {}).get("name") or {}
    rules = {k: name[k] for k in ("maxLength", "pattern") if k in name}
    out: dict[str, Any] = {"type": "object"}
    if rules:
        out["properties"] = {"name": {"type": "string", **rules}}
    return out


def crd_for(res: Resource) -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition for ``res``."""
    raw = copy.deepcopy(load_schema(res))
    schema = _resolve(raw, raw)
    props = dict(schema.get("properties") or {})
    top: dict[str, Any] = {
        "type": "object",
        "description": schema.get("description", res.kind),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": _metadata(props.get("metadata") or {}),
        },
    }
    for name in ("spec", "status"):
        if name in props:
            top["properties"][name] = to_structural(props[name])
    for name, sub in props.items():
        if name not in ("apiVersion", "kind", "metadata", "spec", "status"):
            top["properties"][name] = to_structural(sub)
    if res.status and "status" not in top["properties"]:
        top["properties"]["status"] = {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
        }
    required = [r for r in schema.get("required", []) if r in ("spec",)]
    if required:
        top["required"] = required
    version: dict[str, Any] = {
        "name": res.version,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": top},
    }
    if res.status:
        version["subresources"] = {"status": {}}
    if res.kind in PRINTER_COLUMNS:
        version["additionalPrinterColumns"] = PRINTER_COLUMNS[res.kind]
    names: dict[str, Any] = {
        "kind": res.kind,
        "listKind": f"{res.kind}List",
        "plural": res.plural,
        "singular": res.kind.lower(),
    }
    if res.short_names:
        names["shortNames"] = list(res.short_names)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{res.plural}.{res.group}",
            "labels": {vocab.LABEL_MANAGED_BY: vocab.MANAGED_BY_VALUE},
        },
        "spec": {
            "group": res.group,
            "names": names,
            "scope": "Namespaced" if res.namespaced else "Cluster",
            "versions": [version],
        },
    }


def generate_all() -> list[dict[str, Any]]:
    """Every CRD underlay serves, in ``vocab.ALL_CUSTOM`` order."""
    return [crd_for(r) for r in vocab.ALL_CUSTOM]


def file_name(crd: dict[str, Any]) -> str:
    """``<plural>.<group>.yaml``."""
    return f"{crd['metadata']['name']}.yaml"


def dump(crd: dict[str, Any]) -> str:
    """YAML text of one CRD, with the generated-file header."""
    header = "# Generated by `underlay crds --out-dir deploy/crds` from schemas/. Do not edit.\n"
    return header + yaml.safe_dump(crd, sort_keys=False, width=120)


def write_all(out_dir: Path, crds: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write one file per CRD into ``out_dir``; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for crd in crds if crds is not None else generate_all():
        p = out_dir / file_name(crd)
        p.write_text(dump(crd), encoding="utf-8")
        paths.append(p)
    return paths
