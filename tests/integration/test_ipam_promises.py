"""underlay-ipam against the real control plane: the promises users judge us on.

An IP is never handed out twice (late DELs of dead sandboxes, DELs without a pod UID,
parallel interfaces of one pod, retried ADDs after a pool fallback, gateways of other pools);
what Git says is what the cluster has (pool edits seen by the next ADD); a hung API server
fails a call with code 11 instead of stalling every pod; malformed objects get clear codes.
Each test started as a hostile tester's reproducer. The engine runs in-process with a real
``kubernetes`` client as the agent's ServiceAccount through the test's fault proxy; the shim
tests run agent processes as a runtime calls them.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netaddr
import pytest
from kubernetes import client
from node_agent.cni.errors import CniError
from node_agent.ipam import MAX_RECORDS, MAX_SAFE_INTEGER, Ipam, IpamRequest, size_refusal

from reconciler.ippool import allocated_ips, pool_status
from tests.integration.test_ipam_kube import Cluster, cluster
from tests.ipamload import ipam_conf, run_ipam_shim, start_agents
from tests.rig import wait_for

__all__ = ["cluster"]  # the fixture, shared with test_ipam_kube

POOL = {"default_ipv4_ippool": ["pool"]}


def sandbox(name: str, uid: str, cid: str, ifname: str = "eth0", **conf: Any) -> IpamRequest:
    """The IPAM request of one sandbox (CNI_CONTAINERID ``cid``) of pod ``name``."""
    return IpamRequest("default", name, uid, cid, ifname, conf or dict(POOL))


def entries(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    ep = cluster.endpoint(name)
    assert ep is not None, f"SpiderEndpoint default/{name} is missing"
    return list(ep["status"]["current"]["ips"])


# --- 1. DEL releases only what its container was given ------------------------------------------
def test_late_del_of_a_dead_sandbox_leaves_the_live_sandbox_its_ip(cluster: Cluster) -> None:
    """Kubelet recreated the pod's sandbox (same pod UID); the dead sandbox's DEL comes after
    the new sandbox's ADD. It must release nothing: the live sandbox keeps its IP and no
    other pod gets it."""
    cluster.pool("pool")
    uid = cluster.pod("web")
    ipam = Ipam(cluster.agent, "n1")
    (a,) = ipam.allocate(sandbox("web", uid, "sandbox-A"))
    (b,) = ipam.allocate(sandbox("web", uid, "sandbox-B"))
    assert b.ip == a.ip  # the pod keeps its address across sandboxes
    assert [e["containerID"] for e in entries(cluster, "web")] == ["sandbox-B"]
    with pytest.raises(CniError) as e:  # CHECK of the dead sandbox fails, naming the holder
        ipam.check(sandbox("web", uid, "sandbox-A"))
    assert e.value.code == 108 and "container sandbox-B" in e.value.msg
    ipam.check(sandbox("web", uid, "sandbox-B"))

    assert ipam.release(sandbox("web", uid, "sandbox-A")) == []  # the late DEL
    assert allocated_ips(cluster.status("pool")) == {b.ip: {"pod": "default/web", "podUid": uid}}
    assert [e["containerID"] for e in entries(cluster, "web")] == ["sandbox-B"]
    other = ipam.allocate(sandbox("other", cluster.pod("other"), "sandbox-C"))[0]
    assert other.ip != b.ip

    # the live sandbox's own DEL releases it, once
    assert ipam.release(sandbox("web", uid, "sandbox-B")) == [("pool", b.ip)]
    assert ipam.release(sandbox("web", uid, "sandbox-B")) == []
    assert cluster.endpoint("web") is None


def test_del_without_pod_uid_never_releases_another_uids_records(cluster: Cluster) -> None:
    """A runtime that passes no K8S_POD_UID: StatefulSet pod web-0 is recreated (new UID) and
    attached; the old sandbox's late DEL must not release the new pod's IP."""
    cluster.pool("pool")
    ipam = Ipam(cluster.agent, "n1")
    old_uid = cluster.pod("web-0")
    (old,) = ipam.allocate(sandbox("web-0", "", "old"))
    cluster.delete_pod("web-0")
    new_uid = cluster.pod("web-0")
    (new,) = ipam.allocate(sandbox("web-0", "", "new"))
    assert new.ip != old.ip
    assert ipam.release(sandbox("web-0", "", "old")) == []
    records = allocated_ips(cluster.status("pool"))
    assert records[new.ip] == {"pod": "default/web-0", "podUid": new_uid}
    assert [(e["containerID"], e["ipv4"]) for e in entries(cluster, "web-0")] == [
        ("new", f"{new.ip}/16")
    ]
    x = ipam.allocate(sandbox("x", cluster.pod("x"), "x"))[0]
    assert x.ip not in (new.ip, old.ip)  # the old UID's record is left for GC, not reused
    assert records[old.ip]["podUid"] == old_uid
    # the new sandbox's DEL without UID is recognised by its container ID
    assert ipam.release(sandbox("web-0", "", "new")) == [("pool", new.ip)]


# --- 2. Git edits to a pool that was used before are seen --------------------------------------
def test_pool_edits_are_seen_by_the_next_add(cluster: Cluster) -> None:
    cluster.node("n1")
    cluster.pool("pool")
    ipam = Ipam(cluster.agent, "n1")
    ipam.allocate(sandbox("p1", cluster.pod("p1"), "c1"))  # the agent now holds a copy
    edit = client.CustomObjectsApi(cluster.api).patch_cluster_custom_object  # admin: Git's edits

    def patch(spec: dict[str, Any]) -> None:
        edit("spiderpool.spidernet.io", "v2beta1", "spiderippools", "pool", {"spec": spec})

    patch({"disable": True})
    with pytest.raises(CniError) as e:
        ipam.allocate(sandbox("p2", cluster.pod("p2"), "c2"))
    assert e.value.code == 104 and "pool: disabled" in e.value.msg
    patch({"disable": False, "nodeName": ["n9"]})
    with pytest.raises(CniError) as e:
        ipam.allocate(sandbox("p3", cluster.pod("p3"), "c3"))
    assert e.value.code == 104 and "not in spec.nodeName" in e.value.msg
    patch(
        {
            "nodeName": None,
            "gateway": "172.18.0.254",
            "routes": [{"dst": "10.9.0.0/16", "gw": "172.18.0.253"}],
        }
    )
    (a,) = ipam.allocate(sandbox("p4", cluster.pod("p4"), "c4"))
    assert a.gateway == "172.18.0.254"
    assert Ipam.to_cni_result([a])["routes"] == [
        {"dst": "0.0.0.0/0", "gw": "172.18.0.254"},
        {"dst": "10.9.0.0/16", "gw": "172.18.0.253"},
    ]
    assert set(allocated_ips(cluster.status("pool"))) == {"172.18.30.131", "172.18.30.132"}


# --- 3. two interfaces of one pod in parallel ---------------------------------------------------
def test_parallel_interfaces_of_one_pod_get_distinct_ips(cluster: Cluster) -> None:
    cluster.pool("pool")
    ipam = Ipam(cluster.agent, "n1")
    for k in range(6):
        uid = cluster.pod(f"m{k}")
        got: dict[str, str] = {}

        def add(ifname: str, k: int = k, uid: str = uid, got: dict[str, str] = got) -> None:
            got[ifname] = ipam.allocate(sandbox(f"m{k}", uid, f"c{k}", ifname))[0].ip

        threads = [threading.Thread(target=add, args=(i,)) for i in ("net1", "net2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got["net1"] != got["net2"], f"trial {k}: both interfaces got {got['net1']}"
        assert {e["interface"]: e["ipv4"] for e in entries(cluster, f"m{k}")} == {
            i: f"{ip}/16" for i, ip in got.items()
        }
        for ifname in ("net1", "net2"):
            ipam.release(sandbox(f"m{k}", uid, f"c{k}", ifname))
    assert allocated_ips(cluster.status("pool")) == {}


# --- 4. a retried ADD after a pool fallback -----------------------------------------------------
def test_retried_add_after_a_fallback_keeps_its_ip_and_leaks_nothing(cluster: Cluster) -> None:
    cluster.pool("a", ips="172.18.30.1")
    cluster.pool("b", ips="172.18.31.1-172.18.31.5")
    conf: dict[str, Any] = {"default_ipv4_ippool": ["a", "b"]}
    ipam = Ipam(cluster.agent, "n1")
    x = cluster.pod("x")
    assert ipam.allocate(sandbox("x", x, "cx", **conf))[0].pool == "a"
    p = cluster.pod("p")
    first = ipam.allocate(sandbox("p", p, "cp", **conf))[0]
    assert (first.pool, first.ip) == ("b", "172.18.31.1")  # a is full
    ipam.release(sandbox("x", x, "cx", **conf))  # a has room again
    again = ipam.allocate(sandbox("p", p, "cp", **conf))[0]
    assert (again.pool, again.ip) == ("b", "172.18.31.1")
    assert allocated_ips(cluster.status("a")) == {}
    # a leftover in another candidate pool (an earlier attempt whose endpoint write failed)
    # is released when the interface is allocated
    cluster.kube.inject_fault(r"/spiderendpoints/q/status$", method="PUT", status=500, count=1)
    q = cluster.pod("q")
    with pytest.raises(CniError):
        ipam.allocate(sandbox("q", q, "cq", **conf))
    assert allocated_ips(cluster.status("a")) == {}  # rolled back
    assert ipam.release(sandbox("p", p, "cp", **conf)) == [("b", "172.18.31.1")]
    assert allocated_ips(cluster.status("b")) == {}


def test_leftover_records_of_the_pod_in_other_candidate_pools_are_released(
    cluster: Cluster,
) -> None:
    cluster.pool("a", ips="172.18.30.1")
    cluster.pool("b", ips="172.18.31.1-172.18.31.5")
    conf: dict[str, Any] = {"default_ipv4_ippool": ["a", "b"]}
    p = cluster.pod("p")
    for name, ip in (("a", "172.18.30.1"), ("b", "172.18.31.3")):  # a crashed agent's leftovers
        pool = cluster.pools.get(name)
        pool["status"] = {"allocatedIPs": json.dumps({ip: {"pod": "default/p", "podUid": p}})}
        cluster.pools.replace_status(pool)
    ipam = Ipam(cluster.agent, "n1")
    got = ipam.allocate(sandbox("p", p, "cp", **conf))[0]
    assert (got.pool, got.ip) == ("a", "172.18.30.1")
    assert set(allocated_ips(cluster.status("a"))) == {"172.18.30.1"}
    assert allocated_ips(cluster.status("b")) == {}


# --- 8/9/10. record keys, huge pools, gateways of other pools -----------------------------------
@pytest.mark.parametrize(
    "key", ["not-an-ip", "172.18.30.131/16", "172.18.030.131", "", "fd00::0001"]
)
def test_malformed_record_key_is_invalid_config_naming_the_pool(cluster: Cluster, key: str) -> None:
    cluster.pool("odd")
    pool = cluster.pools.get("odd")
    pool["status"] = {"allocatedIPs": json.dumps({key: {"pod": "default/x", "podUid": "u"}})}
    cluster.pools.replace_status(pool)
    uid = cluster.pod("p1")
    with pytest.raises(CniError) as e:
        Ipam(cluster.agent, "n1").allocate(sandbox("p1", uid, "c1", default_ipv4_ippool="odd"))
    assert e.value.code == 7
    assert "SpiderIPPool odd" in e.value.msg and repr(key) in e.value.msg
    assert cluster.endpoint("p1") is None


def test_ipv6_64_pool_writes_counts_a_json_client_reads_exactly(cluster: Cluster) -> None:
    cluster.pools.create(
        {
            "apiVersion": "spiderpool.spidernet.io/v2beta1",
            "kind": "SpiderIPPool",
            "metadata": {"name": "v6"},
            "spec": {
                "subnet": "fd00::/64",
                "ips": ["fd00::2-fd00::ffff:ffff:ffff:ffff"],
                "gateway": "fd00::1",
            },
        }
    )
    (a,) = Ipam(cluster.agent, "n1").allocate(
        sandbox("p6", cluster.pod("p6"), "c6", default_ipv6_ippool=["v6"])
    )
    assert (a.address, a.gateway) == ("fd00::2/64", "fd00::1")
    st = cluster.status("v6")
    assert st["allocatedIPCount"] == 1
    assert st["totalIPCount"] == MAX_SAFE_INTEGER == 2**53 - 1


def test_a_pool_holds_at_most_max_records(cluster: Cluster) -> None:
    assert MAX_RECORDS == 5000  # Spiderpool's SPIDERPOOL_IPPOOL_MAX_ALLOCATED_IPS default
    cluster.pool("pool")  # 10 addresses
    ipam = Ipam(cluster.agent, "n1", max_records=3)
    for i in range(3):
        ipam.allocate(sandbox(f"p{i}", cluster.pod(f"p{i}"), f"c{i}"))
    with pytest.raises(CniError) as e:
        ipam.allocate(sandbox("p3", cluster.pod("p3"), "c3"))
    assert e.value.code == 101 and "3 allocation records" in e.value.msg
    assert cluster.status("pool")["allocatedIPCount"] == 3


def test_the_gateway_of_another_pool_is_never_handed_out(cluster: Cluster) -> None:
    cluster.pool("a", ips="172.18.30.131-172.18.30.140", gateway="172.18.31.3")
    cluster.pool("b", ips="172.18.31.1-172.18.31.5")
    ipam = Ipam(cluster.agent, "n1")
    got = [
        ipam.allocate(sandbox(f"b{i}", cluster.pod(f"b{i}"), f"c{i}", default_ipv4_ippool="b"))[
            0
        ].ip
        for i in range(4)
    ]
    assert got == ["172.18.31.1", "172.18.31.2", "172.18.31.4", "172.18.31.5"]
    with pytest.raises(CniError) as e:
        ipam.allocate(sandbox("b4", cluster.pod("b4"), "c4", default_ipv4_ippool="b"))
    assert e.value.code == 101
    # a pool created after the agent listed the gateways is seen at its first allocation
    cluster.pool("c", ips="172.18.32.1-172.18.32.3")
    cluster.pool("d", ips="172.18.33.1", gateway="172.18.32.1")
    assert (
        ipam.allocate(sandbox("c0", cluster.pod("c0"), "c", default_ipv4_ippool="c"))[0].ip
        == "172.18.32.2"
    )


# --- 12. a pool whose status outgrows what the API server stores -------------------------------
LIMIT_NS = "ipam-limit-" + "x" * 52  # 63 characters, the most a namespace name may have
LIMIT_IPS = [f"172.18.{c}.100-172.18.{c}.255" for c in range(100, 140)]
"""6,240 addresses, every one written with 14 characters: every record weighs the same."""


def long_name(prefix: str, i: int) -> str:
    """A 253-character pod name (the most a Pod may have), the same length for every ``i``."""
    return f"{prefix * 248}-{i:04d}"


def filler_records(n: int) -> dict[str, dict[str, str]]:
    """``n`` records of pods that do not exist, each as long as a record of a
    :func:`long_name` pod in :data:`LIMIT_NS`, on the pool's lowest addresses."""
    ips = [ip for r in LIMIT_IPS for ip in _range(r)][:n]
    return {
        ip: {"pod": f"{LIMIT_NS}/{long_name('f', i)}", "podUid": str(uuid.UUID(int=i + 1))}
        for i, ip in enumerate(ips)
    }


