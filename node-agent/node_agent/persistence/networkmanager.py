"""NetworkManager backend: OVS keyfiles in ``/etc/NetworkManager/system-connections``.

Follows shared/reference/persistence.md: five profiles linked by UUID (one more ethernet per
extra uplink when bonded):

- ovs-bridge ``<br>`` (``<br>-br``): never does IP configuration; ``datapath-type`` when netdev;
- ovs-port ``<br>-port`` (master = the bridge);
- ovs-interface ``<br>`` (``<br>-if``), type internal, master = that port: carries the IP
  configuration (addresses, gateway, routes), the cloned MAC and the MTU;
- ovs-port ``ovs-port-<uplink>`` (or ``<br>-bond`` with ``bond-mode`` for 2+ uplinks);
- ethernet ``<uplink>`` with ``slave-type=ovs-port``, master = that port.

Links use ``master=``/``slave-type=`` (read by every NM). UUIDs are uuid5 of a fixed namespace
and ``<bridge>/<profile>``, so rendering is deterministic. Plus
``/etc/NetworkManager/conf.d/90-underlay-unmanaged-veth.conf`` with
``[keyfile] unmanaged-devices+=interface-name:veth*`` so NM leaves pod veths alone (kept while
any underlay keyfile remains). Every file mode 0600. Validated with
``nmcli --offline connection modify`` in the tests.

Every profile carries ``autoconnect-priority=100`` (setting ``connection.autoconnect-priority``,
range -999..999, default 0; nm-settings-nmcli(5): "If the connection is set to autoconnect,
connections with higher priority will be preferred ... In case of equal priority, the profile
used most recently is chosen"). A node usually has a profile of its own for the uplink (e.g.
"Wired connection 1" with ``interface-name=eth0``); without the priority NM would activate the
one used most recently after a reboot, i.e. that one, and the uplink would never join the
bridge. :meth:`NetworkManagerBackend.inspect` lists those competing profiles (notes) and
refuses when one has a priority of 100 or more (NM could still pick it).
"""

from __future__ import annotations

import configparser
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from node_agent.links import Route
from node_agent.ovs import DATAPATH_NETDEV, bond_port_name
from node_agent.persistence import (
    FILE_MODE,
    Backend,
    Files,
    Findings,
    NodeNetConfig,
    node_path,
    remove_file,
)

if TYPE_CHECKING:
    from node_agent.bridges import DesiredBridge

KEYFILE_DIR = "/etc/NetworkManager/system-connections"
KEYFILE_DIRS = (
    "/etc/NetworkManager/system-connections",
    "/run/NetworkManager/system-connections",
    "/usr/lib/NetworkManager/system-connections",
)
"""Where NetworkManager's keyfile plugin reads profiles (NetworkManager.conf(5), keyfile)."""
AUTOCONNECT_PRIORITY = 100
"""``connection.autoconnect-priority`` of every profile the agent writes (NM default: 0)."""
_ETHERNET_TYPES = ("ethernet", "802-3-ethernet")
_IGNORED_SUFFIXES = ("~", ".bak", ".orig", ".rej", ".swp", ".tmp")
CONF_D_FILE = "/etc/NetworkManager/conf.d/90-underlay-unmanaged-veth.conf"
CONF_D_CONTENT = (
    "# Written by the underlay node agent: NetworkManager must not manage pod veths.\n"
    "[keyfile]\nunmanaged-devices+=interface-name:veth*\n"
)
FILE_PREFIX = "underlay-"
_FIXED_SUFFIXES = tuple(f"{p}.nmconnection" for p in ("br", "port", "if", "uplink-port"))
UUID_NAMESPACE = uuid.UUID("5d3c2b9e-6f0a-4c1e-9a57-0c6b1f2e8d41")
"""Namespace of the uuid5 connection UUIDs (fixed forever: changing it renames profiles)."""


def profile_uuid(bridge: str, profile: str) -> str:
    """Deterministic connection UUID of ``profile`` of ``bridge`` (uuid5)."""
    return str(uuid.uuid5(UUID_NAMESPACE, f"{bridge}/{profile}"))


def keyfile_path(bridge: str, profile: str) -> str:
    """Node path of one keyfile: ``.../underlay-<bridge>-<profile>.nmconnection``."""
    return f"{KEYFILE_DIR}/{FILE_PREFIX}{bridge}-{profile}.nmconnection"


def _ini(sections: list[tuple[str, list[tuple[str, str]]]]) -> str:
    out = [
        "# Written by the underlay node agent. Do not edit: the agent rewrites it "
        "(edits are reported as drift).\n"
    ]
    for name, items in sections:
        out.append(f"[{name}]\n")
        out.extend(f"{k}={v}\n" for k, v in items)
        out.append("\n")
    return "".join(out)


def _connection(
    bridge: str,
    profile: str,
    cid: str,
    ctype: str,
    ifname: str,
    master: str | None = None,
    slave_type: str | None = None,
) -> list[tuple[str, str]]:
    items = [
        ("id", cid),
        ("uuid", profile_uuid(bridge, profile)),
        ("type", ctype),
        ("interface-name", ifname),
        ("autoconnect", "true"),
        ("autoconnect-priority", str(AUTOCONNECT_PRIORITY)),
    ]
    if master is not None and slave_type is not None:
        items += [("master", master), ("slave-type", slave_type)]
    return items


