"""Benchmark: how many allocation records fit in one SpiderIPPool before the real API server
refuses to store its status.

Starts etcd, kube-apiserver and kube-controller-manager (tests/controlplane, etcd with its
default ``--max-request-bytes`` of 1.5 MiB), makes one pool per case and writes its
``status.allocatedIPs`` as the agent writes it (the agent's ServiceAccount, records encoded by
``reconciler.ippool.pool_status``, lowest addresses first), binary-searching the largest record
count the server accepts. A case is an address family and the length of the records' pod
references (``<namespace>/<name>``: 16 characters is ``default/web-1234``, 317 the longest a
namespace and a Pod name may make). Prints, per case, the most records that fit, the size of
that write and the bytes per record. Exits 1 when a refusal is not the server's size refusal.
Needs no root.

    .venv/bin/python bench/bench_pool_limit.py
    .venv/bin/python bench/bench_pool_limit.py --smoke     # CI: one case
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import netaddr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the control plane lives in tests/

from kubernetes import client  # noqa: E402
from node_agent.ipam import MAX_RECORDS, size_refusal  # noqa: E402

from reconciler.ippool import pool_status  # noqa: E402
from reconciler.kube import Objects, api_client  # noqa: E402
from reconciler.vocab import SPIDER_IPPOOL  # noqa: E402
from tests.controlplane.server import ControlPlane  # noqa: E402

CASES = [(4, 16), (4, 40), (4, 80), (4, 160), (4, 317), (6, 16), (6, 317)]
"""(address family, pod reference length)."""
FIRST = {4: "10.0.0.1", 6: "fd00::1"}


def records(family: int, ref_len: int, n: int) -> dict[str, dict[str, str]]:
    """``n`` records on the lowest addresses from :data:`FIRST`, pod references of ``ref_len``
    characters, real-shaped UIDs."""
    first = netaddr.IPAddress(FIRST[family])
    out = {}
    for i in range(n):
        name = f"p{i}-".ljust(ref_len - len("default/"), "x")
        out[str(first + i)] = {"pod": f"default/{name}", "podUid": str(uuid.UUID(int=i + 1))}
    return out


class Refused(Exception):
    """The server refused a write for another reason than its size."""


def fits(pools: Objects, name: str, family: int, ref_len: int, n: int) -> int | None:
    """Write ``n`` records into pool ``name``; the write's size in bytes, None when refused as
    too large."""
    body = pools.get(name)
    body["status"] = pool_status(body["spec"], records(family, ref_len, n))
    try:
        pools.replace_status(body)
    except client.ApiException as exc:
        if size_refusal(exc) is None:
            raise Refused(f"{exc.status} {exc.body}") from exc
        return None
    return len(json.dumps(body))


def measure(
    pools: Objects, admin: Objects, family: int, ref_len: int, smoke: bool
) -> dict[str, Any]:
    """The most records of one case that pool ``limit-<family>-<ref_len>`` stores."""
    name = f"limit-{family}-{ref_len}"
    subnet = "10.0.0.0/8" if family == 4 else "fd00::/64"
    last = "10.255.255.254" if family == 4 else "fd00::ffff:ffff"
    admin.create(
        {
            "apiVersion": "spiderpool.spidernet.io/v2beta1",
            "kind": "SpiderIPPool",
            "metadata": {"name": name},
            "spec": {"subnet": subnet, "ips": [f"{FIRST[family]}-{last}"], "ipVersion": family},
        }
    )
    lo = 100
    size = fits(pools, name, family, ref_len, lo)
    assert size is not None, f"{lo} records refused"
    # about 2.4 MB: over etcd's 1.5 MiB, under kube-apiserver's 3 MiB (a body far over that
    # is cut off while it is sent, not answered with 413)
    hi = int(2.4e6 / (size / lo))
    if fits(pools, name, family, ref_len, hi) is not None:
        raise Refused(f"{hi} records accepted: the server has no size limit below {hi}")
    while hi - lo > (200 if smoke else 1):
        mid = (lo + hi) // 2
        got = fits(pools, name, family, ref_len, mid)
        if got is None:
            hi = mid
        else:
            lo, size = mid, got
    return {"family": family, "ref": ref_len, "records": lo, "bytes": size, "per": size / lo}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="one case, coarse search (CI)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pool-limit-"))
    cp = ControlPlane(work / "controlplane")
    failed = ""
    try:
        cp.start()
        print(f"control plane {cp.version()['gitVersion']} up in {cp.started_in:.1f} s")
        agent = api_client(
            str(
                cp.serviceaccount_kubeconfig(
                    work / "agent.kubeconfig", "underlay-system", "underlay-agent"
                )
            )
        )
        pools, admin = Objects(agent, SPIDER_IPPOOL), Objects(cp.api_client(), SPIDER_IPPOOL)
        print(f"{'family':>6} {'pod ref':>7} {'records':>8} {'write bytes':>12} {'B/record':>9}")
        for family, ref_len in CASES[:1] if a.smoke else CASES:
            m = measure(pools, admin, family, ref_len, a.smoke)
            cap = " (over the 5,000-record cap)" if m["records"] > MAX_RECORDS else ""
            print(
                f"  IPv{m['family']} {m['ref']:7} {m['records']:8} {m['bytes']:12} "
                f"{m['per']:9.1f}{cap}"
            )
    except (Refused, AssertionError) as exc:
        failed = str(exc)
    finally:
        cp.stop()
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        print(f"FAIL: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
