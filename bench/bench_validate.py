"""Benchmark ``underlay validate`` against check-jsonschema (run by hand, not in CI).

    /tmp/venv/bin/pip install check-jsonschema   # for this benchmark only, not a dependency
    /tmp/venv/bin/python bench/bench_validate.py [--docs 5000] [--files 500] [--repeat 3]

Generates ``--docs`` valid documents (60% SpiderIPPool, 30% SpiderMultusConfig, 10% OvsBridge,
every reference resolvable, no overlaps) in two layouts of the same documents:

- A: ``--files`` files of several documents each (how operators write them);
- B: one document per file, one directory per kind, because check-jsonschema reads a single
  document per file and one schema per run.

Then times, best of ``--repeat``:
- underlay in-process (``validate_repo``) on A: load + JSON Schema + every semantic rule;
- underlay as a process (``python -m reconciler.validate_cmd``) on A and on B;
- check-jsonschema as a process on B: one run per kind with that kind's schema from
  ``schemas/`` (JSON Schema only, no semantic rules), summed.

Prints a table and the speed-up of underlay over check-jsonschema on the same documents.
Target: underlay at least 2x faster. Exit status 0 when the target is met, 1 when not,
2 when check-jsonschema is missing.
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "schemas"
KIND_SCHEMA = {
    "SpiderIPPool": "spiderpool.spidernet.io_v2beta1_SpiderIPPool.json",
    "SpiderMultusConfig": "spiderpool.spidernet.io_v2beta1_SpiderMultusConfig.json",
    "OvsBridge": "underlay.dev_v1alpha1_OvsBridge.json",
}


def make_documents(n: int) -> list[tuple[str, str]]:
    """``n`` valid documents as (kind, YAML text), cross-references resolvable."""
    n_bridges = max(1, n // 10)
    n_smcs = max(1, (n * 3) // 10)
    n_pools = n - n_bridges - n_smcs
    docs: list[tuple[str, str]] = []
    for j in range(n_bridges):
        docs.append(
            (
                "OvsBridge",
                "apiVersion: underlay.dev/v1alpha1\nkind: OvsBridge\n"
                f"metadata:\n  name: bridge-{j}\n  labels:\n    team: net\n"
                f"spec:\n  bridge: br{j}\n  uplinks: [eth0]\n  moveAddresses: true\n"
                f"  persistence: netplan\n  mtu: 9000\n  nodeSelector:\n    rack: r{j}\n",
            )
        )
    for k in range(n_smcs):
        docs.append(
            (
                "SpiderMultusConfig",
                "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderMultusConfig\n"
                f"metadata:\n  name: smc-{k}\n  namespace: net\n  annotations:\n"
                "    multus.spidernet.io/cni-version: 1.0.0\n"
                f"spec:\n  cniType: ovs\n  ovs:\n    bridge: br{k % n_bridges}\n    vlan: {k % 4094}\n"
                f"    ippools:\n      ipv4: [pool-{k % n_pools}]\n",
            )
        )
    for i in range(n_pools):
        a, b = divmod(i, 256)
        multus = f"  multusName:\n  - net/smc-{i}\n" if i < n_smcs else ""
        docs.append(
            (
                "SpiderIPPool",
                "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\n"
                f"metadata:\n  name: pool-{i}\n"
                f"spec:\n  subnet: 10.{a}.{b}.0/24\n  gateway: 10.{a}.{b}.1\n  ips:\n"
                f'  - "10.{a}.{b}.10-10.{a}.{b}.200"\n  excludeIPs:\n  - 10.{a}.{b}.100\n'
                f"  routes:\n  - dst: 192.168.{b}.0/24\n    gw: 10.{a}.{b}.254\n{multus}",
            )
        )
    random.Random(42).shuffle(docs)
    return docs


def write_layouts(docs: list[tuple[str, str]], files: int, base: Path) -> tuple[Path, Path]:
    grouped, single = base / "grouped", base / "single"
    per_file = -(-len(docs) // files)
    for f in range(files):
        chunk = docs[f * per_file : (f + 1) * per_file]
        if chunk:
            path = grouped / f"d{f // 50:02d}" / f"f{f:04d}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("---\n".join(text for _k, text in chunk))
    for i, (kind, text) in enumerate(docs):
        path = single / kind / f"{i:05d}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return grouped, single


def best_of(repeat: int, fn: Callable[[], None]) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run(cmd: list[str], cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd[:4])}... failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--docs", type=int, default=5000)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="200 documents once, for CI: every step runs, no speed target, check-jsonschema "
        "only when installed",
    )
    a = ap.parse_args(argv)
    if a.smoke:
        a.docs, a.files, a.repeat = 200, 20, 1
    cjs = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    have_cjs = Path(cjs).exists()
    if not have_cjs and not a.smoke:
        print("check-jsonschema is not installed: pip install check-jsonschema", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from reconciler.validation import validate_repo

    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        docs = make_documents(a.docs)
        grouped, single = write_layouts(docs, a.files, Path(tmp))
        n_files = sum(1 for _ in grouped.rglob("*.yaml"))

        def in_process() -> None:
            documents, problems = validate_repo(grouped, strict=True)
            assert len(documents) == a.docs, len(documents)
            assert problems == [], problems[:3]

        in_process()  # warm up: schemas compiled, caches filled
        t_inproc = best_of(a.repeat, in_process)
        cli = [sys.executable, "-m", "reconciler.validate_cmd", "--strict"]
        t_cli_a = best_of(a.repeat, lambda: run([*cli, "--root", str(grouped)], cwd=REPO))
        t_cli_b = best_of(a.repeat, lambda: run([*cli, "--root", str(single)], cwd=REPO))
        rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss

        def check_jsonschema() -> None:
            for kind, schema in KIND_SCHEMA.items():
                files = sorted(str(p) for p in (single / kind).glob("*.yaml"))
                run([cjs, "--schemafile", str(SCHEMAS / schema), *files])

        if not have_cjs:
            print(f"smoke: underlay validated {a.docs} documents in {t_cli_a:.2f} s")
            return 0
        t_cjs = best_of(a.repeat, check_jsonschema)

    rows = [
        (f"underlay validate_repo() in-process, {a.docs} docs in {n_files} files", t_inproc),
        (f"underlay validate (process), {a.docs} docs in {n_files} files", t_cli_a),
        (f"underlay validate (process), {a.docs} files of 1 doc", t_cli_b),
        (f"check-jsonschema (3 processes), {a.docs} files of 1 doc", t_cjs),
    ]
    print(f"{'run':70s} {'seconds':>8s} {'docs/s':>8s}")
    for name, t in rows:
        print(f"{name:70s} {t:8.2f} {a.docs / t:8.0f}")
    print(f"peak RSS of the largest child process: {rss_kib / 1024:.0f} MiB")
    speedup_same = t_cjs / t_cli_b
    speedup_grouped = t_cjs / t_cli_a
    print(f"speed-up over check-jsonschema, same files (B): {speedup_same:.1f}x")
    print(f"speed-up over check-jsonschema, operators' layout (A) vs B: {speedup_grouped:.1f}x")
    print("(underlay also runs every semantic rule; check-jsonschema only the JSON Schemas)")
    return 0 if a.smoke or min(speedup_same, speedup_grouped) >= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
