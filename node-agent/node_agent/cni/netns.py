"""Pod network namespace files (CNI_NETNS): opened without blocking, refused unless they are a
network namespace, and never the node's own.

A runtime names the pod's namespace by a path (``/var/run/netns/cni-…``, ``/proc/<pid>/ns/net``).
Whatever the path says, what counts is the file it opens: :func:`open_netns` refuses anything
that is not a network namespace before the agent enters it (a FIFO would block ``open(2)``
forever without ``O_NONBLOCK``; a device file must never be opened at all), and
:class:`NetnsGuard` refuses the namespace the agent itself runs in (the node's, with
``hostNetwork``), compared by the namespace's inode, never by the path, so
``/run/netns/../../proc/self/ns/net`` and ``/proc/1/ns/net`` are recognised too.

Sources: open(2) (``O_NONBLOCK`` on a FIFO), statfs(2) (``NSFS_MAGIC``), ioctl_ns(2)
(``NS_GET_NSTYPE``), namespaces(7) (two namespaces are the same when device and inode numbers of
their ``/proc/<pid>/ns`` files are equal), setns(2).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from typing import NamedTuple

NSFS_MAGIC = 0x6E736673
"""``f_type`` of a file on the nsfs pseudo file system (linux/magic.h)."""
NS_GET_NSTYPE = 0xB703
"""ioctl_ns(2): ``_IO(0xb7, 0x3)``, the namespace type of an nsfs file descriptor."""
CLONE_NEWNET = 0x40000000
"""The type NS_GET_NSTYPE returns for a network namespace (sched.h)."""
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
"""How a namespace file is opened: never blocks (a FIFO), never becomes a controlling tty."""

_libc = ctypes.CDLL(None, use_errno=True)


class NotNetns(ValueError):
    """The path exists but is not a network namespace; the message names it and says what it is."""


class NetnsId(NamedTuple):
    """A namespace's identity: ``(st_dev, st_ino)`` of its nsfs file (namespaces(7))."""

    dev: int
    ino: int

    def __str__(self) -> str:
        return f"net:[{self.ino}]"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a file"


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type (a word) comes first
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def open_netns(path: str) -> tuple[int, NetnsId]:
    """Open the network namespace file ``path``; returns ``(fd, identity)``, the caller closes fd.

    Only a regular file is opened (nsfs files are; a FIFO, device, socket or directory is
    refused without being opened), with :data:`OPEN_FLAGS`; the open file must be on nsfs
    (``fstatfs`` f_type :data:`NSFS_MAGIC`) and be a network namespace (``NS_GET_NSTYPE`` is
    :data:`CLONE_NEWNET`, not e.g. a mount namespace). Raises FileNotFoundError when ``path``
    does not exist, NotNetns naming the path and what it is otherwise, OSError when it cannot
    be opened (e.g. EACCES).
    """
    st = os.stat(path)  # follows /proc/<pid>/ns/net, a magic link
    if not stat.S_ISREG(st.st_mode):
        raise NotNetns(f"{path} is {_kind(st.st_mode)}, not a network namespace")
    fd = os.open(path, OPEN_FLAGS)
    try:
        fst = os.fstat(fd)
        ident = NetnsId(fst.st_dev, fst.st_ino)
        if not stat.S_ISREG(fst.st_mode) or _fs_type(fd) != NSFS_MAGIC:
            raise NotNetns(f"{path} is a regular file, not a network namespace (not on nsfs)")
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL):
                raise NotNetns(f"{path} is not a namespace file") from exc
            raise
        if kind != CLONE_NEWNET:
            raise NotNetns(f"{path} is a namespace of another type (0x{kind:x}), not a network one")
    except BaseException:
        os.close(fd)
        raise
    return fd, ident


def netns_id(path: str) -> NetnsId:
    """The identity of network namespace ``path`` (raises as :func:`open_netns`)."""
    fd, ident = open_netns(path)
    os.close(fd)
    return ident


class NetnsGuard:
    """Which network namespaces a CNI call may never name: the agent's own (``/proc/self``, the
    node's when the agent runs with hostNetwork), the initial one (``/proc/1``, when readable:
    no pod lives there) and ``extra`` paths (the node's namespace when it is not the agent's,
    as in tests that run the agent in-process).

    The identities are read once, at construction (a process does not change namespace; the
    agent's threads that enter pods do, but never the thread that builds this).
    """

    def __init__(self, extra: tuple[str, ...] = ()) -> None:
        self.refused: dict[NetnsId, str] = {}
        for path, what in (
            ("/proc/self/ns/net", "the node agent's own network namespace"),
            ("/proc/1/ns/net", "the initial network namespace (of PID 1)"),
            *((p, "the node's network namespace") for p in extra),
        ):
            try:
                self.refused.setdefault(netns_id(path), what)
            except (OSError, NotNetns):
                continue

    def check(self, path: str) -> NetnsId:
        """The identity of pod namespace ``path``; raises NotNetns when it is not a network
        namespace or is one of the refused ones (the message names the path, the inode and
        which namespace it is), FileNotFoundError when it does not exist, OSError when it
        cannot be opened."""
        ident = netns_id(path)
        what = self.refused.get(ident)
        if what is not None:
            raise NotNetns(f"{path} is {what} ({ident}), not a pod's")
        return ident
