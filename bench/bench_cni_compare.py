"""Benchmark: the CNI ADD+DEL cycle of this checkout against another one, in the same run.

One rig node (own ovsdb-server/ovs-vswitchd, br1 over eth0, userspace datapath) runs two
agents (``python -m node_agent.cni.server``), one from this checkout and one from
``--baseline`` (a directory holding another version, e.g. ``git archive main | tar -x -C
/tmp/base``), each with the shims of its own version. Each cycle executes underlay-ovs with
Debian's host-local as a runtime does (tests/cniruntime.py: ``ip netns exec`` into the node,
CNI_* env, config on stdin), ADD then DEL in a fresh pod namespace (made and removed untimed),
alternating between the two versions cycle by cycle so machine noise hits both alike. Prints
median and p90 per version and the ratio, and the median time each agent logged for its ADD
and DEL calls (the call inside the agent, without process starts). Needs root.

    .venv/bin/python bench/bench_cni_compare.py --baseline /tmp/base [--cycles 60]
    .venv/bin/python bench/bench_cni_compare.py --smoke     # CI: 3 cycles, this checkout twice
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cniruntime import PYTHON, Runtime, conflist, host_local, make_bridge  # noqa: E402
from tests.rig import Node, Rig  # noqa: E402


def start_agent(
    node: Node, code: Path, work: Path, name: str
) -> tuple[subprocess.Popen[bytes], str]:
    """The CNI server of the checkout at ``code`` in ``node``; returns (process, CNI_PATH)."""
    env = {**os.environ, "PYTHONPATH": f"{code / 'node-agent'}:{code}"}
    sock, bins = str(work / f"{name}.sock"), work / f"{name}-bin"
    subprocess.run(
        [sys.executable, "-c", "import sys; from node_agent.cni.install import install_shims; "
         "install_shims(sys.argv[1], sys.argv[2], python=sys.argv[3])", str(bins), sock, PYTHON],
        env=env, cwd=code, check=True,
    )  # fmt: skip
    log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the agent
    proc = node.popen(
        sys.executable, "-m", "node_agent.cni.server", "--socket", sock, "--ovsdb", node.ovsdb,
        "--node-name", "n1", "-v", stdout=subprocess.PIPE, stderr=log, env=env, cwd=str(code),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready", name
    return proc, f"{bins}:/usr/lib/cni"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", type=Path, help="the other checkout (required unless --smoke)")
    p.add_argument("--cycles", type=int, default=60)
    p.add_argument(
        "--smoke", action="store_true", help="3 cycles against this checkout itself, for CI"
    )
    a = p.parse_args()
    if a.smoke:
        a.baseline, a.cycles = a.baseline or ROOT, 3
    if a.baseline is None:
        p.error("--baseline is required (or --smoke)")
    work = Path(tempfile.mkdtemp(prefix="cni-compare-"))
    rig = Rig()
    agents = []
    try:
        node = rig.add_node("n1", "172.18.10.11")
        make_bridge(node)
        cases = {}
        for i, (name, code) in enumerate((("baseline", a.baseline.resolve()), ("this", ROOT))):
            proc, cni_path = start_agent(node, code, work, name)
            agents.append(proc)
            lo, hi = f"172.18.{40 + i}.1", f"172.18.{40 + i}.254"
            conf = conflist(
                {"type": "underlay-ovs", "bridge": "br1", "ipam": host_local(lo, hi, work / name)}
            )
            cases[name] = (Runtime(node, cni_path), conf)
        times: dict[str, list[float]] = {k: [] for k in cases}
        n = 0
        warm = 1 if a.smoke else 5
        for cycle in range(a.cycles + warm):  # the first ones: warm-up
            for name, (rt, conf) in cases.items():
                n += 1
                pod = rig.add_pod(f"s{n}")
                t0 = time.perf_counter()
                rt.add(conf, pod, f"c{n}")
                rt.delete(conf, pod, f"c{n}")
                took = time.perf_counter() - t0
                rig.delete_pod(f"s{n}")
                if cycle >= warm:
                    times[name].append(took)
        base = statistics.median(times["baseline"])
        print(f"ADD+DEL cycles (underlay-ovs + host-local): {a.cycles} per version, alternating")
        for name, ts in times.items():
            med, p90 = statistics.median(ts), statistics.quantiles(ts, n=10)[-1]
            print(f"  {name:9} median {med * 1000:6.1f} ms  p90 {p90 * 1000:6.1f} ms  "
                  f"ratio {med / base:.3f}")  # fmt: skip
        print("time inside the agent (its log), median ms:")
        for name in cases:
            text = (work / f"{name}.log").read_text()
            for cmd in ("ADD", "DEL"):
                ms = [float(line.rsplit("(", 1)[1].split(" ms")[0])
                      for line in text.splitlines() if f"underlay-ovs {cmd} " in line and "-> ok (" in line]  # fmt: skip
                print(f"  {name:9} {cmd} {statistics.median(ms[warm:]):6.2f} ({len(ms)} calls)")
    finally:
        for proc in agents:
            proc.terminate()
            proc.wait(10)
        rig.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
