"""CNI request decoding (env + stdin) and result rendering per spec version."""

from __future__ import annotations

import json

import pytest
from node_agent.cni import result
from node_agent.cni.errors import CniError
from node_agent.cni.ovs_plugin import parse_conf
from node_agent.cni.request import decode_env_block, decode_request, parse_cni_args

RESULT = {
    "interfaces": [
        {"name": "veth0a1b2c3d", "mac": "aa:bb:cc:dd:ee:ff"},
        {"name": "eth0", "mac": "0a:58:ac:12:1e:83", "sandbox": "/run/netns/p"},
    ],
    "ips": [
        {"address": "172.18.30.131/16", "gateway": "172.18.0.1", "interface": 1},
        {"address": "fd00::5/64", "interface": 1},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "172.18.0.1"}],
    "dns": {},
}
ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c",
    "CNI_NETNS": "/run/netns/p",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/a:/b",
    "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=u;IgnoreUnknown=1",
}


def test_render_1_0_0_has_no_ip_version() -> None:
    out = result.render(RESULT, "1.0.0")
    assert out["cniVersion"] == "1.0.0"
    assert all("version" not in ip for ip in out["ips"])
    assert out["interfaces"][1]["sandbox"] == "/run/netns/p"


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_render_old_versions_add_ip_version(version: str) -> None:
    out = result.render(RESULT, version)
    assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    assert out["ips"][0] == {
        "version": "4",
        "address": "172.18.30.131/16",
        "gateway": "172.18.0.1",
        "interface": 1,
    }
    assert result.parse(json.dumps(out)) == RESULT  # and back


def test_render_ipam_result_without_interfaces() -> None:
    out = result.render({"ips": [{"address": "10.0.0.2/24"}], "routes": [], "dns": {}}, "1.0.0")
    assert out == {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}], "dns": {}}


def test_parse_rejects_non_json() -> None:
    with pytest.raises(CniError) as e:
        result.parse(b"oops", who="host-local output")
    assert e.value.code == 6 and "host-local output" in e.value.msg


def test_version_check() -> None:
    assert result.check_version({}) == "1.0.0"
    with pytest.raises(CniError) as e:
        result.check_version({"cniVersion": "1.1.0"})
    assert e.value.code == 1


def test_decode_request() -> None:
    req = decode_request(
        ENV, json.dumps({"cniVersion": "0.4.0", "name": "n", "type": "underlay-ovs"}).encode()
    )
    assert (req.command, req.container_id, req.netns, req.ifname, req.version) == (
        "ADD",
        "c",
        "/run/netns/p",
        "eth0",
        "0.4.0",
    )
    assert req.path == ["/a", "/b"]
    assert (req.pod_namespace, req.pod_name, req.pod_uid) == ("ns", "p", "u")
    assert req.describe() == "ADD container=c ifname=eth0 pod=ns/p"


def test_del_needs_no_netns() -> None:
    env = {k: v for k, v in ENV.items() if k != "CNI_NETNS"}
    assert decode_request({**env, "CNI_COMMAND": "DEL"}, b'{"type": "underlay-ovs"}').netns == ""


def test_bad_cni_args_and_env_block() -> None:
    with pytest.raises(CniError) as e:
        parse_cni_args("A=1;broken")
    assert e.value.code == 4 and "broken" in e.value.msg
    assert decode_env_block(b"CNI_A=x=y\0CNI_B=\0") == {"CNI_A": "x=y", "CNI_B": ""}
    with pytest.raises(CniError):
        decode_env_block(b"NOEQUALS\0")


def test_bad_ifname_is_invalid_env() -> None:
    with pytest.raises(CniError) as e:
        decode_request({**ENV, "CNI_IFNAME": "a-very-long-interface-name"}, b'{"type": "x"}')
    assert e.value.code == 4


def test_ovs_conf_vlan_trunk_mac() -> None:
    c = parse_conf(
        {"bridge": "br1", "vlan": 0, "trunk": [{"minID": 5, "maxID": 7}, {"id": 5}, {"id": 100}]}
    )
    assert c.vlan is None and c.trunks == [5, 6, 7, 100]
    assert parse_conf({"bridge": "br1", "vlan": 10}).vlan == 10
    assert (
        parse_conf({"bridge": "b", "mac": "AA:BB:CC:DD:EE:01"}, {"MAC": "02:00:00:00:00:01"}).mac
        == "02:00:00:00:00:01"
    )
    for bad in (
        {"bridge": "b", "vlan": 4095},
        {"bridge": "b", "trunk": [{"minID": 9, "maxID": 3}]},
        {"bridge": "b", "trunk": [{}]},
        {"bridge": "b", "mtu": "1500"},
        {"bridge": "b", "mac": "zz"},
        {"bridge": "b", "ipam": {"no": "type"}},
    ):
        with pytest.raises(CniError) as e:
            parse_conf(bad)
        assert e.value.code == 7, bad
    with pytest.raises(CniError) as e:
        parse_conf({"bridge": "b", "deviceID": "0000:00:01.0"})
    assert e.value.code == 2


@pytest.mark.parametrize(
    ("ifname", "ok"),
    [("eth0", True), ("a" * 15, True), ("net1.100", True), ("", False), (".", False),
     ("..", False), ("eth 0", False), ("eth0:1", False), ("a/b", False), ("a" * 16, False)],
)  # fmt: skip
def test_ifname_follows_linux_dev_valid_name(ifname: str, ok: bool) -> None:
    env = {**ENV, "CNI_IFNAME": ifname}
    if ok:
        assert decode_request(env, b'{"type": "x"}').ifname == ifname
        return
    with pytest.raises(CniError) as e:
        decode_request(env, b'{"type": "x"}')
    assert e.value.code == 4 and "CNI_IFNAME" in e.value.msg


@pytest.mark.parametrize(
    ("conf", "args", "field"),
    [
        ({"mac": "zz:zz:zz:zz:zz:zz"}, {}, "mac 'zz:zz:zz:zz:zz:zz'"),
        ({"mac": 12}, {}, "mac 12"),
        ({"mac": "01:00:5e:00:00:01"}, {}, "multicast"),
        ({"runtimeConfig": {"mac": "0a:58:ac:12:1e"}}, {}, "runtimeConfig.mac"),
        ({}, {"MAC": "0a-58-ac-12-1e-83"}, "CNI_ARGS MAC"),
    ],
)
def test_bad_mac_is_invalid_config_naming_the_field(
    conf: dict[str, object], args: dict[str, str], field: str
) -> None:
    with pytest.raises(CniError) as e:
        parse_conf({"bridge": "b", **conf}, args)
    assert e.value.code == 7 and field in e.value.msg


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"ips": [{"address": "10.0.0.5"}]}, "ips[0].address '10.0.0.5'"),
        ({"ips": [{"address": "10.0.0.5/24", "gateway": "nope"}]}, "ips[0].gateway 'nope'"),
        ({"ips": ["10.0.0.5/24"]}, "ips is not a list of objects"),
        ({"routes": [{"dst": "default"}]}, "routes[0].dst 'default'"),
        ({"routes": [{"dst": "0.0.0.0/0", "gw": 5}]}, "routes[0].gw 5"),
        ({"dns": "8.8.8.8"}, "dns is not an object"),
    ],
)
def test_malformed_results_of_other_plugins_are_decode_failures(
    obj: dict[str, object], field: str
) -> None:
    with pytest.raises(CniError) as e:
        result.parse(json.dumps(obj), who="host-local")
    assert e.value.code == 6 and e.value.msg.startswith("host-local: ") and field in e.value.msg
