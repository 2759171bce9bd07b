"""Pure parts of the agent's rollout and status handling: maxUnavailable resolution, slot
names, which peers stop a rollout, the five enactment conditions, the status comparison that
keeps a restarted agent from writing, and the replay record round trip."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from node_agent import bridges, daemon, persistence, rollout
from node_agent.bridges import DesiredBridge
from node_agent.links import Address, Route
from node_agent.persistence import NodeNetConfig


@pytest.mark.parametrize(
    ("value", "nodes", "expected"),
    [
        (None, 10, 1),  # default 1
        (1, 10, 1),
        (3, 2, 3),  # an int is taken as is
        ("50%", 3, 2),  # rounded up, as DaemonSet maxUnavailable
        ("25%", 10, 3),
        ("100%", 7, 7),
        ("1%", 3, 1),
        ("10%", 0, 1),  # at least 1
    ],
)
def test_max_unavailable(value: Any, nodes: int, expected: int) -> None:
    assert rollout.max_unavailable(value, nodes) == expected


@pytest.mark.parametrize("value", [0, -1, "0%", "101%", "x%", "5", True, 2.5])
def test_max_unavailable_rejects_nonsense(value: Any) -> None:
    with pytest.raises(ValueError, match="maxUnavailable"):
        rollout.max_unavailable(value, 3)


def test_lease_names_are_dns_subdomains_and_distinct() -> None:
    assert rollout.lease_name("br1", 0) == "underlay-rollout.br1.0"
    long_a, long_b = "a" * 250, "a" * 249 + "b"
    na, nb = rollout.lease_name(long_a, 1), rollout.lease_name(long_b, 1)
    assert len(na) <= 253 and len(nb) <= 253 and na != nb
    assert na.endswith(".1")


def enactment(node: str, active: str, gen: int, message: str = "m") -> dict[str, Any]:
    return {
        "metadata": {"name": f"{node}.br1"},
        "status": {
            "node": node,
            "observedGeneration": gen,
            "conditions": daemon.conditions(active, "R", message, gen),
        },
    }


def test_failing_peers_count_only_other_nodes_at_this_generation() -> None:
    es = [
        enactment("n1", "Failing", 2, "probe gateway failed"),
        enactment("n2", "Failing", 1),  # an older generation: does not stop generation 2
        enactment("n3", "Ready", 2),
        enactment("n4", "Failing", 2, "uplink eth7 does not exist"),
        enactment("me", "Failing", 2),  # our own failure is not a peer's
    ]
    assert rollout.failing_peers(es, "me", 2) == [
        ("n1", "probe gateway failed"),
        ("n4", "uplink eth7 does not exist"),
    ]
    assert rollout.failing_peers(es, "me", 3) == []


def test_conditions_one_true_with_generation() -> None:
    conds = daemon.conditions("Pending", "WaitingForSlot", "held by n2", 4)
    assert [c["type"] for c in conds] == ["Ready", "Progressing", "Failing", "Pending", "Aborted"]
    assert [c["status"] for c in conds] == ["False", "False", "False", "True", "False"]
    assert all(c["observedGeneration"] == 4 and c["reason"] == "WaitingForSlot" for c in conds)


def test_same_status_ignores_only_transition_times() -> None:
    a = {"node": "n1", "conditions": daemon.conditions("Ready", "Enacted", "ok", 1)}
    b = {"node": "n1", "conditions": daemon.conditions("Ready", "Enacted", "ok", 1)}
    for c in a["conditions"]:
        c["lastTransitionTime"] = "2025-01-01T00:00:00Z"
    assert daemon._same_status(a, b)
    b["lastRepair"] = {"time": "t"}
    assert not daemon._same_status(a, b)
    c = {"node": "n1", "conditions": daemon.conditions("Ready", "Enacted", "other", 1)}
    assert not daemon._same_status(a, c)


def test_replay_record_round_trip(tmp_path: Path) -> None:
    """What the agent enacted comes back from the replay records without the API server."""
    obj = {
        "metadata": {"name": "uplink-net"},
        "spec": {"bridge": "br2", "uplinks": ["eth1", "eth2"], "mtu": 9000,
                 "bondMode": "balance-slb", "persistence": "none", "nodeSelector": {"a": "b"}},
    }  # fmt: skip
    d = DesiredBridge.from_object(obj, "n1")
    cfg = NodeNetConfig(
        mac="aa:bb:cc:00:11:22",
        addresses=(Address("172.19.10.11/16", socket.AF_INET),),
        routes=(Route(socket.AF_INET, "default", "172.19.0.1", 200),),
    )
    persistence.write_atomic(tmp_path, bridges.record_path("br2"), bridges.render_record(d, cfg))
    persistence.write_atomic(tmp_path, bridges.record_path("br9"), "{not json")  # skipped
    assert bridges.recorded_bridges(tmp_path) == [d]
    assert bridges.read_record(tmp_path, "br2") == cfg
    assert bridges.recorded_bridges(tmp_path / "nothing-here") == []


def test_classify_names_the_kind_of_drift() -> None:
    p = bridges.Plan(
        "br1",
        changes=(
            bridges.Change("ovs", "create OVS bridge br1 (datapath_type netdev)"),
            bridges.Change("ovs", "add uplink port eth0 (eth0) to br1"),
            bridges.Change("ovs", "set mtu_request of eth0: None -> 1400"),
            bridges.Change("link", "set br1 up"),
            bridges.Change("file", "create /etc/netplan/60-underlay-br1.yaml (netplan)"),
            bridges.Change("file", "rewrite edited /etc/netplan/60-underlay-br1.yaml (netplan)"),
        ),
    )
    assert [d.kind for d in bridges.classify(p)] == [
        "bridge-missing", "uplink-port-missing", "ovs-config", "link", "file-missing",
        "file-edited",
    ]  # fmt: skip
    assert bridges.classify(bridges.Plan("br1", invalid=("bad",))) == [
        bridges.Drift("invalid", "bad")
    ]
