"""OVS bridges of the node agent, through ovsdbapp only (no ``ovs-vsctl`` in product code).

What this module does to the node's Open_vSwitch database (OVSDB, RFC 7047; schema
``vswitch.ovsschema`` of Open vSwitch 3.x):

- detects which datapath the node can use (:func:`detect_datapath`),
- reads a bridge, its ports and interfaces into plain frozen data (:func:`read_bridge`),
- makes one bridge match a :class:`BridgeSpec` in ONE OVSDB transaction (:func:`ensure_bridge`):
  Bridge row (``datapath_type``, ``external_ids``, ``other_config:hwaddr``), its internal
  port/interface, the uplink port (a bond port for two or more uplinks) and ``mtu_request``,
- puts a bridge back exactly as a snapshot had it (:func:`restore_bridge`), for rollback,
- lists pod ports (:func:`pod_ports`), deletes a port or a bridge (never a bridge with pod ports:
  :class:`PodPortsRemain`; a first-time bridge rolled back keeps its pod ports).

Ownership: rows we create carry ``external_ids`` :data:`OWNER_KEY` = :data:`OWNER_AGENT` and
:data:`BRIDGE_KEY` = ``<bridge>``; uplink ports also carry :data:`ROLE_KEY` = :data:`ROLE_UPLINK`.
Pod ports are recognised by the keys ovs-cni writes (k8snetworkplumbingwg/ovs-cni,
``pkg/ovsdb/ovsdb.go`` CreatePort): :data:`POD_NETNS_KEY`, :data:`POD_IFACE_KEY`,
:data:`POD_UID_KEY`, :data:`POD_OWNER_KEY`; the CNI plugin of this project sets the same keys
with owner :data:`POD_OWNER_VALUE`.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ovsdbapp.backend.ovs_idl import command as ovs_command

from reconciler.vocab import CNI_OVS_TYPE

LOG = logging.getLogger(__name__)

# --- external_ids keys ------------------------------------------------------------------

OWNER_KEY = "underlay.dev/owner"
"""external_ids key on Bridge, Port and Interface rows the agent created."""
OWNER_AGENT = "agent"
BRIDGE_KEY = "underlay.dev/bridge"
"""external_ids key: name of the OvsBridge (bridge name) a row belongs to."""
ROLE_KEY = "underlay.dev/role"
"""external_ids key on ports the agent made: :data:`ROLE_UPLINK` or :data:`ROLE_INTERNAL`."""
ROLE_UPLINK = "uplink"
ROLE_INTERNAL = "internal"

POD_NETNS_KEY = "contNetns"
"""Port external_ids key (ovs-cni): path of the container network namespace (CNI_NETNS)."""
POD_IFACE_KEY = "contIface"
"""Port external_ids key (ovs-cni): interface name inside the container (CNI_IFNAME)."""
POD_UID_KEY = "contPodUid"
"""Port external_ids key (ovs-cni): Kubernetes pod UID (K8S_POD_UID from CNI_ARGS)."""
POD_OWNER_KEY = "owner"
"""Port external_ids key (ovs-cni): which plugin made the port (ovs-cni writes ``ovs-cni``)."""
POD_OWNER_VALUE = CNI_OVS_TYPE
"""Value of :data:`POD_OWNER_KEY` on ports made by this project's CNI plugin."""

DATAPATH_SYSTEM = "system"
DATAPATH_NETDEV = "netdev"
OVS_DATAPATH_GENL_FAMILY = "ovs_datapath"
"""Generic netlink family the openvswitch kernel module registers (linux/openvswitch.h)."""


class OvsError(RuntimeError):
    """An OVSDB operation failed; the message names the bridge/port and the OVSDB error."""


class DatapathUnavailable(OvsError):
    """``datapathType: system`` was asked for but the kernel datapath is not usable here."""


# --- plain data -------------------------------------------------------------------------


@dataclass(frozen=True)
class InterfaceState:
    """One OVS Interface row: ``name``, ``type`` ('' = system), ``mtu_request`` (bytes or None),
    ``external_ids``, ``options``, ``error`` (vswitchd's error text or None), ``mac_in_use``."""

    name: str
    type: str = ""
    mtu_request: int | None = None
    external_ids: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None
    mac_in_use: str | None = None


