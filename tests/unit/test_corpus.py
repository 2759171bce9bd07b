"""The corpus of bad repositories: ``tests/bad-repos/<case>/``.

Each case is a small operator repository with one or more mistakes, an ``expected.txt`` holding
the exact output of ``underlay validate`` run on it (text format, no colour), and optionally an
``args.txt`` with extra arguments (``--strict``...). Every case must exit 1. The
``symlink-escape`` case holds a symlink leading out of its repository.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from reconciler import validate_cmd

CORPUS = Path(__file__).resolve().parents[1] / "bad-repos"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())


def run_case(case: Path) -> tuple[int, str, str]:
    args_file = case / "args.txt"
    extra = args_file.read_text().split() if args_file.exists() else []
    parser = argparse.ArgumentParser()
    validate_cmd.add_arguments(parser)
    args = parser.parse_args(["--root", str(case), *extra])
    out, err = io.StringIO(), io.StringIO()
    rc = validate_cmd.run(args, out, err)
    return rc, out.getvalue(), err.getvalue()


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", CASES)
def test_bad_repo(name: str) -> None:
    case = CORPUS / name
    rc, out, err = run_case(case)
    assert (rc, err) == (1, "")
    assert out == (case / "expected.txt").read_text()
