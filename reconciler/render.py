"""Render: turn validated Git documents into the objects the cluster should hold.

Input: the documents the loader read (plain dicts, already validated). Output: a list of
:class:`Desired` objects in apply order (OvsBridge, SpiderIPPool, SpiderMultusConfig, then one
NetworkAttachmentDefinition per SpiderMultusConfig), each labelled as owned by this reconciler
instance. No I/O here: same input, same output.

NetworkAttachmentDefinition naming and annotations follow Spiderpool's SpiderMultusConfig
controller (reference/spiderpool.md); the CNI config list uses our plugins (DESIGN.md, "What the
reconciler writes").

Render trusts the validator but never crashes on what slips past it: a document it cannot
turn into objects raises ValueError naming the object and its file:line.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import netaddr

from reconciler import vocab
from reconciler.rules_multus import cni_config_problem, strict_json
from reconciler.vocab import Resource


@dataclass
class Desired:
    """One object as the reconciler wants it in the cluster.

    ``body`` is the full apply configuration (apiVersion, kind, metadata, spec). ``source`` is
    ``file:line`` of the Git document it came from (the SMC's for a rendered NAD). ``owner``
    is the (kind, namespace, name) of the object that must own it via ownerReference, if any.
    """

    resource: Resource
    body: dict[str, Any]
    source: str = ""
    owner: tuple[str, str | None, str] | None = None
    rendered_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str | None:
        ns = self.body["metadata"].get("namespace")
        return str(ns) if ns is not None else None

    @property
    def key(self) -> tuple[str, str | None, str]:
        """(kind, namespace or None, name): identity of the object in the cluster."""
        return (self.resource.kind, self.namespace, self.name)

    def ref(self) -> str:
        """``Kind namespace/name`` or ``Kind name`` for messages."""
        ns = self.namespace
        return f"{self.resource.kind} {ns + '/' if ns else ''}{self.name}"


def ownership_labels(instance: str) -> dict[str, str]:
    """The labels that mark an object as applied by reconciler ``instance``."""
    return {vocab.LABEL_MANAGED_BY: vocab.MANAGED_BY_VALUE, vocab.LABEL_INSTANCE: instance}


def _labelled(obj: Mapping[str, Any], instance: str) -> dict[str, Any]:
    """A copy of ``obj`` with the ownership labels and without ``status`` (the status of a
    custom resource is written through its subresource by its controller, never applied
    from Git; a ``status`` in a Git document is ignored)."""
    body = {k: copy.deepcopy(v) for k, v in obj.items() if k != "status"}
    md = body.setdefault("metadata", {})
    md["labels"] = {**(md.get("labels") or {}), **ownership_labels(instance)}
    return body


def nad_name(smc: Mapping[str, Any]) -> str:
    """NAD name for a SpiderMultusConfig: annotation ``multus.spidernet.io/cr-name`` or its name."""
    md = smc["metadata"]
    return str((md.get("annotations") or {}).get(vocab.ANNO_SMC_CR_NAME) or md["name"])


def _ipam(section: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any] | None:
    if spec.get("disableIPAM"):
        return None
    ipam: dict[str, Any] = {"type": vocab.CNI_IPAM_TYPE}
    pools = section.get("ippools") or {}
    if pools.get("ipv4"):
        ipam["default_ipv4_ippool"] = list(pools["ipv4"])
    if pools.get("ipv6"):
        ipam["default_ipv6_ippool"] = list(pools["ipv6"])
    return ipam


def cni_plugins(smc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """CNI plugin list for a SpiderMultusConfig's ``spec`` (without name/cniVersion).

    ovs -> ``underlay-ovs`` (bridge, vlan when non-zero, trunk, deviceID) with ``underlay-ipam``;
    macvlan/ipvlan -> the reference ``macvlan``/``ipvlan`` plugin on ``bond.name`` when there is a
    bond, else ``master[0]`` (``<parent>.vlanID`` when a VLAN is set) with ``underlay-ipam``; custom -> ``customCNI`` verbatim. Spiderpool's
    coordinator plugin is not rendered (underlay has none). Raises ValueError for a cniType we
    cannot render (vlan, sriov, ib-sriov, ipoib), naming it, and for a config the validator
    refuses (an ovs section without bridge, a customCNI that is not a CNI configuration).
    """
    spec = smc.get("spec") or {}
    cni_type = spec.get("cniType", "custom")
    if cni_type == "ovs":
        ovs = spec.get("ovs") or {}
        if not isinstance(ovs.get("bridge"), str) or not ovs["bridge"]:
            raise ValueError("cniType ovs needs spec.ovs.bridge")
        plugin: dict[str, Any] = {"type": vocab.CNI_OVS_TYPE, "bridge": ovs["bridge"]}
        if ovs.get("vlan"):
            plugin["vlan"] = ovs["vlan"]
        if ovs.get("trunk"):
            plugin["trunk"] = copy.deepcopy(ovs["trunk"])
        if ovs.get("deviceID"):
            plugin["deviceID"] = ovs["deviceID"]
        ipam = _ipam(ovs, spec)
        if ipam:
            plugin["ipam"] = ipam
        return [plugin]
    if cni_type in ("macvlan", "ipvlan"):
        sec = spec.get(cni_type) or {}
        masters = list(sec.get("master") or [])
        bond: dict[str, Any] = sec["bond"] if isinstance(sec.get("bond"), dict) else {}
        # the parent is the bond when there is one (Spiderpool's SpiderMultusConfig controller;
        # underlay does not create it: the validator warns, bond-not-created)
        master = bond.get("name") or (masters[0] if masters else "")
        if sec.get("vlanID"):
            master = f"{master}.{sec['vlanID']}"
        plugin = {"type": cni_type, "master": master}
        plugin["mode"] = "bridge" if cni_type == "macvlan" else "l2"
        if sec.get("mtu"):
            plugin["mtu"] = sec["mtu"]
        ipam = _ipam(sec, spec)
        if ipam:
            plugin["ipam"] = ipam
        return [plugin]
    if cni_type == "custom":
        raw = spec.get("customCNI")
        if not raw:
            return []
        try:
            conf = strict_json(raw)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"customCNI is not usable JSON: {exc}") from None
        if not isinstance(conf, dict):
            raise ValueError("customCNI must be a JSON object")
        why = cni_config_problem(conf)
        if why:
            raise ValueError(f"customCNI is not a CNI configuration: {why}")
        return copy.deepcopy(list(conf["plugins"])) if "plugins" in conf else [conf]
    raise ValueError(
        f"cniType {cni_type!r} is not supported by underlay (ovs, macvlan, ipvlan, custom)"
    )


def chained_plugins(smc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The plugins of a SpiderMultusConfig's ``spec.chainCNIJsonData`` (a list of JSON strings,
    one plugin object each), parsed, in order: they run after the main plugin, as Spiderpool
    appends them to the NAD's plugin list. Raises ValueError naming the entry for one that is
    not a JSON object with a string ``type`` (the validator refuses those first)."""
    out: list[dict[str, Any]] = []
    for i, raw in enumerate((smc.get("spec") or {}).get("chainCNIJsonData") or []):
        try:
            plugin = strict_json(raw)
        except (ValueError, TypeError, RecursionError) as exc:
            raise ValueError(f"chainCNIJsonData[{i}] is not usable JSON: {exc}") from None
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str):
            raise ValueError(f"chainCNIJsonData[{i}] is not a CNI plugin object with a type")
        out.append(plugin)
    return out


