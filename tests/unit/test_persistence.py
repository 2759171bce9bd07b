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
from node_agent.persistence import NodeNetConfig, detect, get_backend, netplan, node_path
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


# --- the node's other configuration: netplan files of the node, competing NM profiles ------

OURS = "/etc/netplan/60-underlay-br1.yaml"
CLOUD_INIT_STATIC = """\
network:
  version: 2
  ethernets:
    eth0:
      addresses: [172.18.10.11/16]
      routes: [{to: default, via: 172.18.0.1}]
"""
CLOUD_INIT_DHCP = """\
network:
  version: 2
  ethernets:
    eth0:
      dhcp4: true
      match: {macaddress: "aa:bb:cc:00:11:22"}
      set-name: eth0
"""
STATIC_REFUSAL = (
    "netplan file /etc/netplan/50-cloud-init.yaml sets addresses, routes for uplink eth0 "
    "(ethernets.eth0), which the agent's /etc/netplan/60-underlay-br1.yaml cannot override "
    "(netplan appends lists and keeps gateway4/gateway6): after a reboot eth0 would keep them "
    "as a port of br1 (conflicting default route); move eth0's addresses/routes out of "
    "/etc/netplan/50-cloud-init.yaml (the agent puts them on br1), or use persistence: none"
)
MACS = {"eth0": "aa:bb:cc:00:11:22", "eth1": "aa:bb:cc:00:11:33"}


def put(root: Path, path: str, content: str) -> None:
    persistence.write_atomic(root, path, content)


def refusals(root: Path, d: DesiredBridge | None = None) -> tuple[str, ...]:
    return get_backend("netplan").inspect(root, d or desired(), MACS).refusals


def test_static_uplink_in_another_netplan_file_is_refused(tmp_path: Path) -> None:
    put(tmp_path, "/etc/netplan/50-cloud-init.yaml", CLOUD_INIT_STATIC)
    assert refusals(tmp_path) == (STATIC_REFUSAL,)
    # the refusal is right: with our file next to it netplan keeps the address on the port
    backend = get_backend("netplan")
    backend.write(tmp_path, backend.render(desired(), STATE))
    proc = netplan_generate(tmp_path)
    assert "Conflicting default route declarations for IPv4" in proc.stderr
    eth0 = (tmp_path / "run/systemd/network/10-netplan-eth0.network").read_text()
    assert "Address=172.18.10.11/16" in eth0 and "Bridge=br1" in eth0


def test_an_uplink_in_the_agents_own_file_of_another_bridge_is_not_to_be_edited(
    tmp_path: Path,
) -> None:
    """Two OvsBridges claim eth0: the refusal points at the OvsBridge, never at editing the
    agent's own file."""
    backend = get_backend("netplan")
    backend.write(tmp_path, backend.render(desired(), STATE))  # br1 over eth0, as enacted
    other = DesiredBridge.from_object(
        {"metadata": {"name": "br9"}, "spec": {"uplinks": ["eth0"]}}, "n1"
    )
    assert refusals(tmp_path, other) == (
        "uplink eth0 is carried by the agent's bridge br1 (/etc/netplan/60-underlay-br1.yaml, "
        "written by the agent: do not edit it); remove eth0 from the OvsBridge that makes "
        "bridge br1, or delete that OvsBridge",
    )


