"""Node-local bridge engine of the node agent: OvsBridge object -> this node's OVS, links, files.

The daemon (which watches OvsBridge objects and writes OvsBridgeEnactment status) calls:

- :meth:`DesiredBridge.for_node` / :meth:`DesiredBridge.from_object`: what one OvsBridge asks
  of this node (nodeOverrides applied), :meth:`DesiredBridge.selects` for nodeSelector;
- :func:`validate`: node-local problems (name too long, uplink missing, uplink already in
  another bridge, datapath unavailable) as reasons; bad input changes nothing;
- :func:`plan`: the changes :func:`enact` would make, in words, and the files it would write
  (no-op mode; changes nothing); :func:`format_plan` prints it;
- :func:`enact`: make the node match, probe (gateway, API server), roll back everything to the
  exact prior state when a probe fails, then commit the persistence files;
- :func:`remove`: blocked while pod ports remain; else addresses back to the uplink, bridge
  deleted, files removed;
- :func:`drift` / :func:`classify`: what differs between the live node and the desired state;
- :class:`OvsdbWatcher` and :class:`FileWatcher`: call back when OVSDB rows or persistence files
  of a bridge change, so the daemon can repair drift.

Order of a change follows kubernetes-nmstate / os-net-config (shared/reference/persistence.md):
OVS bridge + uplink port (one OVSDB transaction), bridge MAC := uplink MAC, addresses and routes
uplink -> bridge, probe; only a successful probe commits the persistence files.

Reboot replay: the agent records what it enacted (the DesiredBridge) and the IP configuration it
moved in ``/var/lib/underlay/bridges/<bridge>.json`` (under the node root, 0600). When neither
the uplink nor the bridge has addresses (database wiped, addresses flushed), :func:`enact` puts
the recorded addresses and routes on the carrier (the bridge, or the first uplink with
moveAddresses false); :func:`recorded_bridges` gives the daemon the bridges to replay before it
can reach the API server.

Interrupted changes: before the first change of an enactment that will be probed, :func:`enact`
writes a journal, ``/var/lib/underlay/bridges/<bridge>.journal`` (0600, atomic), holding the
exact pre-change state (OVS rows, links, files) and the phase (``changing``, ``probing``,
``probed``). It is removed only after the probe passed and the persistence files (replay record
last) are committed, or after a rollback. An agent that finds a journal in phase ``changing`` or
``probing`` (it was killed, or the node lost power, before the probe passed) rolls the node back
to the recorded state before anything else (:func:`enact`, :func:`remove`,
:func:`recover_interrupted`) and reports it as a rolled-back enactment; ``probed`` means the
probe passed and only the commit may be unfinished, so the journal is dropped and the enactment
goes on. Independently, persistence files are only committed for a live state that was probed
in this run or is already described by the replay record (written only after a passed probe).

moveAddresses false: a bridge that carries the node's addresses because the agent moved them
there (the replay record lists them) gives them back to the first uplink exactly as removal does
(:func:`links.restore`: addresses, routes; ``other_config:hwaddr`` cleared), with probe and
rollback; the agent then keeps them for the uplink (persistence files and record). MTU: the
uplinks' MTUs before the agent first changed them stay in the record while spec.mtu is set; when
it is unset the agent clears ``mtu_request`` and sets the uplinks and the bridge interface back.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node_agent import links, ovs, persistence, probe
from node_agent.links import Address, LinkState, Route
from node_agent.persistence import NodeNetConfig

IFNAMSIZ_MAX = 15
"""Longest Linux interface name (IFNAMSIZ 16 including the NUL)."""
NIC_NAME = re.compile(r"[A-Za-z0-9_.-]+")
"""Bridge and uplink names the agent accepts (the OvsBridge schema's ``^[A-Za-z0-9_.-]+$``),
matched against the whole name: ``re``'s ``$`` would let ``br9\\n`` through."""
log = logging.getLogger(__name__)

RECORD_DIR = "/var/lib/underlay/bridges"
JOURNAL_SUFFIX = ".journal"
"""File name suffix of an enactment journal in :data:`RECORD_DIR` (not ``.json``: a journal is
never a replay record)."""
PHASE_CHANGING = "changing"
PHASE_PROBING = "probing"
PHASE_PROBED = "probed"
"""Journal phases: the node is being changed; the change is made and being probed; the probe
passed and the persistence files are being committed."""
OVS_LINK_KINDS = ("openvswitch", "tun")
"""rtnetlink kinds of OVS internal interfaces: kernel datapath, userspace (netdev) datapath."""
DEFAULT_BOND_MODE = "active-backup"
DEFAULT_PROBE_TIMEOUT = 20.0

STATUS_UNCHANGED = "unchanged"
STATUS_CHANGED = "changed"
STATUS_INVALID = "invalid"
STATUS_ROLLED_BACK = "rolled-back"
STATUS_FAILED = "failed"
STATUS_REMOVED = "removed"
STATUS_ABSENT = "absent"
STATUS_BLOCKED = "blocked"


class InvalidBridge(ValueError):
    """The OvsBridge object cannot be turned into a DesiredBridge; names the object and field."""


# --- desired state --------------------------------------------------------------------------


@dataclass(frozen=True)
class DesiredBridge:
    """What one OvsBridge asks of one node (nodeOverrides for that node already applied).

    Field names follow the OvsBridge schema (schemas/underlay.dev_v1alpha1_OvsBridge.json):
    ``name`` = spec.bridge or metadata.name; ``uplinks``; ``bond_mode`` (bondMode);
    ``move_addresses`` (moveAddresses); ``mtu`` (bytes or None); ``persistence``
    (auto/netplan/networkmanager/none); ``datapath_type`` (auto/system/netdev);
    ``probe_timeout`` (seconds, probeTimeoutSeconds); ``node_selector`` (equality selector).
    """

    object_name: str
    name: str
    uplinks: tuple[str, ...]
    bond_mode: str = DEFAULT_BOND_MODE
    move_addresses: bool = True
    mtu: int | None = None
    persistence: str = "auto"
    datapath_type: str = "auto"
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT
    node_selector: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any], node_name: str) -> DesiredBridge:
        """Build from an OvsBridge object (a dict as the Kubernetes API returns it) for node
        ``node_name``: the nodeOverrides entry whose nodeName matches replaces uplinks, mtu,
        moveAddresses and persistence. Raises InvalidBridge naming the object and field (also
        for a bridge or uplink name that is not an interface name as a whole,
        :data:`NIC_NAME`)."""
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        oname = meta.get("name")
        if not isinstance(oname, str) or not oname:
            raise InvalidBridge("OvsBridge without metadata.name")
        uplinks = spec.get("uplinks")
        mtu = spec.get("mtu")
        move = spec.get("moveAddresses", True)
        pers = spec.get("persistence", "auto")
        for override in spec.get("nodeOverrides") or []:
            if override.get("nodeName") == node_name:
                uplinks = override.get("uplinks", uplinks)
                mtu = override.get("mtu", mtu)
                move = override.get("moveAddresses", move)
                pers = override.get("persistence", pers)
        if (
            not isinstance(uplinks, list)
            or not uplinks
            or not all(isinstance(u, str) and u for u in uplinks)
        ):
            raise InvalidBridge(
                f"OvsBridge {oname}: spec.uplinks must be a non-empty list of NIC names"
            )
        if len(set(uplinks)) != len(uplinks):
            raise InvalidBridge(f"OvsBridge {oname}: spec.uplinks names a NIC twice: {uplinks}")
        name = spec.get("bridge") or oname
        for what, value in (("the bridge name", name), *(("spec.uplinks", u) for u in uplinks)):
            if not isinstance(value, str) or not NIC_NAME.fullmatch(value):
                raise InvalidBridge(
                    f"OvsBridge {oname}: {what} {value!r} is not a network interface name "
                    "(letters, digits, '_', '.', '-')"
                )
        if pers not in ("auto", *persistence.BACKENDS):
            raise InvalidBridge(f"OvsBridge {oname}: unknown spec.persistence {pers!r}")
        dp = spec.get("datapathType", "auto")
        if dp not in ("auto", ovs.DATAPATH_SYSTEM, ovs.DATAPATH_NETDEV):
            raise InvalidBridge(f"OvsBridge {oname}: unknown spec.datapathType {dp!r}")
        return cls(
            object_name=oname,
            name=name,
            uplinks=tuple(uplinks),
            bond_mode=spec.get("bondMode", DEFAULT_BOND_MODE),
            move_addresses=bool(move),
            mtu=int(mtu) if mtu is not None else None,
            persistence=pers,
            datapath_type=dp,
            probe_timeout=float(spec.get("probeTimeoutSeconds", DEFAULT_PROBE_TIMEOUT)),
            node_selector=dict(spec.get("nodeSelector") or {}),
        )

    @classmethod
    def for_node(
        cls, obj: Mapping[str, Any], node_name: str, node_labels: Mapping[str, str]
    ) -> DesiredBridge | None:
        """:meth:`from_object`, or None when the nodeSelector does not select this node."""
        desired = cls.from_object(obj, node_name)
        return desired if desired.selects(node_labels) else None

    def selects(self, node_labels: Mapping[str, str]) -> bool:
        """True when every nodeSelector key=value is among ``node_labels`` (empty: all nodes)."""
        return all(node_labels.get(k) == v for k, v in self.node_selector.items())


