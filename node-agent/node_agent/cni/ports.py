"""Pod ports on OVS bridges: one OVSDB transaction per attach, lookup by external_ids, purge.

A pod attachment is one Port with one Interface (the host end of the pod's veth, type
``system`` unless the config asks otherwise). The Port carries ovs-cni's external_ids
(``contNetns``, ``contIface``, ``contPodUid``, ``owner``) plus ``contId`` (the CNI container
id, so DEL finds the port after the netns is gone) and ``contPod`` (``<namespace>/<name>``).
Source: k8snetworkplumbingwg/ovs-cni behaviour (reference/cni-ovs.md); OVSDB schema
``Open_vSwitch`` (Bridge.ports, Port.tag/trunks/vlan_mode, Interface.error); ovsdbapp commands.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ovsdbapp.backend.ovs_idl import command, idlutils
from ovsdbapp.backend.ovs_idl.transaction import Transaction

# --- external_ids keys on pod ports (ovs-cni names where ovs-cni has one) -------------------
EXT_CONTAINER_ID = "contId"
EXT_NETNS = "contNetns"
EXT_IFNAME = "contIface"
EXT_POD_UID = "contPodUid"
EXT_POD = "contPod"
EXT_OWNER = "owner"
OWNER = "underlay-ovs"
"""Value of ``external_ids:owner`` on every port this plugin creates (ovs-cni uses ``ovs-cni``)."""


MONITORED: dict[str, list[str]] = {
    "Open_vSwitch": ["next_cfg", "cur_cfg"],
    "Bridge": ["name", "ports", "external_ids"],
    "Port": ["name", "interfaces", "external_ids", "tag", "trunks", "vlan_mode"],
    "Interface": [
        "name",
        "type",
        "external_ids",
        "error",
        "ofport",
        "ofport_request",
        "mtu_request",
    ],
}
"""The only tables and columns the CNI plugins read or write (see :func:`connect`)."""


def connect(remote: str, timeout: float = 10.0) -> Any:
    """An ovsdbapp Open_vSwitch API that monitors only :data:`MONITORED` columns.

    ovs-vswitchd rewrites Interface statistics, status and link state all the time; with the
    pure-Python JSON parser of the ``ovs`` package each such update costs the agent CPU
    (measured ~10 ms of GIL per pod ADD with all columns monitored). Monitoring only what the
    plugins use removes that traffic. Raises node_agent.ovsdb.OvsdbUnavailable naming
    ``remote``. Source: RFC 7047 "monitor" (column subsets); ovsdbapp ``OvsdbIdl``.
    """
    from ovsdbapp.backend.ovs_idl import connection
    from ovsdbapp.schema.open_vswitch import impl_idl

    from node_agent.ovsdb import OvsdbUnavailable

    try:
        helper = idlutils.get_schema_helper(remote, "Open_vSwitch")
        for table, columns in MONITORED.items():
            helper.register_columns(table, columns)
        idl = connection.OvsdbIdl(remote, helper)
        return impl_idl.OvsdbIdl(connection.Connection(idl=idl, timeout=timeout))
    except Exception as exc:
        raise OvsdbUnavailable(f"cannot reach OVSDB at {remote}: {exc}") from exc


class BridgeMissing(LookupError):
    """The bridge named by the CNI config is not in this node's OVSDB."""


@dataclass(frozen=True)
class PodPort:
    """A pod port found in OVSDB: its name, bridge, external_ids and interface errors."""

    name: str
    bridge: str | None
    external_ids: dict[str, str]
    errors: tuple[str, ...]
    ofports: tuple[int, ...]