def test_dhcp4_uplink_in_an_earlier_file_is_fine_and_netplan_agrees(tmp_path: Path) -> None:
    put(tmp_path, "/etc/netplan/50-cloud-init.yaml", CLOUD_INIT_DHCP)
    assert refusals(tmp_path) == ()
    backend = get_backend("netplan")
    backend.write(tmp_path, backend.render(desired(), STATE))
    proc = netplan_generate(tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    eth0 = (tmp_path / "run/systemd/network/10-netplan-eth0.network").read_text()
    assert "Bridge=br1" in eth0
    lines = eth0.splitlines()
    assert not [x for x in lines if x.startswith(("DHCP=", "Address="))], eth0  # ours won


def test_dhcp4_in_a_later_file_is_refused_and_netplan_agrees(tmp_path: Path) -> None:
    put(tmp_path, "/etc/netplan/90-late.yaml", CLOUD_INIT_DHCP)
    (reason,) = refusals(tmp_path)
    assert reason.startswith(
        "netplan file /etc/netplan/90-late.yaml sets dhcp4: true for uplink eth0 "
        "(ethernets.eth0) and is read after the agent's /etc/netplan/60-underlay-br1.yaml"
    )
    assert reason.endswith("remove dhcp4 for eth0 from /etc/netplan/90-late.yaml, "
                           "or use persistence: none")  # fmt: skip
    backend = get_backend("netplan")
    backend.write(tmp_path, backend.render(desired(), STATE))
    assert netplan_generate(tmp_path).returncode == 0
    eth0 = (tmp_path / "run/systemd/network/10-netplan-eth0.network").read_text()
    assert "DHCP=ipv4" in eth0 and "Bridge=br1" in eth0  # what the refusal prevents


def test_netplan_precedence_run_over_etc_over_lib(tmp_path: Path) -> None:
    """netplan(5): /run shadows /etc, either shadows /lib, for a file of the same name; files
    are merged in name order. A static file shadowed by a DHCP one is not a conflict."""
    put(tmp_path, "/lib/netplan/10-a.yaml", "network: {version: 2}\n")
    put(tmp_path, "/etc/netplan/50-cloud-init.yaml", CLOUD_INIT_STATIC)
    put(tmp_path, "/lib/netplan/50-cloud-init.yaml", CLOUD_INIT_STATIC)
    put(tmp_path, "/run/netplan/50-cloud-init.yaml", CLOUD_INIT_DHCP)
    put(tmp_path, "/etc/netplan/70-b.yaml", "network: {version: 2}\n")
    put(tmp_path, "/etc/netplan/80-c.yml", CLOUD_INIT_STATIC)  # netplan reads *.yaml only
    assert netplan.netplan_files(tmp_path) == [
        "/lib/netplan/10-a.yaml",
        "/run/netplan/50-cloud-init.yaml",
        "/etc/netplan/70-b.yaml",
    ]
    assert refusals(tmp_path) == ()
    backend = get_backend("netplan")
    backend.write(tmp_path, backend.render(desired(), STATE))
    proc = netplan_generate(tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # netplan agrees
    node_path(tmp_path, "/run/netplan/50-cloud-init.yaml").unlink()
    assert refusals(tmp_path) == (STATIC_REFUSAL,)  # /etc shadows /lib: one refusal
    assert "Conflicting default route" in netplan_generate(tmp_path).stderr


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ("network:\n  ethernets:\n    eth0: {gateway4: 172.18.0.1, dhcp4: true}\n",
         "sets gateway4 for uplink eth0 (ethernets.eth0)"),
        ("network:\n  ethernets:\n    eth0: {nameservers: {addresses: [1.1.1.1]}}\n",
         "sets nameservers for uplink eth0 (ethernets.eth0)"),
        ("network:\n  ethernets:\n    eth0:\n      routing-policy: [{from: 10.0.0.0/8, table: 5}]\n",
         "sets routing-policy for uplink eth0"),
        ("network:\n  ethernets:\n    nic:\n      match: {name: eth0}\n      addresses: [10.0.0.1/8]\n",
         "sets addresses for uplink eth0 (ethernets.nic (match: name: eth0))"),
        ("network:\n  ethernets:\n    nic: {set-name: eth0, dhcp4: true}\n",
         "sets dhcp4: true for uplink eth0 (ethernets.nic (set-name: eth0)) and is a separate"),
        ("network:\n  bonds:\n    eth0: {interfaces: []}\n",
         "defines uplink eth0 under bonds (bonds.eth0), the agent's "
         "/etc/netplan/60-underlay-br1.yaml under ethernets"),
        ("network:\n  bonds:\n    bond0: {interfaces: [eth0]}\n",
         "makes uplink eth0 a member of bonds.bond0"),
        ("network:\n  ethernets:\n    eth0: {addresses: [10.0.0.1/8\n",
         "netplan file /etc/netplan/50-x.yaml is not valid YAML"),
    ],
)  # fmt: skip
def test_other_definitions_of_the_uplink_are_refused(
    tmp_path: Path, content: str, expect: str
) -> None:
    put(tmp_path, "/etc/netplan/50-x.yaml", content)
    found = refusals(tmp_path)
    assert len(found) == 1 and expect in found[0], found
    assert "/etc/netplan/50-x.yaml" in found[0] and "persistence: none" in found[0]


