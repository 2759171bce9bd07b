#!/usr/bin/python3 -IS
"""underlay CNI shim: forwards one CNI call to the node agent over a unix socket.

Installed as ``underlay-ovs`` and ``underlay-ipam`` (same code; the agent dispatches on the
config's ``type``). Runs on every pod start, so it imports nothing beyond what the
interpreter has already loaded at startup (``posix``, ``sys``) plus the built-in ``_socket``;
``json`` is imported only on error paths.

Socket path: ``$UNDERLAY_AGENT_SOCKET``, else ``SOCKET`` below (``install_shims`` bakes the
agent's path in; the default equals ``reconciler.vocab.DEFAULT_AGENT_SOCKET``).

Protocol (version 1), one request per connection::

    request  = b"CNI1 <envlen> <stdinlen>\\n" + env + stdin
    env      = every CNI_* variable as b"KEY=VALUE\\0" (in environment order)
    stdin    = the network config bytes exactly as the runtime wrote them
    (the shim then shuts down its write side)

    response = b"<exit> <outlen> <errlen>\\n" + stdout + stderr   (then the agent closes)

The shim prints ``stdout``/``stderr`` and exits with ``exit``. ``CNI_COMMAND=VERSION`` is
answered locally. The agent answers every request it reads, refusals included (a malformed
request, a caller that is not root, too many connections: an error code and a message); the
answer is read even when the agent stopped reading the request early (a request over its size
limit), so a refusal is printed as the agent gave it. When the agent cannot be reached (no
socket, nobody listening), the shim prints CNI error JSON code 11 ("unreachable", is the agent
running?); when it was reached but closed without a complete answer (it stopped or crashed
mid-call), code 11 saying so; both name the socket path and exit 1. For DEL it instead
exits 0 and says on stderr what was not cleaned up, because DEL must not fail the runtime
(leaks are collected by the agent's garbage collection).
Source: CNI spec 1.0.0, "Execution protocol" and "Error".
"""

import posix
import sys

SOCKET = "/run/underlay/agent.sock"
VERSION = b'{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}\n'


def _out(fd: int, data: bytes) -> None:
    while data:
        data = data[posix.write(fd, data) :]


def _failed(
    env: dict[bytes, bytes], path: str, why: str, stdin: bytes, reached: bool = False
) -> int:
    # error path only: may import json
    import json

    cmd = env.get(b"CNI_COMMAND", b"").decode(errors="replace")
    if cmd == "DEL":
        cid = env.get(b"CNI_CONTAINERID", b"").decode(errors="replace")
        ifname = env.get(b"CNI_IFNAME", b"").decode(errors="replace")
        state = "gave no answer" if reached else "unreachable"
        msg = (
            f"underlay: agent {state} at {path} ({why}); DEL of container {cid} "
            f"interface {ifname} not cleaned up here (OVS port, veth and IP allocation are "
            "left for the agent's garbage collection)\n"
        )
        _out(2, msg.encode())
        return 0
    try:
        version = json.loads(stdin).get("cniVersion", "1.0.0")
    except Exception:
        version = "1.0.0"
    if not isinstance(version, str):
        version = "1.0.0"
    if reached:
        err = {
            "cniVersion": version,
            "code": 11,
            "msg": f"underlay agent at {path} gave no answer: {why}",
            "details": "the agent took the call but closed the connection without answering "
            "(it stopped or restarted meanwhile); its log on this node says why",
        }
    else:
        err = {
            "cniVersion": version,
            "code": 11,
            "msg": f"underlay agent unreachable at {path}: {why}",
            "details": "is the underlay node agent running on this node? "
            "(socket from $UNDERLAY_AGENT_SOCKET or the path baked into this plugin)",
        }
    _out(1, json.dumps(err).encode() + b"\n")
    return 1


def main() -> int:
    """Run one CNI call; returns the exit status (console-script entry point)."""
    env = posix.environ
    if env.get(b"CNI_COMMAND") == b"VERSION":
        _out(1, VERSION)
        return 0
    path = env.get(b"UNDERLAY_AGENT_SOCKET") or SOCKET.encode()
    stdin = sys.stdin.buffer.read()
    block = b"".join([k + b"=" + v + b"\0" for k, v in env.items() if k[:4] == b"CNI_"])
    spath = path.decode(errors="replace")
    import _socket

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    chunks = []
    sent = ""
    try:
        try:
            s.connect(path)
        except OSError as exc:
            return _failed(env, spath, exc.strerror or str(exc), stdin)
        try:
            s.sendall(b"CNI1 %d %d\n" % (len(block), len(stdin)) + block + stdin)
            s.shutdown(_socket.SHUT_WR)
        except OSError as exc:  # the agent answered early (a refusal) and closed: read it
            sent = f" (sending the request: {exc.strerror or exc})"
        try:
            while True:
                c = s.recv(262144)
                if not c:
                    break
                chunks.append(c)
        except OSError as exc:
            sent += f" (reading the answer: {exc.strerror or exc})"
    finally:
        s.close()
    resp = b"".join(chunks)
    head, sep, body = resp.partition(b"\n")
    parts = head.split()
    if not sep or len(parts) != 3 or not all(p.isdigit() for p in parts):
        why = "the connection was closed without an answer" + sent
        return _failed(env, spath, why, stdin, reached=True)
    status, nout, nerr = int(parts[0]), int(parts[1]), int(parts[2])
    if len(body) != nout + nerr:
        return _failed(env, spath, "the agent's answer was cut short" + sent, stdin, reached=True)
    _out(1, body[:nout])
    _out(2, body[nout:])
    return status


if __name__ == "__main__":
    posix._exit(main())
