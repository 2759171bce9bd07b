"""DesiredBridge from OvsBridge objects: defaults, spec.bridge, nodeOverrides, nodeSelector."""

from __future__ import annotations

import pytest
from node_agent.bridges import DesiredBridge, InvalidBridge


def obj(**spec: object) -> dict[str, object]:
    return {
        "apiVersion": "underlay.dev/v1alpha1",
        "kind": "OvsBridge",
        "metadata": {"name": "br1"},
        "spec": {"uplinks": ["eth0"], **spec},
    }


def test_defaults_follow_the_schema() -> None:
    d = DesiredBridge.from_object(obj(), "n1")
    assert d.name == "br1"
    assert d.object_name == "br1"
    assert d.uplinks == ("eth0",)
    assert d.bond_mode == "active-backup"
    assert d.move_addresses is True
    assert d.mtu is None
    assert d.persistence == "auto"
    assert d.datapath_type == "auto"
    assert d.probe_timeout == 20.0


def test_spec_bridge_overrides_metadata_name() -> None:
    d = DesiredBridge.from_object(obj(bridge="ovsbr0", mtu=9000, bondMode="balance-slb"), "n1")
    assert (d.name, d.object_name, d.mtu, d.bond_mode) == ("ovsbr0", "br1", 9000, "balance-slb")


def test_node_override_applies_only_to_that_node() -> None:
    o = obj(
        mtu=1500,
        nodeOverrides=[
            {"nodeName": "n2", "uplinks": ["ens5", "ens6"], "mtu": 9000, "moveAddresses": False,
             "persistence": "none"},
        ],
    )  # fmt: skip
    d1 = DesiredBridge.from_object(o, "n1")
    d2 = DesiredBridge.from_object(o, "n2")
    assert (d1.uplinks, d1.mtu, d1.move_addresses, d1.persistence) == (
        ("eth0",),
        1500,
        True,
        "auto",
    )
    assert (d2.uplinks, d2.mtu, d2.move_addresses, d2.persistence) == (
        ("ens5", "ens6"),
        9000,
        False,
        "none",
    )


def test_node_selector_is_equality_on_labels() -> None:
    o = obj(nodeSelector={"underlay.dev/ovs": "true", "zone": "a"})
    d = DesiredBridge.from_object(o, "n1")
    assert d.selects({"underlay.dev/ovs": "true", "zone": "a", "other": "x"})
    assert not d.selects({"underlay.dev/ovs": "true", "zone": "b"})
    assert not d.selects({})
    assert DesiredBridge.for_node(o, "n1", {"zone": "a"}) is None
    assert DesiredBridge.for_node(obj(), "n1", {}) is not None  # no selector: every node


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"uplinks": []}, "spec.uplinks"),
        ({"uplinks": ["eth0", "eth0"]}, "twice"),
        ({"persistence": "ifupdown"}, "persistence"),
        ({"datapathType": "dpdk"}, "datapathType"),
    ],
)
def test_bad_objects_are_refused_with_the_field(spec: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidBridge, match=message) as err:
        DesiredBridge.from_object(obj(**spec), "n1")
    assert "br1" in str(err.value)
