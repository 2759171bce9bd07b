"""Installing the CNI shims into a node's CNI bin directory.

The installed files are standalone copies of :mod:`node_agent.cni.shim` (standard library
only, no import of this package) with the agent's socket path baked in, so a container
runtime can execute them with nothing but ``python3`` on the node.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from reconciler.vocab import CNI_IPAM_TYPE, CNI_OVS_TYPE

from . import shim

_SOCKET_LINE = f"SOCKET = {shim.SOCKET!r}".replace("'", '"')


def shim_source(socket_path: str, python: str = "/usr/bin/python3") -> str:
    """Text of a standalone shim: shebang ``#!<python> -IS`` and ``SOCKET = <socket_path>``.

    Raises ValueError when the shim source no longer has the line to replace, or when
    ``python``/``socket_path`` contain a newline.
    """
    if "\n" in python or "\n" in socket_path:
        raise ValueError("python and socket_path must be single-line strings")
    text = Path(shim.__file__).read_text()
    lines = text.split("\n")
    if not lines[0].startswith("#!"):
        raise ValueError(f"{shim.__file__}: first line is not a shebang")
    if _SOCKET_LINE not in lines:
        raise ValueError(f"{shim.__file__}: line {_SOCKET_LINE!r} not found")
    lines[0] = f"#!{python} -IS"
    lines[lines.index(_SOCKET_LINE)] = f"SOCKET = {socket_path!r}"
    return "\n".join(lines)


def install_shims(
    bin_dir: str | os.PathLike[str], socket_path: str, python: str = "/usr/bin/python3"
) -> list[Path]:
    """Write executable ``underlay-ovs`` and ``underlay-ipam`` into ``bin_dir``; return their paths.

    Each file is written to a temporary name in ``bin_dir``, made mode 0755, fsynced and
    renamed over the target, so a runtime never executes a half-written plugin (POSIX
    rename(2) atomicity). Rewriting identical content is harmless (idempotent). Raises
    OSError naming the directory when it cannot be written.
    """
    directory = Path(bin_dir)
    directory.mkdir(parents=True, exist_ok=True)
    data = shim_source(socket_path, python).encode()
    written = []
    for name in (CNI_OVS_TYPE, CNI_IPAM_TYPE):
        target = directory / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                os.fchmod(f.fileno(), 0o755)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(target)
    return written
