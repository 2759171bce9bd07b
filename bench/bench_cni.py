"""Benchmark: CNI ADD+DEL cycle of our plugins vs Debian's reference plugins, on the rig.

One rig node (own ovsdb-server/ovs-vswitchd, br1 over eth0, userspace datapath), the node
agent running inside it, a fresh pod namespace per cycle (as each pod sandbox has; created
and deleted outside the timing). Each cycle executes the plugins exactly as a
runtime does (CNI_* env, config on stdin; the child joins the node's network namespace
before exec) for ADD and then DEL, and is timed as a whole. Cases, interleaved cycle by
cycle so machine noise hits all alike:

- ``underlay-ovs + underlay-ipam``: our plugins, IPAM through the real control plane
  (tests/controlplane: etcd, kube-apiserver, kube-controller-manager with deploy/'s CRDs and
  RBAC), the agent authenticating as its ServiceAccount and reaching kube-apiserver from the
  node at the rig's API server address (a byte relay in the switch namespace);
- ``underlay-ovs + host-local``: our main plugin with Debian's IPAM;
- ``bridge + host-local``: Debian's reference plugins from /usr/lib/cni (the baseline).

Prints median and p95 per case and the ratio of medians to the baseline. Every ADD must
succeed and every DEL must clean up (exit 1 otherwise). Needs root.

    .venv/bin/python bench/bench_cni.py [--cycles 100]
    .venv/bin/python bench/bench_cni.py --smoke     # CI: 3 cycles per case, no timing
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubernetes import client
from node_agent.cni.install import install_shims

from reconciler.kube import Objects
from reconciler.vocab import SPIDER_ENDPOINT, SPIDER_IPPOOL
from tests.controlplane.server import ControlPlane
from tests.rig import APISERVER_IP, GATEWAY, Node, Rig

REF = "/usr/lib/cni"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def exec_in(
    node: Node, binary: str, env: dict[str, str], conf: dict[str, Any]
) -> dict[str, Any] | None:
    """Execute ``binary`` with ``env`` and ``conf`` on stdin inside ``node``'s namespace."""
    fd = os.open(node.path, os.O_RDONLY)

    def enter() -> None:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    try:
        p = subprocess.run(
            [binary],
            input=json.dumps(conf).encode(),
            env=env,
            capture_output=True,
            preexec_fn=enter,
            pass_fds=(fd,),
            check=False,
        )
    finally:
        os.close(fd)
    if p.returncode != 0:
        raise RuntimeError(f"{binary} {env['CNI_COMMAND']}: {p.stdout!r} {p.stderr!r}")
    return json.loads(p.stdout) if p.stdout.strip() else None


def cycle(node: Node, cni_path: str, conf: dict[str, Any], netns: str, uid: str) -> float:
    """One ADD + DEL of a single-plugin config; returns seconds."""
    env = {
        "CNI_CONTAINERID": "bench", "CNI_NETNS": netns, "CNI_IFNAME": "eth0", "CNI_PATH": cni_path,
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bench;K8S_POD_UID={uid}",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }  # fmt: skip
    binary = next(
        f"{d}/{conf['type']}" for d in cni_path.split(":") if os.path.exists(f"{d}/{conf['type']}")
    )
    t0 = time.perf_counter()
    result = exec_in(node, binary, {**env, "CNI_COMMAND": "ADD"}, conf)
    exec_in(node, binary, {**env, "CNI_COMMAND": "DEL"}, {**conf, "prevResult": result})
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def start_controlplane(work: Path, rig: Rig) -> tuple[ControlPlane, Any, str, str]:
    """The real control plane with Node n1, pod default/bench bound to it and SpiderIPPool
    bench; returns it, a relay carrying kube-apiserver to the rig's API address, the agent's
    kubeconfig for that address and the pod's UID."""
    cp = ControlPlane(work / "controlplane")
    cp.start()
    print(f"control plane {cp.version()['gitVersion']} up in {cp.started_in:.1f} s")
    api = cp.api_client()
    core = client.CoreV1Api(api)
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="n1")))
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="bench"),
        spec=client.V1PodSpec(
            node_name="n1", containers=[client.V1Container(name="c", image="busybox")]
        ),
    )
    uid = str(core.create_namespaced_pod("default", pod).metadata.uid)
    Objects(api, SPIDER_IPPOOL).create(
        {
            "apiVersion": "spiderpool.spidernet.io/v2beta1",
            "kind": "SpiderIPPool",
            "metadata": {"name": "bench"},
            "spec": {"subnet": "172.18.0.0/16", "ips": ["172.18.40.1-172.18.40.254"], "gateway": GATEWAY},
        }
    )  # fmt: skip
    relay = cp.relay(APISERVER_IP, 6443, rig.switch.path)
    kubeconfig = cp.serviceaccount_kubeconfig(
        work / "agent.kubeconfig", "underlay-system", "underlay-agent", relay.url
    )
    return cp, relay, str(kubeconfig), uid