@dataclass(frozen=True)
class PortState:
    """One OVS Port row with its interfaces; ``bond_mode`` only matters for 2+ interfaces."""

    name: str
    interfaces: tuple[InterfaceState, ...] = ()
    bond_mode: str | None = None
    external_ids: Mapping[str, str] = field(default_factory=dict)
    tag: int | None = None
    trunks: tuple[int, ...] = ()

    @property
    def is_pod(self) -> bool:
        """True for a pod port (ovs-cni external_ids ``contNetns``/``contIface`` present)."""
        return POD_NETNS_KEY in self.external_ids and POD_IFACE_KEY in self.external_ids

    @property
    def interface_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.interfaces)


@dataclass(frozen=True)
class BridgeState:
    """One OVS Bridge row: ``datapath_type`` ('' means OVS's default, system), ``external_ids``,
    ``other_config`` and its ports (sorted by name)."""

    name: str
    datapath_type: str = ""
    external_ids: Mapping[str, str] = field(default_factory=dict)
    other_config: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[PortState, ...] = ()

    def port(self, name: str) -> PortState | None:
        """The port called ``name``, or None."""
        return next((p for p in self.ports if p.name == name), None)

    @property
    def owned(self) -> bool:
        """True when the agent created this bridge (external_ids owner=agent)."""
        return self.external_ids.get(OWNER_KEY) == OWNER_AGENT


@dataclass(frozen=True)
class BridgeSpec:
    """What one bridge must look like in OVSDB.

    ``uplinks``: NIC names; one uplink becomes a port of the same name, two or more one bond
    port :func:`bond_port_name` with ``bond_mode``. ``mtu``: ``mtu_request`` (bytes) of the
    internal interface and the uplinks, None leaves MTU alone. ``hwaddr``: MAC for the bridge's
    internal interface (``other_config:hwaddr``), None leaves OVS's choice.
    """

    name: str
    datapath_type: str
    uplinks: tuple[str, ...]
    bond_mode: str = "active-backup"
    mtu: int | None = None
    hwaddr: str | None = None

    @property
    def uplink_port(self) -> str:
        """Name of the port that holds the uplink(s)."""
        return self.uplinks[0] if len(self.uplinks) == 1 else bond_port_name(self.name)


def bond_port_name(bridge: str) -> str:
    """Name of the bond port of ``bridge`` (OVS port names of bonds are not Linux netdevs)."""
    return f"{bridge}-bond"


# --- datapath detection -------------------------------------------------------------------


def kernel_datapath_present() -> bool:
    """True when the ``ovs_datapath`` generic netlink family exists (openvswitch.ko loaded).

    Asks the kernel's generic netlink controller (CTRL_CMD_GETFAMILY) through pyroute2;
    ENOENT means the family is not registered. Other netlink errors are raised as OvsError.
    """
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.generic import GenericNetlinkSocket

    sock = GenericNetlinkSocket()
    try:
        sock.discovery(OVS_DATAPATH_GENL_FAMILY)
    except NetlinkError as exc:
        if exc.code == errno.ENOENT:
            return False
        raise OvsError(
            f"generic netlink lookup of {OVS_DATAPATH_GENL_FAMILY} failed: {exc}"
        ) from exc
    finally:
        sock.close()
    return True


def datapath_types(api: Any) -> tuple[str, ...]:
    """``Open_vSwitch.datapath_types`` as vswitchd published it (empty before it started)."""

    def read(tables: Any) -> tuple[str, ...]:
        rows = list(tables["Open_vSwitch"].rows.values())
        return tuple(rows[0].datapath_types) if rows else ()

    return _read(api, read)


def detect_datapath(api: Any) -> str:
    """``system`` when the kernel datapath is usable, else ``netdev``.

    Usable = the ``ovs_datapath`` generic netlink family exists AND OVSDB
    ``Open_vSwitch.datapath_types`` lists ``system`` (vswitchd can drive it).
    """
    if DATAPATH_SYSTEM in datapath_types(api) and kernel_datapath_present():
        return DATAPATH_SYSTEM
    return DATAPATH_NETDEV