@dataclass
class NodeContext:
    """Where the engine acts.

    ``name``: node name; ``ovsdb``: ovsdbapp Open_vSwitch API from ``node_agent.ovsdb.connect``;
    ``netns``: network namespace name for pyroute2 and probes (None: the agent's own, as in
    production with hostNetwork); ``root``: directory persistence files are written under ("/"
    in production); ``api_server``: (host, port) the API server probe connects to, None skips
    it; ``link_timeout``: seconds to wait for vswitchd to create the bridge's interface.
    """

    name: str
    ovsdb: Any
    netns: str | None = None
    root: Path = Path("/")
    api_server: tuple[str, int] | None = None
    link_timeout: float = 10.0


# --- observation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """Live state relevant to one bridge: OVS bridge, links (uplinks and the bridge's internal
    interface; None = missing), file contents by node path (None = missing)."""

    bridge: ovs.BridgeState | None
    links: Mapping[str, LinkState | None]
    files: Mapping[str, tuple[str, int] | None]


def record_path(bridge: str) -> str:
    """Node path of the replay record of ``bridge``."""
    return f"{RECORD_DIR}/{bridge}.json"


def _addr_json(a: Address) -> dict[str, Any]:
    return {"cidr": a.cidr, "family": a.family, "nodad": a.nodad}


def _route_json(r: Route) -> dict[str, Any]:
    return dataclasses.asdict(r)


def _desired_json(desired: DesiredBridge) -> dict[str, Any]:
    d = dataclasses.asdict(desired)
    d["uplinks"] = list(desired.uplinks)
    d["node_selector"] = dict(desired.node_selector)
    return d


def render_record(
    desired: DesiredBridge, cfg: NodeNetConfig, uplink_mtus: Mapping[str, int] | None = None
) -> str:
    """The replay record (JSON) of ``desired`` carrying ``cfg``: ``object``, ``bridge``,
    ``uplinks``, ``desired`` (every DesiredBridge field), ``carrier`` (the link that carries
    ``addresses`` and ``routes``: the bridge, or the first uplink with moveAddresses false),
    ``mac`` (the MAC the bridge took from the uplink, or null), ``addresses``, ``routes``, and
    ``uplink_mtus`` (the uplinks' MTUs before the agent first changed them, bytes; kept while
    spec.mtu is set; what unsetting it and removal set back)."""
    doc: dict[str, Any] = {
        "object": desired.object_name,
        "bridge": desired.name,
        "uplinks": list(desired.uplinks),
        "desired": _desired_json(desired),
        "carrier": desired.name if desired.move_addresses else desired.uplinks[0],
        "mac": cfg.mac,
        "addresses": [_addr_json(a) for a in cfg.addresses],
        "routes": [_route_json(r) for r in cfg.routes],
    }
    if uplink_mtus:
        doc["uplink_mtus"] = dict(sorted(uplink_mtus.items()))
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def read_uplink_mtus(root: Path | str, bridge: str) -> dict[str, int]:
    """``uplink_mtus`` of the replay record of ``bridge`` ({} when absent or unreadable)."""
    found = persistence.read_file(root, record_path(bridge))
    if found is None:
        return {}
    try:
        return {str(k): int(v) for k, v in json.loads(found[0]).get("uplink_mtus", {}).items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def _uplink_mtus(desired: DesiredBridge, obs: Observed, root: Path) -> dict[str, int]:
    """The uplinks' MTUs before the agent changed them: from the replay record, else (first
    change) as the node has them now. Only kept when the OvsBridge sets an MTU."""
    if desired.mtu is None:
        return {}
    mtus = read_uplink_mtus(root, desired.name)
    for u in desired.uplinks:
        st = obs.links.get(u)
        if u not in mtus and st is not None:
            mtus[u] = st.mtu
    return mtus


def read_record(root: Path | str, bridge: str) -> NodeNetConfig | None:
    """The recorded IP configuration of ``bridge``, or None (absent or unreadable)."""
    found = persistence.read_file(root, record_path(bridge))
    if found is None:
        return None
    try:
        doc = json.loads(found[0])
        return NodeNetConfig(
            mac=doc.get("mac"),
            addresses=tuple(Address(**a) for a in doc.get("addresses", [])),
            routes=tuple(Route(**r) for r in doc.get("routes", [])),
        )
    except (ValueError, TypeError):
        return None


def recorded_bridges(root: Path | str) -> list[DesiredBridge]:
    """Every DesiredBridge with a replay record under ``root`` (sorted by bridge name):
    what this node had enacted, readable without the API server. Unreadable records are
    skipped."""
    out = []
    directory = persistence.node_path(root, RECORD_DIR)
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            d = json.loads(path.read_text())["desired"]
            d["uplinks"] = tuple(d["uplinks"])
            desired = DesiredBridge(**d)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if record_path(desired.name) == f"{RECORD_DIR}/{path.name}":
            out.append(desired)
    return out


def _all_paths(desired: DesiredBridge, root: Path) -> list[str]:
    paths = {record_path(desired.name)}
    for name in persistence.BACKENDS:
        paths.update(persistence.get_backend(name, root).owned_paths(root, desired))
    return sorted(paths)


def observe(desired: DesiredBridge, node: NodeContext, extra_paths: Iterable[str] = ()) -> Observed:
    """Read the live state of ``desired``'s bridge, uplinks and files on ``node``."""
    bridge = ovs.read_bridge(node.ovsdb, desired.name)
    with links.open_iproute(node.netns) as ipr:
        states = {n: links.read_link(ipr, n) for n in (*desired.uplinks, desired.name)}
    paths = set(_all_paths(desired, node.root)) | set(extra_paths)
    files = {p: persistence.read_file(node.root, p) for p in sorted(paths)}
    return Observed(bridge, states, files)


