"""The ``underlay`` command line as a user meets it: where the cluster comes from (a missing
kubeconfig is an error naming it, never a silent empty cluster), what an unreachable API server
says, options before and after the subcommand, --version, per-command help and exit codes, and
a parser that never loads the agent, the Kubernetes client or the validator just to print help.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from reconciler import cli

ROOT = Path(__file__).resolve().parents[2]
UNDERLAY = str(Path(sys.executable).parent / "underlay")
QUICKSTART = str(ROOT / "examples" / "quickstart")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "POD_NAMESPACE")}
    base["HOME"] = "/nonexistent"  # no ~/.kube/config
    return subprocess.run(
        [UNDERLAY, *args], capture_output=True, text=True, timeout=60, env={**base, **(env or {})}
    )


def test_a_missing_kubeconfig_is_an_error_naming_it_never_an_empty_cluster() -> None:
    p = run("plan", QUICKSTART, env={"KUBECONFIG": "/nonexistent/kubeconfig"})
    assert p.returncode == 2, p.stdout
    assert "KUBECONFIG=/nonexistent/kubeconfig: no such file" in p.stderr
    assert "empty cluster" not in p.stdout
    p = run("plan", QUICKSTART, "--kubeconfig", "/nonexistent/kc")
    assert p.returncode == 2 and "kubeconfig /nonexistent/kc (--kubeconfig): no such file" in (
        p.stderr
    )
    # nothing configured at all: planning against an empty cluster is what was asked for
    p = run("plan", QUICKSTART)
    assert p.returncode == 0 and "No cluster configured: planning against an empty cluster" in (
        p.stdout
    )


def test_an_unreachable_api_server_is_named_with_the_kubeconfig_and_context(
    tmp_path: Path,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    kc = tmp_path / "kubeconfig"
    kc.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: lab\n"
        f"clusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{port}', "
        "insecure-skip-tls-verify: true}}]\n"
        "users: [{name: u, user: {token: t0k3n-value}}]\n"
        "contexts: [{name: lab, context: {cluster: c, user: u}}]\n"
    )
    for cmd in ("plan", "apply"):
        p = run(cmd, QUICKSTART, "--kubeconfig", str(kc), "--api-timeout", "1")
        assert p.returncode == 2, p.stdout + p.stderr
        assert (
            f"cannot reach the Kubernetes API server at https://127.0.0.1:{port} "
            f"(kubeconfig {kc}, its current context): Connection refused"
        ) in p.stderr
        # a one-shot command tries three times, not six (seconds of backoff for nothing)
        assert p.stderr.count("retrying in") == 2, p.stderr
        assert "t0k3n-value" not in p.stderr
    p = run("plan", QUICKSTART, "--kubeconfig", str(kc), "--context", "lab", "--api-timeout", "1")
    assert f"(kubeconfig {kc}, context lab)" in p.stderr


def test_options_before_and_after_the_subcommand_and_version() -> None:
    for args in (
        ("-v", "--log-format", "text", "validate", QUICKSTART),
        ("validate", QUICKSTART, "-v", "--log-format", "text"),
        ("plan", QUICKSTART, "--log-format", "json", "-v"),
        ("--log-format", "json", "plan", QUICKSTART),
    ):
        p = run(*args)
        assert p.returncode == 0, (args, p.stderr)
    parsed = cli.build_parser().parse_args(["--log-format", "json", "plan", "x"])
    assert parsed.log_format == "json" and parsed.verbose is False
    parsed = cli.build_parser().parse_args(["plan", "x", "-v", "--log-format", "text"])
    assert parsed.log_format == "text" and parsed.verbose is True
    p = run("--version")
    assert (
        p.returncode == 0 and p.stdout.startswith("underlay ") and p.stdout.split()[1][0].isdigit()
    )


def test_help_of_each_command() -> None:
    agent = run("agent", "--help").stdout
    assert "exit codes:" in agent and "--noop" in agent and "findings" not in agent
    crds = run("crds", "--help").stdout
    assert "underlay-ovs kinds" not in crds and "its own kinds (OvsBridge" in crds
    assert "exit codes:" in crds
    reconcile = run("reconcile", "--help").stdout
    assert "<hostname>_<8 random hex digits>" in reconcile and "host_random" not in reconcile
    plan = " ".join(run("plan", "--help").stdout.split())
    assert "Writes nothing to the cluster; with --repo it keeps a checkout of the repository in --cache-dir" in plan  # fmt: skip
    assert "--verify-gpg-key FILE" in plan and "--verify-secret NAME" in plan
    # descriptions are wrapped like the option help (no line wider than the terminal)
    wide = [ln for ln in run("reconcile", "--help").stdout.splitlines() if len(ln) > 100]
    assert wide == []
    top = run("--help").stdout
    for name in cli.COMMANDS:
        assert f"    {name} " in top


def test_a_mistyped_option_shows_the_subcommands_usage() -> None:
    p = run("validate", "--formt", "json", "examples/quickstart")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("usage: underlay validate ")
    assert "underlay validate: error: unrecognized arguments: --formt" in p.stderr


def test_a_reader_that_leaves_early_is_not_an_error() -> None:
    """``underlay plan ... | head -c 1``: the broken pipe is stdout's, not the API server's."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "POD_NAMESPACE")}
    env["HOME"] = "/nonexistent"  # no cluster: plan against an empty one
    for _ in range(5):  # the reader may leave before or after plan wrote its first line
        p = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {UNDERLAY} plan {QUICKSTART} | head -c 1"],
            capture_output=True, text=True, timeout=60, check=False, env=env,
        )  # fmt: skip
        assert (p.returncode, p.stderr) == (0, ""), p.stderr


def test_building_the_parser_loads_no_heavy_module() -> None:
    """``underlay --help`` and the parser of any command import neither the agent, nor the
    Kubernetes client, pyroute2, ovsdbapp, gitpython or jsonschema (checked in a fresh
    interpreter: what is imported, not how long it takes)."""
    heavy = ("node_agent.daemon", "kubernetes", "pyroute2", "ovsdbapp", "git", "jsonschema")
    code = (
        "import sys; from reconciler import cli\n"
        "for only in ('', 'plan', 'apply', 'reconcile', 'agent', 'crds'): cli.build_parser(only)\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"
    # validate needs its validator, still not the agent or the Kubernetes client
    code = code.replace("('', 'plan', 'apply', 'reconcile', 'agent', 'crds')", "('validate',)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "['jsonschema']"
    # the agent's options are the same whichever module they are read from
    from node_agent import agent_args, daemon, ovsdb

    assert daemon.add_arguments is agent_args.add_arguments
    assert agent_args.DEFAULT_OVSDB_REMOTE == ovsdb.DEFAULT_REMOTE
    assert agent_args.DEFAULT_LEASE_NAMESPACE == daemon.DEFAULT_LEASE_NAMESPACE
