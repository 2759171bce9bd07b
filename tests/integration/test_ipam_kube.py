"""underlay-ipam against the real Kubernetes control plane (tests/controlplane): records, CAS,
errors.

The engine runs in-process here (``Ipam`` with the agent's ServiceAccount, exactly deploy/'s
RBAC, through the test's fault proxy); the concurrency test runs two agent processes served
through the installed shim, as a runtime would call them; the rig tests attach pods with
underlay-ovs + underlay-ipam, and Debian's bridge plugin + underlay-ipam, from agents inside
node namespaces that reach the API server at the rig's API server address. Setup and
assertions use the admin clients, straight to the server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from node_agent.cni.errors import CniError
from node_agent.cni.install import install_shims
from node_agent.cni.server import ipam_api_client
from node_agent.ipam import Ipam, IpamRequest
from node_agent.ipam_gc import collect

from reconciler.ippool import allocated_ips
from reconciler.kube import Objects
from reconciler.vocab import SPIDER_ENDPOINT, SPIDER_IPPOOL
from tests.cniruntime import (
    PYTHON,
    Agent,
    CniFailure,
    Runtime,
    conflist,
    exec_plugin,
    make_bridge,
    ovs_port_of,
)
from tests.controlplane.cluster import Kube
from tests.ipamload import AgentProcess, audit, ipam_conf, start_agents, storm
from tests.rig import APISERVER_IP, GATEWAY, Rig, wait_for

POOL_IPS = "172.18.30.131-172.18.30.140"
AGENT_ENV = {**os.environ, "POD_NAMESPACE": "underlay-system"}
"""The DaemonSet's environment (deploy/agent.yaml: POD_NAMESPACE from the downward API)."""


# --- fixtures and helpers --------------------------------------------------------------------
_GC_READY: set[int] = set()
"""ids of the ControlPlanes whose garbage collector was seen collecting SpiderEndpoints."""