def render_nad(smc: Mapping[str, Any], instance: str) -> dict[str, Any]:
    """The NetworkAttachmentDefinition for one SpiderMultusConfig.

    Shape (Network Plumbing WG spec v1.2): ``spec.config`` is a CNI config *list* as a JSON
    string: ``{"cniVersion", "name", "plugins": [...]}``. cniVersion comes from the annotation
    ``multus.spidernet.io/cni-version`` (default 1.0.0), name from
    ``cni.spidernet.io/cniconfig-name`` (default: the NAD name); the plugins are the main one
    (:func:`cni_plugins`) then ``chainCNIJsonData`` (:func:`chained_plugins`). The SMC's annotations are
    copied, as Spiderpool does. An ovs NAD also carries ``k8s.v1.cni.cncf.io/resourceName:
    underlay.dev/<bridge>``, the Node extended resource the agent publishes while the bridge is
    Ready, unless the SMC sets that annotation itself.
    """
    md = smc["metadata"]
    annotations = dict(md.get("annotations") or {})
    spec = smc.get("spec") or {}
    if spec.get("cniType") == "ovs" and (spec.get("ovs") or {}).get("bridge"):
        # pods that need the bridge are scheduled only where the agent published it (ovs-cni marker)
        annotations.setdefault(
            vocab.ANNO_NAD_RESOURCE_NAME, vocab.NODE_RESOURCE_PREFIX + spec["ovs"]["bridge"]
        )
    name = nad_name(smc)
    conf = {
        "cniVersion": annotations.get(vocab.ANNO_SMC_CNI_VERSION, vocab.CNI_DEFAULT_VERSION),
        "name": annotations.get(vocab.ANNO_SMC_CNICONFIG_NAME, name),
        "plugins": cni_plugins(smc) + chained_plugins(smc),
    }
    nad_md: dict[str, Any] = {
        "name": name,
        "namespace": md["namespace"],
        "labels": ownership_labels(instance),
    }
    if annotations:
        nad_md["annotations"] = annotations
    return {
        "apiVersion": vocab.NAD_API_VERSION,
        "kind": "NetworkAttachmentDefinition",
        "metadata": nad_md,
        "spec": {"config": json.dumps(conf, separators=(",", ":"))},
    }


