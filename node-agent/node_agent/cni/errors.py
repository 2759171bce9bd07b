"""CNI errors: the spec's well-known codes, ours (>= 100), and the error JSON.

Source: CNI spec 1.0.0, section "Error" (codes 1-99 are reserved by the spec: 1 incompatible
version, 2 unsupported field, 3 unknown container, 4 invalid environment variables, 5 I/O
failure, 6 decoding failure, 7 invalid network config, 11 try again later). Codes 100 and up
are ours and listed here so the runtime's log names a stable number; 999 is libcni's
``ErrInternal`` (containernetworking/cni ``pkg/types``), used for an unexpected exception.
"""

from __future__ import annotations

import json
from typing import Any

# --- CNI spec codes ---------------------------------------------------------------------
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11

# --- ours (>= 100) ------------------------------------------------------------------------
INTERNAL = 100
"""The agent cannot serve this call as configured (no OVSDB, no Kubernetes API), or lost an
update it queued; the msg says which."""
POOL_EXHAUSTED = 101
"""Every candidate SpiderIPPool is full; the msg names the pools and their sizes."""
POOL_NOT_FOUND = 102
"""A SpiderIPPool named by an annotation or the config does not exist."""
NO_POOL_SELECTED = 103
"""No annotation, default or ``default: true`` pool gave a candidate for the interface."""
NO_POOL_ELIGIBLE = 104
"""Candidates existed but every one was filtered out (disabled, family, affinity, multusName)."""
BRIDGE_MISSING = 105
"""The OVS bridge named by the config does not exist on this node."""
OVS_FAILURE = 106
"""OVSDB refused the port, or ovs-vswitchd reported an error on the new interface."""
LINK_FAILURE = 107
"""A netlink operation (veth, address, route) failed."""
CHECK_FAILED = 108
"""CHECK found the attachment different from what ADD made."""
DELEGATE_FAILED = 109
"""A delegated IPAM plugin failed; the msg carries its own code and message."""
POD_NOT_FOUND = 110
"""The Pod named by CNI_ARGS does not exist in the API server."""
PEER_REFUSED = 111
"""The process calling the agent's socket is not root (uid 0, checked with SO_PEERCRED)."""
BRIDGE_NOT_MANAGED = 112
"""The OVS bridge named by the config exists but the node agent did not make it for an
OvsBridge, and the agent attaches pods to its own bridges only (``--cni-managed-bridges-only``)."""
UNEXPECTED = 999
"""An unexpected exception in the agent's handler (libcni ``ErrInternal``); the msg names the
exception class, the agent's log has the traceback."""


class CniError(Exception):
    """A CNI failure to report to the runtime as error JSON (CNI spec 1.0.0, "Error").

    ``code`` is a spec code (1-99) or one of ours (>= 100), ``msg`` a one-line reason naming
    the object at fault, ``details`` optional longer text.
    """

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict[str, Any]:
        """The error object ``{cniVersion, code, msg[, details]}``."""
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def to_json(self, cni_version: str) -> bytes:
        """The error object as the bytes a plugin prints on stdout."""
        return json.dumps(self.to_dict(cni_version)).encode() + b"\n"

    def __repr__(self) -> str:
        return f"CniError({self.code}, {self.msg!r})"