class Cluster:
    """The real control plane as the IPAM tests see it.

    ``agent``/``kubeconfig``: the node agent's ServiceAccount (deploy/rbac.yaml) through the
    test's fault proxy, for the engines and agent processes under test (their requests are
    logged and faults injected: :attr:`kube`). ``api``, ``core``, ``pools``, ``endpoints``: the
    admin, straight to the server, for setup and assertions. Pods are bound to a Node
    (``spec.nodeName``, the Node object made first: kube-controller-manager's pod garbage
    collector deletes pods bound to a node that does not exist); there is no kubelet, so
    :meth:`delete_pod` deletes with grace period 0 and waits until the pod is gone.
    """

    def __init__(self, kube: Kube, tmp: Path) -> None:
        self.kube = kube
        self.kubeconfig = str(kube.agent_kubeconfig(tmp / "agent.kubeconfig"))
        self.agent = ipam_api_client(self.kubeconfig)
        self.api = kube.api
        self.core = kube.core
        self.pools = Objects(self.api, SPIDER_IPPOOL)
        self.endpoints = Objects(self.api, SPIDER_ENDPOINT)
        self._nodes: set[str] = set()

    def agent_client(self) -> Any:
        """A new ApiClient as the agent's ServiceAccount through the proxy, as the CNI server
        makes one (:func:`node_agent.cni.server.ipam_api_client`): one per engine, as agents on
        different nodes have."""
        return ipam_api_client(self.kubeconfig)

    def namespace(
        self,
        name: str,
        annotations: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        """Namespace ``name`` (made if missing, its default ServiceAccount waited for) with
        these annotations and labels added."""
        self.kube.ensure_namespace(name)
        if annotations or labels:
            self.core.patch_namespace(
                name, {"metadata": {"annotations": annotations or {}, "labels": labels or {}}}
            )

    def node(self, name: str, labels: dict[str, str] | None = None) -> None:
        """Node ``name`` (made if missing) with ``labels`` added."""
        if name not in self._nodes:
            try:
                self.kube.create_node(name, labels)
                self._nodes.add(name)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
            self._nodes.add(name)
        if labels:
            self.core.patch_node(name, {"metadata": {"labels": labels}})

    def pod(
        self,
        name: str,
        ns: str = "default",
        annotations: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        node: str = "n1",
    ) -> str:
        """Create pod ``ns/name`` bound to ``node``; returns its UID."""
        self.node(node)
        body = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations or {}, "labels": labels or {}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        }  # fmt: skip
        created = self.core.create_namespaced_pod(ns, body)
        return str(created.metadata.uid)

    def pods(self, names: list[str], ns: str = "default", node: str = "n1") -> dict[str, str]:
        """Create many pods at once (8 requests in flight); ``{name: uid}``."""
        self.node(node)
        with ThreadPoolExecutor(8) as ex:
            uids = list(ex.map(lambda n: self.pod(n, ns, node=node), names))
        return dict(zip(names, uids, strict=True))

    def delete_pod(self, name: str, ns: str = "default", **kw: Any) -> None:
        """Delete the pod as its kubelet finishes it (grace period 0) and wait until it is gone
        (with ``propagation_policy="Orphan"``, kube-controller-manager's garbage collector
        first removes the pod's ownerReferences from its dependents)."""
        self.core.delete_namespaced_pod(name, ns, grace_period_seconds=0, **kw)
        wait_for(lambda: self._pod_gone(name, ns), 60, f"pod {ns}/{name} deleted")

    def _pod_gone(self, name: str, ns: str) -> bool:
        try:
            self.core.read_namespaced_pod(name, ns)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    def wait_gc_ready(self, timeout: float = 90) -> None:
        """Wait until kube-controller-manager's garbage collector handles SpiderEndpoints.

        It watches a CRD's objects only from its first resync after the CRD is established
        (up to ~30 s after the control plane started): before that, a pod deleted with
        ``propagationPolicy: Orphan`` leaves its endpoint's ownerReference in place, and the
        endpoint of a deleted pod stays. Probed once per control plane: an endpoint owned by a
        ConfigMap goes when the ConfigMap is deleted.
        """
        if id(self.kube.cp) in _GC_READY:
            return
        owner = self.core.create_namespaced_config_map(
            "default", client.V1ConfigMap(metadata=client.V1ObjectMeta(generate_name="gc-probe-"))
        )
        md = owner.metadata
        self.endpoints.create(
            {
                "apiVersion": "spiderpool.spidernet.io/v2beta1",
                "kind": "SpiderEndpoint",
                "metadata": {
                    "name": md.name,
                    "namespace": "default",
                    "ownerReferences": [
                        {"apiVersion": "v1", "kind": "ConfigMap", "name": md.name, "uid": md.uid}
                    ],
                },
            }
        )
        self.core.delete_namespaced_config_map(md.name, "default")
        wait_for(
            lambda: self.endpoint(md.name) is None,
            timeout,
            "kube-controller-manager's garbage collector to collect SpiderEndpoints",
            step=0.5,
        )
        _GC_READY.add(id(self.kube.cp))

    def pool(self, name: str, ips: list[str] | str = POOL_IPS, **spec: Any) -> None:
        body = {
            "apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
            "metadata": {"name": name},
            "spec": {"subnet": "172.18.0.0/16", "ips": [ips] if isinstance(ips, str) else ips, "gateway": GATEWAY, **spec},
        }  # fmt: skip
        self.pools.create(body)

    def status(self, pool: str) -> dict[str, Any]:
        return dict(self.pools.get(pool).get("status") or {})

    def endpoint(self, name: str, ns: str = "default") -> dict[str, Any] | None:
        try:
            return self.endpoints.get(name, ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise


@pytest.fixture
def cluster(kube: Kube, tmp_path: Path) -> Iterator[Cluster]:
    """The IPAM's view of the test's control plane (see :class:`Cluster`). Afterwards no
    request of the programs under test may have been forbidden (a 403 the IPAM swallowed, such
    as a refused ownerReference move, would otherwise go unnoticed): deploy/rbac.yaml must
    allow everything they do."""
    yield Cluster(kube, tmp_path)
    forbidden = [(r.method, r.path) for r in kube.requests() if r.code == 403]
    assert forbidden == [], f"forbidden by deploy/rbac.yaml: {forbidden[:5]}"


def req(name: str, uid: str, ifname: str = "eth0", ns: str = "default", **conf: Any) -> IpamRequest:
    return IpamRequest(
        namespace=ns,
        pod_name=name,
        pod_uid=uid,
        container_id=f"cid-{name}",
        ifname=ifname,
        config=conf,
    )


# --- engine against the real API server ------------------------------------------------------


def start_cni_agents(cluster: Cluster, tmp_path: Path, count: int = 2) -> list[AgentProcess]:
    """``count`` CNI server processes (nodes n0, n1, ...; their Node objects made) with their
    shims installed, each ready to serve, as the agent's ServiceAccount through the test's
    proxy. The caller stops them."""
    for k in range(count):
        cluster.node(f"n{k}")
    return start_agents(cluster.kubeconfig, tmp_path, [f"n{k}" for k in range(count)])


def test_allocate_records_and_release_exactly_like_spiderpool(cluster: Cluster) -> None:
    cluster.node("n1")
    cluster.pool("ippool-test")
    uid = cluster.pod("p1")
    ipam = Ipam(cluster.agent, "n1")
    (a,) = ipam.allocate(req("p1", uid, default_ipv4_ippool=["ippool-test"]))
    assert (a.address, a.pool, a.gateway) == ("172.18.30.131/16", "ippool-test", GATEWAY)
    st = cluster.status("ippool-test")
    assert isinstance(st["allocatedIPs"], str)
    assert json.loads(st["allocatedIPs"]) == {"172.18.30.131": {"pod": "default/p1", "podUid": uid}}
    assert (st["allocatedIPCount"], st["totalIPCount"]) == (1, 10)
    ep = cluster.endpoint("p1")
    assert ep is not None
    cur = ep["status"]["current"]
    assert (cur["uid"], cur["node"]) == (uid, "n1")
    assert cur["ips"] == [
        {
            "interface": "eth0",
            "containerID": "cid-p1",
            "vlan": 0,
            "ipv4": "172.18.30.131/16",
            "ipv4Pool": "ippool-test",
            "ipv4Gateway": GATEWAY,
        }
    ]
    assert ep["metadata"]["ownerReferences"][0]["uid"] == uid
    assert Ipam.to_cni_result([a]) == {
        "ips": [{"address": "172.18.30.131/16", "gateway": GATEWAY}],
        "routes": [{"dst": "0.0.0.0/0", "gw": GATEWAY}],
        "dns": {},
    }

    uid2 = cluster.pod("p2")
    assert (
        ipam.allocate(req("p2", uid2, default_ipv4_ippool="ippool-test"))[0].ip == "172.18.30.132"
    )
    assert ipam.release(req("p1", uid)) == [("ippool-test", "172.18.30.131")]
    assert ipam.release(req("p1", uid)) == []  # idempotent
    assert cluster.endpoint("p1") is None
    # the lowest free IP is taken again
    uid3 = cluster.pod("p3")
    assert (
        ipam.allocate(req("p3", uid3, default_ipv4_ippool="ippool-test"))[0].ip == "172.18.30.131"
    )
    ipam.release(req("p2", uid2))
    ipam.release(req("p3", uid3))
    st = cluster.status("ippool-test")
    assert "allocatedIPs" not in st and st["allocatedIPCount"] == 0


def test_retried_add_returns_the_same_ip(cluster: Cluster) -> None:
    cluster.pool("pool")
    uid = cluster.pod("p1")
    ipam = Ipam(cluster.agent, "n1")
    first = ipam.allocate(req("p1", uid, default_ipv4_ippool="pool"))
    again = ipam.allocate(req("p1", uid, default_ipv4_ippool="pool"))
    assert first[0].ip == again[0].ip
    assert cluster.status("pool")["allocatedIPCount"] == 1


def test_multi_interface_retries_do_not_drain_the_pool(cluster: Cluster) -> None:
    cluster.pool("pool")
    uid = cluster.pod("p1")
    ipam = Ipam(cluster.agent, "n1")
    eth0 = ipam.allocate(req("p1", uid, "eth0", default_ipv4_ippool="pool"))[0].ip
    net1 = ipam.allocate(req("p1", uid, "net1", default_ipv4_ippool="pool"))[0].ip
    for _ in range(3):
        assert ipam.allocate(req("p1", uid, "net1", default_ipv4_ippool="pool"))[0].ip == net1
        assert ipam.allocate(req("p1", uid, "eth0", default_ipv4_ippool="pool"))[0].ip == eth0
    assert eth0 != net1
    assert cluster.status("pool")["allocatedIPCount"] == 2
    ipam.release(req("p1", uid, "net1"))
    assert set(allocated_ips(cluster.status("pool"))) == {eth0}
    ep = cluster.endpoint("p1")
    assert ep is not None and [e["interface"] for e in ep["status"]["current"]["ips"]] == ["eth0"]


def test_recreated_pod_with_same_name_gets_a_fresh_ip(cluster: Cluster) -> None:
    cluster.pool("pool")
    old_uid = cluster.pod("web-0")
    ipam = Ipam(cluster.agent, "n1")
    old_ip = ipam.allocate(req("web-0", old_uid, default_ipv4_ippool="pool"))[0].ip
    cluster.delete_pod("web-0")
    new_uid = cluster.pod("web-0")
    assert new_uid != old_uid
    new_ip = ipam.allocate(req("web-0", new_uid, default_ipv4_ippool="pool"))[0].ip
    assert new_ip != old_ip  # the old IP stays with the old UID until it is released
    ep = cluster.endpoint("web-0")
    assert ep is not None and ep["status"]["current"]["uid"] == new_uid
    # the old sandbox's DEL releases only the old UID's IP and leaves the new endpoint alone
    assert ipam.release(req("web-0", old_uid)) == [("pool", old_ip)]
    assert set(allocated_ips(cluster.status("pool"))) == {new_ip}
    assert cluster.endpoint("web-0") is not None


def test_pool_choice_annotations_namespace_defaults_and_filters(cluster: Cluster) -> None:
    cluster.node("n1", labels={"zone": "a"})
    cluster.pool("anno", ips="172.18.30.131")
    cluster.pool("nsdefault", ips="172.18.30.132")
    cluster.pool("clusterdefault", ips="172.18.30.133", default=True)
    cluster.pool("other-zone", ips="172.18.30.134", nodeAffinity={"matchLabels": {"zone": "b"}})
    cluster.namespace(
        "team", annotations={"ipam.spidernet.io/default-ipv4-ippool": '["nsdefault"]'}
    )
    ipam = Ipam(cluster.agent, "n1")
    uid = cluster.pod("a", annotations={"ipam.spidernet.io/ippool": '{"ipv4": ["anno"]}'})
    assert ipam.allocate(req("a", uid))[0].pool == "anno"
    uid = cluster.pod("b", ns="team")
    assert ipam.allocate(req("b", uid, ns="team"))[0].pool == "nsdefault"
    uid = cluster.pod("c")
    assert ipam.allocate(req("c", uid))[0].pool == "clusterdefault"
    uid = cluster.pod("d", annotations={"ipam.spidernet.io/ippool": '{"ipv4": ["other-zone"]}'})
    with pytest.raises(CniError) as e:
        ipam.allocate(req("d", uid))
    assert e.value.code == 104 and "other-zone" in e.value.msg and "nodeAffinity" in e.value.msg


def test_unknown_pool_is_named(cluster: Cluster) -> None:
    uid = cluster.pod("p1", annotations={"ipam.spidernet.io/ippool": '{"ipv4": ["nope"]}'})
    with pytest.raises(CniError) as e:
        Ipam(cluster.agent, "n1").allocate(req("p1", uid))
    assert e.value.code == 102
    assert "nope" in e.value.msg and "ipam.spidernet.io/ippool" in e.value.msg


def test_exhausted_pool_names_pool_and_size(cluster: Cluster) -> None:
    cluster.pool("tiny", ips="172.18.30.131-172.18.30.132")
    ipam = Ipam(cluster.agent, "n1")
    for name in ("p1", "p2"):
        ipam.allocate(req(name, cluster.pod(name), default_ipv4_ippool="tiny"))
    uid = cluster.pod("p3")
    with pytest.raises(CniError) as e:
        ipam.allocate(req("p3", uid, default_ipv4_ippool="tiny"))
    assert e.value.code == 101
    assert "tiny" in e.value.msg and "all 2 IPs" in e.value.msg
    assert cluster.status("tiny")["allocatedIPCount"] == 2
    assert cluster.endpoint("p3") is None


def test_no_pool_selected_lists_what_was_looked_at(cluster: Cluster) -> None:
    uid = cluster.pod("p1")
    with pytest.raises(CniError) as e:
        Ipam(cluster.agent, "n1").allocate(req("p1", uid))
    assert e.value.code == 103
    assert "ipam.spidernet.io/ippools" in e.value.msg and "default_ipv4_ippool" in e.value.msg


def test_api_server_unreachable_is_try_again_later() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{port}"
    cfg.retries = 0
    with pytest.raises(CniError) as e:
        Ipam(client.ApiClient(cfg), "n1").allocate(req("p1", "u1", default_ipv4_ippool="pool"))
    assert e.value.code == 11
    assert f"127.0.0.1:{port}" in e.value.msg


def test_conflicting_writers_never_duplicate(cluster: Cluster) -> None:
    """Two engines with their own clients race on one pool; 409s are retried, IPs distinct."""
    cluster.pool("pool", ips="172.18.31.0-172.18.31.255", subnet="172.18.0.0/16")
    engines = [
        Ipam(cluster.agent_client(), "n1"),
        Ipam(cluster.agent_client(), "n2"),
    ]
    uids = cluster.pods([f"p{i}" for i in range(40)])
    got: dict[str, str] = {}

    def work(k: int) -> None:
        for i in range(k, 40, 2):
            got[f"p{i}"] = (
                engines[k].allocate(req(f"p{i}", uids[f"p{i}"], default_ipv4_ippool="pool"))[0].ip
            )

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got.values())) == 40
    records = allocated_ips(cluster.status("pool"))
    assert set(records) == set(got.values())
    assert {r["podUid"] for r in records.values()} == set(uids.values())


