"""The node's own network configuration next to the agent's persistence files, on the real rig.

A real node usually configures its uplink already: cloud-init's /etc/netplan/50-cloud-init.yaml,
or a NetworkManager "Wired connection" profile. netplan merges files (lists appended, gateway4
kept), so a static uplink there keeps its address and default route next to ``Bridge=br1``
after a reboot: the agent refuses, names the file and changes nothing (OVSDB row for row,
links, addresses, routes, files). A DHCP-only uplink is fine (our later ``dhcp4: false`` wins),
checked with ``netplan generate --root-dir`` on the node's root. NetworkManager profiles of the
agent outrank the node's own (``autoconnect-priority``, kept by ``nmcli --offline``), and the
competing profiles are listed in the change log.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_agent import bridges

from tests.integration.test_agent_noop import QUICKSTART, noop, ovsdb_dump
from tests.integration.test_bridges import API_PORT, N1_IP, Agent, add, ovs_bridge, state
from tests.rig import APISERVER_IP, GATEWAY, Rig

CLOUD_INIT = "/etc/netplan/50-cloud-init.yaml"
STATIC = f"""\
network:
  version: 2
  ethernets:
    eth0:
      addresses: [{N1_IP}/16]
      routes: [{{to: default, via: {GATEWAY}}}]
"""
DHCP = """\
network:
  version: 2
  ethernets:
    eth0:
      dhcp4: true
"""
REFUSAL = (
    "netplan file /etc/netplan/50-cloud-init.yaml sets addresses, routes for uplink eth0 "
    "(ethernets.eth0), which the agent's /etc/netplan/60-underlay-br1.yaml cannot override "
    "(netplan appends lists and keeps gateway4/gateway6): after a reboot eth0 would keep them "
    "as a port of br1 (conflicting default route); move eth0's addresses/routes out of "
    "/etc/netplan/50-cloud-init.yaml (the agent puts them on br1), or use persistence: none"
)


@pytest.fixture
def agents(rig: Rig) -> Iterator[list[Agent]]:
    """As in test_bridges: nodes added with ``add``; the API server listens on 172.18.0.2."""
    created: list[Agent] = []
    listener = rig.switch.listen_tcp(APISERVER_IP, API_PORT)
    yield created
    listener.close()
    for a in created:
        a.close()


def cloud_init(a: Agent, content: str) -> None:
    f = a.node.root / CLOUD_INIT.lstrip("/")
    f.write_text(content)
    f.chmod(0o600)


def netplan_generate(root: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("netplan") is None:
        pytest.skip("netplan not installed")
    return subprocess.run(["netplan", "generate", "--root-dir", str(root)],
                          capture_output=True, text=True, check=False)  # fmt: skip


def nmcli_normalized(content: str) -> str:
    if shutil.which("nmcli") is None:
        pytest.skip("nmcli not installed")
    proc = subprocess.run(["nmcli", "--offline", "connection", "modify"], input=content,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# --- netplan --------------------------------------------------------------------------------


def test_static_uplink_in_cloud_init_is_refused_and_nothing_changes(
    rig: Rig, agents: list[Agent]
) -> None:
    a = add(agents, rig, "n1", N1_IP)
    cloud_init(a, STATIC)
    before, db_before = state(a), ovsdb_dump(a.node)
    d = a.desired(ovs_bridge())

    p = bridges.plan(d, a.ctx)
    res = bridges.enact(d, a.ctx)

    assert p.invalid == (REFUSAL,)
    assert bridges.format_plan(p) == f"bridge br1: invalid\n  - {REFUSAL}\n"
    assert res.status == bridges.STATUS_INVALID and res.reason == REFUSAL
    assert res.changes == () and res.files == ()
    assert [x.kind for x in bridges.drift(d, a.ctx)] == ["invalid"]
    # nothing changed: OVSDB row for row, addresses and routes in the node netns, files
    assert ovsdb_dump(a.node) == db_before
    assert state(a) == before
    assert a.node.addresses("eth0") == [f"{N1_IP}/16"]
    assert not a.node.link_exists("br1")
    assert not (a.node.root / "etc/netplan/60-underlay-br1.yaml").exists()

    # the same refusal in ``underlay agent --noop`` (its plan printing), nothing changed
    out = noop(a.node, "--from", str(QUICKSTART))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"OvsBridge br1:\nbridge br1: invalid\n  - {REFUSAL}\n" in out.stdout, out.stdout
    assert ovsdb_dump(a.node) == db_before
    assert state(a) == before

    # once the addresses leave the cloud-init file the same OvsBridge goes through
    cloud_init(a, DHCP)
    assert bridges.enact(d, a.ctx).status == bridges.STATUS_CHANGED


def test_dhcp4_uplink_in_cloud_init_is_enacted_and_netplan_generates_cleanly(
    rig: Rig, agents: list[Agent]
) -> None:
    """The address the node has now (as a DHCP lease would give it) is persisted as static on
    br1; cloud-init's dhcp4: true is overridden by the agent's later file."""
    a = add(agents, rig, "n1", N1_IP)
    cloud_init(a, DHCP)

    res = bridges.enact(a.desired(ovs_bridge()), a.ctx)

    assert res.status == bridges.STATUS_CHANGED, res.reason
    assert a.node.addresses("br1") == [f"{N1_IP}/16"] and a.node.ping(GATEWAY)
    assert (a.node.root / CLOUD_INIT.lstrip("/")).read_text() == DHCP  # not touched
    proc = netplan_generate(a.node.root)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    network = a.node.root / "run/systemd/network"
    eth0 = (network / "10-netplan-eth0.network").read_text().splitlines()
    assert "Bridge=br1" in eth0
    assert not [x for x in eth0 if x.startswith(("DHCP=", "Address=", "Gateway="))], eth0
    br1 = (network / "10-netplan-br1.network").read_text().splitlines()
    assert f"Address={N1_IP}/16" in br1 and f"Gateway={GATEWAY}" in br1, br1


# --- NetworkManager -------------------------------------------------------------------------

WIRED = """\
[connection]
id=Wired connection 1
uuid=1f0c3a52-7d3e-4a43-9a9a-3c1f7e0b9d11
type=ethernet
interface-name=eth0
timestamp=1700000000

