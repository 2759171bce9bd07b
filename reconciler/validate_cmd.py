"""``underlay validate [PATH...]``: check the operators' YAML in CI, before anything is applied.

Runs the same loader and validator as the reconciler. Exit codes (kubeconform/check-jsonschema
convention, reference/gitops.md): 0 clean (warnings allowed), 1 findings (any error; under
``--strict`` any warning too), 2 usage or internal error.

The lead's ``reconciler/cli.py`` calls :func:`register`; ``python -m reconciler.validate_cmd``
runs the command on its own.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reconciler import report
from reconciler.loader import DEFAULT_MAX_FILE_BYTES, load_repo
from reconciler.validation import finalize, has_errors, validate

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2

DESCRIPTION = """\
Load every .yaml/.yml document under PATH (files or directories; default: the current
directory) and check it: YAML safety (duplicate keys, alias bombs, size), JSON Schemas of
OvsBridge, SpiderIPPool and SpiderMultusConfig, and the rules across files (canonical subnets,
addresses inside subnets, overlapping pools, references to bridges, pools and Multus configs).
Every problem names file:line:column, the object and what to write instead.
"""

EPILOG = """\
exit codes: 0 clean (warnings allowed unless --strict), 1 findings, 2 usage or internal error
colour: only on a terminal; set NO_COLOR=1 to turn it off
"""


def register(subparsers: Any) -> None:
    """Add the ``validate`` subcommand to an argparse ``subparsers`` object (sets ``func``)."""
    p = subparsers.add_parser(
        "validate",
        help="check the YAML of a repository (for CI and pre-commit)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``validate`` (shared by :func:`register` and :func:`main`)."""
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="files or directories to check (default: all of --root, i.e. the current directory)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="treat warnings (e.g. references to objects not in the repository) as errors",
    )
    p.add_argument(
        "--ignore-unknown-kinds",
        action="store_true",
        help="skip documents of kinds underlay does not manage instead of reporting them",
    )
    p.add_argument(
        "--format",
        choices=report.FORMATS,
        default="text",
        help="output format (default: %(default)s)",
    )
    p.add_argument(
        "--root",
        default=None,
        help="repository root: file names are shown relative to it and symlinks may not leave "
        "it (default: the current directory, or the directory holding every PATH when a PATH "
        "lies outside it)",
    )
    p.add_argument(
        "--max-file-bytes",
        type=int,
        default=DEFAULT_MAX_FILE_BYTES,
        metavar="N",
        help="refuse files larger than N bytes (default: %(default)s)",
    )


def run(args: argparse.Namespace, out: Any = None, err: Any = None) -> int:
    """Run ``validate`` for parsed ``args``; write the report to ``out`` (default stdout).

    Returns the exit code: 0 clean, 1 findings, 2 usage error (bad root or path) or internal
    error (the message goes to ``err``, default stderr).
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if args.root and not Path(args.root).is_dir():
        print(f"underlay validate: error: root {args.root} is not a directory", file=err)
        return EXIT_ERROR
    if args.max_file_bytes <= 0:
        print("underlay validate: error: --max-file-bytes must be positive", file=err)
        return EXIT_ERROR
    paths: list[Path] = []
    for raw in args.paths or [args.root or "."]:
        path = Path(raw)
        if not path.is_absolute():
            path = Path.cwd() / path
        if not os.path.lexists(path):
            print(f"underlay validate: error: {raw}: no such file or directory", file=err)
            return EXIT_ERROR
        paths.append(path)
    root = Path(args.root) if args.root else _default_root(paths)
    resolved_root = root.resolve()
    for raw, path in zip(args.paths or [], paths, strict=False):
        if not _inside(Path(os.path.abspath(path)), Path(os.path.abspath(root))) and not _inside(
            path.resolve(), resolved_root
        ):
            print(f"underlay validate: error: {raw} is outside the root {root} (--root)", file=err)
            return EXIT_ERROR
    try:
        loaded = load_repo(
            root,
            paths,
            ignore_unknown_kinds=args.ignore_unknown_kinds,
            max_file_bytes=args.max_file_bytes,
        )
        # only some files of the repository: "not in the files checked", not "in the repository"
        root_abs = Path(os.path.abspath(root))
        partial = bool(args.paths) and all(Path(os.path.abspath(p)) != root_abs for p in paths)
        problems = loaded.problems + validate(loaded.documents, partial=partial)
        problems = finalize(problems, strict=args.strict)
        text = report.render(
            problems,
            args.format,
            files=loaded.files,
            documents=len(loaded.documents),
            strict=args.strict,
            color=args.format == "text" and report.use_color(out),
        )
    except Exception as exc:  # internal error: exit 2 with a clear line, never a half report
        print(f"underlay validate: internal error: {type(exc).__name__}: {exc}", file=err)
        return EXIT_ERROR
    out.write(text)
    out.flush()
    if not loaded.files:  # CI pointed at the wrong directory must not pass unnoticed
        where = " ".join(str(p) for p in args.paths) if args.paths else str(root)
        level = "error" if args.strict else "warning"
        print(
            f"underlay validate: {level}: no .yaml/.yml files under {where}"
            + ("" if args.strict else " (an error under --strict)"),
            file=err,
        )
        if args.strict:
            return EXIT_FINDINGS
    return EXIT_FINDINGS if has_errors(problems) else EXIT_OK


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _default_root(paths: list[Path]) -> Path:
    """The current directory when it holds every path, else their deepest common directory."""
    cwd = Path.cwd()
    absolute = [Path(os.path.abspath(p)) for p in paths]
    if all(_inside(p, cwd) for p in absolute):
        return cwd
    dirs = [p if p.is_dir() else p.parent for p in absolute]
    return Path(os.path.commonpath([str(d) for d in dirs]))


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m reconciler.validate_cmd [PATH...]``."""
    parser = argparse.ArgumentParser(
        prog="underlay validate",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
