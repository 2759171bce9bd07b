"""netplan backend: one YAML file per bridge in ``/etc/netplan`` (netplan >= 0.100).

The file follows shared/reference/persistence.md exactly: ``renderer: networkd`` (with the
NetworkManager renderer netplan would emit a Linux-bridge slave), the uplink(s) under
``ethernets`` with DHCP off, the bridge under ``bridges`` with ``interfaces``, ``addresses``,
``routes`` (``to: default, via: ...``), ``macaddress``, ``mtu`` and ``openvswitch: {}``. Two
or more uplinks become an OVS bond under ``bonds`` (``parameters.mode`` = bondMode). File mode
0600, as netplan requires. Validated by ``netplan generate --root-dir`` in the tests.

netplan cannot express ``datapath_type``; on nodes without the kernel datapath the agent's
replay at start sets ``netdev`` (the file still brings up the addresses on the bridge).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

from node_agent.links import Route
from node_agent.ovs import bond_port_name
from node_agent.persistence import FILE_MODE, Backend, Files, NodeNetConfig

if TYPE_CHECKING:
    from node_agent.bridges import DesiredBridge

NETPLAN_DIR = "/etc/netplan"


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
            v4 = [a.cidr for a in node_state.addresses if a.family == socket.AF_INET]
            v6 = [a.cidr for a in node_state.addresses if a.family == socket.AF_INET6]
            if v4 or v6:
                bridge["addresses"] = _Flow(v4 + v6)
            if node_state.routes:
                bridge["routes"] = _Flow(_FlowDict(_route(r)) for r in node_state.routes)
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
