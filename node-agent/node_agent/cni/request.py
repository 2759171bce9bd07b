"""One CNI invocation decoded from the shim's request (environment + stdin).

Source: CNI spec 1.0.0, "Parameters" (CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME,
CNI_ARGS, CNI_PATH) and "Network configuration".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import DECODE_FAILURE, INVALID_CONFIG, INVALID_ENV, CniError
from .result import check_version

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
    """Linux ``dev_valid_name()``: 1-15 bytes, not ``.``/``..``, no ``/``, ``:`` or whitespace."""
    if not name or len(name.encode()) > 15 or name in (".", ".."):
        return False
    return not any(c in "/:" or c.isspace() for c in name)


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
    """Decode the shim's ``KEY=VALUE\\0`` list; raises CniError 6 when malformed."""
    env: dict[str, str] = {}
    for entry in block.split(b"\0"):
        if not entry:
            continue
        key, sep, val = entry.partition(b"=")
        if not sep:
            raise CniError(DECODE_FAILURE, f"malformed environment entry {entry[:40]!r}")
        env[key.decode(errors="surrogateescape")] = val.decode(errors="surrogateescape")
    return env


def decode_request(env: dict[str, str], stdin: bytes) -> CniRequest:
    """Build and validate a CniRequest from the CNI_* environment and the stdin bytes.

    Raises CniError 4 (missing/invalid environment), 6 (config is not a JSON object),
    7 (config without ``type``), 1 (unsupported cniVersion).
    """
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
    try:
        config = json.loads(stdin)
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
            f"CNI_IFNAME {req.ifname!r} is not a valid interface name (1-15 characters, not "
            "'.' or '..', no '/', ':' or whitespace)",
        )
    return req
