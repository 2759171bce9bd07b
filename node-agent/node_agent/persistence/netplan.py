"""netplan backend: one YAML file per bridge in ``/etc/netplan`` (netplan >= 0.100).

The file follows shared/reference/persistence.md exactly: ``renderer: networkd`` (with the
NetworkManager renderer netplan would emit a Linux-bridge slave), the uplink(s) under
``ethernets`` with DHCP off, the bridge under ``bridges`` with ``interfaces``, ``addresses``,
``routes`` (``to: default, via: ...``), ``macaddress``, ``mtu`` and ``openvswitch: {}``. With
moveAddresses false the addresses and routes the agent keeps (``node_state``: only when the
bridge had carried the node's addresses before, see bridges.carried_config) go under the first
uplink in ``ethernets`` instead; netplan accepts addresses on an OVS bridge member. Two
or more uplinks become an OVS bond under ``bonds`` (``parameters.mode`` = bondMode). File mode
0600, as netplan requires. Validated by ``netplan generate --root-dir`` in the tests.

netplan cannot express ``datapath_type``; on nodes without the kernel datapath the agent's
replay at start sets ``netdev`` (the file still brings up the addresses on the bridge).

Other netplan files (:meth:`NetplanBackend.inspect`): netplan merges every ``*.yaml`` of
``/lib/netplan``, ``/etc/netplan`` and ``/run/netplan`` in file-name order (one file per name:
``/run`` shadows ``/etc``, either shadows ``/lib``; netplan(5), "General structure"). A later
file overrides scalars of a definition with the same ID, but lists (``addresses``, ``routes``,
``routing-policy``, ``nameservers``) are appended and ``gateway4``/``gateway6`` of an earlier file
stay. So when the node's own netplan configuration (e.g. cloud-init's 50-cloud-init.yaml) gives
the uplink addresses or routes, our file cannot take them off it: ``netplan generate`` reports a
conflicting default route and the uplink keeps ``Address=`` next to ``Bridge=``; after a reboot
the node is cut off. The agent refuses such a change (moveAddresses true) and names the file.
``dhcp4: true`` in an earlier file is fine (our later ``dhcp4: false`` overrides it).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

from node_agent.links import Route
from node_agent.ovs import bond_port_name
from node_agent.persistence import FILE_MODE, Backend, Files, Findings, NodeNetConfig, node_path

if TYPE_CHECKING:
    from node_agent.bridges import DesiredBridge

NETPLAN_DIR = "/etc/netplan"
NETPLAN_DIRS = ("/lib/netplan", "/etc/netplan", "/run/netplan")
"""Directories netplan reads, lowest precedence first: a file in /run/netplan shadows one of the
same name in /etc/netplan, and either shadows /lib/netplan (netplan(5), "General structure")."""
DEVICE_SECTIONS = (
    "ethernets",
    "bonds",
    "bridges",
    "vlans",
    "tunnels",
    "wifis",
    "modems",
    "vrfs",
    "dummy-devices",
    "virtual-ethernets",
    "nm-devices",
)
"""netplan device types (top-level keys under ``network:`` holding definitions by ID)."""
APPENDED_KEYS = ("addresses", "routes", "routing-policy", "gateway4", "gateway6", "nameservers")
"""Keys of another file's definition of the uplink that our file cannot override: lists are
appended by netplan's merge, gateway4/gateway6 are not set by our file so they stay."""
DHCP_KEYS = ("dhcp4", "dhcp6")
_GLOB = frozenset("*?[")


def netplan_path(bridge: str) -> str:
    """Node path of the netplan file for ``bridge``."""
    return f"{NETPLAN_DIR}/60-underlay-{bridge}.yaml"


def _route(route: Route) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if route.is_default:
        out["to"] = "default"
    else:
        out["to"] = route.dst
    if route.gateway:
        out["via"] = route.gateway
    if route.metric is not None:
        out["metric"] = route.metric
    if route.scope == 253:
        out["scope"] = "link"
    if route.prefsrc:
        out["from"] = route.prefsrc
    return out


class _Flow(list[Any]):
    """A list dumped in flow style ([a, b])."""


