"""Semantic rules of SpiderMultusConfig (Spiderpool 1.2.x, reference/spiderpool.md).

Exactly one per-type section matching ``cniType`` (``custom``, the default, has none and may
carry ``customCNI``); ``customCNI`` is a CNI network configuration (``{"type": ...}``) or
configuration list (``{"plugins": [{"type": ...}, ...]}``) and each ``chainCNIJsonData`` entry
one plugin configuration (CNI spec 1.0.0, section "Configuration format"); two or more
``master`` interfaces need ``bond``; master and bond names are Linux interface names, and the
VLAN interface ``<master>.<vlanID>`` Spiderpool makes for ``vlanID`` fits Linux's 15
characters; OVS trunk entries; references to OvsBridges and SpiderIPPools of the repository
(missing ones are warnings: they may be managed outside Git); the
NetworkAttachmentDefinition names the configs render must not collide.
"""

from __future__ import annotations

import difflib
import json
import math
from typing import Any

from reconciler import vocab
from reconciler.loader import MAX_SAFE_INTEGER, WARNING, Document, Problem
from reconciler.rules_common import Context, check_dns1123, ifname_problem, nad_name
from reconciler.rules_ippool import parse_multus_name

SECTIONS = ("macvlan", "ipvlan", "ovs")
"""Per-type sections underlay renders, each named after its cniType."""

UNSUPPORTED = ("vlan", "sriov", "ib-sriov", "ipoib")
"""Spiderpool cniTypes underlay does not render (no per-type section in our schema)."""

_EXAMPLE = {
    "ovs": "add ovs: {bridge: br1}",
    "macvlan": "add macvlan: {master: [eth0]}",
    "ipvlan": "add ipvlan: {master: [eth0]}",
}


