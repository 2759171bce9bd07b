"""One CNI invocation decoded from the shim's request (environment + stdin).

Everything is checked before any handler runs (:func:`decode_request`): the environment must
be UTF-8, CNI_CONTAINERID what the spec allows, CNI_IFNAME a Linux interface name, the
``K8S_POD_*`` arguments Kubernetes names, and the config a JSON object of bounded nesting.
Every refusal is a :class:`~node_agent.cni.errors.CniError` with the spec's code (4, 6, 7, 1)
naming the variable or field; such a request is answered as an error whatever the command,
DEL included (:class:`Refused`).

Source: CNI spec 1.0.0, "Parameters" (CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME,
CNI_ARGS, CNI_PATH) and "Network configuration"; Kubernetes API conventions (object names:
DNS-1123 subdomains, namespaces: DNS-1123 labels; k8s.io/apimachinery validation).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import DECODE_FAILURE, INVALID_CONFIG, INVALID_ENV, CniError
from .result import check_version

MAX_COLLECTIONS = 10_000
"""Most JSON objects and arrays (``{`` plus ``[``) a network config may hold; a real one has a
few dozen. With it, a parsed config takes at most about 12 bytes per byte of input (strings
and numbers); empty objects would take 24."""

CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
"""CNI_CONTAINERID (CNI spec 1.0.0 "Parameters": an alphanumeric, then alphanumerics, ``_``,
``.``, ``-``); matched against the whole value."""
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
POD_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
"""K8S_POD_UID: a Kubernetes UID (a UUID; letters, digits and ``-``), at most 64 characters."""


class Refused(CniError):
    """A request refused as given (malformed, or naming what it may not): answered as an error
    for every command. Other DEL failures exit 0 with a note (DEL must not fail on what is
    already gone), a refused DEL exits 1: nothing was done."""


COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")
_REQUIRED = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "VERSION": (),
}


@dataclass
class CniRequest:
    """A decoded CNI call.

    ``args`` is CNI_ARGS split into a dict (``K8S_POD_NAMESPACE``, ``K8S_POD_NAME``,
    ``K8S_POD_UID``...), ``path`` the CNI_PATH directories, ``config`` the network config
    object, ``stdin`` its raw bytes (passed unchanged to delegated plugins), ``env`` every
    CNI_* variable received, ``version`` the config's cniVersion (checked).
    """

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    path: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    stdin: bytes = b""
    env: dict[str, str] = field(default_factory=dict)
    version: str = "1.0.0"
    netns_id: tuple[int, int] | None = None
    """``(st_dev, st_ino)`` of CNI_NETNS once the server checked it (None: missing or unset)."""

    @property
    def plugin_type(self) -> str:
        """The config's ``type``."""
        return str(self.config.get("type", ""))

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def pod_uid(self) -> str:
        return self.args.get("K8S_POD_UID", "")

    def describe(self) -> str:
        """``ADD container=<id> ifname=<if> pod=<ns>/<name>`` for logs and messages."""
        pod = f" pod={self.pod_namespace}/{self.pod_name}" if self.pod_name else ""
        return f"{self.command} container={self.container_id} ifname={self.ifname}{pod}"


def valid_ifname(name: str) -> bool:
    """Linux ``dev_valid_name()``: 1-15 bytes, not ``.``/``..``, no ``/``, ``:`` or whitespace;
    and printable UTF-8 (no control characters: the name goes into logs, OVSDB and results)."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        return False
    if not name or size > 15 or name in (".", "..") or not name.isprintable():
        return False
    return not any(c in "/:" or c.isspace() for c in name)


def k8s_args_problem(args: dict[str, str]) -> str | None:
    """Why the ``K8S_POD_*`` values of CNI_ARGS are not Kubernetes names, or None.

    K8S_POD_NAMESPACE: a DNS-1123 label (at most 63 characters); K8S_POD_NAME: a DNS-1123
    subdomain (at most 253); K8S_POD_UID: :data:`POD_UID`; K8S_POD_INFRA_CONTAINER_ID:
    :data:`CONTAINER_ID`. Each is matched against the whole value, so ``..``, a ``/`` or a
    trailing newline never reach an API path."""
    checks = (
        ("K8S_POD_NAMESPACE", DNS1123_LABEL, 63, "a DNS-1123 label (a Kubernetes namespace)"),
        ("K8S_POD_NAME", DNS1123_SUBDOMAIN, 253, "a DNS-1123 subdomain (a Kubernetes pod name)"),
        ("K8S_POD_UID", POD_UID, 64, "a Kubernetes UID (letters, digits, '-')"),
        ("K8S_POD_INFRA_CONTAINER_ID", CONTAINER_ID, 1024, "a container ID"),
    )
    for key, pattern, limit, what in checks:
        value = args.get(key)
        if not value:
            continue
        if len(value) > limit or not pattern.fullmatch(value):
            shown = repr(value) if len(value) <= 80 else repr(value[:80]) + "..."
            return f"CNI_ARGS {key}={shown} is not {what}"
    return None


def parse_cni_args(value: str) -> dict[str, str]:
    """Split CNI_ARGS ``K=V;K=V`` into a dict; raises CniError 4 on an element without ``=``."""
    out: dict[str, str] = {}
    for item in value.split(";"):
        if not item:
            continue
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, f"CNI_ARGS: invalid element {item!r} (expected K=V)")
        out[key] = val
    return out


def decode_env_block(block: bytes) -> dict[str, str]:
    """Decode the shim's ``KEY=VALUE\\0`` list; raises Refused 6 when an entry has no ``=``,
    4 when a variable is not UTF-8 (naming it)."""
    env: dict[str, str] = {}
    for entry in block.split(b"\0"):
        if not entry:
            continue
        key, sep, val = entry.partition(b"=")
        if not sep:
            raise Refused(DECODE_FAILURE, f"malformed environment entry {entry[:40]!r}")
        try:
            env[key.decode()] = val.decode()
        except UnicodeDecodeError:
            name = key.decode(errors="backslashreplace")
            raise Refused(
                INVALID_ENV, f"{name}={val[:40]!r} is not UTF-8 (CNI parameters are text)"
            ) from None
    return env


def decode_request(env: dict[str, str], stdin: bytes) -> CniRequest:
    """Build and validate a CniRequest from the CNI_* environment and the stdin bytes.

    Raises Refused 4 (missing/invalid environment: CNI_CONTAINERID, CNI_IFNAME, the
    ``K8S_POD_*`` of CNI_ARGS), 6 (config is not a JSON object, holds more than
    :data:`MAX_COLLECTIONS` objects and arrays or is nested too deeply), 7 (config without ``type``), 1 (unsupported cniVersion).
    """
    try:
        return _decode(env, stdin)
    except Refused:
        raise
    except CniError as exc:
        raise Refused(exc.code, exc.msg, exc.details) from exc


def _decode(env: dict[str, str], stdin: bytes) -> CniRequest:
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(
            INVALID_ENV,
            f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}"
            if command
            else "CNI_COMMAND is not set",
        )
    missing = [k for k in _REQUIRED[command] if not env.get(k)]
    if missing:
        raise CniError(INVALID_ENV, f"{command} requires {', '.join(missing)} to be set")
    cid = env.get("CNI_CONTAINERID", "")
    if cid and not CONTAINER_ID.fullmatch(cid):
        shown = repr(cid) if len(cid) <= 80 else repr(cid[:80]) + "..."
        raise CniError(
            INVALID_ENV,
            f"CNI_CONTAINERID {shown} is not a container ID (CNI spec: a letter or digit, then "
            "letters, digits, '_', '.' or '-')",
        )
    req = CniRequest(
        command=command,
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
        args=parse_cni_args(env.get("CNI_ARGS", "")),
        path=[p for p in env.get("CNI_PATH", "").split(":") if p],
        stdin=stdin,
        env=dict(env),
    )
    if command == "VERSION":
        return req
    why = k8s_args_problem(req.args)
    if why:
        raise CniError(INVALID_ENV, why)
    if stdin.count(b"{") + stdin.count(b"[") > MAX_COLLECTIONS:
        raise CniError(
            DECODE_FAILURE,
            f"network config on stdin holds more than {MAX_COLLECTIONS} JSON objects and arrays",
        )
    try:
        config = json.loads(stdin)
    except RecursionError:
        raise CniError(DECODE_FAILURE, "network config on stdin is nested too deeply") from None
    except ValueError as exc:
        raise CniError(DECODE_FAILURE, f"network config on stdin is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CniError(DECODE_FAILURE, "network config on stdin is not a JSON object")
    req.config = config
    req.version = check_version(config)
    if not isinstance(config.get("type"), str) or not config["type"]:
        raise CniError(INVALID_CONFIG, 'network config has no "type"')
    if not valid_ifname(req.ifname):
        raise CniError(
            INVALID_ENV,
            f"CNI_IFNAME {req.ifname!r} is not a valid interface name (1-15 bytes of printable "
            "UTF-8, not '.' or '..', no '/', ':' or whitespace)",
        )
    return req
