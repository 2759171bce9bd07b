"""Semantic rules of SpiderIPPool (Spiderpool 1.2.x, reference/spiderpool.md), with netaddr.

Per pool: canonical subnet of unicast addresses (not loopback, multicast, link-local,
unspecified or IPv4-mapped), ipVersion against the subnet, every ``ips``/``excludeIPs`` entry a
valid IP or ``first-last`` range (first <= last) inside the subnet, no IPv4 network or
broadcast address handed out, gateway inside the subnet, not the network or broadcast address
and not allocatable unless excluded, routes (no default route, canonical dst of the pool's
family, gw inside the subnet and not a pod address, no duplicate dst, a warning for a route to
the pool's own subnet), at most 5000 allocatable addresses (Spiderpool's record limit, a
warning), multusName syntax and references.
Across pools: subnets of one family overlap only when identical; no address is allocatable
from two pools; no pool's gateway or route gw is an address another pool hands out. Two
documents that duplicate one object are never compared with each other (``duplicate-object``
reports them once).

Addresses are written as Spiderpool (Go ``net.ParseIP``) reads them: no spaces, no zone, no
leading zeros; a canonical CIDR is what Go's ``net.IPNet.String()`` prints (RFC 5952 for IPv6).
"""

from __future__ import annotations

import bisect
import difflib
import heapq
from typing import Any

import netaddr

from reconciler import vocab
from reconciler.loader import MAX_SAFE_INTEGER, WARNING, Document, Problem, format_path
from reconciler.rules_common import (
    Context,
    PoolInfo,
    check_dns1123,
    check_label_selector,
    duplicates,
)

Path = tuple[str | int, ...]

MAX_POOL_RECORDS = vocab.MAX_POOL_RECORDS
"""Allocation records one SpiderIPPool holds: Spiderpool's SPIDERPOOL_IPPOOL_MAX_ALLOCATED_IPS
default (pkg/ippoolmanager/config.go ``defaultMaxAllocatedIPs``); the node agent's IPAM keeps
the same limit."""