def kernel_datapath_missing(api: Any) -> str | None:
    """Why the kernel datapath is not usable here, which makes ``auto`` fall back to
    ``netdev`` (a clause for a sentence), or None when it is usable (see
    :func:`detect_datapath`)."""
    types = datapath_types(api)
    if DATAPATH_SYSTEM not in types:
        return f"ovs-vswitchd offers no kernel datapath (OVSDB datapath_types: {list(types)})"
    if not kernel_datapath_present():
        return (
            "the kernel openvswitch module is not loaded on this node (no "
            f"{OVS_DATAPATH_GENL_FAMILY} generic netlink family)"
        )
    return None


def resolve_datapath(api: Any, requested: str) -> str:
    """Map spec.datapathType (``auto``/``system``/``netdev``) to the datapath to use.

    Raises DatapathUnavailable for ``system`` on a node without a usable kernel datapath, and
    OvsError when ``netdev`` is not in ``datapath_types`` (vswitchd built without it).
    """
    if requested == "auto":
        return detect_datapath(api)
    if requested == DATAPATH_SYSTEM and detect_datapath(api) != DATAPATH_SYSTEM:
        raise DatapathUnavailable(
            "datapathType system requested but the kernel datapath is not usable here "
            f"(generic netlink family {OVS_DATAPATH_GENL_FAMILY} present: "
            f"{kernel_datapath_present()}; OVSDB datapath_types: {list(datapath_types(api))})"
        )
    types = datapath_types(api)
    if requested == DATAPATH_NETDEV and types and DATAPATH_NETDEV not in types:
        raise OvsError(f"datapathType netdev requested but OVSDB datapath_types is {list(types)}")
    return requested


# --- reading --------------------------------------------------------------------------------


class _ReadCommand(ovs_command.BaseCommand):
    """Run a read-only function over the IDL tables under the connection lock."""

    READ_ONLY = True

    def __init__(self, api: Any, fn: Callable[[Any], Any]) -> None:
        super().__init__(api)
        self.fn = fn

    def run_idl(self, txn: Any) -> None:
        self.result = self.fn(self.api.tables)


def _read(api: Any, fn: Callable[[Any], Any]) -> Any:
    return _ReadCommand(api, fn).execute(check_error=True, log_errors=False)


