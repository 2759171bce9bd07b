"""The installed CNI shim executed as a runtime executes it, against a real agent server.

No OVS and no Kubernetes here: these tests cover the shim, the socket protocol, request
decoding and the error JSON (codes 1, 4, 6, 7, 11, 100), VERSION, DEL never failing.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_agent.cni import shim
from node_agent.cni.install import install_shims, shim_source
from node_agent.cni.server import CniAgent, CniServer

from reconciler.vocab import DEFAULT_AGENT_SOCKET

PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


@pytest.fixture
def bins(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    install_shims(d, str(tmp_path / "agent.sock"), python=PYTHON)
    return d


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CniServer]:
    srv = CniServer(str(tmp_path / "agent.sock"), CniAgent("n1"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def call(
    plugin: Path,
    command: str,
    config: dict | str,
    *,
    extra_env: dict[str, str] | None = None,
    **env: str,
) -> subprocess.CompletedProcess[bytes]:
    e = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": env.get("cid", "c1"),
        "CNI_NETNS": env.get("netns", "/run/netns/none"),
        "CNI_IFNAME": env.get("ifname", "eth0"),
        "CNI_ARGS": env.get("args", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p1;K8S_POD_UID=u1"),
        "CNI_PATH": env.get("path", "/usr/lib/cni"),
        **(extra_env or {}),
    }
    data = config if isinstance(config, str) else json.dumps(config)
    return subprocess.run(
        [str(plugin)], input=data.encode(), env=e, capture_output=True, timeout=30, check=False
    )


def test_default_socket_matches_vocab() -> None:
    assert shim.SOCKET == DEFAULT_AGENT_SOCKET


def test_install_writes_executable_standalone_files(tmp_path: Path) -> None:
    paths = install_shims(tmp_path / "b", "/run/x/agent.sock", python="/opt/py/bin/python3")
    assert [p.name for p in paths] == ["underlay-ovs", "underlay-ipam"]
    for p in paths:
        text = p.read_text()
        assert text.startswith("#!/opt/py/bin/python3 -IS\n")
        assert "SOCKET = '/run/x/agent.sock'" in text
        assert "node_agent" not in text.split('"""', 2)[2]  # imports nothing of ours
        assert stat.S_IMODE(p.stat().st_mode) == 0o755
    assert sorted(os.listdir(tmp_path / "b")) == [
        "underlay-ipam",
        "underlay-ovs",
    ]  # no temp files left
    # idempotent: installing again gives identical files
    before = paths[0].read_bytes()
    install_shims(tmp_path / "b", "/run/x/agent.sock", python="/opt/py/bin/python3")
    assert paths[0].read_bytes() == before


def test_shim_source_rejects_newlines() -> None:
    with pytest.raises(ValueError):
        shim_source("/a\nb")


def test_version_answered_by_shim_without_agent(bins: Path) -> None:
    for name in ("underlay-ovs", "underlay-ipam"):
        p = call(bins / name, "VERSION", "{}")
        assert p.returncode == 0
        assert json.loads(p.stdout) == {
            "cniVersion": "1.0.0",
            "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"],
        }


def test_agent_unreachable_is_code_11_naming_socket(bins: Path, tmp_path: Path) -> None:
    p = call(
        bins / "underlay-ovs",
        "ADD",
        {"cniVersion": "0.4.0", "name": "n", "type": "underlay-ovs", "bridge": "br1"},
    )
    assert p.returncode != 0
    err = json.loads(p.stdout)
    assert err["code"] == 11
    assert err["cniVersion"] == "0.4.0"
    assert str(tmp_path / "agent.sock") in err["msg"]


def test_socket_env_overrides_baked_path(bins: Path, tmp_path: Path) -> None:
    p = call(
        bins / "underlay-ipam",
        "ADD",
        "{}",
        extra_env={"UNDERLAY_AGENT_SOCKET": str(tmp_path / "other.sock")},
    )
    assert str(tmp_path / "other.sock") in json.loads(p.stdout)["msg"]


def test_del_with_agent_unreachable_succeeds_and_says_what_was_left(bins: Path) -> None:
    p = call(
        bins / "underlay-ovs",
        "DEL",
        {"cniVersion": "1.0.0", "name": "n", "type": "underlay-ovs", "bridge": "br1"},
        cid="abc123",
    )
    assert p.returncode == 0
    assert p.stdout == b""
    assert b"abc123" in p.stderr and b"not cleaned up" in p.stderr


