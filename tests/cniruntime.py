"""Run CNI plugins the way a container runtime does, for tests on the rig.

``Agent`` starts the CNI server (``python -m node_agent.cni.server``) inside a rig node and
installs the shims; ``exec_plugin`` executes one plugin binary with CNI_* env and the config on
stdin inside the node's namespace; ``Runtime`` runs a config list like libcni (ADD in order with
prevResult, DEL in reverse, CHECK).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from node_agent.cni.install import install_shims

from tests.rig import GATEWAY, Netns, Node

PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
REF_PLUGINS = "/usr/lib/cni"
UID = "6f4c1c5e-0000-4000-8000-000000000001"


class Agent:
    """``python -m node_agent.cni.server`` running inside a rig node's namespace."""

    def __init__(
        self,
        node: Node,
        workdir: Path,
        *,
        kubeconfig: str | None = None,
        node_name: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.node = node
        self.socket = str(workdir / f"{node.name}.sock")
        self.bin_dir = workdir / f"{node.name}-bin"
        self.log = workdir / f"{node.name}-agent.log"
        install_shims(self.bin_dir, self.socket, python=PYTHON)
        cmd = [
            sys.executable,
            "-m",
            "node_agent.cni.server",
            "--socket",
            self.socket,
            "--ovsdb",
            node.ovsdb,
            "--node-name",
            node_name or node.name.rsplit("-", 1)[1],
            "--purge-interval",
            "0",
            "-v",
        ]
        if kubeconfig:
            cmd += ["--kubeconfig", kubeconfig]
        cmd += extra_args
        with open(self.log, "wb") as logf:
            self.proc = node.popen(
                *cmd, stdout=subprocess.PIPE, stderr=logf, cwd=str(Path(__file__).parents[2])
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.proc.kill()
            raise RuntimeError(f"agent did not start: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    @property
    def cni_path(self) -> str:
        return f"{self.bin_dir}:{REF_PLUGINS}"


def exec_plugin(
    node: Node,
    cni_path: str,
    command: str,
    conf: dict[str, Any],
    *,
    netns: str,
    cid: str,
    ifname: str = "eth0",
    pod: tuple[str, str, str] = ("default", "p1", UID),
) -> tuple[int, dict[str, Any] | None, str]:
    """Execute the plugin ``conf["type"]`` from ``cni_path`` inside ``node`` like a runtime."""
    binary = next(
        Path(d) / conf["type"] for d in cni_path.split(":") if (Path(d) / conf["type"]).exists()
    )
    env = {
        "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]};K8S_POD_UID={pod[2]}",
        "CNI_PATH": cni_path, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }  # fmt: skip
    p = subprocess.run(
        ["ip", "netns", "exec", node.name, str(binary)],
        input=json.dumps(conf).encode(),
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    out = json.loads(p.stdout) if p.stdout.strip() else None
    return p.returncode, out, p.stderr.decode()


class Runtime:
    """Runs a CNI config list like libcni: ADD in order with prevResult, DEL in reverse, CHECK."""

    def __init__(self, node: Node, cni_path: str) -> None:
        self.node = node
        self.cni_path = cni_path
        self.cache: dict[tuple[str, str], dict[str, Any]] = {}

    @staticmethod
    def _plugin_conf(
        conflist: dict[str, Any], plugin: dict[str, Any], prev: dict[str, Any] | None
    ) -> dict[str, Any]:
        conf = {**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def add(
        self,
        conflist: dict[str, Any],
        netns: Netns | str,
        cid: str,
        ifname: str = "eth0",
        **kw: Any,
    ) -> dict[str, Any]:
        path = netns if isinstance(netns, str) else netns.path
        prev = None
        for plugin in conflist["plugins"]:
            rc, out, err = exec_plugin(
                self.node,
                self.cni_path,
                "ADD",
                self._plugin_conf(conflist, plugin, prev),
                netns=path,
                cid=cid,
                ifname=ifname,
                **kw,
            )
            if rc != 0:
                raise CniFailure(rc, out, err)
            prev = out
        assert prev is not None
        self.cache[(cid, ifname)] = prev
        return prev

    def delete(
        self,
        conflist: dict[str, Any],
        netns: Netns | str,
        cid: str,
        ifname: str = "eth0",
        **kw: Any,
    ) -> list[str]:
        path = netns if isinstance(netns, str) else netns.path
        prev = self.cache.get((cid, ifname))
        notes = []
        for plugin in reversed(conflist["plugins"]):
            rc, out, err = exec_plugin(
                self.node,
                self.cni_path,
                "DEL",
                self._plugin_conf(conflist, plugin, prev),
                netns=path,
                cid=cid,
                ifname=ifname,
                **kw,
            )
            if rc != 0:
                raise CniFailure(rc, out, err)
            notes.append(err)
        return notes

    def check(
        self, conflist: dict[str, Any], netns: Netns, cid: str, ifname: str = "eth0", **kw: Any
    ) -> None:
        prev = self.cache[(cid, ifname)]
        for plugin in conflist["plugins"]:
            rc, out, err = exec_plugin(
                self.node,
                self.cni_path,
                "CHECK",
                self._plugin_conf(conflist, plugin, prev),
                netns=netns.path,
                cid=cid,
                ifname=ifname,
                **kw,
            )
            if rc != 0:
                raise CniFailure(rc, out, err)


class CniFailure(Exception):
    def __init__(self, rc: int, out: dict[str, Any] | None, err: str) -> None:
        super().__init__(f"exit {rc}: {out} {err}")
        self.rc, self.out, self.err = rc, out, err

    @property
    def code(self) -> int:
        return int((self.out or {}).get("code", -1))

    @property
    def msg(self) -> str:
        return str((self.out or {}).get("msg", ""))


def make_bridge(node: Node, bridge: str = "br1") -> None:
    """br1 (userspace datapath: no OVS kernel module here) with the node's eth0 as uplink."""
    node.vsctl("add-br", bridge, "--", "set", "Bridge", bridge, "datapath_type=netdev")
    node.vsctl("add-port", bridge, "eth0")
    node.run("ip", "link", "set", bridge, "up")


def ovs_port_of(node: Node, cid: str) -> str | None:
    out = node.vsctl("--bare", "--columns=name", "find", "Port", f"external_ids:contId={cid}")
    return out.strip() or None


def host_local(range_start: str, range_end: str, data_dir: Path) -> dict[str, Any]:
    return {
        "type": "host-local", "dataDir": str(data_dir),
        "ranges": [[{"subnet": "172.18.0.0/16", "rangeStart": range_start, "rangeEnd": range_end, "gateway": GATEWAY}]],
        "routes": [{"dst": "0.0.0.0/0"}],
    }  # fmt: skip


def conflist(
    *plugins: dict[str, Any], version: str = "1.0.0", name: str = "ovs-conf"
) -> dict[str, Any]:
    return {"cniVersion": version, "name": name, "plugins": list(plugins)}
