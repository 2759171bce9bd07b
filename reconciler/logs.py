"""Logging set-up: JSON lines for log collectors, or text for people at a terminal.

``--log-format json`` writes one JSON object per line on stderr::

    {"ts": "2025-05-01T12:00:00.123Z", "level": "info", "logger": "underlay.reconcile",
     "msg": "created SpiderIPPool ippool-test", "revision": "9f1c..."}

(``extra={"revision": ...}`` on a log call adds fields). The default is ``json`` when stderr
is not a terminal (in a pod) and ``text`` when it is. Every message and string field passes
through :func:`reconciler.source.redact`, so a token in a Git URL is never logged. In text,
control characters in a message (a newline, a carriage return, an escape sequence) are
written escaped (``\\n``, ``\\x1b``), so a value logged from a request (a CNI container ID)
can never start a line of its own that looks like another record; tracebacks keep their
newlines.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from typing import Any, TextIO

_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def escape_control(text: str, *, newlines: bool = True) -> str:
    """``text`` with C0/C1 control characters and Unicode line separators written as Python
    escapes (``\\n``, ``\\r``, ``\\x1b``, ``\\u2028``); tabs are kept, and newlines too when
    ``newlines`` is False."""
    pattern = _CONTROL if newlines else _CONTROL_BUT_NEWLINE
    return pattern.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()) | {
    "message",
    "asctime",
    "taskName",
}


def _redact(text: str) -> str:
    # source_auth, not source: a record logged while reconciler.source imports gitpython (git
    # logs its own start-up at debug level) must not import source again half-way
    from reconciler.source_auth import redact

    return redact(text)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts (UTC, ms), level, logger, msg, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC)
        out: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _redact(record.getMessage()),
        }
        for k, v in record.__dict__.items():
            if k in _STANDARD or k.startswith("_"):
                continue
            out[k] = _redact(v) if isinstance(v, str) else v
        if record.exc_info:
            out["exc"] = _redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)


class RedactingFormatter(logging.Formatter):
    """The text format (time level logger: message), credentials redacted, control characters
    escaped (:func:`escape_control`; one record is one line, plus its traceback if any)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        record.message = escape_control(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message

    def formatException(self, ei: Any) -> str:
        """The traceback, control characters escaped and every line indented (an exception
        message holding a newline cannot start a line that looks like a record)."""
        text = escape_control(super().formatException(ei), newlines=False)
        return "\n".join("  " + line for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:
        return escape_control(super().formatStack(stack_info), newlines=False)

    def format(self, record: logging.LogRecord) -> str:
        return _redact(super().format(record))


def default_format(stream: TextIO | None = None) -> str:
    """``text`` when ``stream`` (stderr) is a terminal, else ``json``."""
    s = stream or sys.stderr
    try:
        return "text" if s.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(fmt: str | None = None, *, verbose: bool = False, stream: TextIO | None = None) -> None:
    """Configure the root logger: ``fmt`` json|text (None: :func:`default_format`) on
    ``stream`` (stderr), level DEBUG with ``verbose`` else INFO."""
    s = stream or sys.stderr
    fmt = fmt or default_format(s)
    handler = logging.StreamHandler(s)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(RedactingFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # the client's leader election and urllib3 are chatty at INFO/DEBUG
    logging.getLogger("urllib3").setLevel(logging.WARNING)