def test_unsupported_version_is_code_1(bins: Path, server: CniServer) -> None:
    p = call(
        bins / "underlay-ovs",
        "ADD",
        {"cniVersion": "0.2.0", "name": "n", "type": "underlay-ovs", "bridge": "br1"},
    )
    assert p.returncode == 1
    err = json.loads(p.stdout)
    assert err["code"] == 1
    assert "0.2.0" in err["details"]


def test_bad_config_is_code_7(bins: Path, server: CniServer) -> None:
    p = call(
        bins / "underlay-ovs", "ADD", {"cniVersion": "1.0.0", "name": "n", "type": "underlay-ovs"}
    )
    err = json.loads(p.stdout)
    assert (p.returncode, err["code"]) == (1, 7)
    assert "bridge" in err["msg"]
    p = call(
        bins / "underlay-ovs",
        "ADD",
        {"cniVersion": "1.0.0", "name": "n", "type": "underlay-ovs", "bridge": "br1", "vlan": 5000},
    )
    assert json.loads(p.stdout)["code"] == 7
    p = call(bins / "underlay-ovs", "ADD", {"cniVersion": "1.0.0", "name": "n", "type": "macvlan"})
    err = json.loads(p.stdout)
    assert err["code"] == 7 and "macvlan" in err["msg"]


def test_undecodable_config_is_code_6(bins: Path, server: CniServer) -> None:
    p = call(bins / "underlay-ovs", "ADD", "{not json")
    assert (p.returncode, json.loads(p.stdout)["code"]) == (1, 6)


def test_missing_env_is_code_4(bins: Path, server: CniServer) -> None:
    p = call(
        bins / "underlay-ovs",
        "ADD",
        {"cniVersion": "1.0.0", "name": "n", "type": "underlay-ovs", "bridge": "b"},
        netns="",
    )
    err = json.loads(p.stdout)
    assert err["code"] == 4 and "CNI_NETNS" in err["msg"]
    p = call(bins / "underlay-ovs", "FROB", "{}")
    assert json.loads(p.stdout)["code"] == 4


def test_ipam_without_kubernetes_is_internal_error(bins: Path, server: CniServer) -> None:
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "bridge", "ipam": {"type": "underlay-ipam"}}
    p = call(bins / "underlay-ipam", "ADD", conf)
    err = json.loads(p.stdout)
    assert err["code"] == 100 and "Kubernetes" in err["msg"]
    # ... and its DEL still succeeds, explaining on stderr
    p = call(bins / "underlay-ipam", "DEL", conf)
    assert p.returncode == 0 and b"Kubernetes" in p.stderr


def test_many_concurrent_calls(bins: Path, server: CniServer) -> None:
    out: list[int] = []

    def one(i: int) -> None:
        p = call(
            bins / "underlay-ovs",
            "ADD",
            {"cniVersion": "1.0.0", "name": "n", "type": "underlay-ovs"},
            cid=f"c{i}",
        )
        out.append(json.loads(p.stdout)["code"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [7] * 16


def test_shim_normal_path_imports_no_heavy_modules(bins: Path, server: CniServer) -> None:
    """A forwarded call loads nothing beyond the interpreter's startup modules and _socket."""
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c",
        "CNI_NETNS": "/x",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
    }
    conf = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "underlay-ovs"}).encode()
    cmd = [PYTHON, "-I", "-S", "-X", "importtime", str(bins / "underlay-ovs")]
    p = subprocess.run(cmd, input=conf, env=env, capture_output=True, timeout=30, check=False)
    assert json.loads(p.stdout)["code"] == 7  # the agent answered (bridge missing from config)
    mods = {
        line.rsplit("|", 1)[1].strip()
        for line in p.stderr.decode().splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "_socket" in mods
    assert not mods & {"json", "socket", "re", "enum", "os", "subprocess", "node_agent"}, mods


def test_stale_socket_replaced_live_socket_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    path.touch()  # stale leftover
    a = CniServer(str(path), CniAgent("n1"))
    a.start()
    try:
        with pytest.raises(RuntimeError, match=str(path)):
            CniServer(str(path), CniAgent("n1")).start()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        a.stop()
    assert not path.exists()