# --- agent processes, hundreds of ADDs through the shim ---------------------------------------
def agents_promise(
    cluster: Cluster,
    tmp_path: Path,
    agents: int,
    pods: int,
    ips: str,
    parallel: int | None,
    *,
    as_a_runtime: bool = False,
) -> float:
    """``pods`` concurrent ADDs through the shims of ``agents`` agent processes into one pool,
    then as many DELs: every ADD succeeds with an address no other pod got, and the pool's
    records and the SpiderEndpoints say exactly what the ADDs answered (tests/ipamload.py,
    :func:`audit`); after the DELs nothing is left. Returns the ADD rate (allocations/s).

    ``as_a_runtime``: the agents contend for one pool object, and an agent that keeps losing
    the compare-and-swap fails an ADD with code 11 ("try again later") and leaves a DEL for
    garbage collection (it never fails a DEL): ADDs failed with 11 are then retried, as a
    kubelet retries a sandbox, and after the DELs the pods are deleted and one GC pass runs,
    as the agent's GcLoop does; anything else still fails the test.
    """
    cluster.pool("big", ips=ips)
    uids = cluster.pods([f"c{i}" for i in range(pods)])
    order = [(f"c{i}", uids[f"c{i}"]) for i in range(pods)]
    procs = start_cni_agents(cluster, tmp_path, agents)
    conf = ipam_conf("big")
    ok = False
    try:
        add = storm(procs, conf, "ADD", order, parallel=parallel)
        retried = 0
        for _ in range(3 if as_a_runtime else 0):
            again = [n for n, _, out, _ in add.failures() if json.loads(out).get("code") == 11]
            if not again:
                break
            retried += len(again)
            more = storm(procs, conf, "ADD", order, parallel=parallel, only=set(again))
            add.results.update(more.results)
        assert add.failures() == [], add.failures()[:3]
        got = add.addresses()
        assert len(got) == pods and len(set(got.values())) == pods
        assert audit(cluster.api, "big", order, got, procs) == []
        st = cluster.status("big")
        assert st["allocatedIPCount"] == pods == len(allocated_ips(st))
        rate = pods / add.seconds
        print(
            f"{agents} agents, {pods} ADDs: {add.seconds:.1f} s, {rate:.0f} allocations/s"
            f" ({retried} retried after code 11)"
        )
        rm = storm(procs, conf, "DEL", order, parallel=parallel)
        assert all(rc == 0 and out == b"" for rc, out, _ in rm.results.values())
        left = [n for n, _, _, err in rm.failures()]
        if as_a_runtime:
            assert all(b"left for garbage collection" in err for *_, err in rm.failures())
            print(f"{len(left)} DELs left for garbage collection")
            cluster.core.delete_collection_namespaced_pod("default", grace_period_seconds=0)
            wait_for(lambda: not cluster.core.list_namespaced_pod("default").items, 60, "pods gone")
            report = collect(cluster.agent)
            assert sorted(pod for _, _, pod, _ in report.ips) == sorted(
                f"default/{n}" for n in left
            )
        else:
            assert left == [], rm.failures()[:3]
        st = cluster.status("big")
        assert st["allocatedIPCount"] == 0 and "allocatedIPs" not in st
        wait_for(lambda: cluster.endpoints.list("default")["items"] == [], 30, "no endpoint")
        ok = True
        return rate
    finally:
        for p in procs:
            p.stop()
            if not ok:
                print(f"--- agent {p.node} log:\n{p.log.read_text()[-3000:]}")


