"""Loader: documents, marks, and every loading rule with its exact file:line:column and message.

Real files in temporary directories (symlinks, FIFOs, large and non-UTF-8 files included).
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from reconciler import vocab
from reconciler.loader import (
    Document,
    Problem,
    dump_yaml,
    format_path,
    load_repo,
    load_text,
)

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart"

POOL = """\
apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata:
  name: ippool-test
spec:
  ips:
  - "172.18.30.131-172.18.30.140"
  subnet: 172.18.0.0/16
  gateway: 172.18.0.1
  multusName:
  - kube-system/ovs-conf
"""


def lines(problems: list[Problem]) -> list[str]:
    return [p.format() for p in sorted(problems, key=Problem.sort_key)]


def write(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)


# --- documents and marks ----------------------------------------------------------------------


def test_quickstart_documents() -> None:
    res = load_repo(QUICKSTART)
    assert res.problems == []
    assert res.files == ["ippool.yaml", "multusconfig.yaml", "ovsbridge.yaml"]
    by_kind = {d.kind: d for d in res.documents}
    pool = by_kind["SpiderIPPool"]
    assert (pool.path, pool.index, pool.name, pool.namespace) == (
        "ippool.yaml",
        0,
        "ippool-test",
        None,
    )
    assert pool.api_version == "spiderpool.spidernet.io/v2beta1"
    assert pool.resource is vocab.SPIDER_IPPOOL
    smc = by_kind["SpiderMultusConfig"]
    assert (smc.name, smc.namespace) == ("ovs-conf", "kube-system")
    assert smc.obj["spec"] == {"cniType": "ovs", "ovs": {"bridge": "br1"}}
    br = by_kind["OvsBridge"]
    assert br.obj["spec"] == {"uplinks": ["eth0"], "moveAddresses": True, "persistence": "netplan"}
    assert br.namespace is None


def test_marks_point_at_values_and_keys() -> None:
    doc = load_text(POOL, "p.yaml").documents[0]
    assert doc.mark(()) == (1, 1)
    assert doc.mark(("spec", "subnet")) == (8, 11)
    assert doc.key_mark(("spec", "subnet")) == (8, 3)
    assert doc.mark(("spec", "ips", 0)) == (7, 5)
    assert doc.mark(("spec", "multusName", 0)) == (11, 5)
    assert doc.key_mark(("spec", "ips", 0)) == (7, 5)
    # a missing node falls back to its nearest existing parent
    assert doc.mark(("spec", "routes", 0, "gw")) == doc.mark(("spec",)) == (6, 3)
    assert doc.key_mark(("spec", "routes")) == (5, 1)
    assert doc.get(("spec", "ips", 0)) == "172.18.30.131-172.18.30.140"
    assert doc.get(("spec", "ips", 5), "none") == "none"


def test_several_documents_per_file_and_empty_documents() -> None:
    text = (
        "---\n# nothing here\n---\n" + POOL + "---\n---\n" + POOL.replace("ippool-test", "second")
    )
    res = load_text(text, "multi.yaml")
    assert res.problems == []
    assert [(d.index, d.name, d.mark(())) for d in res.documents] == [
        (1, "ippool-test", (4, 1)),
        (3, "second", (17, 1)),
    ]


@pytest.mark.parametrize(
    "text", ["", "\n\n", "# only a comment\n", "---\n", "--- # c\n...\n", "~\n"]
)
def test_empty_and_comment_only_files_are_fine(text: str) -> None:
    res = load_text(text, "empty.yaml")
    assert (res.documents, res.problems) == ([], [])


def test_yaml_11_scalars_resolve_as_kubernetes_reads_them() -> None:
    text = POOL + "  default: yes\n  ipVersion: 0x4\n  disable: off\n"
    spec = load_text(text, "p.yaml").documents[0].obj["spec"]
    assert (spec["default"], spec["ipVersion"], spec["disable"]) == (True, 4, False)


def test_timestamps_stay_strings_and_bom_is_skipped() -> None:
    text = "\ufeff" + POOL + "  nodeName: [2024-01-01]\n"
    doc = load_text(text.encode("utf-8"), "p.yaml").documents[0]
    assert doc.obj["spec"]["nodeName"] == ["2024-01-01"]


def test_merge_keys_are_honoured_with_marks() -> None:
    text = (
        "base: &b {apiVersion: underlay.dev/v1alpha1, kind: OvsBridge}\n"
        "---\n"
        "<<: {apiVersion: underlay.dev/v1alpha1, kind: OvsBridge}\n"
        "metadata: {name: br1}\n"
        "spec:\n"
        "  <<: &common {uplinks: [eth0], mtu: 1500}\n"
        "  mtu: 9000\n"
    )
    res = load_text(text, "m.yaml")
    assert lines(res.problems) == [
        "m.yaml:1:1: error: document has no apiVersion "
        "(add apiVersion: spiderpool.spidernet.io/v2beta1 or underlay.dev/v1alpha1)",
        "m.yaml:1:1: error: document has no kind (add kind: one of OvsBridge, SpiderIPPool, "
        "SpiderMultusConfig)",
    ]
    doc = res.documents[0]
    assert doc.obj == {
        "apiVersion": "underlay.dev/v1alpha1",
        "kind": "OvsBridge",
        "metadata": {"name": "br1"},
        "spec": {"mtu": 9000, "uplinks": ["eth0"]},
    }
    assert doc.mark(("spec", "mtu")) == (7, 8)  # the explicit key wins
    assert doc.mark(("spec", "uplinks", 0)) == (6, 26)  # merged from the anchor


def test_namespace_defaults_to_default_in_document_and_object() -> None:
    text = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderMultusConfig\nmetadata:\n  name: c\n"
    doc = load_text(text, "m.yaml").documents[0]
    assert (doc.namespace, doc.namespace_defaulted) == ("default", True)
    assert doc.obj["metadata"]["namespace"] == "default"
    assert doc.ref() == "SpiderMultusConfig default/c"


def test_format_path() -> None:
    assert format_path(("spec", "ips", 0)) == "spec.ips[0]"
    assert format_path(("spec", "routes", 1, "gw")) == "spec.routes[1].gw"
    assert (
        format_path(("metadata", "annotations", "multus.spidernet.io/cr-name"))
        == 'metadata.annotations["multus.spidernet.io/cr-name"]'
    )
    assert format_path(()) == ""


def test_problem_format_and_dict() -> None:
    p = Problem(
        severity="error",
        file="examples/x.yaml",
        line=7,
        column=5,
        kind="SpiderIPPool",
        name="ippool-test",
        field="spec.subnet",
        message="bad",
        hint="write 172.18.0.0/16",
        rule="subnet-not-canonical",
    )
    assert p.format() == (
        "examples/x.yaml:7:5: error: SpiderIPPool ippool-test spec.subnet: bad (write 172.18.0.0/16)"
    )
    assert p.to_dict()["rule"] == "subnet-not-canonical"
    assert p.as_error() is p
    w = Problem(severity="warning", file="a.yaml", message="m", rule="r")
    assert w.format() == "a.yaml:1:1: warning: m"
    assert w.as_error().severity == "error"


# --- loading rules ------------------------------------------------------------------------------


def test_yaml_syntax_error_has_file_line_column() -> None:
    res = load_text(POOL + "  routes: [{dst: 10.0.0.0/8, gw: 172.18.0.1}\n", "bad.yaml")
    assert lines(res.problems) == [
        "bad.yaml:13:1: error: YAML syntax error: did not find expected ',' or ']', while parsing "
        "a flow sequence at line 12, column 11 "
        "(separate the items with commas and close the bracket the message points at)"
    ]
    assert res.documents == []


def test_a_key_indented_too_deep_or_without_a_space_gets_a_hint_that_says_so() -> None:
    head = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata:\n  name: p\n"
    deep = load_text(head + "spec:\n  subnet: 10.3.0.0/24\n   gateway: 10.3.0.1\n", "a.yaml")
    assert lines(deep.problems) == [
        "a.yaml:7:11: error: YAML syntax error: mapping values are not allowed in this context "
        "(this key is indented 3 spaces, deeper than the key on line 6 (2 spaces), so YAML reads "
        "it as part of that value: indent it 2 spaces like its neighbour, or quote the value if "
        "it contains ': ')"
    ]
    glued = load_text(
        head + "spec:\n  subnet: 10.4.0.0/24\n  gateway:10.4.0.1\n  ips: []\n", "b.yaml"
    )
    assert lines(glued.problems) == [
        "b.yaml:8:3: error: YAML syntax error: could not find expected ':', while scanning a "
        'simple key at line 7, column 3 (line 7 has no ": " after its key: write a space after '
        'the colon ("gateway: 172.18.0.1"), or quote the value if it is not a key)'
    ]


def test_syntax_error_keeps_earlier_documents() -> None:
    res = load_text(POOL + "---\nkind: [\n", "bad.yaml")
    assert [d.name for d in res.documents] == ["ippool-test"]
    assert [p.rule for p in res.problems] == ["yaml-syntax"]


def test_tab_indentation_is_a_syntax_error() -> None:
    res = load_text("apiVersion: v1\nkind:\n\tx: 1\n", "tab.yaml")
    assert lines(res.problems) == [
        "tab.yaml:3:1: error: YAML syntax error: found character that cannot start any token, "
        "while scanning for the next token at line 3, column 1 "
        "(indent with spaces: YAML does not allow tabs for indentation)"
    ]


def test_control_character_is_refused() -> None:
    res = load_text("apiVersion: v1\nkind: \x07\n", "ctl.yaml")
    assert lines(res.problems) == [
        "ctl.yaml:2:7: error: YAML syntax error: character U+0007 is not allowed (control "
        "characters are not allowed) (remove the control character)"
    ]


def test_duplicate_key() -> None:
    res = load_text(POOL + "  subnet: 10.0.0.0/8\n", "dup.yaml")
    assert lines(res.problems) == [
        'dup.yaml:12:3: error: SpiderIPPool ippool-test spec.subnet: duplicate key "subnet" (first '
        "at line 8, column 3) (keep one of them)"
    ]
    assert res.documents[0].obj["spec"]["subnet"] == "172.18.0.0/16"  # the first is kept


def billion_laughs(levels: int = 9) -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    prev = "a"
    for i in range(1, levels + 1):
        name = chr(ord("a") + i)
        text += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
        prev = name
    return text


def test_alias_bomb_fails_fast_without_memory_blowup() -> None:
    tracemalloc.start()
    try:
        res = load_text(billion_laughs(), "lol.yaml")
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines(res.problems) == [
        "lol.yaml:1:50: error: expanding the aliases of this file builds more than 50000 YAML "
        "nodes; refusing to load it (an alias bomb?) (write the repeated parts out, or split the "
        "file)"
    ]
    assert peak < 64 * 1024 * 1024  # 9**10 nodes would need hundreds of GiB
    assert res.documents == []


def test_small_aliases_are_fine() -> None:
    text = (
        "apiVersion: underlay.dev/v1alpha1\nkind: OvsBridge\nmetadata: {name: br1}\n"
        "spec:\n  uplinks: &u [eth0]\n  nodeOverrides:\n  - {nodeName: n1, uplinks: *u}\n"
    )
    res = load_text(text, "a.yaml")
    assert res.problems == []
    assert res.documents[0].obj["spec"]["nodeOverrides"][0]["uplinks"] == ["eth0"]


def test_node_limit() -> None:
    text = "items: [" + ",".join("1" for _ in range(200)) + "]\n"
    res = load_text(text, "big.yaml", max_nodes=100)
    assert lines(res.problems) == [
        "big.yaml:1:205: error: file has more than 100 YAML nodes; refusing to load it (split "
        "the file)"
    ]


def test_recursive_alias() -> None:
    res = load_text("a: &x [1, *x]\n", "rec.yaml")
    assert lines(res.problems) == [
        "rec.yaml:1:4: error: an alias refers to a node that contains it (recursive alias) "
        "(remove the self-reference)"
    ]


def test_nesting_limit() -> None:
    res = load_text("a: " + "[" * 80 + "]" * 80 + "\n", "deep.yaml")
    assert lines(res.problems) == [
        "deep.yaml:1:67: error: nesting deeper than 64 levels; refusing to load it"
    ]
    res = load_text("[" * 5000, "deeper.yaml")  # libyaml's own limit, no recursion in Python
    assert [p.rule for p in res.problems] == ["yaml-syntax"]


def test_unsupported_tag_and_non_string_key() -> None:
    text = POOL + "  disable: !!binary aGVsbG8=\n  yes: true\n  ? [a, b]\n  : c\n"
    res = load_text(text, "t.yaml")
    assert lines(res.problems) == [
        "t.yaml:12:12: error: SpiderIPPool ippool-test: YAML tag tag:yaml.org,2002:binary is not "
        "supported in Kubernetes documents (remove the tag)",
        "t.yaml:13:3: error: SpiderIPPool ippool-test: mapping key 'yes' is read as bool, not as "
        'a string (quote it: "yes":)',
        "t.yaml:14:5: error: SpiderIPPool ippool-test: mapping keys must be plain strings (write "
        "the key as a string)",
    ]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("9" * 4301, "9999999999...999999 (4301 characters)"),  # int() refuses > 4300 digits
        ("9" * 100_000, "9999999999...999999 (100000 characters)"),
        ("9007199254740992", "9007199254740992"),  # 2^53: the first integer JSON reads wrongly
        ("-9007199254740992", "-9007199254740992"),
        ("0x20000000000000", "0x20000000000000"),
        ("1" + ":59" * 12, "1:59:59:59...:59:59 (37 characters)"),  # sexagesimal, YAML 1.1
    ],
)
def test_integers_beyond_2_53_are_problems_not_crashes(value: str, shown: str) -> None:
    res = load_text(POOL + f"  x: {value}\n", "big.yaml")
    assert lines(res.problems) == [
        f"big.yaml:12:6: error: SpiderIPPool ippool-test spec.x: integer {shown} is out of range: "
        "Kubernetes clients read integers exactly only up to 2^53-1 (9007199254740991) in "
        "magnitude (write a number within the field's range)"
    ]
    assert res.documents[0].obj["spec"]["x"] is None  # dropped, never half-converted


def test_numbers_that_fit_and_int_lookalikes_load() -> None:
    text = (
        POOL + "  a: 9007199254740991\n  b: -0x1F\n  c: 1_000\n  d: 0b_\n  e: 0o17\n  f: 1.5e+3\n"
    )
    res = load_text(text, "n.yaml")
    assert res.problems == []
    spec = res.documents[0].obj["spec"]
    # go-yaml (YAML 1.1) keeps a scalar it cannot convert as a string: so do we ("0b_")
    assert [spec[k] for k in "abcdef"] == [2**53 - 1, -31, 1000, "0b_", "0o17", 1500.0]


@pytest.mark.parametrize("value", [".inf", "-.Inf", ".nan", "1.0e+999"])
def test_non_finite_numbers_are_problems(value: str) -> None:
    res = load_text(POOL + f"  x: {value}\n", "f.yaml")
    assert lines(res.problems) == [
        f"f.yaml:12:6: error: SpiderIPPool ippool-test spec.x: number {value} is not finite: JSON "
        "and Kubernetes cannot store infinity or NaN (write a finite number)"
    ]


def test_not_utf8(tmp_path: Path) -> None:
    write(tmp_path, {"latin1.yaml": "apiVersion: v1\nkind: Pod\n# caf\xe9\n".encode("latin-1")})
    res = load_repo(tmp_path)
    assert lines(res.problems) == [
        "latin1.yaml:3:6: error: file is not valid UTF-8 (byte 0xe9 at offset 30) (save the file "
        "as UTF-8)"
    ]


def test_document_not_mapping() -> None:
    res = load_text("- a\n- b\n---\njust text\n", "list.yaml")
    assert lines(res.problems) == [
        "list.yaml:1:1: error: document 0 is a list, not a Kubernetes object (write a mapping "
        "with apiVersion, kind, metadata and spec)",
        "list.yaml:4:1: error: document 1 is a str scalar, not a Kubernetes object (write a "
        "mapping with apiVersion, kind, metadata and spec)",
    ]


def test_missing_apiversion_and_kind() -> None:
    res = load_text("metadata:\n  name: x\n---\napiVersion: 3\nkind: ''\n", "m.yaml")
    assert lines(res.problems) == [
        "m.yaml:1:1: error: document has no apiVersion (add apiVersion: "
        "spiderpool.spidernet.io/v2beta1 or underlay.dev/v1alpha1)",
        "m.yaml:1:1: error: document has no kind (add kind: one of OvsBridge, SpiderIPPool, "
        "SpiderMultusConfig)",
        "m.yaml:4:1: error: apiVersion: apiVersion must be a non-empty string (add apiVersion: "
        "spiderpool.spidernet.io/v2beta1 or underlay.dev/v1alpha1)",
        "m.yaml:5:1: error: kind: kind must be a non-empty string (add kind: one of OvsBridge, "
        "SpiderIPPool, SpiderMultusConfig)",
    ]


DEPLOYMENT = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n"


def test_unknown_kind_and_ignore_flag() -> None:
    res = load_text(DEPLOYMENT, "d.yaml")
    assert lines(res.problems) == [
        "d.yaml:2:1: error: Deployment kind: unknown kind Deployment (apps/v1); underlay reads "
        "OvsBridge (underlay.dev/v1alpha1); SpiderIPPool, SpiderMultusConfig "
        "(spiderpool.spidernet.io/v2beta1) (pass --ignore-unknown-kinds to skip kinds underlay "
        "does not manage)"
    ]
    assert load_text(DEPLOYMENT, "d.yaml", ignore_unknown_kinds=True).problems == []


def test_misspelt_kind_of_our_groups_is_reported_even_when_ignoring_unknown_kinds() -> None:
    text = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIpPool\nmetadata:\n  name: p\n"
    res = load_text(text, "p.yaml", ignore_unknown_kinds=True)
    assert lines(res.problems) == [
        "p.yaml:2:1: error: SpiderIpPool kind: unknown kind SpiderIpPool "
        "(spiderpool.spidernet.io/v2beta1); underlay reads OvsBridge (underlay.dev/v1alpha1); "
        "SpiderIPPool, SpiderMultusConfig (spiderpool.spidernet.io/v2beta1) (did you mean kind: "
        "SpiderIPPool?)"
    ]


def test_status_kinds_do_not_belong_in_git() -> None:
    text = (
        "apiVersion: underlay.dev/v1alpha1\nkind: OvsBridgeEnactment\nmetadata:\n  name: n1.br1\n"
    )
    res = load_text(text, "e.yaml")
    assert lines(res.problems) == [
        "e.yaml:2:1: error: OvsBridgeEnactment kind: OvsBridgeEnactment does not belong in Git: "
        "the node agent writes it for each node and bridge (remove this document)"
    ]
    assert load_text(text, "e.yaml", ignore_unknown_kinds=True).problems == []


def test_wrong_apiversion_is_never_skipped() -> None:
    text = "apiVersion: spiderpool.spidernet.io/v2beta2\nkind: SpiderIPPool\nmetadata:\n  name: p\n"
    for ignore in (False, True):
        res = load_text(text, "p.yaml", ignore_unknown_kinds=ignore)
        assert lines(res.problems) == [
            "p.yaml:1:1: error: SpiderIPPool apiVersion: SpiderIPPool is read as apiVersion "
            "spiderpool.spidernet.io/v2beta1, not spiderpool.spidernet.io/v2beta2 (apiVersion: "
            "spiderpool.spidernet.io/v2beta1)"
        ]


# --- the repository walk ----------------------------------------------------------------------


def test_walk_finds_yaml_and_yml_sorted_and_skips_hidden(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "b/pool.yml": POOL.replace("ippool-test", "b"),
            "a.yaml": POOL.replace("ippool-test", "a"),
            ".github/workflows/ci.yaml": "on: push\n",
            ".hidden.yaml": "x: [",
            "notes.txt": "not yaml",
            "c/README.md": "# hi",
        },
    )
    res = load_repo(tmp_path)
    assert res.problems == []
    assert res.files == ["a.yaml", "b/pool.yml"]
    assert [d.name for d in res.documents] == ["a", "b"]


def test_explicit_paths_relative_to_root_any_suffix(tmp_path: Path) -> None:
    write(tmp_path, {"x/pool.txt": POOL, "y/other.yaml": POOL.replace("ippool-test", "o")})
    res = load_repo(tmp_path, [Path("x/pool.txt")])
    assert [(d.path, d.name) for d in res.documents] == [("x/pool.txt", "ippool-test")]
    res = load_repo(tmp_path, [tmp_path / "y"])
    assert [(d.path, d.name) for d in res.documents] == [("y/other.yaml", "o")]


def test_path_not_found_and_outside_root(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "elsewhere.yaml").write_text(POOL)
    res = load_repo(tmp_path / "repo", [Path("missing.yaml"), tmp_path / "elsewhere.yaml"])
    assert lines(res.problems) == [
        f"{(tmp_path / 'elsewhere.yaml').as_posix()}:1:1: error: path is outside the repository "
        f"root {(tmp_path / 'repo').as_posix()} (pass paths inside the root, or set the root)",
        "missing.yaml:1:1: error: no such file or directory",
    ]
    assert res.documents == []


def test_symlinks_leaving_the_root_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside, {"secret.yaml": POOL, "dir/pool.yaml": POOL})
    repo = tmp_path / "repo"
    write(repo, {"inside.yaml": POOL.replace("ippool-test", "inside")})
    (repo / "leak.yaml").symlink_to(outside / "secret.yaml")
    (repo / "leakdir").symlink_to(outside / "dir")
    (repo / "rel.yaml").symlink_to("../outside/secret.yaml")
    (repo / "ok.yaml").symlink_to("inside.yaml")
    res = load_repo(repo)
    assert lines(res.problems) == [
        "leak.yaml:1:1: error: symlink points outside the repository; refusing to follow it "
        "(commit the file itself)",
        "leakdir:1:1: error: symlink points outside the repository; refusing to follow it (commit "
        "the file itself)",
        "rel.yaml:1:1: error: symlink points outside the repository; refusing to follow it "
        "(commit the file itself)",
    ]
    assert [(d.path, d.name) for d in res.documents] == [
        ("inside.yaml", "inside"),
        ("ok.yaml", "inside"),
    ]
    res = load_repo(repo, [Path("leak.yaml")])
    assert lines(res.problems) == [
        "leak.yaml:1:1: error: path resolves outside the repository (symlink); refusing to follow "
        "it (commit the file itself)"
    ]


def test_symlink_loops_and_broken_links_do_not_hang(tmp_path: Path) -> None:
    write(tmp_path, {"d/pool.yaml": POOL})
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")
    (tmp_path / "broken.yaml").symlink_to(tmp_path / "nowhere.yaml")
    res = load_repo(tmp_path)
    assert lines(res.problems) == ["broken.yaml:1:1: error: broken symlink"]
    assert [d.path for d in res.documents] == ["d/pool.yaml"]


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.yaml")
    res = load_repo(tmp_path)
    assert lines(res.problems) == [
        "pipe.yaml:1:1: error: not a regular file (FIFO, socket or device)"
    ]


def test_file_size_limit(tmp_path: Path) -> None:
    write(
        tmp_path,
        {"big.yaml": POOL + "#" * 2000 + "\n", "small.yaml": POOL.replace("ippool-test", "s")},
    )
    size = (tmp_path / "big.yaml").stat().st_size
    res = load_repo(tmp_path, max_file_bytes=1024)
    assert lines(res.problems) == [
        f"big.yaml:1:1: error: file is {size} bytes, over the 1024-byte limit; not read (split it "
        "into smaller files)"
    ]
    assert [d.name for d in res.documents] == ["s"]


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        load_repo(tmp_path / "nope")


def test_dump_yaml_round_trip() -> None:
    doc = load_text(POOL, "p.yaml").documents[0]
    text = dump_yaml([doc.obj, doc.obj])
    again = load_text(text, "again.yaml").documents
    assert [d.obj for d in again] == [doc.obj, doc.obj]
    assert isinstance(again[0], Document)
