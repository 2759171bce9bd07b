"""Many underlay-ipam ADDs and DELs through real agent processes, and the audit of what the
cluster records afterwards. Shared by the IPAM tests and ``bench/bench_ipam.py``.

Each agent is ``python -m node_agent.cni.server`` with its shims installed, authenticating as
the agent's ServiceAccount from a kubeconfig; each call executes the installed
``underlay-ipam`` shim as a runtime does (CNI_* env, config on stdin). :func:`audit` reads the
pools' ``status.allocatedIPs`` and every SpiderEndpoint of the namespace with an admin client
and lists every way they differ from what the calls answered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_agent.cni.install import install_shims

from reconciler.ippool import allocated_ips
from reconciler.kube import Objects
from reconciler.vocab import SPIDER_ENDPOINT, SPIDER_IPPOOL

ROOT = Path(__file__).resolve().parents[1]
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
AGENT_ENV = {**os.environ, "POD_NAMESPACE": "underlay-system"}
"""The DaemonSet's environment (deploy/agent.yaml: POD_NAMESPACE from the downward API)."""


@dataclass
class AgentProcess:
    """One CNI server process serving node ``node``; ``bin_dir`` holds its shims."""

    node: str
    proc: subprocess.Popen[bytes]
    bin_dir: Path
    log: Path

    def stop(self) -> None:
        """Terminate it (killed after 10 s) and reap it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_agents(
    kubeconfig: str, workdir: Path, nodes: list[str], *, extra: tuple[str, ...] = ()
) -> list[AgentProcess]:
    """One CNI server process per node name, each ready to serve (it printed ``ready``).

    ``extra`` is added to every command line (e.g. ``("--api-timeout", "2")``). On a failed
    start the ones already running are stopped and RuntimeError shows the log.
    """
    agents: list[AgentProcess] = []
    try:
        for node in nodes:
            sock = str(workdir / f"{node}.sock")
            bin_dir = workdir / f"{node}-bin"
            log = workdir / f"{node}-agent.log"
            install_shims(bin_dir, sock, python=PYTHON)
            with open(log, "wb") as logf:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "node_agent.cni.server", "--socket", sock,
                     "--kubeconfig", kubeconfig, "--node-name", node, *extra],
                    stdout=subprocess.PIPE, stderr=logf, cwd=str(ROOT), env=AGENT_ENV,
                )  # fmt: skip
            agent = AgentProcess(node, proc, bin_dir, log)
            agents.append(agent)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"agent {node} did not start: {log.read_text()[-2000:]}")
    except BaseException:
        for a in agents:
            a.stop()
        raise
    return agents


def run_ipam_shim(
    bins: Path,
    conf: dict[str, Any],
    command: str,
    cid: str,
    pod: str,
    uid: str,
    namespace: str = "default",
    ifname: str = "net1",
) -> tuple[int, bytes]:
    """Execute the installed ``underlay-ipam`` shim in ``bins`` as a runtime does (env +
    stdin) for pod ``namespace/pod``; returns (exit code, stdout)."""
    rc, out, _ = shim_call(bins, conf, command, cid, pod, uid, namespace, ifname)
    return rc, out


def shim_call(
    bins: Path,
    conf: dict[str, Any],
    command: str,
    cid: str,
    pod: str,
    uid: str,
    namespace: str = "default",
    ifname: str = "net1",
) -> tuple[int, bytes, bytes]:
    """:func:`run_ipam_shim`, returning (exit code, stdout, stderr): a DEL that could not
    finish exits 0 and says so on stderr."""
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": "/run/netns/none",
        "CNI_IFNAME": ifname,
        "CNI_PATH": "/x",
        "CNI_ARGS": f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_UID={uid}",
    }
    p = subprocess.run(
        [str(bins / "underlay-ipam")],
        input=json.dumps(conf).encode(),
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    return p.returncode, p.stdout, p.stderr


def ipam_conf(pool: str) -> dict[str, Any]:
    """A network config whose main plugin (macvlan, never executed here) calls underlay-ipam
    with ``pool`` as its default IPv4 pool."""
    return {
        "cniVersion": "1.0.0",
        "name": "macvlan-conf",
        "type": "macvlan",
        "ipam": {"type": "underlay-ipam", "default_ipv4_ippool": [pool]},
    }


@dataclass
class Storm:
    """What :func:`storm` did: ``results`` {pod: (exit code, stdout, stderr)}, wall
    ``seconds``."""

    results: dict[str, tuple[int, bytes, bytes]]
    seconds: float

    def failures(self) -> list[tuple[str, int, bytes, bytes]]:
        """The calls that exited non-zero or wrote to stderr (a DEL left incomplete):
        [(pod, code, stdout, stderr)]."""
        return [
            (n, rc, out, err)
            for n, (rc, out, err) in sorted(self.results.items())
            if rc != 0 or err.strip()
        ]

    def addresses(self) -> dict[str, str]:
        """{pod: the address its ADD answered (CIDR form)}, for the calls that succeeded."""
        return {
            n: json.loads(out)["ips"][0]["address"]
            for n, (rc, out, _) in self.results.items()
            if rc == 0 and out.strip()
        }


def storm(
    agents: list[AgentProcess],
    conf: dict[str, Any],
    command: str,
    pods: list[tuple[str, str]],
    *,
    parallel: int | None = None,
    namespace: str = "default",
    only: set[str] | None = None,
) -> Storm:
    """Run ``command`` for every ``(pod name, uid)`` (or those named in ``only``) through the
    shims, pod ``i`` on agent ``i % len(agents)`` (container ID ``cid<i>``), ``parallel``
    calls in flight at once (default: all of them)."""
    results: dict[str, tuple[int, bytes, bytes]] = {}
    lock = threading.Lock()

    def call(i: int) -> None:
        name, uid = pods[i]
        out = shim_call(agents[i % len(agents)].bin_dir, conf, command, f"cid{i}", name, uid, namespace)  # fmt: skip
        with lock:
            results[name] = out

    todo = [i for i, (name, _) in enumerate(pods) if only is None or name in only]
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=parallel or max(1, len(todo))) as ex:
        list(ex.map(call, todo))
    return Storm(results, time.monotonic() - t0)


def audit(
    api: Any,
    pool: str,
    pods: list[tuple[str, str]],
    addresses: dict[str, str],
    agents: list[AgentProcess],
    namespace: str = "default",
    ifname: str = "net1",
) -> list[str]:
    """Every way the cluster differs from ``addresses`` ({pod: CIDR} the ADDs answered for
    ``pods``, pod ``i`` served by ``agents[i % len(agents)]``): an address given twice, pool
    ``pool``'s ``status.allocatedIPs`` not recording exactly those addresses for those pod UIDs
    (or its count off), a SpiderEndpoint missing, extra, or naming another UID, address, pool,
    container or node. ``api`` is an admin ApiClient. Empty when all agree."""
    problems: list[str] = []
    uids = dict(pods)
    taken: dict[str, str] = {}
    for name, address in sorted(addresses.items()):
        ip = address.split("/")[0]
        if ip in taken:
            problems.append(f"{ip} handed out twice: to {taken[ip]} and {name}")
        taken[ip] = name
    status = Objects(api, SPIDER_IPPOOL).get(pool).get("status") or {}
    records = allocated_ips(status)
    for ip, name in taken.items():
        rec = records.get(ip)
        want = {"pod": f"{namespace}/{name}", "podUid": uids[name]}
        if rec != want:
            problems.append(f"SpiderIPPool {pool} records {ip} as {rec}, not {want}")
    for ip in sorted(set(records) - set(taken)):
        problems.append(f"SpiderIPPool {pool} records {ip} ({records[ip]}) that no ADD answered")
    if status.get("allocatedIPCount", 0) != len(records):
        problems.append(
            f"SpiderIPPool {pool} allocatedIPCount {status.get('allocatedIPCount')} "
            f"!= {len(records)} records"
        )
    endpoints = {
        e["metadata"]["name"]: e
        for e in Objects(api, SPIDER_ENDPOINT).list(namespace).get("items", [])
    }
    index = {name: i for i, (name, _) in enumerate(pods)}
    for name, address in sorted(addresses.items()):
        ep = endpoints.pop(name, None)
        if ep is None:
            problems.append(f"SpiderEndpoint {namespace}/{name} missing")
            continue
        cur = (ep.get("status") or {}).get("current") or {}
        i = index[name]
        want_entry = {
            "interface": ifname, "containerID": f"cid{i}", "ipv4": address, "ipv4Pool": pool,
        }  # fmt: skip
        got = [{k: e.get(k) for k in want_entry} for e in cur.get("ips") or []]
        if cur.get("uid") != uids[name] or cur.get("node") != agents[i % len(agents)].node:
            problems.append(
                f"SpiderEndpoint {namespace}/{name}: uid {cur.get('uid')} node {cur.get('node')}"
                f", not {uids[name]} on {agents[i % len(agents)].node}"
            )
        if got != [want_entry]:
            problems.append(f"SpiderEndpoint {namespace}/{name}: {got}, not [{want_entry}]")
    for name in sorted(endpoints):
        if name in uids:
            problems.append(f"SpiderEndpoint {namespace}/{name} left although its ADD failed")
    return problems