class _FlowDict(dict[str, Any]):
    """A mapping dumped in flow style ({a: b})."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _Flow, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
)
_Dumper.add_representer(
    _FlowDict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True)
)


def netplan_files(root: Path | str) -> list[str]:
    """Node paths of the netplan files under ``root`` in the order netplan merges them: every
    ``*.yaml`` (not hidden) of :data:`NETPLAN_DIRS` sorted by file name, and for one name only
    the file of the directory with the highest precedence (/run over /etc over /lib)."""
    chosen: dict[str, str] = {}
    for d in NETPLAN_DIRS:
        directory = node_path(root, d)
        if not directory.is_dir():
            continue
        for p in directory.iterdir():
            if p.name.endswith(".yaml") and not p.name.startswith(".") and p.is_file():
                chosen[p.name] = f"{d}/{p.name}"
    return [chosen[name] for name in sorted(chosen)]


@dataclass(frozen=True)
class UplinkDefinition:
    """A definition in another netplan file that configures an uplink.

    ``path``: node path of the file; ``section``/``device_id``: where (``ethernets``, ``eth0``);
    ``uplink``: the interface it configures; ``how``: ``id`` (same ID as in our file, so netplan
    merges the two), ``set-name`` or ``match`` (a separate definition naming it);
    ``conf``: the definition's mapping.
    """

    path: str
    section: str
    device_id: str
    uplink: str
    how: str
    conf: Mapping[str, Any]

    @property
    def where(self) -> str:
        """``ethernets.eth0``, or ``ethernets.nic (match: name eth0)`` for a separate one."""
        if self.how == "id":
            return f"{self.section}.{self.device_id}"
        return f"{self.section}.{self.device_id} ({self.how}: {self.uplink})"

    def appended_keys(self) -> list[str]:
        """The :data:`APPENDED_KEYS` this definition sets (non-empty values only)."""
        keys = []
        for key in APPENDED_KEYS:
            value = self.conf.get(key)
            if key == "nameservers":
                if isinstance(value, Mapping) and (value.get("addresses") or value.get("search")):
                    keys.append(key)
            elif value not in (None, "", [], {}):
                keys.append(key)
        return keys

    def dhcp_keys(self) -> list[str]:
        """``dhcp4``/``dhcp6`` set to true here."""
        return [k for k in DHCP_KEYS if self.conf.get(k) is True]


def _names_uplink(device_id: str, conf: Mapping[str, Any], uplink: str) -> str | None:
    if device_id == uplink:
        return "id"
    if conf.get("set-name") == uplink:
        return "set-name"
    match = conf.get("match")
    name = match.get("name") if isinstance(match, Mapping) else None
    if isinstance(name, str) and name == uplink and not _GLOB & set(name):
        return "match: name"
    return None


def load_netplan(root: Path | str, path: str) -> Mapping[str, Any]:
    """The ``network:`` mapping of netplan file ``path`` under ``root`` ({} when the file is
    empty or has no mapping there). Raises ValueError naming the file (and line) when it
    cannot be read or is not YAML."""
    p = node_path(root, path)
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read netplan file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"netplan file {path} is not valid YAML: {exc}") from exc
    net = doc.get("network") if isinstance(doc, Mapping) else None
    return net if isinstance(net, Mapping) else {}


def uplink_definitions(
    root: Path | str, uplinks: tuple[str, ...], exclude: str
) -> tuple[list[UplinkDefinition], list[str]]:
    """Definitions of ``uplinks`` in the netplan files under ``root`` (all but the one named
    like ``exclude``, our own file), and the errors of files that cannot be read (sentences
    naming the file). A definition configures an uplink when its ID is the uplink's name
    (under any device type), its ``set-name`` is, or its ``match: {name: ...}`` is exactly
    that name (globs are not followed)."""
    found: list[UplinkDefinition] = []
    errors: list[str] = []
    for path in netplan_files(root):
        if path.rsplit("/", 1)[1] == exclude.rsplit("/", 1)[1]:
            continue
        try:
            net = load_netplan(root, path)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        for section in DEVICE_SECTIONS:
            defs = net.get(section)
            if not isinstance(defs, Mapping):
                continue
            for device_id, conf in defs.items():
                conf = conf if isinstance(conf, Mapping) else {}
                for uplink in uplinks:
                    how = _names_uplink(str(device_id), conf, uplink)
                    if how is not None:
                        found.append(
                            UplinkDefinition(path, section, str(device_id), uplink, how, conf)
                        )
    return found, errors


_OWN_FILE = re.compile(re.escape(NETPLAN_DIR) + r"/60-underlay-(.+)\.yaml")
"""Node paths of the agent's own netplan files (:func:`netplan_path`); group 1: the bridge."""


