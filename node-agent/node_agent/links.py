"""Addresses, routes and MAC of the node's NICs, through pyroute2 (rtnetlink) only.

Moving a node onto an OVS bridge (what kubernetes-nmstate and os-net-config do): copy the
uplink's MAC to the bridge's internal interface, bring it up, move the uplink's global IPv4/IPv6
addresses and its routes (default route included) from the uplink to the bridge
(:func:`takeover`). :func:`restore` is the exact inverse (bridge back to uplink), and
:func:`apply_state` puts one link back to a :class:`LinkState` snapshot, for rollback.

Which routes move: main table (254), output interface = the link, not created by the kernel
(``proto kernel`` prefix routes come back by themselves with the addresses), unicast, and not
IPv6 link-local (fe80::/64) or multicast. Metric, protocol, scope, preferred source and
gateway are kept. Addresses keep prefix length and the IFA_F_NODAD flag. Lifetimes are not
kept: a moved DHCP lease becomes permanent.

Every function takes an open ``pyroute2.IPRoute`` (see :func:`open_iproute` for a named
network namespace) and raises :class:`LinkError` naming the link and the operation.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

MAIN_TABLE = 254
RTPROT_KERNEL = 2
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
IFA_F_NODAD = 0x02
IFF_UP = 0x1


class LinkError(RuntimeError):
    """An rtnetlink operation failed; the message names the link and what was attempted."""


class LinkTimeout(LinkError):
    """A link did not appear in time (e.g. vswitchd did not create the internal interface)."""


@dataclass(frozen=True, order=True)
class Address:
    """One interface address: ``cidr`` ("172.18.10.11/16", "fd00::5/64"), ``family``
    (socket.AF_INET or AF_INET6) and ``nodad`` (IFA_F_NODAD set: no duplicate detection)."""

    cidr: str
    family: int
    nodad: bool = False

    @property
    def ip(self) -> str:
        return self.cidr.split("/")[0]

    @property
    def prefixlen(self) -> int:
        return int(self.cidr.split("/")[1])


@dataclass(frozen=True, order=True)
class Route:
    """One route of the main table, without its output interface.

    ``dst``: "default" or a CIDR; ``gateway``: next hop or None (on-link); ``metric``: priority
    or None; ``proto``/``scope``: rtnetlink numbers (3 boot, 4 static, 16 dhcp; 0 universe,
    253 link); ``prefsrc``: preferred source or None; ``family``: AF_INET/AF_INET6.
    """

    family: int
    dst: str
    gateway: str | None = None
    metric: int | None = None
    proto: int = 3
    scope: int = RT_SCOPE_UNIVERSE
    prefsrc: str | None = None
    table: int = MAIN_TABLE

    @property
    def is_default(self) -> bool:
        return self.dst == "default"


@dataclass(frozen=True)
class LinkState:
    """What we manage of one link: name, ifindex, MAC (lowercase), MTU (bytes), admin up,
    global addresses and movable routes (both sorted)."""

    name: str
    index: int
    mac: str
    mtu: int
    up: bool
    addresses: tuple[Address, ...] = ()
    routes: tuple[Route, ...] = ()

    def same_config(self, other: LinkState) -> bool:
        """True when MAC, MTU, up state, addresses and routes are equal (ifindex may differ)."""
        return (self.mac, self.mtu, self.up, self.addresses, self.routes) == (
            other.mac,
            other.mtu,
            other.up,
            other.addresses,
            other.routes,
        )


@contextlib.contextmanager
def open_iproute(netns: str | None = None) -> Iterator[IPRoute]:
    """An IPRoute socket in network namespace ``netns`` (a name under /run/netns), or in the
    caller's namespace when None. Closed on exit."""
    try:
        ipr = IPRoute(netns=netns) if netns else IPRoute()
    except OSError as exc:
        raise LinkError(f"cannot open rtnetlink in netns {netns or '(own)'}: {exc}") from exc
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: IPRoute, ifname: str) -> int | None:
    idx = ipr.link_lookup(ifname=ifname)
    return idx[0] if idx else None


