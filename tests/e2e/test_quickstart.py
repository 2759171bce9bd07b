"""The quick start, end to end: one Git commit to two pods pinging across two nodes over OVS.

Everything is real: the Kubernetes control plane (kube-apiserver, kube-controller-manager and
etcd from tests/controlplane, with deploy/'s RBAC), a Git repository, ``underlay apply`` as a process, two rig nodes each running ``underlay agent``
inside its network namespace against its own ovsdb-server/ovs-vswitchd, the CNI plugins
executed from the NetworkAttachmentDefinition exactly as a runtime executes them, netplan
output checked by ``netplan generate``, and ICMP between pod namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import git
import pytest
from kubernetes import client
from kubernetes.utils import parse_quantity

from reconciler import vocab
from tests.cniruntime import CniFailure, Runtime
from tests.controlplane.cluster import Kube
from tests.rig import APISERVER_IP, GATEWAY, Node, Rig, wait_for

ROOT = Path(__file__).resolve().parents[2]
UNDERLAY = str(Path(sys.executable).parent / "underlay")
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
NODES = {"n1": "172.18.10.11", "n2": "172.18.10.12"}
AGENT_ENV = {**os.environ, "POD_NAMESPACE": "underlay-system"}
"""The DaemonSet's environment (deploy/agent.yaml: POD_NAMESPACE from the downward API)."""


