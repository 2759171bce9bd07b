"""Optimistic concurrency under load: many writers, one object, no lost update."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from kubernetes.client.exceptions import ApiException

from reconciler import vocab
from tests.kube.emulator import Emulator
from tests.kube.helpers import clients, crd, widget


def test_threads_doing_read_modify_write_lose_no_update(apiserver: Emulator) -> None:
    kube = clients(apiserver)
    kube.apiext.create_custom_resource_definition(crd())
    ws = kube.widgets()
    ws.create(widget("counter"))
    ws.patch_status("counter", {"status": {"allocatedIPCount": 0}})
    threads, per_thread = 8, 25
    successes: list[str] = []
    conflicts = [0]
    lock = threading.Lock()

    def work() -> None:
        k = clients(apiserver)  # one client (connection pool) per thread, like separate agents
        w = k.widgets()
        done = 0
        while done < per_thread:
            cur = w.get("counter")
            cur["status"]["allocatedIPCount"] += 1
            try:
                new = w.replace_status("counter", cur)
            except ApiException as e:
                assert e.status == 409
                with lock:
                    conflicts[0] += 1
                continue
            with lock:
                successes.append(new["metadata"]["resourceVersion"])
            done += 1

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    final = ws.get("counter")
    assert final["status"]["allocatedIPCount"] == threads * per_thread
    assert len(set(successes)) == threads * per_thread  # every success was a distinct write
    puts = apiserver.requests("PUT", path="/status$")
    assert len(puts) == threads * per_thread + conflicts[0]
    assert sum(r.code == 409 for r in puts) == conflicts[0]


ALLOCATOR = textwrap.dedent(
    """
    import ipaddress, json, sys
    from kubernetes import client, config
    cfg = client.Configuration()
    config.load_kube_config(config_file=sys.argv[1], client_configuration=cfg)
    api = client.CustomObjectsApi(client.ApiClient(cfg))
    me, got, conflicts = sys.argv[2], [], 0
    args = ("spiderpool.spidernet.io", "v2beta1", "spiderippools", "pool")
    pool_ips = [str(ipaddress.ip_address("10.0.0.1") + i) for i in range(200)]
    while True:
        pool = api.get_cluster_custom_object(*args)
        allocated = json.loads(pool.get("status", {}).get("allocatedIPs") or "{}")
        free = [ip for ip in pool_ips if ip not in allocated]
        if not free:
            break
        ip = free[0]
        allocated[ip] = {"pod": f"{me}-{len(got)}"}
        pool["status"] = {"allocatedIPs": json.dumps(allocated), "allocatedIPCount": len(allocated)}
        try:
            api.replace_cluster_custom_object_status(*args, pool)
        except client.exceptions.ApiException as e:
            if e.status != 409:
                raise
            conflicts += 1
            continue
        got.append(ip)
    print(json.dumps({"ips": got, "conflicts": conflicts}))
    """
)


def test_two_processes_allocating_from_one_pool_never_share_an_ip(
    apiserver: Emulator, tmp_path: Path
) -> None:
    apiserver.register(vocab.SPIDER_IPPOOL)
    kube = clients(apiserver)
    kube.custom.create_cluster_custom_object(
        vocab.SPIDERPOOL_GROUP, vocab.SPIDERPOOL_VERSION, "spiderippools",
        {"apiVersion": vocab.SPIDERPOOL_API_VERSION, "kind": "SpiderIPPool", "metadata": {"name": "pool"},
         "spec": {"subnet": "10.0.0.0/24"}},
    )  # fmt: skip
    script = tmp_path / "alloc.py"
    script.write_text(ALLOCATOR)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(apiserver.kubeconfig), name],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0
        results.append(json.loads(out))
    a, b = (set(r["ips"]) for r in results)
    assert not a & b
    assert len(a) + len(b) == 200
    pool = kube.custom.get_cluster_custom_object(
        vocab.SPIDERPOOL_GROUP, vocab.SPIDERPOOL_VERSION, "spiderippools", "pool"
    )
    allocated = json.loads(pool["status"]["allocatedIPs"])
    assert len(allocated) == 200 and pool["status"]["allocatedIPCount"] == 200
    owners = {ip: v["pod"][0] for ip, v in allocated.items()}
    assert {ip for ip, o in owners.items() if o == "a"} == a
    conflicts = sum(r["conflicts"] for r in results)
    assert sum(r.code == 409 for r in apiserver.requests("PUT")) == conflicts


def test_concurrent_creates_of_one_name_yield_one_winner(apiserver: Emulator) -> None:
    kube = clients(apiserver)
    codes: list[int] = []
    lock = threading.Lock()

    def create() -> None:
        k = clients(apiserver)
        try:
            k.core.create_namespaced_config_map("default", {"metadata": {"name": "same"}})
            code = 201
        except ApiException as e:
            code = e.status
        with lock:
            codes.append(code)

    ts = [threading.Thread(target=create) for _ in range(10)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(codes) == [201] + [409] * 9
    assert len(kube.core.list_namespaced_config_map("default").items) == 1


ELECT = textwrap.dedent(
    """
    import sys, threading
    from kubernetes import config
    from kubernetes.leaderelection import electionconfig, leaderelection
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock
    config.load_kube_config(config_file=sys.argv[1])
    me = sys.argv[2]
    def lead():
        print("leading", me, flush=True)
        threading.Event().wait()
    cfg = electionconfig.Config(LeaseLock("underlay-leader", "default", me), lease_duration=4,
                                renew_deadline=3, retry_period=1, onstarted_leading=lead,
                                onstopped_leading=lambda: print("stopped", me, flush=True))
    leaderelection.LeaderElection(cfg).run()
    """
)


def test_leader_election_with_the_clients_lease_lock(apiserver: Emulator, tmp_path: Path) -> None:
    """kubernetes.leaderelection over a Lease: one leader; the other takes over when it dies."""
    import select

    script = tmp_path / "elect.py"
    script.write_text(ELECT)
    kube = clients(apiserver)

    def start(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(script), str(apiserver.kubeconfig), name],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip

    def line(p: subprocess.Popen[str], timeout: float) -> str:
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], timeout)
        return p.stdout.readline().strip() if ready else ""

    a = start("a")
    b = None
    try:
        assert line(a, 20) == "leading a"
        b = start("b")
        assert line(b, 3) == ""  # a renews; b keeps waiting
        lease = kube.coord.read_namespaced_lease("underlay-leader", "default")
        assert lease.spec.holder_identity == "a" and lease.spec.lease_duration_seconds == 4
        a.kill()
        a.wait()
        assert line(b, 20) == "leading b"
        lease = kube.coord.read_namespaced_lease("underlay-leader", "default")
        assert lease.spec.holder_identity == "b"
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
