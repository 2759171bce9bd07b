"""``underlay reconcile`` as a process: the loop, its triggers, probes, metrics, logs.

Real ``underlay`` processes against the real control plane (as the reconciler's ServiceAccount,
through the fault proxy) and real Git repositories: polling with
jitter picks up new commits, the reconcile-requested-at annotation triggers a pass at once,
``--watch`` applies a local edit within a second, drift is reverted every interval, and the
process serves /metrics, /healthz and /readyz and logs JSON lines without credentials.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler import vocab
from reconciler.status import ANNO_RECONCILE_REQUESTED
from tests.controlplane.cluster import Kube
from tests.integration import test_source_https as https
from tests.integration.test_source_https import https_git  # noqa: F401  (fixture)
from tests.unit.test_apply import NS, QUICK, World, pool

UNDERLAY = str(Path(sys.executable).parent / "underlay")


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """``underlay --log-format json reconcile ...`` with its log in a file and its HTTP port."""

    def __init__(self, world: World, *args: str, identity: str = "r1") -> None:
        self.identity = identity
        self.log = world.tmp / f"{identity}.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            UNDERLAY, "--log-format", "json", "reconcile", *args,
            "--kubeconfig", world.kubeconfig, "--namespace", NS,
            "--http-address", f"127.0.0.1:{self.port}", "--identity", identity,
            "--cache-dir", str(world.tmp / f"cache-{identity}"),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("POD_NAME", "POD_NAMESPACE")}
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


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


def start(world: World, *args: str, identity: str = "r1") -> Process:
    p = Process(world, *args, identity=identity)
    world.procs.append(p)  # type: ignore[attr-defined]
    return p


def pool_ips(world: World, name: str) -> list[str] | None:
    live = world.get(vocab.SPIDER_IPPOOL, name)
    return None if live is None else list(live["spec"]["ips"])


def test_loop_applies_commits_reverts_drift_and_serves_probes_and_metrics(world: World) -> None:
    world.commit(QUICK)
    p = start(world, "--repo", str(world.origin_dir), "--interval", "1s")
    wait_for(lambda: world.get(vocab.NETWORK_ATTACHMENT_DEFINITION, "net-a", "kube-system"),
             what=f"first apply ({p.log})")  # fmt: skip
    wait_for(lambda: p.http("/readyz")[0] == 200, what="readyz")
    assert p.http("/healthz") == (200, "ok\n")
    assert p.http("/nope")[0] == 404
    wait_for(lambda: "underlay_reconcile_total{" in p.http("/metrics")[1], what="a finished pass")
    code, text = p.http("/metrics")
    assert code == 200
    for sample in (
        'underlay_objects_applied_total{kind="SpiderIPPool",op="create"} 1',
        'underlay_objects_applied_total{kind="NetworkAttachmentDefinition",op="create"} 1',
        'underlay_pool_total_ips{pool="pool-a"} 11',
        'underlay_pool_allocated_ips{pool="pool-a"} 0',
        "underlay_inventory_objects 4",
        "underlay_leader 0",
        "# TYPE underlay_reconcile_duration_seconds histogram",
        'underlay_reconcile_duration_seconds_bucket{result="success",le="+Inf"}',
    ):
        assert sample in text, sample
    last = float(text.split("\nunderlay_last_success_timestamp_seconds ")[1].split()[0])
    assert abs(time.time() - last) < 10

    # a new commit is applied at a following poll (1 s, +/- 10 %; the figure is in the bench)
    world.commit({"pool-a.yaml": pool("pool-a", 1, ips="10-30")})
    wait_for(lambda: pool_ips(world, "pool-a") == ["10.1.0.10-10.1.0.30"], 30, "new commit applied")

    # steady state: passes run and write nothing
    time.sleep(1.5)
    world.reset_requests()
    time.sleep(2.5)
    assert len(world.requests("GET", r"/gitsyncs/underlay$")) >= 2, "a pass every interval"
    lists = [r for r in world.requests("GET", r"/spiderippools$") if "watch" not in r.params]
    assert lists == [], "passes observe the cluster through the watch cache, not by listing"
    assert world.writes() == []

    # a hand edit is reverted within an interval and reported
    world.custom.patch_cluster_custom_object(
        "spiderpool.spidernet.io", "v2beta1", "spiderippools", "pool-a",
        {"spec": {"gateway": "10.1.0.254"}},
    )  # fmt: skip
    wait_for(
        lambda: (world.get(vocab.SPIDER_IPPOOL, "pool-a") or {})["spec"]["gateway"] == "10.1.0.1", 30, "drift reverted",
    )  # fmt: skip
    wait_for(lambda: any(e[1] == "DriftDetected" for e in world.events()), 30, "drift event")
    # logged right after the Event is created: the server may show the Event first
    wait_for(lambda: any("drift: SpiderIPPool pool-a" in ln["msg"] for ln in p.lines()), 10, "log")

    # JSON logs, one object per line
    lines = p.lines()
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    assert any(line["msg"] == "created SpiderIPPool pool-a" for line in lines)
    assert p.stop() == 0


def test_annotation_triggers_a_pass_at_once(world: World) -> None:
    world.commit(QUICK)
    p = start(world, "--repo", str(world.origin_dir), "--interval", "1h")
    wait_for(lambda: pool_ips(world, "pool-a"), what=f"first apply ({p.log})")
    wait_for(lambda: world.kube.open_watches("gitsyncs") >= 1, what="GitSync watch")
    world.commit({"pool-a.yaml": pool("pool-a", 1, ips="10-40")})
    time.sleep(1.0)
    assert pool_ips(world, "pool-a") == ["10.1.0.10-10.1.0.20"], "no pass before the hour"
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    world.custom.patch_namespaced_custom_object(
        "underlay.dev", "v1alpha1", NS, "gitsyncs", "underlay",
        {"metadata": {"annotations": {ANNO_RECONCILE_REQUESTED: when}}},
    )  # fmt: skip
    # the interval is an hour: only the annotation can have caused this pass
    wait_for(lambda: pool_ips(world, "pool-a") == ["10.1.0.10-10.1.0.40"], 30, "triggered pass")
    wait_for(lambda: world.status().get("lastHandledReconcileAt") == when, 30, "handled")
    # handled: our own status write does not trigger another pass
    world.reset_requests()
    time.sleep(1.0)
    assert world.writes() == []
    assert p.stop() == 0


def test_watch_applies_a_local_edit_without_waiting_for_the_interval(world: World) -> None:
    local = world.tmp / "local"
    local.mkdir()
    for name, text in QUICK.items():
        (local / name).write_text(text)
    p = start(world, str(local), "--watch", "--interval", "1h")
    wait_for(lambda: pool_ips(world, "pool-a"), what=f"first apply ({p.log})")
    time.sleep(0.5)
    # the interval is an hour: only the file watch can have caused these passes (the
    # latency figure, under a second, is measured by bench/bench_reconcile.py)
    for i, last in enumerate((30, 35, 45)):
        (local / "pool-a.yaml").write_text(pool("pool-a", 1, ips=f"10-{last}"))
        wait_for(lambda last=last: pool_ips(world, "pool-a") == [f"10.1.0.10-10.1.0.{last}"], 30,
                 f"edit {i} applied")  # fmt: skip
    assert world.status()["lastAppliedRevision"].startswith("local@")
    assert p.stop() == 0


def test_plan_watch_prints_a_new_plan_after_an_edit(world: World) -> None:
    local = world.tmp / "local"
    local.mkdir()
    (local / "pool-a.yaml").write_text(pool("pool-a", 1))
    out = world.tmp / "plan.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [UNDERLAY, "plan", str(local), "--watch", "--kubeconfig", world.kubeconfig,
             "--namespace", NS],
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: "1 to create" in out.read_text(), what="first plan")
        time.sleep(0.3)
        (local / "pool-b.yaml").write_text(pool("pool-b", 2))
        wait_for(lambda: "2 to create" in out.read_text(), 30, "plan after edit")
        assert "+ create    SpiderIPPool pool-b" in out.read_text()
    finally:
        proc.terminate()
        proc.wait(10)


def test_credentials_never_reach_logs_status_or_events(world: World) -> None:
    port = free_port()  # nothing listens there: the fetch fails
    url = f"https://deploy:s3cr3t-t0ken@127.0.0.1:{port}/net.git"
    p = start(world, "--repo", url, "--interval", "1h", "--backoff", "0.2s")
    wait_for(lambda: (world.get(vocab.GIT_SYNC, "underlay", NS) or {}).get("status"), 30,
             f"failure status ({p.log})")  # fmt: skip
    st = world.status()
    ready = world.condition("Ready")
    assert ready["reason"] == "SourceFailed" and world.condition("Reconciling")["status"] == "True"
    assert st["source"]["url"] == f"https://***@127.0.0.1:{port}/net.git"
    wait_for(lambda: world.events(), 30, "event")
    p.stop()
    everything = p.log.read_text() + json.dumps(st) + json.dumps(world.events())
    assert "s3cr3t-t0ken" not in everything
    assert "127.0.0.1" in st["lastError"]["message"]


def test_apply_command_exit_codes(world: World, tmp_path: Path) -> None:
    world.delete_crd("ovsbridges.underlay.dev")
    world.commit(QUICK)
    cmd = [UNDERLAY, "apply", "--repo", str(world.origin_dir), "--kubeconfig", world.kubeconfig,
           "--namespace", NS, "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "ovsbridges.underlay.dev" in r.stderr
    world.kube.cp.install()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "created SpiderIPPool pool-a" in r.stdout
    world.commit({"pool-a.yaml": pool("pool-a", 1, gateway="192.168.0.1")})
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1 and "nothing applied" in r.stderr
    assert "pool-a.yaml:" in r.stderr


def test_https_credentials_come_from_the_secret_and_rotate(
    world: World,
    https_git: https.GitHTTPS,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A private https repository (git http-backend over TLS, custom CA): the reconciler reads
    the token and CA from the Secret underlay-git-credentials on every pass, so a rotated
    (here: broken, then fixed) Secret takes effect at the next pass; the token is never shown."""
    import base64

    server = https_git
    work, _bare = https.publish(server, tmp_path)
    for name, text in QUICK.items():
        (Path(work.working_tree_dir or ".") / name).write_text(text)
    (Path(work.working_tree_dir or ".") / "pools" / "a.yaml").unlink()
    work.git.add("-A")
    work.index.commit("network")
    https.push(work)

    def secret(token: str) -> dict[str, Any]:
        b64 = {k: base64.b64encode(v.encode()).decode() for k, v in
               {"token": token, "ca.crt": server.ca_pem}.items()}  # fmt: skip
        return {"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "underlay-git-credentials", "namespace": NS}, "data": b64}  # fmt: skip

    world.core.create_namespaced_secret(NS, secret(https.TOKEN))
    p = start(world, "--repo", server.url("r.git"), "--interval", "1s", "--backoff", "0.5s")
    wait_for(lambda: pool_ips(world, "pool-a"), 30, f"applied over https ({p.log})")
    world.core.replace_namespaced_secret("underlay-git-credentials", NS, secret("wrong-t0ken-123"))
    work.index.commit("empty change")
    https.push(work)
    wait_for(lambda: world.condition("Ready").get("reason") == "SourceFailed", 30, "auth failure")
    assert "authentication failed" in world.condition("Ready")["message"]
    world.core.replace_namespaced_secret("underlay-git-credentials", NS, secret(https.TOKEN))
    wait_for(lambda: world.condition("Ready").get("status") == "True", 30, "recovered")
    p.stop()
    everything = p.log.read_text() + json.dumps(world.status()) + json.dumps(world.events())
    assert https.TOKEN not in everything and "wrong-t0ken-123" not in everything
