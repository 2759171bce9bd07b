"""``underlay validate`` as CI runs it: output formats, colour, exit codes.

The command runs as a real process (``python -m reconciler.validate_cmd`` and through the
``underlay`` CLI), on repositories written to temporary directories.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pty
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from reconciler import validate_cmd
from reconciler.rules import RULES

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart"

BAD_POOL = """\
apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata:
  name: ippool-test
spec:
  subnet: 172.18.0.1/16
  gatway: 172.18.0.1
  multusName: [kube-system/ovs-conf]
"""

WARN_ONLY = """\
apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata:
  name: p1
spec:
  subnet: 172.18.0.0/16
  multusName: [kube-system/ovs-conf]
"""

EXPECTED_TEXT = [
    'pools.yaml:6:11: error: SpiderIPPool ippool-test spec.subnet: "172.18.0.1/16" is not a '
    "canonical CIDR: host bits are set (write 172.18.0.0/16)",
    'pools.yaml:7:3: error: SpiderIPPool ippool-test spec.gatway: unknown field "gatway" (did '
    "you mean gateway?)",
    "pools.yaml:8:16: warning: SpiderIPPool ippool-test spec.multusName[0]: no "
    "SpiderMultusConfig in the repository renders kube-system/ovs-conf (check the name; fine if "
    "that Multus config is managed outside Git)",
    "2 errors, 1 warning in 1 file (1 document)",
]


ROOT = Path(__file__).resolve().parents[2]


def validate(
    cwd: Path,
    *args: str,
    env: dict[str, str] | None = None,
    module: str = "reconciler.validate_cmd",
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    full_env.update(env or {})
    cmd = [sys.executable, "-m", module] + (["validate"] if module == "reconciler.cli" else [])
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def bad_repo(tmp_path: Path) -> Path:
    (tmp_path / "pools.yaml").write_text(BAD_POOL)
    return tmp_path


def test_text_output_and_exit_code(bad_repo: Path) -> None:
    r = validate(bad_repo)
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == EXPECTED_TEXT
    assert "\033[" not in r.stdout  # not a terminal: no colour


def test_clean_repository_exits_0() -> None:
    r = validate(QUICKSTART, "--strict")
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok: 3 documents in 3 files\n", "")


def test_paths_relative_to_cwd_and_root(tmp_path: Path) -> None:
    """Only the files named are read: the pool's Multus config is then not seen (a warning),
    and the message says so: "in the files checked", not "in the repository"."""
    r = validate(tmp_path, "--root", str(QUICKSTART), str(QUICKSTART / "ippool.yaml"))
    assert r.returncode == 0
    assert r.stdout.splitlines() == [
        "ippool.yaml:13:5: warning: SpiderIPPool ippool-test spec.multusName[0]: no "
        "SpiderMultusConfig in the files checked renders kube-system/ovs-conf (check the name; "
        "fine if that Multus config is managed outside Git or defined in a file not checked "
        "here: a pre-commit hook passes only the changed files, so CI should check the whole "
        "repository)",
        "1 warning in 1 file (1 document)",
    ]
    # the whole repository, named as a path or as the root: "in the repository"
    for args in (["--root", str(QUICKSTART), str(QUICKSTART)], ["--root", str(QUICKSTART)]):
        r = validate(tmp_path, *args)
        assert (r.returncode, r.stdout) == (0, "ok: 3 documents in 3 files\n")
    only_pool = tmp_path / "only-pool"
    only_pool.mkdir()
    (only_pool / "ippool.yaml").write_text((QUICKSTART / "ippool.yaml").read_text())
    r = validate(only_pool, ".")
    assert "no SpiderMultusConfig in the repository renders kube-system/ovs-conf" in r.stdout


def test_warnings_pass_unless_strict(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(WARN_ONLY)
    r = validate(tmp_path)
    assert r.returncode == 0
    assert r.stdout.splitlines()[-1] == "1 warning in 1 file (1 document)"
    r = validate(tmp_path, "--strict")
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        "p.yaml:7:16: error: SpiderIPPool p1 spec.multusName[0]: no SpiderMultusConfig in the "
        "repository renders kube-system/ovs-conf (check the name; fine if that Multus config is "
        "managed outside Git)",
        "1 error in 1 file (1 document)",
    ]


def test_a_directory_without_yaml_is_said_and_fails_under_strict(tmp_path: Path) -> None:
    """CI pointed at the wrong directory must not pass unnoticed."""
    (tmp_path / "README.md").write_text("no YAML here\n")
    r = validate(tmp_path, ".")
    assert (r.returncode, r.stdout) == (0, "ok: 0 documents in 0 files\n")
    assert r.stderr == (
        "underlay validate: warning: no .yaml/.yml files under . (an error under --strict)\n"
    )
    r = validate(tmp_path, "--strict", ".")
    assert r.returncode == 1
    assert r.stderr == "underlay validate: error: no .yaml/.yml files under .\n"


def test_unknown_kinds_flag(tmp_path: Path) -> None:
    (tmp_path / "app.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n")
    assert validate(tmp_path).returncode == 1
    r = validate(tmp_path, "--ignore-unknown-kinds")
    assert (r.returncode, r.stdout) == (0, "ok: 0 documents in 1 file\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.yaml"], "underlay validate: error: missing.yaml: no such file or directory\n"),
        (["--root", "nope"], "underlay validate: error: root nope is not a directory\n"),
        (
            ["--max-file-bytes", "0"],
            "underlay validate: error: --max-file-bytes must be positive\n",
        ),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    r = validate(tmp_path, *args)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", message)


def test_path_outside_the_root_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "other").mkdir()
    r = validate(tmp_path / "repo", "--root", ".", str(tmp_path / "other"))
    assert (r.returncode, r.stdout) == (2, "")
    assert (
        r.stderr
        == f"underlay validate: error: {tmp_path / 'other'} is outside the root . (--root)\n"
    )


def test_paths_outside_the_current_directory_are_validated_from_their_common_parent(
    tmp_path: Path,
) -> None:
    net = tmp_path / "net"
    net.mkdir()
    for f in (ROOT / "examples" / "quickstart").glob("*.yaml"):
        (net / f.name).write_text(f.read_text())
    (tmp_path / "elsewhere").mkdir()
    r = validate(tmp_path / "elsewhere", str(net))
    assert (r.returncode, r.stdout) == (0, "ok: 3 documents in 3 files\n")


def test_bad_option_exits_2(tmp_path: Path) -> None:
    r = validate(tmp_path, "--format", "xml")
    assert r.returncode == 2
    assert "invalid choice: 'xml'" in r.stderr


def test_register_adds_the_subcommand(bad_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What reconciler/cli.py does: register() on its subparsers, then args.func(args)."""
    parser = argparse.ArgumentParser(prog="underlay")
    sub = parser.add_subparsers(dest="command", required=True)
    validate_cmd.register(sub)
    args = parser.parse_args(["validate", "--format", "json", "--root", str(bad_repo)])
    monkeypatch.chdir(bad_repo)
    out, err = io.StringIO(), io.StringIO()
    assert args.func(args, out, err) == 1
    assert json.loads(out.getvalue())["summary"]["errors"] == 2
    assert err.getvalue() == ""