def _opt_int(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _opt_str(value: Any) -> str | None:
    if isinstance(value, list):
        return str(value[0]) if value else None
    return None if value is None else str(value)


def _iface_state(row: Any) -> InterfaceState:
    return InterfaceState(
        name=row.name,
        type=row.type,
        mtu_request=_opt_int(row.mtu_request),
        external_ids=dict(row.external_ids),
        options=dict(row.options),
        error=_opt_str(row.error),
        mac_in_use=_opt_str(row.mac_in_use),
    )


def _port_state(row: Any) -> PortState:
    return PortState(
        name=row.name,
        interfaces=tuple(sorted((_iface_state(i) for i in row.interfaces), key=lambda i: i.name)),
        bond_mode=_opt_str(row.bond_mode),
        external_ids=dict(row.external_ids),
        tag=_opt_int(row.tag),
        trunks=tuple(sorted(int(t) for t in row.trunks)),
    )


def _bridge_state(row: Any) -> BridgeState:
    return BridgeState(
        name=row.name,
        datapath_type=row.datapath_type,
        external_ids=dict(row.external_ids),
        other_config=dict(row.other_config),
        ports=tuple(sorted((_port_state(p) for p in row.ports), key=lambda p: p.name)),
    )


def _bridge_row(tables: Any, name: str) -> Any:
    return next((r for r in tables["Bridge"].rows.values() if r.name == name), None)


def read_bridge(api: Any, name: str) -> BridgeState | None:
    """Snapshot of bridge ``name`` (rows, not live objects), or None when it does not exist."""

    def read(tables: Any) -> BridgeState | None:
        row = _bridge_row(tables, name)
        return None if row is None else _bridge_state(row)

    result: BridgeState | None = _read(api, read)
    return result


def list_bridges(api: Any) -> list[str]:
    """Names of all bridges in the database, sorted."""
    return sorted(_read(api, lambda t: [r.name for r in t["Bridge"].rows.values()]))


def interface_bridges(api: Any) -> dict[str, str]:
    """Map every Interface name that is part of a bridge to that bridge's name."""

    def read(tables: Any) -> dict[str, str]:
        out: dict[str, str] = {}
        for br in tables["Bridge"].rows.values():
            for port in br.ports:
                for iface in port.interfaces:
                    out[iface.name] = br.name
        return out

    result: dict[str, str] = _read(api, read)
    return result


def pod_ports(api: Any, bridge: str) -> list[PortState]:
    """Ports of ``bridge`` that belong to pods (ovs-cni external_ids), sorted by name.

    Returns [] when the bridge does not exist.
    """
    state = read_bridge(api, bridge)
    return [] if state is None else [p for p in state.ports if p.is_pod]


# --- planning -------------------------------------------------------------------------------


def owner_ids(bridge: str, role: str | None = None) -> dict[str, str]:
    """external_ids marking a row as the agent's, for ``bridge`` (and a port ``role``)."""
    ids = {OWNER_KEY: OWNER_AGENT, BRIDGE_KEY: bridge}
    if role is not None:
        ids[ROLE_KEY] = role
    return ids


def diff_bridge(current: BridgeState | None, spec: BridgeSpec) -> list[str]:
    """What :func:`ensure_bridge` would change, one sentence each; [] when ``current`` matches.

    Pod ports and ports the agent does not own are never listed for removal.
    """
    name = spec.name
    if current is None:
        out = [f"create OVS bridge {name} (datapath_type {spec.datapath_type})"]
        if len(spec.uplinks) == 1:
            out.append(f"add uplink port {spec.uplinks[0]} to {name}")
        else:
            out.append(
                f"add bond port {spec.uplink_port} ({', '.join(spec.uplinks)}, "
                f"bond_mode {spec.bond_mode}) to {name}"
            )
        if spec.mtu is not None:
            out.append(f"set mtu_request {spec.mtu} on {name} and {', '.join(spec.uplinks)}")
        return out
    out = []
    if current.datapath_type != spec.datapath_type:
        out.append(
            f"set datapath_type of {name}: {current.datapath_type or '(default)'} -> "
            f"{spec.datapath_type}"
        )
    for k, v in owner_ids(name).items():
        if current.external_ids.get(k) != v:
            out.append(f"set external_ids {k}={v} on bridge {name}")
    if spec.hwaddr is not None and current.other_config.get("hwaddr") != spec.hwaddr:
        out.append(f"set other_config:hwaddr={spec.hwaddr} on bridge {name}")
    internal = current.port(name)
    if internal is None:
        out.append(f"add internal port {name} to {name}")
    want_port = spec.uplink_port
    port = current.port(want_port)
    if port is None:
        out.append(f"add uplink port {want_port} ({', '.join(spec.uplinks)}) to {name}")
    else:
        if port.interface_names != tuple(sorted(spec.uplinks)):
            out.append(
                f"set interfaces of port {want_port}: {', '.join(port.interface_names)} -> "
                f"{', '.join(sorted(spec.uplinks))}"
            )
        if len(spec.uplinks) > 1 and port.bond_mode != spec.bond_mode:
            out.append(f"set bond_mode of {want_port}: {port.bond_mode} -> {spec.bond_mode}")
    for p in current.ports:
        if (
            p.name not in (name, want_port)
            and not p.is_pod
            and p.external_ids.get(ROLE_KEY) == ROLE_UPLINK
        ):
            out.append(f"delete old uplink port {p.name} from {name}")
    if spec.mtu is not None:
        ifaces = [i for p in current.ports if p.name in (name, want_port) for i in p.interfaces]
        for iface in ifaces:
            if iface.mtu_request != spec.mtu:
                out.append(f"set mtu_request of {iface.name}: {iface.mtu_request} -> {spec.mtu}")
    return out


# --- writing ------------------------------------------------------------------------------


def _find(tables: Any, table: str, name: str) -> Any:
    return next((r for r in tables[table].rows.values() if r.name == name), None)


def _new_interface(txn: Any, api: Any, state: InterfaceState) -> Any:
    iface = txn.insert(api.tables["Interface"])
    iface.name = state.name
    if state.type:
        iface.type = state.type
    if state.mtu_request is not None:
        iface.mtu_request = state.mtu_request
    iface.external_ids = dict(state.external_ids)
    if state.options:
        iface.options = dict(state.options)
    return iface


def _new_port(txn: Any, api: Any, br: Any, state: PortState) -> Any:
    port = txn.insert(api.tables["Port"])
    port.name = state.name
    port.interfaces = [_new_interface(txn, api, i) for i in state.interfaces]
    port.external_ids = dict(state.external_ids)
    if state.bond_mode is not None:
        port.bond_mode = state.bond_mode
    if state.tag is not None:
        port.tag = state.tag
    if state.trunks:
        port.trunks = list(state.trunks)
    br.addvalue("ports", port)
    return port


def _set_if_differs(row: Any, column: str, value: Any) -> None:
    if getattr(row, column) != value:
        setattr(row, column, value)


def _update_port(row: Any, want: PortState) -> None:
    """Set the configurable columns of an existing Port row and its Interfaces to ``want``."""
    _set_if_differs(row, "external_ids", dict(want.external_ids))
    _set_if_differs(row, "bond_mode", [want.bond_mode] if want.bond_mode is not None else [])
    _set_if_differs(row, "tag", [want.tag] if want.tag is not None else [])
    _set_if_differs(row, "trunks", list(want.trunks))
    by_name = {i.name: i for i in want.interfaces}
    for iface in row.interfaces:
        w = by_name[iface.name]
        _set_if_differs(iface, "type", w.type)
        _set_if_differs(iface, "mtu_request", [w.mtu_request] if w.mtu_request is not None else [])
        _set_if_differs(iface, "external_ids", dict(w.external_ids))
        _set_if_differs(iface, "options", dict(w.options))


def _delete_port(br: Any, port: Any) -> None:
    br.delvalue("ports", port)
    for iface in port.interfaces:
        iface.delete()
    port.delete()


def _spec_ports(spec: BridgeSpec) -> tuple[PortState, PortState]:
    """The internal port and the uplink port ``spec`` asks for, as PortState."""
    internal = PortState(
        name=spec.name,
        interfaces=(
            InterfaceState(
                spec.name,
                type="internal",
                mtu_request=spec.mtu,
                external_ids=owner_ids(spec.name, ROLE_INTERNAL),
            ),
        ),
        external_ids=owner_ids(spec.name, ROLE_INTERNAL),
    )
    uplink = PortState(
        name=spec.uplink_port,
        interfaces=tuple(
            InterfaceState(u, mtu_request=spec.mtu, external_ids=owner_ids(spec.name, ROLE_UPLINK))
            for u in sorted(spec.uplinks)
        ),
        bond_mode=spec.bond_mode if len(spec.uplinks) > 1 else None,
        external_ids=owner_ids(spec.name, ROLE_UPLINK),
    )
    return internal, uplink


class _EnsureBridgeCommand(ovs_command.BaseCommand):
    """Make one bridge match a BridgeSpec inside the caller's transaction."""

    def __init__(self, api: Any, spec: BridgeSpec) -> None:
        super().__init__(api)
        self.spec = spec

    def run_idl(self, txn: Any) -> None:
        spec, tables = self.spec, self.api.tables
        br = _find(tables, "Bridge", spec.name)
        internal, uplink = _spec_ports(spec)
        if br is None:
            br = txn.insert(tables["Bridge"])
            br.name = spec.name
            br.datapath_type = spec.datapath_type
            br.external_ids = owner_ids(spec.name)
            if spec.hwaddr is not None:
                br.other_config = {"hwaddr": spec.hwaddr}
            ovs = next(iter(tables["Open_vSwitch"].rows.values()))
            ovs.addvalue("bridges", br)
            br.ports = []
            for want in (internal, uplink):
                _new_port(txn, self.api, br, want)
            self.result = br.uuid
            return
        if br.datapath_type != spec.datapath_type:
            br.datapath_type = spec.datapath_type
        for k, v in owner_ids(spec.name).items():
            if br.external_ids.get(k) != v:
                br.setkey("external_ids", k, v)
        if spec.hwaddr is not None and br.other_config.get("hwaddr") != spec.hwaddr:
            br.setkey("other_config", "hwaddr", spec.hwaddr)
        ports = {p.name: p for p in br.ports}
        # old uplink ports of ours that the spec no longer names
        for p in list(br.ports):
            if (
                p.name not in (internal.name, uplink.name)
                and p.external_ids.get(ROLE_KEY) == ROLE_UPLINK
                and POD_NETNS_KEY not in p.external_ids
            ):
                _delete_port(br, p)
        for want in (internal, uplink):
            row = ports.get(want.name)
            if row is None:
                _new_port(txn, self.api, br, want)
                continue
            if sorted(i.name for i in row.interfaces) != list(want.interface_names):
                _delete_port(br, row)
                _new_port(txn, self.api, br, want)
                continue
            if want.bond_mode is not None and _opt_str(row.bond_mode) != want.bond_mode:
                row.bond_mode = want.bond_mode
            for iface in row.interfaces:
                if spec.mtu is not None and _opt_int(iface.mtu_request) != spec.mtu:
                    iface.mtu_request = spec.mtu
        self.result = br.uuid


class _RestoreBridgeCommand(ovs_command.BaseCommand):
    """Put bridge ``name`` back exactly as ``snapshot`` (None: the bridge did not exist)."""

    def __init__(self, api: Any, name: str, snapshot: BridgeState | None) -> None:
        super().__init__(api)
        self.name = name
        self.snapshot = snapshot

    def run_idl(self, txn: Any) -> None:
        tables, snap = self.api.tables, self.snapshot
        br = _find(tables, "Bridge", self.name)
        if snap is None:
            if br is None:
                return
            # a port added meanwhile (a concurrent transaction) makes OVSDB answer "try
            # again"; ovsdbapp then runs this again and sees it
            br.verify("ports")
            pods = [p for p in br.ports if POD_NETNS_KEY in p.external_ids]
            if pods:
                # pods attached meanwhile: the bridge stays for them, without anything else
                # of ours (the uplink goes back to the node); the internal port stays
                self.result = sorted(p.name for p in pods)
                for p in list(br.ports):
                    if p.name != self.name and POD_NETNS_KEY not in p.external_ids:
                        _delete_port(br, p)
                return
            for p in list(br.ports):
                _delete_port(br, p)
            ovs = next(iter(tables["Open_vSwitch"].rows.values()))
            ovs.delvalue("bridges", br)
            br.delete()
            return
        live: dict[str, Any] = {}
        if br is None:
            br = txn.insert(tables["Bridge"])
            br.name = snap.name
            br.ports = []
            ovs = next(iter(tables["Open_vSwitch"].rows.values()))
            ovs.addvalue("bridges", br)
        else:
            live = {p.name: p for p in br.ports}
        br.datapath_type = snap.datapath_type
        br.external_ids = dict(snap.external_ids)
        br.other_config = dict(snap.other_config)
        wanted = {p.name: p for p in snap.ports}
        for name, row in live.items():
            if name not in wanted:
                if POD_NETNS_KEY in row.external_ids:
                    continue  # a pod attached meanwhile: not ours to take away
                _delete_port(br, row)
        for name, want in wanted.items():
            row = live.get(name)
            if row is None or sorted(i.name for i in row.interfaces) != list(want.interface_names):
                if row is not None:
                    _delete_port(br, row)
                _new_port(txn, self.api, br, want)
            else:
                _update_port(row, want)  # same rows (same UUIDs), columns as in the snapshot


def ensure_bridge(api: Any, spec: BridgeSpec) -> list[str]:
    """Make bridge ``spec.name`` match ``spec`` in one OVSDB transaction; return what changed.

    Idempotent: returns [] and commits nothing when the bridge already matches. Raises OvsError
    naming the bridge when the transaction fails.
    """
    changes = diff_bridge(read_bridge(api, spec.name), spec)
    if not changes:
        return []
    try:
        with api.transaction(check_error=True) as txn:
            txn.add(_EnsureBridgeCommand(api, spec))
    except Exception as exc:
        raise OvsError(f"OVSDB transaction for bridge {spec.name} failed: {exc}") from exc
    return changes


def restore_bridge(api: Any, name: str, snapshot: BridgeState | None) -> bool:
    """Return bridge ``name`` to ``snapshot`` (from :func:`read_bridge`) in one transaction.

    ``snapshot`` None (the bridge did not exist) deletes the bridge with all its ports, unless
    pod ports (ovs-cni external_ids) were added meanwhile: then the bridge stays with its pod
    ports and internal port only (the uplink port is deleted; :func:`pod_ports` names them),
    as removal is refused while pod ports remain. The check and the deletion are one
    transaction that verifies ``Bridge.ports``, so a port added concurrently is seen. Pod
    ports added after a snapshot are always kept. Returns True when something was changed.
    Raises OvsError on failure.
    """
    current = read_bridge(api, name)
    if _same_bridge(current, snapshot):
        return False
    try:
        with api.transaction(check_error=True) as txn:
            txn.add(_RestoreBridgeCommand(api, name, snapshot))
    except Exception as exc:
        raise OvsError(f"OVSDB rollback of bridge {name} failed: {exc}") from exc
    return True


def _same_bridge(a: BridgeState | None, b: BridgeState | None) -> bool:
    if a is None or b is None:
        return a is b

    def strip(s: BridgeState) -> BridgeState:
        ports = tuple(
            PortState(
                p.name,
                tuple(
                    InterfaceState(i.name, i.type, i.mtu_request, i.external_ids, i.options)
                    for i in p.interfaces
                ),
                p.bond_mode,
                p.external_ids,
                p.tag,
                p.trunks,
            )
            for p in s.ports
        )
        return BridgeState(s.name, s.datapath_type, s.external_ids, s.other_config, ports)

    return strip(a) == strip(b)


def delete_port(api: Any, bridge: str, port: str) -> bool:
    """Delete ``port`` (and its interfaces) from ``bridge``; False when it was not there."""
    state = read_bridge(api, bridge)
    if state is None or state.port(port) is None:
        return False
    try:
        api.del_port(port, bridge=bridge, if_exists=True).execute(check_error=True)
    except Exception as exc:
        raise OvsError(f"OVSDB: deleting port {port} of bridge {bridge} failed: {exc}") from exc
    return True


class PodPortsRemain(OvsError):
    """A bridge was not deleted because pod ports are on it; ``ports`` names them."""

    def __init__(self, bridge: str, ports: list[str]) -> None:
        super().__init__(
            f"OVS bridge {bridge} was not deleted: pod ports remain on it: {', '.join(ports)}"
        )
        self.bridge = bridge
        self.ports = ports


class _DeleteBridgeCommand(ovs_command.BaseCommand):
    """Delete bridge ``name`` with its ports, unless a pod port is on it (then raise
    :class:`PodPortsRemain`, which aborts the transaction). ``Bridge.ports`` is verified, so
    a pod port added by a concurrent transaction makes OVSDB answer "try again" and this runs
    again and sees it."""

    def __init__(self, api: Any, name: str) -> None:
        super().__init__(api)
        self.name = name

    def run_idl(self, txn: Any) -> None:
        tables = self.api.tables
        br = _find(tables, "Bridge", self.name)
        self.result = br is not None
        if br is None:
            return
        br.verify("ports")
        pods = sorted(p.name for p in br.ports if POD_NETNS_KEY in p.external_ids)
        if pods:
            raise PodPortsRemain(self.name, pods)
        for p in list(br.ports):
            _delete_port(br, p)
        ovs = next(iter(tables["Open_vSwitch"].rows.values()))
        ovs.delvalue("bridges", br)
        br.delete()


def delete_bridge(api: Any, name: str) -> bool:
    """Delete bridge ``name`` with all its ports in one transaction; False when it did not
    exist. Raises :class:`PodPortsRemain` (nothing deleted) when a pod port is on it, even one
    added a moment before (the transaction verifies ``Bridge.ports``); OvsError when the
    transaction fails."""
    if read_bridge(api, name) is None:
        return False
    cmd = _DeleteBridgeCommand(api, name)
    try:
        with api.transaction(check_error=True) as txn:
            txn.add(cmd)
    except PodPortsRemain:
        raise
    except Exception as exc:
        raise OvsError(f"OVSDB: deleting bridge {name} failed: {exc}") from exc
    return bool(cmd.result)