def underlay(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [UNDERLAY, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


class Cluster:
    """The real control plane as the quick start sees it: ``underlay apply`` runs as the
    reconciler's ServiceAccount from the host (through the test's fault proxy), the agents as
    the agent's ServiceAccount from the rig nodes, through the same proxy listening on the rig's
    API address 172.18.0.2:6443 in the switch namespace, as nodes reach an API server."""

    def __init__(self, kube: Kube, rig: Rig, workdir: Path) -> None:
        self.kube = kube
        url = kube.listen_in_netns(rig.switch.path, APISERVER_IP, 6443)
        self.kubeconfig = str(kube.reconciler_kubeconfig(workdir / "reconciler.kubeconfig"))
        self.node_kubeconfig = str(kube.agent_kubeconfig(workdir / "agent.kubeconfig", url))
        self.core = kube.core
        self.custom = kube.custom
        for name in NODES:
            kube.create_node(name)

    def pool(self, name: str = "ippool-test") -> dict[str, Any]:
        r = vocab.SPIDER_IPPOOL
        return self.custom.get_cluster_custom_object(r.group, r.version, r.plural, name)  # type: ignore[no-any-return]

    def get(
        self, res: vocab.Resource, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        try:
            if res.namespaced:
                return self.custom.get_namespaced_custom_object(  # type: ignore[no-any-return]
                    res.group, res.version, namespace, res.plural, name
                )
            return self.custom.get_cluster_custom_object(res.group, res.version, res.plural, name)  # type: ignore[no-any-return]
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_pod(self, name: str, node: str) -> str:
        pod = client.V1Pod(
            metadata=client.V1ObjectMeta(
                name=name,
                namespace="default",
                labels={"app": "test-app"},
                annotations={
                    vocab.ANNO_POD_IPPOOL: '{\n  "ipv4": ["ippool-test"]\n}',
                    vocab.ANNO_MULTUS_DEFAULT_NETWORK: "kube-system/ovs-conf",
                },
            ),
            spec=client.V1PodSpec(
                node_name=node, containers=[client.V1Container(name="test-app", image="nginx")]
            ),
        )
        return str(self.core.create_namespaced_pod("default", pod).metadata.uid)


class AgentProcess:
    """``underlay agent`` running inside a rig node, as the DaemonSet runs it on a real node."""

    def __init__(self, node: Node, name: str, kubeconfig: str) -> None:
        self.node, self.name = node, name
        self.socket = str(node.rundir / "agent.sock")
        self.bin_dir = node.rundir / "cni-bin"
        self.log = node.rundir / "agent.log"
        with open(self.log, "wb") as logf:
            self.proc = node.popen(
                UNDERLAY, "-v", "agent", "--node-name", name, "--kubeconfig", kubeconfig,
                "--ovsdb", node.ovsdb, "--socket", self.socket, "--root", str(node.root),
                "--cni-bin-dir", str(self.bin_dir), "--cni-python", PYTHON, "--resync", "5", "--gc-interval", "1",
                stdout=logf, stderr=subprocess.STDOUT, env=AGENT_ENV,
            )  # fmt: skip
        wait_for(
            lambda: Path(self.socket).exists() or self.proc.poll() is not None, 30, "agent socket"
        )
        assert self.proc.poll() is None, self.log.read_text()

    @property
    def cni_path(self) -> str:
        return f"{self.bin_dir}:/usr/lib/cni"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def commit_all(repo: git.Repo, message: str) -> str:
    repo.git.add("-A")
    return str(repo.index.commit(message).hexsha)


@pytest.fixture
def world(kube: Kube, rig: Rig, tmp_path: Path) -> Iterator[tuple[Rig, Cluster, git.Repo, Path]]:
    nodes = {name: rig.add_node(name, ip) for name, ip in NODES.items()}
    assert all(n.ping(GATEWAY) for n in nodes.values())
    cluster = Cluster(kube, rig, tmp_path)
    work = tmp_path / "network"
    shutil.copytree(ROOT / "examples" / "quickstart", work)
    repo = git.Repo.init(work, initial_branch="main")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "Operator")
        cw.set_value("user", "email", "ops@example.com")
    commit_all(repo, "quick start: br1 over eth0, ippool-test, ovs-conf")
    yield rig, cluster, repo, work


def test_quickstart_from_git_commit_to_pods_pinging(
    world: tuple[Rig, Cluster, git.Repo, Path], tmp_path: Path
) -> None:
    rig, cluster, repo, work = world
    cache = str(tmp_path / "cache")
    source = ["--repo", work.as_uri(), "--ref", "main", "--cache-dir", cache]

    # 2. one pass applies the three objects and the rendered NAD; a second pass writes nothing
    first = underlay("apply", *source, "--kubeconfig", cluster.kubeconfig)
    assert first.returncode == 0, first.stdout + first.stderr
    for line in (
        "created OvsBridge br1",
        "created SpiderIPPool ippool-test",
        "created SpiderMultusConfig kube-system/ovs-conf",
        "created NetworkAttachmentDefinition kube-system/ovs-conf",
    ):
        assert line in first.stdout, first.stdout
    cluster.kube.reset_requests()
    second = underlay("apply", *source, "--kubeconfig", cluster.kubeconfig)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "No changes" in second.stdout, second.stdout
    assert cluster.kube.requests(writes=True) == [], "a no-op pass must not write"

    nad = cluster.get(vocab.NETWORK_ATTACHMENT_DEFINITION, "ovs-conf", "kube-system")
    assert nad is not None
    conflist = json.loads(nad["spec"]["config"])
    assert conflist["plugins"][0] == {
        "type": "underlay-ovs",
        "bridge": "br1",
        "ipam": {"type": "underlay-ipam"},
    }
    assert nad["metadata"]["annotations"][vocab.ANNO_NAD_RESOURCE_NAME] == "underlay.dev/br1"
    smc = cluster.get(vocab.SPIDER_MULTUS_CONFIG, "ovs-conf", "kube-system")
    assert smc is not None
    assert nad["metadata"]["ownerReferences"][0]["uid"] == smc["metadata"]["uid"]
    pool = cluster.pool()
    assert pool["status"]["totalIPCount"] == 10

    # 3. the agents build br1 over eth0 on both nodes and report Ready enactments
    agents = {name: AgentProcess(rig.nodes[name], name, cluster.node_kubeconfig) for name in NODES}
    try:
        for name, agent in agents.items():
            node = rig.nodes[name]

            def ready(name: str = name) -> bool:
                e = cluster.get(vocab.OVS_BRIDGE_ENACTMENT, f"{name}.br1")
                conds = {
                    c["type"]: c for c in ((e or {}).get("status") or {}).get("conditions", [])
                }
                return conds.get("Ready", {}).get("status") == "True"

            wait_for(ready, 60, f"enactment {name}.br1 Ready:\n{agent.log.read_text()[-3000:]}")
            assert node.vsctl("get", "Bridge", "br1", "datapath_type").strip('"') == "netdev"
            assert set(node.vsctl("list-ports", "br1").split()) == {"eth0"}
            assert node.addresses("br1") == [f"{NODES[name]}/16"]
            assert node.addresses("eth0") == []
            assert node.default_route_dev() == "br1"
            netplan = node.root / "etc" / "netplan"
            files = list(netplan.glob("*.yaml"))
            assert len(files) == 1 and (files[0].stat().st_mode & 0o777) == 0o600
            gen = subprocess.run(
                ["netplan", "generate", "--root-dir", str(node.root)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert gen.returncode == 0 and gen.stderr == "", gen.stderr
            assert node.ping(GATEWAY)
            capacity = cluster.core.read_node(name).status.capacity
            assert parse_quantity(capacity["underlay.dev/br1"]) == 1000

        # 4. one pod per node, attached through the NAD's CNI config list exactly as a runtime does
        runtimes = {name: Runtime(rig.nodes[name], agents[name].cni_path) for name in NODES}
        pods = {}
        for i, name in enumerate(NODES, start=1):
            uid = cluster.create_pod(f"test-app-{i}", name)
            netns = rig.add_pod(f"pod{i}")
            pods[name] = (f"test-app-{i}", uid, netns, f"cid{i:060d}")
        results = {}
        for name, (pod, uid, netns, cid) in pods.items():
            results[name] = runtimes[name].add(conflist, netns, cid, pod=("default", pod, uid))
        ips = {name: r["ips"][0] for name, r in results.items()}
        assert ips["n1"]["address"] == "172.18.30.131/16"
        assert ips["n2"]["address"] == "172.18.30.132/16"
        assert ips["n1"]["gateway"] == ips["n2"]["gateway"] == GATEWAY
        for name, (pod, uid, netns, _cid) in pods.items():
            assert netns.addresses("eth0") == [ips[name]["address"]]
            se = cluster.get(vocab.SPIDER_ENDPOINT, pod, "default")
            assert se is not None
            current = se["status"]["current"]
            assert current["uid"] == uid and current["node"] == name
            assert current["ips"][0]["interface"] == "eth0"
            assert current["ips"][0]["ipv4"] == ips[name]["address"]
            assert current["ips"][0]["ipv4Pool"] == "ippool-test"
        pool = cluster.pool()
        assert pool["status"]["allocatedIPCount"] == 2
        assert json.loads(pool["status"]["allocatedIPs"]) == {
            "172.18.30.131": {"pod": "default/test-app-1", "podUid": pods["n1"][1]},
            "172.18.30.132": {"pod": "default/test-app-2", "podUid": pods["n2"][1]},
        }

        # what an operator sees with kubectl: the seed's columns and values
        sp = cluster.kube.kubectl("get", "sp", "ippool-test").stdout.split("\n")
        assert sp[0].split() == [
            "NAME", "VERSION", "SUBNET", "ALLOCATED-IP-COUNT", "TOTAL-IP-COUNT", "DEFAULT"
        ], sp  # fmt: skip
        assert sp[1].split() == ["ippool-test", "4", "172.18.0.0/16", "2", "10", "false"], sp
        se = cluster.kube.kubectl("get", "spiderendpoints", "-n", "default").stdout.split("\n")
        assert se[0].split() == [
            "NAME",
            "INTERFACE",
            "IPV4POOL",
            "IPV4",
            "IPV6POOL",
            "IPV6",
            "NODE",
        ]
        assert sorted(line.split() for line in se[1:] if line) == [
            ["test-app-1", "eth0", "ippool-test", "172.18.30.131/16", "n1"],
            ["test-app-2", "eth0", "ippool-test", "172.18.30.132/16", "n2"],
        ], se
        en = cluster.kube.kubectl("get", "ovsbridgeenactments").stdout.split("\n")
        assert en[0].split() == ["NAME", "NODE", "BRIDGE", "READY", "REASON"], en
        assert sorted(line.split() for line in en[1:] if line) == [
            ["n1.br1", "n1", "br1", "True", "Enacted"],
            ["n2.br1", "n2", "br1", "True", "Enacted"],
        ], en

        # 5. pod 1 pings pod 2 across the two nodes; both ping the gateway
        pod1, pod2 = pods["n1"][2], pods["n2"][2]
        assert pod1.ping("172.18.30.132")
        assert pod2.ping("172.18.30.131")
        assert pod1.ping(GATEWAY) and pod2.ping(GATEWAY)

        # a pod deleted from the API while its DEL never comes (node down, runtime crash): the
        # agents' garbage collection gives its IP back
        uid3 = cluster.create_pod("test-app-3", "n1")
        pod3 = rig.add_pod("pod3")
        r3 = runtimes["n1"].add(conflist, pod3, "cid3", pod=("default", "test-app-3", uid3))
        assert r3["ips"][0]["address"] == "172.18.30.133/16"
        cluster.core.delete_namespaced_pod("test-app-3", "default", grace_period_seconds=0)
        wait_for(
            lambda: "172.18.30.133" not in json.loads(cluster.pool()["status"]["allocatedIPs"]),
            20,
            "GC to release the IP of the deleted pod",
        )
        assert cluster.pool()["status"]["allocatedIPCount"] == 2
        runtimes["n1"].delete(conflist, pod3, "cid3", pod=("default", "test-app-3", uid3))

        # 6. DEL releases both IPs and removes ports and veths; a second DEL and a DEL for a
        #    netns that no longer exists both succeed
        host_veths = {name: r["interfaces"][0]["name"] for name, r in results.items()}
        runtimes["n1"].delete(conflist, pod1, pods["n1"][3], pod=("default", *pods["n1"][:2]))
        runtimes["n1"].delete(conflist, pod1, pods["n1"][3], pod=("default", *pods["n1"][:2]))
        rig.delete_pod("pod2")
        runtimes["n2"].delete(conflist, pod2, pods["n2"][3], pod=("default", *pods["n2"][:2]))
        pool = cluster.pool()
        assert pool["status"]["allocatedIPCount"] == 0
        assert "allocatedIPs" not in pool["status"] or not pool["status"]["allocatedIPs"]
        for name, (pod, _uid, _netns, _cid) in pods.items():
            assert cluster.get(vocab.SPIDER_ENDPOINT, pod, "default") is None
            node = rig.nodes[name]
            assert set(node.vsctl("list-ports", "br1").split()) == {"eth0"}
            assert not node.link_exists(host_veths[name])
    except CniFailure as exc:
        logs = "\n".join(a.log.read_text()[-3000:] for a in agents.values())
        raise AssertionError(f"{exc}\n{logs}") from exc
    finally:
        for agent in agents.values():
            agent.stop()

    # 7. removing the SpiderMultusConfig from Git prunes it and its NAD; objects without our
    #    ownership label are never touched, even when their names match
    r = vocab.NETWORK_ATTACHMENT_DEFINITION
    foreign = {
        "apiVersion": vocab.NAD_API_VERSION,
        "kind": r.kind,
        "metadata": {"name": "foreign", "namespace": "kube-system"},
        "spec": {"config": "{}"},
    }
    cluster.custom.create_namespaced_custom_object(
        r.group, r.version, "kube-system", r.plural, foreign
    )
    p = vocab.SPIDER_IPPOOL
    hand_made = {
        "apiVersion": vocab.SPIDERPOOL_API_VERSION,
        "kind": p.kind,
        "metadata": {"name": "hand-made"},
        "spec": {"subnet": "10.9.0.0/16", "ips": ["10.9.0.10"]},
    }
    cluster.custom.create_cluster_custom_object(p.group, p.version, p.plural, hand_made)
    smc_files = [f for f in work.glob("*.yaml") if "SpiderMultusConfig" in f.read_text()]
    assert len(smc_files) == 1
    smc_files[0].unlink()
    # the pool's multusName still names ovs-conf: a warning (managed outside Git), not an error
    commit_all(repo, "drop the ovs-conf Multus config")
    third = underlay("apply", *source, "--kubeconfig", cluster.kubeconfig)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "pruned NetworkAttachmentDefinition kube-system/ovs-conf" in third.stdout
    assert "pruned SpiderMultusConfig kube-system/ovs-conf" in third.stdout
    assert cluster.get(vocab.SPIDER_MULTUS_CONFIG, "ovs-conf", "kube-system") is None
    assert cluster.get(vocab.NETWORK_ATTACHMENT_DEFINITION, "ovs-conf", "kube-system") is None
    assert cluster.get(vocab.NETWORK_ATTACHMENT_DEFINITION, "foreign", "kube-system") is not None
    assert cluster.get(vocab.SPIDER_IPPOOL, "hand-made") is not None
    assert cluster.get(vocab.SPIDER_IPPOOL, "ippool-test") is not None
    assert cluster.get(vocab.OVS_BRIDGE, "br1") is not None
