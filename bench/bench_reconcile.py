"""Benchmark the reconciler against a real control plane (run by hand; ``--smoke`` in CI).

    .venv/bin/python bench/bench_reconcile.py [--docs 5000] [--passes 5] [--commits 10]
    .venv/bin/python bench/bench_reconcile.py --smoke        # a few iterations, no targets

The control plane is tests/controlplane's: etcd, kube-apiserver and kube-controller-manager
built from Kubernetes' own Go modules (``tests/controlplane/build.sh``), deploy/'s CRDs and
RBAC. ``underlay`` runs as the reconciler's ServiceAccount, in ``underlay-system``, as in a
cluster. The no-op runs go through a fault proxy (tests/controlplane/proxy.py, no faults armed)
whose request log counts the reconciler's writes (dry runs included); the first apply and the
latency runs talk to kube-apiserver directly.

1. No-op pass over a ``--docs``-document repository (bench_validate's generator: 60 % pools,
   30 % Multus configs, each rendering a NAD as well, 10 % bridges) already applied:
   - steady state: a long-running reconciler's pass when the Git head did not move (the
     pipeline is cached; observe + plan run): time per pass, writes, peak RSS of the process;
   - cold: ``underlay apply`` as a fresh process on the same applied repository (fetch,
     load, validate, render, observe, plan): wall time, writes, peak RSS.
   Targets: 0 writes, under 1 s, peak RSS under 300 MiB.
2. Commit-to-applied latency of ``underlay reconcile --interval 1s`` (a process), from
   ``git commit`` in the origin to the changed SpiderIPPool being visible in the API, over
   ``--commits`` commits, on a small repository (the quick start) and on the large one.
   Target: under 2 s (the median on the large repository; every commit on the small one).
   Commits start after the process's first pass (counted on its /metrics), each once the pass
   that applied the one before has written its status (an idle reconciler, as when commits
   are minutes apart).
3. Edit-to-applied latency of ``underlay reconcile DIR --watch --interval 1h``. Target: under
   1 s.

Exit status 0 when every target is met (with ``--smoke``: when everything ran and nothing was
written by a no-op pass), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
UNDERLAY = str(BIN / "underlay")
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


NS = "underlay-system"
"""Where the reconciler keeps its GitSync, Events and Lease (deploy/rbac.yaml's Role)."""


class Cluster:
    """A real control plane (tests/controlplane/server.py) with a fault proxy in front.

    :attr:`kubeconfig`: the reconciler's ServiceAccount through the proxy (its requests are
    logged: :meth:`writes`); :attr:`direct_kubeconfig`: the same, straight to kube-apiserver;
    :attr:`admin_kubeconfig`: the admin, straight (the bench's own reads and writes).
    """

    def __init__(self, tmp: Path) -> None:
        from tests.controlplane.server import ControlPlane

        self.cp = ControlPlane(tmp / "controlplane")
        self.cp.start()
        self.proxy = self.cp.proxy()
        url = self.proxy.listen()
        ns, name = "underlay-system", "underlay-reconciler"
        self.kubeconfig = self.cp.serviceaccount_kubeconfig(tmp / "via-proxy", ns, name, url)
        self.direct_kubeconfig = self.cp.serviceaccount_kubeconfig(tmp / "direct", ns, name)
        self.admin_kubeconfig = self.cp.admin_kubeconfig
        self.api = self.cp.api_client()

    def warm_up(self) -> None:
        """List each kind the reconciler observes once: the first LIST of a custom resource
        after kube-apiserver started takes about a second (its watch cache catches up with
        etcd before it answers; right after the CRD was created, 429 with Retry-After: 1), a
        cost of the server's start, not of a pass."""
        from reconciler.controller import OBSERVED

        for r in OBSERVED:
            self.get(f"/apis/{r.group}/{r.version}/{r.plural}")

    def wait_applied(self, gitsync: str, done: Any, timeout: float = 60) -> None:
        """Wait until ``done(status.lastAppliedRevision)`` of GitSync ``gitsync`` (a path)."""
        deadline = time.monotonic() + timeout
        while True:
            obj = self.get(gitsync + "?resourceVersion=0") or {}
            if done(str((obj.get("status") or {}).get("lastAppliedRevision") or "")):
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"{gitsync}: not applied within {timeout:.0f} s")
            time.sleep(0.1)

    def writes(self) -> list[Any]:
        """Writes by underlay (its User-Agent) through the proxy since the last reset."""
        return [r for r in self.proxy.requests(writes=True) if r.user_agent.startswith("underlay/")]

    def reset(self) -> None:
        self.proxy.reset_requests()

    def get(self, path: str) -> Any:
        from kubernetes import client

        from reconciler import kube

        try:
            return kube.request(self.api, "GET", path)
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def create_namespace(self, name: str) -> None:
        from kubernetes import client

        from reconciler import kube

        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        try:
            kube.request(self.api, "POST", "/api/v1/namespaces", body)
        except client.ApiException as e:
            if e.status != 409:
                raise

    def stop(self) -> None:
        self.proxy.stop()
        self.cp.stop()


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@x",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "b@x"}  # fmt: skip
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def make_repo(path: Path, docs: int) -> Path:
    """A Git repository with ``docs`` generated documents (or the quick start for 0)."""
    if docs == 0:
        shutil.copytree(REPO / "examples" / "quickstart", path)
    else:
        from bench_validate import make_documents, write_layouts

        grouped, _single = write_layouts(make_documents(docs), max(1, docs // 10), path / "gen")
        shutil.move(str(grouped), str(path / "net"))
        shutil.rmtree(path / "gen")
    git(path, "init", "-q", "-b", "main")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


def timed(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """(wall seconds, peak RSS MiB of the child, result)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if r.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd[:3])} failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
        )
    return wall, max(after, before) / 1024, r


def worker(a: argparse.Namespace) -> int:
    """Child mode: a long-running reconciler's passes; prints JSON (times, RSS, per stage)."""
    from reconciler import kube, vocab
    from reconciler.cache import ObjectCache
    from reconciler.controller import OBSERVED, GitSource, Options, Reconciler
    from reconciler.retry import RetryPolicy

    api = kube.api_client(a.kubeconfig, retry=RetryPolicy(), user_agent="underlay/bench")
    src = GitSource(a.repo_url, "main", cache_dir=Path(a.cache))
    cache = ObjectCache(api, OBSERVED)  # as `underlay reconcile` runs: passes read the watch cache
    t = time.perf_counter()
    cache.start()
    cache.wait_synced(300)
    out: dict[str, Any] = {"passes": [], "cache_sync_seconds": time.perf_counter() - t}
    rec = Reconciler(api, src, Options(namespace=NS), out=lambda s: None, cache=cache)
    other = kube.Objects(kube.api_client(a.admin_kubeconfig), vocab.SPIDER_IPPOOL)
    pool = other.list()["items"][0]["metadata"]["name"]
    for i in range(2 * a.passes + 1):
        touched = i > a.passes
        if touched:  # someone else writes a field that is not ours: plan runs, writes nothing
            other.api.patch_cluster_custom_object(
                vocab.SPIDER_IPPOOL.group, vocab.SPIDER_IPPOOL.version,
                vocab.SPIDER_IPPOOL.plural, pool, {"metadata": {"annotations": {"bench": str(i)}}},
            )  # fmt: skip
            time.sleep(0.2)  # let the watch deliver it
        t = time.perf_counter()
        rep = rec.run_once()
        dt = time.perf_counter() - t
        out["passes"].append(
            {"seconds": dt, "cached": rep.skipped_pipeline, "quiet": rep.quiet,
             "touched": touched, "error": rep.error,
             "changes": rep.plan.has_changes if rep.plan else None,
             "written": rep.status_written, "objects": len(rep.plan.actions) if rep.plan else 0}
        )  # fmt: skip
        if i == 0:
            out["rss_after_first_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if a.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        rec.run_once()
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    print(json.dumps(out))
    return 0


def latency(
    cluster: Cluster, tmp: Path, origin: Path, commits: int, name: str, instance: str
) -> list[float]:
    """Seconds from ``git commit`` (a label added to one pool) to the label in the API.

    Commits start once the process finished its first pass (its /metrics count one), so the
    figures are those of a running reconciler, not of its start-up."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [UNDERLAY, "--log-format", "json", "reconcile", "--repo", str(origin), "--interval", "1s",
         "--kubeconfig", str(cluster.direct_kubeconfig), "--namespace", NS,
         "--http-address", f"127.0.0.1:{port}",
         "--instance", instance, "--cache-dir", str(tmp / f"cache-{name}")],
        stdout=subprocess.DEVNULL, stderr=open(tmp / f"lat-{name}.log", "w"),  # noqa: SIM115
    )  # fmt: skip

    def passes() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return 0
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith("underlay_reconcile_total{")
        )

    pool_file = next(
        (p for p in sorted(origin.rglob("*.yaml")) if "kind: SpiderIPPool" in p.read_text()), None
    )
    assert pool_file is not None
    text = pool_file.read_text()
    m = re.search(r"name: (\S+)\n", text[text.index("kind: SpiderIPPool") :])
    assert m is not None
    pool_name = m.group(1)
    path = f"/apis/spiderpool.spidernet.io/v2beta1/spiderippools/{pool_name}"
    deadline = time.monotonic() + 600
    gitsync = f"/apis/underlay.dev/v1alpha1/namespaces/{NS}/gitsyncs/{instance}"
    while not ((cluster.get(gitsync) or {}).get("status") or {}).get("lastAppliedRevision"):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"first apply did not finish: see {tmp / f'lat-{name}.log'}")
        time.sleep(0.2)
    while passes() < 1:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"first pass did not finish: see {tmp / f'lat-{name}.log'}")
        time.sleep(0.1)
    out = []
    for i in range(commits):
        marker = f"bench-{i}"
        new = re.sub(r"(kind: SpiderIPPool\nmetadata:\n  name: " + re.escape(pool_name) + r"\n)",
                     rf"\1  labels:\n    bench: {marker}\n", text, count=1)  # fmt: skip
        pool_file.write_text(new)
        git(origin, "commit", "-q", "-am", marker)
        t0 = time.perf_counter()
        while True:
            obj = cluster.get(path) or {}
            if (obj.get("metadata", {}).get("labels") or {}).get("bench") == marker:
                break
            if time.perf_counter() - t0 > 30:
                raise SystemExit(f"commit {i} not applied in 30 s")
            time.sleep(0.01)
        out.append(time.perf_counter() - t0)
        # the next commit lands on an idle reconciler: its pass has written its status
        sha = git(origin, "rev-parse", "HEAD")
        cluster.wait_applied(gitsync, lambda rev, sha=sha: rev == sha)
        time.sleep(0.3)
    proc.terminate()
    proc.wait(20)
    return out


def watch_latency(cluster: Cluster, tmp: Path, edits: int) -> list[float]:
    """Seconds from writing a file under the watched directory (``underlay reconcile DIR
    --watch --interval 1h``) to the change being visible in the API."""
    local = tmp / "watched"
    shutil.copytree(REPO / "examples" / "quickstart", local)
    log = open(tmp / "watch.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [UNDERLAY, "--log-format", "json", "reconcile", str(local), "--watch", "--interval", "1h",
         "--kubeconfig", str(cluster.direct_kubeconfig), "--namespace", NS, "--http-address", "",
         "--instance", "small"],  # the quick start objects the small latency run applied
        stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    path = "/apis/spiderpool.spidernet.io/v2beta1/spiderippools/ippool-test"
    gitsync = f"/apis/underlay.dev/v1alpha1/namespaces/{NS}/gitsyncs/small"
    deadline = time.monotonic() + 120
    while not str(
        ((cluster.get(gitsync) or {}).get("status") or {}).get("lastAppliedRevision", "")
    ).startswith("local@"):  # the watching process made its first pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"--watch run did not apply: see {tmp / 'watch.log'}")
        time.sleep(0.1)
    time.sleep(1.0)
    pool_file = local / "ippool.yaml"
    text = pool_file.read_text()
    out = []
    for i in range(edits):
        marker = f"w{i}"
        before = str(((cluster.get(gitsync) or {}).get("status") or {}).get("lastAppliedRevision"))
        pool_file.write_text(
            text.replace(
                "  name: ippool-test\n", f"  name: ippool-test\n  labels:\n    bench: {marker}\n"
            )
        )
        t0 = time.perf_counter()
        while ((cluster.get(path) or {}).get("metadata", {}).get("labels") or {}).get(
            "bench"
        ) != marker:
            if time.perf_counter() - t0 > 30:
                raise SystemExit(f"edit {i} not applied in 30 s")
            time.sleep(0.01)
        out.append(time.perf_counter() - t0)
        cluster.wait_applied(gitsync, lambda rev, before=before: rev not in ("", before))
        time.sleep(0.5)
    proc.terminate()
    proc.wait(20)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--docs", type=int, default=5000)
    ap.add_argument("--passes", type=int, default=5, help="steady-state passes to time")
    ap.add_argument("--commits", type=int, default=10, help="commits for the latency runs")
    ap.add_argument("--profile", action="store_true", help="cProfile one steady-state pass")
    ap.add_argument(
        "--latency-only", action="store_true", help="only the latency runs (small repository)"
    )
    ap.add_argument(
        "--smoke", action="store_true",
        help="a few iterations on a small repository (60 documents, 2 passes, 3 commits); no "
        "timing targets; exit 1 on any failure or on a write by a no-op pass",
    )  # fmt: skip
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    ap.add_argument("--admin-kubeconfig", help=argparse.SUPPRESS)
    ap.add_argument("--repo-url", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.smoke:
        a.docs, a.passes, a.commits = 60, 2, 3
    ok = True  # the targets
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-") as tmpd:
        tmp = Path(tmpd)
        t0 = time.perf_counter()
        cluster = Cluster(tmp)
        print(f"control plane up in {time.perf_counter() - t0:.1f} s "
              f"(kube-apiserver {cluster.cp.version()['gitVersion']})")  # fmt: skip
        cluster.create_namespace("net")  # the generated Multus configs live there
        cluster.warm_up()
        try:
            origin: Path | None = None
            if not a.latency_only:
                origin = make_repo(tmp / "origin", a.docs)
                kc = str(cluster.kubeconfig)
                apply = [UNDERLAY, "apply", "--repo", str(origin), "--kubeconfig", kc,
                         "--namespace", NS, "--cache-dir", str(tmp / "cache")]  # fmt: skip
                direct = [*apply[:5], str(cluster.direct_kubeconfig), *apply[6:]]
                wall, rss, r = timed(direct)
                n_objects = int(re.search(r"(\d+) created", r.stdout).group(1))  # type: ignore[union-attr]
                print(f"first apply ({a.docs} documents -> {n_objects} objects): {wall:.1f} s, "
                      f"peak RSS {rss:.0f} MiB")  # fmt: skip

                cluster.reset()
                wall, rss, r = timed(apply)
                writes = cluster.writes()
                print(f"cold no-op pass (underlay apply, fresh process): {wall:.2f} s, "
                      f"{len(writes)} writes, peak RSS {rss:.0f} MiB  [{r.stdout.strip()[:60]}...]")  # fmt: skip
                if writes:
                    raise SystemExit(f"a no-op apply wrote: {writes[:5]}")
                ok &= rss < 300

                cluster.reset()
                cmd = [sys.executable, __file__, "--worker", "--kubeconfig", kc,
                       "--admin-kubeconfig", str(cluster.admin_kubeconfig), "--repo-url",
                       str(origin), "--cache", str(tmp / "cache-w"), "--passes", str(a.passes)]  # fmt: skip
                if a.profile:
                    cmd.append("--profile")
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(r.stderr[-3000:])
                if a.profile:
                    print(r.stderr)
                res = json.loads(r.stdout.strip().splitlines()[-1])
                writes = cluster.writes()
                first, *rest = res["passes"]
                quiet = [p["seconds"] for p in rest if not p["touched"]]
                touched = [p["seconds"] for p in rest if p["touched"]]
                print(f"steady no-op pass, nothing changed (head and cluster unchanged): median "
                      f"{statistics.median(quiet):.3f} s, max {max(quiet):.3f} s over {len(quiet)} passes")  # fmt: skip
                print(f"steady no-op pass, one object written by someone else (diff runs, memo "
                      f"for the rest): median {statistics.median(touched):.3f} s, max "
                      f"{max(touched):.3f} s over {len(touched)} passes")  # fmt: skip
                print(f"first pass of a fresh reconciler (full pipeline, {first['objects']} objects): "
                      f"{first['seconds']:.2f} s after a {res['cache_sync_seconds']:.1f} s cache "
                      f"sync; {len(writes)} writes in all these passes; peak RSS "
                      f"{res['rss_peak_mib']:.0f} MiB")  # fmt: skip
                errors = [p["error"] for p in res["passes"] if p["error"]]
                if errors or writes:
                    raise SystemExit(f"steady passes failed or wrote: {errors[:3]} {writes[:5]}")
                assert all(p["cached"] for p in rest) and not any(
                    p["changes"] for p in res["passes"]
                )
                assert all(p["quiet"] for p in rest[1:] if not p["touched"])
                assert not any(p["quiet"] for p in rest if p["touched"])
                ok &= max(quiet + touched) < 1.0 and res["rss_peak_mib"] < 300

            # the small repository under its own instance; the large one is the applied one
            small = make_repo(tmp / "origin-small", 0)
            runs: list[tuple[str, int, Path, str]] = [("small", 0, small, "small")]
            if origin is not None:
                runs.append(("large", a.docs, origin, "underlay"))
            for name, docs, repo, inst in runs:
                lat = latency(cluster, tmp, repo, a.commits, name, inst)
                print(f"commit-to-applied, 1 s poll, {name} repository "
                      f"({docs or 'quick start'} documents): {[round(x, 2) for x in lat]} median "
                      f"{statistics.median(lat):.2f} s, max {max(lat):.2f} s over {len(lat)} commits")  # fmt: skip
                ok &= statistics.median(lat) < 2.0 and (name != "small" or max(lat) < 2.0)
            lat = watch_latency(cluster, tmp, a.commits)
            print(f"edit-to-applied with --watch (quick start, 1 h interval): {[round(x, 2) for x in lat]} median "
                  f"{statistics.median(lat):.2f} s, max {max(lat):.2f} s over {len(lat)} edits")  # fmt: skip
            ok &= max(lat) < 1.0
        finally:
            cluster.stop()
    if a.smoke:
        print("smoke run passed (timings not judged)")
        return 0
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