def leftovers(cp: ControlPlane) -> list[str]:
    """What the IPAM cycles left in the cluster: records in pool bench, SpiderEndpoints."""
    api = cp.api_client()
    out = []
    status = Objects(api, SPIDER_IPPOOL).get("bench").get("status") or {}
    if status.get("allocatedIPCount") or status.get("allocatedIPs"):
        out.append(f"SpiderIPPool bench still records {status.get('allocatedIPs')}")
    for ep in Objects(api, SPIDER_ENDPOINT).list("default")["items"]:
        out.append(f"SpiderEndpoint default/{ep['metadata']['name']} left")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--smoke", action="store_true", help="3 cycles per case, no timing (CI)")
    ap.add_argument("--keep", action="store_true", help="keep the agent log and scratch files")
    a = ap.parse_args()
    warmups = 5
    if a.smoke:
        a.cycles, warmups = 3, 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-cni-"))
    rig = Rig()
    agent = None
    cp = relay = None
    failed: list[str] = []
    try:
        node = rig.add_node("n1", "172.18.10.11")
        node.vsctl("add-br", "br1", "--", "set", "Bridge", "br1", "datapath_type=netdev")
        node.vsctl("add-port", "br1", "eth0")
        pod = rig.add_pod("p1")
        sock = str(tmp / "agent.sock")
        bin_dir = tmp / "bin"
        install_shims(bin_dir, sock)
        cni_path = f"{bin_dir}:{REF}"
        cmd = [
            sys.executable,
            "-m",
            "node_agent.cni.server",
            "--socket",
            sock,
            "--ovsdb",
            node.ovsdb,
            "--node-name",
            "n1",
            "-v",
        ]
        cp, relay, node_kc, uid = start_controlplane(tmp, rig)
        cmd += ["--kubeconfig", node_kc]
        with open(tmp / "agent.log", "wb") as log:
            agent = node.popen(*cmd, stdout=subprocess.PIPE, stderr=log)
        assert agent.stdout is not None and agent.stdout.readline().strip() == b"ready"
        hl = {
            "type": "host-local",
            "dataDir": str(tmp / "hl"),
            "ranges": [
                [
                    {
                        "subnet": "172.18.0.0/16",
                        "rangeStart": "172.18.41.1",
                        "rangeEnd": "172.18.41.254",
                        "gateway": GATEWAY,
                    }
                ]
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
        }
        base = {"cniVersion": "1.0.0", "name": "bench"}
        cases: dict[str, dict[str, Any]] = {}
        cases["underlay-ovs + underlay-ipam"] = {
            **base,
            "type": "underlay-ovs",
            "bridge": "br1",
            "ipam": {"type": "underlay-ipam", "default_ipv4_ippool": ["bench"]},
        }
        cases["underlay-ovs + host-local"] = {
            **base,
            "type": "underlay-ovs",
            "bridge": "br1",
            "ipam": hl,
        }
        cases["bridge + host-local (reference)"] = {
            **base,
            "type": "bridge",
            "bridge": "cnibench0",
            "ipam": hl,
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(warmups):  # warm-up: connections, page cache, first bridge creation
            for conf in cases.values():
                cycle(node, cni_path, conf, pod.path, uid)
        rig.delete_pod("p1")
        n = 0
        for _ in range(a.cycles):
            for name, conf in cases.items():
                # every pod sandbox has a fresh network namespace (made and removed untimed)
                n += 1
                sandbox = rig.add_pod(f"s{n}")
                times[name].append(cycle(node, cni_path, conf, sandbox.path, uid))
                rig.delete_pod(f"s{n}")
        failed += leftovers(cp)
        if a.smoke:
            print(f"smoke: {a.cycles} ADD+DEL cycles per case: {', '.join(cases)}")
            return 1 if failed else 0
        ref = statistics.median(times["bridge + host-local (reference)"])
        print(f"ADD+DEL cycles: {a.cycles} per case, interleaved; one node, userspace datapath")
        print(f"{'case':34} {'median ms':>10} {'p95 ms':>8} {'ratio':>6}")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{name:34} {med * 1000:10.1f} {pct(ts, 0.95) * 1000:8.1f} {med / ref:6.2f}")
    except Exception:
        failed.append(traceback.format_exc())
        return 1
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(10)
        if relay is not None:
            relay.stop()
        if cp is not None:
            cp.stop()
        rig.close()
        for f in failed:
            print(f"FAIL: {f}")
        if a.keep or failed:
            print(f"agent log and scratch files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
