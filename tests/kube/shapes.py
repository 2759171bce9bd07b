"""Type information the emulator needs about objects: structural schemas compiled to ``Shape``.

A ``Shape`` is one node of a structural schema (Kubernetes API concepts, "structural schema";
apiextensions.k8s.io/v1 JSONSchemaProps). Custom resources get theirs from the CRD's
``openAPIV3Schema``; built-in kinds get theirs from the ``kubernetes`` client's own models (the
same OpenAPI the client was generated from), plus the list/map merge semantics that the
Kubernetes Go types declare with ``+listType``/``+listMapKey``/``patchMergeKey`` tags.

Shapes drive pruning, defaulting and validation (``validation.py``), server-side apply
(``fieldmanager.py``) and strategic merge patch (``patch.py``).
"""

from __future__ import annotations

import datetime as _dt
import re
import types
import typing
from typing import Any

from pydantic import BaseModel


class Shape:
    """One node of a structural schema.

    ``type`` is "object", "array", "string", "integer", "number", "boolean" or None (anything:
    int-or-string or preserve-unknown-fields without a type). ``props`` are declared fields
    (a struct), ``additional`` the value shape of a map, ``preserve`` keeps unknown fields.
    ``list_type`` is "atomic", "set" or "map" (with ``list_keys``); ``map_atomic`` marks
    ``x-kubernetes-map-type: atomic``. ``special`` is "quantity", "time", "microtime" or
    "bytes" for built-in scalars the server canonicalizes. ``merge_key``/``patch_merge`` carry
    strategic-merge-patch semantics for built-in lists.
    """

    __slots__ = (
        "additional",
        "builtin",
        "default",
        "embedded",
        "enum",
        "has_default",
        "int_or_string",
        "items",
        "list_keys",
        "list_type",
        "map_atomic",
        "merge_key",
        "name",
        "nullable",
        "patch_merge",
        "preserve",
        "props",
        "required",
        "schema",
        "special",
        "sub",
        "type",
    )

    def __init__(self) -> None:
        self.type: str | None = None
        self.props: dict[str, Shape] | None = None
        self.additional: Shape | None = None
        self.preserve = False
        self.items: Shape | None = None
        self.list_type = "atomic"
        self.list_keys: tuple[str, ...] = ()
        self.map_atomic = False
        self.nullable = False
        self.int_or_string = False
        self.embedded = False
        self.required: tuple[str, ...] = ()
        self.enum: list[Any] | None = None
        self.schema: dict[str, Any] = {}
        self.special: str | None = None
        self.builtin = False
        self.default: Any = None
        self.has_default = False
        self.sub: dict[str, list[Shape]] = {}
        self.merge_key: str | None = None
        self.patch_merge = False
        self.name = ""

    def __repr__(self) -> str:
        return f"Shape({self.name or self.type})"

    def child(self, key: str) -> tuple[Shape | None, bool]:
        """Shape of field ``key`` and whether it is a declared (struct) field.

        Returns ``(None, False)`` when the field is unknown and would be pruned.
        """
        if self.props is not None and key in self.props:
            return self.props[key], True
        if self.additional is not None:
            return self.additional, False
        if self.preserve or self.type is None:
            return DEDUCED, False
        return None, False

    @property
    def is_deduced(self) -> bool:
        return self is DEDUCED


DEDUCED = Shape()
"""Shape of untyped data (no schema / preserve-unknown-fields): maps are granular, lists atomic."""
DEDUCED.preserve = True
DEDUCED.name = "deduced"


# --- from CRD openAPIV3Schema ----------------------------------------------------------------

_VALIDATION_KEYS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "multipleOf",
    "format",
)


