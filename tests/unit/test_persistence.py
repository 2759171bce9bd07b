"""Persistence backends: rendered files are valid for the real tools (netplan generate,
nmcli --offline), deterministic, written atomically with mode 0600, and detect() follows the
documented rule."""

from __future__ import annotations

import configparser
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from node_agent import persistence
from node_agent.bridges import DesiredBridge
from node_agent.links import Address, Route
from node_agent.persistence import NodeNetConfig, detect, get_backend, node_path
from node_agent.persistence.networkmanager import CONF_D_FILE, profile_uuid

V4 = socket.AF_INET
V6 = socket.AF_INET6
STATE = NodeNetConfig(
    mac="aa:bb:cc:00:11:22",
    addresses=(Address("172.18.10.11/16", V4), Address("fd00::11/64", V6)),
    routes=(
        Route(V4, "10.9.0.0/16", "172.18.0.1", 50),
        Route(V4, "default", "172.18.0.1"),
        Route(V6, "default", "fd00::1", 300),
    ),
)


def desired(**spec: object) -> DesiredBridge:
    o = {"metadata": {"name": "br1"}, "spec": {"uplinks": ["eth0"], **spec}}
    return DesiredBridge.from_object(o, "n1")


def netplan_generate(root: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("netplan") is None:
        pytest.skip("netplan not installed")
    return subprocess.run(
        ["netplan", "generate", "--root-dir", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )


def nmcli_check(content: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("nmcli") is None:
        pytest.skip("nmcli not installed")
    return subprocess.run(
        ["nmcli", "--offline", "connection", "modify"],
        input=content,
        capture_output=True,
        text=True,
        check=False,
    )


# --- netplan ------------------------------------------------------------------------------


def test_netplan_file_matches_the_reference_shape(tmp_path: Path) -> None:
    files = get_backend("netplan").render(desired(), STATE)
    assert list(files) == ["/etc/netplan/60-underlay-br1.yaml"]
    content, mode = files["/etc/netplan/60-underlay-br1.yaml"]
    assert mode == 0o600
    net = yaml.safe_load(content)["network"]
    assert net["version"] == 2
    assert net["renderer"] == "networkd"
    assert net["ethernets"] == {"eth0": {"dhcp4": False, "dhcp6": False}}
    br = net["bridges"]["br1"]
    assert br["interfaces"] == ["eth0"]
    assert br["addresses"] == ["172.18.10.11/16", "fd00::11/64"]
    assert {"to": "default", "via": "172.18.0.1"} in br["routes"]
    assert {"to": "10.9.0.0/16", "via": "172.18.0.1", "metric": 50} in br["routes"]
    assert {"to": "default", "via": "fd00::1", "metric": 300} in br["routes"]
    assert br["macaddress"] == "aa:bb:cc:00:11:22"
    assert br["openvswitch"] == {}


@pytest.mark.parametrize(
    "spec",
    [{}, {"mtu": 9000}, {"uplinks": ["eth0", "eth1"], "bondMode": "balance-slb"},
     {"moveAddresses": False}],
)  # fmt: skip
def test_netplan_generate_accepts_it(tmp_path: Path, spec: dict[str, object]) -> None:
    d = desired(**spec)
    backend = get_backend("netplan")
    files = backend.render(d, STATE if d.move_addresses else NodeNetConfig())
    assert backend.write(tmp_path, files) == list(files)
    path = node_path(tmp_path, "/etc/netplan/60-underlay-br1.yaml")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    proc = netplan_generate(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    generated = {p.name for p in (tmp_path / "run/systemd").rglob("*")}
    assert "netplan-ovs-br1.service" in generated
    if len(d.uplinks) > 1:
        assert "netplan-ovs-br1-bond.service" in generated
        bond = yaml.safe_load(files["/etc/netplan/60-underlay-br1.yaml"][0])["network"]["bonds"]
        assert bond["br1-bond"]["parameters"] == {"mode": "balance-slb"}


def test_netplan_generate_catches_a_broken_file(tmp_path: Path) -> None:
    """The validation the other tests rely on can fail: an edited file is rejected."""
    backend = get_backend("netplan")
    files = backend.render(desired(), STATE)
    path, (content, mode) = next(iter(files.items()))
    backend.write(
        tmp_path, {path: (content.replace("interfaces: [eth0]", "interfaces: eth0"), mode)}
    )
    assert netplan_generate(tmp_path).returncode != 0


# --- NetworkManager -------------------------------------------------------------------------


def keyfiles(files: dict[str, tuple[str, int]]) -> dict[str, configparser.ConfigParser]:
    out = {}
    for path, (content, _mode) in files.items():
        if path.endswith(".nmconnection"):
            cp = configparser.ConfigParser(interpolation=None)
            cp.read_string(content)
            out[path] = cp
    return out


def test_networkmanager_five_keyfiles_linked_by_uuid() -> None:
    d = DesiredBridge.from_object(
        {"metadata": {"name": "br1"}, "spec": {"uplinks": ["eth0"], "mtu": 1400}}, "n1"
    )
    d = DesiredBridge(**{**d.__dict__, "datapath_type": "netdev"})
    files = get_backend("networkmanager").render(d, STATE)
    assert all(mode == 0o600 for _c, mode in files.values())
    kf = keyfiles(files)
    assert len(kf) == 5
    by_type = {
        cp["connection"]["type"]: cp for cp in kf.values() if cp["connection"]["type"] != "ovs-port"
    }
    ports = [cp for cp in kf.values() if cp["connection"]["type"] == "ovs-port"]
    bridge, iface, eth = by_type["ovs-bridge"], by_type["ovs-interface"], by_type["ethernet"]
    assert bridge["connection"]["interface-name"] == "br1"
    assert bridge["ovs-bridge"]["datapath-type"] == "netdev"
    assert "ipv4" not in bridge  # the ovs-bridge profile never does IP configuration
    br_port = next(p for p in ports if p["connection"]["interface-name"] == "br1")
    up_port = next(p for p in ports if p["connection"]["interface-name"] == "ovs-port-eth0")
    for port in (br_port, up_port):
        assert port["connection"]["master"] == bridge["connection"]["uuid"]
        assert port["connection"]["slave-type"] == "ovs-bridge"
    assert iface["connection"]["master"] == br_port["connection"]["uuid"]
    assert iface["connection"]["slave-type"] == "ovs-port"
    assert iface["ovs-interface"]["type"] == "internal"
    assert iface["ipv4"]["method"] == "manual"
    assert iface["ipv4"]["address1"] == "172.18.10.11/16"
    assert iface["ipv4"]["gateway"] == "172.18.0.1"
    assert iface["ipv4"]["route1"] == "10.9.0.0/16,172.18.0.1,50"
    assert iface["ipv6"]["address1"] == "fd00::11/64"
    assert iface["ipv6"]["route1"] == "::/0,fd00::1,300"
    assert iface["ethernet"]["cloned-mac-address"] == "AA:BB:CC:00:11:22"
    assert iface["ethernet"]["mtu"] == "1400"
    assert eth["connection"]["interface-name"] == "eth0"
    assert eth["connection"]["master"] == up_port["connection"]["uuid"]
    assert eth["connection"]["slave-type"] == "ovs-port"
    assert files[CONF_D_FILE][0].endswith("[keyfile]\nunmanaged-devices+=interface-name:veth*\n")


def test_networkmanager_uuids_are_deterministic() -> None:
    a = get_backend("networkmanager").render(desired(), STATE)
    b = get_backend("networkmanager").render(desired(), STATE)
    assert a == b
    assert profile_uuid("br1", "br") != profile_uuid("br2", "br")
    assert (
        profile_uuid("br1", "br")
        in a["/etc/NetworkManager/system-connections/underlay-br1-br.nmconnection"][0]
    )


@pytest.mark.parametrize(
    "spec",
    [{}, {"mtu": 9000}, {"uplinks": ["eth0", "eth1"], "bondMode": "balance-tcp"},
     {"moveAddresses": False}],
)  # fmt: skip
def test_nmcli_offline_accepts_every_keyfile(spec: dict[str, object]) -> None:
    d = desired(**spec)
    files = get_backend("networkmanager").render(d, STATE if d.move_addresses else NodeNetConfig())
    kf = [c for p, (c, _m) in files.items() if p.endswith(".nmconnection")]
    assert len(kf) == 4 + len(d.uplinks)
    for content in kf:
        proc = nmcli_check(content)
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{content}"
        assert "Error" not in proc.stderr


def test_nmcli_offline_catches_a_broken_keyfile() -> None:
    files = get_backend("networkmanager").render(desired(), STATE)
    content = next(c for p, (c, _m) in files.items() if p.endswith("-if.nmconnection"))
    assert nmcli_check(content.replace("type=internal", "type=bogus")).returncode != 0


def test_networkmanager_remove_keeps_conf_d_while_another_bridge_remains(tmp_path: Path) -> None:
    backend = get_backend("networkmanager")
    d1 = desired()
    d2 = DesiredBridge.from_object(
        {"metadata": {"name": "br2"}, "spec": {"uplinks": ["eth1"]}}, "n1"
    )
    backend.write(tmp_path, backend.render(d1, STATE))
    backend.write(tmp_path, backend.render(d2, NodeNetConfig()))
    removed = backend.remove(tmp_path, d1)
    assert len(removed) == 5 and CONF_D_FILE not in removed
    assert all("underlay-br1-" in p for p in removed)
    assert node_path(tmp_path, CONF_D_FILE).exists()
    removed2 = backend.remove(tmp_path, d2)
    assert CONF_D_FILE in removed2
    assert list((tmp_path / "etc/NetworkManager/system-connections").iterdir()) == []


# --- none, writing, detect -----------------------------------------------------------------


def test_none_writes_nothing(tmp_path: Path) -> None:
    backend = get_backend("none")
    assert backend.render(desired(), STATE) == {}
    assert backend.write(tmp_path, {}) == []
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic_0600_and_idempotent(tmp_path: Path) -> None:
    path = "/etc/netplan/60-underlay-x.yaml"
    assert persistence.write_atomic(tmp_path, path, "a: 1\n")
    p = node_path(tmp_path, path)
    st1 = p.stat()
    assert stat.S_IMODE(st1.st_mode) == 0o600
    assert not persistence.write_atomic(tmp_path, path, "a: 1\n")  # same content: untouched
    assert p.stat().st_ino == st1.st_ino
    assert persistence.write_atomic(tmp_path, path, "a: 2\n")
    assert p.stat().st_ino != st1.st_ino  # replaced by rename, never written in place
    assert [x.name for x in p.parent.iterdir()] == [p.name]  # no temp file left
    assert persistence.remove_file(tmp_path, path)
    assert not persistence.remove_file(tmp_path, path)


def test_detect_rule(tmp_path: Path) -> None:
    assert detect(tmp_path) == "none"
    (tmp_path / "etc/NetworkManager/system-connections").mkdir(parents=True)
    assert detect(tmp_path) == "networkmanager"
    (tmp_path / "etc/netplan").mkdir()
    assert detect(tmp_path) == "networkmanager"  # an empty /etc/netplan does not count
    (tmp_path / "etc/netplan/50-cloud-init.yaml").write_text("network: {version: 2}\n")
    assert detect(tmp_path) == "netplan"
    assert get_backend("auto", tmp_path).name == "netplan"
    with pytest.raises(ValueError, match="ifupdown"):
        get_backend("ifupdown", tmp_path)