def carried_config(desired: DesiredBridge, obs: Observed, root: Path) -> NodeNetConfig:
    """The IP configuration the agent keeps for the node.

    moveAddresses true: what the bridge must carry: what the bridge already has plus what is
    still on the uplinks; when both are empty, the replay record; MAC of the first uplink.

    moveAddresses false: empty, unless the replay record lists addresses (the agent had moved
    the node's addresses onto the bridge, moveAddresses was true before): then what the first
    uplink must carry: what it has plus what is still on the bridge (it goes back); when both
    are empty, the replay record; no MAC (the bridge keeps none of the uplink's).
    """
    if not desired.move_addresses:
        return _kept_on_uplink(desired, obs, root)
    first = obs.links.get(desired.uplinks[0])
    br = obs.links.get(desired.name)
    addrs: list[Address] = list(br.addresses) if br else []
    routes: list[Route] = list(br.routes) if br else []
    for u in desired.uplinks:
        st = obs.links.get(u)
        if st:
            addrs += [a for a in st.addresses if a not in addrs]
            routes += [r for r in st.routes if r not in routes]
    mac = first.mac if first else None
    if not addrs:
        rec = read_record(root, desired.name)
        if rec is not None:
            addrs, routes = list(rec.addresses), list(rec.routes)
            mac = mac or rec.mac
    return NodeNetConfig(mac=mac, addresses=tuple(sorted(addrs)), routes=tuple(routes))


def _kept_on_uplink(desired: DesiredBridge, obs: Observed, root: Path) -> NodeNetConfig:
    """:func:`carried_config` for moveAddresses false."""
    rec = read_record(root, desired.name)
    if rec is None or not rec.addresses:
        return NodeNetConfig()
    first = obs.links.get(desired.uplinks[0])
    br = obs.links.get(desired.name)
    addrs: list[Address] = list(first.addresses) if first else []
    routes: list[Route] = list(first.routes) if first else []
    if br is not None:
        addrs += [a for a in br.addresses if a not in addrs]
        routes += [r for r in br.routes if r not in routes]
    if not addrs:
        addrs, routes = list(rec.addresses), list(rec.routes)
    return NodeNetConfig(mac=None, addresses=tuple(sorted(addrs)), routes=tuple(routes))


# --- validation -----------------------------------------------------------------------------


def validate(desired: DesiredBridge, node: NodeContext) -> list[str]:
    """Node-local problems of ``desired`` on ``node``, one clear sentence each ([] = fine).

    Checks: bridge and uplink names are interface names (:data:`NIC_NAME`, the whole name: a
    name with a newline or a NUL is refused before anything reads the node), bridge name at
    most 15 characters (Linux interface name), no other network
    interface on the node already has the bridge's name, each uplink exists on the node, no
    uplink is already a port of another OVS bridge, an uplink is not named like the bridge,
    the requested datapath is usable, and the persistence backend's refusals
    (:meth:`persistence.Backend.inspect`: e.g. another netplan file keeps the uplink's
    addresses, which the bridge would carry after a reboot too).
    """
    return _validate(desired, node)[0]


def _validate(desired: DesiredBridge, node: NodeContext) -> tuple[list[str], tuple[str, ...]]:
    """:func:`validate`'s reasons and the persistence backend's notes."""
    reasons = []
    macs: dict[str, str] = {}
    for name in (desired.name, *desired.uplinks):
        what = "bridge" if name == desired.name else "uplink"
        if not NIC_NAME.fullmatch(name):
            reasons.append(
                f"{what} name {name!r} is not a network interface name (letters, digits, '_', "
                "'.', '-'); nothing is made for it"
            )
        elif len(name) > IFNAMSIZ_MAX:
            fix = "set spec.bridge to a shorter name" if what == "bridge" else "no NIC has it"
            reasons.append(
                f"{what} name {name!r} is {len(name)} characters; Linux interface "
                f"names are at most {IFNAMSIZ_MAX} ({fix})"
            )
    if reasons:  # nothing on the node is read for a name that cannot be an interface's
        return reasons, ()
    if desired.name in desired.uplinks:
        reasons.append(f"uplink {desired.name} has the bridge's own name")
    with links.open_iproute(node.netns) as ipr:
        for u in desired.uplinks:
            st = links.read_link(ipr, u)
            if st is None:
                reasons.append(f"uplink {u} does not exist on node {node.name}")
            else:
                macs[u] = st.mac
        kind = links.link_kind(ipr, desired.name)
    # A link with the bridge's name that OVS did not make (OVS internal ports are "openvswitch"
    # with the kernel datapath, "tun" with netdev) is another device: taking its name would put
    # the node's addresses on it.
    if kind not in (None, *OVS_LINK_KINDS) and ovs.read_bridge(node.ovsdb, desired.name) is None:
        reasons.append(
            f"node {node.name} already has a network interface named {desired.name} "
            f"({kind or 'a physical NIC'}) that is not an OVS bridge; set spec.bridge to another name"
        )
    owners = ovs.interface_bridges(node.ovsdb)
    for u in desired.uplinks:
        other = owners.get(u)
        if other is not None and other != desired.name:
            reasons.append(
                f"uplink {u} is already a port of OVS bridge {other} on node {node.name}"
            )
    if desired.name in owners and owners[desired.name] != desired.name:
        reasons.append(
            f"an interface named {desired.name} is already a port of OVS bridge {owners[desired.name]}"
        )
    try:
        ovs.resolve_datapath(node.ovsdb, desired.datapath_type)
    except ovs.OvsError as exc:
        reasons.append(str(exc))
    findings = persistence.get_backend(desired.persistence, node.root).inspect(
        node.root, desired, macs
    )
    reasons += findings.refusals
    return reasons, findings.notes