def _ip_sections(
    desired: DesiredBridge, state: NodeNetConfig
) -> list[tuple[str, list[tuple[str, str]]]]:
    out = []
    for family, key, default_dst in (
        (socket.AF_INET, "ipv4", "0.0.0.0/0"),
        (socket.AF_INET6, "ipv6", "::/0"),
    ):
        addrs = [a for a in state.addresses if a.family == family] if desired.move_addresses else []
        routes: list[Route] = [r for r in state.routes if r.family == family] if addrs else []
        if not addrs:
            out.append((key, [("method", "disabled" if family == socket.AF_INET else "ignore")]))
            continue
        items = [("method", "manual")]
        items += [(f"address{i}", a.cidr) for i, a in enumerate(addrs, 1)]
        n = 0
        for r in routes:
            if (
                r.is_default
                and r.gateway
                and r.metric is None
                and not any(k == "gateway" for k, _ in items)
            ):
                items.append(("gateway", r.gateway))
                continue
            n += 1
            dst = default_dst if r.is_default else r.dst
            value = dst + (f",{r.gateway}" if r.gateway else "")
            if r.metric is not None:
                value += ("," if r.gateway else ",,") + str(r.metric)
            items.append((f"route{n}", value))
        out.append((key, items))
    return out


@dataclass(frozen=True)
class CompetingProfile:
    """A NetworkManager profile not written by the agent that would autoconnect on an uplink.

    ``path``: node path of its keyfile; ``id``: connection.id; ``uplink``; ``binds_by``:
    ``interface-name``, ``mac-address`` or ``any device`` (neither set); ``priority``:
    its connection.autoconnect-priority (default 0).
    """

    path: str
    id: str
    uplink: str
    binds_by: str
    priority: int

    def __str__(self) -> str:
        return f"profile {self.id!r} ({self.path}, {self.binds_by}, autoconnect-priority {self.priority})"


def _read_keyfile(path: Path) -> configparser.ConfigParser | None:
    cp = configparser.ConfigParser(
        interpolation=None, strict=False, delimiters=("=",), comment_prefixes=("#",)
    )
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # GKeyFile keys are case-sensitive
    try:
        cp.read_string(path.read_text())
    except (OSError, UnicodeDecodeError, configparser.Error):
        return None
    return cp


def competing_profiles(
    root: Path | str, desired: DesiredBridge, uplink_macs: Mapping[str, str]
) -> list[CompetingProfile]:
    """Ethernet profiles under :data:`KEYFILE_DIRS` (below ``root``; not the agent's own) that
    autoconnect (``autoconnect`` not false) and bind to an uplink: ``interface-name`` is the
    uplink, ``[ethernet] mac-address`` is its MAC (``uplink_macs``, case-insensitive), or
    neither is set (any ethernet device). Unreadable keyfiles are skipped (NM skips them too)."""
    out: list[CompetingProfile] = []
    ours = f"{FILE_PREFIX}{desired.name}-"
    for directory in KEYFILE_DIRS:
        kdir = node_path(root, directory)
        if not kdir.is_dir():
            continue
        for p in sorted(kdir.iterdir()):
            if (
                not p.is_file()
                or p.name.startswith((".", ours))
                or p.name.endswith(_IGNORED_SUFFIXES)
            ):
                continue
            cp = _read_keyfile(p)
            if cp is None or not cp.has_section("connection"):
                continue
            conn = cp["connection"]
            if conn.get("type") not in _ETHERNET_TYPES:
                continue
            if conn.get("autoconnect", "true").strip().lower() in ("false", "0", "no"):
                continue
            ifname = conn.get("interface-name", "").strip()
            mac = cp.get("ethernet", "mac-address", fallback="").strip().lower()
            try:
                priority = int(conn.get("autoconnect-priority", "0"))
            except ValueError:
                priority = 0
            for uplink in desired.uplinks:
                if ifname:
                    binds = "interface-name" if ifname == uplink else None
                elif mac:
                    binds = "mac-address" if mac == uplink_macs.get(uplink, "").lower() else None
                else:
                    binds = "any device"
                if binds:
                    out.append(
                        CompetingProfile(
                            f"{directory}/{p.name}",
                            conn.get("id", p.name),
                            uplink,
                            binds,
                            priority,
                        )
                    )
    return out


