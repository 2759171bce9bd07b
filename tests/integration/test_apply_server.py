"""What only a real API server shows about ``underlay apply`` and ``underlay reconcile``.

Against kube-apiserver (tests/controlplane), as the reconciler's ServiceAccount through the fault
proxy: the server defaults every field Git leaves out (CRD structural defaults) and keeps
``managedFields``, so a second apply must find nothing to write, for every kind; every object is
dry-run on the server before the first write; a ``kubectl edit`` of a pool is reverted and
reported (status ``drift``, a ``DriftDetected`` Event that ``kubectl get events`` lists); and
another field manager's server-side apply of a field Git sets is refused by the server unless
forced, and when forced it is reverted and reported like a hand edit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler import vocab
from tests.controlplane.cluster import Kube
from tests.integration.test_reconcile import UNDERLAY, Process, wait_for
from tests.unit.test_apply import NS, QUICK, World, pool

ROOT = Path(__file__).resolve().parents[2]
REPOS = [*sorted(p for p in (ROOT / "examples").iterdir() if p.is_dir()),
         ROOT / "tests" / "repos" / "every-field"]  # fmt: skip
USER_PATHS = ("/ovsbridges", "/spiderippools", "/spidermultusconfigs",
              "/network-attachment-definitions")  # fmt: skip
POOLS = ("spiderpool.spidernet.io", "v2beta1", "spiderippools")


@pytest.fixture
def world(kube: Kube, tmp_path: Path) -> Iterator[World]:
    w = World(kube, tmp_path)
    procs: list[Process] = []
    w.procs = procs  # type: ignore[attr-defined]
    try:
        yield w
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)


def underlay(world: World, *args: str, cache: str = "cache") -> subprocess.CompletedProcess[str]:
    cmd = [UNDERLAY, *args, "--repo", str(world.origin_dir), "--kubeconfig", world.kubeconfig,
           "--namespace", NS, "--cache-dir", str(world.tmp / cache)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def user_writes(world: World) -> list[Any]:
    return [r for r in world.requests(writes=True) if any(p in r.path for p in USER_PATHS)]


def managers(obj: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(manager, operation) -> top-level spec fields it owns, from ``managedFields``."""
    out: dict[tuple[str, str], set[str]] = {}
    for e in obj["metadata"].get("managedFields") or []:
        spec = (e.get("fieldsV1") or {}).get("f:spec") or {}
        out.setdefault((e["manager"], e["operation"]), set()).update(
            k[2:] for k in spec if k.startswith("f:")
        )
    return out


@pytest.mark.parametrize("repo", REPOS, ids=[p.name for p in REPOS])
def test_a_second_apply_writes_nothing_with_the_servers_defaults(world: World, repo: Path) -> None:
    for f in sorted(repo.glob("*.yaml")):
        world.commit({f.name: f.read_text()}, f"add {f.name}")
    first = underlay(world, "apply")
    assert first.returncode == 0, first.stdout + first.stderr
    assert " 0 failed, 0 blocked" in first.stdout, first.stdout
    # every object is dry-run on the server before the first write of any object
    log = user_writes(world)
    dry = [r for r in log if r.params.get("dryRun") == "All"]
    real = [r for r in log if "dryRun" not in r.params]
    assert dry and real and max(r.time for r in dry) <= min(r.time for r in real)
    created = sum(1 for line in first.stdout.splitlines() if line.startswith("created "))
    assert {r.path for r in dry if r.method == "PATCH"} >= {
        r.path for r in real if r.method == "PATCH"
    }
    assert created == len({r.path for r in real if r.method == "PATCH"})
    # the server filled in what Git left out, and recorded who owns what
    inventory = world.status()["inventory"]
    assert len(inventory) == created
    for e in inventory:
        live = world.get(vocab.BY_KEY[(e["apiVersion"], e["kind"])], e["name"], e.get("namespace"))
        assert live is not None
        owners = managers(live)
        assert ("underlay", "Apply") in owners, owners
        assert not [m for m, _op in owners if m != "underlay"], owners
    if repo.name == "every-field":
        br2 = world.get(vocab.OVS_BRIDGE, "br2")
        assert br2 is not None and br2["spec"]["persistence"] == "auto", "a CRD default"
        assert br2["spec"]["maxUnavailable"] == 2
        smc = world.get(vocab.SPIDER_MULTUS_CONFIG, "net-ovs-min", "default")
        assert smc is not None and smc["spec"]["enableCoordinator"] is True
        assert "persistence" not in managers(br2)[("underlay", "Apply")], "the server's, not ours"

    # a second pass, and a fresh process without any cache, find nothing to write
    for cache in ("cache", "fresh-cache"):
        world.reset_requests()
        again = underlay(world, "apply", cache=cache)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "No changes" in again.stdout, again.stdout
        assert world.requests(writes=True) == [], f"a no-op pass wrote ({cache})"
    plan = underlay(world, "plan", "--exit-code")
    assert plan.returncode == 0 and "No changes" in plan.stdout, plan.stdout + plan.stderr