def test_two_agent_processes_allocate_200_distinct_ips(cluster: Cluster, tmp_path: Path) -> None:
    """The IPAM promise: two agents, 200 ADDs at once, every IP distinct."""
    agents_promise(cluster, tmp_path, 2, 200, "172.18.32.0-172.18.32.255", parallel=None)


def test_four_agent_processes_allocate_240_distinct_ips(cluster: Cluster, tmp_path: Path) -> None:
    """Four agents, 240 ADDs, 48 in flight (bench/bench_ipam.py runs 4 x 1,000), handled as a
    runtime and the agents' GC handle them."""
    agents_promise(
        cluster, tmp_path, 4, 240, "172.18.32.0-172.18.33.255", parallel=48, as_a_runtime=True
    )


# --- on the rig: pods attached and pinging, interop with Debian's bridge -------------------
@pytest.fixture
def rig_cluster(rig: Rig, cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Rig, Cluster, str]]:
    """The control plane reachable from node namespaces at the rig's API server address (the
    test's fault proxy listening there); yields the agent's kubeconfig for that address."""
    url = cluster.kube.listen_in_netns(rig.switch.path, APISERVER_IP, 6443)
    kubeconfig = str(cluster.kube.agent_kubeconfig(tmp_path / "node-agent.kubeconfig", url))
    yield rig, cluster, kubeconfig


