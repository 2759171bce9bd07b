"""Render: NAD naming, CNI config list, labels and order, per DESIGN.md and Spiderpool."""

from __future__ import annotations

import json

import pytest

from reconciler import render, vocab

POOL = {
    "apiVersion": "spiderpool.spidernet.io/v2beta1",
    "kind": "SpiderIPPool",
    "metadata": {"name": "ippool-test"},
    "spec": {
        "ips": ["172.18.30.131-172.18.30.140"],
        "subnet": "172.18.0.0/16",
        "gateway": "172.18.0.1",
        "multusName": ["kube-system/ovs-conf"],
    },
}
SMC = {
    "apiVersion": "spiderpool.spidernet.io/v2beta1",
    "kind": "SpiderMultusConfig",
    "metadata": {"name": "ovs-conf", "namespace": "kube-system"},
    "spec": {"cniType": "ovs", "ovs": {"bridge": "br1"}},
}
BRIDGE = {
    "apiVersion": "underlay.dev/v1alpha1",
    "kind": "OvsBridge",
    "metadata": {"name": "br1"},
    "spec": {"uplinks": ["eth0"]},
}


def test_quickstart_nad_is_the_design_example() -> None:
    out = render.render([SMC, POOL, BRIDGE], "underlay")
    assert [d.resource.kind for d in out] == [
        "OvsBridge",
        "SpiderIPPool",
        "SpiderMultusConfig",
        "NetworkAttachmentDefinition",
    ]
    nad = out[-1]
    assert nad.key == ("NetworkAttachmentDefinition", "kube-system", "ovs-conf")
    assert json.loads(nad.body["spec"]["config"]) == {
        "cniVersion": "1.0.0",
        "name": "ovs-conf",
        "plugins": [{"type": "underlay-ovs", "bridge": "br1", "ipam": {"type": "underlay-ipam"}}],
    }
    assert nad.owner == ("SpiderMultusConfig", "kube-system", "ovs-conf")
    assert nad.body["metadata"]["annotations"] == {
        "k8s.v1.cni.cncf.io/resourceName": "underlay.dev/br1"
    }


def test_every_object_carries_the_ownership_labels_and_input_is_not_modified() -> None:
    out = render.render([POOL], "blue")
    labels = out[0].body["metadata"]["labels"]
    assert labels == {vocab.LABEL_MANAGED_BY: "underlay", vocab.LABEL_INSTANCE: "blue"}
    assert "labels" not in POOL["metadata"]


def test_annotations_name_the_nad_and_set_cni_version_and_name() -> None:
    smc = json.loads(json.dumps(SMC))
    smc["metadata"]["annotations"] = {
        vocab.ANNO_SMC_CR_NAME: "other-nad",
        vocab.ANNO_SMC_CNI_VERSION: "0.4.0",
        vocab.ANNO_SMC_CNICONFIG_NAME: "cni-name",
    }
    smc["spec"]["ovs"].update({"vlan": 100, "ippools": {"ipv4": ["p4"], "ipv6": ["p6"]}})
    nad = render.render([smc])[-1]
    assert nad.name == "other-nad"
    assert nad.body["metadata"]["annotations"][vocab.ANNO_SMC_CR_NAME] == "other-nad"
    conf = json.loads(nad.body["spec"]["config"])
    assert conf["cniVersion"] == "0.4.0" and conf["name"] == "cni-name"
    assert conf["plugins"][0]["vlan"] == 100
    assert conf["plugins"][0]["ipam"] == {
        "type": "underlay-ipam",
        "default_ipv4_ippool": ["p4"],
        "default_ipv6_ippool": ["p6"],
    }


def test_macvlan_with_vlan_and_disabled_ipam() -> None:
    smc = {
        **SMC,
        "spec": {
            "cniType": "macvlan",
            "disableIPAM": True,
            "macvlan": {"master": ["ens192"], "vlanID": 30},
        },
    }
    conf = json.loads(render.render([smc])[-1].body["spec"]["config"])
    assert conf["plugins"] == [{"type": "macvlan", "master": "ens192.30", "mode": "bridge"}]


def test_a_bond_is_the_parent_of_the_vlan_interface() -> None:
    """Spiderpool's controller puts the macvlan/ipvlan plugin on the bond when there is one."""
    smc = {
        **SMC,
        "spec": {
            "cniType": "ipvlan",
            "ipvlan": {
                "master": ["eth0", "eth1"],
                "bond": {"name": "bond0", "mode": 1},
                "vlanID": 7,
            },
        },
    }
    conf = json.loads(render.render([smc])[-1].body["spec"]["config"])
    assert [(p["type"], p["master"]) for p in conf["plugins"]] == [("ipvlan", "bond0.7")]


def test_chained_plugins_follow_the_main_plugin_in_order() -> None:
    """chainCNIJsonData is not dropped: each entry becomes a plugin after the main one."""
    smc = {
        **SMC,
        "spec": {
            "cniType": "ovs",
            "ovs": {"bridge": "br1"},
            "chainCNIJsonData": [
                '{"type": "tuning", "sysctl": {"net.ipv4.conf.all.arp_notify": "1"}}',
                '{"type": "bandwidth", "ingressRate": 1000000, "ingressBurst": 10000}',
            ],
        },
    }
    conf = json.loads(render.render([smc])[-1].body["spec"]["config"])
    assert conf["plugins"] == [
        {"type": "underlay-ovs", "bridge": "br1", "ipam": {"type": "underlay-ipam"}},
        {"type": "tuning", "sysctl": {"net.ipv4.conf.all.arp_notify": "1"}},
        {"type": "bandwidth", "ingressRate": 1000000, "ingressBurst": 10000},
    ]


def test_unsupported_cni_type_names_it() -> None:
    smc = {**SMC, "spec": {"cniType": "sriov", "sriov": {}}}
    with pytest.raises(ValueError, match="'sriov'"):
        render.render([smc])


def test_output_order_is_independent_of_input_order() -> None:
    a = {**POOL, "metadata": {"name": "a"}}
    b = {**POOL, "metadata": {"name": "b"}}
    assert [d.name for d in render.render([b, a])] == ["a", "b"]


def test_ip_version_is_inferred_from_the_subnet_like_spiderpools_webhook() -> None:
    v4, v6 = render.render(
        [POOL, {**POOL, "metadata": {"name": "v6"}, "spec": {"subnet": "fd00::/64"}}]
    )
    assert v4.body["spec"]["ipVersion"] == 4
    assert v6.body["spec"]["ipVersion"] == 6
    assert "ipVersion" not in POOL["spec"]


def test_a_status_in_git_is_not_part_of_the_desired_object() -> None:
    """status is the controller's (written through the subresource): plan -o yaml must not
    show it among the fields that would be written."""
    pool = {**POOL, "status": {"allocatedIPCount": 0, "allocatedIPs": "{}"}}
    (d,) = render.render([pool])
    assert "status" not in d.body and d.body["spec"] == {**POOL["spec"], "ipVersion": 4}
    assert pool["status"] == {"allocatedIPCount": 0, "allocatedIPs": "{}"}  # input untouched


def test_duplicate_json_members_are_refused_not_silently_last_wins() -> None:
    smc = {
        **SMC,
        "spec": {"cniType": "ovs", "ovs": {"bridge": "br1"},
                 "chainCNIJsonData": ['{"type": "tuning", "mtu": 1500, "mtu": 9000}']},
    }  # fmt: skip
    with pytest.raises(ValueError, match=r'chainCNIJsonData\[0\].*duplicate member "mtu"'):
        render.render([smc])