class AttachPortCommand(command.BaseCommand):
    """Insert Interface + Port with external_ids and VLAN settings and add it to ``bridge``.

    Runs as one OVSDB transaction (ovsdbapp command). ``tag`` makes an access port; ``trunks``
    (list of VLAN ids) a trunk port; neither: a trunk of all VLANs (OVS default), as ovs-cni.
    Raises BridgeMissing when the bridge does not exist; the transaction then changes nothing.
    """

    def __init__(
        self,
        api: Any,
        bridge: str,
        name: str,
        external_ids: dict[str, str],
        *,
        tag: int | None = None,
        trunks: list[int] | None = None,
        interface_type: str = "",
        ofport_request: int | None = None,
        mtu_request: int | None = None,
    ) -> None:
        super().__init__(api)
        self.bridge = bridge
        self.name = name
        self.external_ids = external_ids
        self.tag = tag
        self.trunks = trunks
        self.interface_type = interface_type
        self.ofport_request = ofport_request
        self.mtu_request = mtu_request

    def run_idl(self, txn: Any) -> None:
        br = idlutils.row_by_value(self.api.idl, "Bridge", "name", self.bridge, None)
        if br is None:
            raise BridgeMissing(self.bridge)
        iface = txn.insert(self.api._tables["Interface"])
        iface.name = self.name
        if self.interface_type:
            iface.type = self.interface_type
        if self.ofport_request is not None:
            iface.ofport_request = [self.ofport_request]
        if self.mtu_request is not None:
            iface.mtu_request = [self.mtu_request]
        iface.external_ids = dict(self.external_ids)
        port = txn.insert(self.api._tables["Port"])
        port.name = self.name
        port.interfaces = [iface]
        port.external_ids = dict(self.external_ids)
        if self.tag is not None:
            port.tag = [self.tag]
            port.vlan_mode = ["access"]
        elif self.trunks:
            port.trunks = sorted(set(self.trunks))
            port.vlan_mode = ["trunk"]
        br.addvalue("ports", port)
        if hasattr(txn, "expected_ifaces"):  # a vsctl-style transaction waits for vswitchd
            txn.expected_ifaces.add(iface.uuid)
        self.result = port.uuid


class DetachPortsCommand(command.BaseCommand):
    """Remove the named ports (and their interfaces) from whatever bridge holds them.

    Missing ports are skipped, so a second DEL changes nothing (idempotent).
    """

    def __init__(self, api: Any, names: list[str]) -> None:
        super().__init__(api)
        self.names = names

    def run_idl(self, txn: Any) -> None:
        wanted = set(self.names)
        removed = []
        for br in self.api._tables["Bridge"].rows.values():
            for port in list(br.ports):
                name = port.name
                if name in wanted:
                    br.delvalue("ports", port)
                    for iface in port.interfaces:
                        iface.delete()
                    port.delete()
                    removed.append(name)
        self.result = removed


class FindPodPortsCommand(command.ReadOnlyCommand):
    """Read-only: our ports whose external_ids include every ``key=value`` of ``match``.

    ovsdbapp runs a ReadOnlyCommand under the connection's lock, which its IDL thread holds
    while it applies updates from ovsdb-server: reading the IDL rows from another thread
    without it races with those updates (rows change or vanish mid-iteration). The result
    is plain :class:`PodPort` values, safe to use after the lock is released.
    """

    def __init__(self, api: Any, match: dict[str, str]) -> None:
        super().__init__(api)
        self.match = match

    def run_idl(self, txn: Any) -> None:
        matched = []
        for port in self.api.tables["Port"].rows.values():
            ext = port.external_ids
            if ext.get(EXT_OWNER) != OWNER:
                continue
            if any(ext.get(k) != v for k, v in self.match.items()):
                continue
            matched.append((port, dict(ext)))
        found = []
        if matched:
            bridges = {
                p.uuid: br.name for br in self.api.tables["Bridge"].rows.values() for p in br.ports
            }
            for port, ext in matched:
                ifaces = port.interfaces
                errors = tuple(e for i in ifaces for e in i.error)
                ofports = tuple(o for i in ifaces for o in i.ofport)
                found.append(PodPort(port.name, bridges.get(port.uuid), ext, errors, ofports))
        self.result = found


class BridgeExistsCommand(command.ReadOnlyCommand):
    """Read-only: True when a Bridge row named ``bridge`` exists (see FindPodPortsCommand)."""

    def __init__(self, api: Any, bridge: str) -> None:
        super().__init__(api)
        self.bridge = bridge

    def run_idl(self, txn: Any) -> None:
        self.result = any(b.name == self.bridge for b in self.api.tables["Bridge"].rows.values())


class InterfaceStateCommand(command.ReadOnlyCommand):
    """Read-only: Interface ``name`` as a :class:`PodPort` (errors, ofport), or None."""

    def __init__(self, api: Any, name: str) -> None:
        super().__init__(api)
        self.name = name

    def run_idl(self, txn: Any) -> None:
        iface = idlutils.row_by_value(self.api.idl, "Interface", "name", self.name, None)
        if iface is None:
            self.result = None
            return
        self.result = PodPort(
            self.name, None, dict(iface.external_ids), tuple(iface.error), tuple(iface.ofport)
        )