@pytest.mark.root
def test_pods_on_two_nodes_get_pool_ips_and_ping(
    rig_cluster: tuple[Rig, Cluster, str], tmp_path: Path
) -> None:
    rig, cluster, kubeconfig = rig_cluster
    cluster.pool("ippool-test")
    conf = conflist(
        {
            "type": "underlay-ovs",
            "bridge": "br1",
            "vlan": 0,
            "ipam": {"type": "underlay-ipam", "default_ipv4_ippool": ["ippool-test"]},
        }
    )
    agents, runtimes, pods, uids = [], {}, {}, {}
    try:
        for i, (name, ip) in enumerate([("n1", "172.18.10.11"), ("n2", "172.18.10.12")], 1):
            node = rig.add_node(name, ip)
            make_bridge(node)
            cluster.node(name)
            agent = Agent(node, tmp_path, kubeconfig=kubeconfig, node_name=name)
            agents.append(agent)
            runtimes[name] = Runtime(node, agent.cni_path)
            pods[name] = rig.add_pod(f"p{i}")
            uids[name] = cluster.pod(f"p{i}")
        r1 = runtimes["n1"].add(conf, pods["n1"], "cid1", pod=("default", "p1", uids["n1"]))
        r2 = runtimes["n2"].add(conf, pods["n2"], "cid2", pod=("default", "p2", uids["n2"]))
        assert r1["ips"] == [{"address": "172.18.30.131/16", "gateway": GATEWAY, "interface": 1}]
        assert r2["ips"][0]["address"] == "172.18.30.132/16"
        assert r1["routes"] == [{"dst": "0.0.0.0/0", "gw": GATEWAY}]
        assert r1["interfaces"][1]["mac"] == "0a:58:ac:12:1e:83"
        assert pods["n1"].ping("172.18.30.132") and pods["n2"].ping("172.18.30.131")
        assert pods["n1"].ping(GATEWAY) and pods["n2"].ping(GATEWAY)
        ep = cluster.endpoint("p2")
        assert ep is not None and ep["status"]["current"]["node"] == "n2"
        runtimes["n1"].check(conf, pods["n1"], "cid1", pod=("default", "p1", uids["n1"]))
        # DEL twice; DEL of p2 after its netns is gone
        runtimes["n1"].delete(conf, pods["n1"], "cid1", pod=("default", "p1", uids["n1"]))
        runtimes["n1"].delete(conf, pods["n1"], "cid1", pod=("default", "p1", uids["n1"]))
        gone = pods["n2"].path
        rig.delete_pod("p2")
        runtimes["n2"].delete(conf, gone, "cid2", pod=("default", "p2", uids["n2"]))
        st = cluster.status("ippool-test")
        assert st["allocatedIPCount"] == 0 and "allocatedIPs" not in st
        assert cluster.endpoint("p1") is None and cluster.endpoint("p2") is None
        assert (
            ovs_port_of(rig.nodes["n1"], "cid1") is None
            and ovs_port_of(rig.nodes["n2"], "cid2") is None
        )
    finally:
        for a in agents:
            a.stop()


