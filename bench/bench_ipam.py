"""Benchmark: underlay-ipam ADDs and DELs through several agent processes into one pool, on the
real control plane.

Starts etcd, kube-apiserver and kube-controller-manager (tests/controlplane, deploy/'s CRDs and
RBAC), makes one Node per agent, the pods (bound to the nodes) and one SpiderIPPool, and runs
``--agents`` CNI server processes (``python -m node_agent.cni.server``) as the agent's
ServiceAccount, straight to the API server (``--via-proxy``: through the tests' fault proxy,
which logs every request and so counts status writes and 409 Conflicts). Every pod's ADD
executes the installed ``underlay-ipam`` shim as a runtime does, ``--parallel`` at once, pod
``i`` on agent ``i % agents``; then every DEL. Checks what the IPAM promises (every ADD
answered, no address twice, the pool's records and the SpiderEndpoints say exactly what the
ADDs answered, nothing left after the DELs: tests/ipamload.py) and prints the rates.
Exits 1 when a check fails. Needs no root.

    .venv/bin/python bench/bench_ipam.py [--agents 4] [--pods 1000] [--parallel 64]
    .venv/bin/python bench/bench_ipam.py --smoke      # CI: 2 agents, 20 pods, no timing
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import netaddr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the control plane and the IPAM load helpers live in tests/

from kubernetes import client  # noqa: E402

from reconciler.ippool import allocated_ips  # noqa: E402
from reconciler.kube import Objects  # noqa: E402
from reconciler.vocab import SPIDER_ENDPOINT, SPIDER_IPPOOL  # noqa: E402
from tests.controlplane.proxy import FaultProxy  # noqa: E402
from tests.controlplane.server import ControlPlane  # noqa: E402
from tests.ipamload import audit, ipam_conf, start_agents, storm  # noqa: E402

POOL = "bench"
NAMESPACE = "default"


def pool_range(pods: int) -> str:
    """``172.18.32.0-...``: room for ``pods`` addresses and a quarter more."""
    first = netaddr.IPAddress("172.18.32.0")
    return f"{first}-{first + max(pods + pods // 4, 8) - 1}"


def writes(proxy: FaultProxy | None) -> tuple[int, int]:
    """Pool status writes the proxy saw since the last call, and how many got 409."""
    if proxy is None:
        return 0, 0
    puts = proxy.requests("PUT", rf"/spiderippools/{POOL}/status$")
    proxy.reset_requests()
    return len(puts), sum(1 for r in puts if r.code == 409)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=64, help="CNI calls in flight at once")
    ap.add_argument("--via-proxy", action="store_true", help="agents through the fault proxy")
    ap.add_argument("--smoke", action="store_true", help="2 agents, 20 pods: checks only (CI)")
    ap.add_argument("--keep", action="store_true", help="keep the logs and scratch files")
    ap.add_argument("-v", "--verbose", action="store_true", help="agents log every call")
    a = ap.parse_args()
    if a.smoke:
        a.agents, a.pods, a.parallel = 2, 20, 8
    work = Path(tempfile.mkdtemp(prefix="bench-ipam-"))
    cp = ControlPlane(work / "controlplane")
    agents = []
    proxy: FaultProxy | None = None
    problems: list[str] = []
    try:
        cp.start()
        print(f"control plane {cp.version()['gitVersion']} up in {cp.started_in:.1f} s")
        api = cp.api_client()
        core = client.CoreV1Api(api)
        nodes = [f"n{k}" for k in range(a.agents)]
        for node in nodes:
            core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node)))
        Objects(api, SPIDER_IPPOOL).create(
            {
                "apiVersion": "spiderpool.spidernet.io/v2beta1",
                "kind": "SpiderIPPool",
                "metadata": {"name": POOL},
                "spec": {"subnet": "172.18.0.0/16", "ips": [pool_range(a.pods)], "gateway": "172.18.0.1"},
            }
        )  # fmt: skip

        def make_pod(i: int) -> tuple[str, str]:
            name = f"c{i}"
            body = client.V1Pod(
                metadata=client.V1ObjectMeta(name=name),
                spec=client.V1PodSpec(
                    node_name=nodes[i % len(nodes)],
                    containers=[client.V1Container(name="c", image="busybox")],
                ),
            )
            return name, str(core.create_namespaced_pod(NAMESPACE, body).metadata.uid)

        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as ex:
            pods = list(ex.map(make_pod, range(a.pods)))
        print(f"{a.pods} pods created in {time.monotonic() - t0:.1f} s")
        server = cp.url
        if a.via_proxy:
            proxy = cp.proxy()
            server = proxy.listen()
        kubeconfig = str(
            cp.serviceaccount_kubeconfig(
                work / "agent.kubeconfig", "underlay-system", "underlay-agent", server
            )
        )
        agents = start_agents(kubeconfig, work, nodes, extra=("-v",) if a.verbose else ())
        conf = ipam_conf(POOL)
        add = storm(agents, conf, "ADD", pods, parallel=a.parallel)
        problems += [f"ADD {n}: exit {rc} {out!r} {err!r}" for n, rc, out, err in add.failures()]
        problems += audit(api, POOL, pods, add.addresses(), agents)
        add_writes = writes(proxy)
        rm = storm(agents, conf, "DEL", pods, parallel=a.parallel)
        rm_writes = writes(proxy)
        problems += [f"DEL {n}: exit {rc} {out!r} {err!r}" for n, rc, out, err in rm.failures()]
        status = Objects(api, SPIDER_IPPOOL).get(POOL).get("status") or {}
        if allocated_ips(status) or status.get("allocatedIPCount"):
            problems.append(f"after the DELs SpiderIPPool {POOL} still records {status}")
        left = Objects(api, SPIDER_ENDPOINT).list(NAMESPACE)["items"]
        if left:
            problems.append(f"after the DELs {len(left)} SpiderEndpoints are left")
        print(
            f"{a.agents} agents, {a.pods} pods, {a.parallel} calls in flight, "
            f"{'through the fault proxy' if proxy else 'straight to kube-apiserver'}:"
        )
        print(f"  ADD: {add.seconds:6.1f} s  {a.pods / add.seconds:6.1f} allocations/s")
        print(f"  DEL: {rm.seconds:6.1f} s  {a.pods / rm.seconds:6.1f} releases/s")
        for phase, (n, c) in (("ADD", add_writes), ("DEL", rm_writes)):
            if proxy is not None:
                print(f"  {phase} phase: {n} pool status writes, {c} answered 409 Conflict")
        distinct = len(set(add.addresses().values()))
        print(f"  {distinct} distinct addresses for {len(add.addresses())} answered ADDs")
    finally:
        for agent in agents:
            agent.stop()
        if proxy is not None:
            proxy.stop()
        cp.stop()
        if a.keep:
            print(f"logs and scratch files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for p in problems[:20]:
        print(f"FAIL: {p}")
    if problems:
        print(f"{len(problems)} problems")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