@pytest.mark.parametrize(
    "content",
    [
        "network:\n  ethernets:\n    eth0: {dhcp4: true, dhcp6: true, mtu: 1500}\n",
        "network:\n  ethernets:\n    eth1: {addresses: [10.0.0.1/8]}\n",  # another NIC
        "network:\n  ethernets:\n    nic:\n      match: {name: 'eth*'}\n      dhcp4: true\n",
        "network:\n  ethernets:\n    eth0: {addresses: [], nameservers: {}}\n",
        "",  # empty file
    ],
)
def test_definitions_our_file_overrides_are_fine(tmp_path: Path, content: str) -> None:
    put(tmp_path, "/etc/netplan/50-x.yaml", content)
    assert refusals(tmp_path) == ()


def test_move_addresses_false_keeps_the_uplinks_own_addresses(tmp_path: Path) -> None:
    """moveAddresses false: the addresses stay on the uplink live, so the file may keep them."""
    put(tmp_path, "/etc/netplan/50-cloud-init.yaml", CLOUD_INIT_STATIC)
    assert refusals(tmp_path, desired(moveAddresses=False)) == ()


def test_our_file_shadowed_in_run_is_refused(tmp_path: Path) -> None:
    put(tmp_path, "/run/netplan/60-underlay-br1.yaml", "network: {version: 2}\n")
    (reason,) = refusals(tmp_path)
    assert reason.startswith("netplan file /run/netplan/60-underlay-br1.yaml shadows the agent's")


def test_bonded_uplinks_name_the_bond_port(tmp_path: Path) -> None:
    put(tmp_path, "/etc/netplan/50-x.yaml",
        "network:\n  ethernets:\n    eth1: {addresses: [10.0.0.1/8]}\n")  # fmt: skip
    (reason,) = refusals(tmp_path, desired(uplinks=["eth0", "eth1"]))
    assert "for uplink eth1 (ethernets.eth1)" in reason
    assert "(the agent puts them on br1-bond)" in reason


def test_uplink_that_is_a_netplan_bond_or_vlan_is_found_by_its_id(tmp_path: Path) -> None:
    put(tmp_path, "/etc/netplan/50-x.yaml",
        "network:\n  bonds:\n    bond0:\n      interfaces: [eth5]\n"
        "      addresses: [10.0.0.1/8]\n  vlans:\n    vlan7: {id: 7, link: bond0, dhcp4: true}\n"
        "    vlan8: {id: 8, link: bond0, routes: [{to: default, via: 10.0.0.9}]}\n")  # fmt: skip
    bond = refusals(tmp_path, desired(uplinks=["bond0"]))
    assert any("sets addresses for uplink bond0 (bonds.bond0)" in r for r in bond), bond
    assert any("defines uplink bond0 under bonds" in r for r in bond), bond
    vlan7 = refusals(tmp_path, desired(uplinks=["vlan7"]))
    assert len(vlan7) == 1 and "defines uplink vlan7 under vlans (vlans.vlan7)" in vlan7[0]
    vlan8 = refusals(tmp_path, desired(uplinks=["vlan8"]))
    assert any("sets routes for uplink vlan8 (vlans.vlan8)" in r for r in vlan8), vlan8


