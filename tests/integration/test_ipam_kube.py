"""underlay-ipam against the Kubernetes API emulator (tests/kube): records, CAS, errors.

The engine runs in-process here (``Ipam`` with a real ``kubernetes`` ApiClient over HTTP to
the emulator); the concurrency test runs two agent processes served through the installed
shim, as a runtime would call them; the rig tests attach pods with underlay-ovs +
underlay-ipam, and Debian's bridge plugin + underlay-ipam, from agents inside node
namespaces that reach the emulator at the rig's API server address.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from node_agent.cni.errors import CniError
from node_agent.cni.install import install_shims
from node_agent.ipam import Ipam, IpamRequest

from reconciler.ippool import allocated_ips
from reconciler.kube import Objects, api_client
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
from tests.rig import APISERVER_IP, GATEWAY, Rig

emulator_mod = pytest.importorskip(
    "tests.kube.emulator", reason="tests/kube/emulator.py not written yet"
)

POOL_IPS = "172.18.30.131-172.18.30.140"


# --- fixtures and helpers --------------------------------------------------------------------
class Cluster:
    """The emulator plus typed helpers to create the objects IPAM reads."""

    def __init__(self, tmp: Path) -> None:
        self.em = emulator_mod.Emulator()
        self.em.start()
        for res in (SPIDER_IPPOOL, SPIDER_ENDPOINT):
            self.em.register(res)
        self.kubeconfig = str(tmp / "kubeconfig")
        self.em.write_kubeconfig(self.kubeconfig)
        self.api = api_client(self.kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.pools = Objects(self.api, SPIDER_IPPOOL)
        self.endpoints = Objects(self.api, SPIDER_ENDPOINT)
        for ns in ("default", "kube-system"):
            self.namespace(ns)

    def namespace(
        self,
        name: str,
        annotations: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "annotations": annotations or {}, "labels": labels or {}},
        }
        try:
            self.core.create_namespace(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_namespace(
                name, {"metadata": {"annotations": annotations or {}, "labels": labels or {}}}
            )

    def node(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.core.create_node(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {}}}
        )

    def pod(
        self,
        name: str,
        ns: str = "default",
        annotations: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> str:
        body = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations or {}, "labels": labels or {}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        }  # fmt: skip
        created = self.api.sanitize_for_serialization(self.core.create_namespaced_pod(ns, body))
        return str(created["metadata"]["uid"])

    def delete_pod(self, name: str, ns: str = "default") -> None:
        self.core.delete_namespaced_pod(name, ns, grace_period_seconds=0)

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

    def stop(self) -> None:
        self.em.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def req(name: str, uid: str, ifname: str = "eth0", ns: str = "default", **conf: Any) -> IpamRequest:
    return IpamRequest(
        namespace=ns,
        pod_name=name,
        pod_uid=uid,
        container_id=f"cid-{name}",
        ifname=ifname,
        config=conf,
    )


# --- engine against the emulator -------------------------------------------------------------


def start_cni_agents(
    cluster: Cluster, tmp_path: Path, count: int = 2
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """``count`` CNI server processes (nodes n0, n1, ...) with their shims installed, each
    ready to serve: [(process, bin dir)]. The caller terminates them."""
    agents = []
    for k in range(count):
        sock = str(tmp_path / f"a{k}.sock")
        bin_dir = tmp_path / f"bin{k}"
        install_shims(bin_dir, sock, python=PYTHON)
        with open(tmp_path / f"a{k}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "node_agent.cni.server", "--socket", sock, "--kubeconfig", cluster.kubeconfig, "--node-name", f"n{k}"],
                stdout=subprocess.PIPE, stderr=log, cwd=str(Path(__file__).parents[2]),
            )  # fmt: skip
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        agents.append((proc, bin_dir))
    return agents


def run_ipam_shim(
    bins: Path, conf: dict[str, Any], command: str, cid: str, pod: str, uid: str
) -> tuple[int, bytes]:
    """Execute the installed ``underlay-ipam`` shim in ``bins`` as a runtime does (env +
    stdin) for pod ``default/<pod>``; returns (exit code, stdout)."""
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": "/run/netns/none",
        "CNI_IFNAME": "net1",
        "CNI_PATH": "/x",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_UID={uid}",
    }
    p = subprocess.run(
        [str(bins / "underlay-ipam")],
        input=json.dumps(conf).encode(),
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    return p.returncode, p.stdout


def test_allocate_records_and_release_exactly_like_spiderpool(cluster: Cluster) -> None:
    cluster.node("n1")
    cluster.pool("ippool-test")
    uid = cluster.pod("p1")
    ipam = Ipam(cluster.api, "n1")
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
    ipam = Ipam(cluster.api, "n1")
    first = ipam.allocate(req("p1", uid, default_ipv4_ippool="pool"))
    again = ipam.allocate(req("p1", uid, default_ipv4_ippool="pool"))
    assert first[0].ip == again[0].ip
    assert cluster.status("pool")["allocatedIPCount"] == 1


def test_multi_interface_retries_do_not_drain_the_pool(cluster: Cluster) -> None:
    cluster.pool("pool")
    uid = cluster.pod("p1")
    ipam = Ipam(cluster.api, "n1")
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
    ipam = Ipam(cluster.api, "n1")
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
    ipam = Ipam(cluster.api, "n1")
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
        Ipam(cluster.api, "n1").allocate(req("p1", uid))
    assert e.value.code == 102
    assert "nope" in e.value.msg and "ipam.spidernet.io/ippool" in e.value.msg


def test_exhausted_pool_names_pool_and_size(cluster: Cluster) -> None:
    cluster.pool("tiny", ips="172.18.30.131-172.18.30.132")
    ipam = Ipam(cluster.api, "n1")
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
        Ipam(cluster.api, "n1").allocate(req("p1", uid))
    assert e.value.code == 103
    assert "ipam.spidernet.io/ippools" in e.value.msg and "default_ipv4_ippool" in e.value.msg


def test_api_server_unreachable_is_try_again_later(cluster: Cluster, tmp_path: Path) -> None:
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
        Ipam(api_client(cluster.kubeconfig), "n1"),
        Ipam(api_client(cluster.kubeconfig), "n2"),
    ]
    uids = {f"p{i}": cluster.pod(f"p{i}") for i in range(40)}
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


# --- two agent processes, 200 ADDs through the shim ------------------------------------------
def test_two_agent_processes_allocate_200_distinct_ips(cluster: Cluster, tmp_path: Path) -> None:
    cluster.pool("big", ips="172.18.32.0-172.18.32.255")
    pods = [(f"c{i}", cluster.pod(f"c{i}")) for i in range(200)]
    agents = start_cni_agents(cluster, tmp_path)
    conf = {
        "cniVersion": "1.0.0",
        "name": "macvlan-conf",
        "type": "macvlan",
        "ipam": {"type": "underlay-ipam", "default_ipv4_ippool": ["big"]},
    }
    results: dict[str, Any] = {}

    def call(i: int, command: str) -> None:
        name, uid = pods[i]
        results[name] = run_ipam_shim(agents[i % 2][1], conf, command, f"cid{i}", name, uid)

    try:
        for command in ("ADD", "DEL"):
            results.clear()
            threads = [threading.Thread(target=call, args=(i, command)) for i in range(200)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(rc == 0 for rc, _ in results.values()), [
                r for r in results.values() if r[0]
            ][:3]
            st = cluster.status("big")
            if command == "ADD":
                ips = [json.loads(out)["ips"][0]["address"] for _, out in results.values()]
                assert len(set(ips)) == 200
                records = allocated_ips(st)
                assert st["allocatedIPCount"] == 200 == len(records)
                assert {f"{ip}/16" for ip in records} == set(ips)
            else:
                assert st["allocatedIPCount"] == 0 and "allocatedIPs" not in st
                assert cluster.endpoints.list("default")["items"] == []
    finally:
        for proc, _ in agents:
            proc.terminate()
            proc.wait(10)


# --- on the rig: pods attached and pinging, interop with Debian's bridge -------------------
@pytest.fixture
def rig_cluster(rig: Rig, cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Rig, Cluster, str]]:
    """The emulator reachable from node namespaces at the rig's API server address."""
    url = cluster.em.listen_in_netns(rig.switch.path, APISERVER_IP, 6443)
    kubeconfig = str(tmp_path / "node-kubeconfig")
    cluster.em.write_kubeconfig(kubeconfig, server_url=url)
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
        Ipam(cluster.api, "n1").release(
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
    a, b = Ipam(api_client(cluster.kubeconfig), "n1"), Ipam(api_client(cluster.kubeconfig), "n2")
    ips = [a.allocate(req("p1", cluster.pod("p1"), default_ipv4_ippool="pool"))[0].ip]
    ips.append(b.allocate(req("p2", cluster.pod("p2"), default_ipv4_ippool="pool"))[0].ip)
    ips.append(a.allocate(req("p3", cluster.pod("p3"), default_ipv4_ippool="pool"))[0].ip)
    assert ips == ["172.18.30.131", "172.18.30.132", "172.18.30.133"]
    assert a.conflicts == 1 and b.conflicts == 0
    assert cluster.status("pool")["allocatedIPCount"] == 3


def test_injected_conflicts_are_retried(cluster: Cluster) -> None:
    cluster.pool("pool")
    uid = cluster.pod("p1")
    cluster.em.inject_fault(r"/spiderippools/pool/status$", method="PUT", status=409, count=3)
    ipam = Ipam(cluster.api, "n1")
    assert ipam.allocate(req("p1", uid, default_ipv4_ippool="pool"))[0].ip == "172.18.30.131"
    assert ipam.conflicts == 3
    assert len(cluster.em.requests("PUT", r"/spiderippools/pool/status$")) == 4


def test_endpoint_write_failure_releases_the_ip(cluster: Cluster) -> None:
    cluster.pool("pool")
    uid = cluster.pod("p1")
    cluster.em.inject_fault(r"/spiderendpoints$", method="POST", status=500, count=1)
    with pytest.raises(CniError) as e:
        Ipam(cluster.api, "n1").allocate(req("p1", uid, default_ipv4_ippool="pool"))
    assert e.value.code == 11 and "SpiderEndpoint" in e.value.msg
    st = cluster.status("pool")
    assert st["allocatedIPCount"] == 0 and "allocatedIPs" not in st


def test_server_error_on_pool_write_changes_nothing(cluster: Cluster) -> None:
    cluster.pool("pool")
    uid = cluster.pod("p1")
    cluster.em.inject_fault(r"/spiderippools/pool/status$", method="PUT", status=500, count=1)
    with pytest.raises(CniError) as e:
        Ipam(cluster.api, "n1").allocate(req("p1", uid, default_ipv4_ippool="pool"))
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
