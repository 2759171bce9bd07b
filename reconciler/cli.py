"""``underlay``: the command line of the reconciler and the node agent.

Exit codes (the same for every command, so CI can rely on them):
  0  success / the cluster matches Git
  1  findings: validation errors, blocked, refused or failed actions, an unverified revision,
     or (plan --exit-code) changes
  2  usage error, unreachable cluster or repository, internal error

Start-up is kept short: building the parser imports only argparse and :mod:`reconciler.vocab`
(the ``validate`` and ``agent`` arguments come from light modules, and only the subcommand that
runs is built in full); each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reconciler import vocab

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2

COMMANDS = ("validate", "plan", "apply", "reconcile", "agent", "crds")

EPILOG = """\
exit codes:
  0  success: the cluster matches Git
  1  findings: invalid YAML, blocked, refused or failed actions, an unverified revision
  2  usage error, unreachable cluster or repository, internal error

docs: README.md; the quick start: underlay plan examples/quickstart
"""

PLAN_EPILOG = """\
exit codes:
  0  planned (with --exit-code: and nothing to change)
  1  findings: invalid YAML, an unverified revision; with --exit-code: changes to apply,
     or blocked or drifted objects (the cluster does not match Git)
  2  usage error, unreachable cluster or repository, internal error

docs: README.md; the quick start: underlay plan examples/quickstart
"""

CRDS_EPILOG = """\
exit codes:
  0  printed or written
  2  usage error, a directory that cannot be written, internal error
"""


class HelpFormatter(argparse.HelpFormatter):
    """Wraps every description paragraph to the terminal width, like option help; paragraphs
    with indented lines (lists, exit codes) are kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for para in text.strip("\n").split("\n\n"):
            lines = para.splitlines()
            if any(line.startswith(" ") for line in lines):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(
                    textwrap.fill(
                        " ".join(line.strip() for line in lines), width,
                        initial_indent=indent, subsequent_indent=indent,
                    )
                )  # fmt: skip
        return "\n\n".join(out) + "\n"