# --- plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One change: ``area`` ("ovs", "link", "file", "journal": roll back an interrupted
    enactment) and ``text`` (a sentence for logs)."""

    area: str
    text: str


@dataclass(frozen=True)
class Plan:
    """What :func:`enact` would do. ``invalid``: reasons it would refuse (then nothing else is
    filled); ``changes``; ``files``: node path -> (content, mode) it would write (only files
    whose content differs); ``datapath``: resolved datapath; ``backend``: persistence backend;
    ``stale``: files of ours that exist but are no longer rendered (e.g. the backend changed);
    ``notes``: sentences from the persistence backend that do not block (e.g. competing
    NetworkManager profiles the agent's outrank); they are not changes."""

    bridge: str
    changes: tuple[Change, ...] = ()
    files: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    invalid: tuple[str, ...] = ()
    datapath: str = ""
    backend: str = ""
    stale: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """True when there is nothing to do (and nothing invalid)."""
        return not self.changes and not self.invalid


def _spec(desired: DesiredBridge, datapath: str, cfg: NodeNetConfig) -> ovs.BridgeSpec:
    return ovs.BridgeSpec(
        name=desired.name,
        datapath_type=datapath,
        uplinks=desired.uplinks,
        bond_mode=desired.bond_mode,
        mtu=desired.mtu,
        hwaddr=cfg.mac if desired.move_addresses else None,
    )


def _render(
    desired: DesiredBridge,
    datapath: str,
    cfg: NodeNetConfig,
    root: Path,
    uplink_mtus: Mapping[str, int] | None = None,
) -> tuple[str, dict[str, tuple[str, int]]]:
    backend = persistence.get_backend(desired.persistence, root)
    resolved = dataclasses.replace(desired, datapath_type=datapath)
    files = dict(backend.render(resolved, cfg))
    record = render_record(desired, cfg, uplink_mtus)
    files[record_path(desired.name)] = (record, persistence.FILE_MODE)
    return backend.name, files


def _link_changes(desired: DesiredBridge, obs: Observed, cfg: NodeNetConfig) -> list[Change]:
    out: list[Change] = []
    br = obs.links.get(desired.name)
    for u in desired.uplinks:
        st = obs.links.get(u)
        if st is not None and not st.up:
            out.append(Change("link", f"set {u} up"))
    if br is None or not br.up:
        out.append(Change("link", f"set {desired.name} up"))
    if not desired.move_addresses:
        return out + _give_back_changes(desired, obs, cfg)
    if cfg.mac and (br is None or br.mac != cfg.mac):
        out.append(Change("link", f"set MAC of {desired.name} to {cfg.mac}"))
    have_addrs = br.addresses if br else ()
    have_routes = br.routes if br else ()
    for u in desired.uplinks:
        st = obs.links.get(u)
        if st is None:
            continue
        for a in st.addresses:
            out.append(Change("link", f"move address {a.cidr} from {u} to {desired.name}"))
        for r in st.routes:
            out.append(Change("link", f"move route {links.describe_route(r, u)} to {desired.name}"))
    moved = {a for u in desired.uplinks if obs.links.get(u) for a in obs.links[u].addresses}  # type: ignore[union-attr]
    for a in cfg.addresses:
        if a not in have_addrs and a not in moved:
            out.append(Change("link", f"add recorded address {a.cidr} to {desired.name}"))
    moved_routes = {r for u in desired.uplinks if obs.links.get(u) for r in obs.links[u].routes}  # type: ignore[union-attr]
    for r in cfg.routes:
        if r not in have_routes and r not in moved_routes:
            out.append(
                Change("link", f"add recorded route {links.describe_route(r, desired.name)}")
            )
    return out


def _give_back_changes(desired: DesiredBridge, obs: Observed, cfg: NodeNetConfig) -> list[Change]:
    """moveAddresses false: what goes back from the bridge to the first uplink (what
    :func:`links.restore` moves), and recorded configuration the uplink lacks (replay)."""
    if not cfg.addresses and not cfg.routes:
        return []
    uplink = desired.uplinks[0]
    br = obs.links.get(desired.name)
    first = obs.links.get(uplink)
    out = []
    if br is not None:
        out += [Change("link", f"move address {a.cidr} from {desired.name} back to {uplink}")
                for a in br.addresses]  # fmt: skip
        out += [
            Change("link", f"move route {links.describe_route(r, desired.name)} back to {uplink}")
            for r in br.routes
        ]
    have_addrs = set(first.addresses if first else ()) | set(br.addresses if br else ())
    have_routes = set(first.routes if first else ()) | set(br.routes if br else ())
    out += [Change("link", f"add recorded address {a.cidr} to {uplink}")
            for a in cfg.addresses if a not in have_addrs]  # fmt: skip
    out += [
        Change("link", f"add recorded route {links.describe_route(r, uplink)}")
        for r in cfg.routes
        if r not in have_routes
    ]
    return out


@dataclass(frozen=True)
class _OvsExtra:
    """OVS changes :func:`ovs.ensure_bridge` does not make (it never clears a column):
    ``hwaddr``: clear ``other_config:hwaddr`` (the uplink's MAC the bridge took while
    moveAddresses was true); ``mtu_ifaces``: interfaces whose ``mtu_request`` (set by the agent
    while spec.mtu was set) is cleared; ``texts``: one sentence per change."""

    hwaddr: bool = False
    mtu_ifaces: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()


def _ovs_extra(desired: DesiredBridge, obs: Observed, root: Path) -> _OvsExtra:
    state = obs.bridge
    if state is None or not state.owned:
        return _OvsExtra()
    texts = []
    hwaddr = False
    hw = (state.other_config.get("hwaddr") or "").lower()
    if not desired.move_addresses and hw:
        rec = read_record(root, desired.name)
        first = obs.links.get(desired.uplinks[0])
        taken = {m.lower() for m in (rec.mac if rec else None, first.mac if first else None) if m}
        if hw in taken:
            hwaddr = True
            texts.append(
                f"clear other_config:hwaddr={hw} of bridge {desired.name} (moveAddresses false: "
                f"the MAC stays with {desired.uplinks[0]})"
            )
    ifaces: list[str] = []
    if desired.mtu is None and read_uplink_mtus(root, desired.name):
        for port in state.ports:
            if port.external_ids.get(ovs.BRIDGE_KEY) != desired.name or port.external_ids.get(
                ovs.ROLE_KEY
            ) not in (ovs.ROLE_UPLINK, ovs.ROLE_INTERNAL):
                continue
            for iface in port.interfaces:
                if iface.mtu_request is not None:
                    ifaces.append(iface.name)
                    texts.append(f"clear mtu_request {iface.mtu_request} of {iface.name}")
    return _OvsExtra(hwaddr, tuple(ifaces), tuple(texts))


def _apply_ovs_extra(desired: DesiredBridge, node: NodeContext, extra: _OvsExtra) -> list[str]:
    """Make the changes of ``extra`` in one OVSDB transaction (ovsdbapp db_remove/db_clear)."""
    if not extra.texts:
        return []
    api = node.ovsdb
    try:
        with api.transaction(check_error=True) as txn:
            if extra.hwaddr:
                txn.add(api.db_remove("Bridge", desired.name, "other_config", "hwaddr"))
            for name in extra.mtu_ifaces:
                txn.add(api.db_clear("Interface", name, "mtu_request"))
    except Exception as exc:
        raise ovs.OvsError(f"OVSDB transaction for bridge {desired.name} failed: {exc}") from exc
    return list(extra.texts)


def _mtu_targets(desired: DesiredBridge, root: Path) -> dict[str, int]:
    """spec.mtu unset while the replay record keeps the uplinks' MTUs from before the agent
    changed them: link name -> MTU to set back (each recorded uplink; the bridge's internal
    interface gets the smallest, what OVS gives an internal interface without mtu_request)."""
    if desired.mtu is not None:
        return {}
    mtus = read_uplink_mtus(root, desired.name)
    if not mtus:
        return {}
    return {desired.name: min(mtus.values()), **mtus}


def _mtu_changes(desired: DesiredBridge, obs: Observed, root: Path) -> list[Change]:
    out = []
    for name, mtu in sorted(_mtu_targets(desired, root).items()):
        st = obs.links.get(name)
        if st is not None and st.mtu != mtu:
            out.append(Change("link", f"set MTU of {name} back to {mtu}"))
    return out


def _restore_mtus(desired: DesiredBridge, node: NodeContext) -> list[str]:
    done = []
    targets = _mtu_targets(desired, node.root)
    if not targets:
        return []
    with links.open_iproute(node.netns) as ipr:
        for name in (*sorted(n for n in targets if n != desired.name), desired.name):
            st = links.read_link(ipr, name)
            if st is not None and links.set_mtu(ipr, st, targets[name]):
                done.append(f"set MTU of {name} back to {targets[name]}")
    return done


def _journal_change(desired: DesiredBridge, root: Path) -> str | None:
    """The plan's sentence for an interrupted enactment's journal (None: nothing to undo)."""
    try:
        j = read_journal(root, desired.name)
    except ValueError:
        return None
    if j is None or j.phase == PHASE_PROBED:
        return None
    return (
        f"roll back the change to bridge {j.desired.name} interrupted "
        f"{'during the probe' if j.phase == PHASE_PROBING else 'while changing the node'} "
        f"(journal {journal_path(desired.name)} of {j.started})"
    )


def _plan(desired: DesiredBridge, node: NodeContext) -> tuple[Plan, Observed, NodeNetConfig]:
    interrupted = _journal_change(desired, node.root)
    if interrupted is not None:  # enact rolls back first, whatever the OvsBridge asks now
        return (
            Plan(desired.name, (Change("journal", interrupted),)),
            Observed(None, {}, {}),
            NodeNetConfig(),
        )
    reasons, notes = _validate(desired, node)
    if reasons:
        return Plan(desired.name, invalid=tuple(reasons)), Observed(None, {}, {}), NodeNetConfig()
    datapath = ovs.resolve_datapath(node.ovsdb, desired.datapath_type)
    obs = observe(desired, node)
    cfg = carried_config(desired, obs, node.root)
    backend, files = _render(
        desired, datapath, cfg, node.root, _uplink_mtus(desired, obs, node.root)
    )
    current = dict(obs.files)
    for path in files:
        if path not in current:
            current[path] = persistence.read_file(node.root, path)
    obs = Observed(obs.bridge, obs.links, current)
    changes = [Change("ovs", t) for t in ovs.diff_bridge(obs.bridge, _spec(desired, datapath, cfg))]
    changes += [Change("ovs", t) for t in _ovs_extra(desired, obs, node.root).texts]
    changes += _link_changes(desired, obs, cfg)
    changes += _mtu_changes(desired, obs, node.root)
    to_write = {}
    record = record_path(desired.name)
    for path, (content, mode) in files.items():
        cur = current[path]
        if cur != (content, mode):
            what = "create" if cur is None else ("rewrite edited" if cur[0] != content else "chmod")
            source = "replay record" if path == record else backend
            changes.append(Change("file", f"{what} {path} ({source})"))
            to_write[path] = (content, mode)
    stale = tuple(p for p, cur in current.items() if cur is not None and p not in files)
    changes += [Change("file", f"remove stale {p}") for p in stale]
    return (
        Plan(desired.name, tuple(changes), to_write, (), datapath, backend, stale, notes),
        obs,
        cfg,
    )


def plan(desired: DesiredBridge, node: NodeContext) -> Plan:
    """What :func:`enact` would change on ``node`` (no-op mode: reads only, changes nothing).

    Validation problems come back in ``Plan.invalid``. Raises ovs.OvsError / links.LinkError
    only when the node's state cannot be read.
    """
    return _plan(desired, node)[0]


def format_plan(p: Plan) -> str:
    """Human-readable text of a plan: one line per change, then each file's content."""
    if p.invalid:
        return f"bridge {p.bridge}: invalid\n" + "".join(f"  - {r}\n" for r in p.invalid)
    notes = "".join(f"  note: {n}\n" for n in p.notes)
    if not p.changes:
        return f"bridge {p.bridge}: no change\n{notes}"
    lines = [
        f"bridge {p.bridge} (datapath {p.datapath}, persistence {p.backend}):"
        if p.datapath
        else f"bridge {p.bridge}:"  # an interrupted enactment to roll back first
    ]
    lines += [f"  [{c.area}] {c.text}" for c in p.changes]
    lines += [f"  note: {n}" for n in p.notes]
    for path, (content, mode) in p.files.items():
        lines.append(f"--- {path} (mode {mode:04o})")
        lines += content.rstrip("\n").splitlines()
    return "\n".join(lines) + "\n"


# --- enact / rollback -----------------------------------------------------------------------


@dataclass(frozen=True)
class EnactResult:
    """Outcome of :func:`enact`.

    ``status``: unchanged | changed | invalid | rolled-back | failed; ``changes``: sentences for
    logs (what was done, even if later rolled back); ``files``: node paths written; ``reason``:
    why invalid / rolled back / failed (names the probe: "probe gateway failed: ..."); ``probe``:
    the probe result when probes ran; ``rollback``: sentences of what rollback did;
    ``duration``: seconds.
    """

    bridge: str
    status: str
    changes: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    reason: str | None = None
    probe: probe.ProbeResult | None = None
    rollback: tuple[str, ...] = ()
    duration: float = 0.0

    @property
    def changed(self) -> bool:
        """True when the node was changed and the change stands."""
        return self.status == STATUS_CHANGED


@dataclass(frozen=True)
class _Snapshot:
    bridge: ovs.BridgeState | None
    links: Mapping[str, LinkState | None]
    files: Mapping[str, tuple[str, int] | None]


def _rollback(desired: DesiredBridge, node: NodeContext, snap: _Snapshot) -> list[str]:
    """Put OVS, links and files back exactly as ``snap`` had them."""
    done: list[str] = []
    br_snap = snap.links.get(desired.name)
    with links.open_iproute(node.netns) as ipr:
        if br_snap is None:
            done += links.strip(ipr, desired.name)
        if ovs.restore_bridge(node.ovsdb, desired.name, snap.bridge):
            done.append(
                f"restored OVS bridge {desired.name} ({'deleted' if snap.bridge is None else 'as before'})"
            )
        for u in desired.uplinks:
            st = snap.links.get(u)
            if st is not None:
                done += links.apply_state(ipr, st)
        if br_snap is not None:
            links.wait_for_link(ipr, desired.name, node.link_timeout)
            done += links.apply_state(ipr, br_snap)
    for path, cur in snap.files.items():
        if cur is None:
            if persistence.remove_file(node.root, path):
                done.append(f"removed {path}")
        elif persistence.write_atomic(node.root, path, cur[0], cur[1]):
            done.append(f"restored {path}")
    return done


# --- journal of an enactment in progress ---------------------------------------------------


def journal_path(bridge: str) -> str:
    """Node path of the enactment journal of ``bridge`` (next to its replay record)."""
    return f"{RECORD_DIR}/{bridge}{JOURNAL_SUFFIX}"


@dataclass(frozen=True)
class Journal:
    """An enactment in progress, as :func:`enact` wrote it before its first change.

    ``desired``: what was being enacted; ``phase``: :data:`PHASE_CHANGING`,
    :data:`PHASE_PROBING` or :data:`PHASE_PROBED`; ``started``: UTC time (RFC 3339) of the
    first write; ``snapshot``: the node before the change (OVS bridge rows, links, files).
    """

    desired: DesiredBridge
    phase: str
    started: str
    snapshot: _Snapshot


def _bridge_json(b: ovs.BridgeState | None) -> dict[str, Any] | None:
    return None if b is None else dataclasses.asdict(b)


def _bridge_from_json(d: Mapping[str, Any] | None) -> ovs.BridgeState | None:
    if d is None:
        return None
    return ovs.BridgeState(
        name=d["name"],
        datapath_type=d["datapath_type"],
        external_ids=dict(d["external_ids"]),
        other_config=dict(d["other_config"]),
        ports=tuple(
            ovs.PortState(
                name=p["name"],
                interfaces=tuple(_iface_from_json(i) for i in p["interfaces"]),
                bond_mode=p["bond_mode"],
                external_ids=dict(p["external_ids"]),
                tag=p["tag"],
                trunks=tuple(p["trunks"]),
            )
            for p in d["ports"]
        ),
    )


def _iface_from_json(i: Mapping[str, Any]) -> ovs.InterfaceState:
    return ovs.InterfaceState(
        **{**i, "external_ids": dict(i["external_ids"]), "options": dict(i["options"])}
    )


def _link_from_json(d: Mapping[str, Any] | None) -> LinkState | None:
    if d is None:
        return None
    return LinkState(
        name=d["name"],
        index=int(d["index"]),
        mac=d["mac"],
        mtu=int(d["mtu"]),
        up=bool(d["up"]),
        addresses=tuple(Address(**a) for a in d["addresses"]),
        routes=tuple(Route(**r) for r in d["routes"]),
    )


def render_journal(j: Journal) -> str:
    """The journal file (JSON): ``bridge``, ``phase``, ``started``, ``desired`` (every
    DesiredBridge field) and ``snapshot`` (``bridge``: OVS rows or null, ``links``: name ->
    link state or null, ``files``: node path -> [content, mode] or null)."""
    snap = j.snapshot
    doc = {
        "bridge": j.desired.name,
        "phase": j.phase,
        "started": j.started,
        "desired": _desired_json(j.desired),
        "snapshot": {
            "bridge": _bridge_json(snap.bridge),
            "links": {
                n: (None if st is None else dataclasses.asdict(st)) for n, st in snap.links.items()
            },
            "files": {p: (None if f is None else list(f)) for p, f in snap.files.items()},
        },
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def read_journal(root: Path | str, bridge: str) -> Journal | None:
    """The enactment journal of ``bridge`` under ``root``, or None when there is none.

    Raises ValueError naming the file when it cannot be parsed (it is written atomically, so
    only a hand-edited or foreign file gets there)."""
    found = persistence.read_file(root, journal_path(bridge))
    if found is None:
        return None
    try:
        doc = json.loads(found[0])
        d = dict(doc["desired"])
        d["uplinks"] = tuple(d["uplinks"])
        s = doc["snapshot"]
        snap = _Snapshot(
            _bridge_from_json(s["bridge"]),
            {n: _link_from_json(st) for n, st in s["links"].items()},
            {p: (None if f is None else (str(f[0]), int(f[1]))) for p, f in s["files"].items()},
        )
        phase = doc["phase"]
        if phase not in (PHASE_CHANGING, PHASE_PROBING, PHASE_PROBED):
            raise ValueError(f"unknown phase {phase!r}")
        return Journal(DesiredBridge(**d), phase, str(doc["started"]), snap)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
        # any shape it cannot be: a journal that cannot be read must never stop the agent
        raise ValueError(f"unreadable enactment journal {journal_path(bridge)}: {exc}") from exc


def _write_journal(root: Path, j: Journal, phase: str) -> Journal:
    j = dataclasses.replace(j, phase=phase)
    persistence.write_atomic(root, journal_path(j.desired.name), render_journal(j))
    return j


def _recover(bridge: str, node: NodeContext) -> EnactResult | None:
    """Roll back the enactment of ``bridge`` an earlier run left in its journal.

    None when there is nothing to roll back: no journal, an unreadable one (removed; the
    enactment then re-probes before committing, see :func:`enact`), or phase ``probed`` (the
    probe passed; the journal is removed and the caller finishes the commit). Otherwise the
    node is put back to the journal's snapshot and the journal removed: status
    ``rolled-back``, or ``failed`` (the journal is kept, so the rollback is tried again) when
    rolling back raised."""
    start = time.monotonic()
    try:
        j = read_journal(node.root, bridge)
    except ValueError as exc:
        log.warning("%s; removed (the next enactment re-probes before committing)", exc)
        persistence.remove_file(node.root, journal_path(bridge))
        return None
    if j is None:
        return None
    if j.phase == PHASE_PROBED:
        persistence.remove_file(node.root, journal_path(bridge))
        return None
    what = "during the probe" if j.phase == PHASE_PROBING else "while changing the node"
    where = f"journal {journal_path(bridge)} of {j.started}"
    try:
        undone = _rollback(j.desired, node, j.snapshot)
    except Exception as exc:
        return EnactResult(
            bridge,
            STATUS_FAILED,
            reason=f"an earlier run of the agent was interrupted {what}; rolling back failed: "
            f"{type(exc).__name__}: {exc} ({where}, kept: tried again next time)",
            duration=time.monotonic() - start,
        )
    persistence.remove_file(node.root, journal_path(bridge))
    return EnactResult(
        bridge,
        STATUS_ROLLED_BACK,
        ("rolled back the interrupted change",),
        (),
        f"an earlier run of the agent was interrupted {what}; rolled back to the state before "
        f"the change ({where})",
        None,
        tuple(undone),
        time.monotonic() - start,
    )


def recover_interrupted(node: NodeContext) -> list[EnactResult]:
    """Roll back every enactment an earlier run left unfinished (journals under ``node.root``,
    sorted by bridge name); one :class:`EnactResult` per journal that was rolled back or whose
    rollback failed. For the daemon to call at start, before the reboot replay: it also covers
    bridges whose OvsBridge was renamed or deleted while the agent was down."""
    directory = persistence.node_path(node.root, RECORD_DIR)
    out = []
    for path in sorted(directory.glob(f"*{JOURNAL_SUFFIX}")) if directory.is_dir() else []:
        result = _recover(path.name[: -len(JOURNAL_SUFFIX)], node)
        if result is not None:
            out.append(result)
    return out


def _probe_targets(
    desired: DesiredBridge, node: NodeContext, cfg: NodeNetConfig, obs: Observed
) -> probe.ProbeTargets:
    gateways = [r.gateway for r in cfg.routes if r.is_default and r.gateway]
    if not gateways:
        for st in obs.links.values():
            if st is not None:
                gateways += links.default_gateways(st)
    gateways.sort(key=lambda g: ":" in g)  # IPv4 first
    return probe.ProbeTargets(
        gateway=gateways[0] if gateways else None,
        api_server=node.api_server,
        timeout=desired.probe_timeout,
    )


def _apply_links(desired: DesiredBridge, node: NodeContext, cfg: NodeNetConfig) -> list[str]:
    done: list[str] = []
    with links.open_iproute(node.netns) as ipr:
        for u in desired.uplinks:
            if links.set_up(ipr, links.require_link(ipr, u)):
                done.append(f"set {u} up")
        br = links.wait_for_link(ipr, desired.name, node.link_timeout)
        if not desired.move_addresses:
            if links.set_up(ipr, br):
                done.append(f"set {desired.name} up")
            if cfg.addresses or cfg.routes:  # the agent keeps them: back to the uplink
                done += links.restore(ipr, desired.name, desired.uplinks[0])
                done += links.add_config(ipr, desired.uplinks[0], cfg.addresses, cfg.routes)
            return done
        done += links.takeover(ipr, desired.uplinks[0], desired.name, node.link_timeout)
        for u in desired.uplinks[1:]:
            done += links.move(ipr, u, desired.name)
        done += links.add_config(ipr, desired.name, cfg.addresses, cfg.routes)
    return done


def enact(desired: DesiredBridge, node: NodeContext, *, run_probes: bool = True) -> EnactResult:
    """Make ``node`` match ``desired``; see the module docstring for the order of steps.

    First, an enactment of this bridge that an earlier run left unfinished (its journal, see
    the module docstring) is rolled back: status ``rolled-back`` with the reason "an earlier
    run of the agent was interrupted during the probe; rolled back ...", nothing else done
    (``failed`` when that rollback raised).

    Idempotent: when :func:`plan` is empty, returns status ``unchanged`` and writes nothing.
    Invalid input (:func:`validate`) returns ``invalid`` with the reasons, nothing changed.
    Probes (``run_probes``; gateway ICMP, then API server TCP, within desired.probe_timeout s)
    run when OVS or links change, and also when only files would be written but the replay
    record does not describe this state yet (it was never probed: e.g. a change whose run was
    killed); then a journal of the prior state is written before the first change and removed
    after the commit. When a probe fails or any step raises, everything is rolled back to the
    snapshot taken before the first change and the status is ``rolled-back`` (probe) or
    ``failed``. Persistence files are written only after the probes pass, the replay record
    last.
    """
    start = time.monotonic()
    recovered = _recover(desired.name, node)
    if recovered is not None:
        return recovered
    p, obs, cfg = _plan(desired, node)
    if p.invalid:
        return EnactResult(
            desired.name,
            STATUS_INVALID,
            reason="; ".join(p.invalid),
            duration=time.monotonic() - start,
        )
    if not p.changes:
        return EnactResult(desired.name, STATUS_UNCHANGED, duration=time.monotonic() - start)
    snap = _Snapshot(obs.bridge, obs.links, obs.files)
    record = record_path(desired.name)
    probing = run_probes and (any(c.area != "file" for c in p.changes) or record in p.files)
    journal = Journal(desired, PHASE_CHANGING, _utc_now(), snap) if probing else None
    done: list[str] = []
    written: list[str] = []
    result_probe: probe.ProbeResult | None = None
    try:
        if journal is not None:
            journal = _write_journal(node.root, journal, PHASE_CHANGING)
        done += ovs.ensure_bridge(node.ovsdb, _spec(desired, p.datapath, cfg))
        now = dataclasses.replace(obs, bridge=ovs.read_bridge(node.ovsdb, desired.name))
        done += _apply_ovs_extra(desired, node, _ovs_extra(desired, now, node.root))
        done += _apply_links(desired, node, cfg)
        done += _restore_mtus(desired, node)
        if journal is not None:
            journal = _write_journal(node.root, journal, PHASE_PROBING)
            result_probe = probe.run_probes(_probe_targets(desired, node, cfg, obs), node.netns)
            if not result_probe.ok:
                undone = _rollback(desired, node, snap)
                persistence.remove_file(node.root, journal_path(desired.name))
                return EnactResult(
                    desired.name,
                    STATUS_ROLLED_BACK,
                    tuple(done),
                    (),
                    f"probe {result_probe.failed} failed: {result_probe.detail}; rolled back",
                    result_probe,
                    tuple(undone),
                    time.monotonic() - start,
                )
            journal = _write_journal(node.root, journal, PHASE_PROBED)
        # the replay record last: once it is there, this state counts as probed
        for path, (content, mode) in sorted(p.files.items(), key=lambda kv: kv[0] == record):
            if persistence.write_atomic(node.root, path, content, mode):
                written.append(path)
        for path in p.stale:
            if persistence.remove_file(node.root, path):
                written.append(path)
        if journal is not None:
            persistence.remove_file(node.root, journal_path(desired.name))
    except Exception as exc:  # roll back whatever happened, report the cause
        try:
            undone = _rollback(desired, node, snap)
            if journal is not None:
                persistence.remove_file(node.root, journal_path(desired.name))
        except Exception as exc2:
            undone = [f"rollback failed too: {exc2}"]
        return EnactResult(
            desired.name,
            STATUS_FAILED,
            tuple(done),
            (),
            f"{type(exc).__name__}: {exc}; rolled back",
            result_probe,
            tuple(undone),
            time.monotonic() - start,
        )
    return EnactResult(
        desired.name,
        STATUS_CHANGED,
        tuple(done) + tuple(f"wrote {w}" for w in written) + tuple(f"note: {n}" for n in p.notes),
        tuple(written),
        None,
        result_probe,
        (),
        time.monotonic() - start,
    )


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- remove ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoveResult:
    """Outcome of :func:`remove`: ``status`` removed | absent | blocked | failed; ``reason``
    (why blocked/failed); ``changes`` (sentences); ``files`` (node paths removed)."""

    bridge: str
    status: str
    reason: str | None = None
    changes: tuple[str, ...] = ()
    files: tuple[str, ...] = ()


def removal_blocked(desired: DesiredBridge, node: NodeContext) -> str | None:
    """Why :func:`remove` would refuse to take ``desired``'s bridge off ``node`` (pod ports
    remain, named with their pod UID and interface; or the bridge was not created by the
    agent), or None when it may. Reads only."""
    state = ovs.read_bridge(node.ovsdb, desired.name)
    if state is None:
        return None
    pods = [p for p in state.ports if p.is_pod]
    if pods:
        names = ", ".join(
            f"{p.name} (pod {p.external_ids.get(ovs.POD_UID_KEY, '?')}, "
            f"{p.external_ids.get(ovs.POD_IFACE_KEY, '?')})"
            for p in pods
        )
        return f"bridge {desired.name} still has pod ports: {names}"
    if not state.owned:
        return (
            f"bridge {desired.name} was not created by the underlay agent "
            f"(external_ids {ovs.OWNER_KEY} is not {ovs.OWNER_AGENT})"
        )
    return None


def plan_remove(desired: DesiredBridge, node: NodeContext) -> RemoveResult:
    """What :func:`remove` would do (no-op mode; reads only): status ``blocked`` with the
    reason, ``absent`` when nothing is left, else ``removed`` with the changes it would make
    and the files it would delete."""
    interrupted = _journal_change(desired, node.root)
    reason = removal_blocked(desired, node)
    if reason is not None:
        return RemoveResult(desired.name, STATUS_BLOCKED, reason)
    changes: list[str] = [interrupted] if interrupted else []
    with links.open_iproute(node.netns) as ipr:
        br = links.read_link(ipr, desired.name)
        if br is not None:
            changes += [f"move address {a.cidr} from {desired.name} back to {desired.uplinks[0]}"
                        for a in br.addresses]  # fmt: skip
            changes += [
                f"move route {links.describe_route(r, desired.name)} back to {desired.uplinks[0]}"
                for r in br.routes
            ]
    if ovs.read_bridge(node.ovsdb, desired.name) is not None:
        changes.append(f"delete OVS bridge {desired.name}")
    with links.open_iproute(node.netns) as ipr:
        for u, mtu in sorted(read_uplink_mtus(node.root, desired.name).items()):
            st = links.read_link(ipr, u)
            if st is not None and st.mtu != mtu:
                changes.append(f"set MTU of {u} back to {mtu}")
    files = [p for p in _all_paths(desired, node.root) if persistence.read_file(node.root, p)]
    changes += [f"remove {p}" for p in files]
    status = STATUS_REMOVED if changes else STATUS_ABSENT
    return RemoveResult(desired.name, status, None, tuple(changes), tuple(files))


def remove(desired: DesiredBridge, node: NodeContext) -> RemoveResult:
    """Take ``desired``'s bridge off ``node``: first rolls back an enactment of it an earlier
    run left unfinished (journal; raises the rollback's error, the journal is kept); refuses
    (``blocked``, with the pod ports named) while pod ports remain, or when the bridge was not
    created by the agent (:func:`removal_blocked`); otherwise moves addresses and routes the
    bridge carries back to the first uplink (whatever moveAddresses says now), deletes the
    bridge (one transaction), sets the uplinks' MTUs back to what the replay record says they
    were, and removes the persistence files of every backend and the replay record.
    Idempotent: a node without the bridge or files gives ``absent``."""
    recovered = _recover(desired.name, node)
    if recovered is not None and recovered.status == STATUS_FAILED:
        raise links.LinkError(recovered.reason or "rolling back an interrupted change failed")
    changes: list[str] = list(recovered.rollback) if recovered else []
    reason = removal_blocked(desired, node)
    if reason is not None:
        return RemoveResult(desired.name, STATUS_BLOCKED, reason, tuple(changes))
    mtus = read_uplink_mtus(node.root, desired.name)
    with links.open_iproute(node.netns) as ipr:
        if links.read_link(ipr, desired.uplinks[0]) is not None:
            changes += links.restore(ipr, desired.name, desired.uplinks[0])
    if ovs.delete_bridge(node.ovsdb, desired.name):
        changes.append(f"deleted OVS bridge {desired.name}")
    with links.open_iproute(node.netns) as ipr:
        for u, mtu in sorted(mtus.items()):
            st = links.read_link(ipr, u)
            if st is not None and links.set_mtu(ipr, st, mtu):
                changes.append(f"set MTU of {u} back to {mtu}")
    removed = [p for p in _all_paths(desired, node.root) if persistence.remove_file(node.root, p)]
    changes += [f"removed {p}" for p in removed]
    status = STATUS_REMOVED if changes else STATUS_ABSENT
    return RemoveResult(desired.name, status, None, tuple(changes), tuple(removed))


# --- drift ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drift:
    """One difference between the live node and the desired state.

    ``kind``: bridge-missing | uplink-port-missing | ovs-config | link | file-missing |
    file-edited | interrupted (an enactment journal to roll back) | invalid; ``detail``: a
    sentence.
    """

    kind: str
    detail: str


def drift(desired: DesiredBridge, node: NodeContext) -> list[Drift]:
    """Compare the live node with ``desired`` ([] = in sync), so the daemon can repair with
    :func:`enact`. Reads only."""
    return classify(plan(desired, node))


def classify(p: Plan) -> list[Drift]:
    """The changes of plan ``p`` as drift: one :class:`Drift` per change (``invalid`` ones for
    validation problems); [] for an empty plan."""
    if p.invalid:
        return [Drift("invalid", r) for r in p.invalid]
    out = []
    for c in p.changes:
        if c.area == "ovs":
            if c.text.startswith("create OVS bridge"):
                kind = "bridge-missing"
            elif c.text.startswith(("add uplink port", "add bond port", "set interfaces of port")):
                kind = "uplink-port-missing"
            else:
                kind = "ovs-config"
        elif c.area == "file":
            kind = "file-missing" if c.text.startswith("create ") else "file-edited"
        elif c.area == "journal":
            kind = "interrupted"
        else:
            kind = "link"
        out.append(Drift(kind, c.text))
    return out


# --- watchers -------------------------------------------------------------------------------


class OvsdbWatcher:
    """Calls ``callback(bridge_name)`` when OVSDB rows of a watched bridge change.

    Uses ovsdbapp row events (RowEvent on Bridge/Port/Interface: create, update, delete) on the
    agent's existing connection; ``callback`` runs in ovsdbapp's notify thread (keep it short,
    e.g. queue a repair). ``bridges``: names to watch; ports/interfaces are matched by the
    ``underlay.dev/bridge`` external_id or by name. When the connection to ovsdb-server is made
    again (OVS restarted, database replaced) the IDL drops its rows without row events and
    loads the new database; the Open_vSwitch row it creates then calls back with
    :data:`RECONNECTED`. Call :meth:`stop` to unregister.
    """

    RECONNECTED = "(database reconnected)"

    def __init__(self, api: Any, bridges: Iterable[str], callback: Callable[[str], None]) -> None:
        from ovsdbapp.backend.ovs_idl import event as row_event

        self.api = api
        self.bridges = set(bridges)
        self.callback = callback
        watcher = self

        class _Event(row_event.RowEvent):
            def __init__(self, table: str) -> None:
                super().__init__((self.ROW_CREATE, self.ROW_UPDATE, self.ROW_DELETE), table, None)
                self.event_name = f"underlay-{table}"

            def match_fn(self, event: str, row: Any, old: Any = None) -> bool:
                return watcher._bridge_of(row) is not None

            def run(self, event: str, row: Any, old: Any) -> None:
                name = watcher._bridge_of(row)
                if name is not None:
                    watcher.callback(name)

        class _Reconnected(row_event.RowEvent):
            def __init__(self) -> None:
                super().__init__((self.ROW_CREATE,), "Open_vSwitch", None)
                self.event_name = "underlay-reconnected"

            def run(self, event: str, row: Any, old: Any) -> None:
                watcher.callback(OvsdbWatcher.RECONNECTED)

        self._events = [_Event(t) for t in ("Bridge", "Port", "Interface")] + [_Reconnected()]
        self._handler = self._event_handler(api.idl)
        self._handler.watch_events(self._events)

    @staticmethod
    def _event_handler(idl: Any) -> Any:
        """The IDL's RowEventHandler; a plain ``ovs.db.idl.Idl`` (what ovsdbapp's
        ``OvsdbIdl.from_server`` builds) gets one: its ``notify(event, row, updates)`` hook,
        called for every row change, is pointed at the handler."""
        from ovsdbapp import event as ovsdb_event

        handler = getattr(idl, "notify_handler", None)
        if handler is None:
            handler = ovsdb_event.RowEventHandler()
            idl.notify_handler = handler
            idl.notify = handler.notify
        return handler

    def _bridge_of(self, row: Any) -> str | None:
        ids = getattr(row, "external_ids", {}) or {}
        name = ids.get(ovs.BRIDGE_KEY) or getattr(row, "name", None)
        return name if name in self.bridges else None

    def stop(self) -> None:
        """Unregister the row events."""
        self._handler.unwatch_events(self._events)


class FileWatcher:
    """Calls ``callback(path)`` (node path) when a watched persistence file is created, edited
    or deleted under ``root``; uses watchfiles (inotify) in a daemon thread. :meth:`stop` ends it.
    """

    def __init__(
        self, root: Path | str, paths: Iterable[str], callback: Callable[[str], None]
    ) -> None:
        import watchfiles

        self.root = Path(root)
        self.paths = {str(persistence.node_path(root, p)): p for p in paths}
        dirs = sorted({str(Path(p).parent) for p in self.paths})
        for d in dirs:
            Path(d).mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self.callback = callback

        def loop() -> None:
            for changes in watchfiles.watch(
                *dirs,
                stop_event=self._stop,
                debounce=200,
                step=50,
                rust_timeout=500,
                yield_on_timeout=False,
            ):
                for _change, path in changes:
                    if path in self.paths:
                        self.callback(self.paths[path])

        self._thread = threading.Thread(target=loop, name="underlay-file-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (returns within about half a second)."""
        self._stop.set()
        self._thread.join(timeout=5)


def watched_paths(desired: DesiredBridge, node: NodeContext) -> list[str]:
    """Node paths a :class:`FileWatcher` should watch for ``desired`` (its rendered files)."""
    datapath = ovs.resolve_datapath(node.ovsdb, desired.datapath_type)
    obs = observe(desired, node)
    cfg = carried_config(desired, obs, node.root)
    return sorted(_render(desired, datapath, cfg, node.root)[1])