def render(
    documents: Iterable[Any],
    instance: str = vocab.DEFAULT_INSTANCE,
    *,
    cache: dict[Any, tuple[Desired, Desired | None]] | None = None,
) -> list[Desired]:
    """Desired objects for ``documents`` (loader Documents or plain dicts), in apply order.

    Order: every OvsBridge, every SpiderIPPool, every SpiderMultusConfig, every rendered NAD;
    within a kind by namespace/name, so the output is stable whatever the file order.
    Documents of kinds outside ``vocab.USER_KINDS`` are ignored (the loader reports them).

    ``cache`` (optional, kept by the caller between calls): the objects rendered from each
    loader Document (by identity: the loader's own cache hands back the same Document for an
    unchanged file), so only new or changed documents are rendered again; the same
    :class:`Desired` objects come back (they are never changed after render). Rewritten to
    hold exactly this call's documents.
    """
    by_kind: dict[str, list[Desired]] = {r.kind: [] for r in vocab.USER_KINDS}
    nads: list[Desired] = []
    used: dict[Any, tuple[Desired, Desired | None]] = {}
    for doc in documents:
        key = (doc, instance) if cache is not None and not isinstance(doc, dict) else None
        hit = cache.get(key) if cache is not None and key is not None else None
        if hit is None:
            hit = _render_one(doc, instance)
            if hit is None:
                continue
        if key is not None:
            used[key] = hit
        d, nad = hit
        by_kind[d.resource.kind].append(d)
        if nad is not None:
            nads.append(nad)
    if cache is not None:
        cache.clear()
        cache.update(used)
    out: list[Desired] = []
    for res in vocab.USER_KINDS:
        out.extend(sorted(by_kind[res.kind], key=lambda d: (d.namespace or "", d.name)))
    out.extend(sorted(nads, key=lambda d: (d.namespace or "", d.name)))
    return out


def _render_one(doc: Any, instance: str) -> tuple[Desired, Desired | None] | None:
    """(the object, its NAD for a SpiderMultusConfig) of one document; None for other kinds.
    Raises ValueError naming the object and its file:line (see :func:`render`)."""
    obj = getattr(doc, "obj", doc)
    source = _source(doc)
    res = vocab.BY_KEY.get((obj.get("apiVersion"), obj.get("kind")))
    if res is None or res not in vocab.USER_KINDS:
        return None
    try:
        d = Desired(res, _labelled(obj, instance), source=source)
        _ = d.key  # metadata.name must be there
        if res is vocab.SPIDER_IPPOOL:
            _default_ip_version(d.body)
        nad = render_nad(obj, instance) if res is vocab.SPIDER_MULTUS_CONFIG else None
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise ValueError(
            f"cannot render {_ref(res, obj)}{' (' + source + ')' if source else ''}: "
            f"{_reason(exc)}; run underlay validate on the repository"
        ) from None
    nad_d = None
    if nad is not None:
        nad_d = Desired(
            vocab.NETWORK_ATTACHMENT_DEFINITION, nad, source=source, owner=d.key,
            rendered_from=d.ref(),
        )  # fmt: skip
    return d, nad_d


def _default_ip_version(pool: dict[str, Any]) -> None:
    """Fill ``spec.ipVersion`` from ``spec.subnet`` when absent, as Spiderpool's webhook does."""
    spec = pool.get("spec") or {}
    if "ipVersion" not in spec and spec.get("subnet"):
        with contextlib.suppress(netaddr.AddrFormatError, ValueError, TypeError):
            spec["ipVersion"] = netaddr.IPNetwork(
                str(spec["subnet"])
            ).version  # else: the validator reports it


def _ref(res: Resource, obj: Mapping[str, Any]) -> str:
    """``Kind namespace/name`` of a document for an error message, whatever its shape."""
    md = obj.get("metadata")
    md = md if isinstance(md, Mapping) else {}
    ns, name = md.get("namespace"), md.get("name")
    shown = name if isinstance(name, str) and name else "(no name)"
    return f"{res.kind} {ns + '/' if isinstance(ns, str) and ns else ''}{shown}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}" if exc.args else "a field is missing"
    if isinstance(exc, RecursionError):
        return "nesting too deep"
    return str(exc) or type(exc).__name__


def _source(doc: Any) -> str:
    path = getattr(doc, "path", None)
    if path is None:
        return ""
    mark = getattr(doc, "mark", None)
    if callable(mark):
        line, _col = mark(())
        return f"{path}:{line}"
    return str(path)
