"""Keeping an OVS bridge across reboots: one backend per way a node configures its network.

Interface (every backend, see :class:`Backend`)::

    backend.render(desired, node_state) -> {path: (content, mode)}   # pure, nothing written
    backend.write(root, files) -> [changed paths]                    # atomic, only what differs
    backend.remove(root, desired) -> [removed paths]
    backend.inspect(root, desired, uplink_macs) -> Findings          # reads only: refusals, notes
    detect(root) -> "netplan" | "networkmanager" | "none"            # what ``auto`` means here

``path`` is absolute on the node ("/etc/netplan/60-underlay-br1.yaml"); every file is written
under ``root`` (production: "/", tests: a temporary directory) by temp file + fsync + rename,
mode 0600, owner root. Backends: :mod:`.netplan` (Ubuntu, netplan >= 0.100 ``openvswitch``
key), :mod:`.networkmanager` (NetworkManager keyfiles, NM-ovs plugin), :mod:`.none` (nothing).

Detection rule for ``persistence: auto`` (:func:`detect`):

1. ``netplan`` when ``<root>/etc/netplan`` holds at least one ``*.yaml``/``*.yml`` file
   (netplan is how this node is configured);
2. else ``networkmanager`` when NetworkManager's keyfile directory
   ``<root>/etc/NetworkManager/system-connections`` exists, or ``<root>/etc/NetworkManager/
   NetworkManager.conf`` exists (NM is installed and owns the configuration);
3. else ``none``.
"""

from __future__ import annotations

import abc
import contextlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from node_agent.links import Address, Route

if TYPE_CHECKING:
    from node_agent.bridges import DesiredBridge

FILE_MODE = 0o600
BACKENDS = ("netplan", "networkmanager", "none")

Files = dict[str, tuple[str, int]]
"""Rendered files: absolute node path -> (content, mode)."""


class PersistenceError(RuntimeError):
    """A persistence file could not be written or removed; names the path."""


@dataclass(frozen=True)
class Findings:
    """What a backend found in the node's other network configuration (:meth:`Backend.inspect`).

    ``refusals``: sentences, each a reason the change must not be made (the backend's files
    would not keep the bridge across a reboot, e.g. another netplan file keeps the uplink's
    addresses); the bridge engine reports them like any invalid input and changes nothing.
    ``notes``: sentences worth logging that do not block (e.g. competing NetworkManager
    profiles that the agent's profiles outrank).
    """

    refusals: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeNetConfig:
    """The IP configuration the bridge carries, as the node has it now (node_state of render).

    ``mac``: MAC of the bridge's internal interface (the uplink's) or None; ``addresses`` and
    ``routes``: what moved from the uplink (empty when moveAddresses is false).
    """

    mac: str | None = None
    addresses: tuple[Address, ...] = ()
    routes: tuple[Route, ...] = ()


def node_path(root: Path | str, path: str) -> Path:
    """``path`` (absolute on the node) placed under ``root``."""
    return Path(root) / path.lstrip("/")


def read_file(root: Path | str, path: str) -> tuple[str, int] | None:
    """(content, mode) of ``path`` under ``root``, or None when absent."""
    p = node_path(root, path)
    try:
        return p.read_text(), p.stat().st_mode & 0o7777
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PersistenceError(f"cannot read {p}: {exc}") from exc


def write_atomic(root: Path | str, path: str, content: str, mode: int = FILE_MODE) -> bool:
    """Write ``content`` to ``path`` under ``root`` atomically (temp in the same directory,
    fsync, chmod ``mode``, rename). Returns False, writing nothing, when the file already has
    this content and mode. Raises PersistenceError naming the path."""
    if read_file(root, path) == (content, mode):
        return False
    p = node_path(root, path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "w") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise PersistenceError(f"cannot write {p}: {exc}") from exc
    return True


def remove_file(root: Path | str, path: str) -> bool:
    """Delete ``path`` under ``root``; False when it was not there."""
    p = node_path(root, path)
    try:
        p.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise PersistenceError(f"cannot remove {p}: {exc}") from exc
    return True


class Backend(abc.ABC):
    """One persistence backend. ``render`` is pure; ``write``/``remove`` touch files only."""

    name: ClassVar[str]

    @abc.abstractmethod
    def render(self, desired: DesiredBridge, node_state: NodeNetConfig) -> Files:
        """Files that keep ``desired`` (with ``node_state``'s IP config) across a reboot."""

    @abc.abstractmethod
    def owned_paths(self, root: Path | str, desired: DesiredBridge) -> list[str]:
        """Node paths this backend may have written for ``desired`` (existing or not)."""

    def inspect(
        self, root: Path | str, desired: DesiredBridge, uplink_macs: Mapping[str, str]
    ) -> Findings:
        """Read the node's other configuration under ``root`` for what would defeat this
        backend's files after a reboot. ``uplink_macs``: uplink name -> MAC (lowercase) as the
        node has it now. Reads only; the default finds nothing."""
        return Findings()

    def write(self, root: Path | str, files: Files) -> list[str]:
        """Write ``files`` (from :meth:`render`) under ``root``; return the paths that changed.

        Idempotent: unchanged files are not rewritten. Raises PersistenceError.
        """
        return [
            path
            for path, (content, mode) in files.items()
            if write_atomic(root, path, content, mode)
        ]

    def remove(self, root: Path | str, desired: DesiredBridge) -> list[str]:
        """Delete the files of ``desired`` under ``root``; return the paths removed."""
        return [p for p in self.owned_paths(root, desired) if remove_file(root, p)]


def detect(root: Path | str) -> str:
    """The backend ``auto`` means on the node at ``root`` (rule in the module docstring)."""
    netplan_dir = node_path(root, "/etc/netplan")
    if netplan_dir.is_dir() and any(
        p.suffix in (".yaml", ".yml") for p in netplan_dir.iterdir() if p.is_file()
    ):
        return "netplan"
    if (
        node_path(root, "/etc/NetworkManager/system-connections").is_dir()
        or node_path(root, "/etc/NetworkManager/NetworkManager.conf").is_file()
    ):
        return "networkmanager"
    return "none"


def get_backend(name: str, root: Path | str = "/") -> Backend:
    """The backend called ``name`` (``auto`` resolved with :func:`detect` on ``root``).

    Raises ValueError for an unknown name.
    """
    from node_agent.persistence import netplan, networkmanager, none

    if name == "auto":
        name = detect(root)
    by_name: dict[str, type[Backend]] = {
        "netplan": netplan.NetplanBackend,
        "networkmanager": networkmanager.NetworkManagerBackend,
        "none": none.NoneBackend,
    }
    if name not in by_name:
        raise ValueError(
            f"unknown persistence backend {name!r}; expected auto or one of {BACKENDS}"
        )
    return by_name[name]()