RESERVED_BLOCKS: tuple[tuple[netaddr.IPNetwork, str], ...] = tuple(
    (netaddr.IPNetwork(cidr), what)
    for cidr, what in (
        ("0.0.0.0/8", "unspecified ('this network', RFC 1122)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "the limited broadcast address"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::ffff:0:0/96", "IPv4-mapped (RFC 4291 2.5.5.2; write the IPv4 subnet instead)"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    )
)
"""Address blocks a pod subnet may not touch: pods cannot be given these addresses on a link."""


def parse_ip(text: str) -> netaddr.IPAddress | None:
    """An IP address in Go ``net.ParseIP`` syntax, or None."""
    if not text or text != text.strip() or "%" in text:
        return None
    try:
        return netaddr.IPAddress(text)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return None


def parse_cidr(text: str) -> netaddr.IPNetwork | None:
    """A CIDR ``address/prefix`` (prefix required), or None."""
    addr, slash, prefix = text.partition("/")
    if not slash or not prefix.isdigit() or parse_ip(addr) is None:
        return None
    try:
        return netaddr.IPNetwork(text)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return None


def canonical(net: netaddr.IPNetwork) -> str:
    """``net`` as Go prints a parsed CIDR: network address (host bits cleared)/prefix."""
    return str(net.cidr)


Span = tuple[int, int, int]
"""(IP version, first, last) of a run of addresses, integers as netaddr gives them."""


def merge_spans(spans: list[Span]) -> list[Span]:
    """Sorted, merged spans (adjacent and overlapping runs joined)."""
    out: list[Span] = []
    for v, a, b in sorted(spans):
        if out and out[-1][0] == v and a <= out[-1][2] + 1:
            if b > out[-1][2]:
                out[-1] = (v, out[-1][1], b)
        else:
            out.append((v, a, b))
    return out


def subtract_spans(spans: list[Span], minus: list[Span]) -> list[Span]:
    """``spans`` without the addresses of ``minus`` (both merged, as from merge_spans)."""
    out: list[Span] = []
    for v, a, b in spans:
        for mv, ma, mb in minus:
            if mv != v or mb < a or ma > b:
                continue
            if ma > a:
                out.append((v, a, ma - 1))
            a = mb + 1
            if a > b:
                break
        if a <= b:
            out.append((v, a, b))
    return out


def span_contains(spans: list[Span], version: int, value: int) -> bool:
    """Whether merged ``spans`` hold the address ``value`` of ``version``."""
    i = bisect.bisect_right(spans, (version, value, 1 << 130)) - 1
    return i >= 0 and spans[i][0] == version and spans[i][1] <= value <= spans[i][2]


def _family(version: int) -> str:
    return f"IPv{version}"


def _parse_entry(doc: Document, path: Path, text: Any) -> tuple[Span | None, list[Problem]]:
    """One ``ips``/``excludeIPs`` entry -> (version, first, last), or the problems it has."""
    if not isinstance(text, str):
        return None, []
    first, dash, last = text.partition("-")
    a = parse_ip(first)
    b = parse_ip(last) if dash else a
    if a is None or b is None:
        hint = "write one address like 172.18.30.131 or a range like 172.18.30.131-172.18.30.140"
        if text != text.replace(" ", ""):
            hint = f"write {text.replace(' ', '')} (no spaces)"
        return None, [
            doc.problem(
                path,
                rule="ip-invalid",
                message=f'"{text}" is not an IP address or a first-last range',
                hint=hint,
            )
        ]
    if a.version != b.version:
        return None, [
            doc.problem(
                path,
                rule="ip-invalid",
                message=f'range "{text}" mixes IPv{a.version} and IPv{b.version}',
                hint="write both ends in the pool's family",
            )
        ]
    if a > b:
        return None, [
            doc.problem(
                path,
                rule="range-reversed",
                message=f'range "{text}" starts above its end',
                hint=f"write {b}-{a}",
            )
        ]
    return (a.version, int(a), int(b)), []


def _in_subnet(
    doc: Document, path: Path, text: str, r: Span, net: netaddr.IPNetwork
) -> list[Problem]:
    version, first, last = r
    if version != net.version:
        return [
            doc.problem(
                path,
                rule="ip-outside-subnet",
                message=f'"{text}" is an {_family(version)} address but subnet {canonical(net)} '
                f"is {_family(net.version)}",
                hint=f"use addresses inside {canonical(net)}",
            )
        ]
    if first >= net.first and last <= net.last:
        return []
    return [
        doc.problem(
            path,
            rule="ip-outside-subnet",
            message=f'"{text}" is outside subnet {canonical(net)}',
            hint=f"use addresses inside {canonical(net)}",
        )
    ]


def _duplicates(
    doc: Document, field: str, entries: list[Any], valid: list[tuple[Span, int]]
) -> list[Problem]:
    """Entries of one list that share addresses (``ip-duplicate``), on the later entry."""
    out: list[Problem] = []
    widest: tuple[Span, int] | None = None
    for span, i in sorted(valid):
        if widest is not None and widest[0][0] == span[0] and span[1] <= widest[0][2]:
            j = widest[1]
            later, earlier = (i, j) if i > j else (j, i)
            out.append(
                doc.problem(
                    ("spec", field, later),
                    rule="ip-duplicate",
                    severity=WARNING,
                    message=f'"{entries[later]}" overlaps "{entries[earlier]}" '
                    f"({format_path(('spec', field, earlier))}) of the same pool",
                    hint="list each address once",
                )
            )
        if widest is None or widest[0][0] != span[0] or span[2] > widest[0][2]:
            widest = (span, i)
    return out


def check_pool(doc: Document, ctx: Context) -> list[Problem]:
    """Per-pool rules; records a :class:`PoolInfo` in ``ctx.pool_info`` for the cross checks."""
    info = PoolInfo(doc)
    ctx.pool_info[id(doc)] = info
    spec = doc.get(("spec",))
    if not isinstance(spec, dict):
        return []
    out: list[Problem] = []
    net: netaddr.IPNetwork | None = None
    subnet = spec.get("subnet")
    if isinstance(subnet, str):
        net = parse_cidr(subnet)
        if net is None:
            out.append(
                doc.problem(
                    ("spec", "subnet"),
                    rule="subnet-invalid",
                    message=f'"{subnet}" is not a CIDR (address/prefix length)',
                    hint="write a network like 172.18.0.0/16",
                )
            )
        elif canonical(net) != subnet:
            why = "host bits are set" if net.ip != net.network else "not in canonical form"
            out.append(
                doc.problem(
                    ("spec", "subnet"),
                    rule="subnet-not-canonical",
                    message=f'"{subnet}" is not a canonical CIDR: {why}',
                    hint=f"write {canonical(net)}",
                )
            )
    version = spec.get("ipVersion")
    if net is not None and version in (4, 6) and version != net.version:
        out.append(
            doc.problem(
                ("spec", "ipVersion"),
                rule="ip-version-mismatch",
                message=f"ipVersion {version} does not match subnet {canonical(net)} "
                f"({_family(net.version)})",
                hint=f"write ipVersion: {net.version}, or leave it out",
            )
        )
    if net is not None:
        out += _check_reserved(doc, net.cidr)
    info.net = net.cidr if net is not None else None
    info.family = net.version if net is not None else (version if version in (4, 6) else None)

    spans: dict[str, list[Span]] = {}
    for field in ("ips", "excludeIPs"):
        entries = spec.get(field)
        s: list[Span] = []
        if not isinstance(entries, list):
            continue
        valid: list[tuple[Span, int]] = []
        for i, text in enumerate(entries):
            path = ("spec", field, i)
            r, problems = _parse_entry(doc, path, text)
            out += problems
            if r is None:
                continue
            if net is not None:
                bad = _in_subnet(doc, path, str(text), r, net)
                out += bad
                if bad:
                    continue
            valid.append((r, i))
            s.append(r)
            if field == "ips":
                info.entries.append((path, r))
        out += _duplicates(doc, field, entries, valid)
        spans[field] = merge_spans(s)
    spans.setdefault("ips", [])
    spans.setdefault("excludeIPs", [])
    info.allocatable = subtract_spans(spans["ips"], spans["excludeIPs"])
    if net is not None:
        out += _check_network_broadcast(doc, spec, info, net.cidr)
    out += _check_size(doc, spec, info)

    gateway = spec.get("gateway")
    if isinstance(gateway, str):
        gw = parse_ip(gateway)
        if gw is None:
            out.append(
                doc.problem(
                    ("spec", "gateway"),
                    rule="ip-invalid",
                    message=f'gateway "{gateway}" is not an IP address',
                    hint="write one address such as 172.18.0.1",
                )
            )
        elif net is not None and gw not in net:
            out.append(
                doc.problem(
                    ("spec", "gateway"),
                    rule="gateway-outside-subnet",
                    message=f"gateway {gateway} is outside subnet {canonical(net)}",
                    hint=f"use an address inside {canonical(net)}",
                )
            )
        elif net is not None and (edge := _network_or_broadcast(net.cidr, int(gw))):
            host = net.cidr.first + 1 if edge == "network" else net.cidr.last - 1
            out.append(
                doc.problem(
                    ("spec", "gateway"),
                    rule="gateway-network-or-broadcast",
                    message=f"gateway {gateway} is the {edge} address of subnet "
                    f"{canonical(net)}, not a router's address",
                    hint=f"write the router's host address, e.g. {netaddr.IPAddress(host, 4)}",
                )
            )
        elif span_contains(spans["ips"], gw.version, int(gw)) and not span_contains(
            spans["excludeIPs"], gw.version, int(gw)
        ):
            entry = next(
                (
                    spec["ips"][p[2]]
                    for p, r in info.entries
                    if r[0] == gw.version and r[1] <= int(gw) <= r[2]
                ),
                "",
            )
            out.append(
                doc.problem(
                    ("spec", "gateway"),
                    rule="gateway-allocatable",
                    message=f'gateway {gateway} is inside ips ("{entry}") and not excluded, '
                    "so a pod could get it",
                    hint=f"add {gateway} to excludeIPs, or take it out of ips",
                )
            )
        if gw is not None and (net is None or gw in net):
            info.gateway = gw
    out += _check_routes(doc, spec.get("routes"), net, info)
    out += _check_multus_names(doc, ctx, spec.get("multusName"))
    for key, what, label in (
        ("nodeName", "node name", False),
        ("namespaceName", "namespace", True),
    ):
        names = spec.get(key)
        for i, value in enumerate(names if isinstance(names, list) else []):
            out += check_dns1123(doc, ("spec", key, i), value, what, label=label)
    for selector in ("podAffinity", "namespaceAffinity", "nodeAffinity"):
        out += check_label_selector(doc, ("spec", selector), spec.get(selector))
    return out


def _check_reserved(doc: Document, net: netaddr.IPNetwork) -> list[Problem]:
    """``subnet-reserved``: the subnet touches a block of :data:`RESERVED_BLOCKS`."""
    for block, what in RESERVED_BLOCKS:
        if block.version != net.version or block.last < net.first or net.last < block.first:
            continue
        inside = net.first >= block.first and net.last <= block.last
        why = f"is {what}" if inside else f"contains {block} ({what})"
        example = "172.18.0.0/16" if net.version == 4 else "fd00:18::/64"
        return [
            doc.problem(
                ("spec", "subnet"),
                rule="subnet-reserved",
                message=f"subnet {net} {why}: pods cannot use these addresses on a network",
                hint=f"use a unicast subnet of the network the pods attach to, e.g. {example}",
            )
        ]
    return []


def _network_or_broadcast(net: netaddr.IPNetwork, value: int) -> str | None:
    """The word "network" or "broadcast" when ``value`` is that address of IPv4 ``net``
    (prefix <= 30; /31 and /32 have neither, RFC 3021), else None."""
    if net.version != 4 or net.prefixlen > 30:
        return None
    if value == net.first:
        return "network"
    if value == net.last:
        return "broadcast"
    return None


def _check_network_broadcast(
    doc: Document, spec: dict[str, Any], info: PoolInfo, net: netaddr.IPNetwork
) -> list[Problem]:
    """``ip-network-or-broadcast``: an allocatable IPv4 network or broadcast address."""
    if net.version != 4 or net.prefixlen > 30:
        return []
    out: list[Problem] = []
    for edge, value in (("network", net.first), ("broadcast", net.last)):
        if not span_contains(info.allocatable, 4, value):
            continue
        addr = netaddr.IPAddress(value, 4)
        for path, (v, first, last) in info.entries:
            if v != 4 or not first <= value <= last:
                continue
            text = spec["ips"][path[2]]
            if first == last:
                message = f'"{text}" is the {edge} address of subnet {net}'
                hint = f"remove it, or add {addr} to excludeIPs"
            elif edge == "network":
                message = f'"{text}" includes {addr}, the network address of subnet {net}'
                hint = f"start the range at {netaddr.IPAddress(value + 1, 4)}, or add {addr} to excludeIPs"
            else:
                message = f'"{text}" includes {addr}, the broadcast address of subnet {net}'
                hint = f"end the range at {netaddr.IPAddress(value - 1, 4)}, or add {addr} to excludeIPs"
            out.append(
                doc.problem(
                    path,
                    rule="ip-network-or-broadcast",
                    message=message + "; hosts on the subnet do not take it for a pod's address",
                    hint=hint,
                )
            )
            break
    return out


def _check_size(doc: Document, spec: dict[str, Any], info: PoolInfo) -> list[Problem]:
    """``pool-too-large``: more allocatable addresses than a pool keeps records for."""
    total = sum(b - a + 1 for _v, a, b in info.allocatable)
    if total <= MAX_POOL_RECORDS:
        return []
    message = (
        f"ips minus excludeIPs hold {total} addresses, but a SpiderIPPool keeps at most "
        f"{MAX_POOL_RECORDS} allocation records, so the rest is never handed out"
    )
    if total > MAX_SAFE_INTEGER:
        message += (
            f"; totalIPCount is also capped at {MAX_SAFE_INTEGER} (2^53-1), the largest count "
            "JSON clients read exactly"
        )
    return [
        doc.problem(
            ("spec", "ips"),
            rule="pool-too-large",
            severity=WARNING,
            message=message,
            hint=f"narrow ips to at most {MAX_POOL_RECORDS} addresses, or split the range into "
            "several pools",
            at_key=True,
        )
    ]


def _check_routes(
    doc: Document, routes: Any, net: netaddr.IPNetwork | None, info: PoolInfo
) -> list[Problem]:
    family = info.family
    if not isinstance(routes, list):
        return []
    out: list[Problem] = []
    seen: dict[str, int] = {}
    for i, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        dst = route.get("dst")
        if isinstance(dst, str):
            path = ("spec", "routes", i, "dst")
            d = parse_cidr(dst)
            if d is None:
                out.append(
                    doc.problem(
                        path,
                        rule="route-invalid",
                        message=f'route dst "{dst}" is not a CIDR',
                        hint="write a network like 10.10.0.0/16",
                    )
                )
            elif d.prefixlen == 0:
                out.append(
                    doc.problem(
                        path,
                        rule="route-default",
                        message=f"route dst {dst} is a default route",
                        hint="set spec.gateway instead of a default route",
                    )
                )
            elif family is not None and d.version != family:
                out.append(
                    doc.problem(
                        path,
                        rule="route-invalid",
                        message=f"route dst {dst} is {_family(d.version)} but the pool is "
                        f"{_family(family)}",
                        hint=f"write an {_family(family)} destination",
                    )
                )
            elif canonical(d) != dst:
                out.append(
                    doc.problem(
                        path,
                        rule="route-invalid",
                        message=f'route dst "{dst}" is not a canonical CIDR',
                        hint=f"write {canonical(d)}",
                    )
                )
            else:
                if dst in seen:
                    out.append(
                        doc.problem(
                            path,
                            rule="route-duplicate",
                            message=f"route dst {dst} is already in spec.routes[{seen[dst]}]",
                            hint="keep one route per destination",
                        )
                    )
                else:
                    seen[dst] = i
                if net is not None and d.cidr == net.cidr:
                    out.append(
                        doc.problem(
                            path,
                            rule="route-to-own-subnet",
                            severity=WARNING,
                            message=f"route dst {dst} is the pool's own subnet: pods reach "
                            "it on-link through the route their address brings, and a second "
                            "route to it through a gateway conflicts with that one",
                            hint="remove this route",
                        )
                    )
        gw_text = route.get("gw")
        if isinstance(gw_text, str):
            path = ("spec", "routes", i, "gw")
            gw = parse_ip(gw_text)
            if gw is None:
                out.append(
                    doc.problem(
                        path,
                        rule="route-invalid",
                        message=f'route gw "{gw_text}" is not an IP address',
                        hint="write one address inside the subnet",
                    )
                )
            elif net is not None and gw not in net:
                out.append(
                    doc.problem(
                        path,
                        rule="route-gateway-outside-subnet",
                        message=f"route gw {gw_text} is outside subnet {canonical(net)}",
                        hint=f"use a next hop inside {canonical(net)}",
                    )
                )
            else:
                info.route_gws.append((path, gw))
    return out


def parse_multus_name(entry: str) -> tuple[str, str] | None:
    """``namespace/name`` or ``name`` (= ``kube-system/name``, Spiderpool) -> (ns, name)."""
    ns, slash, name = entry.partition("/")
    if not slash:
        ns, name = vocab.SYSTEM_NAMESPACE, entry
    if not ns or not name or "/" in name:
        return None
    return ns, name


def _check_multus_names(doc: Document, ctx: Context, names: Any) -> list[Problem]:
    if not isinstance(names, list):
        return []
    out: list[Problem] = []
    for i, entry in enumerate(names):
        if not isinstance(entry, str):
            continue
        path = ("spec", "multusName", i)
        key = parse_multus_name(entry)
        if key is None:
            out.append(
                doc.problem(
                    path,
                    rule="multus-name-invalid",
                    message=f'multusName "{entry}" is not name or namespace/name',
                    hint="write e.g. kube-system/ovs-conf",
                )
            )
        elif key not in ctx.nads:
            known = sorted(f"{ns}/{name}" for ns, name in ctx.nads)
            close = difflib.get_close_matches(f"{key[0]}/{key[1]}", known, n=1, cutoff=0.8)
            out.append(
                doc.problem(
                    path,
                    rule="multus-config-not-found",
                    severity=WARNING,
                    message=f"no SpiderMultusConfig in {ctx.scope} renders {key[0]}/{key[1]}",
                    hint=(f"did you mean {close[0]}? " if close else "check the name; ")
                    + ctx.outside_note("that Multus config"),
                )
            )
    return out


def check_overlaps(ctx: Context) -> list[Problem]:
    """Cross-pool rules ``subnet-overlap`` and ``ip-overlap`` (call after :func:`check_pool`)."""
    infos = [ctx.pool_info[id(d)] for d in ctx.documents if id(d) in ctx.pool_info]
    return _subnet_overlaps(infos) + _ip_overlaps(infos)


def _where(doc: Document, path: Path) -> str:
    line, col = doc.mark(path)
    return f"{doc.path}:{line}:{col}"


def _subnet_overlaps(infos: list[PoolInfo]) -> list[Problem]:
    out: list[Problem] = []
    for family in (4, 6):
        by_net: dict[str, list[PoolInfo]] = {}
        for info in infos:
            if info.net is not None and info.net.version == family:
                by_net.setdefault(str(info.net), []).append(info)
        nets = sorted(by_net, key=lambda n: (by_net[n][0].net.first, by_net[n][0].net.prefixlen))
        stack: list[str] = []
        for n in nets:
            net = by_net[n][0].net
            while stack and by_net[stack[-1]][0].net.last < net.first:
                stack.pop()
            if stack:
                outer = by_net[stack[-1]][0]
                for info in by_net[n]:
                    if duplicates(info.doc, outer.doc):
                        continue
                    out.append(
                        info.doc.problem(
                            ("spec", "subnet"),
                            rule="subnet-overlap",
                            message=f"subnet {n} overlaps subnet {stack[-1]} of {outer.doc.ref()} "
                            f"({_where(outer.doc, ('spec', 'subnet'))})",
                            hint=f"use subnet {stack[-1]} here too, or a subnet that does not overlap",
                        )
                    )
            stack.append(n)
    return out


def _ip_overlaps(infos: list[PoolInfo]) -> list[Problem]:
    """Pairs of pools whose allocatable sets intersect; reported on the later pool."""
    order = {id(info): i for i, info in enumerate(infos)}
    out: list[Problem] = []
    for family in (4, 6):
        ranges: list[tuple[int, int, int]] = []  # (first, last, pool index)
        for i, info in enumerate(infos):
            for v, a, b in info.allocatable or ():
                if v == family:
                    ranges.append((a, b, i))
        ranges.sort()
        active: list[tuple[int, int, int]] = []  # heap of (last, first, pool index)
        pairs: dict[tuple[int, int], tuple[int, int]] = {}
        for first, last, i in ranges:
            while active and active[0][0] < first:
                heapq.heappop(active)
            for a_last, a_first, j in active:
                if j != i:
                    key = (min(i, j), max(i, j))
                    lo, hi = max(first, a_first), min(last, a_last)
                    if key not in pairs:
                        pairs[key] = (lo, hi)
            heapq.heappush(active, (last, first, i))
        for (i, j), (lo, hi) in sorted(pairs.items()):
            earlier, later = infos[i], infos[j]
            if duplicates(earlier.doc, later.doc):
                continue
            if order[id(earlier)] > order[id(later)]:
                earlier, later = later, earlier
            path = next(
                (p for p, r in later.entries if r[1] <= hi and lo <= r[2]),
                ("spec", "ips"),
            )
            other = next(
                (p for p, r in earlier.entries if r[1] <= hi and lo <= r[2]),
                ("spec", "ips"),
            )
            lo_ip, hi_ip = netaddr.IPAddress(lo, family), netaddr.IPAddress(hi, family)
            shared_text = str(lo_ip) if lo == hi else f"{lo_ip}-{hi_ip}"
            out.append(
                later.doc.problem(
                    path,
                    rule="ip-overlap",
                    message=f'"{later.doc.get(path)}" overlaps "{earlier.doc.get(other)}" of '
                    f"{earlier.doc.ref()} ({_where(earlier.doc, other)}) at {shared_text}",
                    hint="give each pool its own addresses, or add the shared ones to excludeIPs",
                )
            )
    return out


class _SpanIndex:
    """Allocatable spans of every pool, for point lookups (spans of two pools may overlap when
    ``ip-overlap`` is reported, so a lookup scans back while a running maximum of span ends
    still reaches the point: O(log n) when pools are disjoint)."""

    def __init__(self, infos: list[PoolInfo]) -> None:
        rows = sorted((v, a, b, k) for k, info in enumerate(infos) for v, a, b in info.allocatable)
        self.keys = [(v, a) for v, a, _b, _k in rows]
        self.rows = rows
        self.reach: list[tuple[int, int]] = []
        best = (0, -1)
        for v, _a, b, _k in rows:
            best = max(best, (v, b)) if best[0] == v else (v, b)
            self.reach.append(best)

    def owners(self, version: int, value: int) -> list[int]:
        """Indexes of the pools whose allocatable spans hold ``value`` (of ``version``)."""
        i = bisect.bisect_right(self.keys, (version, value)) - 1
        found: list[int] = []
        while i >= 0 and self.reach[i][0] == version and self.reach[i][1] >= value:
            v, a, b, k = self.rows[i]
            if v == version and a <= value <= b:
                found.append(k)
            i -= 1
        return sorted(set(found))


def check_addresses_across_pools(ctx: Context) -> list[Problem]:
    """``gateway-in-other-pool`` and ``route-gateway-allocatable`` (after :func:`check_pool`).

    A gateway that another pool hands out would be given to a pod by IPAM (pods of this pool
    then send their traffic to that pod); a route gw that any pool hands out, this one
    included, likewise. Duplicates of one object are not compared with each other.
    """
    infos = [ctx.pool_info[id(d)] for d in ctx.documents if id(d) in ctx.pool_info]
    if not infos:
        return []
    index = _SpanIndex(infos)
    out: list[Problem] = []
    for info in infos:
        doc = info.doc
        gw = info.gateway
        if gw is not None:
            for k in index.owners(gw.version, int(gw)):
                other = infos[k]
                if other is info or duplicates(doc, other.doc):
                    continue
                path = _entry_path(other, gw.version, int(gw))
                out.append(
                    doc.problem(
                        ("spec", "gateway"),
                        rule="gateway-in-other-pool",
                        message=f"gateway {gw} is an address {other.doc.ref()} hands to pods "
                        f'("{other.doc.get(path)}" at {_where(other.doc, path)}); IPAM would '
                        "give this pool's gateway to a pod",
                        hint=f"add {gw} to the excludeIPs of {other.doc.name}, or take it out of "
                        "its ips",
                    )
                )
                break
        for path, rgw in info.route_gws:
            for k in index.owners(rgw.version, int(rgw)):
                other = infos[k]
                if other is not info and duplicates(doc, other.doc):
                    continue
                opath = _entry_path(other, rgw.version, int(rgw))
                whose = (
                    "this pool" if other is info else other.doc.ref()
                ) + f' ("{other.doc.get(opath)}" at {_where(other.doc, opath)})'
                out.append(
                    doc.problem(
                        path,
                        rule="route-gateway-allocatable",
                        message=f"route gw {rgw} is an address {whose} hands to pods, not a "
                        "router's",
                        hint=f"write the router's address, or add {rgw} to the excludeIPs of "
                        + ("this pool" if other is info else str(other.doc.name)),
                    )
                )
                break
    return out


def _entry_path(info: PoolInfo, version: int, value: int) -> Path:
    """Path of the ``ips`` entry of ``info`` holding ``value`` (``spec.ips`` if none)."""
    return next(
        (p for p, (v, a, b) in info.entries if v == version and a <= value <= b),
        ("spec", "ips"),
    )