[ipv4]
method=auto
"""


def nm_agent(rig: Rig, agents: list[Agent], wired: str) -> tuple[Agent, Path]:
    a = add(agents, rig, "n1", N1_IP, netplan=False)
    kdir = a.node.root / "etc/NetworkManager/system-connections"
    kdir.mkdir(parents=True)
    nmcli_normalized(wired)  # a profile NM accepts
    f = kdir / "Wired connection 1.nmconnection"
    f.write_text(wired)
    f.chmod(0o600)
    return a, f


def test_networkmanager_profiles_outrank_the_nodes_own_profile(
    rig: Rig, agents: list[Agent]
) -> None:
    a, wired = nm_agent(rig, agents, WIRED)

    res = bridges.enact(a.desired(ovs_bridge()), a.ctx)  # persistence auto -> networkmanager

    assert res.status == bridges.STATUS_CHANGED, res.reason
    path = "/etc/NetworkManager/system-connections/Wired connection 1.nmconnection"
    assert (
        f"note: NetworkManager profile 'Wired connection 1' ({path}, interface-name, "
        "autoconnect-priority 0) also autoconnects on uplink eth0; the agent's profiles have "
        "autoconnect-priority 100, so NM activates them after a reboot"
    ) in res.changes
    assert wired.read_text() == WIRED  # the node's own profile is not touched
    ours = sorted(wired.parent.glob("underlay-br1-*.nmconnection"))
    assert len(ours) == 5
    for k in ours:
        assert "\nautoconnect-priority=100\n" in nmcli_normalized(k.read_text()), k.name
    assert "\nautoconnect-priority=" not in nmcli_normalized(WIRED)  # NM's default, 0


def test_networkmanager_profile_with_a_higher_priority_is_refused(
    rig: Rig, agents: list[Agent]
) -> None:
    high = WIRED.replace("type=ethernet\n", "type=ethernet\nautoconnect-priority=200\n")
    a, _wired = nm_agent(rig, agents, high)
    before, db_before = state(a), ovsdb_dump(a.node)

    res = bridges.enact(a.desired(ovs_bridge()), a.ctx)

    assert res.status == bridges.STATUS_INVALID
    assert res.reason is not None and res.reason.startswith(
        "NetworkManager profile 'Wired connection 1' (/etc/NetworkManager/system-connections/"
        "Wired connection 1.nmconnection, interface-name, autoconnect-priority 200) "
        "autoconnects on uplink eth0 with a priority not below the agent's 100"
    )
    assert ovsdb_dump(a.node) == db_before
    assert state(a) == before
