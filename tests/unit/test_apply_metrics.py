"""The reconciler's observability parts on their own: the Prometheus text format it serves,
JSON log lines, and the liveness probe that fails while a pass is stuck."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

import pytest

from reconciler import logs
from reconciler.metrics import Counter, Gauge, Histogram, ReconcilerMetrics, Registry
from tests.unit.test_apply import QUICK, World


def test_text_exposition_format() -> None:
    reg = Registry()
    c = Counter("x_total", "A counter\nwith a newline and a \\ backslash.", ["kind"])
    g = Gauge("y", "A gauge.", ["pool"])
    h = Histogram("z_seconds", "A histogram.", ["result"], buckets=(0.1, 1.0))
    for m in (c, g, h):
        reg.add(m)
    c.inc(kind='We"ird\\name\n')
    c.inc(2, kind="SpiderIPPool")
    g.set(3.5, pool="a")
    g.set(7, pool="b")
    for v in (0.05, 0.5, 5.0):
        h.observe(v, result="success")
    text = reg.render()
    assert text.splitlines() == [
        "# HELP x_total A counter\\nwith a newline and a \\\\ backslash.",
        "# TYPE x_total counter",
        'x_total{kind="SpiderIPPool"} 2',
        'x_total{kind="We\\"ird\\\\name\\n"} 1',
        "# HELP y A gauge.",
        "# TYPE y gauge",
        'y{pool="a"} 3.5',
        'y{pool="b"} 7',
        "# HELP z_seconds A histogram.",
        "# TYPE z_seconds histogram",
        'z_seconds_bucket{result="success",le="0.1"} 1',
        'z_seconds_bucket{result="success",le="1"} 2',
        'z_seconds_bucket{result="success",le="+Inf"} 3',
        'z_seconds_sum{result="success"} 5.55',
        'z_seconds_count{result="success"} 3',
    ]
    with pytest.raises(ValueError, match="only go up"):
        c.inc(-1, kind="x")
    with pytest.raises(ValueError, match="takes labels"):
        g.set(1, node="n1")
    with pytest.raises(ValueError, match="registered twice"):
        reg.add(Gauge("y", "again"))
    g.replace({("c",): 1})
    assert 'y{pool="a"}' not in reg.render() and 'y{pool="c"} 1' in reg.render()
    names = [m.name for m in ReconcilerMetrics().registry.metrics]
    assert "underlay_reconcile_duration_seconds" in names
    assert "underlay_last_success_timestamp_seconds" in names
    assert {"underlay_objects_applied_total", "underlay_objects_pruned_total"} <= set(names)
    assert {"underlay_pool_allocated_ips", "underlay_pool_total_ips"} <= set(names)


def test_json_log_lines_are_redacted() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("underlay.test")
    logger.addHandler(handler)
    try:
        logger.warning(
            "cannot fetch https://bot:hunter2@git.example/net.git", extra={"revision": "abc"}
        )
    finally:
        logger.removeHandler(handler)
    line = json.loads(out.getvalue())
    assert line["level"] == "warning" and line["logger"] == "underlay.test"
    assert line["msg"] == "cannot fetch https://***@git.example/net.git"
    assert line["revision"] == "abc" and line["ts"].endswith("Z")
    assert logs.default_format(io.StringIO()) == "json", "not a terminal: JSON"


def test_healthz_fails_while_a_pass_is_stuck(world: World) -> None:
    world.commit(QUICK)
    rec = world.reconciler(timeout=30)
    assert rec.readyz() is not None, "not ready before the API server answered"
    assert rec.run_once().converged
    assert rec.readyz() is None and rec.healthz(stuck_after=0.5) is None
    world.kube.inject_fault(r"/gitsyncs/underlay$", method="GET", hang=2.0)
    t = threading.Thread(target=rec.run_once)
    t.start()
    time.sleep(1.0)
    why = rec.healthz(stuck_after=0.5)
    assert why is not None and why.startswith("a reconcile pass has been running for")
    t.join(10)
    assert rec.healthz(stuck_after=0.5) is None
    m: ReconcilerMetrics = rec.metrics
    assert m.duration.count(result="success") == 2