def _is_movable_route(msg: Any, index: int) -> bool:
    if msg.get_attr("RTA_OIF") != index or msg.get_attr("RTA_MULTIPATH") is not None:
        return False
    if msg.get_attr("RTA_TABLE", msg["table"]) != MAIN_TABLE:
        return False
    if msg["proto"] == RTPROT_KERNEL or msg["type"] != RTN_UNICAST:
        return False
    dst = msg.get_attr("RTA_DST")
    return not (
        msg["family"] == socket.AF_INET6
        and dst is not None
        and (dst.startswith("fe80:") or dst.startswith("ff"))
    )


def _route_of(msg: Any) -> Route:
    dst = msg.get_attr("RTA_DST")
    return Route(
        family=msg["family"],
        dst="default" if dst is None else f"{dst}/{msg['dst_len']}",
        gateway=msg.get_attr("RTA_GATEWAY"),
        metric=msg.get_attr("RTA_PRIORITY"),
        proto=msg["proto"],
        scope=msg["scope"],
        prefsrc=msg.get_attr("RTA_PREFSRC"),
        table=MAIN_TABLE,
    )


def read_link(ipr: IPRoute, ifname: str) -> LinkState | None:
    """Snapshot of link ``ifname``, or None when it does not exist."""
    index = _index(ipr, ifname)
    if index is None:
        return None
    try:
        (link,) = ipr.get_links(index)
        addrs = [
            Address(
                f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}",
                a["family"],
                bool((a.get_attr("IFA_FLAGS") or a["flags"]) & IFA_F_NODAD),
            )
            for a in ipr.get_addr(index=index)
            if a["scope"] == RT_SCOPE_UNIVERSE
        ]
        routes = [
            _route_of(m)
            for family in (socket.AF_INET, socket.AF_INET6)
            for m in ipr.get_routes(family=family, table=MAIN_TABLE)
            if _is_movable_route(m, index)
        ]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise LinkError(f"reading link {ifname}: {exc}") from exc
    return LinkState(
        name=ifname,
        index=index,
        mac=str(link.get_attr("IFLA_ADDRESS") or "").lower(),
        mtu=int(link.get_attr("IFLA_MTU")),
        up=bool(link["flags"] & IFF_UP),
        addresses=tuple(sorted(set(addrs))),
        routes=tuple(sorted(set(routes), key=_route_order)),
    )


