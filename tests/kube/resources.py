"""Resource types the emulator serves: built-in kinds and CustomResourceDefinitions.

A ``ResourceType`` is one (group, version, plural) the API server routes, with what the
registry strategy of that kind does: scope, status subresource, name rules, defaults applied on
every write, fields the server sets on create, extra validation, supported field selectors.
Sources: Kubernetes API reference (core/v1, coordination.k8s.io/v1, events.k8s.io/v1,
apiextensions.k8s.io/v1) and the registry strategies in k8s.io/kubernetes/pkg/registry.
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import models

from tests.kube.errors import FieldError
from tests.kube.shapes import Shape, compile_schema, model_shape
from tests.kube.validation import DNS1123_LABEL, name_errors

Obj = dict[str, Any]
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass(eq=False)
class ResourceType:
    """One served (group, version, plural) and the behaviour of its registry strategy."""

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    status: bool = False
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    builtin: bool = True
    name_rule: str = "subdomain"
    model: Any = None
    schema: dict[str, Any] | None = None
    storage_version: str = ""
    crd_name: str | None = None
    field_labels: frozenset[str] = frozenset()
    return_deleted: bool = False
    create_status: Callable[[Obj], Any] | None = None
    drop_status_on_create: bool = False
    defaulter: Callable[[Obj], None] | None = None
    validator: Callable[[Obj, Obj | None], list[FieldError]] | None = None
    _shape: Shape | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.singular:
            self.singular = self.kind.lower()
        if not self.storage_version:
            self.storage_version = self.version

    @property
    def shape(self) -> Shape:
        """Root Shape (from the client model for built-ins, from the CRD schema otherwise)."""
        if self._shape is None:
            if self.model is not None:
                self._shape = model_shape(self.model)
            else:
                self._shape = compile_schema(self.schema, root=True)
        return self._shape

    @property
    def gr(self) -> tuple[str, str]:
        """Storage key: (group, plural), shared by all versions."""
        return (self.group, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_api_version(self) -> str:
        return f"{self.group}/{self.storage_version}" if self.group else self.storage_version

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    def supports_field(self, name: str) -> bool:
        """Whether ``name`` may be used in a field selector on this resource."""
        if name == "metadata.name":
            return True
        if name == "metadata.namespace":
            return self.namespaced or self.builtin or self.crd_name is not None
        return name in self.field_labels


# ---- built-in strategies -----------------------------------------------------------------------


def _image_pull_policy(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    if "@" in name:
        return "IfNotPresent"
    if ":" not in name or name.endswith(":latest"):
        return "Always"
    return "IfNotPresent"


def _default_containers(containers: Any) -> None:
    if not isinstance(containers, list):
        return
    for c in containers:
        if not isinstance(c, dict):
            continue
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        if isinstance(c.get("image"), str):
            c.setdefault("imagePullPolicy", _image_pull_policy(c["image"]))
        c.setdefault("resources", {})
        for p in c.get("ports") or []:
            if isinstance(p, dict):
                p.setdefault("protocol", "TCP")


def _pod_defaults(obj: Obj) -> None:
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        return
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("priority", 0)
    if "serviceAccountName" in spec:
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
    _default_containers(spec.get("containers"))
    _default_containers(spec.get("initContainers"))


def _pod_status(obj: Obj) -> Obj:
    spec = obj.get("spec") or {}
    res = [c.get("resources") or {} for c in spec.get("containers") or [] if isinstance(c, dict)]
    if all(not r.get("requests") and not r.get("limits") for r in res):
        qos = "BestEffort"
    elif all(
        r.get("limits")
        and all(r["limits"].get(k) for k in ("cpu", "memory"))
        and all(
            (r.get("requests") or r["limits"]).get(k) == r["limits"].get(k)
            for k in ("cpu", "memory")
        )
        for r in res
    ):
        qos = "Guaranteed"
    else:
        qos = "Burstable"
    return {"phase": "Pending", "qosClass": qos}


_POD_MUTABLE_MSG = (
    "pod updates may not change fields other than `spec.containers[*].image`,"
    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` "
    "(only additions to existing tolerations),`spec.terminationGracePeriodSeconds` "
    "(allow it to be set to 1 if it was previously negative)"
)


def _pod_validate(obj: Obj, old: Obj | None) -> list[FieldError]:
    errs: list[FieldError] = []
    spec = obj.get("spec") or {}
    containers = spec.get("containers")
    if not containers:
        errs.append(FieldError("FieldValueRequired", "spec.containers"))
    for kind in ("containers", "initContainers"):
        for i, c in enumerate(spec.get(kind) or []):
            if not isinstance(c, dict):
                continue
            if not c.get("image"):
                errs.append(FieldError("FieldValueRequired", f"spec.{kind}[{i}].image"))
            name = c.get("name")
            if isinstance(name, str):
                errs += name_errors(name, "label", f"spec.{kind}[{i}].name")
    if old is not None:

        def mask(s: Any) -> Any:
            s = copy.deepcopy(s or {})
            for kind in ("containers", "initContainers"):
                for c in s.get(kind) or []:
                    if isinstance(c, dict):
                        c.pop("image", None)
            s.pop("activeDeadlineSeconds", None)
            s.pop("tolerations", None)
            return s

        if mask(spec) != mask(old.get("spec")):
            errs.append(FieldError("FieldValueForbidden", "spec", _POD_MUTABLE_MSG))
    return errs


def _service_defaults(obj: Obj) -> None:
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        return
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    spec.setdefault("internalTrafficPolicy", "Cluster")
    obj.setdefault("status", {}).setdefault("loadBalancer", {})
    for p in spec.get("ports") or []:
        if isinstance(p, dict):
            p.setdefault("protocol", "TCP")
            if "port" in p:
                p.setdefault("targetPort", p["port"])


def _secret_defaults(obj: Obj) -> None:
    obj.setdefault("type", "Opaque")
    sd = obj.pop("stringData", None)
    if isinstance(sd, dict) and sd:
        data = obj.setdefault("data", {})
        for k, v in sd.items():
            if isinstance(v, str):
                data[k] = base64.b64encode(v.encode()).decode()


_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def _config_keys(obj: Obj, old: Obj | None) -> list[FieldError]:
    errs: list[FieldError] = []
    for section in ("data", "binaryData"):
        for k in obj.get(section) or {}:
            if len(k) > 253 or not _CONFIG_KEY.match(k) or k in (".", ".."):
                errs.append(
                    FieldError(
                        "FieldValueInvalid",
                        f"{section}",
                        "a valid config key must consist of alphanumeric characters, '-', '_' "
                        "or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for "
                        "validation is '[-._a-zA-Z0-9]+')",
                        k,
                        True,
                    )
                )
    return errs


_NODE_INFO = (
    "architecture", "bootID", "containerRuntimeVersion", "kernelVersion", "kubeProxyVersion",
    "kubeletVersion", "machineID", "operatingSystem", "osImage", "systemUUID",
)  # fmt: skip


def _node_defaults(obj: Obj) -> None:
    """Fields a Node always has because Go serializes non-pointer structs (NodeStatus...)."""
    obj.setdefault("spec", {})
    status = obj.setdefault("status", {})
    if not isinstance(status, dict):
        return
    de = status.setdefault("daemonEndpoints", {})
    if isinstance(de, dict):
        de.setdefault("kubeletEndpoint", {}).setdefault("Port", 0)
    info = status.setdefault("nodeInfo", {})
    if isinstance(info, dict):
        for k in _NODE_INFO:
            info.setdefault(k, "")


def _namespace_defaults(obj: Obj) -> None:
    md = obj.setdefault("metadata", {})
    name = md.get("name")
    if isinstance(name, str) and name and DNS1123_LABEL.match(name):
        md.setdefault("labels", {})["kubernetes.io/metadata.name"] = name
    obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])


def builtin_types() -> list[ResourceType]:
    """Every built-in resource the emulator serves, fresh instances."""
    m = models
    return [
        ResourceType(
            "", "v1", "Namespace", "namespaces", False, True, short_names=("ns",),
            name_rule="label", model=m.V1Namespace, return_deleted=True,
            field_labels=frozenset({"status.phase"}), defaulter=_namespace_defaults,
            create_status=lambda o: {"phase": "Active"},
        ),
        ResourceType(
            "", "v1", "Pod", "pods", True, True, short_names=("po",), categories=("all",),
            model=m.V1Pod, return_deleted=True, defaulter=_pod_defaults,
            validator=_pod_validate, create_status=_pod_status,
            field_labels=frozenset({
                "spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
                "spec.serviceAccountName", "spec.hostNetwork", "status.phase", "status.podIP",
                "status.nominatedNodeName",
            }),
        ),
        ResourceType(
            "", "v1", "Node", "nodes", False, True, short_names=("no",), model=m.V1Node,
            field_labels=frozenset({"spec.unschedulable"}), defaulter=_node_defaults,
        ),
        ResourceType(
            "", "v1", "ConfigMap", "configmaps", True, short_names=("cm",),
            model=m.V1ConfigMap, validator=_config_keys,
        ),
        ResourceType(
            "", "v1", "Secret", "secrets", True, model=m.V1Secret,
            field_labels=frozenset({"type"}), defaulter=_secret_defaults,
            validator=_config_keys,
        ),
        ResourceType(
            "", "v1", "Service", "services", True, True, short_names=("svc",),
            categories=("all",), name_rule="dns1035", model=m.V1Service,
            defaulter=_service_defaults, create_status=lambda o: {"loadBalancer": {}},
        ),
        ResourceType(
            "", "v1", "Event", "events", True, short_names=("ev",), model=m.CoreV1Event,
            field_labels=frozenset({
                "involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                "involvedObject.uid", "involvedObject.apiVersion",
                "involvedObject.resourceVersion", "involvedObject.fieldPath", "reason",
                "reportingComponent", "source", "type",
            }),
        ),
        ResourceType(
            "coordination.k8s.io", "v1", "Lease", "leases", True, model=m.V1Lease,
            defaulter=lambda o: o.setdefault("spec", {}),
        ),
        ResourceType(
            "events.k8s.io", "v1", "Event", "events", True, short_names=("ev",),
            model=m.EventsV1Event,
            field_labels=frozenset({"regarding.kind", "regarding.name", "regarding.namespace", "reason", "type"}),
        ),
        ResourceType(
            "apiextensions.k8s.io", "v1", "CustomResourceDefinition",
            "customresourcedefinitions", False, True, short_names=("crd", "crds"),
            categories=("api-extensions",), model=m.V1CustomResourceDefinition,
            return_deleted=True, validator=validate_crd,
        ),
    ]  # fmt: skip


# ---- CustomResourceDefinitions -----------------------------------------------------------------

_ALLOWED_META = {"name", "generateName"}


def _structural_errors(s: Any, path: str, root: bool, errs: list[FieldError]) -> None:
    if not isinstance(s, dict):
        return
    for forbidden in (
        "$ref",
        "definitions",
        "dependencies",
        "patternProperties",
        "additionalItems",
        "id",
        "$schema",
    ):
        if forbidden in s:
            errs.append(FieldError("FieldValueForbidden", f"{path}.{forbidden}", "must not be set"))
    t = s.get("type")
    if root and t != "object":
        if not t:
            errs.append(
                FieldError("FieldValueRequired", f"{path}.type", "must not be empty at the root")
            )
        else:
            errs.append(
                FieldError(
                    "FieldValueInvalid", f"{path}.type", "must be object at the root", t, True
                )
            )
    untyped_ok = s.get("x-kubernetes-int-or-string") or s.get(
        "x-kubernetes-preserve-unknown-fields"
    )
    only_combinators = not any(
        k in s for k in ("properties", "additionalProperties", "items")
    ) and any(k in s for k in ("allOf", "anyOf", "oneOf", "not"))
    if not t and not root and not untyped_ok and not only_combinators:
        errs.append(
            FieldError(
                "FieldValueRequired",
                f"{path}.type",
                "must not be empty for specified object fields",
            )
        )
    if "properties" in s and "additionalProperties" in s:
        errs.append(
            FieldError(
                "FieldValueForbidden",
                f"{path}.additionalProperties",
                "additionalProperties and properties are mutual exclusive",
            )
        )
    if s.get("additionalProperties") is False:
        errs.append(
            FieldError(
                "FieldValueForbidden",
                f"{path}.additionalProperties",
                "additionalProperties cannot be set to false",
            )
        )
    if s.get("uniqueItems") is True:
        errs.append(
            FieldError(
                "FieldValueForbidden",
                f"{path}.uniqueItems",
                "uniqueItems cannot be set to true since the runtime complexity becomes quadratic",
            )
        )
    if t == "array" and not isinstance(s.get("items"), dict):
        errs.append(FieldError("FieldValueRequired", f"{path}.items", "must be specified"))
    lt = s.get("x-kubernetes-list-type")
    if lt is not None:
        if lt not in ("atomic", "set", "map"):
            errs.append(
                FieldError(
                    "FieldValueNotSupported",
                    f"{path}.x-kubernetes-list-type",
                    'supported values: "atomic", "map", "set"',
                    lt,
                    True,
                )
            )
        if t != "array":
            errs.append(
                FieldError(
                    "FieldValueInvalid",
                    f"{path}.x-kubernetes-list-type",
                    "must only be used on type=array",
                    lt,
                    True,
                )
            )
        if lt == "map":
            keys = s.get("x-kubernetes-list-map-keys") or []
            items: dict[str, Any] = s["items"] if isinstance(s.get("items"), dict) else {}
            if not keys:
                errs.append(
                    FieldError(
                        "FieldValueRequired",
                        f"{path}.x-kubernetes-list-map-keys",
                        "must not be empty if x-kubernetes-list-type is map",
                    )
                )
            if items.get("type") != "object":
                errs.append(
                    FieldError(
                        "FieldValueInvalid",
                        f"{path}.items.type",
                        "must be object if parent array's x-kubernetes-list-type is map",
                        items.get("type", ""),
                        True,
                    )
                )
            props = items.get("properties") or {}
            for k in keys:
                if k not in props:
                    errs.append(
                        FieldError(
                            "FieldValueInvalid",
                            f"{path}.x-kubernetes-list-map-keys",
                            "entries must all be names of item properties",
                            keys,
                            True,
                        )
                    )
                elif k not in (items.get("required") or []) and "default" not in props[k]:
                    errs.append(
                        FieldError(
                            "FieldValueRequired",
                            f"{path}.items.properties[{k}].default",
                            "this property is in x-kubernetes-list-map-keys, so it must have a "
                            "default or be a required property",
                        )
                    )
    elif "x-kubernetes-list-map-keys" in s:
        errs.append(
            FieldError(
                "FieldValueRequired",
                f"{path}.x-kubernetes-list-type",
                "must be map if x-kubernetes-list-map-keys is non-empty",
            )
        )
    props = s.get("properties")
    if isinstance(props, dict):
        if root and isinstance(props.get("metadata"), dict):
            meta = props["metadata"]
            extra = set((meta.get("properties") or {}).keys()) - _ALLOWED_META
            if extra or (meta.get("type") not in (None, "object")):
                errs.append(
                    FieldError(
                        "FieldValueForbidden",
                        f"{path}.properties[metadata]",
                        "must not specify anything other than name and generateName, but "
                        "metadata is implicitly specified",
                    )
                )
        for k, v in props.items():
            if root and k == "metadata":
                continue
            _structural_errors(v, f"{path}.properties[{k}]", False, errs)
    if isinstance(s.get("additionalProperties"), dict):
        _structural_errors(s["additionalProperties"], f"{path}.additionalProperties", False, errs)
    if isinstance(s.get("items"), dict):
        _structural_errors(s["items"], f"{path}.items", False, errs)


def validate_crd(obj: Obj, old: Obj | None) -> list[FieldError]:
    """CustomResourceDefinition validation (names, versions, structural schemas)."""
    errs: list[FieldError] = []
    spec = obj.get("spec") or {}
    group = spec.get("group") or ""
    names = spec.get("names") or {}
    plural = names.get("plural") or ""
    name = (obj.get("metadata") or {}).get("name", "")
    if name != f"{plural}.{group}":
        errs.append(
            FieldError(
                "FieldValueInvalid", "metadata.name",
                'must be spec.names.plural+"."+spec.group', name, True,
            )
        )  # fmt: skip
    if not group or "." not in group:
        errs.append(
            FieldError(
                "FieldValueInvalid",
                "spec.group",
                "should be a domain with at least one dot",
                group,
                True,
            )
        )
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        errs.append(
            FieldError(
                "FieldValueNotSupported", "spec.scope",
                'supported values: "Cluster", "Namespaced"', spec.get("scope", ""), True,
            )
        )  # fmt: skip
    for f in ("plural", "singular", "kind", "listKind"):
        v = names.get(f)
        if f in ("plural", "kind") and not v:
            errs.append(FieldError("FieldValueRequired", f"spec.names.{f}"))
        elif v and f in ("plural", "singular") and not DNS1123_LABEL.match(v):
            errs += name_errors(v, "label", f"spec.names.{f}")
    versions = spec.get("versions") or []
    if not versions:
        errs.append(
            FieldError(
                "FieldValueInvalid",
                "spec.versions",
                "must have exactly one version marked as storage version",
                _Raw("[]"),
                True,
            )
        )
    storage = [v for v in versions if isinstance(v, dict) and v.get("storage")]
    if versions and len(storage) != 1:
        errs.append(
            FieldError(
                "FieldValueInvalid", "spec.versions",
                "must have exactly one version marked as storage version", _Raw("[...]"), True,
            )
        )  # fmt: skip
    seen: set[str] = set()
    for i, v in enumerate(versions):
        if not isinstance(v, dict):
            continue
        vname = v.get("name", "")
        if vname in seen:
            errs.append(
                FieldError(
                    "FieldValueInvalid", f"spec.versions[{i}].name", "must be unique", vname, True
                )
            )
        seen.add(vname)
        schema = (v.get("schema") or {}).get("openAPIV3Schema")
        if schema is None:
            errs.append(
                FieldError(
                    "FieldValueRequired",
                    f"spec.versions[{i}].schema.openAPIV3Schema",
                    "schemas are required",
                )
            )
        else:
            _structural_errors(schema, f"spec.versions[{i}].schema.openAPIV3Schema", True, errs)
    if old is not None:
        oscope = (old.get("spec") or {}).get("scope")
        if oscope != spec.get("scope"):
            errs.append(
                FieldError(
                    "FieldValueInvalid", "spec.scope", "field is immutable", spec.get("scope"), True
                )
            )
    return errs


class _Raw(str):
    pass


def crd_status(crd: Obj, now: str) -> Obj:
    """Status the CRD controllers write once names are accepted: Established and NamesAccepted."""
    spec = crd.get("spec") or {}
    names = dict(spec.get("names") or {})
    names.setdefault("singular", str(names.get("kind", "")).lower())
    names.setdefault("listKind", f"{names.get('kind', '')}List")
    storage = [
        v.get("name")
        for v in spec.get("versions") or []
        if isinstance(v, dict) and v.get("storage")
    ]
    prev = (crd.get("status") or {}).get("storedVersions") or []
    stored = list(dict.fromkeys([*prev, *storage]))
    return {
        "acceptedNames": names,
        "conditions": [
            {
                "type": "NamesAccepted",
                "status": "True",
                "reason": "NoConflicts",
                "message": "no conflicts found",
                "lastTransitionTime": now,
            },
            {
                "type": "Established",
                "status": "True",
                "reason": "InitialNamesAccepted",
                "message": "the initial names have been accepted",
                "lastTransitionTime": now,
            },
        ],
        "storedVersions": stored,
    }


def crd_defaults(crd: Obj) -> None:
    """Defaults of apiextensions.k8s.io/v1 CRDs (names.singular, names.listKind, conversion)."""
    spec = crd.get("spec")
    if not isinstance(spec, dict):
        return
    names = spec.get("names")
    if isinstance(names, dict) and isinstance(names.get("kind"), str):
        names.setdefault("singular", names["kind"].lower())
        names.setdefault("listKind", names["kind"] + "List")
    spec.setdefault("conversion", {"strategy": "None"})


def types_from_crd(crd: Obj) -> list[ResourceType]:
    """One ResourceType per served version of a CRD."""
    spec = crd["spec"]
    names = spec["names"]
    group = spec["group"]
    storage = next(v["name"] for v in spec["versions"] if v.get("storage"))
    out = []
    for v in spec["versions"]:
        if not v.get("served"):
            continue
        schema = (v.get("schema") or {}).get("openAPIV3Schema")
        status = "status" in (v.get("subresources") or {})
        selectable = frozenset(
            f["jsonPath"].lstrip(".")
            for f in v.get("selectableFields") or []
            if isinstance(f, dict) and "jsonPath" in f
        )
        out.append(
            ResourceType(
                group,
                v["name"],
                names["kind"],
                names["plural"],
                spec["scope"] == "Namespaced",
                status,
                singular=names.get("singular") or names["kind"].lower(),
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                builtin=False,
                schema=schema,
                storage_version=storage,
                crd_name=crd["metadata"]["name"],
                field_labels=selectable,
                return_deleted=True,
                drop_status_on_create=status,
            )
        )
    return out
