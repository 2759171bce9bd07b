"""``underlay``: the command line of the reconciler and the node agent.

Exit codes (the same for every command, so CI can rely on them):
  0  success / the cluster matches Git
  1  findings: validation errors, blocked or failed actions, or (plan --exit-code) changes
  2  usage error, unreachable cluster or repository, internal error
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from reconciler import vocab

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2

EPILOG = """\
exit codes: 0 success, 1 findings (invalid YAML, blocked or failed actions), 2 usage/internal error
docs: README.md; the quick start: underlay plan examples/quickstart
"""


def _source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("source (a local directory, or a Git repository with --repo)")
    g.add_argument(
        "path",
        nargs="?",
        default=None,
        help="directory of YAML to use; with --repo, a sub-directory inside the repository (default: all of it)",
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
        "--cache-dir", type=Path, help="where Git checkouts are kept (default: ~/.cache/underlay)"
    )
    g.add_argument("--strict", action="store_true", help="treat validation warnings as errors")
    g.add_argument(
        "--ignore-unknown-kinds",
        action="store_true",
        help="skip documents of kinds underlay does not manage",
    )


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then in-cluster)",
    )
    g.add_argument("--context", help="kubeconfig context to use")
    g.add_argument(
        "--instance",
        default=vocab.DEFAULT_INSTANCE,
        help=f"reconciler instance name, the value of the {vocab.LABEL_INSTANCE} label on every object it owns (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every ``underlay`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="underlay",
        description="Git-driven underlay networking for Kubernetes pods on Open vSwitch: "
        "OVS bridges on nodes, Spiderpool-compatible IP pools and Multus attachments from YAML in Git.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from reconciler import validate_cmd

    validate_cmd.register(sub)

    p = sub.add_parser(
        "plan",
        help="show what apply would change (no writes)",
        description="Load and validate the YAML, render the objects (NetworkAttachmentDefinitions "
        "included) and diff them against the cluster. Without a configured cluster, diffs "
        "against an empty cluster and says so. Writes nothing.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _source_args(p)
    _cluster_args(p)
    p.add_argument(
        "-o",
        "--output",
        choices=["text", "yaml", "json"],
        default="text",
        help="text (default): one line per object; yaml/json: the objects that would be written",
    )
    p.add_argument("--no-prune", action="store_true", help="do not plan deletions")
    p.add_argument("--all", action="store_true", help="also list unchanged objects")
    p.add_argument(
        "--exit-code",
        action="store_true",
        help="exit 1 when there are changes, 0 when none (like git diff --exit-code)",
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "apply",
        help="make the cluster match the YAML once (one reconcile pass)",
        description="One pass: fetch, load, validate (nothing is applied if anything is invalid), "
        "plan, server-side apply (field manager 'underlay') after a dry run of every object, "
        "and prune objects this instance owns that left Git. Prints what it created, updated "
        "and pruned; a second run writes nothing and says so.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _source_args(p)
    _cluster_args(p)
    p.add_argument("--no-prune", action="store_true", help="never delete objects that left Git")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser(
        "reconcile",
        help="the controller loop: apply on every new revision and every interval",
        description="Run apply passes forever: poll the repository every --interval (with "
        "jitter), apply when the revision moved, and re-check the cluster for drift on every pass.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _source_args(p)
    _cluster_args(p)
    p.add_argument(
        "--interval",
        default="60s",
        help="poll interval: 30s, 5m, 1h or seconds (default: %(default)s)",
    )
    p.add_argument("--no-prune", action="store_true", help="never delete objects that left Git")
    p.add_argument(
        "--once", action="store_true", help="run a single pass and exit (for tests and cron)"
    )
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser(
        "agent",
        help="the node agent: builds this node's OVS bridges and serves the CNI plugins",
        description="Watch OvsBridge objects, make this node's bridges match the ones that select "
        "it (OVS through ovsdbapp, addresses and routes through pyroute2), persist them "
        "(netplan / NetworkManager), report OvsBridgeEnactment <node>.<bridge>, and serve "
        "the underlay-ovs and underlay-ipam CNI plugins over a unix socket.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from node_agent import daemon

    daemon.add_arguments(p)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser(
        "crds",
        help="print the CustomResourceDefinitions generated from schemas/",
        description="Print (or write to --out-dir) the CRDs underlay serves, generated from the "
        "JSON Schemas in schemas/: underlay-ovs kinds and the Spiderpool kinds it accepts.",
    )
    p.add_argument("--out-dir", type=Path, help="write one file per CRD into this directory")
    p.set_defaults(func=cmd_crds)
    return parser


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


def _resolve_source(args: argparse.Namespace) -> tuple[Path, list[Path] | None, str]:
    from reconciler.source import fetch

    if args.repo:
        co = fetch(args.repo, args.ref, cache_dir=args.cache_dir)
        paths = [co.path / args.path] if args.path else None
        if paths and not paths[0].exists():
            raise FileNotFoundError(f"{args.path} does not exist in {co.url} at {co.revision[:12]}")
        return co.path, paths, co.revision
    path = Path(args.path or ".")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    root = path if path.is_dir() else path.parent
    return root, None if path.is_dir() else [path], "local"


def _client(args: argparse.Namespace, *, required: bool) -> Any:
    from reconciler import kube

    if not required and not kube.has_cluster_config(args.kubeconfig):
        return None
    return kube.api_client(args.kubeconfig, args.context)


def _print_problems(problems: Sequence[Any]) -> None:
    for p in problems:
        print(p.format(), file=sys.stderr)


# --- commands ---------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    from reconciler.controller import run_pass
    from reconciler.plan import Op, format_plan

    root, paths, revision = _resolve_source(args)
    api = _client(args, required=False)
    res = run_pass(
        root, paths, api, revision=revision, instance=args.instance, strict=args.strict,
        prune=not args.no_prune, apply=False, ignore_unknown_kinds=args.ignore_unknown_kinds,
    )  # fmt: skip
    _print_problems(res.problems)
    if res.errors or res.plan is None:
        print(f"{len(res.errors)} error(s): nothing planned.", file=sys.stderr)
        return EXIT_FINDINGS
    if args.output == "text":
        if revision != "local":
            print(f"Revision {revision} of {args.repo} ({args.ref})")
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
            print(yaml.safe_dump_all(objs, sort_keys=False), end="")
    if args.exit_code and res.plan.has_changes:
        return EXIT_FINDINGS
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    from reconciler.controller import run_pass

    root, paths, revision = _resolve_source(args)
    api = _client(args, required=True)
    res = run_pass(
        root, paths, api, revision=revision, instance=args.instance, strict=args.strict,
        prune=not args.no_prune, ignore_unknown_kinds=args.ignore_unknown_kinds,
    )  # fmt: skip
    _print_problems(res.problems)
    where = f"revision {revision[:12]}" if revision != "local" else str(args.path or ".")
    if res.errors or res.plan is None:
        print(f"{len(res.errors)} error(s) in {where}: nothing applied.", file=sys.stderr)
        return EXIT_FINDINGS
    plan, outcome = res.plan, res.outcome
    if outcome is None:
        print(f"No changes: the cluster matches {where} ({plan.summary()}).")
        for a in plan.blocked:
            print(f"blocked {a.ref()}: {a.reason}")
    else:
        done = {
            op: sum(1 for a in outcome.done if a.op is op) for op in set(a.op for a in outcome.done)
        }
        from reconciler.plan import Op

        print(
            f"Applied {where}: {done.get(Op.CREATE, 0)} created, {done.get(Op.UPDATE, 0)} updated, "
            f"{done.get(Op.PRUNE, 0)} pruned, {len(outcome.failed) + len(outcome.dry_run_failed)} failed, "
            f"{len(plan.blocked)} blocked, {plan.count(Op.UNCHANGED)} unchanged."
        )
    return EXIT_OK if res.converged else EXIT_FINDINGS


def cmd_reconcile(args: argparse.Namespace) -> int:
    from reconciler.controller import jittered, run_pass, sleep_until

    interval = parse_duration(args.interval)
    api = _client(args, required=True)
    last_rc = EXIT_OK
    while True:
        started = time.monotonic()
        try:
            root, paths, revision = _resolve_source(args)
            res = run_pass(
                root, paths, api, revision=revision, instance=args.instance, strict=args.strict,
                prune=not args.no_prune, ignore_unknown_kinds=args.ignore_unknown_kinds,
                out=lambda s: logging.getLogger("underlay.reconcile").info(s),
            )  # fmt: skip
            for p in res.problems:
                logging.getLogger("underlay.reconcile").warning(p.format())
            last_rc = EXIT_OK if res.converged else EXIT_FINDINGS
            if res.errors:
                logging.getLogger("underlay.reconcile").error(
                    "revision %s has %d error(s): nothing applied, the cluster keeps the last good revision",
                    revision, len(res.errors),
                )  # fmt: skip
            elif res.plan is not None and not res.plan.has_changes:
                logging.getLogger("underlay.reconcile").info("revision %s: no changes", revision)
        except Exception as exc:  # keep the loop alive; report and retry next interval
            logging.getLogger("underlay.reconcile").error("pass failed: %s", exc)
            last_rc = EXIT_ERROR
        if args.once:
            return last_rc
        sleep_until(started + jittered(interval))


def cmd_agent(args: argparse.Namespace) -> int:
    from node_agent import daemon

    return daemon.run(args)


def cmd_crds(args: argparse.Namespace) -> int:
    from reconciler import crdgen

    crds = crdgen.generate_all()
    if args.out_dir:
        for path in crdgen.write_all(args.out_dir, crds):
            print(path)
    else:
        print(yaml.safe_dump_all(crds, sort_keys=False), end="")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``underlay``; returns the exit code (see module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        rc: int = args.func(args)
        return rc
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # every error gets a clear line and exit code 2
        from reconciler.source import SourceError, redact

        if args.verbose and not isinstance(exc, SourceError):
            raise
        print(f"underlay {args.command}: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
