"""The emulator's storage and registry logic: what the API server does between HTTP and etcd.

``Store`` keeps every object of every resource in memory under one lock, with one global
resourceVersion counter (as etcd's revision), a bounded event history for watches, and the
controllers a test cluster needs to look real: CRD establishing, namespace deletion and
garbage collection of dependents.

Stored objects are never mutated after they are stored: every write builds a new dict. Readers
take references under the lock and serialize outside it, so a LIST of thousands of objects
copies nothing.

Sources: Kubernetes API concepts (resource versions, watches, bookmarks, dry run, server-side
apply, finalizers, garbage collection, owners and dependents, namespaces), and the generic
registry (k8s.io/apiserver/pkg/registry/generic/registry/store.go).
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import queue
import random
import socket
import threading
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import yaml

from tests.kube import errors as E
from tests.kube import fieldmanager as fm
from tests.kube.errors import ApiError, FieldError
from tests.kube.patch import (
    PatchDecodeError,
    PatchError,
    json_patch,
    merge_patch,
    strategic_merge_patch,
)
from tests.kube.resources import (
    ResourceType,
    builtin_types,
    crd_defaults,
    crd_status,
    types_from_crd,
)
from tests.kube.selectors import (
    fields_match,
    labels_match,
    parse_field_selector,
    parse_label_selector,
)
from tests.kube.validation import DROP, Ctx, metadata_errors, name_errors, normalize

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace or "", name)
GR = tuple[str, str]  # (group, plural)

MERGE = "application/merge-patch+json"
JSONPATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"
APPLY_CBOR = "application/apply-patch+cbor"

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
GC_MANAGER = "kube-controller-manager"


def clone(v: Any) -> Any:
    """Deep copy of a JSON value (faster than copy.deepcopy)."""
    if type(v) is dict:
        return {k: clone(x) for k, x in v.items()}
    if type(v) is list:
        return [clone(x) for x in v]
    return v


def now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _later(seconds: int) -> str:
    t = _dt.datetime.now(_dt.UTC) + _dt.timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Op:
    """One request as the registry sees it."""

    rt: ResourceType
    ns: str | None
    name: str | None = None
    sub: str = ""
    query: dict[str, str] = field(default_factory=dict)
    user_agent: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def dry_run(self) -> bool:
        v = self.query.get("dryRun")
        if v is None or v == "":
            return False
        if v != "All":
            raise E.bad_request(f'Invalid dry run value: "{v}": supported values: "All"')
        return True

    @property
    def manager(self) -> str:
        m = self.query.get("fieldManager")
        if m:
            if len(m) > 128:
                raise E.invalid(
                    "PatchOptions", "meta.k8s.io", "",
                    [FieldError("FieldValueTooLong", "fieldManager", "may not be more than 128 bytes")],
                )  # fmt: skip
            return m
        return self.user_agent.split("/")[0] if self.user_agent else "unknown"


@dataclass
class Event:
    """One change in the history: ``prev`` is the object before a MODIFIED."""

    rv: int
    type: str
    gr: GR
    obj: Obj
    prev: Obj | None = None


_CLOSE = ("CLOSE", None)


class Watcher:
    """A watch request's queue of events, filtered by namespace and selectors."""

    def __init__(self, rt: ResourceType, ns: str | None, labels: Any, fields: Any) -> None:
        self.rt = rt
        self.ns = ns
        self.labels = labels
        self.fields = fields
        self.q: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.closed = False

    def wants(self, obj: Obj) -> bool:
        md = obj.get("metadata") or {}
        if self.ns is not None and md.get("namespace", "") != self.ns:
            return False
        return labels_match(self.labels, obj) and fields_match(self.fields, obj)

    def offer(self, ev: Event) -> None:
        if ev.type == "MODIFIED":
            cur = self.wants(ev.obj)
            was = ev.prev is not None and self.wants(ev.prev)
            if cur and was:
                self.q.put(("MODIFIED", ev.obj))
            elif cur:
                self.q.put(("ADDED", ev.obj))
            elif was:
                assert ev.prev is not None
                old = dict(ev.prev)
                old["metadata"] = dict(old["metadata"], resourceVersion=str(ev.rv))
                self.q.put(("DELETED", old))
        elif self.wants(ev.obj):
            self.q.put((ev.type, ev.obj))

    def close(self) -> None:
        self.closed = True
        self.q.put(_CLOSE)