def _range(text: str) -> list[str]:
    first, last = text.split("-")
    return [str(ip) for ip in netaddr.IPRange(first, last)]


def write_records(cluster: Cluster, pool: str, records: dict[str, dict[str, str]]) -> bool:
    """Write ``records`` into the pool's status as the admin; False when the API server refuses
    the object as too large."""
    body = cluster.pools.get(pool)
    body["status"] = pool_status(body["spec"], records)
    try:
        cluster.pools.replace_status(body)
    except client.ApiException as exc:
        assert size_refusal(exc), (exc.status, exc.body)
        return False
    return True


def most_records_that_fit(cluster: Cluster, pool: str) -> int:
    """How many filler records the API server stores in ``pool``'s status (binary search with
    real writes); the pool is left with fewer."""
    lo, hi = 1000, 6000  # 1,000 fit; 6,000 (2.4 MB) do not
    assert write_records(cluster, pool, filler_records(lo))
    assert not write_records(cluster, pool, filler_records(hi))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if write_records(cluster, pool, filler_records(mid)):
            lo = mid
        else:
            hi = mid
    return lo


def test_a_pool_at_the_api_servers_size_limit_gives_a_clear_error(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Records of pods with the longest names (317-character pod references) in one pool: the
    API server refuses to store the status long before the 5,000-record cap. Measured here
    with real writes; then, with room for two more records, three ADDs at once (the last two
    in one group commit, held behind the first by the proxy): two succeed, the third gets
    code 101 naming the pool and etcd's limit, and nothing is left of it. A candidate pool
    with room is used instead; a DEL makes room again; the runtime sees the same error."""
    cluster.namespace(LIMIT_NS)
    cluster.pool("big", ips=LIMIT_IPS)
    cluster.pool("spare", ips="172.18.30.131-172.18.30.140")
    fit = most_records_that_fit(cluster, "big")
    print(f"{fit} records of 317-character pod references fit in one SpiderIPPool")
    assert 3000 < fit < MAX_RECORDS, fit  # about 1.5 MiB of ~410-byte records
    assert write_records(cluster, "big", filler_records(fit - 2))
    names = [long_name("p", i) for i in range(5)]
    uids = cluster.pods(names, ns=LIMIT_NS)
    ipam = Ipam(cluster.agent, "n1")

    def add(name: str, *pools: str) -> Any:
        r = IpamRequest(LIMIT_NS, name, uids[name], f"c-{name[-4:]}", "eth0", {"default_ipv4_ippool": list(pools or ["big"])})  # fmt: skip
        try:
            return ipam.allocate(r)[0]
        except CniError as exc:
            return exc

    cluster.kube.inject_fault(r"/spiderippools/big/status$", method="PUT", hang=1.0, count=1)
    got: dict[str, Any] = {}
    first = threading.Thread(target=lambda: got.update({names[0]: add(names[0])}))
    first.start()
    time.sleep(0.3)  # its status write is held by the proxy: the next two queue behind it
    rest = [threading.Thread(target=lambda n=n: got.update({n: add(n)})) for n in names[1:3]]
    for t in rest:
        t.start()
    for t in [first, *rest]:
        t.join()
    errors = {n: e for n, e in got.items() if isinstance(e, CniError)}
    assert len(errors) == 1, got
    ((failed, err),) = errors.items()
    assert err.code == 101, err
    assert err.msg.startswith("IP pool exhausted: SpiderIPPool big cannot record another address")
    assert (
        f"it holds {fit} allocation records and the API server refused its status with {fit + 1}"
        in err.msg
    )
    assert "etcdserver: request is too large" in err.msg
    assert "etcd's --max-request-bytes, 1.5 MiB by default" in err.msg
    assert f"pod {LIMIT_NS}/{failed} interface eth0" in err.msg
    records = allocated_ips(cluster.status("big"))
    assert len(records) == fit == cluster.status("big")["allocatedIPCount"]
    assert {r["podUid"] for r in records.values()} >= {uids[n] for n in got if n != failed}
    assert uids[failed] not in {r["podUid"] for r in records.values()}
    assert cluster.endpoint(failed, LIMIT_NS) is None

    # another candidate pool with room is used; a DEL makes room in "big" again
    fallback = add(names[3], "big", "spare")
    assert not isinstance(fallback, CniError) and fallback.pool == "spare", fallback
    done = next(n for n in got if n != failed)
    ipam.release(IpamRequest(LIMIT_NS, done, uids[done], f"c-{done[-4:]}", "eth0", {}))
    again = add(failed)
    assert not isinstance(again, CniError) and again.pool == "big", again

    # the runtime sees the same error from the agent process
    (agent,) = start_agents(cluster.kubeconfig, tmp_path, ["n1"])
    try:
        rc, out = run_ipam_shim(
            agent.bin_dir, ipam_conf("big"), "ADD", "c-4", names[4], uids[names[4]], LIMIT_NS
        )
    finally:
        agent.stop()
    answer = json.loads(out)
    assert rc == 1 and answer["code"] == 101, answer
    assert "SpiderIPPool big cannot record another address" in answer["msg"]
    assert "1.5 MiB" in answer["msg"]
    assert len(allocated_ips(cluster.status("big"))) == fit


# --- 11. SpiderEndpoint ownership and conditional deletes ---------------------------------------
def test_reused_endpoint_follows_the_current_pod(cluster: Cluster) -> None:
    """A StatefulSet pod recreated under its name while the old pod's endpoint still exists
    (deleted with propagationPolicy Orphan here; in a cluster, also while the garbage
    collector has not got to it): the endpoint's ownerReference must move to the new pod, so
    that it goes with the pod that uses it and never with another one."""
    cluster.pool("pool")
    cluster.wait_gc_ready()
    ipam = Ipam(cluster.agent, "n1")
    old_uid = cluster.pod("web-0")
    ipam.allocate(sandbox("web-0", old_uid, "old"))
    # kube-controller-manager's garbage collector removes the endpoint's ownerReference, then
    # lets the pod go
    cluster.delete_pod("web-0", propagation_policy="Orphan")
    kept = cluster.endpoint("web-0")
    assert kept is not None and not kept["metadata"].get("ownerReferences")
    new_uid = cluster.pod("web-0")
    ipam.allocate(sandbox("web-0", new_uid, "new"))
    ep = cluster.endpoint("web-0")
    assert ep is not None and ep["metadata"]["uid"] == kept["metadata"]["uid"]  # reused
    assert [(o["kind"], o["uid"]) for o in ep["metadata"]["ownerReferences"]] == [("Pod", new_uid)]
    assert ep["status"]["current"]["uid"] == new_uid
    assert [e["containerID"] for e in ep["status"]["current"]["ips"]] == ["new"]
    cluster.delete_pod("web-0")
    # collected with the pod that owns it now, by kube-controller-manager (asynchronously)
    wait_for(lambda: cluster.endpoint("web-0") is None, 30, "SpiderEndpoint web-0 collected")


def test_endpoint_delete_never_drops_a_concurrent_write(cluster: Cluster) -> None:
    """Two writers on one pod's endpoint: one DELs the pod's last interface, which deletes
    the endpoint, while the other ADDs another interface and writes its entry before the
    DELETE arrives (held by the API server here). The DELETE carries the resourceVersion it
    read, so it is refused, and the new interface's entry survives."""
    cluster.pool("pool")
    one, two = Ipam(cluster.agent, "n1"), Ipam(cluster.agent_client(), "n1")
    for k in range(3):
        uid = cluster.pod(f"w{k}")
        one.allocate(sandbox(f"w{k}", uid, f"c{k}", "eth0"))
        cluster.kube.inject_fault(rf"/spiderendpoints/w{k}$", method="DELETE", hang=0.5, count=1)
        rm = threading.Thread(target=one.release, args=(sandbox(f"w{k}", uid, f"c{k}", "eth0"),))
        rm.start()
        time.sleep(0.2)  # the DELETE is on its way
        (a,) = two.allocate(sandbox(f"w{k}", uid, f"c{k}", "net1"))
        rm.join()
        assert [(e["interface"], e["ipv4"]) for e in entries(cluster, f"w{k}")] == [
            ("net1", a.address)
        ], f"round {k}"
        assert set(allocated_ips(cluster.status("pool"))) >= {a.ip}


# --- 6. a hung API server ------------------------------------------------------------------------
@pytest.fixture
def agent_process(cluster: Cluster, tmp_path: Path) -> Iterator[Path]:
    """One agent process (node n1, ``--api-timeout 2``) as the agent's ServiceAccount through
    the test's proxy, and its installed shims; yields the bin dir."""
    cluster.node("n1")
    (agent,) = start_agents(cluster.kubeconfig, tmp_path, ["n1"], extra=("--api-timeout", "2"))
    try:
        yield agent.bin_dir
    finally:
        agent.stop()


def shim_call(
    bin_dir: Path, command: str, name: str, uid: str, cid: str
) -> tuple[int, dict[str, Any] | None]:
    conf = {
        "cniVersion": "1.0.0",
        "name": "m",
        "type": "macvlan",
        "ipam": {"type": "underlay-ipam", **POOL},
    }
    env = {
        "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/run/netns/none",
        "CNI_IFNAME": "net1", "CNI_PATH": "/x",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_UID={uid}",
    }  # fmt: skip
    p = subprocess.run(
        [str(bin_dir / "underlay-ipam")],
        input=json.dumps(conf).encode(),
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None


def test_a_hung_request_fails_its_call_with_11_and_stalls_no_other_pod(
    cluster: Cluster, agent_process: Path
) -> None:
    cluster.pool("pool")
    u0, u1, u2 = cluster.pod("p0"), cluster.pod("p1"), cluster.pod("p2")
    assert shim_call(agent_process, "ADD", "p0", u0, "c0")[0] == 0  # warm: the pool is known
    cluster.kube.inject_fault(r"/spiderippools/pool/status$", method="PUT", hang=20.0, count=1)
    done: dict[str, tuple[float, int, dict[str, Any] | None]] = {}
    t0 = time.monotonic()

    def add(name: str, uid: str) -> None:
        rc, out = shim_call(agent_process, "ADD", name, uid, name)
        done[name] = (time.monotonic() - t0, rc, out)

    threads = [threading.Thread(target=add, args=("p1", u1))]
    threads[0].start()
    time.sleep(0.3)
    threads.append(threading.Thread(target=add, args=("p2", u2)))
    threads[1].start()
    for t in threads:
        t.join()
    p1_time, p1_rc, p1_out = done["p1"]
    p2_time, p2_rc, p2_out = done["p2"]
    assert p1_rc == 1 and p1_out is not None and p1_out["code"] == 11, p1_out
    assert "not answering within 2 s" in p1_out["msg"] and "SpiderIPPool pool" in p1_out["msg"]
    assert p2_rc == 0 and p2_out is not None and p2_out["ips"][0]["address"] == "172.18.30.132/16"
    # neither waited for the hung request (held 20 s by the API server)
    assert p1_time < 15 and p2_time < 15, (p1_time, p2_time)
    assert set(allocated_ips(cluster.status("pool"))) == {"172.18.30.131", "172.18.30.132"}