def test_a_kubectl_edit_of_a_pool_is_reverted_and_reported(world: World) -> None:
    world.commit(QUICK)
    p = Process(world, "--repo", str(world.origin_dir), "--interval", "1s")
    world.procs.append(p)  # type: ignore[attr-defined]
    wait_for(lambda: world.get(vocab.GIT_SYNC, "underlay", NS), 60, f"GitSync ({p.log})")
    wait_for(lambda: world.condition("Ready").get("status") == "True", 60, f"applied ({p.log})")
    # an operator edits the pool with kubectl edit, as a user would: $EDITOR on the YAML
    editor = world.tmp / "editor.sh"
    editor.write_text("#!/bin/sh\nsed -i 's/^  gateway: 10.1.0.1$/  gateway: 10.1.0.254/' \"$1\"\n")
    editor.chmod(0o755)
    env = {**os.environ, "KUBE_EDITOR": str(editor), "EDITOR": str(editor)}
    cp = world.kube.cp
    r = subprocess.run(
        [cp.bin("kubectl"), f"--kubeconfig={cp.admin_kubeconfig}", "edit", "spiderippool",
         "pool-a"], capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert r.returncode == 0 and "edited" in r.stdout, r.stdout + r.stderr

    def gateway() -> str:
        live = world.get(vocab.SPIDER_IPPOOL, "pool-a") or {}
        return str(live["spec"]["gateway"])

    wait_for(lambda: gateway() == "10.1.0.1", 30, "the edit reverted")
    wait_for(lambda: world.status().get("drift"), 30, "drift in the status")
    (d,) = world.status()["drift"]
    assert d == {"kind": "SpiderIPPool", "name": "pool-a", "reverted": True,
                 "fields": ["spec.gateway"]}  # fmt: skip
    # kubectl shows the Event, about the GitSync
    out = world.kube.kubectl(
        "get", "events", "-n", NS, "--field-selector", "reason=DriftDetected", "-o", "json"
    ).stdout
    (ev,) = json.loads(out)["items"]
    assert ev["type"] == "Warning" and ev["involvedObject"]["kind"] == "GitSync"
    assert ev["message"] == "changed in the cluster, reverted: SpiderIPPool pool-a (spec.gateway)"
    table = world.kube.kubectl("get", "events", "-n", NS).stdout
    assert "DriftDetected" in table and "gitsync/underlay" in table, table
    # ours again: kubectl-edit no longer owns the gateway; later passes write nothing
    live = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert live is not None
    assert "gateway" in managers(live)[("underlay", "Apply")]
    assert "gateway" not in managers(live).get(("kubectl-edit", "Update"), set())
    wait_for(lambda: "drift" not in world.status(), 30, "drift report cleared")
    world.reset_requests()
    passes = len(world.requests("GET", r"/gitsyncs/underlay$"))
    wait_for(lambda: len(world.requests("GET", r"/gitsyncs/underlay$")) >= passes + 3, 30, "passes")
    assert world.writes() == []
    assert p.stop() == 0


def test_another_managers_conflicting_apply_is_refused_or_reverted_and_reported(
    world: World,
) -> None:
    world.commit(QUICK)
    rec = world.reconciler()
    assert rec.run_once().converged
    theirs = world.tmp / "theirs.yaml"
    body = yaml.safe_load(pool("pool-a", 1))
    body["spec"]["gateway"] = "10.1.0.254"
    body["spec"]["excludeIPs"] = ["10.1.0.15"]
    theirs.write_text(json.dumps(body))
    # the server refuses it: underlay owns spec.gateway
    r = world.kube.kubectl(
        "apply", "--server-side", "--field-manager=ops", "-f", str(theirs), check=False
    )
    assert r.returncode != 0
    assert 'conflict with "underlay"' in r.stderr and ".spec.gateway" in r.stderr, r.stderr
    live = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert live is not None and live["spec"]["gateway"] == "10.1.0.1"
    assert "excludeIPs" not in live["spec"]
    # forced, it takes the field; the next pass reports it as drift and takes it back
    world.kube.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=ops", "-f", str(theirs)
    )
    live = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert live is not None and live["spec"]["gateway"] == "10.1.0.254"
    assert {"gateway", "excludeIPs"} <= managers(live)[("ops", "Apply")]
    assert "gateway" not in managers(live)[("underlay", "Apply")]
    rep = rec.run_once()
    assert rep.converged, rep.error
    live = world.get(vocab.SPIDER_IPPOOL, "pool-a")
    assert live is not None and live["spec"]["gateway"] == "10.1.0.1"
    assert "excludeIPs" not in live["spec"]
    assert "gateway" in managers(live)[("underlay", "Apply")]
    assert "gateway" not in managers(live).get(("ops", "Apply"), set())
    (d,) = world.status()["drift"]
    assert d == {"kind": "SpiderIPPool", "name": "pool-a", "reverted": True,
                 "fields": ["spec.gateway", "spec.excludeIPs"]}  # fmt: skip
    drift_events = [e for e in world.events() if e[1] == "DriftDetected"]
    assert drift_events == [
        ("Warning", "DriftDetected",
         "changed in the cluster, reverted: SpiderIPPool pool-a (spec.gateway, spec.excludeIPs)"),
    ]  # fmt: skip
    # no fight afterwards: the next passes write nothing (ops applies no more)
    rec.run_once()
    world.reset_requests()
    assert rec.run_once().outcome is None
    assert world.writes() == []