@pytest.mark.root
def test_debian_bridge_plugin_with_underlay_ipam(
    rig_cluster: tuple[Rig, Cluster, str], tmp_path: Path
) -> None:
    rig, cluster, kubeconfig = rig_cluster
    cluster.pool("ippool-test")
    node = rig.add_node("n1", "172.18.10.11")
    cluster.node("n1")
    agent = Agent(node, tmp_path, kubeconfig=kubeconfig, node_name="n1")
    # A Linux bridge takes the lowest MAC of its ports unless one is set: give it a fixed one so
    # adding p2 cannot change the MAC recorded in p1's result (the bridge plugin CHECKs it).
    node.run("ip", "link", "add", "cni-test0", "address", "02:00:00:00:00:01", "type", "bridge")
    try:
        rt = Runtime(node, agent.cni_path)
        conf = conflist(
            {
                "type": "bridge",
                "bridge": "cni-test0",
                "isGateway": False,
                "ipam": {"type": "underlay-ipam", "default_ipv4_ippool": ["ippool-test"]},
            },
            version="0.4.0",
            name="bridge-conf",
        )
        p1, p2 = rig.add_pod("p1"), rig.add_pod("p2")
        u1, u2 = cluster.pod("p1"), cluster.pod("p2")
        r1 = rt.add(conf, p1, "c1", pod=("default", "p1", u1))
        rt.add(conf, p2, "c2", pod=("default", "p2", u2))
        assert r1["cniVersion"] == "0.4.0"
        assert any(ip["address"] == "172.18.30.131/16" and ip["version"] == "4" for ip in r1["ips"])
        assert p1.addresses("eth0") == ["172.18.30.131/16"]
        assert p1.ping("172.18.30.132")
        rt.check(conf, p1, "c1", pod=("default", "p1", u1))  # bridge's CHECK runs ours too
        # drift: p1's allocation released behind the runtime's back (as a GC would)
        Ipam(cluster.agent, "n1").release(
            IpamRequest("default", "p1", u1, "c1", "eth0", {"default_ipv4_ippool": ["ippool-test"]})
        )
        with pytest.raises(CniFailure) as e:
            rt.check(conf, p1, "c1", pod=("default", "p1", u1))
        assert e.value.code == 108 and "SpiderEndpoint default/p1" in e.value.msg
        rt.delete(conf, p1, "c1", pod=("default", "p1", u1))
        rt.delete(conf, p2, "c2", pod=("default", "p2", u2))
        assert cluster.status("ippool-test")["allocatedIPCount"] == 0
    finally:
        agent.stop()