class _JSONValueError(ValueError):
    """A JSON number Kubernetes clients and CNI plugins cannot read (see :func:`strict_json`)."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > 16 or abs(int(text)) > MAX_SAFE_INTEGER:
        raise _JSONValueError(
            f"integer {text[:24]}{'...' if len(text) > 24 else ''} is beyond 2^53-1"
        )
    return int(text)


def _parse_constant(text: str) -> Any:
    raise _JSONValueError(f"{text} is not JSON (RFC 8259 has no NaN or Infinity)")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JSONValueError(f"number {text[:24]} overflows a double")
    return value


def strict_json(text: str) -> Any:
    """``json.loads`` as RFC 8259 reads it: no NaN/Infinity, finite numbers, integers within
    2^53-1 (so no 4300-digit conversion error), no duplicate member names (RFC 8259 says they
    SHOULD be unique; Go keeps the last, Python too, so "vlan": 10, "vlan": 20 would silently be
    20). Raises ValueError (json.JSONDecodeError for syntax) or RecursionError for absurd
    nesting."""
    value = json.loads(
        text,
        parse_int=_parse_int,
        parse_constant=_parse_constant,
        parse_float=_parse_float,
        object_pairs_hook=_unique_members,
    )
    if "\\u" in text:  # only a \\u escape can make a lone surrogate
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"a \\u escape makes a lone UTF-16 surrogate ({exc.object[exc.start]!a}), "
                "which is not a Unicode character"
            ) from None
    return value


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f'duplicate member "{key}"')
        out[key] = value
    return out


def _json_object_problem(text: str) -> str | None:
    try:
        value = strict_json(text)
    except json.JSONDecodeError as exc:
        return f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        return "is not usable JSON: it nests too deeply"
    except ValueError as exc:
        return f"is not usable JSON: {exc}"
    if not isinstance(value, dict):
        return "must be a JSON object ({...})"
    return None


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    return "a list" if isinstance(value, list) else "an object"


def plugin_problem(plugin: Any, where: str | None = None) -> str | None:
    """Why ``plugin`` (decoded JSON) is not one CNI plugin configuration, or None.

    CNI spec 1.0.0, "Plugin configuration objects": an object whose ``type`` (the plugin
    binary) is a non-empty string. ``where`` names it in the message (``plugins[0]``).
    """
    if not isinstance(plugin, dict):
        return f"{where or 'it'} must be a plugin object with a type, got {_json_kind(plugin)}"
    kind = plugin.get("type")
    if "type" not in plugin:
        return f'{where or "it"} has no "type" (the name of the plugin binary)'
    if not isinstance(kind, str) or not kind.strip():
        return (
            f"{where + '.' if where else ''}type must be the name of a plugin binary, "
            f"got {_json_kind(kind)}"
        )
    return None


def cni_config_problem(conf: dict[str, Any]) -> str | None:
    """Why a decoded ``customCNI`` object is not a CNI configuration (list), or None.

    CNI spec 1.0.0, "Configuration format": a network configuration list has ``plugins``, a
    non-empty list of plugin objects; a single network configuration (the pre-list form) has
    ``type`` itself.
    """
    if "plugins" in conf:
        plugins = conf["plugins"]
        if not isinstance(plugins, list):
            return f'"plugins" must be a list of plugin objects, got {_json_kind(plugins)}'
        if not plugins:
            return '"plugins" is empty; a configuration list needs at least one plugin'
        for i, plugin in enumerate(plugins):
            why = plugin_problem(plugin, f"plugins[{i}]")
            if why:
                return why
        return None
    if "type" not in conf:
        return 'has neither "plugins" (a configuration list) nor "type" (a single plugin)'
    return plugin_problem(conf)


def check_smc(doc: Document, ctx: Context) -> list[Problem]:
    """Per-config rules (see module docstring)."""
    spec = doc.get(("spec",))
    out = check_dns1123(
        doc,
        ("metadata", "annotations", vocab.ANNO_SMC_CR_NAME),
        doc.get(("metadata", "annotations", vocab.ANNO_SMC_CR_NAME)),
        "NetworkAttachmentDefinition name",
    )
    if not isinstance(spec, dict):
        return out
    cni_type = spec.get("cniType", "custom")
    if not isinstance(cni_type, str):
        return out
    if cni_type in UNSUPPORTED:
        out.append(
            doc.problem(
                ("spec", "cniType"),
                rule="cni-type-unsupported",
                message=f"cniType {cni_type} is not supported by underlay",
                hint="use ovs, macvlan, ipvlan or custom",
            )
        )
    for section in SECTIONS:
        if section in spec and section != cni_type:
            out.append(
                doc.problem(
                    ("spec", section),
                    rule="cni-type-section",
                    message=f'section "{section}" does not match cniType {cni_type}',
                    hint=f"remove {section}, or set cniType: {section}",
                    at_key=True,
                )
            )
    if cni_type in SECTIONS and cni_type not in spec:
        out.append(
            doc.problem(
                ("spec", "cniType") if "cniType" in spec else ("spec",),
                rule="cni-type-section",
                message=f'cniType {cni_type} needs an "{cni_type}" section',
                hint=_EXAMPLE[cni_type],
            )
        )
    coordinator = spec.get("coordinator")
    if isinstance(coordinator, dict) and coordinator:
        out.append(
            doc.problem(
                ("spec", "coordinator"),
                rule="coordinator-not-rendered",
                severity=WARNING,
                message="underlay renders no coordinator plugin, so these settings have no "
                "effect (Spiderpool's coordinator would tune the pod's routes and MAC and check "
                "the gateway and IP conflicts)",
                hint="remove coordinator, or chain the plugins you need with chainCNIJsonData",
                at_key=True,
            )
        )
    custom = spec.get("customCNI")
    if "customCNI" in spec and cni_type != "custom":
        out.append(
            doc.problem(
                ("spec", "customCNI"),
                rule="cni-type-section",
                message=f"customCNI is only used with cniType custom, not {cni_type}",
                hint="remove customCNI, or set cniType: custom",
                at_key=True,
            )
        )
    elif isinstance(custom, str) and custom.strip():
        why = _json_object_problem(custom)
        if why:
            out.append(
                doc.problem(
                    ("spec", "customCNI"),
                    rule="custom-cni-invalid-json",
                    message=f"customCNI {why}",
                    hint='write a CNI config object, e.g. {"cniVersion": "1.0.0", "type": "bridge"}',
                )
            )
        else:
            conf = strict_json(custom)
            why = cni_config_problem(conf)
            if why:
                out.append(
                    doc.problem(
                        ("spec", "customCNI"),
                        rule="custom-cni-invalid-config",
                        message=f"customCNI is not a CNI configuration: {why}",
                        hint='write {"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]} or '
                        'a single plugin {"cniVersion": "1.0.0", "type": "bridge"}',
                    )
                )
            else:
                for plugin in conf.get("plugins", [conf]):
                    out += _check_own_plugin(doc, ctx, ("spec", "customCNI"), plugin)
    chain = spec.get("chainCNIJsonData")
    if isinstance(chain, list):
        for i, item in enumerate(chain):
            if isinstance(item, str):
                why = _json_object_problem(item)
                if why:
                    out.append(
                        doc.problem(
                            ("spec", "chainCNIJsonData", i),
                            rule="chain-cni-invalid-json",
                            message=f"chained plugin {why}",
                            hint='write one plugin object, e.g. {"type": "tuning"}',
                        )
                    )
                    continue
                plugin = strict_json(item)
                why = plugin_problem(plugin)
                if why:
                    out.append(
                        doc.problem(
                            ("spec", "chainCNIJsonData", i),
                            rule="chain-cni-invalid-plugin",
                            message=f"chainCNIJsonData[{i}] is not a CNI plugin configuration: "
                            f"{why}",
                            hint='write one plugin object with its type, e.g. {"type": "tuning"}',
                        )
                    )
                else:
                    out += _check_own_plugin(doc, ctx, ("spec", "chainCNIJsonData", i), plugin)
    for section in SECTIONS:
        body = spec.get(section)
        if isinstance(body, dict):
            out += _check_section(doc, ctx, section, body)
    return out


def _check_section(
    doc: Document, ctx: Context, section: str, body: dict[str, Any]
) -> list[Problem]:
    out: list[Problem] = []
    base = ("spec", section)
    master = body.get("master")
    if isinstance(master, list) and len(master) >= 2 and "bond" not in body:
        out.append(
            doc.problem(
                (*base, "master"),
                rule="bond-required",
                message=f"{len(master)} master interfaces need a bond",
                hint="add bond: {name: bond0, mode: 1}, or keep one master",
            )
        )
    if section in ("macvlan", "ipvlan"):
        out += _check_master_names(doc, base, body)
        bond = body.get("bond")
        bond_name = bond.get("name") if isinstance(bond, dict) else None
        if isinstance(bond_name, str) and bond_name:
            out.append(
                doc.problem(
                    (*base, "bond"),
                    rule="bond-not-created",
                    severity=WARNING,
                    message=f'underlay does not create bond "{bond_name}" as Spiderpool\'s '
                    "ifacer plugin does: the NetworkAttachmentDefinition uses it as the "
                    f"{section} master, so it must already exist on every node",
                    hint="create the bond on the nodes with netplan or NetworkManager, or keep one "
                    "master and drop bond",
                )
            )
        vlan = body.get("vlanID")
        masters = body.get("master")
        parent = bond_name or (masters[0] if isinstance(masters, list) and masters else None)
        if (
            isinstance(vlan, int)
            and not isinstance(vlan, bool)
            and vlan > 0
            and isinstance(parent, str)
            and parent
            and len(f"{parent}.{vlan}") <= 15  # else vlan-interface-name-too-long says it
        ):
            out.append(
                doc.problem(
                    (*base, "vlanID"),
                    rule="vlan-interface-not-created",
                    severity=WARNING,
                    message=f'underlay does not create the VLAN interface "{parent}.{vlan}" '
                    "(Spiderpool's ifacer plugin does); the NetworkAttachmentDefinition uses it as "
                    f"the {section} master, so it must exist on every node or every pod ADD fails",
                    hint=f"create {parent}.{vlan} on the nodes as a netplan or NetworkManager VLAN, "
                    "or use cniType ovs with vlan: an OVS access port",
                )
            )
    if section == "ovs":
        out += _check_trunk(doc, body.get("trunk"))
        bridge = body.get("bridge")
        if isinstance(bridge, str) and bridge and bridge not in ctx.bridges:
            close = difflib.get_close_matches(bridge, list(ctx.bridges), n=1)
            out.append(
                doc.problem(
                    (*base, "bridge"),
                    rule="bridge-not-found",
                    severity=WARNING,
                    message=f'no OvsBridge in {ctx.scope} makes bridge "{bridge}"',
                    hint=f"did you mean {close[0]}?"
                    if close
                    else f"add an OvsBridge for it; {ctx.outside_note('the bridge', 'made')}",
                )
            )
    pools = body.get("ippools")
    if isinstance(pools, dict):
        for family_key, family in (("ipv4", 4), ("ipv6", 6)):
            names = pools.get(family_key)
            if isinstance(names, list):
                for i, name in enumerate(names):
                    if isinstance(name, str):
                        out += _check_pool_ref(
                            doc, ctx, (*base, "ippools", family_key, i), name, family
                        )
    return out


def _check_master_names(
    doc: Document, base: tuple[str | int, ...], body: dict[str, Any]
) -> list[Problem]:
    """``master-name-invalid`` and ``vlan-interface-name-too-long`` of a macvlan/ipvlan section.

    The parent interface is the bond when there is one, else ``master[0]`` (Spiderpool's
    SpiderMultusConfig controller); with a ``vlanID`` it is ``<parent>.<vlanID>``.
    """
    out: list[Problem] = []
    names: list[tuple[tuple[str | int, ...], str]] = []
    master = body.get("master")
    if isinstance(master, list):
        names += [((*base, "master", i), m) for i, m in enumerate(master) if isinstance(m, str)]
    bond = body.get("bond")
    bond_name = bond.get("name") if isinstance(bond, dict) else None
    if isinstance(bond_name, str):
        names.append(((*base, "bond", "name"), bond_name))
    for path, name in names:
        if name in (".", ".."):
            out.append(
                doc.problem(
                    path,
                    rule="master-name-invalid",
                    message=f'"{name}" is not a Linux interface name: {ifname_problem(name)}',
                    hint="write the NIC's name as `ip link` shows it on the node, e.g. eth0",
                )
            )
    vlan = body.get("vlanID")
    if not isinstance(vlan, int) or isinstance(vlan, bool) or vlan <= 0 or not names:
        return out
    path, parent = names[-1] if isinstance(bond_name, str) else names[0]
    vlan_if = f"{parent}.{vlan}"
    if len(vlan_if) > 15 and len(parent) <= 15:
        room = 15 - len(f".{vlan}")
        out.append(
            doc.problem(
                path,
                rule="vlan-interface-name-too-long",
                message=f'the VLAN interface "{vlan_if}" made for vlanID {vlan} has '
                f"{len(vlan_if)} characters; Linux interface names are at most 15 (IFNAMSIZ 16 "
                "with the terminating NUL), so the interface cannot be created",
                hint=f"for vlanID {vlan} the parent name may have at most {room} characters: "
                "give the NIC a shorter name on the nodes with a systemd .link file, or create "
                "the VLAN interface on the nodes and name it as master, without vlanID",
            )
        )
    return out


def _check_trunk(doc: Document, trunk: Any) -> list[Problem]:
    if not isinstance(trunk, list):
        return []
    out: list[Problem] = []
    for i, entry in enumerate(trunk):
        if not isinstance(entry, dict):
            continue
        path = ("spec", "ovs", "trunk", i)
        has_id, has_min, has_max = ("id" in entry), ("minID" in entry), ("maxID" in entry)
        if not ((has_id and not has_min and not has_max) or (not has_id and has_min and has_max)):
            out.append(
                doc.problem(
                    path,
                    rule="trunk-entry-invalid",
                    message="a trunk entry has either id, or both minID and maxID",
                    hint="write {id: 100} or {minID: 100, maxID: 200}",
                )
            )
            continue
        lo, hi = entry.get("minID"), entry.get("maxID")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            out.append(
                doc.problem(
                    (*path, "minID"),
                    rule="trunk-range-reversed",
                    message=f"minID {lo} is above maxID {hi}",
                    hint=f"write minID: {hi}, maxID: {lo}",
                )
            )
    return out


def _check_own_plugin(
    doc: Document, ctx: Context, path: tuple[str | int, ...], plugin: Any
) -> list[Problem]:
    """Our own plugins written by hand in customCNI or chainCNIJsonData get the checks the
    ``ovs`` section gets: the config as ``underlay-ovs`` reads it at ADD (its own parser, so
    a value it refuses is refused here first), the bridge an OvsBridge makes, the pools of its
    ``underlay-ipam``. Other plugin types are not ours to judge."""
    if not isinstance(plugin, dict) or plugin.get("type") != vocab.CNI_OVS_TYPE:
        return []
    from node_agent.cni.errors import CniError
    from node_agent.cni.ovs_plugin import parse_conf

    out: list[Problem] = []
    try:
        parse_conf(plugin)
    except CniError as exc:
        return [
            doc.problem(
                path,
                rule="own-plugin-invalid",
                message=f"the {vocab.CNI_OVS_TYPE} plugin would refuse every pod ADD: {exc.msg}",
                hint="fix that field, or use cniType ovs and let underlay render the plugin",
            )
        ]
    bridge = plugin["bridge"]
    if bridge not in ctx.bridges:
        out.append(
            doc.problem(
                path,
                rule="bridge-not-found",
                severity=WARNING,
                message=f'no OvsBridge in {ctx.scope} makes bridge "{bridge}"',
                hint=f"add an OvsBridge for it; {ctx.outside_note('the bridge', 'made')}",
            )
        )
    ipam = plugin.get("ipam")
    if isinstance(ipam, dict) and ipam.get("type") == vocab.CNI_IPAM_TYPE:
        for key, family in (("default_ipv4_ippool", 4), ("default_ipv6_ippool", 6)):
            names = ipam.get(key)
            if names is None:
                continue
            if isinstance(names, str):  # the IPAM takes one name as a list of one
                names = [names]
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                out.append(
                    doc.problem(
                        path,
                        rule="own-plugin-invalid",
                        message=f"the {vocab.CNI_IPAM_TYPE} plugin would refuse every pod ADD "
                        f"without pool annotations: ipam.{key} must be a pool name or a list "
                        f"of pool names, got {json.dumps(names)[:60]}",
                        hint=f'write "{key}": ["pool-name"]',
                    )
                )
                continue
            for name in names:
                out += _check_pool_ref(doc, ctx, path, name, family)
    return out


def _check_pool_ref(
    doc: Document, ctx: Context, path: tuple[str | int, ...], name: str, family: int
) -> list[Problem]:
    found = ctx.pools.get(name)
    if not found:
        close = difflib.get_close_matches(name, sorted(ctx.pools), n=1, cutoff=0.8)
        return [
            doc.problem(
                path,
                rule="ippool-not-found",
                severity=WARNING,
                message=f'no SpiderIPPool "{name}" in {ctx.scope}',
                hint=(f"did you mean {close[0]}? " if close else "check the name; ")
                + ctx.outside_note("the pool"),
            )
        ]
    pool = found[0]
    info = ctx.pool_info.get(id(pool))
    out: list[Problem] = []
    if info is not None and info.family is not None and info.family != family:
        other = "ipv6" if family == 4 else "ipv4"
        out.append(
            doc.problem(
                path,
                rule="ippool-family-mismatch",
                message=f"SpiderIPPool {name} is IPv{info.family} but is listed under ipv{family}",
                hint=f"move it to ippools.{other}",
            )
        )
    allowed = pool.get(("spec", "multusName"))
    if isinstance(allowed, list) and allowed and doc.namespace is not None:
        me = (doc.namespace, nad_name(doc))
        keys = {parse_multus_name(a) for a in allowed if isinstance(a, str)}
        if me not in keys:
            out.append(
                doc.problem(
                    path,
                    rule="ippool-multus-mismatch",
                    severity=WARNING,
                    message=f"SpiderIPPool {name} only serves multusName "
                    f"{', '.join(str(a) for a in allowed)}, so pods attached through "
                    f"{me[0]}/{me[1]} never get it",
                    hint=f"add {me[0]}/{me[1]} to the pool's multusName",
                )
            )
    return out


def check_nad_names(ctx: Context) -> list[Problem]:
    """Two SpiderMultusConfigs rendering one NetworkAttachmentDefinition: ``nad-name-conflict``.

    Configs with the same namespace/name are left to ``duplicate-object``.
    """
    out: list[Problem] = []
    for (ns, nad), docs in ctx.nads.items():
        first = docs[0]
        for d in docs[1:]:
            if d.name == first.name:
                continue
            anno = ("metadata", "annotations", vocab.ANNO_SMC_CR_NAME)
            path = anno if d.get(anno) else ("metadata", "name")
            line, col = first.mark(("metadata", "name"))
            out.append(
                d.problem(
                    path,
                    rule="nad-name-conflict",
                    message=f"NetworkAttachmentDefinition {ns}/{nad} is also rendered from "
                    f"{first.ref()} ({first.path}:{line}:{col})",
                    hint=f"set another {vocab.ANNO_SMC_CR_NAME} annotation",
                )
            )
    return out