def compile_schema(s: dict[str, Any] | None, *, root: bool = False) -> Shape:
    """Compile a CRD ``openAPIV3Schema`` (a dict) into a Shape tree.

    ``root=True`` adds the implicit ``apiVersion``, ``kind`` and ``metadata`` (ObjectMeta) that
    every custom resource has, whatever its schema says. ``None`` compiles to an untyped object.
    """
    if s is None:
        s = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    sh = Shape()
    t = s.get("type")
    sh.type = t if isinstance(t, str) else None
    sh.int_or_string = bool(s.get("x-kubernetes-int-or-string"))
    if sh.int_or_string:
        sh.type = None
    sh.preserve = bool(s.get("x-kubernetes-preserve-unknown-fields"))
    sh.nullable = bool(s.get("nullable"))
    sh.embedded = bool(s.get("x-kubernetes-embedded-resource"))
    sh.required = tuple(s.get("required") or ())
    if "enum" in s:
        sh.enum = list(s["enum"])
    if "default" in s:
        sh.default = s["default"]
        sh.has_default = True
    sh.schema = {k: s[k] for k in _VALIDATION_KEYS if k in s}
    if "pattern" in sh.schema:
        try:
            sh.schema["_pattern"] = re.compile(_go_regex(sh.schema["pattern"]))
        except re.error:
            sh.schema["_pattern"] = None
    props = s.get("properties")
    if isinstance(props, dict):
        sh.props = {k: compile_schema(v) for k, v in props.items() if isinstance(v, dict)}
    add = s.get("additionalProperties")
    if isinstance(add, dict):
        sh.additional = compile_schema(add)
    elif add is True:
        sh.additional = DEDUCED
    items = s.get("items")
    if isinstance(items, dict):
        sh.items = compile_schema(items)
    if sh.type == "array":
        sh.list_type = s.get("x-kubernetes-list-type") or "atomic"
        sh.list_keys = tuple(s.get("x-kubernetes-list-map-keys") or ())
    sh.map_atomic = s.get("x-kubernetes-map-type") == "atomic"
    for kw in ("allOf", "anyOf", "oneOf"):
        if isinstance(s.get(kw), list):
            sh.sub[kw] = [compile_schema(x) for x in s[kw] if isinstance(x, dict)]
    if isinstance(s.get("not"), dict):
        sh.sub["not"] = [compile_schema(s["not"])]
    if sh.embedded or root:
        sh.props = dict(sh.props or {})
        sh.props["apiVersion"] = _string()
        sh.props["kind"] = _string()
        sh.props["metadata"] = object_meta()
        if sh.type is None and not sh.int_or_string:
            sh.type = "object"
    return sh


def _go_regex(p: str) -> str:
    """Translate the few RE2 spellings Python does not know (``\\z``) to ``re`` syntax."""
    return p.replace("\\z", "\\Z")


def _string() -> Shape:
    sh = Shape()
    sh.type = "string"
    return sh


# --- from kubernetes client models -----------------------------------------------------------

# (Model, json field) -> ("map", keys) | ("set",) ; Go +listType / +listMapKey tags
LIST_TYPES: dict[tuple[str, str], tuple[str, ...]] = {
    ("V1ObjectMeta", "ownerReferences"): ("map", "uid"),
    ("V1ObjectMeta", "finalizers"): ("set",),
    ("V1PodSpec", "containers"): ("map", "name"),
    ("V1PodSpec", "initContainers"): ("map", "name"),
    ("V1PodSpec", "ephemeralContainers"): ("map", "name"),
    ("V1PodSpec", "volumes"): ("map", "name"),
    ("V1PodSpec", "imagePullSecrets"): ("map", "name"),
    ("V1PodSpec", "hostAliases"): ("map", "ip"),
    ("V1PodSpec", "readinessGates"): ("atomic",),
    ("V1Container", "ports"): ("map", "containerPort", "protocol"),
    ("V1Container", "env"): ("map", "name"),
    ("V1Container", "volumeMounts"): ("map", "mountPath"),
    ("V1Container", "volumeDevices"): ("map", "devicePath"),
    ("V1PodStatus", "conditions"): ("map", "type"),
    ("V1PodStatus", "podIPs"): ("map", "ip"),
    ("V1PodStatus", "hostIPs"): ("map", "ip"),
    ("V1NodeStatus", "conditions"): ("map", "type"),
    ("V1NodeStatus", "addresses"): ("map", "type"),
    ("V1NodeSpec", "podCIDRs"): ("set",),
    ("V1ServiceSpec", "ports"): ("map", "port", "protocol"),
    ("V1ServiceSpec", "clusterIPs"): ("atomic",),
    ("V1CustomResourceDefinitionStatus", "conditions"): ("map", "type"),
    ("V1NamespaceStatus", "conditions"): ("map", "type"),
}

# (Model, json field) -> strategic merge patch merge key (patchStrategy=merge)
MERGE_KEYS: dict[tuple[str, str], str] = {
    ("V1ObjectMeta", "ownerReferences"): "uid",
    ("V1PodSpec", "containers"): "name",
    ("V1PodSpec", "initContainers"): "name",
    ("V1PodSpec", "ephemeralContainers"): "name",
    ("V1PodSpec", "volumes"): "name",
    ("V1PodSpec", "imagePullSecrets"): "name",
    ("V1PodSpec", "hostAliases"): "ip",
    ("V1Container", "ports"): "containerPort",
    ("V1Container", "env"): "name",
    ("V1Container", "volumeMounts"): "mountPath",
    ("V1Container", "volumeDevices"): "devicePath",
    ("V1PodStatus", "conditions"): "type",
    ("V1PodStatus", "podIPs"): "ip",
    ("V1NodeStatus", "conditions"): "type",
    ("V1NodeStatus", "addresses"): "type",
    ("V1ServiceSpec", "ports"): "port",
    ("V1NamespaceStatus", "conditions"): "type",
}
# primitive lists with patchStrategy=merge (union on strategic merge patch)
MERGE_PRIMITIVE: set[tuple[str, str]] = {("V1ObjectMeta", "finalizers")}

