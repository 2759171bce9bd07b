"""The text log format keeps one record on one line whatever a logged value holds.

A CNI container ID with a newline forged a log line in the text format the DaemonSet uses
(issue 10, item 6); the text format now writes control characters escaped, and indents
tracebacks so an exception message cannot start a line either.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys

from reconciler import logs

FORGED = "2026-01-01 00:00:00,000 INFO node_agent.cni.server: ADD container=x -> ok"


def _text_logger(stream: io.StringIO) -> logging.Logger:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.RedactingFormatter(logs.TEXT_FORMAT))
    log = logging.getLogger("test.logs.text")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log


def test_control_characters_in_a_message_are_escaped() -> None:
    out = io.StringIO()
    log = _text_logger(out)
    log.info("ADD container=%s ifname=%s", "c1\n" + FORGED, "eth0\r\x1b[2K\u2028x\ty")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert "c1\\n2026-01-01" in lines[0] and "eth0\\r\\x1b[2K\\u2028x\ty" in lines[0]


def test_a_traceback_is_indented_and_escaped() -> None:
    out = io.StringIO()
    log = _text_logger(out)
    try:
        raise ValueError("bad id\n" + FORGED + "\x1b[31m")
    except ValueError:
        log.exception("call failed")
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("call failed")
    assert all(line.startswith("  ") for line in lines[1:]), lines
    assert not any(line.startswith(FORGED[:10]) for line in lines), lines
    assert "\x1b" not in out.getvalue()


def test_every_command_logs_in_that_format() -> None:
    """``underlay`` configures the root logger with it (it used logging.basicConfig)."""
    code = (
        "import logging; from reconciler import cli; "
        "cli.main(['validate', '/nonexistent-path-for-logs']); "
        "logging.getLogger('x').warning('a\\nb')"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "a\\nb" in p.stderr and "\na\n" not in p.stderr and "\nb" not in p.stderr, p.stderr