def _member_of(root: Path | str, uplinks: tuple[str, ...], exclude: str) -> list[str]:
    """Sentences for bonds/bridges of other files that list an uplink in ``interfaces``."""
    out = []
    for path in netplan_files(root):
        if path.rsplit("/", 1)[1] == exclude.rsplit("/", 1)[1] or _OWN_FILE.fullmatch(path):
            continue  # ours, or the agent's own file of another bridge (reported by inspect)
        try:
            net = load_netplan(root, path)
        except ValueError:
            continue  # reported by uplink_definitions
        for section in ("bonds", "bridges"):
            defs = net.get(section)
            for device_id, conf in defs.items() if isinstance(defs, Mapping) else ():
                members = conf.get("interfaces") if isinstance(conf, Mapping) else None
                for uplink in uplinks:
                    if isinstance(members, list) and uplink in members:
                        out.append(
                            f"netplan file {path} makes uplink {uplink} a member of "
                            f"{section}.{device_id}; netplan allows one bond or bridge per "
                            f"interface: take {uplink} out of {path}, or use persistence: none"
                        )
    return out


def _ip_config(node_state: NodeNetConfig) -> dict[str, Any]:
    """``addresses`` (IPv4 first) and ``routes`` of one definition (absent when empty)."""
    out: dict[str, Any] = {}
    v4 = [a.cidr for a in node_state.addresses if a.family == socket.AF_INET]
    v6 = [a.cidr for a in node_state.addresses if a.family == socket.AF_INET6]
    if v4 or v6:
        out["addresses"] = _Flow(v4 + v6)
    if node_state.routes:
        out["routes"] = _Flow(_FlowDict(_route(r)) for r in node_state.routes)
    return out


