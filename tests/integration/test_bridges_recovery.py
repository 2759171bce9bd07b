"""Bridges that survive an agent killed mid-change, moveAddresses turned off, and spec.mtu
unset: the agent process on the real rig (OVS in the node namespace) against the real control
plane. Checked with the operator's tools: ip, ovs-vsctl, ``netplan generate``.

- an agent SIGKILLed while its probe runs leaves a journal of the state before the change; the
  restarted agent rolls the node back to exactly that state and reports Failing (never Ready,
  never persisting the unprobed state);
- moveAddresses true -> false gives the addresses, routes and MAC back to the uplink (probe,
  rollback when it fails) and keeps them for the uplink in the netplan file and the replay
  record, so a reboot brings them back;
- spec.mtu 9000 then unset sets the uplink and the bridge back to the MTU they had, clears
  ``mtu_request``; removal after that leaves 1500 too.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from tests.integration.test_agent import (  # noqa: F401
    DATA_IPS,
    IPS,
    NETPLAN_FILE,
    RECORD_FILE,
    World,
    assert_same_state,
    node_state,
    ovs_bridge,
    world_fixture,
)
from tests.rig import DATA_GATEWAY, GATEWAY, Node, wait_for

JOURNAL_DIR = "var/lib/underlay/bridges"


def mtu(node: Node, dev: str) -> int:
    return int(node.run("cat", f"/sys/class/net/{dev}/mtu").stdout.strip())


def netplan_generate(node: Node, tmp: Path) -> str:
    """``netplan generate --root-dir`` over a copy of the node's netplan files (generate writes
    under <root>/run, which would change the node's file tree); returns the networkd files."""
    root = tmp / f"netplan-{node.name}-{time.monotonic_ns()}"
    shutil.copytree(node.root / "etc/netplan", root / "etc/netplan")
    proc = subprocess.run(
        ["netplan", "generate", "--root-dir", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = "".join(
        f"--- {p.name}\n{p.read_text()}"
        for p in sorted((root / "run/systemd/network").glob("*.network"))
    )
    shutil.rmtree(root)
    return out


def record(node: Node, bridge: str = "br1") -> dict[str, Any]:
    return json.loads((node.root / JOURNAL_DIR / f"{bridge}.json").read_text())


def journals(node: Node) -> list[str]:
    d = node.root / JOURNAL_DIR
    return sorted(p.name for p in d.glob("*.journal")) if d.is_dir() else []


def ovs_col(node: Node, table: str, row: str, column: str) -> str:
    return node.vsctl("get", table, row, column).strip()


# --- 1. agent killed during the probe --------------------------------------------------------


def test_agent_killed_during_the_probe_is_rolled_back_at_restart(world: World) -> None:
    """br2 over eth1 whose gateway never answers; the agent is SIGKILLed while the probe runs
    (the node is half-changed: br2 carries eth1's address, a journal names the state before).
    The restarted agent rolls the node back to exactly that state (addresses, routes, links,
    OVSDB, files), reports Failing with "interrupted during the probe; rolled back", writes no
    persistence file or replay record, leaves no journal and does not try the generation
    again."""
    w = world
    n1 = w.node("n1", data=True)
    w.rig.unplug("n1", "eth1")
    before = node_state(n1)
    w.cluster.apply_bridge(ovs_bridge("br2", uplinks=["eth1"], probeTimeoutSeconds=30))
    a = w.agent("n1")
    a.wait_log("changing n1")
    wait_for(
        lambda: n1.link_exists("br2") and n1.addresses("br2") == [f"{DATA_IPS['n1']}/16"],
        10,
        "br2 carries eth1's address",
    )
    assert journals(n1) == ["br2.journal"]
    time.sleep(0.5)  # the probe is running
    a.stop(signal.SIGKILL)
    assert n1.addresses("br2") == [f"{DATA_IPS['n1']}/16"]  # half-done, as the kill left it
    assert not (n1.root / "etc/netplan/60-underlay-br2.yaml").exists()

    b = w.agent("n1")
    _, reason, message = w.cluster.wait_condition("n1", "Failing", "br2", timeout=30)
    assert reason == "ProbeFailed"
    assert "interrupted during the probe; rolled back" in message, message
    assert "journal /var/lib/underlay/bridges/br2.journal" in message
    e = w.cluster.enactment("n1", "br2")
    assert e is not None
    assert "enactedState" not in e["status"]
    assert any("restored OVS bridge br2 (deleted)" in r for r in e["status"]["lastRollback"])
    assert "underlay.dev/br2" not in w.cluster.capacity("n1")
    assert_same_state(node_state(n1), before)  # OVS, addresses, routes, links, files
    assert journals(n1) == []
    assert n1.addresses("eth1") == [f"{DATA_IPS['n1']}/16"]
    assert not n1.link_exists("br2")
    netplan_generate(n1, w.tmp)  # the node's netplan configuration is still valid
    time.sleep(2.5)  # resync passes: the failed generation is not tried again
    # rolled back at start, before the first pass, and reported on the enactment by that pass
    assert "bridge br2 on n1: an earlier run of the agent was interrupted" in b.text(), b.text()
    assert b.text().count("changing n1") <= 1, b.text()
    assert w.cluster.condition("n1", "br2")[0] == "Failing"
    assert_same_state(node_state(n1), before)
    assert b.stop() == 0, b.text()[-6000:]


# --- 2. moveAddresses true -> false ----------------------------------------------------------


def test_move_addresses_turned_off_gives_the_node_back_to_the_uplink(world: World) -> None:
    """br1 over eth0 with moveAddresses true (Ready), then false: eth0 carries the address
    and the default route again, br1 none, OVSDB no longer gives br1 eth0's MAC; the netplan
    file (accepted by ``netplan generate``) and the replay record keep the address for eth0;
    Ready. After a reboot (OVS database wiped, links flushed) the restarted agent puts the
    address back on eth0 and the node reaches its gateway; removal leaves eth0 configured."""
    w = world
    n1 = w.node("n1")
    ip = f"{IPS['n1']}/16"
    w.cluster.apply_bridge(ovs_bridge())
    a = w.agent("n1")
    w.cluster.wait_condition("n1", "Ready")
    assert n1.addresses("br1") == [ip] and n1.default_route_dev() == "br1"
    assert (
        ovs_col(n1, "Bridge", "br1", "other_config:hwaddr").strip('"')
        == n1.run("cat", "/sys/class/net/eth0/address").stdout.strip()
    )

    w.cluster.apply_bridge(ovs_bridge(moveAddresses=False))
    wait_for(
        lambda: (
            (e := w.cluster.enactment("n1"))
            and e["status"].get("enactedGeneration") == 2
            and w.cluster.condition("n1")[0] == "Ready"
        ),
        20,
        "generation 2 Ready",
    )
    assert n1.addresses("eth0") == [ip]
    assert n1.addresses("br1") == []
    assert n1.default_route_dev() == "eth0"
    assert n1.ping(GATEWAY, count=1)
    assert "hwaddr" not in ovs_col(n1, "Bridge", "br1", "other_config")
    changes = w.cluster.enactment("n1")["status"]["lastChanges"]  # type: ignore[index]
    assert any(c.startswith("clear other_config:hwaddr=") for c in changes), changes
    assert f"add address {ip} to eth0" in changes and f"delete address {ip} from br1" in changes

    plan = yaml.safe_load((n1.root / NETPLAN_FILE).read_text())["network"]
    assert plan["ethernets"]["eth0"] == {
        "dhcp4": False,
        "dhcp6": False,
        "addresses": [ip],
        "routes": [{"to": "default", "via": GATEWAY}],
    }
    assert plan["bridges"]["br1"] == {"interfaces": ["eth0"], "openvswitch": {}}
    networkd = netplan_generate(n1, w.tmp)
    eth0_unit = networkd.split("--- 10-netplan-eth0.network\n", 1)[1].split("--- ", 1)[0]
    assert f"Address={ip}" in eth0_unit and f"Gateway={GATEWAY}" in eth0_unit, networkd
    rec = record(n1)
    assert rec["carrier"] == "eth0" and rec["mac"] is None
    assert [x["cidr"] for x in rec["addresses"]] == [ip]
    assert any(r["dst"] == "default" and r["gateway"] == GATEWAY for r in rec["routes"])
    assert journals(n1) == []
    assert a.stop() == 0, a.text()[-3000:]

    # reboot: OVS database wiped, br1 gone, eth0 flushed; the agent replays the record
    n1.reboot_ovs()
    for dev in ("br1", "ovs-netdev"):
        n1.run("ip", "link", "del", dev, check=False)
    n1.run("ip", "addr", "flush", "dev", "eth0")
    b = w.agent("n1")
    wait_for(lambda: n1.addresses("eth0") == [ip], 20, "eth0 address replayed")
    wait_for(lambda: n1.default_route_dev() == "eth0", 10, "default route on eth0")
    assert n1.ping(GATEWAY, count=1)
    wait_for(lambda: n1.link_exists("br1"), 10, "br1 rebuilt")
    assert n1.addresses("br1") == []
    w.cluster.wait_condition("n1", "Ready")

    w.cluster.delete_bridge("br1")
    wait_for(lambda: w.cluster.enactment("n1") is None, 20, "removed")
    assert not n1.link_exists("br1")
    assert n1.addresses("eth0") == [ip] and n1.default_route_dev() == "eth0"
    assert not (n1.root / NETPLAN_FILE).exists() and not (n1.root / RECORD_FILE).exists()
    assert b.stop() == 0, b.text()[-6000:]


def test_move_addresses_turned_off_is_rolled_back_when_the_probe_fails(world: World) -> None:
    """br2 over eth1 with moveAddresses true (Ready); eth1's cable is pulled, then
    moveAddresses false: the gateway probe fails, the node is put back as it was (br2 keeps
    the address, the MAC, the files), Failing names the probe."""
    w = world
    n1 = w.node("n1", data=True)
    ip = f"{DATA_IPS['n1']}/16"
    w.cluster.apply_bridge(ovs_bridge("br2", uplinks=["eth1"]))
    a = w.agent("n1")
    w.cluster.wait_condition("n1", "Ready", "br2")
    assert n1.addresses("br2") == [ip]
    w.rig.unplug("n1", "eth1")
    time.sleep(1.5)  # passes with the cable pulled: nothing to do, nothing changes
    before = node_state(n1)
    w.cluster.apply_bridge(ovs_bridge("br2", uplinks=["eth1"], moveAddresses=False))
    _, reason, message = w.cluster.wait_condition("n1", "Failing", "br2", timeout=30)
    assert reason == "ProbeFailed"
    assert f"probe gateway failed: default gateway {DATA_GATEWAY} did not answer" in message
    e = w.cluster.enactment("n1", "br2")
    assert e is not None
    assert any(f"{ip}" in r for r in e["status"]["lastRollback"]), e["status"]["lastRollback"]
    assert_same_state(node_state(n1), before)
    assert n1.addresses("br2") == [ip] and n1.addresses("eth1") == []
    assert record(n1, "br2")["carrier"] == "br2"
    assert journals(n1) == []
    assert a.stop() == 0, a.text()[-3000:]


# --- 3. spec.mtu unset -----------------------------------------------------------------------


def test_mtu_unset_sets_the_uplink_and_bridge_back(world: World) -> None:
    """mtu 9000 (the record keeps eth0's 1500), then unset: eth0 and br1 are 1500 again,
    mtu_request is cleared in OVSDB, the netplan file has no MTU (``netplan generate``
    accepts it), the record no longer keeps uplink_mtus, Ready. mtu 9000 again then removal:
    eth0 is 1500."""
    w = world
    n1 = w.node("n1")
    w.cluster.apply_bridge(ovs_bridge())
    a = w.agent("n1")
    w.cluster.wait_condition("n1", "Ready")
    assert mtu(n1, "eth0") == 1500
    assert "uplink_mtus" not in record(n1)

    w.cluster.apply_bridge(ovs_bridge(mtu=9000))
    wait_for(lambda: mtu(n1, "eth0") == 9000 and mtu(n1, "br1") == 9000, 20, "mtu 9000")
    wait_for(lambda: "uplink_mtus" in record(n1), 10, "record keeps the original MTU")
    assert record(n1)["uplink_mtus"] == {"eth0": 1500}
    assert "mtu: 9000" in (n1.root / NETPLAN_FILE).read_text()

    w.cluster.apply_bridge(ovs_bridge())  # the commit is reverted
    wait_for(
        lambda: (
            (e := w.cluster.enactment("n1"))
            and e["status"].get("enactedGeneration") == 3
            and w.cluster.condition("n1")[0] == "Ready"
        ),
        20,
        "generation 3 Ready",
    )
    assert mtu(n1, "eth0") == 1500 and mtu(n1, "br1") == 1500
    assert ovs_col(n1, "Interface", "eth0", "mtu_request") == "[]"
    assert ovs_col(n1, "Interface", "br1", "mtu_request") == "[]"
    plan = (n1.root / NETPLAN_FILE).read_text()
    assert "mtu" not in plan, plan
    assert "MTUBytes" not in netplan_generate(n1, w.tmp)
    assert "uplink_mtus" not in record(n1)
    changes = w.cluster.enactment("n1")["status"]["lastChanges"]  # type: ignore[index]
    # br1's own MTU (1500 above) the agent sets back unless ovs-vswitchd was first: without
    # mtu_request an internal interface gets its ports' smallest MTU, eth0's 1500 by then
    assert "set MTU of eth0 back to 1500" in changes, changes
    assert "clear mtu_request 9000 of br1" in changes, changes
    assert n1.ping(GATEWAY, count=1)
    time.sleep(1.5)  # vswitchd and later passes leave it so
    assert mtu(n1, "eth0") == 1500 and mtu(n1, "br1") == 1500
    assert w.cluster.condition("n1")[0] == "Ready"

    w.cluster.apply_bridge(ovs_bridge(mtu=9000))
    wait_for(lambda: mtu(n1, "eth0") == 9000, 20, "mtu 9000 again")
    wait_for(lambda: record(n1).get("uplink_mtus") == {"eth0": 1500}, 10, "record 1500")
    w.cluster.delete_bridge("br1")
    wait_for(lambda: w.cluster.enactment("n1") is None, 20, "removed")
    assert mtu(n1, "eth0") == 1500
    assert n1.addresses("eth0") == [f"{IPS['n1']}/16"]
    assert a.stop() == 0, a.text()[-3000:]


def test_an_unreadable_journal_never_stops_the_agent(world: World) -> None:
    """A journal of the wrong shape (hand-edited, or from another version) is reported and
    removed; the agent starts and enacts its bridges (found by the hostile tester)."""
    w = world
    n1 = w.node("n1")
    d = n1.root / "var/lib/underlay/bridges"
    d.mkdir(parents=True, exist_ok=True)
    bad = {
        "bridge": "old", "phase": "changing", "started": "x", "desired": {"uplinks": []},
        "snapshot": {"bridge": None, "links": [], "files": {}},
    }  # fmt: skip
    (d / "old.journal").write_text(json.dumps(bad))
    w.cluster.apply_bridge(ovs_bridge())
    a = w.agent("n1")
    w.cluster.wait_condition("n1", "Ready", timeout=30)
    assert "unreadable enactment journal /var/lib/underlay/bridges/old.journal" in a.text()
    assert not (d / "old.journal").exists()
    assert a.stop() == 0, a.text()[-3000:]
