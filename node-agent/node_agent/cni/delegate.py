"""Executing another CNI plugin (a delegated IPAM plugin) exactly as a runtime does.

The plugin binary is looked up in the directories of ``CNI_PATH`` and run with the CNI_*
environment of the current call (``CNI_COMMAND`` possibly replaced) and the whole network
config on stdin. Source: CNI spec 1.0.0, "Delegated plugins (IPAM)".
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from .errors import DELEGATE_FAILED, INVALID_CONFIG, IO_FAILURE, CniError
from .result import parse

DEFAULT_TIMEOUT = 60.0


def find_plugin(plugin_type: str, cni_path: list[str]) -> str:
    """Absolute path of executable ``plugin_type`` in the first ``cni_path`` directory holding it.

    Raises CniError 7 for a type containing ``/`` and CniError 5 when it is not found
    (the message lists the directories searched).
    """
    if not plugin_type or "/" in plugin_type or plugin_type in (".", ".."):
        raise CniError(INVALID_CONFIG, f"invalid plugin type {plugin_type!r}")
    for d in cni_path:
        candidate = os.path.join(d, plugin_type)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(IO_FAILURE, f"failed to find plugin {plugin_type!r} in path {cni_path}")


def exec_plugin(
    plugin_type: str,
    command: str,
    env: dict[str, str],
    stdin: bytes,
    cni_path: list[str],
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any] | None:
    """Run plugin ``plugin_type`` with ``CNI_COMMAND=command``; return its parsed result.

    ``env`` is the CNI_* environment of the call; ``PATH`` is kept so plugins that run
    helpers still work. Returns the result in the 1.0.0 shape for ADD, None for DEL/CHECK.
    Raises CniError 109 carrying the plugin's own code and message when it fails, 5 on
    timeout or exec failure, 6 when its output is not a JSON result.
    """
    binary = find_plugin(plugin_type, cni_path)
    full_env = {k: v for k, v in env.items() if k.startswith("CNI_")}
    full_env["CNI_COMMAND"] = command
    full_env["PATH"] = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    try:
        proc = subprocess.run(
            [binary],
            input=stdin,
            env=full_env,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CniError(IO_FAILURE, f"{binary} {command} timed out after {timeout:g} s") from exc
    except OSError as exc:
        raise CniError(IO_FAILURE, f"cannot execute {binary}: {exc}") from exc
    if proc.returncode != 0:
        code, msg = None, ""
        try:
            err = json.loads(proc.stdout)
            code, msg = err.get("code"), err.get("msg", "")
            if err.get("details"):
                msg += f": {err['details']}"
        except ValueError:
            msg = (proc.stdout or proc.stderr).decode(errors="replace").strip()
        raise CniError(
            DELEGATE_FAILED,
            f"{plugin_type} {command} failed (exit {proc.returncode}, code {code}): {msg}",
        )
    if command != "ADD":
        return None
    return parse(proc.stdout, who=f"{plugin_type} output")