@pytest.mark.root
def test_errors_through_the_shim(rig_cluster: tuple[Rig, Cluster, str], tmp_path: Path) -> None:
    """Unknown pool and exhausted pool as the runtime sees them; nothing is left attached."""
    rig, cluster, kubeconfig = rig_cluster
    cluster.pool("one", ips="172.18.30.131")
    node = rig.add_node("n1", "172.18.10.11")
    make_bridge(node)
    cluster.node("n1")
    agent = Agent(node, tmp_path, kubeconfig=kubeconfig, node_name="n1")
    try:
        rt = Runtime(node, agent.cni_path)
        p1, p2 = rig.add_pod("p1"), rig.add_pod("p2")
        u1, u2 = cluster.pod("p1"), cluster.pod("p2")
        bad = conflist(
            {
                "type": "underlay-ovs",
                "bridge": "br1",
                "ipam": {"type": "underlay-ipam", "default_ipv4_ippool": ["missing-pool"]},
            }
        )
        with pytest.raises(CniFailure) as e:
            rt.add(bad, p1, "c1", pod=("default", "p1", u1))
        assert e.value.code == 102 and "missing-pool" in e.value.msg
        ok = conflist(
            {
                "type": "underlay-ovs",
                "bridge": "br1",
                "ipam": {"type": "underlay-ipam", "default_ipv4_ippool": ["one"]},
            }
        )
        rt.add(ok, p1, "c1", pod=("default", "p1", u1))
        with pytest.raises(CniFailure) as e:
            rt.add(ok, p2, "c2", pod=("default", "p2", u2))
        assert e.value.code == 101 and "one" in e.value.msg and "all 1 IPs" in e.value.msg
        assert ovs_port_of(node, "c2") is None and not p2.link_exists("eth0")
        rc, _, _ = exec_plugin(
            node,
            agent.cni_path,
            "DEL",
            {**ok["plugins"][0], "name": "ovs-conf", "cniVersion": "1.0.0"},
            netns=p2.path,
            cid="c2",
            pod=("default", "p2", u2),
        )
        assert rc == 0
    finally:
        agent.stop()