def nm_profile(root: Path, name: str, **connection: str) -> str:
    path = f"/etc/NetworkManager/system-connections/{name}.nmconnection"
    mac = connection.pop("mac", None)
    body = "[connection]\n" + "".join(f"{k}={v}\n" for k, v in connection.items())
    body += f"\n[ethernet]\nmac-address={mac}\n" if mac else ""
    body += "\n[ipv4]\nmethod=auto\n"
    assert nmcli_check(body).returncode == 0  # a profile NM itself accepts
    put(root, path, body)
    return path


def test_networkmanager_profiles_carry_autoconnect_priority_nm_understands() -> None:
    """nmcli --offline drops a setting it does not know or a value out of range without an
    error, so the check is that its normalized output still carries the priority."""
    d = desired(uplinks=["eth0", "eth1"])
    files = get_backend("networkmanager").render(d, STATE)
    kf = keyfiles(files)
    assert len(kf) == 6
    for path, cp in kf.items():
        assert cp["connection"]["autoconnect-priority"] == "100", path
        proc = nmcli_check(files[path][0])
        assert proc.returncode == 0, proc.stderr
        assert "\nautoconnect-priority=100\n" in proc.stdout, proc.stdout
    out_of_range = files[next(iter(kf))][0].replace("priority=100", "priority=5000")
    assert "autoconnect-priority" not in nmcli_check(out_of_range).stdout  # the check can fail


def test_competing_networkmanager_profiles_are_listed(tmp_path: Path) -> None:
    backend = get_backend("networkmanager")
    backend.write(tmp_path, backend.render(desired(), STATE))  # our own: never competing
    uuid = "5d3c2b9e-6f0a-4c1e-9a57-0c6b1f2e8d4"
    wired = nm_profile(tmp_path, "Wired connection 1", id="Wired connection 1",
                       uuid=uuid + "1", type="ethernet", **{"interface-name": "eth0"})  # fmt: skip
    by_mac = nm_profile(tmp_path, "by-mac", id="by-mac", uuid=uuid + "2", type="ethernet",
                        mac="AA:BB:CC:00:11:22")  # fmt: skip
    nm_profile(tmp_path, "other-mac", id="other-mac", uuid=uuid + "3", type="ethernet",
               mac="AA:BB:CC:00:11:99")  # fmt: skip
    nm_profile(tmp_path, "eth1", id="eth1", uuid=uuid + "4", type="ethernet",
               **{"interface-name": "eth1"})  # fmt: skip
    nm_profile(tmp_path, "manual", id="manual", uuid=uuid + "5", type="ethernet",
               autoconnect="false", **{"interface-name": "eth0"})  # fmt: skip
    found = backend.inspect(tmp_path, desired(), MACS)
    assert found.refusals == ()
    assert found.notes == (  # files by name
        f"NetworkManager profile 'Wired connection 1' ({wired}, interface-name, "
        "autoconnect-priority 0) also autoconnects on uplink eth0; the agent's profiles have "
        "autoconnect-priority 100, so NM activates them after a reboot",
        f"NetworkManager profile 'by-mac' ({by_mac}, mac-address, autoconnect-priority 0) also "
        "autoconnects on uplink eth0; the agent's profiles have autoconnect-priority 100, so NM "
        "activates them after a reboot",
    )


def test_competing_profile_with_a_higher_priority_is_refused(tmp_path: Path) -> None:
    path = nm_profile(tmp_path, "any", id="any", uuid="5d3c2b9e-6f0a-4c1e-9a57-0c6b1f2e8d40",
                      type="ethernet", **{"autoconnect-priority": "100"})  # fmt: skip
    found = get_backend("networkmanager").inspect(tmp_path, desired(), MACS)
    assert found.notes == ()
    assert found.refusals == (
        f"NetworkManager profile 'any' ({path}, any device, autoconnect-priority 100) "
        "autoconnects on uplink eth0 with a priority not below the agent's 100: after a reboot "
        "NM could activate it and eth0 would not join br1; lower its autoconnect-priority or "
        f"set autoconnect=false in {path}, or use persistence: none",
    )