def test_json_format(bad_repo: Path) -> None:
    r = validate(bad_repo, "--format", "json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["version"] == 1
    assert doc["summary"] == {
        "files": 1,
        "documents": 1,
        "errors": 2,
        "warnings": 1,
        "strict": False,
    }
    assert doc["problems"][0] == {
        "severity": "error",
        "file": "pools.yaml",
        "line": 6,
        "column": 11,
        "kind": "SpiderIPPool",
        "namespace": None,
        "name": "ippool-test",
        "field": "spec.subnet",
        "message": '"172.18.0.1/16" is not a canonical CIDR: host bits are set',
        "hint": "write 172.18.0.0/16",
        "rule": "subnet-not-canonical",
    }
    assert [p["rule"] for p in doc["problems"]] == [
        "subnet-not-canonical",
        "unknown-field",
        "multus-config-not-found",
    ]


def test_github_format_escapes_properties(tmp_path: Path) -> None:
    (tmp_path / "a,b:c.yaml").write_text(BAD_POOL)
    r = validate(tmp_path, "--format", "github")
    assert r.returncode == 1
    out = r.stdout.splitlines()
    assert out[0] == (
        "::error file=a%2Cb%3Ac.yaml,line=6,col=11,title=underlay validate%3A subnet-not-canonical::"
        'SpiderIPPool ippool-test spec.subnet: "172.18.0.1/16" is not a canonical CIDR: host bits '
        "are set (write 172.18.0.0/16)"
    )
    assert out[2].startswith(
        "::warning file=a%2Cb%3Ac.yaml,line=8,col=16,title=underlay validate%3A "
        "multus-config-not-found::"
    )
    assert out[3] == "2 errors, 1 warning in 1 file (1 document)"


HOSTILE_POOL = """\
apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata:
  name: "p\\e[31mRED\\e[0m\\u202e"
spec:
  subnet: 10.0.0.0/8
"""


@pytest.fixture
def hostile_repo(tmp_path: Path) -> Path:
    """A file name with a newline and a fake workflow command, an object name with ANSI escape
    sequences and a right-to-left override (YAML double-quoted escapes \\e and \\u202e)."""
    (tmp_path / "a\n::error file=evil.yaml::pwned\n.yaml").write_text(HOSTILE_POOL)
    (tmp_path / "\x1b[31mred.yaml").write_text(HOSTILE_POOL.replace('"p', '"q'))
    return tmp_path


def test_control_characters_in_names_are_escaped_in_text(hostile_repo: Path) -> None:
    r = validate(hostile_repo)
    assert r.returncode == 1
    escaped = "p\\x1b[31mRED\\x1b[0m\\u202e"
    # sorted by file name: ESC (0x1b) before "a"
    assert r.stdout.splitlines() == [
        f"\\x1b[31mred.yaml:4:9: error: SpiderIPPool q{escaped[1:]} metadata.name: name "
        f'"q{escaped[1:]}" is not a DNS-1123 subdomain: it may only hold lower-case letters, '
        "digits, '-' and '.', starting and ending with a letter or digit (write q-31mred-0m)",
        f"a\\n::error file=evil.yaml::pwned\\n.yaml:4:9: error: SpiderIPPool {escaped} "
        f'metadata.name: name "{escaped}" is not a DNS-1123 subdomain: it may only hold lower-case '
        "letters, digits, '-' and '.', starting and ending with a letter or digit (write "
        "p-31mred-0m)",
        "2 errors in 2 files (2 documents)",
    ]
    # on a terminal too: our own colour codes only, the names' escaped
    tty = run_on_tty(hostile_repo, {})
    assert "\x1b[31mRED" not in tty and "\u202e" not in tty and "\\x1b[31mRED" in tty


def test_control_characters_are_escaped_in_github_and_junit(hostile_repo: Path) -> None:
    gh = validate(hostile_repo, "--format", "github").stdout
    assert "\x1b" not in gh and "\u202e" not in gh
    assert gh.splitlines()[1].startswith(
        "::error file=a\\n%3A%3Aerror file=evil.yaml%3A%3Apwned\\n.yaml,line=4,col=9,"
    )
    assert len(gh.splitlines()) == 3  # two annotations and the summary: nothing forged
    junit = validate(hostile_repo, "--format", "junit").stdout
    root = ET.fromstring(junit)  # XML 1.0 cannot hold ESC: it must be escaped to parse
    assert {c.get("name") for c in root.iter("testcase")} == {
        "a\\n::error file=evil.yaml::pwned\\n.yaml",
        "\\x1b[31mred.yaml",
    }
    # JSON and SARIF escape by themselves and keep the names exact
    doc = json.loads(validate(hostile_repo, "--format", "json").stdout)
    assert {p["name"] for p in doc["problems"]} == {
        "p\x1b[31mRED\x1b[0m\u202e",
        "q\x1b[31mRED\x1b[0m\u202e",
    }


def test_junit_format(bad_repo: Path) -> None:
    (bad_repo / "good.yaml").write_text((QUICKSTART / "ovsbridge.yaml").read_text())
    r = validate(bad_repo, "--format", "junit")
    assert r.returncode == 1
    root = ET.fromstring(r.stdout)
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures")) == ("2", "1")
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {"good.yaml", "pools.yaml"}
    assert cases["good.yaml"].find("failure") is None
    failure = cases["pools.yaml"].find("failure")
    assert failure is not None
    assert failure.get("type") == "subnet-not-canonical"
    assert failure.get("message") == (
        '2 errors: "172.18.0.1/16" is not a canonical CIDR: host bits are set'
    )
    assert (failure.text or "").splitlines() == EXPECTED_TEXT[:3]


def test_sarif_format(bad_repo: Path) -> None:
    r = validate(bad_repo, "--format", "sarif")
    assert r.returncode == 1
    log = json.loads(r.stdout)
    assert log["version"] == "2.1.0"
    assert log["$schema"].endswith("sarif-2.1.0.json")
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "underlay validate"
    assert [rule["id"] for rule in driver["rules"]] == list(RULES)
    results = run["results"]
    assert [(res["ruleId"], res["level"]) for res in results] == [
        ("subnet-not-canonical", "error"),
        ("unknown-field", "error"),
        ("multus-config-not-found", "warning"),
    ]
    first = results[0]
    assert driver["rules"][first["ruleIndex"]]["id"] == "subnet-not-canonical"
    assert first["locations"][0]["physicalLocation"] == {
        "artifactLocation": {"uri": "pools.yaml", "uriBaseId": "%SRCROOT%"},
        "region": {"startLine": 6, "startColumn": 11},
    }
    assert first["properties"] == {
        "kind": "SpiderIPPool",
        "name": "ippool-test",
        "field": "spec.subnet",
        "hint": "write 172.18.0.0/16",
    }


def run_on_tty(cwd: Path, env: dict[str, str]) -> str:
    """Run the command with stdout on a pseudo-terminal; return what it printed."""
    master, slave = pty.openpty()
    full_env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    full_env.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler.validate_cmd"],
        cwd=cwd,
        env=full_env,
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO once the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    return b"".join(chunks).decode()


def test_colour_only_on_a_terminal_and_never_with_no_color(bad_repo: Path) -> None:
    coloured = run_on_tty(bad_repo, {"TERM": "xterm"})
    assert "\033[1m\033[31merror:\033[0m" in coloured
    assert "\033[1m\033[33mwarning:\033[0m" in coloured
    plain = run_on_tty(bad_repo, {"TERM": "xterm", "NO_COLOR": "1"})
    assert "\033[" not in plain
    assert plain.replace("\r\n", "\n").splitlines() == EXPECTED_TEXT


def test_pre_commit_hook_definition() -> None:
    import re

    import yaml

    hooks = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / ".pre-commit-hooks.yaml").read_text()
    )
    (hook,) = hooks
    assert hook["id"] == "underlay-validate"
    assert hook["entry"] == "underlay validate"
    assert hook["pass_filenames"] is True
    files = re.compile(hook["files"])
    assert files.search("pools/ippool.yaml") and files.search("a.yml")
    assert not files.search("README.md")