# --- concurrency control and API failures -----------------------------------------------------
def test_stale_copy_gets_409_and_is_retried(cluster: Cluster) -> None:
    """Agent A's remembered pool copy goes stale when agent B writes; A's write is refused
    with 409 Conflict, A re-reads and allocates the next free IP."""
    cluster.pool("pool")
    a, b = Ipam(cluster.agent_client(), "n1"), Ipam(cluster.agent_client(), "n2")
    ips = [a.allocate(req("p1", cluster.pod("p1"), default_ipv4_ippool="pool"))[0].ip]
    ips.append(b.allocate(req("p2", cluster.pod("p2"), default_ipv4_ippool="pool"))[0].ip)
    ips.append(a.allocate(req("p3", cluster.pod("p3"), default_ipv4_ippool="pool"))[0].ip)
    assert ips == ["172.18.30.131", "172.18.30.132", "172.18.30.133"]
    assert a.conflicts == 1 and b.conflicts == 0
    assert cluster.status("pool")["allocatedIPCount"] == 3


def test_injected_conflicts_are_retried(cluster: Cluster) -> None:
    cluster.pool("pool")
    uid = cluster.pod("p1")
    cluster.kube.inject_fault(r"/spiderippools/pool/status$", method="PUT", status=409, count=3)
    ipam = Ipam(cluster.agent, "n1")
    assert ipam.allocate(req("p1", uid, default_ipv4_ippool="pool"))[0].ip == "172.18.30.131"
    assert ipam.conflicts == 3
    assert len(cluster.kube.requests("PUT", r"/spiderippools/pool/status$")) == 4


def test_endpoint_write_failure_releases_the_ip(cluster: Cluster) -> None:
    cluster.pool("pool")
    uid = cluster.pod("p1")
    cluster.kube.inject_fault(r"/spiderendpoints$", method="POST", status=500, count=1)
    with pytest.raises(CniError) as e:
        Ipam(cluster.agent, "n1").allocate(req("p1", uid, default_ipv4_ippool="pool"))
    assert e.value.code == 11 and "SpiderEndpoint" in e.value.msg
    st = cluster.status("pool")
    assert st["allocatedIPCount"] == 0 and "allocatedIPs" not in st


def test_server_error_on_pool_write_changes_nothing(cluster: Cluster) -> None:
    cluster.pool("pool")
    uid = cluster.pod("p1")
    cluster.kube.inject_fault(r"/spiderippools/pool/status$", method="PUT", status=500, count=1)
    with pytest.raises(CniError) as e:
        Ipam(cluster.agent, "n1").allocate(req("p1", uid, default_ipv4_ippool="pool"))
    assert e.value.code == 11 and "pool" in e.value.msg
    assert cluster.status("pool").get("allocatedIPCount", 0) == 0
    assert cluster.endpoint("p1") is None


def test_api_unreachable_through_the_shim(tmp_path: Path) -> None:
    """An agent whose API server is down: ADD fails with code 11 naming the server; DEL
    exits 0 and says on stderr what it left for garbage collection."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    kubeconfig = tmp_path / "kc"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
        f"clusters: [{{name: x, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: x, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: x, user: x}}]\n"
    )
    sock = str(tmp_path / "a.sock")
    install_shims(tmp_path / "bin", sock, python=PYTHON)
    with open(tmp_path / "agent.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "node_agent.cni.server", "--socket", sock, "--kubeconfig", str(kubeconfig), "--node-name", "n1"],
            stdout=subprocess.PIPE, stderr=log, cwd=str(Path(__file__).parents[2]),
        )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        conf = {
            "cniVersion": "1.0.0",
            "name": "m",
            "type": "macvlan",
            "ipam": {"type": "underlay-ipam", "default_ipv4_ippool": ["pool"]},
        }
        env = {
            "CNI_CONTAINERID": "c1",
            "CNI_NETNS": "/run/netns/x",
            "CNI_IFNAME": "net1",
            "CNI_PATH": "/x",
            "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p1;K8S_POD_UID=u1",
        }
        add = subprocess.run(
            [str(tmp_path / "bin" / "underlay-ipam")],
            input=json.dumps(conf).encode(),
            env={**env, "CNI_COMMAND": "ADD"},
            capture_output=True,
            timeout=120,
            check=False,
        )
        err = json.loads(add.stdout)
        assert add.returncode == 1 and err["code"] == 11
        assert f"127.0.0.1:{port}" in err["msg"]
        rm = subprocess.run(
            [str(tmp_path / "bin" / "underlay-ipam")],
            input=json.dumps(conf).encode(),
            env={**env, "CNI_COMMAND": "DEL"},
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert rm.returncode == 0 and rm.stdout == b""
        assert b"garbage collection" in rm.stderr and f"127.0.0.1:{port}".encode() in rm.stderr
    finally:
        proc.terminate()
        proc.wait(10)
