"""The reconciler's per-file and per-document caches of load, validate and render.

A commit that changes one file must be parsed, checked and rendered for that file only, and
give exactly what a fresh run gives: rules across files still see every document (an overlap
with an unchanged pool, a Multus config that appears or disappears for an unchanged pool's
multusName). Real files and real Git commits; answers compared with uncached runs.
"""

from __future__ import annotations

from pathlib import Path

from reconciler import render
from reconciler.validation import validate_repo
from tests.unit.test_apply import BRIDGE, World, pool, smc


def problems_of(root: Path, cache: dict | None = None) -> list[str]:
    _docs, problems = validate_repo(root, cache=cache)
    return [p.format() for p in problems]


def with_multus_name(text: str, *names: str) -> str:
    return text.rstrip("\n") + "\n  multusName: [" + ", ".join(names) + "]\n"


def test_cached_validation_equals_a_fresh_run_after_every_change(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    files = {
        "bridge.yaml": BRIDGE,
        "a.yaml": with_multus_name(pool("pool-a", 1), "kube-system/net-a"),
        "b.yaml": pool("pool-b", 2),
    }
    for name, text in files.items():
        (root / name).write_text(text)
    cache: dict = {}
    steps = [
        # the pool's multusName names a Multus config that does not exist yet: a warning
        ("nothing changed", {}),
        # the Multus config appears in another file: the unchanged pool's warning goes
        ("add smc.yaml", {"smc.yaml": smc("net-a", "pool-a")}),
        # a new pool overlapping the unchanged pool-b: the rule across files sees both
        ("add c.yaml", {"c.yaml": pool("pool-c", 2, ips="15-25")}),
        ("fix c.yaml", {"c.yaml": pool("pool-c", 3)}),
        # the Multus config leaves: the warning comes back on the unchanged pool
        ("remove smc.yaml", {"smc.yaml": None}),
        ("edit a.yaml", {"a.yaml": with_multus_name(pool("pool-a", 1, ips="10-12"), "net-x")}),
    ]
    seen: list[list[str]] = []
    for what, change in steps:
        for name, text in change.items():
            if text is None:
                (root / name).unlink()
            else:
                (root / name).write_text(text)
        cached, fresh = problems_of(root, cache), problems_of(root)
        assert cached == fresh, what
        seen.append(fresh)
    assert any("no SpiderMultusConfig in the repository renders" in p for p in seen[0])
    assert not any("no SpiderMultusConfig in the repository renders" in p for p in seen[1])
    assert any("overlap" in p for p in seen[2]) and not any("overlap" in p for p in seen[3])
    assert any("no SpiderMultusConfig in the repository renders" in p for p in seen[4])


def test_an_unchanged_file_is_neither_parsed_nor_rendered_again(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "a.yaml").write_text(pool("pool-a", 1))
    (root / "b.yaml").write_text(pool("pool-b", 2) + "---\n" + smc("net-b", "pool-b"))
    cache: dict = {}
    rcache: dict = {}
    docs1, _ = validate_repo(root, cache=cache)
    out1 = render.render(docs1, "underlay", cache=rcache)
    (root / "a.yaml").write_text(pool("pool-a", 1, ips="10-30"))
    docs2, _ = validate_repo(root, cache=cache)
    out2 = render.render(docs2, "underlay", cache=rcache)
    by1 = {(d.path, d.index): d for d in docs1}
    by2 = {(d.path, d.index): d for d in docs2}
    assert by2[("b.yaml", 0)] is by1[("b.yaml", 0)] and by2[("b.yaml", 1)] is by1[("b.yaml", 1)]
    assert by2[("a.yaml", 0)] is not by1[("a.yaml", 0)]
    same = {d.ref(): d for d in out1}
    for d in out2:
        if d.ref() == "SpiderIPPool pool-a":
            assert d is not same[d.ref()] and d.body["spec"]["ips"] == ["10.1.0.10-10.1.0.30"]
        else:
            assert d is same[d.ref()], d.ref()  # pool-b, its Multus config and NAD
    # the caches hold exactly the current files and documents
    assert len(cache["load"]) == 2 and len(rcache) == 3
    assert [d.body for d in out2] == [d.body for d in render.render(docs2, "underlay")]


def test_reconciler_applies_each_commit_as_a_fresh_process_would(world: World) -> None:
    world.commit({"bridge.yaml": BRIDGE, "a.yaml": pool("pool-a", 1), "s.yaml": smc("s", "pool-a")})
    rec = world.reconciler()
    assert rec.run_once().converged
    # an invalid commit across files (overlap with the unchanged pool-a) is caught
    world.commit({"b.yaml": pool("pool-b", 1, ips="15-25")})
    rep = rec.run_once()
    assert rep.reason == "ValidationFailed", rep.error
    assert rep.rendered is not None and any("overlap" in p.format() for p in rep.rendered.errors)
    world.commit({"b.yaml": pool("pool-b", 2)})
    rep = rec.run_once()
    assert rep.converged and [a.ref() for a in rep.outcome.done] == ["SpiderIPPool pool-b"]  # type: ignore[union-attr]
    fresh = world.reconciler().run_once()
    assert fresh.outcome is None and fresh.converged
    assert rep.plan is not None and fresh.plan is not None
    assert {a.ref() for a in fresh.plan.actions} == {a.ref() for a in rep.plan.actions}
    assert {a.op.value for a in fresh.plan.actions} == {"unchanged"}
