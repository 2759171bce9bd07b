"""CNI results in the version a config asks for, and parsing results of other plugins.

Internally a result is a dict in the CNI 1.0.0 shape::

    {"interfaces": [{"name", "mac", "sandbox"?}],
     "ips": [{"address": "172.18.30.131/16", "gateway"?: "172.18.0.1", "interface"?: 1}],
     "routes": [{"dst": "0.0.0.0/0", "gw"?: "172.18.0.1"}],
     "dns": {...}}

:func:`render` turns it into the JSON of one of ``CNI_SUPPORTED_VERSIONS``: 1.0.0 as is;
0.3.0, 0.3.1 and 0.4.0 add ``"version": "4"|"6"`` to each IP (those versions' IPConfig).
:func:`parse` accepts any of them (e.g. Debian's host-local output) and returns the 1.0.0 shape.
Sources: CNI spec 1.0.0 section "Result"; CNI spec 0.4.0 / 0.3.1 "Result" sections.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from reconciler.vocab import CNI_DEFAULT_VERSION, CNI_SUPPORTED_VERSIONS

from .errors import DECODE_FAILURE, INCOMPATIBLE_VERSION, CniError

_VERSIONED_IPS = ("0.3.0", "0.3.1", "0.4.0")


def check_version(config: dict[str, Any]) -> str:
    """Return the config's ``cniVersion`` (default 1.0.0 when absent).

    Raises CniError code 1 (incompatible version) naming the version and the supported ones.
    """
    version = config.get("cniVersion", CNI_DEFAULT_VERSION)
    if version not in CNI_SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f"config is {version!r}, plugin supports {list(CNI_SUPPORTED_VERSIONS)}",
        )
    return str(version)


def ip_family(address: str) -> str:
    """``"4"`` or ``"6"`` for an address with or without prefix."""
    return "6" if ":" in address else "4"


def render(result: dict[str, Any], version: str) -> dict[str, Any]:
    """The result as CNI ``version`` JSON (a new dict; ``result`` is not changed).

    Keys with empty values (no interfaces, no routes) are left out, as libcni does, except
    ``dns`` which is always present.
    """
    out: dict[str, Any] = {"cniVersion": version}
    if result.get("interfaces"):
        out["interfaces"] = [dict(i) for i in result["interfaces"]]
    ips = []
    for ip in result.get("ips", []):
        item = {k: v for k, v in ip.items() if k != "version"}
        if version in _VERSIONED_IPS:
            item = {"version": ip_family(ip["address"]), **item}
        ips.append(item)
    if ips:
        out["ips"] = ips
    if result.get("routes"):
        out["routes"] = [dict(r) for r in result["routes"]]
    out["dns"] = dict(result.get("dns") or {})
    return out


def render_json(result: dict[str, Any], version: str) -> bytes:
    """:func:`render` as the bytes printed on stdout."""
    return json.dumps(render(result, version)).encode() + b"\n"


def parse(data: bytes | str | dict[str, Any], who: str = "result") -> dict[str, Any]:
    """Parse a result of any supported version into the 1.0.0 shape.

    ``who`` names the producer in errors (e.g. ``"host-local"``). Raises CniError code 6 when
    the bytes are not a JSON object, or when an entry is malformed (an IP that is not an
    address in CIDR form, a gateway or route that is not an address, a list item that is not
    an object); the message names the field, e.g. ``host-local: ips[0].address``.
    """
    if isinstance(data, dict):
        obj = data
    else:
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise CniError(DECODE_FAILURE, f"cannot decode {who}: {exc}") from exc
    if not isinstance(obj, dict):
        raise CniError(DECODE_FAILURE, f"cannot decode {who}: not a JSON object")
    for key in ("interfaces", "ips", "routes"):
        items = obj.get(key) or []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise CniError(DECODE_FAILURE, f"{who}: {key} is not a list of objects")
    if not isinstance(obj.get("dns") or {}, dict):
        raise CniError(DECODE_FAILURE, f"{who}: dns is not an object")
    for i, ip in enumerate(obj.get("ips") or []):
        _check_address(who, f"ips[{i}].address", ip.get("address"), cidr=True)
        if ip.get("gateway") is not None:
            _check_address(who, f"ips[{i}].gateway", ip["gateway"], cidr=False)
    for i, route in enumerate(obj.get("routes") or []):
        _check_address(who, f"routes[{i}].dst", route.get("dst"), cidr=True)
        if route.get("gw") is not None:
            _check_address(who, f"routes[{i}].gw", route["gw"], cidr=False)
    out: dict[str, Any] = {
        "interfaces": [dict(i) for i in obj.get("interfaces") or []],
        "ips": [{k: v for k, v in ip.items() if k != "version"} for ip in obj.get("ips") or []],
        "routes": [dict(r) for r in obj.get("routes") or []],
        "dns": dict(obj.get("dns") or {}),
    }
    return out


def _check_address(who: str, field: str, value: Any, *, cidr: bool) -> None:
    ok = isinstance(value, str) and (not cidr or "/" in value)
    if ok:
        try:
            (ipaddress.ip_interface if cidr else ipaddress.ip_address)(value)
        except ValueError:
            ok = False
    if not ok:
        form = "an IP address in CIDR form" if cidr else "an IP address"
        raise CniError(DECODE_FAILURE, f"{who}: {field} {value!r} is not {form}")


def version_reply() -> dict[str, Any]:
    """The VERSION answer (CNI spec 1.0.0, "VERSION")."""
    return {"cniVersion": CNI_DEFAULT_VERSION, "supportedVersions": list(CNI_SUPPORTED_VERSIONS)}
