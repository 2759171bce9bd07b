"""One OVSDB connection per agent process, through ovsdbapp.

The agent opens the node's Open_vSwitch database once and shares the API object between the
bridge manager and the CNI plugins; ovsdbapp runs the IDL in its own thread and serialises
transactions. Source: ovsdbapp ``backend.ovs_idl`` (OVSDB RFC 7047 over a unix socket).
"""

from __future__ import annotations

import contextlib
import logging

from ovsdbapp.backend.ovs_idl import connection
from ovsdbapp.schema.open_vswitch import impl_idl

DEFAULT_REMOTE = "unix:/var/run/openvswitch/db.sock"


class OvsdbUnavailable(RuntimeError):
    """The OVSDB server at ``remote`` could not be reached or did not answer in time."""


def connect(remote: str = DEFAULT_REMOTE, timeout: float = 10.0) -> impl_idl.OvsdbIdl:
    """Connect to the Open_vSwitch database at ``remote`` (``unix:/path`` or ``tcp:host:port``).

    Returns the ovsdbapp Open_vSwitch API; its commands run with ``.execute(check_error=True)``
    or inside ``api.transaction(check_error=True)``. ``timeout`` (seconds) bounds the initial
    schema fetch and each later transaction. Raises OvsdbUnavailable naming ``remote``.
    """
    quiet = logging.getLogger("ovsdbapp.backend.ovs_idl.idlutils")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its "Unable to open stream" line: we say it, once
    try:
        idl = connection.OvsdbIdl.from_server(remote, "Open_vSwitch")
        conn = connection.Connection(idl=idl, timeout=timeout)
        # ovsdbapp keeps the connection in a class attribute (Backend._ovsdb_connection): a
        # subclass per connection keeps two databases in one process (tests, rig) apart and
        # lets a reconnect after disconnect() build a fresh connection.
        cls = type("NodeOvsdbIdl", (impl_idl.OvsdbIdl,), {"_ovsdb_connection": None})
        api = cls(conn)
    except Exception as exc:
        raise OvsdbUnavailable(
            f"cannot reach OVSDB at {remote}: {exc} (is Open vSwitch running on this node, "
            "e.g. systemctl start openvswitch-switch? else point --ovsdb at its socket)"
        ) from exc
    finally:
        quiet.setLevel(level)
    return api


def disconnect(api: impl_idl.OvsdbIdl) -> None:
    """Stop the connection thread behind ``api`` (idempotent)."""
    with contextlib.suppress(Exception):  # already stopped
        api.ovsdb_connection.stop()