class NetworkManagerBackend(Backend):
    """Writes the OVS keyfiles of one bridge and the shared conf.d file."""

    name: ClassVar[str] = "networkmanager"

    def profiles(self, desired: DesiredBridge) -> list[str]:
        """Profile keys of ``desired``: br, port, if, uplink-port, eth-<uplink>..."""
        return ["br", "port", "if", "uplink-port", *(f"eth-{u}" for u in desired.uplinks)]

    def render(self, desired: DesiredBridge, node_state: NodeNetConfig) -> Files:
        """The keyfiles of ``desired`` plus the conf.d file (module docstring)."""
        br = desired.name
        bonded = len(desired.uplinks) > 1
        uplink_port = bond_port_name(br) if bonded else f"ovs-port-{desired.uplinks[0]}"
        files: Files = {}

        bridge_sec = [("connection", _connection(br, "br", f"{br}-br", "ovs-bridge", br))]
        if desired.datapath_type == DATAPATH_NETDEV:
            bridge_sec.append(("ovs-bridge", [("datapath-type", DATAPATH_NETDEV)]))
        else:
            bridge_sec.append(("ovs-bridge", []))
        files[keyfile_path(br, "br")] = (_ini(bridge_sec), FILE_MODE)

        port_sec = [
            (
                "connection",
                _connection(
                    br, "port", f"{br}-port", "ovs-port", br, profile_uuid(br, "br"), "ovs-bridge"
                ),
            ),
            ("ovs-port", []),
        ]
        files[keyfile_path(br, "port")] = (_ini(port_sec), FILE_MODE)

        eth_items = []
        if node_state.mac:
            eth_items.append(("cloned-mac-address", node_state.mac.upper()))
        if desired.mtu is not None:
            eth_items.append(("mtu", str(desired.mtu)))
        if_sec = [
            (
                "connection",
                _connection(
                    br, "if", f"{br}-if", "ovs-interface", br, profile_uuid(br, "port"), "ovs-port"
                ),
            ),
            ("ovs-interface", [("type", "internal")]),
            ("ethernet", eth_items),
            *_ip_sections(desired, node_state),
        ]
        files[keyfile_path(br, "if")] = (_ini(if_sec), FILE_MODE)

        up_items = [("bond-mode", desired.bond_mode)] if bonded else []
        up_sec = [
            (
                "connection",
                _connection(
                    br,
                    "uplink-port",
                    uplink_port,
                    "ovs-port",
                    uplink_port,
                    profile_uuid(br, "br"),
                    "ovs-bridge",
                ),
            ),
            ("ovs-port", up_items),
        ]
        files[keyfile_path(br, "uplink-port")] = (_ini(up_sec), FILE_MODE)

        for uplink in desired.uplinks:
            eth = [("mtu", str(desired.mtu))] if desired.mtu is not None else []
            sec = [
                (
                    "connection",
                    _connection(
                        br,
                        f"eth-{uplink}",
                        uplink,
                        "ethernet",
                        uplink,
                        profile_uuid(br, "uplink-port"),
                        "ovs-port",
                    ),
                ),
                ("ethernet", eth),
            ]
            files[keyfile_path(br, f"eth-{uplink}")] = (_ini(sec), FILE_MODE)
        files[CONF_D_FILE] = (CONF_D_CONTENT, FILE_MODE)
        return files

    def owned_paths(self, root: Path | str, desired: DesiredBridge) -> list[str]:
        """This bridge's keyfiles (any uplink, from a listing of the keyfile directory), and the
        conf.d file when no other underlay keyfile would remain."""
        prefix = f"{FILE_PREFIX}{desired.name}-"
        kdir = node_path(root, KEYFILE_DIR)
        listed = (
            sorted(p.name for p in kdir.glob(f"{FILE_PREFIX}*.nmconnection"))
            if kdir.is_dir()
            else []
        )
        mine = [
            f"{KEYFILE_DIR}/{n}"
            for n in listed
            if n.startswith(prefix)
            and (n[len(prefix) :] in _FIXED_SUFFIXES or n[len(prefix) :].startswith("eth-"))
        ]
        others = [n for n in listed if f"{KEYFILE_DIR}/{n}" not in mine]
        return mine + ([] if others else [CONF_D_FILE])

    def remove(self, root: Path | str, desired: DesiredBridge) -> list[str]:
        return [p for p in self.owned_paths(root, desired) if remove_file(root, p)]

    def inspect(
        self, root: Path | str, desired: DesiredBridge, uplink_macs: Mapping[str, str]
    ) -> Findings:
        """Competing profiles (:func:`competing_profiles`): a note for each one the agent's
        profiles outrank (priority below :data:`AUTOCONNECT_PRIORITY`), a refusal for each
        one with an equal or higher priority (NM could activate it instead after a reboot).
        Reads only."""
        notes: list[str] = []
        refusals: list[str] = []
        for c in competing_profiles(root, desired, uplink_macs):
            if c.priority < AUTOCONNECT_PRIORITY:
                notes.append(
                    f"NetworkManager {c} also autoconnects on uplink {c.uplink}; the agent's "
                    f"profiles have autoconnect-priority {AUTOCONNECT_PRIORITY}, so NM "
                    f"activates them after a reboot"
                )
            else:
                refusals.append(
                    f"NetworkManager {c} autoconnects on uplink {c.uplink} with a priority not "
                    f"below the agent's {AUTOCONNECT_PRIORITY}: after a reboot NM could activate "
                    f"it and {c.uplink} would not join {desired.name}; lower its "
                    f"autoconnect-priority or set autoconnect=false in {c.path}, or use "
                    f"persistence: none"
                )
        return Findings(tuple(refusals), tuple(notes))