class Store:
    """All objects, resource types, history and background controllers of one emulator."""

    def __init__(self, history_size: int = 10000) -> None:
        self.lock = threading.RLock()
        self.rv = 0
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        self.storage_type: dict[GR, ResourceType] = {}
        self.data: dict[GR, dict[Key, Obj]] = defaultdict(dict)
        self.uids: dict[str, tuple[GR, Key]] = {}
        self.dependents: dict[str, set[tuple[GR, Key]]] = defaultdict(set)
        self.history: deque[Event] = deque(maxlen=max(1, history_size))
        self.compacted = 0
        self.watchers: dict[GR, set[Watcher]] = defaultdict(set)
        self.terminating_crds: set[str] = set()
        self._gc_q: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._gc_pending = 0
        self._gc_cond = threading.Condition(self.lock)
        self._svc_ip = 10
        for rt in builtin_types():
            self._add_type(rt)
        for ns in DEFAULT_NAMESPACES:
            rt = self.types[("", "v1", "namespaces")]
            self.create(
                Op(rt, None, user_agent="kube-apiserver/v1"),
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            )
        self._gc_thread = threading.Thread(target=self._gc_loop, name="emulator-gc", daemon=True)
        self._gc_thread.start()

    # ---- registry ----------------------------------------------------------------------------

    def _add_type(self, rt: ResourceType) -> None:
        self.types[(rt.group, rt.version, rt.plural)] = rt
        if rt.version == rt.storage_version:
            self.storage_type[rt.gr] = rt

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        with self.lock:
            return self.types.get((group, version, plural))

    def all_types(self) -> list[ResourceType]:
        with self.lock:
            return list(self.types.values())

    def _register_crd(self, crd: Obj) -> None:
        name = crd["metadata"]["name"]
        for key, rt in list(self.types.items()):
            if rt.crd_name == name:
                del self.types[key]
        new = types_from_crd(crd)
        for rt in new:
            self._add_type(rt)
        if new and new[0].gr not in self.storage_type:
            self.storage_type[new[0].gr] = new[0]

    def _unregister_crd(self, crd: Obj) -> None:
        name = crd["metadata"]["name"]
        grs = set()
        for key, rt in list(self.types.items()):
            if rt.crd_name == name:
                grs.add(rt.gr)
                del self.types[key]
        for gr in grs:
            self.storage_type.pop(gr, None)
            self.data.pop(gr, None)
            for w in self.watchers.pop(gr, set()):
                w.close()
        self.terminating_crds.discard(name)

    # ---- reading -------------------------------------------------------------------------------

    @staticmethod
    def render(rt: ResourceType, obj: Obj) -> Obj:
        """``obj`` as served at ``rt``'s version (conversion strategy None: apiVersion only)."""
        if obj.get("apiVersion") == rt.api_version:
            return obj
        out = dict(obj)
        out["apiVersion"] = rt.api_version
        return out

    def get(self, op: Op) -> Obj:
        with self.lock:
            obj = self.data[op.rt.gr].get((op.ns or "", op.name or ""))
        if obj is None:
            raise E.not_found(op.rt.plural, op.rt.group, op.name or "")
        return self.render(op.rt, obj)

    def _selectors(self, op: Op) -> tuple[Any, Any]:
        labels = parse_label_selector(op.query.get("labelSelector", ""))
        fields = parse_field_selector(op.query.get("fieldSelector", ""), op.rt.supports_field)
        return labels, fields

    def list_objects(self, op: Op) -> Obj:
        """LIST: items sorted by namespace/name, selectors applied, optional limit/continue."""
        labels, fields = self._selectors(op)
        start = ""
        cont = op.query.get("continue")
        if cont:
            try:
                token = json.loads(base64.urlsafe_b64decode(cont.encode()))
                start = str(token["start"])
            except (ValueError, KeyError, TypeError):
                raise E.bad_request("continue key is not valid: illegal base64 data") from None
        limit = 0
        if op.query.get("limit"):
            try:
                limit = max(0, int(op.query["limit"]))
            except ValueError:
                raise E.bad_request(f"invalid limit: {op.query['limit']}") from None
        with self.lock:
            rv = self.rv
            bucket = self.data.get(op.rt.gr, {})
            if op.ns is None:
                items = sorted(bucket.items())
            else:
                items = sorted((k, v) for k, v in bucket.items() if k[0] == op.ns)
        out: list[Obj] = []
        more = 0
        last = ""
        strip = op.rt.builtin
        for (ns, name), obj in items:
            keystr = f"{ns}/{name}"
            if start and keystr <= start:
                continue
            if (labels or fields) and not (labels_match(labels, obj) and fields_match(fields, obj)):
                continue
            if limit and len(out) >= limit:
                more += 1
                continue
            if strip:
                obj = {k: v for k, v in obj.items() if k != "apiVersion" and k != "kind"}
            else:
                obj = self.render(op.rt, obj)
            out.append(obj)
            last = keystr
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if more:
            meta["continue"] = base64.urlsafe_b64encode(
                json.dumps({"rv": rv, "start": last}).encode()
            ).decode()
            meta["remainingItemCount"] = more
        return {
            "kind": op.rt.list_kind,
            "apiVersion": op.rt.api_version,
            "metadata": meta,
            "items": out,
        }

    # ---- writing helpers ------------------------------------------------------------------

    def _emit(self, ev: Event) -> None:
        if len(self.history) == self.history.maxlen:
            self.compacted = self.history[0].rv
        self.history.append(ev)
        for w in list(self.watchers.get(ev.gr, ())):
            w.offer(ev)

    def compact(self) -> None:
        """Forget the whole event history (watches from older versions then get 410)."""
        with self.lock:
            self.history.clear()
            self.compacted = self.rv

    def _index(self, gr: GR, key: Key, old: Obj | None, new: Obj | None) -> None:
        old_refs = _owner_uids(old)
        new_refs = _owner_uids(new)
        for u in old_refs - new_refs:
            deps = self.dependents.get(u)
            if deps is not None:
                deps.discard((gr, key))
                if not deps:
                    del self.dependents[u]
        for u in new_refs - old_refs:
            self.dependents[u].add((gr, key))
        if old is not None and new is None:
            self.uids.pop(old["metadata"].get("uid", ""), None)
        if new is not None:
            self.uids[new["metadata"]["uid"]] = (gr, key)
        if new_refs and not any(u in self.uids for u in new_refs):
            self._gc_put(("check", gr, key))

    def _commit(self, rt: ResourceType, key: Key, new: Obj, old: Obj | None) -> Obj:
        self.rv += 1
        new["metadata"]["resourceVersion"] = str(self.rv)
        self.data[rt.gr][key] = new
        self._index(rt.gr, key, old, new)
        self._emit(Event(self.rv, "ADDED" if old is None else "MODIFIED", rt.gr, new, old))
        if _is_crd(rt) and not new["metadata"].get("deletionTimestamp"):
            self._register_crd(new)
        return new

    def _remove(self, rt: ResourceType, key: Key, obj: Obj, policy: str = "Background") -> Obj:
        self.rv += 1
        final = dict(obj)
        final["metadata"] = dict(obj["metadata"], resourceVersion=str(self.rv))
        self.data[rt.gr].pop(key, None)
        self._index(rt.gr, key, obj, None)
        self._emit(Event(self.rv, "DELETED", rt.gr, final))
        uid = obj["metadata"].get("uid", "")
        if policy == "Orphan":
            self._orphan(uid)
        elif uid in self.dependents:
            self._gc_put(("owner", uid))
        if _is_crd(rt):
            self._unregister_crd(obj)
        ns = key[0]
        if ns:
            nsobj = self.data[("", "namespaces")].get(("", ns))
            if nsobj is not None and nsobj["metadata"].get("deletionTimestamp"):
                self._maybe_finish_namespace(ns)
        if rt.crd_name and rt.crd_name in self.terminating_crds:
            self._maybe_finish_crd(rt.crd_name)
        return final

    def _orphan(self, uid: str) -> None:
        for gr, key in list(self.dependents.pop(uid, set())):
            obj = self.data.get(gr, {}).get(key)
            rt = self.storage_type.get(gr)
            if obj is None or rt is None:
                continue
            self._drop_refs(rt, key, obj, {uid})

    def _drop_refs(self, rt: ResourceType, key: Key, obj: Obj, uids: set[str]) -> None:
        new = clone(obj)
        refs = [r for r in new["metadata"].get("ownerReferences") or [] if r.get("uid") not in uids]
        if refs:
            new["metadata"]["ownerReferences"] = refs
        else:
            new["metadata"].pop("ownerReferences", None)
        managers = fm.decode(obj["metadata"].get("managedFields"))
        managers = fm.update_managers(obj, new, rt.shape, managers, GC_MANAGER, rt.api_version, "")
        _set_managed(new, managers)
        self._commit(rt, key, new, obj)

    # ---- decode / validate -------------------------------------------------------------------

    def _check_type_meta(self, rt: ResourceType, body: Obj) -> None:
        av, kind = body.get("apiVersion"), body.get("kind")
        if not rt.builtin:
            if not kind:
                raise E.bad_request(f"Object 'Kind' is missing in '{_short_json(body)}'")
            if not av:
                raise E.bad_request(f"Object 'apiVersion' is missing in '{_short_json(body)}'")
        if av and av != rt.api_version:
            raise E.bad_request(
                f"the API version in the data ({av}) does not match the expected API version "
                f"({rt.api_version})"
            )
        if kind and kind != rt.kind:
            raise E.bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )
        body["apiVersion"] = rt.api_version
        body["kind"] = rt.kind

    def _decode(self, op: Op, body: Obj) -> Obj:
        """Prune, default and canonicalize a full object (400 for undecodable built-ins)."""
        rt = op.rt
        md = body.get("metadata")
        if md is not None and not isinstance(md, dict):
            raise E.bad_request(
                "json: cannot unmarshal into Go struct field .metadata of type v1.ObjectMeta"
            )
        ctx = Ctx()
        out = normalize(body, rt.shape, "", ctx)
        if ctx.bad:
            raise E.bad_request(
                f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: {ctx.bad[0]}'
            )
        if out is DROP or not isinstance(out, dict):
            raise E.bad_request("the body of the request is not an object")
        self._unknown_fields(op, ctx.unknown)
        out.setdefault("metadata", {})
        if rt.defaulter is not None:
            rt.defaulter(out)
        if _is_crd(rt):
            crd_defaults(out)
        return out

    def _schema_errors(self, rt: ResourceType, obj: Obj) -> list[FieldError]:
        """Schema errors of the object about to be stored (after the update strategy ran)."""
        ctx = Ctx()
        normalize(obj, rt.shape, "", ctx)
        return ctx.errors

    def _unknown_fields(self, op: Op, unknown: list[str]) -> None:
        if not unknown:
            return
        mode = op.query.get("fieldValidation", "Warn")
        if mode == "Strict":
            msg = ", ".join(f'unknown field "{u}"' for u in unknown)
            raise E.bad_request(f"strict decoding error: {msg}")
        if mode != "Ignore":
            op.warnings.extend(f'unknown field "{u}"' for u in unknown)

    def _validate(
        self, op: Op, obj: Obj, old: Obj | None, errs: list[FieldError] | None = None
    ) -> None:
        rt = op.rt
        md = obj["metadata"]
        errs = [*(errs or []), *self._schema_errors(rt, obj)]
        if old is None:
            errs += name_errors(md.get("name", ""), rt.name_rule)
            if rt.namespaced and md.get("namespace"):
                errs += name_errors(md["namespace"], "label", "metadata.namespace")
        errs += metadata_errors(md)
        if old is not None and old["metadata"].get("deletionTimestamp"):
            added = [
                f
                for f in md.get("finalizers") or []
                if f not in (old["metadata"].get("finalizers") or [])
            ]
            if added:
                errs.append(
                    FieldError(
                        "FieldValueForbidden",
                        "metadata.finalizers",
                        "no new finalizers can be added if the object is being deleted, found new "
                        "finalizers []string{" + ", ".join(f'"{f}"' for f in added) + "}",
                    )
                )
        if rt.validator is not None and op.sub == "":
            errs += rt.validator(obj, old)
        if errs:
            raise E.invalid(rt.kind, rt.group, md.get("name", ""), errs)

    def _ignored(self, op: Op) -> frozenset[fm.Path]:
        if op.sub == "status":
            return frozenset({("f:spec",)})
        if op.rt.status:
            return frozenset({("f:status",)})
        return frozenset()

    # ---- create ----------------------------------------------------------------------------

    def _check_namespace(self, op: Op, name: str) -> None:
        if not op.rt.namespaced:
            return
        ns = self.data[("", "namespaces")].get(("", op.ns or ""))
        if ns is None:
            raise E.not_found("namespaces", "", op.ns or "")
        if ns["metadata"].get("deletionTimestamp"):
            raise E.forbidden(
                op.rt.plural,
                op.rt.group,
                name,
                f"unable to create new content in namespace {op.ns} because it is being terminated",
            )

    def _place(self, op: Op, body: Obj) -> None:
        """Reconcile metadata.namespace with the URL (400 on mismatch)."""
        md = body.setdefault("metadata", {})
        if not isinstance(md, dict):
            raise E.bad_request("metadata must be an object")
        if op.rt.namespaced:
            ns = md.get("namespace")
            if ns and op.ns and ns != op.ns:
                raise E.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            if op.ns:
                md["namespace"] = op.ns
        else:
            md.pop("namespace", None)

    def create(self, op: Op, body: Any, *, managers: fm.Managers | None = None) -> Obj:
        """POST: a new object (201); 409 AlreadyExists, 422 Invalid, 404 missing namespace."""
        if not isinstance(body, dict):
            raise E.bad_request("the body of the request was in an unknown format")
        rt = op.rt
        body = clone(body)
        self._check_type_meta(rt, body)
        self._place(op, body)
        if body["metadata"].get("resourceVersion"):
            raise E.bad_request("resourceVersion should not be set on objects to be created")
        obj = self._decode(op, body)
        errs: list[FieldError] = []
        md = obj["metadata"]
        dry = op.dry_run
        with self.lock:
            name = md.get("name") or ""
            if not name:
                gen = md.get("generateName")
                if not gen:
                    errs = [
                        FieldError(
                            "FieldValueRequired",
                            "metadata.name",
                            "name or generateName is required",
                        ),
                        *errs,
                    ]
                    raise E.invalid(rt.kind, rt.group, "", errs)
                for _ in range(100):
                    name = gen + "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
                    if (op.ns or "", name) not in self.data[rt.gr]:
                        break
                md["name"] = name
            if rt.crd_name and rt.crd_name in self.terminating_crds:
                raise ApiError(
                    405, "MethodNotAllowed",
                    'create not allowed while custom resource definition is terminating',
                )  # fmt: skip
            self._check_namespace(op, name)
            key = ((op.ns or "") if rt.namespaced else "", name)
            if key in self.data[rt.gr]:
                raise E.already_exists(rt.plural, rt.group, name)
            for k in (
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "selfLink",
                "resourceVersion",
            ):
                md.pop(k, None)
            md["uid"] = str(uuid.uuid4())
            md["creationTimestamp"] = now()
            if _has_generation(rt):
                md["generation"] = 1
            else:
                md.pop("generation", None)
            if rt.drop_status_on_create:
                obj.pop("status", None)
            if rt.create_status is not None:
                obj["status"] = rt.create_status(obj)
            if rt.kind == "Service" and rt.builtin:
                self._svc_ip += 1
                ip = f"10.96.{self._svc_ip // 250}.{self._svc_ip % 250}"
                spec = obj.setdefault("spec", {})
                if spec.get("clusterIP") != "None":
                    spec.setdefault("clusterIP", ip)
                    spec.setdefault("clusterIPs", [spec["clusterIP"]])
                spec.setdefault("ipFamilies", ["IPv4"])
                spec.setdefault("ipFamilyPolicy", "SingleStack")
            self._validate(op, obj, None, errs)
            if _is_crd(rt):
                obj["status"] = crd_status(obj, now())
            if managers is None:
                incoming = fm.decode(md.get("managedFields"))
                managers = fm.update_managers(
                    None, obj, rt.shape, incoming, op.manager, rt.api_version, op.sub
                )
            _set_managed(obj, managers)
            if dry:
                md.pop("resourceVersion", None)
                return self.render(rt, obj)
            obj["apiVersion"] = rt.storage_api_version
            stored = self._commit(rt, key, obj, None)
        return self.render(rt, stored)

    # ---- update ------------------------------------------------------------------------------

    def _prepare_update(self, op: Op, old: Obj, cand: Obj) -> Obj:
        """Apply the update strategy: preconditions, immutable metadata, status rules, generation."""
        rt = op.rt
        md = cand.setdefault("metadata", {})
        omd = old["metadata"]
        name = omd["name"]
        if md.get("name") and md["name"] != name:
            raise E.bad_request(
                f"the name of the object ({md['name']}) does not match the name on the URL ({name})"
            )
        md["name"] = name
        if rt.namespaced:
            if md.get("namespace") and md["namespace"] != omd.get("namespace"):
                raise E.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            md["namespace"] = omd.get("namespace")
        else:
            md.pop("namespace", None)
        if md.get("uid") and md["uid"] != omd.get("uid"):
            raise E.conflict(
                rt.plural, rt.group, name,
                f"Precondition failed: UID in precondition: {md['uid']}, UID in object meta: {omd.get('uid')}",
            )  # fmt: skip
        rv = md.get("resourceVersion")
        if rv and rv != omd.get("resourceVersion"):
            raise E.conflict(rt.plural, rt.group, name)
        for k in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
        ):
            if k in omd:
                md[k] = omd[k]
            else:
                md.pop(k, None)
        md.pop("selfLink", None)
        if op.sub == "status":
            if rt.builtin and rt.kind != "CustomResourceDefinition":
                for k in ("spec",):
                    if k in old:
                        cand[k] = old[k]
                    else:
                        cand.pop(k, None)
                if "ownerReferences" in omd:
                    md["ownerReferences"] = omd["ownerReferences"]
                else:
                    md.pop("ownerReferences", None)
            else:
                new = {k: v for k, v in old.items() if k != "status"}
                new["metadata"] = dict(omd)
                if "managedFields" in md:
                    new["metadata"]["managedFields"] = md["managedFields"]
                if "status" in cand:
                    new["status"] = cand["status"]
                cand = clone(new)
        elif rt.status:
            if "status" in old:
                cand["status"] = old["status"]
            else:
                cand.pop("status", None)
        if _has_generation(rt) and _spec_changed(old, cand, rt.status):
            cand["metadata"]["generation"] = int(omd.get("generation") or 0) + 1
        return cand

    def _finish_write(self, op: Op, key: Key, old: Obj, new: Obj) -> Obj:
        """Store an update unless it is a no-op; delete when the last finalizer went away."""
        rt = op.rt
        if fm.json_equal(_without_rv(new), _without_rv(old)):
            return self.render(rt, old)
        if op.dry_run:
            return self.render(rt, new)
        new["apiVersion"] = old.get("apiVersion", rt.storage_api_version)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self.render(rt, self._remove(rt, key, new))
        if _is_crd(rt) and op.sub == "":
            new["status"] = crd_status(new, now())
            if old.get("status"):
                new["status"]["conditions"] = old["status"].get(
                    "conditions", new["status"]["conditions"]
                )
        return self.render(rt, self._commit(rt, key, new, old))

    def update(self, op: Op, body: Any) -> Obj:
        """PUT (main resource or /status); 409 on stale resourceVersion, 404 when missing."""
        if not isinstance(body, dict):
            raise E.bad_request("the body of the request was in an unknown format")
        rt = op.rt
        body = clone(body)
        self._check_type_meta(rt, body)
        md = body.get("metadata")
        if isinstance(md, dict) and md.get("name") and md["name"] != op.name:
            raise E.bad_request(
                f"the name of the object ({md['name']}) does not match the name on the URL ({op.name})"
            )
        self._place(op, body)
        with self.lock:
            key = (op.ns or "", op.name or "")
            old = self.data[rt.gr].get(key)
            if old is None:
                raise E.not_found(rt.plural, rt.group, op.name or "")
            cand = self._decode(op, body)
            return self._update_with(op, key, old, cand)

    def _update_with(self, op: Op, key: Key, old: Obj, cand: Obj) -> Obj:
        rt = op.rt
        incoming = cand["metadata"].get("managedFields") or None  # [] means "unchanged"
        new = self._prepare_update(op, old, cand)
        self._validate(op, new, old)
        if incoming is not None and incoming != old["metadata"].get("managedFields"):
            managers = fm.decode(incoming)
        else:
            managers = fm.decode(old["metadata"].get("managedFields"))
        managers = fm.update_managers(
            old, new, rt.shape, managers, op.manager, rt.api_version, op.sub, self._ignored(op)
        )
        _set_managed(new, managers)
        return self._finish_write(op, key, old, new)

    # ---- patch -------------------------------------------------------------------------------

    def patch(self, op: Op, raw: bytes, content_type: str) -> tuple[Obj, int]:
        """PATCH with merge, JSON, strategic merge or apply patch; returns (object, code)."""
        rt = op.rt
        ct = content_type.split(";")[0].strip().lower()
        accepted = [JSONPATCH, MERGE, APPLY]
        if rt.builtin:
            accepted = [JSONPATCH, MERGE, STRATEGIC, APPLY]
        if ct not in accepted:
            raise E.unsupported_media_type(ct, accepted)
        if "force" in op.query and ct != APPLY:
            raise E.invalid(
                "PatchOptions", "meta.k8s.io", "",
                [FieldError("FieldValueForbidden", "force", "may not be specified for non-apply patch")],
            )  # fmt: skip
        force = op.query.get("force", "false").lower() == "true"
        if ct == APPLY:
            if not op.query.get("fieldManager"):
                raise E.invalid(
                    "PatchOptions", "meta.k8s.io", "",
                    [FieldError("FieldValueRequired", "fieldManager", "is required for apply patch")],
                )  # fmt: skip
            try:
                patch = yaml.safe_load(raw.decode() or "{}")
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise E.bad_request(f"error decoding YAML: {e}") from None
            if not isinstance(patch, dict):
                raise E.bad_request("error decoding YAML: the apply configuration is not an object")
        else:
            try:
                patch = json.loads(raw or b"null")
            except (ValueError, UnicodeDecodeError) as e:
                raise E.bad_request(f"error decoding patch: {e}") from None
        _ = op.dry_run  # reject a bad dryRun value before anything else
        with self.lock:
            key = (op.ns or "", op.name or "")
            old = self.data[rt.gr].get(key)
            if ct == APPLY:
                return self._apply(op, key, old, patch, force)
            if old is None:
                raise E.not_found(rt.plural, rt.group, op.name or "")
            current = self.render(rt, old)
            try:
                if ct == MERGE:
                    if not isinstance(patch, dict):
                        raise E.bad_request("invalid JSON Patch")
                    patched = merge_patch(current, patch)
                elif ct == JSONPATCH:
                    patched = json_patch(current, patch)
                else:
                    if not isinstance(patch, dict):
                        raise E.bad_request(
                            "json: cannot unmarshal array into Go value of type map[string]interface {}"
                        )
                    patched = strategic_merge_patch(current, patch, rt.shape)
            except PatchDecodeError as e:
                raise E.bad_request(str(e)) from None
            except PatchError as e:
                raise E.patch_rejected(str(e)) from None
            if not isinstance(patched, dict):
                raise E.patch_rejected("the patched object is not an object")
            self._check_type_meta(rt, patched)
            cand = self._decode(op, patched)
            return self._update_with(op, key, old, cand), 200

    def _apply(self, op: Op, key: Key, old: Obj | None, cfg: Obj, force: bool) -> tuple[Obj, int]:
        rt = op.rt
        av, kind = cfg.get("apiVersion"), cfg.get("kind")
        if not av or not kind or av != rt.api_version or kind != rt.kind:
            raise E.bad_request(
                f"invalid object type: {av or ''}, Kind={kind or ''}"
                if not (av and kind)
                else f"the API version in the data ({av}) does not match the expected API version ({rt.api_version})"
                if av != rt.api_version
                else f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )
        md = cfg.get("metadata")
        if not isinstance(md, dict):
            md = cfg["metadata"] = {}
        if md.get("managedFields") is not None:
            raise E.bad_request("metadata.managedFields must be nil")
        if md.get("name") and md["name"] != op.name:
            raise E.bad_request(
                f"the name of the object ({md['name']}) does not match the name on the URL ({op.name})"
            )
        if rt.namespaced and md.get("namespace") and md["namespace"] != op.ns:
            raise E.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        # the configuration must be representable in the schema (typed patch object)
        ctx = Ctx(defaults=False, required=False, prune=False)
        cfg = normalize(clone(cfg), rt.shape, "", ctx)
        if ctx.bad:
            raise E.bad_request(ctx.bad[0])
        if ctx.undeclared:
            ident = f"{op.ns}/{op.name}" if op.ns else f"/{op.name}"
            raise E.bad_request(
                f"failed to create typed patch object ({ident}; {rt.api_version}, Kind={rt.kind}): "
                f".{ctx.undeclared[0]}: field not declared in schema"
            )
        if ctx.errors:
            raise E.invalid(rt.kind, rt.group, op.name or "", ctx.errors)
        ignored = self._ignored(op)
        if old is None:
            if op.sub:
                raise E.not_found(rt.plural, rt.group, op.name or "")
            live: Obj = {
                "apiVersion": rt.api_version,
                "kind": rt.kind,
                "metadata": {"name": op.name},
            }
            if rt.namespaced:
                live["metadata"]["namespace"] = op.ns
            try:
                merged, managers, mkey = fm.apply_merge(
                    live, cfg, rt.shape, {}, op.manager, rt.api_version, op.sub, ignored
                )
            except fm.SSAError as e:
                raise E.invalid(
                    rt.kind, rt.group, op.name or "", [FieldError("FieldValueInvalid", "", str(e))]
                ) from None
            merged["metadata"]["name"] = op.name
            # created by apply: the applier owns what it applied
            ent = managers[mkey]
            ent.time = fm.now()
            return self.create(op, merged, managers={mkey: ent}), 201
        live = self.render(rt, old)
        managers = fm.decode(old["metadata"].get("managedFields"))
        try:
            merged, managers, mkey = fm.apply_merge(
                live, cfg, rt.shape, managers, op.manager, rt.api_version, op.sub, ignored
            )
        except fm.SSAError as e:
            raise E.invalid(
                rt.kind, rt.group, op.name or "", [FieldError("FieldValueInvalid", "", str(e))]
            ) from None
        cand = self._decode(op, merged)
        new = self._prepare_update(op, old, cand)
        self._validate(op, new, old)
        changed = not fm.json_equal(
            fm.without_managed(_without_rv(new)), fm.without_managed(_without_rv(old))
        )
        try:
            managers = fm.apply_finish(old, new, rt.shape, managers, mkey, force, changed, ignored)
        except fm.ConflictError as e:
            raise ApiError(409, "Conflict", str(e), {"causes": e.causes()}) from None
        _set_managed(new, managers)
        return self._finish_write(op, key, old, new), 200

    # ---- delete ----------------------------------------------------------------------------

    def delete(self, op: Op, options: Obj | None) -> tuple[Obj, int]:
        """DELETE one object; preconditions, finalizers, propagation policy, dry run."""
        rt = op.rt
        opts = dict(options or {})
        for q in ("propagationPolicy", "gracePeriodSeconds", "orphanDependents"):
            if q in op.query and q not in opts:
                opts[q] = op.query[q]
        if opts.get("dryRun"):
            dr = opts["dryRun"]
            if dr not in (["All"], "All"):
                raise E.bad_request(f'Invalid dry run value: "{dr}": supported values: "All"')
            op.query.setdefault("dryRun", "All")
        policy = opts.get("propagationPolicy") or ""
        if not policy and str(opts.get("orphanDependents", "")).lower() == "true":
            policy = "Orphan"
        if policy and policy not in ("Orphan", "Background", "Foreground"):
            raise E.invalid(
                "DeleteOptions", "meta.k8s.io", "",
                [FieldError("FieldValueNotSupported", "propagationPolicy", 'supported values: "Foreground", "Background", "Orphan", "nil"', policy, True)],
            )  # fmt: skip
        grace = opts.get("gracePeriodSeconds")
        with self.lock:
            key = (op.ns or "", op.name or "")
            obj = self.data[rt.gr].get(key)
            if obj is None:
                raise E.not_found(rt.plural, rt.group, op.name or "")
            pre = opts.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != obj["metadata"].get("uid"):
                raise E.conflict(
                    rt.plural, rt.group, op.name or "",
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {obj['metadata'].get('uid')}",
                )  # fmt: skip
            if pre.get("resourceVersion") and pre["resourceVersion"] != obj["metadata"].get(
                "resourceVersion"
            ):
                raise E.conflict(
                    rt.plural, rt.group, op.name or "",
                    f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                    f"ResourceVersion in object meta: {obj['metadata'].get('resourceVersion')}",
                )  # fmt: skip
            return self._delete_obj(rt, key, obj, policy or "Background", grace, op.dry_run)

    def _delete_obj(
        self, rt: ResourceType, key: Key, obj: Obj, policy: str, grace: Any, dry: bool
    ) -> tuple[Obj, int]:
        md = obj["metadata"]
        if rt.builtin and rt.kind == "Namespace":
            return self._delete_namespace(rt, key, obj, dry)
        if _is_crd(rt) and not md.get("finalizers"):
            return self._delete_crd(rt, key, obj, dry)
        graceful = 0
        if rt.builtin and rt.kind == "Pod" and (obj.get("spec") or {}).get("nodeName"):
            try:
                graceful = (
                    int(grace)
                    if grace is not None
                    else int((obj.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
                )
            except (TypeError, ValueError):
                graceful = 30
        if md.get("finalizers") or graceful > 0:
            if md.get("deletionTimestamp"):
                if not md.get("finalizers") and not dry:
                    return self._deleted_response(rt, self._remove(rt, key, obj, policy)), 200
                return self.render(rt, obj), 200
            new = clone(obj)
            nmd = new["metadata"]
            nmd["deletionTimestamp"] = _later(graceful) if graceful > 0 else now()
            nmd["deletionGracePeriodSeconds"] = graceful
            if nmd.get("generation"):
                nmd["generation"] = int(nmd["generation"]) + 1
            if dry:
                return self.render(rt, new), 200
            stored = self._commit(rt, key, new, obj)
            if not md.get("finalizers"):
                # the emulated kubelet confirms at once: the pod's containers are gone
                self._remove(rt, key, stored, policy)
            return self.render(rt, stored), 200
        if dry:
            return self._deleted_response(rt, obj), 200
        final = self._remove(rt, key, obj, policy)
        return self._deleted_response(rt, final), 200

    def _deleted_response(self, rt: ResourceType, obj: Obj) -> Obj:
        if rt.return_deleted:
            return self.render(rt, obj)
        md = obj["metadata"]
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {
                "name": md["name"],
                "group": rt.group,
                "kind": rt.plural,
                "uid": md.get("uid"),
            },
        }

    def _delete_namespace(self, rt: ResourceType, key: Key, obj: Obj, dry: bool) -> tuple[Obj, int]:
        if obj["metadata"].get("deletionTimestamp"):
            return self.render(rt, obj), 200
        new = clone(obj)
        new["metadata"]["deletionTimestamp"] = now()
        new["metadata"]["deletionGracePeriodSeconds"] = 0
        new.setdefault("status", {})["phase"] = "Terminating"
        if dry:
            return new, 200
        stored = self._commit(rt, key, new, obj)
        ns = key[1]
        for gr, bucket in list(self.data.items()):
            srt = self.storage_type.get(gr)
            if srt is None or not srt.namespaced:
                continue
            for k, o in list(bucket.items()):
                if k[0] == ns and k in bucket:
                    self._delete_obj(srt, k, o, "Background", 0, False)
        self._maybe_finish_namespace(ns)
        return stored, 200

    def _maybe_finish_namespace(self, ns: str) -> None:
        for gr, bucket in self.data.items():
            srt = self.storage_type.get(gr)
            if srt is not None and srt.namespaced and any(k[0] == ns for k in bucket):
                return
        rt = self.storage_type[("", "namespaces")]
        obj = self.data[rt.gr].get(("", ns))
        if (
            obj is not None
            and obj["metadata"].get("deletionTimestamp")
            and not obj["metadata"].get("finalizers")
        ):
            self._remove(rt, ("", ns), obj)

    def _delete_crd(self, rt: ResourceType, key: Key, obj: Obj, dry: bool) -> tuple[Obj, int]:
        name = obj["metadata"]["name"]
        if dry:
            return self.render(rt, obj), 200
        if name in self.terminating_crds:
            return self.render(rt, obj), 200
        self.terminating_crds.add(name)
        crt = next((t for t in self.types.values() if t.crd_name == name), None)
        if crt is not None:
            srt = self.storage_type.get(crt.gr, crt)
            for k, o in list(self.data.get(crt.gr, {}).items()):
                if k in self.data[crt.gr]:
                    self._delete_obj(srt, k, o, "Background", 0, False)
            if self.data.get(crt.gr):
                new = clone(obj)
                new["metadata"]["deletionTimestamp"] = now()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                conds = new.setdefault("status", {}).setdefault("conditions", [])
                conds.append(
                    {
                        "type": "Terminating",
                        "status": "True",
                        "reason": "InstanceDeletionInProgress",
                        "message": "CustomResource deletion is in progress",
                        "lastTransitionTime": now(),
                    }
                )
                return self.render(rt, self._commit(rt, key, new, obj)), 200
        return self.render(rt, self._remove(rt, key, obj)), 200

    def _maybe_finish_crd(self, name: str) -> None:
        crt = next((t for t in self.types.values() if t.crd_name == name), None)
        if crt is not None and self.data.get(crt.gr):
            return
        rt = self.storage_type[("apiextensions.k8s.io", "customresourcedefinitions")]
        obj = self.data[rt.gr].get(("", name))
        if obj is not None:
            self._remove(rt, ("", name), obj)
        else:
            self.terminating_crds.discard(name)

    def delete_collection(self, op: Op, options: Obj | None) -> Obj:
        """DELETE on a collection: every object matching the selectors."""
        listed = self.list_objects(op)
        deleted = []
        for item in listed["items"]:
            md = item["metadata"]
            sub = Op(op.rt, md.get("namespace"), md["name"], "", dict(op.query), op.user_agent)
            sub.query.pop("labelSelector", None)
            sub.query.pop("fieldSelector", None)
            try:
                obj, _ = self.delete(sub, options)
                deleted.append(obj)
            except ApiError as e:
                if e.code != 404:
                    raise
        return {
            "kind": op.rt.list_kind,
            "apiVersion": op.rt.api_version,
            "metadata": {},
            "items": deleted,
        }

    # ---- watch -------------------------------------------------------------------------------

    def watch(self, op: Op) -> Watcher:
        """Register a watcher with the events it must see first (replay or initial state)."""
        rt = op.rt
        labels, fields = self._selectors(op)
        w = Watcher(rt, op.ns, labels, fields)
        rv_param = op.query.get("resourceVersion", "")
        send_initial = op.query.get("sendInitialEvents", "").lower() == "true"
        bookmarks = op.query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        if send_initial and (
            op.query.get("resourceVersionMatch") != "NotOlderThan" or not bookmarks
        ):
            why = (
                "sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to "
                "NotOlderThan and allowWatchBookmarks is true"
            )
            raise E.invalid(
                "ListOptions",
                "meta.k8s.io",
                "",
                [FieldError("FieldValueForbidden", "sendInitialEvents", why)],
            )
        with self.lock:
            if rv_param in ("", "0") or send_initial:
                bucket = self.data.get(rt.gr, {})
                for _, obj in sorted(bucket.items()):
                    if w.wants(obj):
                        w.q.put(("ADDED", obj))
                if send_initial:
                    w.q.put(("BOOKMARK-INITIAL", self.rv))
            else:
                try:
                    n = int(rv_param)
                except ValueError:
                    raise E.bad_request(f'invalid resource version "{rv_param}"') from None
                if n < self.compacted:
                    w.q.put(
                        (
                            "ERROR",
                            E.gone(
                                f"too old resource version: {n} ({self.compacted + 1})"
                            ).status(),
                        )
                    )
                    w.q.put(_CLOSE)
                    return w
                for ev in self.history:
                    if ev.rv > n and ev.gr == rt.gr:
                        w.offer(ev)
            self.watchers[rt.gr].add(w)
        return w

    def unwatch(self, w: Watcher) -> None:
        with self.lock:
            self.watchers.get(w.rt.gr, set()).discard(w)

    def idle_bookmark_rv(self, w: Watcher) -> int | None:
        """Current RV when ``w`` has no pending events (a bookmark may then be sent), else None."""
        with self.lock:
            if w.q.empty():
                return self.rv
            return None

    def close(self) -> None:
        with self.lock:
            for ws in self.watchers.values():
                for w in ws:
                    w.close()
            self.watchers.clear()
        self._gc_q.put(None)

    # ---- garbage collector -----------------------------------------------------------------

    def _gc_put(self, item: tuple[Any, ...]) -> None:
        with self._gc_cond:
            self._gc_pending += 1
        self._gc_q.put(item)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until the garbage collector has nothing queued; False on timeout."""
        with self._gc_cond:
            return self._gc_cond.wait_for(lambda: self._gc_pending == 0, timeout)

    def _gc_loop(self) -> None:
        while True:
            item = self._gc_q.get()
            if item is None:
                return
            try:
                with self.lock:
                    self._gc_one(item)
            except Exception:
                pass
            finally:
                with self._gc_cond:
                    self._gc_pending -= 1
                    self._gc_cond.notify_all()

    def _gc_one(self, item: tuple[Any, ...]) -> None:
        if item[0] == "owner":
            targets = list(self.dependents.get(item[1], set()))
        else:
            targets = [(item[1], item[2])]
        for gr, key in targets:
            obj = self.data.get(gr, {}).get(key)
            rt = self.storage_type.get(gr)
            if obj is None or rt is None:
                continue
            refs = obj["metadata"].get("ownerReferences") or []
            uids = {r.get("uid") for r in refs}
            gone = {u for u in uids if u not in self.uids}
            if not gone:
                continue
            if gone == uids:
                self._delete_obj(rt, key, obj, "Background", 0, False)
            else:
                self._drop_refs(rt, key, obj, gone)


# ---- helpers -------------------------------------------------------------------------------------


def _is_crd(rt: ResourceType) -> bool:
    return rt.builtin and rt.kind == "CustomResourceDefinition"


def _owner_uids(obj: Obj | None) -> set[str]:
    if obj is None:
        return set()
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return {r["uid"] for r in refs if isinstance(r, dict) and r.get("uid")}


def _has_generation(rt: ResourceType) -> bool:
    return not rt.builtin or rt.kind in ("Pod", "CustomResourceDefinition")


def _spec_changed(old: Obj, new: Obj, status_sub: bool) -> bool:
    skip = {"metadata", "status"} if status_sub else {"metadata"}
    a = {k: v for k, v in old.items() if k not in skip and k not in ("apiVersion", "kind")}
    b = {k: v for k, v in new.items() if k not in skip and k not in ("apiVersion", "kind")}
    return not fm.json_equal(a, b)


def _without_rv(obj: Obj) -> Obj:
    o = dict(obj)
    o["metadata"] = {k: v for k, v in obj.get("metadata", {}).items() if k != "resourceVersion"}
    o.pop("apiVersion", None)
    return o


def _set_managed(obj: Obj, managers: fm.Managers) -> None:
    enc = fm.encode(managers)
    if enc:
        obj["metadata"]["managedFields"] = enc
    else:
        obj["metadata"].pop("managedFields", None)


def _short_json(body: Obj) -> str:
    s = json.dumps(body, separators=(",", ":"))
    return s if len(s) < 200 else s[:197] + "..."


def socket_closed(sock: socket.socket) -> bool:
    """True when the peer has closed ``sock`` (non-blocking peek)."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return data == b""
