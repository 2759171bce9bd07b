"""``underlay agent --noop`` without a cluster: ``--from`` a repository and ``--node-labels``.

The agent runs as a process inside a rig node (a network namespace with its own
ovsdb-server/ovs-vswitchd), with no kubeconfig at all (``KUBECONFIG`` unset, ``HOME`` without
``.kube``), planning the examples/quickstart repository. Each test checks the printed plan and
the netplan file it would write (validated with ``netplan generate``), and that OVSDB (every
table), the namespace's links, addresses and routes and the node's files are the same after.
The cluster cases use the real control plane (the agent as its ServiceAccount, through the
test's fault proxy on the rig's API address) and check that the agent wrote nothing to it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from kubernetes import client
from node_agent import bridges, ovsdb

from tests.integration.test_agent import (
    IPS,
    UNDERLAY,
    World,
    assert_same_state,
    netplan_node,
    node_state,
    world_fixture,  # noqa: F401 - the ``world`` fixture
)
from tests.rig import GATEWAY, Node, Rig, run

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart"
NETPLAN_PATH = "/etc/netplan/60-underlay-br1.yaml"
VOLATILE_INTERFACE_COLUMNS = ("statistics", "link_resets", "link_state", "link_speed", "duplex")


def ovsdb_dump(node: Node) -> str:
    """Every row of the node's Open_vSwitch database (``ovsdb-client dump``), except the
    Interface columns ovs-vswitchd refreshes by itself (counters, link state)."""
    tables = run("ovsdb-client", "list-tables", node.ovsdb, "Open_vSwitch").stdout.split()[2:]
    out = []
    for table in sorted(tables):
        cols: list[str] = []
        if table == "Interface":
            listed = run("ovsdb-client", "list-columns", node.ovsdb, "Open_vSwitch", table)
            cols = [
                c
                for c in (line.split()[0] for line in listed.stdout.splitlines()[2:] if line)
                if c not in VOLATILE_INTERFACE_COLUMNS
            ]
        out.append(run("ovsdb-client", "dump", node.ovsdb, "Open_vSwitch", table, *cols).stdout)
    return "".join(out)


def noop(node: Node, *args: str, kubeconfig: str | None = None) -> subprocess.CompletedProcess[str]:
    """``underlay agent --noop`` in ``node`` with no kubeconfig (unless ``kubeconfig``)."""
    env = ["env", "-u", "KUBECONFIG", "-u", "KUBERNETES_SERVICE_HOST", f"HOME={node.rundir}"]
    kc = ["--kubeconfig", kubeconfig] if kubeconfig else []
    return node.run(
        *env, UNDERLAY, "agent", "--noop", "--node-name", "n1", *kc,
        "--ovsdb", node.ovsdb, "--root", str(node.root),
        "--socket", str(node.rundir / "noop.sock"), *args, check=False,
    )  # fmt: skip


def printed_file(stdout: str, path: str) -> str:
    """The content of file ``path`` as the plan prints it (after its ``--- path`` line)."""
    lines = stdout.split(f"--- {path} (mode ", 1)[1].splitlines()[1:]
    body = []
    for line in lines:
        if line.startswith("--- ") or line.startswith("(noop") or line.startswith("OvsBridge "):
            break
        body.append(line)
    return "\n".join(body) + "\n"


def assert_netplan_valid(content: str, tmp: Path) -> str:
    """Run ``netplan generate`` on ``content`` as the node's only netplan file; returns the
    systemd-networkd unit it generates for br1."""
    root = tmp / "netplan-root"
    (root / "etc/netplan").mkdir(parents=True)
    f = root / NETPLAN_PATH.lstrip("/")
    f.write_text(content)
    f.chmod(0o600)
    gen = subprocess.run(
        ["netplan", "generate", "--root-dir", str(root)], capture_output=True, text=True
    )
    assert gen.returncode == 0, gen.stderr
    return (root / "run/systemd/network/10-netplan-br1.network").read_text()


def test_noop_from_the_quickstart_without_a_cluster_changes_nothing(
    rig: Rig, tmp_path: Path
) -> None:
    n1 = netplan_node(rig.add_node("n1", IPS["n1"]))
    before, db_before = node_state(n1), ovsdb_dump(n1)

    out = noop(n1, "--from", str(QUICKSTART))

    assert out.returncode == 0, out.stdout + out.stderr
    for line in (
        f"OvsBridges: 1 from {QUICKSTART} (validated; 2 document(s) of other kinds ignored)",
        "node n1 labels: none (no cluster configured and no --node-labels): treated as empty",
        "bridges to remove: known from this node's replay records only",
        "OvsBridge br1:",
        "bridge br1 (datapath netdev, persistence netplan):",
        "[ovs] create OVS bridge br1 (datapath_type netdev)",
        "[ovs] add uplink port eth0 to br1",
        f"[link] move address {IPS['n1']}/16 from eth0 to br1",
        f"[link] move route default via {GATEWAY} dev eth0 to br1",
        f"[file] create {NETPLAN_PATH} (netplan)",
        f"--- {NETPLAN_PATH} (mode 0600)",
        "(noop: nothing was changed)",
    ):
        assert line in out.stdout, out.stdout
    netplan = printed_file(out.stdout, NETPLAN_PATH)
    unit = assert_netplan_valid(netplan, tmp_path)
    assert f"Address={IPS['n1']}/16" in unit and f"Gateway={GATEWAY}" in unit, unit
    assert "openvswitch: {}" in netplan and "interfaces: [eth0]" in netplan
    # nothing changed: OVSDB row for row, links, addresses, routes, files; no socket left
    assert ovsdb_dump(n1) == db_before
    assert_same_state(node_state(n1), before)
    assert not (n1.rundir / "noop.sock").exists()
    assert not (n1.root / NETPLAN_PATH.lstrip("/")).exists()


def test_node_labels_decide_which_bridges_select_the_node(rig: Rig, tmp_path: Path) -> None:
    n1 = netplan_node(rig.add_node("n1", IPS["n1"]))
    repo = tmp_path / "repo"
    shutil.copytree(QUICKSTART, repo)
    f = repo / "ovsbridge.yaml"
    f.write_text(f.read_text() + '  nodeSelector:\n    underlay.dev/br1: "true"\n')
    before, db_before = node_state(n1), ovsdb_dump(n1)

    labelled = noop(n1, "--from", str(repo), "--node-labels", "zone=a,underlay.dev/br1=true")
    unlabelled = noop(n1, "--from", str(repo))
    other = noop(n1, "--from", str(f), "--node-labels", "underlay.dev/br1=false")

    assert labelled.returncode == 0, labelled.stderr
    assert "node n1 labels: underlay.dev/br1=true,zone=a (--node-labels)" in labelled.stdout
    assert "[ovs] create OVS bridge br1" in labelled.stdout, labelled.stdout
    assert unlabelled.returncode == 0, unlabelled.stderr
    assert "treated as empty, so only OvsBridges without a nodeSelector" in unlabelled.stdout
    assert "OvsBridge br1: does not select node n1" in unlabelled.stdout, unlabelled.stdout
    assert "no changes" in unlabelled.stdout and "create OVS bridge" not in unlabelled.stdout
    # --from a single file: only that file is loaded (0 other documents)
    assert other.returncode == 0, other.stderr
    assert f"OvsBridges: 1 from {f} (validated; 0 document(s)" in other.stdout, other.stdout
    assert "OvsBridge br1: does not select node n1" in other.stdout
    assert ovsdb_dump(n1) == db_before
    assert_same_state(node_state(n1), before)

    bad = noop(n1, "--from", str(repo), "--node-labels", "zone")
    assert bad.returncode == 2 and "'zone' is not KEY=VALUE" in bad.stderr, bad.stderr


def test_a_repository_with_errors_is_refused_with_them(rig: Rig, tmp_path: Path) -> None:
    n1 = netplan_node(rig.add_node("n1", IPS["n1"]))
    repo = tmp_path / "repo"
    shutil.copytree(QUICKSTART, repo)
    (repo / "ovsbridge.yaml").write_text(
        (repo / "ovsbridge.yaml").read_text().replace("uplinks: [eth0]", "uplinks: [eth0, eth0]")
    )
    before, db_before = node_state(n1), ovsdb_dump(n1)

    out = noop(n1, "--from", str(repo))

    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{repo}/ovsbridge.yaml:9:19: error: OvsBridge br1 spec.uplinks[1]:" in out.stderr, (
        out.stderr
    )
    assert f"--from {repo}: 1 error(s): nothing planned" in out.stderr
    assert "OvsBridge br1:" not in out.stdout and "[ovs]" not in out.stdout
    assert ovsdb_dump(n1) == db_before
    assert_same_state(node_state(n1), before)

    # --from and --node-labels belong to --noop; a missing path is named
    run_args = ["--node-name", "n1", "--ovsdb", n1.ovsdb, "--root", str(n1.root)]
    alone = n1.run(UNDERLAY, "agent", *run_args, "--from", str(repo), check=False)
    assert alone.returncode == 2 and "go with --noop only" in alone.stderr, alone.stderr
    missing = noop(n1, "--from", str(tmp_path / "nope"))
    assert missing.returncode == 2 and f"--from {tmp_path / 'nope'}: no such" in missing.stderr


def test_bridges_to_remove_come_from_the_replay_records(rig: Rig, tmp_path: Path) -> None:
    """The node carries br1 (enacted through the engine, replay record written); a repository
    without it plans its removal from the replay record alone, and says so."""
    n1 = netplan_node(rig.add_node("n1", IPS["n1"]))
    api = ovsdb.connect(n1.ovsdb)
    try:
        ctx = bridges.NodeContext("n1", api, n1.name, n1.root)
        desired = bridges.DesiredBridge.from_object(
            {"metadata": {"name": "br1"}, "spec": {"uplinks": ["eth0"], "persistence": "netplan"}},
            "n1",
        )
        assert bridges.enact(desired, ctx, run_probes=False).status == bridges.STATUS_CHANGED
    finally:
        ovsdb.disconnect(api)
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(QUICKSTART / "ippool.yaml", repo)
    before = node_state(n1)

    out = noop(n1, "--from", str(repo))

    assert out.returncode == 0, out.stdout + out.stderr
    for line in (
        f"OvsBridges: 0 from {repo} (validated; 1 document(s) of other kinds ignored)",
        "bridges to remove: known from this node's replay records only",
        "OvsBridge br1: gone or no longer selects n1:",
        f"[remove] move address {IPS['n1']}/16 from br1 back to eth0",
        "[remove] delete OVS bridge br1",
        f"[remove] remove {NETPLAN_PATH}",
        "(noop: nothing was changed)",
    ):
        assert line in out.stdout, out.stdout
    assert_same_state(node_state(n1), before)
    assert n1.vsctl("list-ports", "br1") == "eth0"


def test_with_a_cluster_the_labels_come_from_the_node(world: World, tmp_path: Path) -> None:
    """--from with a kubeconfig: OvsBridges from the repository, labels from the Node object;
    nothing is written to the API server. An unreachable API server means no labels."""
    w = world
    n1 = w.node("n1")
    w.cluster.label_node("n1", {"underlay.dev/br1": "true"})
    repo = tmp_path / "repo"
    shutil.copytree(QUICKSTART, repo)
    f = repo / "ovsbridge.yaml"
    f.write_text(f.read_text() + '  nodeSelector:\n    underlay.dev/br1: "true"\n')
    before = node_state(n1)
    w.cluster.kube.reset_requests()

    out = noop(n1, "--from", str(repo), kubeconfig=w.cluster.node_kubeconfig)

    assert out.returncode == 0, out.stdout + out.stderr
    assert "underlay.dev/br1=true" in out.stdout and "(Node n1)" in out.stdout, out.stdout
    assert "[ovs] create OVS bridge br1" in out.stdout
    assert w.cluster.writes() == []
    reads = [f"{r.method} {r.path}" for r in w.cluster.kube.requests()]
    assert reads == ["GET /api/v1/nodes/n1"], reads  # no OvsBridge or enactment read
    assert_same_state(node_state(n1), before)

    w.cluster.core.delete_node("n1", body=client.V1DeleteOptions())
    gone = noop(n1, "--from", str(repo), kubeconfig=w.cluster.node_kubeconfig)
    assert gone.returncode == 1 and "Node n1 not found in the cluster" in gone.stdout

    away_kc = tmp_path / "kubeconfig-away"  # an API server address nobody listens on
    away_kc.write_text(Path(w.cluster.node_kubeconfig).read_text().replace(":6443", ":6444"))
    away = noop(n1, "--from", str(repo), kubeconfig=str(away_kc))
    assert away.returncode == 0, away.stdout + away.stderr
    assert "node n1 labels: none: " in away.stdout and "treated as empty" in away.stdout
    assert "OvsBridge br1: does not select node n1" in away.stdout, away.stdout
    assert_same_state(node_state(n1), before)