def link_kind(ipr: IPRoute, ifname: str) -> str | None:
    """rtnetlink IFLA_INFO_KIND of ``ifname`` ("veth", "bridge", "openvswitch", "tun", ...).

    "" for a link without a kind (a physical NIC), None when no such link exists.
    """
    index = _index(ipr, ifname)
    if index is None:
        return None
    try:
        (link,) = ipr.get_links(index)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise LinkError(f"reading link {ifname}: {exc}") from exc
    info = link.get_attr("IFLA_LINKINFO")
    return str(info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""


def _route_order(r: Route) -> tuple[Any, ...]:
    # on-link routes first (their gateways are needed by the others), default routes last
    return (r.gateway is not None, r.is_default, r.family, r.dst, r.metric or 0, r.gateway or "")


def require_link(ipr: IPRoute, ifname: str) -> LinkState:
    """Like :func:`read_link` but raises LinkError when ``ifname`` does not exist."""
    state = read_link(ipr, ifname)
    if state is None:
        raise LinkError(f"link {ifname} does not exist")
    return state


def wait_for_link(ipr: IPRoute, ifname: str, timeout: float = 10.0) -> LinkState:
    """Wait until ``ifname`` exists (vswitchd creates internal interfaces asynchronously).

    Polls every 20 ms up to ``timeout`` seconds; raises LinkTimeout naming the link.
    """
    deadline = time.monotonic() + timeout
    while True:
        state = read_link(ipr, ifname)
        if state is not None:
            return state
        if time.monotonic() >= deadline:
            raise LinkTimeout(f"link {ifname} did not appear within {timeout:g} s")
        time.sleep(0.02)


# --- changing -------------------------------------------------------------------------------


def _do(what: str, fn: Any, *args: Any, ok: tuple[int, ...] = (), **kwargs: Any) -> bool:
    """Run one rtnetlink request; False when it failed with an errno in ``ok``."""
    try:
        fn(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code in ok:
            return False
        raise LinkError(f"{what}: {exc}") from exc
    return True


def _add_address(ipr: IPRoute, link: LinkState, addr: Address) -> bool:
    kwargs: dict[str, Any] = {"index": link.index, "address": addr.ip, "prefixlen": addr.prefixlen}
    if addr.nodad:
        kwargs["IFA_FLAGS"] = IFA_F_NODAD
    return _do(
        f"add address {addr.cidr} to {link.name}", ipr.addr, "add", ok=(errno.EEXIST,), **kwargs
    )


def _del_address(ipr: IPRoute, link: LinkState, addr: Address) -> bool:
    return _do(
        f"delete address {addr.cidr} from {link.name}",
        ipr.addr,
        "del",
        ok=(errno.EADDRNOTAVAIL, errno.ENODEV),
        index=link.index,
        address=addr.ip,
        prefixlen=addr.prefixlen,
    )


def _route_args(route: Route, index: int) -> dict[str, Any]:
    args: dict[str, Any] = {
        "family": route.family,
        "oif": index,
        "table": route.table,
        "proto": route.proto,
        "scope": route.scope,
    }
    if not route.is_default:
        args["dst"] = route.dst
    if route.gateway:
        args["gateway"] = route.gateway
    if route.metric is not None:
        args["priority"] = route.metric
    if route.prefsrc:
        args["prefsrc"] = route.prefsrc
    return args


def describe_route(route: Route, dev: str) -> str:
    """``ip route``-like text of ``route`` on ``dev``, for logs and plans."""
    text = route.dst
    if route.gateway:
        text += f" via {route.gateway}"
    text += f" dev {dev}"
    if route.metric is not None:
        text += f" metric {route.metric}"
    return text


def _add_route(ipr: IPRoute, link: LinkState, route: Route) -> bool:
    return _do(
        f"add route {describe_route(route, link.name)}",
        ipr.route,
        "add",
        ok=(errno.EEXIST,),
        **_route_args(route, link.index),
    )


def _del_route(ipr: IPRoute, link: LinkState, route: Route) -> bool:
    return _do(
        f"delete route {describe_route(route, link.name)}",
        ipr.route,
        "del",
        ok=(errno.ESRCH, errno.ENODEV, errno.ENOENT),
        **_route_args(route, link.index),
    )


def set_mac(ipr: IPRoute, link: LinkState, mac: str) -> bool:
    """Set the MAC of ``link``; False when it already has it."""
    if link.mac == mac.lower():
        return False
    _do(f"set MAC {mac} on {link.name}", ipr.link, "set", index=link.index, address=mac)
    return True


def set_up(ipr: IPRoute, link: LinkState, up: bool = True) -> bool:
    """Set ``link`` administratively up (or down); False when it already was."""
    if link.up == up:
        return False
    _do(f"set {link.name} {'up' if up else 'down'}", ipr.link, "set", index=link.index,
        state="up" if up else "down")  # fmt: skip
    return True


def set_mtu(ipr: IPRoute, link: LinkState, mtu: int) -> bool:
    """Set the MTU (bytes) of ``link``; False when it already has it."""
    if link.mtu == mtu:
        return False
    _do(f"set MTU {mtu} on {link.name}", ipr.link, "set", index=link.index, mtu=mtu)
    return True


def move(ipr: IPRoute, src: str, dst: str) -> list[str]:
    """Move global addresses and movable routes from link ``src`` to link ``dst``.

    Order: add the addresses to ``dst``, delete them from ``src`` (the kernel then drops the
    routes through ``src``), delete any route left on ``src``, add the routes on ``dst`` (on-link
    routes first, default routes last). Both links must exist; ``dst`` should be up. Idempotent:
    returns [] when ``src`` has nothing to move. Returns one sentence per change.
    """
    s = require_link(ipr, src)
    d = require_link(ipr, dst)
    changes: list[str] = []
    for addr in s.addresses:
        if addr not in d.addresses and _add_address(ipr, d, addr):
            changes.append(f"add address {addr.cidr} to {dst}")
    for addr in s.addresses:
        if _del_address(ipr, s, addr):
            changes.append(f"delete address {addr.cidr} from {src}")
    for route in s.routes:
        _del_route(ipr, s, route)
    d = require_link(ipr, dst)
    for route in s.routes:
        if route not in d.routes and _add_route(ipr, d, route):
            changes.append(f"move route {describe_route(route, src)} to {dst}")
    return changes


def takeover(ipr: IPRoute, uplink: str, bridge: str, timeout: float = 10.0) -> list[str]:
    """Move the node from ``uplink`` onto the bridge's internal interface ``bridge``.

    Waits up to ``timeout`` s for ``bridge`` to exist, sets its MAC to the uplink's, brings it
    and the uplink up, then :func:`move` (uplink -> bridge). Idempotent: on a node already
    taken over, changes nothing and returns []. Returns one sentence per change.
    """
    up = require_link(ipr, uplink)
    br = wait_for_link(ipr, bridge, timeout)
    changes = []
    if set_mac(ipr, br, up.mac):
        changes.append(f"set MAC of {bridge} to {up.mac} (from {uplink})")
    if set_up(ipr, br):
        changes.append(f"set {bridge} up")
    if set_up(ipr, up):
        changes.append(f"set {uplink} up")
    return changes + move(ipr, uplink, bridge)


def restore(ipr: IPRoute, bridge: str, uplink: str) -> list[str]:
    """Inverse of :func:`takeover`: move addresses and routes from ``bridge`` back to ``uplink``.

    The uplink's MAC never changed, so only addresses and routes move. Idempotent; when the
    bridge link is already gone, returns [].
    """
    if read_link(ipr, bridge) is None:
        return []
    up = require_link(ipr, uplink)
    changes = ["set " + uplink + " up"] if set_up(ipr, up) else []
    return changes + move(ipr, bridge, uplink)


def strip(ipr: IPRoute, ifname: str) -> list[str]:
    """Delete every global address and movable route of ``ifname`` (missing link: [])."""
    link = read_link(ipr, ifname)
    if link is None:
        return []
    changes = []
    for route in link.routes:
        if _del_route(ipr, link, route):
            changes.append(f"delete route {describe_route(route, ifname)}")
    for addr in link.addresses:
        if _del_address(ipr, link, addr):
            changes.append(f"delete address {addr.cidr} from {ifname}")
    return changes


def apply_state(ipr: IPRoute, want: LinkState) -> list[str]:
    """Put link ``want.name`` back to the snapshot ``want``: MTU, MAC, up state, addresses,
    routes (extra ones deleted, missing ones added). Used for rollback; idempotent.

    Raises LinkError when the link no longer exists.
    """
    cur = require_link(ipr, want.name)
    changes = []
    if set_mtu(ipr, cur, want.mtu):
        changes.append(f"set MTU of {want.name} back to {want.mtu}")
    if set_mac(ipr, cur, want.mac):
        changes.append(f"set MAC of {want.name} back to {want.mac}")
    if set_up(ipr, cur, want.up):
        changes.append(f"set {want.name} {'up' if want.up else 'down'}")
    for route in cur.routes:
        if route not in want.routes and _del_route(ipr, cur, route):
            changes.append(f"delete route {describe_route(route, want.name)}")
    for addr in cur.addresses:
        if addr not in want.addresses and _del_address(ipr, cur, addr):
            changes.append(f"delete address {addr.cidr} from {want.name}")
    for addr in want.addresses:
        if addr not in cur.addresses and _add_address(ipr, cur, addr):
            changes.append(f"add address {addr.cidr} to {want.name}")
    cur = require_link(ipr, want.name)
    for route in want.routes:
        if route not in cur.routes and _add_route(ipr, cur, route):
            changes.append(f"add route {describe_route(route, want.name)}")
    return changes


def add_config(
    ipr: IPRoute, ifname: str, addresses: tuple[Address, ...], routes: tuple[Route, ...]
) -> list[str]:
    """Add ``addresses`` then ``routes`` to ``ifname`` (those already there are skipped).

    Used for reboot replay from the recorded configuration. Raises LinkError.
    """
    link = require_link(ipr, ifname)
    changes = []
    for addr in addresses:
        if addr not in link.addresses and _add_address(ipr, link, addr):
            changes.append(f"add address {addr.cidr} to {ifname}")
    link = require_link(ipr, ifname)
    for route in sorted(routes, key=_route_order):
        if route not in link.routes and _add_route(ipr, link, route):
            changes.append(f"add route {describe_route(route, ifname)}")
    return changes


def default_gateways(state: LinkState) -> list[str]:
    """Gateways of the default routes of ``state`` (IPv4 first)."""
    return [r.gateway for r in state.routes if r.is_default and r.gateway]
