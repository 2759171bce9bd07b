"""SpiderIPPool arithmetic shared by the validator, the planner and the agent's IPAM.

Spiderpool writes pool addresses as lists of single IPs or ``first-last`` ranges
(``172.18.30.131-172.18.30.140``); ``status.allocatedIPs`` is a JSON *string* mapping each IP to
``{"pod": "<ns>/<name>", "podUid": "<uid>"}`` (reference/spiderpool.md). Everything here works
on netaddr objects and plain dicts; nothing talks to the cluster.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from typing import Any

import netaddr

from reconciler import vocab


class PoolSyntaxError(ValueError):
    """An ``ips``/``excludeIPs`` entry is not an IP or a ``first-last`` range (message names it)."""


def parse_entry(entry: str) -> netaddr.IPRange:
    """One ``ips`` entry -> an IPRange (a single IP is a range of one).

    Raises PoolSyntaxError for a malformed address, mixed families or ``first > last``.
    """
    text = str(entry).strip()
    first, sep, last = text.partition("-")
    try:
        a = netaddr.IPAddress(first.strip())
        b = netaddr.IPAddress(last.strip()) if sep else a
    except (netaddr.AddrFormatError, ValueError) as exc:
        raise PoolSyntaxError(f"{text!r} is not an IP address or a first-last range") from exc
    if a.version != b.version:
        raise PoolSyntaxError(f"{text!r} mixes IPv{a.version} and IPv{b.version}")
    if a > b:
        raise PoolSyntaxError(f"{text!r}: first address is above the last ({b}-{a}?)")
    return netaddr.IPRange(a, b)


def ipset(entries: Iterable[str] | None) -> netaddr.IPSet:
    """Union of ``ips``-style entries. Raises PoolSyntaxError on the first bad entry."""
    s = netaddr.IPSet()
    for e in entries or ():
        s.add(parse_entry(e))
    return s


def allocatable(spec: Mapping[str, Any]) -> netaddr.IPSet:
    """IPs a pool may hand out: ``ips`` minus ``excludeIPs`` (Spiderpool's totalIPCount)."""
    return ipset(spec.get("ips")) - ipset(spec.get("excludeIPs"))


def allocated_ips(status: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Decode ``status.allocatedIPs`` (a JSON string, absent when empty) into ``{ip: record}``.

    Raises ValueError when it is not a JSON object of objects.
    """
    raw = (status or {}).get("allocatedIPs")
    if not raw:
        return {}
    data = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError("status.allocatedIPs is not a JSON object of allocation records")
    return {str(k): dict(v) for k, v in data.items()}


@functools.lru_cache(maxsize=16384)
def canonical_ip(text: str) -> tuple[int, int] | None:
    """``(version, integer value)`` of a canonical IP address string (``str(IPAddress(text))
    == text``), None for anything else.

    Cached: an agent parses the same ``status.allocatedIPs`` keys at every allocation from a
    pool (thousands of them; netaddr takes microseconds per address).
    """
    try:
        addr = netaddr.IPAddress(text)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return None
    if str(addr) != text:
        return None
    return addr.version, int(addr)


def _address_order(text: str) -> tuple[int, int]:
    key = canonical_ip(text)
    if key is not None:
        return key
    addr = netaddr.IPAddress(text)  # raises for a key that is no address, as before
    return addr.version, int(addr)


def encode_allocated(records: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Encode allocation records the way Spiderpool stores them (None when empty).

    Keys are sorted by address so the string is stable for a given set of records.
    """
    if not records:
        return None
    ordered = {ip: dict(records[ip]) for ip in sorted(records, key=_address_order)}
    return json.dumps(ordered, separators=(",", ":"))


def pool_status(
    spec: Mapping[str, Any], records: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The status Spiderpool shows for a pool with allocation ``records``.

    ``{"allocatedIPs": <JSON string, absent when empty>, "allocatedIPCount": n,
    "totalIPCount": len(ips - excludeIPs)}``. ``totalIPCount`` is capped at
    ``vocab.MAX_SAFE_INTEGER``: an IPv6 pool can cover 2^64 addresses, more than the API server
    stores and JSON clients read exactly, and such a count would make every status write fail.
    """
    status: dict[str, Any] = {
        "allocatedIPCount": len(records),
        "totalIPCount": min(allocatable(spec).size, vocab.MAX_SAFE_INTEGER),
    }
    encoded = encode_allocated(records)
    if encoded is not None:
        status["allocatedIPs"] = encoded
    return status
