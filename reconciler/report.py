"""Output formats of ``underlay validate``: text, json, github, junit, sarif.

- ``text``: one :meth:`Problem.format` line per problem, then a summary line; ANSI colour only
  when asked for (``use_color``: a TTY and no ``NO_COLOR``, https://no-color.org). File and
  object names come from pull requests, so control characters in any part of a line are
  written escaped (``\x1b``, ``\n``; see :func:`printable`): a name cannot move the cursor,
  recolour the terminal or forge another line.
- ``json``: ``{"version": 1, "summary": {...}, "problems": [Problem.to_dict(), ...]}``.
- ``github``: GitHub Actions workflow commands (``::error file=...,line=...,col=...,title=...::``)
  so findings show as annotations on the pull request (control characters escaped as in
  ``text``, then the workflow-command escapes).
- ``junit``: JUnit XML, one test case per file read (failing when it has errors), as CI
  systems (GitLab, Jenkins) display test reports (control characters escaped: XML 1.0 cannot
  hold them).
- ``sarif``: SARIF 2.1.0 (OASIS), one run, every rule of ``reconciler.rules.RULES`` listed,
  one result per problem, for GitHub code scanning and other SARIF viewers.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any, TextIO
from urllib.parse import quote

from reconciler.loader import ERROR, WARNING, Problem
from reconciler.rules import RULES

FORMATS = ("text", "json", "github", "junit", "sarif")
TOOL_NAME = "underlay validate"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


@dataclass(frozen=True)
class Summary:
    """Counts for the summary line: files read, documents loaded, errors, warnings."""

    files: int
    documents: int
    errors: int
    warnings: int
    strict: bool = False

    @classmethod
    def of(
        cls, problems: Sequence[Problem], files: int, documents: int, strict: bool = False
    ) -> Summary:
        """Count ``problems`` by severity."""
        errors = sum(1 for p in problems if p.severity == ERROR)
        return cls(files, documents, errors, len(problems) - errors, strict)

    def line(self) -> str:
        """``2 errors, 1 warning in 3 files (5 documents)`` or ``ok: 5 documents in 3 files``."""
        files = f"{self.files} file{'' if self.files == 1 else 's'}"
        docs = f"{self.documents} document{'' if self.documents == 1 else 's'}"
        if not self.errors and not self.warnings:
            return f"ok: {docs} in {files}"
        parts = []
        if self.errors:
            parts.append(f"{self.errors} error{'' if self.errors == 1 else 's'}")
        if self.warnings:
            parts.append(f"{self.warnings} warning{'' if self.warnings == 1 else 's'}")
        return f"{', '.join(parts)} in {files} ({docs})"


def use_color(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set non-empty or TERM=dumb."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    if env.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


_RESET, _BOLD, _RED, _YELLOW, _DIM = "\033[0m", "\033[1m", "\033[31m", "\033[33m", "\033[2m"

_UNPRINTABLE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(s: str) -> str:
    """``s`` with control characters escaped the way Python writes them in a string literal.

    C0 controls (ESC becomes ``\x1b``, newline ``\n``), DEL, C1 controls and the Unicode
    line separators and bidirectional overrides/isolates (Trojan Source, CVE-2021-42574,
    shown as ``\u202e``) are escaped; everything else, non-ASCII letters included, is kept.
    """
    return _UNPRINTABLE.sub(_escape, s) if _UNPRINTABLE.search(s) else s


def _safe(p: Problem) -> Problem:
    """``p`` with every text field passed through :func:`printable`."""
    fields: dict[str, Any] = {
        k: printable(v)
        for k, v in (
            ("file", p.file),
            ("kind", p.kind),
            ("namespace", p.namespace),
            ("name", p.name),
            ("field", p.field),
            ("message", p.message),
            ("hint", p.hint),
        )
        if isinstance(v, str) and _UNPRINTABLE.search(v)
    }
    return replace(p, **fields) if fields else p


def _color_line(p: Problem) -> str:
    sev_color = _RED if p.severity == ERROR else _YELLOW
    head = f"{_BOLD}{p.file}:{p.line}:{p.column}:{_RESET} {_BOLD}{sev_color}{p.severity}:{_RESET} "
    plain = p.format()
    body = plain.split(f": {p.severity}: ", 1)[1]
    if p.hint and body.endswith(f" ({p.hint})"):
        body = body[: -len(p.hint) - 3] + f" {_DIM}({p.hint}){_RESET}"
    return head + body


def text(problems: Sequence[Problem], summary: Summary, *, color: bool = False) -> str:
    """Human-readable lines plus the summary line (see module docstring)."""
    problems = [_safe(p) for p in problems]
    lines = [_color_line(p) if color else p.format() for p in problems]
    lines.append(summary.line())
    return "\n".join(lines) + "\n"


def to_json(problems: Sequence[Problem], summary: Summary) -> str:
    """Machine-readable document (stable keys; ``version`` bumps on incompatible change)."""
    doc = {
        "version": 1,
        "tool": TOOL_NAME,
        "summary": {
            "files": summary.files,
            "documents": summary.documents,
            "errors": summary.errors,
            "warnings": summary.warnings,
            "strict": summary.strict,
        },
        "problems": [p.to_dict() for p in problems],
    }
    return json.dumps(doc, indent=2) + "\n"


def _gh_data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_prop(s: str) -> str:
    return _gh_data(s).replace(":", "%3A").replace(",", "%2C")


def github(problems: Sequence[Problem], summary: Summary) -> str:
    """GitHub Actions workflow commands, one per problem, then the summary line."""
    lines = []
    for p in map(_safe, problems):
        level = "error" if p.severity == ERROR else "warning"
        body = p.format().split(f": {p.severity}: ", 1)[1]
        props = (
            f"file={_gh_prop(p.file)},line={p.line},col={p.column},"
            f"title={_gh_prop(f'underlay validate: {p.rule}')}"
        )
        lines.append(f"::{level} {props}::{_gh_data(body)}")
    lines.append(summary.line())
    return "\n".join(lines) + "\n"


def junit(problems: Sequence[Problem], summary: Summary, files: Sequence[str]) -> str:
    """JUnit XML: one test case per file (files without problems pass)."""
    by_file: dict[str, list[Problem]] = {printable(f): [] for f in files}
    for p in map(_safe, problems):
        by_file.setdefault(p.file, []).append(p)
    failures = sum(1 for ps in by_file.values() if any(p.severity == ERROR for p in ps))
    suites = ET.Element(
        "testsuites", name=TOOL_NAME, tests=str(len(by_file)), failures=str(failures), errors="0"
    )
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=TOOL_NAME,
        tests=str(len(by_file)),
        failures=str(failures),
        errors="0",
        skipped="0",
    )
    for f in sorted(by_file):
        ps = by_file[f]
        case = ET.SubElement(suite, "testcase", classname="underlay.validate", name=f)
        errors = [p for p in ps if p.severity == ERROR]
        if errors:
            fail = ET.SubElement(
                case,
                "failure",
                type=errors[0].rule,
                message=f"{len(errors)} error{'' if len(errors) == 1 else 's'}: {errors[0].message}",
            )
            fail.text = "\n".join(p.format() for p in ps)
        elif ps:
            out = ET.SubElement(case, "system-out")
            out.text = "\n".join(p.format() for p in ps)
    ET.indent(suites)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
    )


def _version() -> str:
    try:
        return metadata.version("underlay-gitops")
    except metadata.PackageNotFoundError:  # pragma: no cover - source tree without install
        return "0"


def sarif(problems: Sequence[Problem], summary: Summary) -> str:
    """SARIF 2.1.0 log with one run (see module docstring)."""
    ids = list(RULES)
    index = {r: i for i, r in enumerate(ids)}
    rules = [
        {
            "id": r.id,
            "name": r.id,
            "shortDescription": {"text": r.summary},
            "defaultConfiguration": {"level": "error" if r.severity == ERROR else "warning"},
            "properties": {"stage": r.stage},
        }
        for r in RULES.values()
    ]
    results: list[dict[str, Any]] = []
    for p in problems:
        body = p.format().split(f": {p.severity}: ", 1)[1]
        result: dict[str, Any] = {
            "ruleId": p.rule,
            "level": "error" if p.severity == ERROR else "warning",
            "message": {"text": body},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": quote(p.file), "uriBaseId": "%SRCROOT%"},
                        "region": {"startLine": p.line, "startColumn": p.column},
                    }
                }
            ],
            "properties": {
                k: v
                for k, v in (
                    ("kind", p.kind),
                    ("namespace", p.namespace),
                    ("name", p.name),
                    ("field", p.field),
                    ("hint", p.hint),
                )
                if v
            },
        }
        if p.rule in index:
            result["ruleIndex"] = index[p.rule]
        results.append(result)
    log = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": TOOL_NAME,
                        "version": _version(),
                        "informationUri": "https://underlay.dev",
                        "rules": rules,
                    }
                },
                "columnKind": "unicodeCodePoints",
                "results": results,
            }
        ],
    }
    return json.dumps(log, indent=2) + "\n"


def render(
    problems: Sequence[Problem],
    fmt: str,
    *,
    files: Sequence[str],
    documents: int,
    strict: bool = False,
    color: bool = False,
) -> str:
    """The whole output of ``underlay validate`` in ``fmt`` (one of :data:`FORMATS`).

    Raises ValueError for an unknown format.
    """
    summary = Summary.of(problems, len(set(files)), documents, strict)
    if fmt == "text":
        return text(problems, summary, color=color)
    if fmt == "json":
        return to_json(problems, summary)
    if fmt == "github":
        return github(problems, summary)
    if fmt == "junit":
        return junit(problems, summary, files)
    if fmt == "sarif":
        return sarif(problems, summary)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


__all__ = ["FORMATS", "WARNING", "Summary", "printable", "render", "use_color"]
