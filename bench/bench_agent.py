"""Benchmark: resident memory of an idle node agent (target: under 100 MiB RSS).

Starts the real control plane (etcd, kube-apiserver, kube-controller-manager from
tests/controlplane, deploy/'s CRDs and RBAC), builds one rig node (network namespace, private
OVS), creates its Node and the quick start's OvsBridge br1, then runs ``underlay agent`` in the
node as the DaemonSet runs it (the agent's ServiceAccount, ``POD_NAMESPACE=underlay-system``,
bridges, CNI server, IPAM GC), reaching kube-apiserver at the rig's API address through a TCP
relay (TLS end to end). Once its enactment is Ready it samples the agent's VmRSS and VmHWM
(/proc/<pid>/status) every second for ``--seconds`` and prints them in MiB.

``--smoke`` (CI): three samples, no target checked; exits non-zero when the control plane does
not start, the enactment does not become Ready, or the agent exits while sampled.
Needs root (network namespaces). Run by hand:

    .venv/bin/python bench/bench_agent.py [--seconds 20] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kubernetes import client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test rig and the control plane live in tests/

from reconciler import vocab  # noqa: E402
from tests.controlplane.server import ControlPlane  # noqa: E402
from tests.rig import APISERVER_IP, Rig, wait_for  # noqa: E402

UNDERLAY = str(Path(sys.executable).parent / "underlay")
AGENT_SA = ("underlay-system", "underlay-agent")
TARGET_MIB = 100


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def agent_pid(wrapper: subprocess.Popen[bytes]) -> int:
    """The ``underlay agent`` process under ``ip netns exec`` (which execs, so usually itself)."""
    cmdline = Path(f"/proc/{wrapper.pid}/cmdline").read_bytes()
    if b"agent" in cmdline and b"netns" not in cmdline:
        return wrapper.pid
    children = Path(f"/proc/{wrapper.pid}/task/{wrapper.pid}/children").read_text().split()
    return int(children[0]) if children else wrapper.pid


def enactment_ready(custom: client.CustomObjectsApi, name: str) -> bool:
    """True when OvsBridgeEnactment ``name`` exists with condition Ready True."""
    e = vocab.OVS_BRIDGE_ENACTMENT
    try:
        obj = custom.get_cluster_custom_object(e.group, e.version, e.plural, name)
    except client.ApiException:
        return False
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def measure(work: Path, seconds: int) -> list[dict[str, int]]:
    """Start everything in ``work``, wait for Ready, sample the agent ``seconds`` times."""
    cp = ControlPlane(work / "controlplane")
    cp.start()
    print(f"control plane up in {cp.started_in:.1f} s (Kubernetes {cp.version()['gitVersion']})")
    try:
        with Rig() as rig:
            node = rig.add_node("n1", "172.18.10.11")
            relay = cp.relay(APISERVER_IP, 6443, rig.switch.path)
            try:
                kubeconfig = cp.serviceaccount_kubeconfig(
                    work / "agent.kubeconfig", *AGENT_SA, server=relay.url
                )
                api = cp.api_client()
                labels = {"kubernetes.io/hostname": "n1", "kubernetes.io/os": "linux"}
                client.CoreV1Api(api).create_node(
                    client.V1Node(metadata=client.V1ObjectMeta(name="n1", labels=labels))
                )
                r = vocab.OVS_BRIDGE
                custom = client.CustomObjectsApi(api)
                custom.create_cluster_custom_object(
                    r.group, r.version, r.plural,
                    {"apiVersion": r.api_version, "kind": r.kind, "metadata": {"name": "br1"},
                     "spec": {"uplinks": ["eth0"], "persistence": "netplan"}},
                )  # fmt: skip
                log = work / "agent.log"
                with open(log, "wb") as logf:
                    proc = node.popen(
                        UNDERLAY, "agent", "--node-name", "n1", "--kubeconfig", str(kubeconfig),
                        "--ovsdb", node.ovsdb, "--socket", str(node.rundir / "agent.sock"),
                        "--root", str(node.root), "--cni-bin-dir", str(node.rundir / "bin"),
                        stdout=logf, stderr=subprocess.STDOUT,
                        env={**os.environ, "POD_NAMESPACE": AGENT_SA[0]},
                    )  # fmt: skip
                try:
                    started = time.monotonic()
                    try:
                        wait_for(
                            lambda: enactment_ready(custom, "n1.br1") or proc.poll() is not None,
                            60,
                            "enactment n1.br1 Ready",
                        )
                    except AssertionError as exc:
                        raise SystemExit(f"{exc}; agent log:\n{log.read_text()[-3000:]}") from None
                    if proc.poll() is not None:
                        raise SystemExit(
                            f"agent exited {proc.returncode}:\n{log.read_text()[-3000:]}"
                        )
                    print(f"agent Ready after {time.monotonic() - started:.1f} s")
                    pid = agent_pid(proc)
                    samples = []
                    for _ in range(seconds):
                        time.sleep(1)
                        if proc.poll() is not None:
                            raise SystemExit(
                                f"agent exited {proc.returncode} while idle:\n"
                                f"{log.read_text()[-3000:]}"
                            )
                        samples.append(status_kib(pid))
                finally:
                    if proc.poll() is None:
                        proc.terminate()
                        try:
                            proc.wait(15)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait(5)
            finally:
                relay.stop()
    finally:
        cp.stop()
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=20, help="how long to sample once Ready")
    ap.add_argument(
        "--smoke", action="store_true", help="CI: 3 samples, no target; non-zero on failure"
    )
    args = ap.parse_args()
    seconds = 3 if args.smoke else args.seconds
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    try:
        samples = measure(work, seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rss = [s["VmRSS"] / 1024 for s in samples]
    hwm = max(s["VmHWM"] for s in samples) / 1024
    print(
        f"idle agent RSS over {len(rss)} s: median {statistics.median(rss):.1f} MiB, "
        f"max {max(rss):.1f} MiB; peak (VmHWM) {hwm:.1f} MiB; target < {TARGET_MIB} MiB"
        + (" (smoke: not checked)" if args.smoke else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