QUANTITY_FIELDS: set[tuple[str, str]] = {
    ("V1NodeStatus", "capacity"),
    ("V1NodeStatus", "allocatable"),
    ("V1ResourceRequirements", "limits"),
    ("V1ResourceRequirements", "requests"),
    ("V1PodSpec", "overhead"),
}
MICROTIME_FIELDS: set[tuple[str, str]] = {
    ("V1LeaseSpec", "acquireTime"),
    ("V1LeaseSpec", "renewTime"),
    ("CoreV1Event", "eventTime"),
    ("EventsV1Event", "eventTime"),
    ("EventsV1EventSeries", "lastObservedTime"),
    ("CoreV1EventSeries", "lastObservedTime"),
}
# fields the Go types declare as integers/strings but whose client model is looser
_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}

_model_cache: dict[type, Shape] = {}


def _unwrap(ann: Any) -> list[Any]:
    """Members of Optional/Union/Annotated as a flat list without NoneType."""
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(ann)[0])
    if origin is typing.Union or origin is types.UnionType:
        out: list[Any] = []
        for a in typing.get_args(ann):
            out.extend(_unwrap(a))
        return out
    if ann is type(None):
        return []
    return [ann]


def _from_annotation(ann: Any, owner: str, field: str) -> Shape:
    members = _unwrap(ann)
    if len(members) != 1:
        scal = {_SCALARS.get(m) for m in members if m in _SCALARS}
        if members and all(m in _SCALARS or m is bytes for m in members):
            if scal == {"integer", "string"}:
                sh = Shape()
                sh.int_or_string = True
                sh.builtin = True
                return sh
            if scal <= {"integer", "number"}:
                sh = Shape()
                sh.type = "number"
                sh.builtin = True
                return sh
            sh = _string()
            sh.builtin = True
            sh.special = "bytes" if bytes in members else None
            return sh
        return DEDUCED
    a = members[0]
    origin = typing.get_origin(a)
    if origin in (list, typing.List):  # noqa: UP006
        (item,) = typing.get_args(a) or (Any,)
        sh = Shape()
        sh.type = "array"
        sh.builtin = True
        sh.items = _from_annotation(item, owner, field)
        lt = LIST_TYPES.get((owner, field))
        if lt:
            sh.list_type = lt[0]
            sh.list_keys = tuple(lt[1:])
        elif sh.items.type in ("string", "integer", "number", "boolean"):
            sh.list_type = "atomic"
        sh.merge_key = MERGE_KEYS.get((owner, field))
        sh.patch_merge = sh.merge_key is not None or (owner, field) in MERGE_PRIMITIVE
        return sh
    if origin in (dict, typing.Dict):  # noqa: UP006
        args = typing.get_args(a)
        value = args[1] if len(args) == 2 else Any
        sh = Shape()
        sh.type = "object"
        sh.builtin = True
        sh.additional = _from_annotation(value, owner, field)
        if (owner, field) in QUANTITY_FIELDS:
            q = Shape()
            q.type = "string"
            q.special = "quantity"
            q.builtin = True
            sh.additional = q
        if sh.additional is DEDUCED and value is Any:
            sh.additional = DEDUCED
        return sh
    if isinstance(a, type) and issubclass(a, BaseModel):
        return model_shape(a)
    if a is _dt.datetime:
        sh = _string()
        sh.builtin = True
        sh.special = "microtime" if (owner, field) in MICROTIME_FIELDS else "time"
        return sh
    if a is bytes:
        sh = _string()
        sh.builtin = True
        sh.special = "bytes"
        return sh
    if a in _SCALARS:
        sh = Shape()
        sh.type = _SCALARS[a]
        sh.builtin = True
        return sh
    return DEDUCED


def model_shape(cls: type[BaseModel]) -> Shape:
    """Shape of a ``kubernetes.client.models`` class (cached; handles recursive models)."""
    if cls in _model_cache:
        return _model_cache[cls]
    sh = Shape()
    sh.type = "object"
    sh.builtin = True
    sh.name = cls.__name__
    _model_cache[cls] = sh
    props: dict[str, Shape] = {}
    required: list[str] = []
    for pyname, f in cls.model_fields.items():
        jname = f.serialization_alias or pyname
        props[jname] = _from_annotation(f.annotation, cls.__name__, jname)
        if f.is_required():
            required.append(jname)
    sh.props = props
    sh.required = tuple(required)
    if cls.__name__ == "V1JSONSchemaProps":
        # defaults/examples/enums hold arbitrary JSON
        for k in ("default", "example"):
            props[k] = DEDUCED
        if "enum" in props:
            props["enum"].items = DEDUCED
    return sh


def object_meta() -> Shape:
    """Shape of ``metadata`` (ObjectMeta) for every kind."""
    from kubernetes.client import models

    return model_shape(models.V1ObjectMeta)