class BridgeIdsCommand(command.ReadOnlyCommand):
    """Read-only: the external_ids of Bridge ``bridge`` (a dict), or None when there is none."""

    def __init__(self, api: Any, bridge: str) -> None:
        super().__init__(api)
        self.bridge = bridge

    def run_idl(self, txn: Any) -> None:
        self.result = next(
            (
                dict(b.external_ids)
                for b in self.api.tables["Bridge"].rows.values()
                if b.name == self.bridge
            ),
            None,
        )


def bridge_external_ids(api: Any, bridge: str) -> dict[str, str] | None:
    """The external_ids of ``bridge`` on this node (None: no such bridge). The node agent marks
    the bridges it makes with ``underlay.dev/owner=agent`` (:data:`node_agent.ovs.OWNER_KEY`)."""
    found: dict[str, str] | None = BridgeIdsCommand(api, bridge).execute(
        check_error=True, log_errors=False
    )
    return found


def bridge_exists(api: Any, bridge: str) -> bool:
    """True when ``bridge`` is a row of this node's Bridge table (read under the OVSDB
    connection's lock)."""
    return bool(BridgeExistsCommand(api, bridge).execute(check_error=True, log_errors=False))


def find_pod_ports(api: Any, **match: str) -> list[PodPort]:
    """Ports owned by this plugin whose external_ids include every ``key=value`` in ``match``.

    Keyword names are external_ids keys, e.g. ``find_pod_ports(api, contId=cid, contIface="eth0")``.
    Reads the IDL cache under the connection's lock (:class:`FindPodPortsCommand`).
    """
    found: list[PodPort] = FindPodPortsCommand(api, match).execute(
        check_error=True, log_errors=False
    )
    return found


def _commit(api: Any, cmd: Any, wait: bool) -> Any:
    """Commit ``cmd`` alone; ``wait`` also waits for ovs-vswitchd to apply it (next_cfg).

    Without ``wait`` (as ovs-cni does) the call returns once ovsdb-server committed; vswitchd
    applies the change a few milliseconds later.
    """
    if wait:
        return cmd.execute(check_error=True, log_errors=False)
    txn = Transaction(api, api.ovsdb_connection, check_error=True, log_errors=False)
    txn.add(cmd)
    txn.commit()
    return cmd.result


def attach_port(
    api: Any,
    bridge: str,
    name: str,
    external_ids: dict[str, str],
    *,
    tag: int | None = None,
    trunks: list[int] | None = None,
    interface_type: str = "",
    ofport_request: int | None = None,
    mtu_request: int | None = None,
    wait: bool = True,
) -> PodPort:
    """Run :class:`AttachPortCommand` and return the new port (as OVSDB shows it after
    ovs-vswitchd applied it when ``wait``; else as written, without ofport or errors yet).

    ``wait``: see :func:`_commit`. Raises BridgeMissing, or the ovsdbapp/RuntimeError of a
    failed transaction.
    """
    cmd = AttachPortCommand(
        api,
        bridge,
        name,
        external_ids,
        tag=tag,
        trunks=trunks,
        interface_type=interface_type,
        ofport_request=ofport_request,
        mtu_request=mtu_request,
    )
    _commit(api, cmd, wait)
    if wait:
        ports = [p for p in find_pod_ports(api) if p.name == name]
        if not ports:
            raise RuntimeError(
                f"port {name} vanished from bridge {bridge} right after it was added"
            )
        return ports[0]
    return PodPort(name, bridge, dict(external_ids), (), ())


def detach_ports(api: Any, names: list[str], *, wait: bool = False) -> list[str]:
    """Delete the named ports in one transaction; returns the names that existed.

    ``wait``: see :func:`_commit` (a removed port needs no confirmation from vswitchd).
    """
    if not names:
        return []
    return list(_commit(api, DetachPortsCommand(api, names), wait) or [])


def wait_ofport(api: Any, name: str, timeout: float = 3.0) -> PodPort | None:
    """Wait until ovs-vswitchd assigned port ``name`` an ofport (or an error); return it.

    Polls the IDL cache (ovsdbapp keeps it current) under the connection's lock. None when
    the port vanished or ``timeout`` seconds passed.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        seen: PodPort | None = InterfaceStateCommand(api, name).execute(
            check_error=True, log_errors=False
        )
        if seen is None:
            return None
        if seen.errors or any(o > 0 for o in seen.ofports):
            return seen
        if time.monotonic() > deadline:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