class NetplanBackend(Backend):
    """Writes ``/etc/netplan/60-underlay-<bridge>.yaml``."""

    name: ClassVar[str] = "netplan"

    def render(self, desired: DesiredBridge, node_state: NodeNetConfig) -> Files:
        """One netplan document for ``desired`` (see the module docstring for its shape)."""
        ethernets: dict[str, Any] = {}
        for uplink in desired.uplinks:
            eth = _FlowDict(dhcp4=False, dhcp6=False)
            if desired.mtu is not None:
                eth["mtu"] = desired.mtu
            ethernets[uplink] = eth
        kept = _ip_config(node_state) if not desired.move_addresses else {}
        if kept:  # what the agent keeps for the first uplink (block style: it is long)
            ethernets[desired.uplinks[0]] = {**ethernets[desired.uplinks[0]], **kept}
        bridge: dict[str, Any] = {}
        if len(desired.uplinks) == 1:
            bridge["interfaces"] = _Flow(desired.uplinks)
        else:
            bridge["interfaces"] = _Flow([bond_port_name(desired.name)])
        if node_state.mac:
            bridge["macaddress"] = node_state.mac
        if desired.mtu is not None:
            bridge["mtu"] = desired.mtu
        if desired.move_addresses:
            bridge.update(_ip_config(node_state))
        bridge["openvswitch"] = _FlowDict()
        network: dict[str, Any] = {"version": 2, "renderer": "networkd", "ethernets": ethernets}
        if len(desired.uplinks) > 1:
            network["bonds"] = {
                bond_port_name(desired.name): {
                    "interfaces": _Flow(desired.uplinks),
                    "parameters": _FlowDict(mode=desired.bond_mode),
                    "openvswitch": _FlowDict(),
                }
            }
        network["bridges"] = {desired.name: bridge}
        header = (
            f"# Written by the underlay node agent for OvsBridge {desired.object_name}.\n"
            "# Do not edit: the agent rewrites it (edits are reported as drift).\n"
        )
        body = yaml.dump(
            {"network": network}, Dumper=_Dumper, sort_keys=False, default_flow_style=False
        )
        return {netplan_path(desired.name): (header + body, FILE_MODE)}

    def owned_paths(self, root: Path | str, desired: DesiredBridge) -> list[str]:
        return [netplan_path(desired.name)]

    def inspect(
        self, root: Path | str, desired: DesiredBridge, uplink_macs: Mapping[str, str]
    ) -> Findings:
        """Refusals for the node's other netplan files (module docstring), each naming the
        file, the uplink, the keys and what to do:

        - a definition of an uplink (same ID under ``ethernets``, or under ``bonds``/``vlans``
          etc. when the uplink is such a device, or a separate one naming it by ``set-name`` or
          an exact ``match: name``) that sets addresses, routes, routing-policy, gateway4,
          gateway6 or nameservers (only when moveAddresses is true: then our file puts them
          on the bridge);
        - ``dhcp4``/``dhcp6: true`` in a file read after ours or in a separate definition
          (our ``dhcp4: false`` does not override those);
        - the uplink defined under another device type than ``ethernets`` (netplan refuses a
          definition that changes device type), or listed in another bond's/bridge's
          ``interfaces``;
        - a file with our file's name in /run/netplan (it shadows ours);
        - a netplan file that cannot be parsed (the agent cannot tell what it configures).

        Reads only; ``uplink_macs`` is not used (netplan's ``match: macaddress`` alone does
        not name an interface our file refers to by name).
        """
        ours = netplan_path(desired.name)
        ours_name = ours.rsplit("/", 1)[1]
        refusals: list[str] = []
        if node_path(root, f"/run/netplan/{ours_name}").is_file():
            refusals.append(
                f"netplan file /run/netplan/{ours_name} shadows the agent's {ours} (netplan "
                f"reads /run/netplan over /etc/netplan): remove it, or use persistence: none"
            )
        defs, errors = uplink_definitions(root, desired.uplinks, ours)
        refusals += [
            f"{e}; the agent cannot tell whether it configures "
            f"{'/'.join(desired.uplinks)}: fix the file, or use persistence: none"
            for e in errors
        ]
        bond = bond_port_name(desired.name) if len(desired.uplinks) > 1 else None
        for d in defs:
            other = _OWN_FILE.fullmatch(d.path)
            if other is not None:  # the agent's own file of another bridge: never to be edited
                refusals.append(
                    f"uplink {d.uplink} is carried by the agent's bridge {other.group(1)} "
                    f"({d.path}, written by the agent: do not edit it); remove {d.uplink} from "
                    f"the OvsBridge that makes bridge {other.group(1)}, or delete that OvsBridge"
                )
                continue
            if d.how == "id" and d.section != "ethernets":
                refusals.append(
                    f"netplan file {d.path} defines uplink {d.uplink} under {d.section} "
                    f"({d.where}), the agent's {ours} under ethernets (netplan refuses a "
                    f"definition that changes device type): use persistence: none for "
                    f"this uplink"
                )
            if not desired.move_addresses:
                continue
            keys = d.appended_keys()
            if keys:
                refusals.append(
                    f"netplan file {d.path} sets {', '.join(keys)} for uplink {d.uplink} "
                    f"({d.where}), which the agent's {ours} cannot override (netplan appends "
                    f"lists and keeps gateway4/gateway6): after a reboot {d.uplink} would keep "
                    f"them as a port of {desired.name} (conflicting default route); move "
                    f"{d.uplink}'s addresses/routes out of {d.path} (the agent puts them on "
                    f"{bond or desired.name}), or use persistence: none"
                )
            dhcp = d.dhcp_keys()
            later = d.path.rsplit("/", 1)[1] > ours_name
            if dhcp and (later or d.how != "id"):
                why = (
                    f"is read after the agent's {ours}"
                    if d.how == "id"
                    else f"is a separate definition of {d.uplink}, not merged with the agent's {ours}"
                )
                refusals.append(
                    f"netplan file {d.path} sets {', '.join(f'{k}: true' for k in dhcp)} for "
                    f"uplink {d.uplink} ({d.where}) and {why}, so its {'/'.join(dhcp)}: false "
                    f"does not apply: after a reboot {d.uplink} would ask DHCP for an address "
                    f"as a port of {desired.name}; remove {'/'.join(dhcp)} for {d.uplink} from "
                    f"{d.path}, or use persistence: none"
                )
        refusals += _member_of(root, desired.uplinks, ours)
        return Findings(tuple(refusals))