def _common(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``-v`` and ``--log-format``, accepted before and after the subcommand (on subcommands
    their default is SUPPRESS, so a value given before the subcommand is kept)."""
    kw: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging", **kw)
    p.add_argument(
        "--log-format",
        choices=["json", "text"],
        help="log lines as JSON objects or text; default: json for `reconcile` when stderr is "
        "not a terminal, text otherwise",
        **kw,
    )


def _source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("source (a local directory, or a Git repository with --repo)")
    g.add_argument(
        "path",
        nargs="?",
        default=None,
        help="directory of YAML to use; with --repo, a sub-directory inside the repository "
        "(default: all of it)",
    )
    g.add_argument(
        "--repo",
        metavar="URL",
        help="Git repository: https://, ssh://, git@host:path, file:// or a local path",
    )
    g.add_argument(
        "--ref", default="main", help="branch, tag or commit to use with --repo (default: main)"
    )
    g.add_argument(
        "--cache-dir",
        type=Path,
        help="where Git checkouts are kept (default: $UNDERLAY_CACHE_DIR, else ~/.cache/underlay)",
    )
    g.add_argument(
        "--git-secret",
        default="underlay-git-credentials",
        help="Secret (in --namespace) with Git credentials: username, password or token, "
        "ca.crt, identity, known_hosts; read on every fetch, absent is fine; empty to not read "
        "one; UNDERLAY_GIT_* environment variables apply under it (default: %(default)s)",
    )
    g.add_argument("--strict", action="store_true", help="treat validation warnings as errors")
    g.add_argument(
        "--ignore-unknown-kinds",
        action="store_true",
        help="skip documents of kinds underlay does not manage",
    )
    v = p.add_argument_group(
        "signature verification",
        "With --repo: the head commit must be signed by an allowed key, else the revision is "
        "refused and nothing is applied.",
    )
    v.add_argument(
        "--verify-gpg-key",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="an ASCII-armored OpenPGP public key (gpg --armor --export) allowed to sign; "
        "repeat for several",
    )
    v.add_argument(
        "--verify-ssh-signers",
        type=Path,
        metavar="FILE",
        help="an allowed_signers file (ssh-keygen(1)) of the SSH keys allowed to sign",
    )
    v.add_argument(
        "--verify-secret",
        metavar="NAME",
        help="Secret (in --namespace) with allowed keys, read on every fetch: armored OpenPGP "
        "public keys under any key, SSH signers under allowed_signers",
    )


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then in-cluster); a "
        "kubeconfig named here or in $KUBECONFIG must exist",
    )
    g.add_argument("--context", help="kubeconfig context to use")
    g.add_argument(
        "--instance",
        default=vocab.DEFAULT_INSTANCE,
        help=f"reconciler instance name: the value of the {vocab.LABEL_INSTANCE} label on every "
        "object it owns, and the name of its GitSync status object (default: %(default)s)",
    )
    g.add_argument(
        "-n",
        "--namespace",
        help="namespace of the GitSync status object (and the leader Lease): default "
        "$POD_NAMESPACE, in a pod its own namespace, else the kubeconfig context's namespace",
    )
    g.add_argument(
        "--api-timeout",
        default="30s",
        help="timeout of one Kubernetes API request; 429, 5xx and timeouts are retried with "
        "exponential backoff (default: %(default)s)",
    )


def _pass_args(p: argparse.ArgumentParser, *, prune_help: str) -> None:
    p.add_argument("--no-prune", action="store_true", help=prune_help)
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="let a revision without any object prune everything this instance applied "
        "(without it an empty revision prunes nothing)",
    )
    p.add_argument(
        "--no-self-heal",
        action="store_true",
        help="report objects changed or deleted in the cluster by hand, but do not revert them "
        "(default: revert them on the next pass)",
    )


HELP = {
    "validate": "check the YAML of a repository (for CI and pre-commit)",
    "plan": "show what apply would change (writes nothing to the cluster)",
    "apply": "make the cluster match the YAML once (one reconcile pass)",
    "reconcile": "the controller loop: apply on every new revision and every interval",
    "agent": "the node agent: builds this node's OVS bridges and serves the CNI plugins",
    "crds": "print the CustomResourceDefinitions generated from schemas/",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("underlay-gitops")
    except PackageNotFoundError:
        return "dev"


class _VersionAction(argparse.Action):
    """``--version``: the installed distribution's version, looked up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"underlay {_version()}")
        parser.exit()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argparse tree of every ``underlay`` subcommand.

    ``only``: build just this subcommand's arguments (the others are listed with their help
    but have none); "" builds none (enough for ``underlay --help``); None (default) builds all.
    :func:`main` passes the subcommand on the command line, so start-up never pays for the
    others.
    """
    parser = argparse.ArgumentParser(
        prog="underlay",
        description="Git-driven underlay networking for Kubernetes pods on Open vSwitch: "
        "OVS bridges on nodes, Spiderpool-compatible IP pools and Multus attachments from YAML "
        "in Git.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the version of underlay and exit"
    )
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def full(name: str) -> bool:
        return only is None or only == name

    def stub(name: str) -> None:
        sub.add_parser(name, help=HELP[name], add_help=False)

    if full("validate"):
        from reconciler import validate_cmd

        validate_cmd.register(sub)
        _common(sub.choices["validate"])
    else:
        stub("validate")

    if full("plan"):
        p = sub.add_parser(
            "plan",
            help=HELP["plan"],
            description="Load and validate the YAML, render the objects (NetworkAttachmentDefinitions "
            "included) and diff them against the cluster. Without a configured cluster, diffs "
            "against an empty cluster and says so. Writes nothing to the cluster; with --repo it "
            "keeps a checkout of the repository in --cache-dir.",
            epilog=PLAN_EPILOG,
            formatter_class=HelpFormatter,
        )
        _common(p)
        _source_args(p)
        _cluster_args(p)
        p.add_argument(
            "-o",
            "--output",
            choices=["text", "yaml", "json"],
            default="text",
            help="text (default): one line per object; yaml/json: the objects that would be written",
        )
        _pass_args(p, prune_help="do not plan deletions")
        p.add_argument("--all", action="store_true", help="also list unchanged objects")
        p.add_argument(
            "--watch",
            action="store_true",
            help="stay running and print the plan again whenever a file under PATH changes "
            "(local path only)",
        )
        p.add_argument(
            "--exit-code",
            action="store_true",
            help="exit 1 when the cluster does not match Git (changes to apply, blocked or drifted "
            "objects), 0 when it does (like git diff --exit-code)",
        )
        p.set_defaults(func=cmd_plan)
    else:
        stub("plan")

    if full("apply"):
        p = sub.add_parser(
            "apply",
            help=HELP["apply"],
            description="One pass: fetch, load, validate (nothing is applied if anything is "
            "invalid), plan, server-side apply (field manager 'underlay') after a dry run of "
            "every object, and prune objects this instance owns that left Git. Nothing is "
            "applied either when an object of the revision exists in the cluster without this "
            "instance's labels. Prints what it created, updated and pruned; a second run writes "
            "nothing and says so.",
            epilog=EPILOG,
            formatter_class=HelpFormatter,
        )
        _common(p)
        _source_args(p)
        _cluster_args(p)
        _pass_args(p, prune_help="never delete objects that left Git")
        p.set_defaults(func=cmd_apply)
    else:
        stub("apply")

    if full("reconcile"):
        _reconcile_parser(sub)
    else:
        stub("reconcile")

    if full("agent"):
        from node_agent import agent_args

        p = sub.add_parser(
            "agent",
            help=HELP["agent"],
            description=agent_args.DESCRIPTION,
            epilog=agent_args.EPILOG,
            formatter_class=HelpFormatter,
        )
        _common(p)
        agent_args.add_arguments(p)
        p.set_defaults(func=cmd_agent)
    else:
        stub("agent")

    if full("crds"):
        p = sub.add_parser(
            "crds",
            help=HELP["crds"],
            description="Print (or write to --out-dir) the CustomResourceDefinitions underlay "
            "serves, generated from the JSON Schemas in schemas/: its own kinds (OvsBridge, "
            "OvsBridgeEnactment, GitSync) and the Spiderpool and Multus kinds it accepts "
            "(SpiderIPPool, SpiderMultusConfig, SpiderEndpoint, NetworkAttachmentDefinition).",
            epilog=CRDS_EPILOG,
            formatter_class=HelpFormatter,
        )
        _common(p)
        p.add_argument("--out-dir", type=Path, help="write one file per CRD into this directory")
        p.set_defaults(func=cmd_crds)
    else:
        stub("crds")
    return parser


def _reconcile_parser(sub: Any) -> None:
    p = sub.add_parser(
        "reconcile",
        help=HELP["reconcile"],
        description="Run apply passes forever: poll the repository every --interval (with "
        "jitter), load/validate/render only when the revision moved, re-check the cluster for "
        "drift on every pass, and record status in GitSync <instance> (conditions, revisions, "
        "inventory), Events and /metrics. A pass runs at once when the GitSync's "
        "underlay.dev/reconcile-requested-at annotation changes, or (--watch) a local file "
        "changes.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    _common(p)
    _source_args(p)
    _cluster_args(p)
    p.add_argument(
        "--interval",
        default="60s",
        help="poll interval: 30s, 5m, 1h or seconds (default: %(default)s)",
    )
    p.add_argument(
        "--jitter",
        type=float,
        default=0.1,
        help="random spread of the interval, as a fraction (default: %(default)s)",
    )
    _pass_args(p, prune_help="never delete objects that left Git")
    p.add_argument(
        "--once", action="store_true", help="run a single pass and exit (for tests and cron)"
    )
    p.add_argument(
        "--watch",
        action="store_true",
        help="also run a pass within a second of any change to the files under PATH (local "
        "path only)",
    )
    p.add_argument(
        "--http-address",
        default=":8080",
        help="where /metrics, /healthz and /readyz are served; empty to disable "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--backoff",
        default="1s",
        help="wait after a failed pass, doubled per consecutive failure up to --interval "
        "(default: %(default)s)",
    )
    g = p.add_argument_group("leader election (coordination.k8s.io/v1 Lease)")
    g.add_argument(
        "--leader-elect",
        action="store_true",
        help="run passes only while holding the Lease, so several replicas can run",
    )
    g.add_argument(
        "--leader-elect-lease-duration",
        default="35s",
        help="how long standbys wait after the last renewal before taking over "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--leader-elect-renew-deadline",
        default="30s",
        help="the leader stops writing when it could not renew for this long "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--leader-elect-retry-period",
        default="5s",
        help="how often the leader renews and standbys try (default: %(default)s)",
    )
    g.add_argument(
        "--leader-elect-resource-name",
        help="name of the Lease (default: underlay-reconciler-<instance>)",
    )
    g.add_argument(
        "--identity",
        help="this replica's name, as the Lease holder and the source of its Events (default: "
        "$POD_NAME, else <hostname>_<8 random hex digits>)",
    )
    p.set_defaults(func=cmd_reconcile)


# --- helpers ----------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """``30s``, ``5m``, ``1h``, ``1h30m`` or plain seconds -> seconds. Raises ValueError."""
    import re

    t = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", t)
    if not parts or "".join(a + b for a, b in parts) != t:
        raise ValueError(f"invalid duration {text!r}: use e.g. 30s, 5m, 1h")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, u in parts)


def _verification(args: argparse.Namespace, api: Any = None, namespace: str = "") -> Any:
    """A provider of the allowed signing keys (``--verify-*``), or None when none is asked."""
    gpg = list(getattr(args, "verify_gpg_key", None) or [])
    ssh = getattr(args, "verify_ssh_signers", None)
    secret = getattr(args, "verify_secret", None)
    if not gpg and not ssh and not secret:
        return None
    if not args.repo:
        raise UsageError("--verify-gpg-key/--verify-ssh-signers/--verify-secret need --repo")
    from reconciler.controller import verification_provider
    from reconciler.signatures import verification_from_files

    static = verification_from_files(gpg, ssh) if gpg or ssh else None
    return verification_provider(api, namespace, secret, static)


def _resolve_source(
    args: argparse.Namespace, api: Any = None, namespace: str = ""
) -> tuple[Path, list[Path] | None, str, str | None]:
    """(root, paths, revision, who signed it) for ``plan``: the Git checkout (verified when
    ``--verify-*`` is given) or the local directory."""
    from reconciler.controller import git_credentials
    from reconciler.source import fetch

    verification = _verification(args, api, namespace)
    if args.repo:
        creds = git_credentials(api, namespace, args.git_secret)()
        co = fetch(
            args.repo, args.ref, cache_dir=args.cache_dir, credentials=creds,
            verify=verification() if verification is not None else None,
        )  # fmt: skip
        paths = [co.path / args.path] if args.path else None
        if paths and not paths[0].exists():
            raise FileNotFoundError(f"{args.path} does not exist in {co.url} at {co.revision[:12]}")
        return co.path, paths, co.revision, co.signature
    path = Path(args.path or ".")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    root = path if path.is_dir() else path.parent
    return root, None if path.is_dir() else [path], "local", None


def _make_source(args: argparse.Namespace, api: Any = None, namespace: str = "") -> Any:
    from reconciler.controller import DirSource, GitSource, git_credentials

    verification = _verification(args, api, namespace)
    if args.repo:
        creds = git_credentials(api, namespace, getattr(args, "git_secret", None))
        return GitSource(
            args.repo, args.ref, args.path, args.cache_dir, credentials=creds,
            verification=verification,
        )  # fmt: skip
    return DirSource(Path(args.path or "."))


def _retry_policy(args: argparse.Namespace, *, one_shot: bool = False) -> Any:
    """Retries of API requests: ``--api-timeout`` per request; a one-shot command (plan,
    apply) gives up after 3 tries (under a second of waiting), the loop after 6."""
    from reconciler.retry import RetryPolicy

    timeout = parse_duration(args.api_timeout)
    if one_shot:
        return RetryPolicy(attempts=3, cap=1.0, timeout=timeout)
    return RetryPolicy(timeout=timeout)


def _user_agent(identity: str | None = None) -> str:
    return f"underlay/{_version()}" + (f" ({identity})" if identity else "")


def _client(
    args: argparse.Namespace,
    *,
    required: bool,
    on_retry: Any = None,
    identity: str | None = None,
    one_shot: bool = False,
) -> Any:
    from reconciler import kube

    if not required and not kube.has_cluster_config(args.kubeconfig):
        return None
    return kube.api_client(
        args.kubeconfig, args.context, retry=_retry_policy(args, one_shot=one_shot),
        on_retry=on_retry, user_agent=_user_agent(identity),
    )  # fmt: skip


def _namespace(args: argparse.Namespace) -> str:
    from reconciler import kube

    return str(args.namespace or kube.default_namespace(args.kubeconfig, args.context))


def _print_problems(problems: Sequence[Any], root: Any = None) -> None:
    """Print problems to stderr; with a local ``root`` (not a checkout of --repo), file names
    are shown as from the current directory, as ``underlay validate`` shows them."""
    import dataclasses

    base = os.path.relpath(root) if root is not None else "."
    for p in problems:
        if base != "." and p.file:
            p = dataclasses.replace(p, file=os.path.join(base, p.file))
        print(p.format(), file=sys.stderr)


def _options(args: argparse.Namespace, namespace: str, identity: str = "underlay") -> Any:
    from reconciler.controller import Options

    return Options(
        instance=args.instance,
        namespace=namespace,
        interval=parse_duration(getattr(args, "interval", "60s")),
        jitter=getattr(args, "jitter", 0.1),
        prune=not args.no_prune,
        allow_empty=args.allow_empty,
        self_heal=not args.no_self_heal,
        strict=args.strict,
        ignore_unknown_kinds=args.ignore_unknown_kinds,
        backoff_base=parse_duration(getattr(args, "backoff", "1s")),
        identity=identity,
    )


# exit code of a pass by the reason it did not converge
_FINDINGS = {
    "ValidationFailed", "Blocked", "ApplyFailed", "DryRunFailed", "DriftDetected",
    "OwnershipConflict", "VerificationFailed",
}  # fmt: skip


def short(revision: str) -> str:
    """A revision for people: 12 hex digits of a commit SHA, ``local@...`` as is."""
    return revision if revision.startswith("local") else revision[:12]


# --- commands ---------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    """``underlay plan``: print what apply would change (exit 1 with --exit-code and changes)."""
    if args.watch:
        return _plan_watch(args)
    return _plan_once(args)


def _plan_once(args: argparse.Namespace) -> int:
    from reconciler.controller import read_inventory, run_pass
    from reconciler.plan import Op, format_plan

    api = _client(args, required=False, one_shot=True)
    namespace = _namespace(args)
    root, paths, revision, signer = _resolve_source(args, api, namespace)
    inventory = read_inventory(api, namespace, args.instance) if api is not None else None
    res = run_pass(
        root, paths, api, revision=revision, instance=args.instance, strict=args.strict,
        prune=not args.no_prune, apply=False, ignore_unknown_kinds=args.ignore_unknown_kinds,
        inventory=inventory, allow_empty=args.allow_empty, self_heal=not args.no_self_heal,
    )  # fmt: skip
    _print_problems(res.problems, root if args.repo is None else None)
    if res.errors or res.plan is None:
        print(f"{len(res.errors)} error(s): nothing planned.", file=sys.stderr)
        return EXIT_FINDINGS
    if args.output == "text":
        if revision != "local":
            signed = f", signed by {signer}" if signer else ""
            print(f"Revision {short(revision)} of {args.repo} ({args.ref}){signed}")
        print(format_plan(res.plan, verbose=args.all))
    else:
        objs = [
            a.desired.body
            for a in res.plan.actions
            if a.desired is not None and (args.all or a.op in (Op.CREATE, Op.UPDATE))
        ]
        if args.output == "json":
            print(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}, indent=2))
        else:
            import yaml

            print(yaml.safe_dump_all(objs, sort_keys=False), end="")
    sys.stdout.flush()
    if args.exit_code and (res.plan.has_changes or res.plan.blocked or res.plan.count(Op.DRIFTED)):
        return EXIT_FINDINGS
    return EXIT_OK


def _plan_watch(args: argparse.Namespace) -> int:
    """``plan --watch``: plan now, then again within ~0.1 s of every change under PATH."""
    import threading

    from reconciler.controller import FileWatch

    if args.repo:
        raise UsageError("--watch needs a local PATH, not --repo")
    changed = threading.Event()
    fw = FileWatch(Path(args.path or "."), changed.set)
    fw.start()
    try:
        while True:
            try:
                _plan_once(args)
            except Exception as exc:
                from reconciler.source import redact

                print(f"underlay plan: error: {redact(str(exc))}", file=sys.stderr)
            print("-- watching for changes (Ctrl-C to stop)", file=sys.stderr, flush=True)
            changed.wait()
            changed.clear()
    finally:
        fw.stop()


class UsageError(ValueError):
    """Flags that cannot be combined (exit 2)."""


def cmd_apply(args: argparse.Namespace) -> int:
    """``underlay apply``: one recorded pass; exit 0 converged, 1 findings, 2 errors."""
    from reconciler.controller import Reconciler
    from reconciler.plan import Op

    api = _client(args, required=True, one_shot=True)
    namespace = _namespace(args)
    source = _make_source(args, api, namespace)
    rec = Reconciler(
        api, source, _options(args, namespace), out=print, problems_out=_print_problems
    )
    rep = rec.run_once()
    where = (
        f"revision {short(rep.revision)}"
        if rep.revision and not rep.revision.startswith("local")
        else str(args.path or ".")
    )
    if rep.reason == "ValidationFailed":
        n = len(rep.rendered.errors) if rep.rendered else 0
        print(f"{n} error(s) in {where}: nothing applied.", file=sys.stderr)
        return EXIT_FINDINGS
    if rep.reason in ("OwnershipConflict", "VerificationFailed"):
        tail = "; adopt or rename them (see above)" if rep.reason == "OwnershipConflict" else ""
        msg = str(rep.error)
        if "nothing applied" not in msg.lower():
            tail += ". Nothing applied"
        print(f"underlay apply: {msg}{tail}.", file=sys.stderr)
        return EXIT_FINDINGS
    if rep.error is not None and rep.reason not in _FINDINGS:
        print(f"underlay apply: error: {rep.error}", file=sys.stderr)
        return EXIT_ERROR
    plan, outcome = rep.plan, rep.outcome
    assert plan is not None
    if outcome is None:
        if plan.blocked or plan.count(Op.DRIFTED):
            print(f"Nothing applied, and the cluster does not match {where} ({plan.summary()}):")
        else:
            print(f"No changes: the cluster matches {where} ({plan.summary()}).")
        for a in plan.blocked:
            print(f"blocked {a.ref()}: {a.reason}")
        for a in plan.actions:
            if a.op is Op.DRIFTED:
                print(f"drifted {a.ref()}: {a.reason} (not reverted: --no-self-heal)")
    else:
        c = outcome.count
        print(
            f"Applied {where}: {c(Op.CREATE)} created, {c(Op.UPDATE)} updated, "
            f"{c(Op.PRUNE)} pruned, {len(outcome.failed) + len(outcome.dry_run_failed)} failed, "
            f"{len(plan.blocked) + len(outcome.blocked)} blocked, "
            + (f"{len(outcome.skipped)} skipped, " if outcome.skipped else "")
            + f"{plan.count(Op.UNCHANGED)} unchanged."
        )
    return EXIT_OK if rep.converged else EXIT_FINDINGS


def cmd_reconcile(args: argparse.Namespace) -> int:
    """``underlay reconcile``: the controller loop (see the command's help)."""
    import signal
    import threading

    from reconciler import kube, logs
    from reconciler.controller import FileWatch, GitSyncWatch, Reconciler
    from reconciler.httpserver import HttpServer
    from reconciler.leader import ElectionConfig, LeaderElector, default_identity
    from reconciler.metrics import ReconcilerMetrics
    from reconciler.retry import RetryPolicy

    logs.setup(args.log_format, verbose=args.verbose)
    log = logging.getLogger("underlay.reconcile")
    if args.watch and args.repo:
        raise UsageError("--watch needs a local PATH, not --repo")
    if args.once and args.leader_elect:
        raise UsageError(
            "--once runs one pass right away: it cannot be combined with --leader-elect"
        )
    interval = parse_duration(args.interval)
    metrics = ReconcilerMetrics()
    identity = args.identity or default_identity()
    api = _client(args, required=True, on_retry=metrics.on_retry, identity=identity)
    namespace = _namespace(args)
    elector = None
    if args.leader_elect:
        retry_period = parse_duration(args.leader_elect_retry_period)
        cfg = ElectionConfig(
            name=args.leader_elect_resource_name or f"underlay-reconciler-{args.instance}",
            namespace=namespace,
            identity=identity,
            lease_duration=parse_duration(args.leader_elect_lease_duration),
            renew_deadline=parse_duration(args.leader_elect_renew_deadline),
            retry_period=retry_period,
        )
        # the election loop is the retry: one attempt per round, short timeout
        le_api = kube.api_client(
            args.kubeconfig, args.context,
            retry=RetryPolicy(attempts=1, timeout=max(1.0, min(10.0, cfg.renew_deadline / 3))),
            user_agent=_user_agent(identity),
        )  # fmt: skip
        elector = LeaderElector(le_api, cfg)
    from reconciler.cache import ObjectCache
    from reconciler.controller import OBSERVED

    cache = None if args.once else ObjectCache(api, OBSERVED)
    rec = Reconciler(
        api,
        _make_source(args, api, namespace),
        _options(args, namespace, identity),
        metrics=metrics,
        elector=elector,
        cache=cache,
    )
    if args.once:
        rep = rec.run_once()
        if rep.error is None:
            return EXIT_OK if rep.converged else EXIT_FINDINGS
        return EXIT_FINDINGS if rep.reason in _FINDINGS else EXIT_ERROR
    if elector is not None:

        def on_change(leading: bool) -> None:
            metrics.leader.set(1 if leading else 0)
            rec.request_pass()

        elector.on_change = on_change
    stuck_after = max(600.0, 3 * interval)
    http = None
    if args.http_address:
        http = HttpServer(
            args.http_address, metrics.render, lambda: rec.healthz(stuck_after), rec.readyz
        )
        http.start()
    watchers: list[Any] = [GitSyncWatch(api, namespace, args.instance, rec.request_pass)]
    if args.watch:
        watchers.append(FileWatch(Path(args.path or "."), rec.request_pass))

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: finishing the current pass and stopping", signum)
        rec.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    for w in watchers:
        w.start()
    if cache is not None:
        cache.start()
        cache.wait_synced(timeout=60)  # the first pass LISTs if the cache is not there yet
    if elector is not None:
        elector.start()
    log.info(
        "reconciling %s into the cluster every %s (instance %s, GitSync %s/%s, identity %s)",
        args.repo or args.path or ".", args.interval, args.instance, namespace, args.instance, identity,
    )  # fmt: skip
    try:
        rec.run_forever()
    finally:
        if cache is not None:
            cache.stop()
        for w in watchers:
            w.stop()
        if elector is not None:
            elector.stop(release=True)
        if http is not None:
            http.stop()
    return EXIT_OK


def cmd_agent(args: argparse.Namespace) -> int:
    from node_agent import daemon

    return daemon.run(args)


def cmd_crds(args: argparse.Namespace) -> int:
    """``underlay crds``: print the CRDs, or write one file per CRD into --out-dir."""
    import yaml

    from reconciler import crdgen

    crds = crdgen.generate_all()
    if args.out_dir:
        try:
            written = crdgen.write_all(args.out_dir, crds)
        except OSError as exc:
            what = exc.strerror or str(exc)
            where = exc.filename or args.out_dir
            print(
                f"underlay crds: cannot write the CRDs into {args.out_dir}: {where}: {what} "
                "(--out-dir must be a directory you can write, or one that can be created)",
                file=sys.stderr,
            )
            return EXIT_ERROR
        for path in written:
            print(path)
    else:
        print(yaml.safe_dump_all(crds, sort_keys=False), end="")
    return EXIT_OK


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    """The parser of subcommand ``name`` in ``parser`` (None when there is none)."""
    for action in parser._actions:  # argparse keeps subparsers only there
        if isinstance(action, argparse._SubParsersAction):
            found = action.choices.get(name)
            return found if isinstance(found, argparse.ArgumentParser) else None
    return None


def _stdout_gone() -> bool:
    """True when stdout is a pipe whose reader has left (poll(2) reports POLLERR on its write
    end); stdout is then pointed at /dev/null so Python's flush at exit does not complain
    again. A broken pipe elsewhere (the API server's socket) is not this."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(ev & select.POLLERR for _, ev in poller.poll(0))  # a pipe without reader
    except (OSError, ValueError):
        return False
    if gone:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return gone


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``underlay``; returns the exit code (see module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    only = next((a for a in argv if a in COMMANDS), "")  # the subcommand: build only that one
    parser = build_parser(only)
    args, extra = parser.parse_known_args(argv)
    if extra:  # say it with the subcommand's usage, not the top-level one
        sub = _subparser(parser, getattr(args, "command", None) or only)
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    from reconciler import logs

    if args.log_format == "json":
        logs.setup("json", verbose=args.verbose)
    elif not logging.getLogger().handlers:  # as logging.basicConfig: keep a caller's handlers
        logs.setup("text", verbose=args.verbose)  # control characters escaped
    try:
        rc: int = args.func(args)
        return rc
    except KeyboardInterrupt:
        return 130
    except UsageError as exc:
        print(f"underlay {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # every error gets a clear line and exit code 2
        from reconciler import kube
        from reconciler.source import SignatureError, SourceError, redact

        if isinstance(exc, BrokenPipeError) and _stdout_gone():
            return EXIT_OK  # the reader left (plan | head): not an error of ours
        if isinstance(exc, SignatureError):
            print(f"underlay {args.command}: {redact(str(exc))}", file=sys.stderr)
            return EXIT_FINDINGS
        if args.verbose and not isinstance(exc, SourceError):
            raise
        target = kube.describe_target(
            getattr(args, "kubeconfig", None), getattr(args, "context", None)
        )
        text = kube.transport_error(exc, target=target) or str(exc)
        print(f"underlay {args.command}: error: {redact(text)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())


def entry() -> None:
    """The ``underlay`` console script: :func:`main`, then exit with its code.

    When worker threads are still running (the agent's and the reconciler's watches, retries
    and servers are daemon threads), the process ends with ``os._exit`` once logs and output
    are flushed: interpreter finalization would end those threads with ``pthread_exit`` in the
    middle of whatever call they are in, and unwinding through a compiled extension's frames
    (the kubernetes client's pydantic-validated calls) aborts the process (SIGABRT, exit -6)
    after a clean stop.
    """
    import os
    import threading

    rc = main()
    if threading.active_count() > 1:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(rc)
    sys.exit(rc)
