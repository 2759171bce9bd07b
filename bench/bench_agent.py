"""Benchmark: resident memory of an idle node agent (target: under 100 MiB RSS).

Builds one rig node (network namespace, private OVS), the API emulator with the CRDs, the
quick start's OvsBridge br1, then runs ``underlay agent`` in the node as the DaemonSet runs it
(bridges, CNI server, IPAM GC). Once its enactment is Ready it samples the agent's VmRSS and
VmHWM (/proc/<pid>/status) every second for ``--seconds`` and prints them in MiB.
Needs root (network namespaces). Run by hand:

    .venv/bin/python bench/bench_agent.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kubernetes import client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test rig and emulator live in tests/

from reconciler import vocab  # noqa: E402
from tests.kube.emulator import Emulator  # noqa: E402
from tests.rig import APISERVER_IP, Rig, wait_for  # noqa: E402

UNDERLAY = str(Path(sys.executable).parent / "underlay")


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=20, help="how long to sample once Ready")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    with Rig() as rig:
        node = rig.add_node("n1", "172.18.10.11")
        emu = Emulator()
        emu.start()
        try:
            url = emu.listen_in_netns(rig.switch.path, APISERVER_IP, 6443)
            kubeconfig = str(emu.write_kubeconfig(work / "kubeconfig-node", url))
            emu.write_kubeconfig(work / "kubeconfig")
            emu.install_crds(sorted((ROOT / "deploy" / "crds").glob("*.yaml")))
            api = emu.api_client()
            client.CoreV1Api(api).create_node(
                client.V1Node(metadata=client.V1ObjectMeta(name="n1"))
            )
            r = vocab.OVS_BRIDGE
            client.CustomObjectsApi(api).create_cluster_custom_object(
                r.group, r.version, r.plural,
                {"apiVersion": r.api_version, "kind": r.kind, "metadata": {"name": "br1"},
                 "spec": {"uplinks": ["eth0"], "persistence": "netplan"}},
            )  # fmt: skip
            proc = node.popen(
                UNDERLAY, "agent", "--node-name", "n1", "--kubeconfig", kubeconfig,
                "--ovsdb", node.ovsdb, "--socket", str(node.rundir / "agent.sock"),
                "--root", str(node.root), "--cni-bin-dir", str(node.rundir / "bin"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            e = vocab.OVS_BRIDGE_ENACTMENT
            custom = client.CustomObjectsApi(api)

            def ready() -> bool:
                try:
                    obj = custom.get_cluster_custom_object(e.group, e.version, e.plural, "n1.br1")
                except client.ApiException:
                    return False
                conds = (obj.get("status") or {}).get("conditions") or []
                return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

            started = time.monotonic()
            wait_for(ready, 60, "enactment n1.br1 Ready")
            print(f"agent Ready after {time.monotonic() - started:.1f} s")
            pid = agent_pid(proc)
            samples = []
            for _ in range(args.seconds):
                time.sleep(1)
                samples.append(status_kib(pid))
            proc.terminate()
            proc.wait(15)
        finally:
            emu.stop()
    rss = [s["VmRSS"] / 1024 for s in samples]
    hwm = max(s["VmHWM"] for s in samples) / 1024
    print(
        f"idle agent RSS over {len(rss)} s: median {statistics.median(rss):.1f} MiB, "
        f"max {max(rss):.1f} MiB; peak (VmHWM) {hwm:.1f} MiB; target < 100 MiB"
    )


if __name__ == "__main__":
    main()
