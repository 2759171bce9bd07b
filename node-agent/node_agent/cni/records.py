"""What each underlay-ovs ADD created, so that DEL removes exactly that and nothing else.

A DEL names a container, an interface name and a namespace path; none of them says which link
is ours: by the time DEL runs the name may belong to another plugin's interface (a runtime
re-using the namespace), and the path may name any namespace. So ADD records the veth it made
(host end: name, ifindex, MAC; pod end: ifindex, MAC; the namespace's identity), and DEL deletes
the host end only when a link with that name, ifindex and MAC is still there (the pod end goes
with it, veth(4)). One JSON file per (container, interface) in a state directory; the files
live as long as the namespaces they describe, so a tmpfs (``/run``) is the right place: a reboot
removes both.

Source: CNI spec 1.0.0, "DEL" (the plugin releases what ADD created for CNI_CONTAINERID and
CNI_IFNAME); veth(4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

SUFFIX = ".json"


def default_state_dir(socket_path: str) -> str:
    """Where an agent serving ``socket_path`` keeps its records by default: the socket path
    without its extension plus ``.attachments`` (``/run/underlay/agent.attachments`` for the
    default socket), so two agents with two sockets never share one."""
    return os.path.splitext(socket_path)[0] + ".attachments"


@dataclass(frozen=True)
class Attachment:
    """One pod attachment as ADD made it.

    ``container_id``/``ifname``: CNI_CONTAINERID and CNI_IFNAME; ``netns``: CNI_NETNS and
    ``netns_id`` its ``(st_dev, st_ino)``; ``host``/``host_index``/``host_mac``: the host end of
    the veth (name, ifindex, MAC) in the node's namespace; ``pod_index``/``pod_mac``: the pod
    end in the pod's namespace; ``bridge``: the OVS bridge of its port (named like ``host``).
    """

    container_id: str
    ifname: str
    netns: str
    netns_id: tuple[int, int]
    host: str
    host_index: int
    host_mac: str
    pod_index: int
    pod_mac: str
    bridge: str

    @classmethod
    def from_json(cls, data: object) -> Attachment:
        """Parse a record; raises ValueError when it is not one."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        try:
            rec = cls(**data)
        except TypeError as exc:
            raise ValueError(str(exc)) from exc
        if not isinstance(rec.netns_id, list | tuple) or len(rec.netns_id) != 2:
            raise ValueError("netns_id must be [st_dev, st_ino]")
        ints = (rec.host_index, rec.pod_index, *rec.netns_id)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ints):
            raise ValueError("ifindex and namespace identity must be integers")
        strs = (rec.container_id, rec.ifname, rec.netns, rec.host, rec.host_mac, rec.pod_mac)
        if not all(isinstance(s, str) for s in (*strs, rec.bridge)):
            raise ValueError("names must be strings")
        return dataclasses.replace(rec, netns_id=(rec.netns_id[0], rec.netns_id[1]))


class AttachmentStore:
    """The records, one file each under ``directory`` (created 0700 on first save); None keeps
    them in memory only (a CniAgent built in-process, e.g. by tests).

    Writes are atomic (a temporary file renamed over the record); a record that cannot be read
    back is logged and treated as absent (DEL then removes what OVSDB still names). Thread-safe.
    """

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self._mem: dict[tuple[str, str], Attachment] = {}
        self._lock = threading.Lock()

    def _path(self, container_id: str, ifname: str) -> str:
        assert self.directory is not None
        key = hashlib.sha256(f"{container_id}\0{ifname}".encode()).hexdigest()[:40]
        return os.path.join(self.directory, key + SUFFIX)

    def save(self, rec: Attachment) -> None:
        """Record ``rec`` (replacing an older record of the same container and interface).
        Raises OSError when the directory cannot be written."""
        if self.directory is None:
            with self._lock:
                self._mem[(rec.container_id, rec.ifname)] = rec
            return
        path = self._path(rec.container_id, rec.ifname)
        tmp = f"{path}.{threading.get_ident()}.tmp"
        data = json.dumps(dataclasses.asdict(rec)).encode()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:  # first save, or the directory was removed meanwhile
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def load(self, container_id: str, ifname: str) -> Attachment | None:
        """The record of this container and interface, or None."""
        if self.directory is None:
            with self._lock:
                return self._mem.get((container_id, ifname))
        path = self._path(container_id, ifname)
        rec = self._read(path)
        if rec is not None and (rec.container_id, rec.ifname) != (container_id, ifname):
            return None
        return rec

    def _read(self, path: str) -> Attachment | None:
        try:
            with open(path, "rb") as f:
                return Attachment.from_json(json.loads(f.read(65536)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable attachment record %s: %s", path, exc)
            return None

    def remove(self, container_id: str, ifname: str) -> None:
        """Forget this container's interface (nothing when there is no record)."""
        if self.directory is None:
            with self._lock:
                self._mem.pop((container_id, ifname), None)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(container_id, ifname))

    def all(self) -> Iterator[Attachment]:
        """Every readable record (for the purge of records whose veth is gone)."""
        if self.directory is None:
            with self._lock:
                yield from list(self._mem.values())
            return
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            if name.endswith(SUFFIX):
                rec = self._read(os.path.join(self.directory, name))
                if rec is not None:
                    yield rec
