"""``underlay-ovs``: attach a pod to an OVS bridge (veth + OVS port + VLAN), ovs-cni semantics.

Config (CNI network config; names as ovs-cni)::

    {"type": "underlay-ovs", "bridge": "br1", "vlan": 10, "trunk": [{"id": 20}, {"minID": 30,
     "maxID": 40}], "mtu": 1500, "ofport_request": 0, "interface_type": "", "mac": "...",
     "ipam": {"type": "underlay-ipam" | any IPAM plugin in CNI_PATH, ...}}

ADD: the bridge must exist and not be one the node agent is still creating or removing (code
11, try again later, naming the bridge and why; :attr:`CniAgent.bridge_gate`); IPAM runs concurrently with the veth creation (random host
name, the peer created directly inside the pod namespace) and the OVSDB transaction that adds
Interface + Port (external_ids, see :mod:`node_agent.cni.ports`) to the bridge; the pod
interface then gets its MAC (``mac``/CNI_ARGS ``MAC``/runtimeConfig ``mac``, else ``0a:58:`` +
the IPv4 octets), the IPs and routes, and is set up. The answer waits for the SpiderEndpoint
write of in-process IPAM and for ovs-vswitchd to take the port (an ofport, within
``PORT_TIMEOUT`` seconds; an ``error`` on the Interface, e.g. ``interface_type: internal`` on a
veth, fails the ADD with 106); the gratuitous ARP per IPv4 goes out right after the answer.
Any failure undoes what was done (port, veth, IP allocation). ``vlan`` > 0
without ``trunk`` makes an access port; ``trunk`` a trunk port; ``vlan`` 0 or absent and no
trunk: untagged (all VLANs).
With ``managed_bridges_only`` (the agent's default) the bridge must be one the node agent made
for an OvsBridge (``external_ids`` ``underlay.dev/owner=agent``; code 112 otherwise). ADD
records the veth it made (:mod:`node_agent.cni.records`: names, ifindexes, MACs).
DEL: finds the port by ``contId`` + ``contIface`` and deletes it, IPAM DEL concurrently; right
after the answer it deletes the host veth ADD recorded, only while a link with that name,
ifindex and MAC is still there (the pod end goes with it), whether or not the port was found
(its port deleted by hand, its bridge deleted), so a later ADD of the same netns/ifname (which
waits for that) does not find it there. It never deletes a link by the name CNI_IFNAME gives,
and never enters CNI_NETNS: another plugin's interface of that name, or the node's own, stays.
A port without a record (made by an agent before records existed) has its host veth, named
by the port, deleted. Tolerates a missing netns/port and repeats.
CHECK: port, veth, pod interface and the prevResult addresses must be present.
Ports of dead pods (an OVS ``error`` on the Interface, or the host veth gone) are purged in
the background after an ADD/DEL, at most once per ``purge_interval``.
Sources: CNI spec 1.0.0; reference/cni-ovs.md (ovs-cni behaviour).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from reconciler.vocab import CNI_IPAM_TYPE

from . import delegate, ports
from .errors import (
    BRIDGE_MISSING,
    BRIDGE_NOT_MANAGED,
    CHECK_FAILED,
    INVALID_CONFIG,
    IO_FAILURE,
    LINK_FAILURE,
    OVS_FAILURE,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    UNSUPPORTED_FIELD,
    CniError,
)
from .podnet import (
    LinkError,
    announce,
    configure_pod_interface,
    create_veth,
    delete_link,
    delete_own_link,
    host_link_names,
    link_exists,
    mac_from_ipv4,
    pod_interface_state,
)
from .records import Attachment
from .request import CniRequest, valid_ifname
from .result import parse

if TYPE_CHECKING:
    from .server import CniAgent

log = logging.getLogger(__name__)

MAX_VLAN = 4095
"""Highest trunk VLAN id (ovs-cni)."""
MAX_ACCESS_VLAN = 4094
"""Highest access VLAN (Spiderpool SpiderMultusConfig ovs.vlan; 4095 is reserved)."""
PORT_TIMEOUT = 5.0
"""Seconds ADD waits for ovs-vswitchd to give the new port an ofport (or report an error)."""
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
"""A unicast or multicast MAC address in lower case, matched against the whole value."""
OWNER_KEY, OWNER_AGENT = "underlay.dev/owner", "agent"
"""The mark the node agent puts on the bridges it makes (:data:`node_agent.ovs.OWNER_KEY`)."""


@dataclass
class OvsNetConf:
    """The validated underlay-ovs config (see module docstring)."""

    bridge: str
    vlan: int | None = None
    trunks: list[int] = field(default_factory=list)
    mtu: int | None = None
    ofport_request: int | None = None
    interface_type: str = ""
    mac: str | None = None
    ipam: dict[str, Any] = field(default_factory=dict)


def _int_field(conf: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    val = conf.get(key)
    if val is None:
        return None
    if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= hi:
        raise CniError(INVALID_CONFIG, f"{key} must be an integer in {lo}..{hi}, got {val!r}")
    return val


def _trunks(value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise CniError(INVALID_CONFIG, "trunk must be a list of {id} or {minID, maxID}")
    out: list[int] = []
    for item in value:
        if not isinstance(item, dict):
            raise CniError(INVALID_CONFIG, f"trunk entry {item!r} is not an object")
        vid = _int_field(item, "id", 0, MAX_VLAN)
        lo = _int_field(item, "minID", 0, MAX_VLAN)
        hi = _int_field(item, "maxID", 0, MAX_VLAN)
        if vid is not None:
            out.append(vid)
        if lo is not None or hi is not None:
            if lo is None or hi is None or lo > hi:
                raise CniError(
                    INVALID_CONFIG, f"trunk range {item!r} needs minID <= maxID, both set"
                )
            out.extend(range(lo, hi + 1))
        if vid is None and lo is None and hi is None:
            raise CniError(INVALID_CONFIG, f"trunk entry {item!r} has neither id nor minID/maxID")
    return sorted(set(out))


def parse_conf(config: dict[str, Any], args: dict[str, str] | None = None) -> OvsNetConf:
    """Validate the underlay-ovs config; raises CniError 7 naming the bad field."""
    bridge = config.get("bridge")
    if not isinstance(bridge, str) or not bridge:
        raise CniError(INVALID_CONFIG, 'underlay-ovs config needs "bridge" (an OVS bridge name)')
    if not valid_ifname(bridge):
        raise CniError(
            INVALID_CONFIG,
            f"bridge {bridge!r} is not an OVS bridge name (its interface name: 1-15 printable "
            "characters, no '/', ':' or whitespace)",
        )
    if config.get("deviceID"):
        raise CniError(UNSUPPORTED_FIELD, "deviceID (OVS hardware offload) is not supported")
    vlan = _int_field(config, "vlan", 0, MAX_ACCESS_VLAN)
    trunks = _trunks(config.get("trunk"))
    mtu = _int_field(config, "mtu", 68, 65535)
    ofport = _int_field(config, "ofport_request", 0, 65279)
    itype = config.get("interface_type") or ""
    if not isinstance(itype, str):
        raise CniError(INVALID_CONFIG, "interface_type must be a string")
    ipam = config.get("ipam") or {}
    if not isinstance(ipam, dict) or (ipam and not isinstance(ipam.get("type"), str)):
        raise CniError(INVALID_CONFIG, 'ipam must be an object with a "type"')
    mac = None
    runtime = config.get("runtimeConfig") or {}
    if not isinstance(runtime, dict):
        raise CniError(INVALID_CONFIG, "runtimeConfig must be an object")
    sources = (
        ("CNI_ARGS MAC", (args or {}).get("MAC")),
        ("runtimeConfig.mac", runtime.get("mac")),
        ("mac", config.get("mac")),
    )
    for where, candidate in sources:
        if candidate in (None, ""):
            continue
        if not isinstance(candidate, str) or not _MAC.fullmatch(candidate.lower()):
            raise CniError(
                INVALID_CONFIG,
                f"{where} {candidate!r} is not a MAC address (six hex pairs, e.g. "
                "0a:58:ac:12:1e:83)",
            )
        mac = candidate.lower()
        if int(mac[:2], 16) & 1:
            raise CniError(
                INVALID_CONFIG,
                f"{where} {candidate!r} is a multicast MAC address (low bit of the first "
                "octet set)",
            )
        break
    return OvsNetConf(
        bridge=bridge,
        vlan=vlan if vlan else None,
        trunks=trunks,
        mtu=mtu,
        ofport_request=ofport or None,
        interface_type=itype,
        mac=mac,
        ipam=ipam,
    )


# --- IPAM delegation ------------------------------------------------------------------------
def _ipam_add(
    agent: CniAgent, req: CniRequest, conf: OvsNetConf
) -> tuple[dict[str, Any] | None, Future[None] | None]:
    """IPAM ADD: ``(result, pending)``; ``pending`` (in-process IPAM only) is the
    SpiderEndpoint write still running, to be waited for before answering."""
    if not conf.ipam:
        return None, None
    if conf.ipam["type"] == CNI_IPAM_TYPE:
        from . import ipam_plugin

        return ipam_plugin.allocate_begin(agent, req)
    return delegate.exec_plugin(conf.ipam["type"], "ADD", req.env, req.stdin, req.path), None


def _ipam_del(agent: CniAgent, req: CniRequest, conf: OvsNetConf) -> None:
    if not conf.ipam:
        return
    if conf.ipam["type"] == CNI_IPAM_TYPE:
        from . import ipam_plugin

        ipam_plugin.release(agent, req)
        return
    delegate.exec_plugin(conf.ipam["type"], "DEL", req.env, req.stdin, req.path)


def _ipam_check(agent: CniAgent, req: CniRequest, conf: OvsNetConf) -> None:
    if not conf.ipam:
        return
    if conf.ipam["type"] == CNI_IPAM_TYPE:
        from . import ipam_plugin

        ipam_plugin.verify(agent, req)
        return
    delegate.exec_plugin(conf.ipam["type"], "CHECK", req.env, req.stdin, req.path)


# --- port bookkeeping -----------------------------------------------------------------------
OwnLink = tuple[str, "int | None", "str | None"]
"""A host link to delete: name, and the ifindex and MAC ADD recorded (None: not recorded)."""


def _own_links(rec: Attachment | None, found: list[ports.PodPort]) -> list[OwnLink]:
    """The host veths of one attachment: the recorded one, and those of ports without a record
    (made by an agent before records existed: known by the port's name only)."""
    out: list[OwnLink] = []
    if rec is not None:
        out.append((rec.host, rec.host_index, rec.host_mac))
    out += [(p.name, None, None) for p in found if rec is None or p.name != rec.host]
    return out


def _delete_own(agent: CniAgent, links: list[OwnLink], what: str) -> None:
    """Delete these host links (a veth takes its pod end along), each only while it is still
    the link ADD made (:func:`~node_agent.cni.podnet.delete_own_link`)."""
    for name, index, mac in links:
        if index is None or mac is None:
            delete_link(name, agent.host_netns)
        elif not delete_own_link(name, index, mac, agent.host_netns):
            log.info("%s: veth %s (ifindex %d, %s) is gone or is another link now: left alone",
                     what, name, index, mac)  # fmt: skip


def _release(agent: CniAgent, container_id: str, ifname: str, *, what: str) -> None:
    """Remove what an earlier ADD of this container and interface made: its ports, its veth
    (as recorded), its record. Used by a retried ADD before it starts again."""
    rec = agent.records.load(container_id, ifname)
    found = ports.find_pod_ports(agent.ovs, contId=container_id, contIface=ifname)
    if found:
        ports.detach_ports(agent.ovs, [p.name for p in found])
    _delete_own(agent, _own_links(rec, found), what)
    agent.records.remove(container_id, ifname)


def purge_error_ports(agent: CniAgent) -> list[str]:
    """Delete our ports whose pod is gone: an OVS ``error`` on the Interface, or no host veth.

    ovs-vswitchd sets ``error`` on such ports after a restart ("could not open network
    device"); with the userspace (netdev) datapath it does not notice a vanished veth at all,
    so a port whose host veth no longer exists is dead too (ADD creates the veth before the
    port, DEL removes the port before the veth). Returns the purged port names. Errors are
    logged, never raised (opportunistic).
    """
    try:
        records = list(agent.records.all())  # before the dump: an ADD saves after its veth exists
        owned = ports.find_pod_ports(agent.ovs)
        present = host_link_names(agent.host_netns)
        for rec in records:  # records whose veth is gone (the pod died without a DEL)
            if rec.host not in present:
                agent.records.remove(rec.container_id, rec.ifname)
        stale = [p for p in owned if p.errors or p.name not in present]
        if stale:
            ports.detach_ports(agent.ovs, [p.name for p in stale])
            log.info("purged stale pod ports %s", [(p.name, p.errors) for p in stale])
            for p in stale:  # a port vswitchd refused leaves its veth behind: delete it too
                if p.name in present:
                    delete_link(p.name, agent.host_netns)
        return [p.name for p in stale]
    except Exception:
        log.exception("purging stale pod ports failed")
        return []


def purge_soon(agent: CniAgent) -> None:
    """Run :func:`purge_error_ports` in the background: one run at a time, and at most once
    per ``agent.purge_interval`` seconds."""
    now = time.monotonic()
    if now - agent.last_purge < agent.purge_interval:
        return
    agent.last_purge = now
    agent.background("purge-pod-ports", lambda: purge_error_ports(agent))


# --- commands -------------------------------------------------------------------------------
def _attach_confirmed(
    agent: CniAgent, conf: OvsNetConf, host: str, ext: dict[str, str]
) -> ports.PodPort:
    """Add the port (one OVSDB transaction), then wait up to ``PORT_TIMEOUT`` seconds for
    ovs-vswitchd to take it: an ofport, or an ``error`` on the Interface.

    Raises ports.BridgeMissing, CniError 106 when vswitchd reports an error (the message
    carries it), 11 when it does not answer in time.
    """
    ports.attach_port(
        agent.ovs,
        conf.bridge,
        host,
        ext,
        tag=conf.vlan,
        trunks=conf.trunks,
        interface_type=conf.interface_type,
        ofport_request=conf.ofport_request,
        wait=False,
    )
    seen = ports.wait_ofport(agent.ovs, host, timeout=PORT_TIMEOUT)
    if seen is None:
        raise CniError(
            TRY_AGAIN_LATER,
            f"ovs-vswitchd did not take port {host} on bridge {conf.bridge} within "
            f"{PORT_TIMEOUT:g} s (is ovs-vswitchd running on node {agent.node_name}?)",
        )
    if seen.errors or not any(o > 0 for o in seen.ofports):
        kind = f" (interface_type {conf.interface_type})" if conf.interface_type else ""
        raise CniError(
            OVS_FAILURE,
            f"ovs-vswitchd refused port {host}{kind} on bridge {conf.bridge}: "
            + ("; ".join(seen.errors) or f"ofport {list(seen.ofports)}"),
        )
    return seen


def _announce(netns: str, ifname: str, mac: str, ipv4s: list[str]) -> None:
    """Send the gratuitous ARPs (after the ADD answer; the port is in place by then)."""
    if ipv4s:
        announce(netns, ifname, mac, ipv4s)


def cmd_add(agent: CniAgent, req: CniRequest) -> dict[str, Any]:
    """CNI ADD; returns the result (1.0.0 shape). Raises CniError; undoes partial work.

    IPAM runs concurrently with the veth and port creation (the pod MAC, derived from the
    IPv4, is set when the pod interface is configured). The gratuitous ARPs go out after
    the answer, once ovs-vswitchd has the port.
    """
    conf = parse_conf(req.config, req.args)
    if req.netns_id is None:
        agent.check_netns(req)  # Refused 4: not a network namespace, or the node's own
    if req.netns_id is None:
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {req.netns} does not exist")
    ovs = agent.ovs
    try:
        bridge_ids = ports.bridge_external_ids(ovs, conf.bridge)
        # a retried ADD (runtime restarted mid-way) replaces what the first try left
        agent.wait_deferred((req.netns, req.ifname))
        _release(agent, req.container_id, req.ifname, what=f"ADD {req.describe()}")
    except CniError:
        raise
    except LinkError as exc:
        raise CniError(LINK_FAILURE, str(exc)) from exc
    except Exception as exc:  # ovsdbapp timeouts, a lost connection
        raise CniError(
            TRY_AGAIN_LATER,
            f"OVSDB {agent.ovsdb_remote or 'of the agent'} on node {agent.node_name}: "
            f"{type(exc).__name__}: {exc}",
        ) from exc
    if bridge_ids is None:
        raise CniError(
            BRIDGE_MISSING,
            f"OVS bridge {conf.bridge} does not exist on node {agent.node_name} "
            f"(OVSDB {agent.ovsdb_remote or 'of the agent'})",
        )
    if agent.managed_bridges_only and bridge_ids.get(OWNER_KEY) != OWNER_AGENT:
        raise CniError(
            BRIDGE_NOT_MANAGED,
            f"OVS bridge {conf.bridge} on node {agent.node_name} was not made by the underlay "
            "agent for an OvsBridge, and the agent attaches pods only to its own bridges "
            "(agent option --no-cni-managed-bridges-only allows any bridge)",
        )
    # after the existence check: a bridge being created exists only once its creation began
    unready = agent.bridge_gate(conf.bridge) if agent.bridge_gate is not None else None
    if unready:
        raise CniError(
            TRY_AGAIN_LATER,
            f"OVS bridge {conf.bridge} on node {agent.node_name} is not ready for pods: "
            f"{unready}; try again later",
        )

    ipam_future = agent.executor.submit(_ipam_add, agent, req, conf)
    attach_future: Future[ports.PodPort] | None = None
    host: str | None = None
    try:
        try:
            veth = create_veth(req.netns, req.ifname, mtu=conf.mtu, host_netns=agent.host_netns)
            host, host_mac = veth.host, veth.mac
        except LinkError as exc:
            raise CniError(LINK_FAILURE, str(exc)) from exc
        ext = {
            ports.EXT_OWNER: ports.OWNER,
            ports.EXT_CONTAINER_ID: req.container_id,
            ports.EXT_NETNS: req.netns,
            ports.EXT_IFNAME: req.ifname,
            ports.EXT_POD_UID: req.pod_uid,
            ports.EXT_POD: f"{req.pod_namespace}/{req.pod_name}" if req.pod_name else "",
        }
        # the OVS port and the pod side are independent once the veth exists
        attach_future = agent.executor.submit(_attach_confirmed, agent, conf, host, ext)
        result, recorded = ipam_future.result()
        ipam_result = result or {"ips": [], "routes": [], "dns": {}}
        ips = ipam_result.get("ips", [])
        v4 = [ip["address"].split("/")[0] for ip in ips if ":" not in ip["address"]]
        mac = conf.mac or (mac_from_ipv4(v4[0]) if v4 else None)
        try:
            _, pod_mac = configure_pod_interface(
                req.netns,
                req.ifname,
                ips,
                ipam_result.get("routes", []),
                mac=mac,
                index=veth.peer_index,
            )
        except (LinkError, OSError) as exc:
            raise CniError(LINK_FAILURE, str(exc)) from exc
        record = Attachment(
            container_id=req.container_id,
            ifname=req.ifname,
            netns=req.netns,
            netns_id=req.netns_id,
            host=host,
            host_index=veth.ifindex,
            host_mac=host_mac,
            pod_index=veth.peer_index,
            pod_mac=pod_mac,
            bridge=conf.bridge,
        )
        try:
            agent.records.save(record)  # what DEL will delete, and only that
        except OSError as exc:
            raise CniError(
                IO_FAILURE,
                f"cannot record veth {host} in {agent.records.directory}: {exc.strerror or exc}",
            ) from exc
        if recorded is not None:
            recorded.result()  # the SpiderEndpoint is written before we answer
        try:
            attach_future.result()
        except ports.BridgeMissing as exc:
            raise CniError(
                BRIDGE_MISSING,
                f"OVS bridge {conf.bridge} does not exist on node {agent.node_name}",
            ) from exc
        except CniError:
            raise
        except Exception as exc:
            raise CniError(
                OVS_FAILURE, f"adding port {host} to bridge {conf.bridge}: {exc}"
            ) from exc
    except BaseException:
        started: list[Future[Any]] = [ipam_future]
        if attach_future is not None:
            started.append(attach_future)
        wait(started)
        with contextlib.suppress(Exception):
            if attach_future is not None and host:  # added, even if vswitchd refused it
                ports.detach_ports(ovs, [host])
        with contextlib.suppress(Exception):
            if host:
                delete_own_link(host, veth.ifindex, host_mac, agent.host_netns)
        with contextlib.suppress(Exception):
            agent.records.remove(req.container_id, req.ifname)
        if ipam_future.exception() is None:
            try:
                _ipam_del(agent, req, conf)
            except Exception:
                log.exception("IPAM rollback of %s failed", req.describe())
        raise
    agent.background(f"announce:{host}", lambda: _announce(req.netns, req.ifname, pod_mac, v4))
    purge_soon(agent)
    return {
        "interfaces": [
            {"name": host, "mac": host_mac},
            {"name": req.ifname, "mac": pod_mac, "sandbox": req.netns},
        ],
        "ips": [{**ip, "interface": 1} for ip in ips],
        "routes": ipam_result.get("routes", []),
        "dns": ipam_result.get("dns", {}),
    }


def _delete_links(agent: CniAgent, links: list[OwnLink], req: CniRequest) -> None:
    """DEL's link cleanup, after the answer: the host veths ADD made (as recorded), then the
    record."""
    _delete_own(agent, links, f"DEL {req.describe()}")
    agent.records.remove(req.container_id, req.ifname)


def _why(exc: BaseException) -> str:
    if isinstance(exc, CniError):
        return exc.msg
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def cmd_del(agent: CniAgent, req: CniRequest) -> None:
    """CNI DEL: remove port, veth and IP allocation; succeeds when they are already gone.

    Raises CniError only to report a partial cleanup (the server still exits 0 for DEL).
    """
    problems: list[str] = []
    try:
        conf: OvsNetConf | None = parse_conf(req.config, req.args)
    except CniError as exc:
        conf = None
        problems.append(f"config: {exc.msg}")
    ipam_future = agent.executor.submit(_ipam_del, agent, req, conf) if conf else None
    rec = agent.records.load(req.container_id, req.ifname)
    found: list[ports.PodPort] = []
    try:
        found = ports.find_pod_ports(agent.ovs, contId=req.container_id, contIface=req.ifname)
        ports.detach_ports(agent.ovs, [p.name for p in found])
    except Exception as exc:
        problems.append(f"OVS port: {_why(exc)}")
    # the veth ADD made goes whether or not the port was found (deleted by hand, bridge
    # deleted, OVSDB unreachable), so a retried ADD in the same netns does not find its pod end
    # there; after the answer. Nothing is deleted by CNI_IFNAME's name in CNI_NETNS.
    links = _own_links(rec, found)
    if links or rec is not None:
        agent.defer((req.netns, req.ifname), partial(_delete_links, agent, links, req))
    if ipam_future is not None:
        try:
            ipam_future.result()
        except Exception as exc:
            problems.append(f"IPAM: {_why(exc)}")
    purge_soon(agent)
    if problems:
        raise CniError(OVS_FAILURE, "; ".join(problems))


def cmd_check(agent: CniAgent, req: CniRequest) -> None:
    """CNI CHECK: the port (no OVS error), host veth, pod interface and prevResult IPs exist."""
    conf = parse_conf(req.config, req.args)
    prev = req.config.get("prevResult")
    if not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult in the config")
    found = ports.find_pod_ports(agent.ovs, contId=req.container_id, contIface=req.ifname)
    if not found:
        raise CniError(CHECK_FAILED, f"no OVS port for container {req.container_id} {req.ifname}")
    port = found[0]
    if port.bridge != conf.bridge:
        raise CniError(
            CHECK_FAILED, f"port {port.name} is on bridge {port.bridge}, not {conf.bridge}"
        )
    if port.errors:
        raise CniError(CHECK_FAILED, f"port {port.name} has OVS errors: {'; '.join(port.errors)}")
    if not link_exists(port.name, agent.host_netns):
        raise CniError(CHECK_FAILED, f"host veth {port.name} is missing on node {agent.node_name}")
    try:
        state = pod_interface_state(req.netns, req.ifname)
    except (OSError, LinkError) as exc:
        raise CniError(CHECK_FAILED, f"cannot read {req.ifname} in {req.netns}: {exc}") from exc
    if state is None:
        raise CniError(CHECK_FAILED, f"{req.ifname} is missing in {req.netns}")
    prev_result = parse(prev, who="prevResult")
    for ip in prev_result["ips"]:
        if ip["address"] not in state["addresses"]:
            raise CniError(CHECK_FAILED, f"{ip['address']} is not on {req.ifname} in {req.netns}")
    if conf.mtu and state["mtu"] != conf.mtu:
        raise CniError(CHECK_FAILED, f"{req.ifname} has MTU {state['mtu']}, config says {conf.mtu}")
    _ipam_check(agent, req, conf)
