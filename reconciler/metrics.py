"""Prometheus metrics of the reconciler, in the text exposition format (version 0.0.4).

``prometheus_client`` is not a dependency of underlay, so this module implements the three
metric types the reconciler needs (counter, gauge, histogram) and renders them as the text
format Prometheus scrapes from ``/metrics``. Thread-safe.

Metrics (all prefixed ``underlay_``)::

    reconcile_duration_seconds{result}       histogram  one pass, source to status (success|failure)
    reconcile_total{result}                  counter    passes by result (success|failure)
    last_success_timestamp_seconds           gauge      Unix time of the last successful pass
    objects_applied_total{kind,op}           counter    objects created/updated (op create|update)
    objects_pruned_total{kind}               counter    objects deleted by prune
    drift_detected_total{kind}               counter    objects found changed/deleted by hand
    blocked_objects                          gauge      actions refused for safety in the last pass
    inventory_objects                        gauge      objects in this instance's inventory
    pool_allocated_ips{pool}                 gauge      SpiderIPPool status.allocatedIPCount
    pool_total_ips{pool}                     gauge      SpiderIPPool status.totalIPCount
    leader                                   gauge      1 while this replica holds the Lease
    api_retries_total{reason}                counter    API requests retried (HTTP code or error)
    applied_revision_info{revision}          gauge      1 for the revision last applied

Source: Prometheus "Exposition formats" (text format 0.0.4) and "Metric types"; naming after
Prometheus "Metric and label naming" (base units, ``_total``, ``_seconds``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelValues = tuple[str, ...]


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _escape_label(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n")


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}"
            )
        return tuple(str(labels[n]) for n in self.labelnames)

    def samples(self) -> Iterable[str]:
        """The sample lines of this metric (text format, no trailing newline)."""
        raise NotImplementedError

    def render(self) -> str:
        """HELP, TYPE and sample lines, newline-terminated."""
        head = f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.samples())


class Counter(_Metric):
    """A value that only goes up (``inc``); one series per label values."""

    kind = "counter"

    def __init__(self, name: str, help_: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_, labelnames)
        self.values: dict[LabelValues, float] = {}
        if not self.labelnames:
            self.values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` (>= 0) to the series of ``labels``; ValueError for a negative amount."""
        if amount < 0:
            raise ValueError(f"{self.name}: counters only go up (got {amount})")
        k = self._key(labels)
        with self._lock:
            self.values[k] = self.values.get(k, 0.0) + amount

    def get(self, **labels: str) -> float:
        """The value of the series of ``labels`` (counter: 0, gauge: None when unset)."""
        with self._lock:
            return self.values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[str]:
        """The sample lines of this metric (text format, no trailing newline)."""
        with self._lock:
            items = sorted(self.values.items())
        for k, v in items:
            yield f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}"


class Gauge(_Metric):
    """A value that goes up and down (``set``); ``remove``/``replace`` drop stale series."""

    kind = "gauge"

    def __init__(self, name: str, help_: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_, labelnames)
        self.values: dict[LabelValues, float] = {}

    def set(self, value: float, **labels: str) -> None:
        """Set the series of ``labels`` to ``value``."""
        k = self._key(labels)
        with self._lock:
            self.values[k] = float(value)

    def get(self, **labels: str) -> float | None:
        """The value of the series of ``labels`` (counter: 0, gauge: None when unset)."""
        with self._lock:
            return self.values.get(self._key(labels))

    def replace(self, series: dict[LabelValues, float]) -> None:
        """Set exactly these series (label values tuple -> value), dropping all others."""
        with self._lock:
            self.values = {tuple(k): float(v) for k, v in series.items()}

    def samples(self) -> Iterable[str]:
        """The sample lines of this metric (text format, no trailing newline)."""
        with self._lock:
            items = sorted(self.values.items())
        for k, v in items:
            yield f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}"


DEFAULT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help_, labelnames)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        """Count ``value`` (seconds) into the buckets of the series of ``labels``."""
        k = self._key(labels)
        with self._lock:
            counts, acc = self.series.setdefault(k, ([0] * (len(self.buckets) + 1), [0.0]))
            for i, b in enumerate(self.buckets):
                if value <= b:
                    counts[i] += 1
            counts[-1] += 1
            acc[0] += value

    def count(self, **labels: str) -> int:
        """How many observations the series of ``labels`` has."""
        with self._lock:
            s = self.series.get(self._key(labels))
            return s[0][-1] if s else 0

    def samples(self) -> Iterable[str]:
        """The sample lines of this metric (text format, no trailing newline)."""
        with self._lock:
            items = sorted((k, (list(c), a[0])) for k, (c, a) in self.series.items())
        for k, (counts, total) in items:
            for b, c in zip((*self.buckets, math.inf), counts, strict=True):
                le = 'le="' + _fmt(b) + '"'
                yield f"{self.name}_bucket{_labels(self.labelnames, k, le)} {c}"
            yield f"{self.name}_sum{_labels(self.labelnames, k)} {_fmt(total)}"
            yield f"{self.name}_count{_labels(self.labelnames, k)} {counts[-1]}"


class Registry:
    """The set of metrics one process exposes; ``render()`` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        """Register ``metric``; ValueError when its name is taken."""
        if any(m.name == metric.name for m in self.metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        """HELP, TYPE and sample lines, newline-terminated."""
        return "".join(m.render() for m in self.metrics)


class ReconcilerMetrics:
    """The reconciler's metrics (see the module docstring) in one :class:`Registry`."""

    def __init__(self, prefix: str = "underlay_") -> None:
        p = prefix
        self.registry = Registry()
        r = self.registry
        self.duration = Histogram(
            p + "reconcile_duration_seconds",
            "Duration of one reconcile pass (source, plan, apply, status), by result.",
            ["result"],
        )
        self.passes = Counter(p + "reconcile_total", "Reconcile passes by result.", ["result"])
        self.last_success = Gauge(
            p + "last_success_timestamp_seconds",
            "Unix time of the end of the last successful reconcile pass.",
        )
        self.applied = Counter(
            p + "objects_applied_total",
            "Objects created or updated by server-side apply.",
            ["kind", "op"],
        )
        self.pruned = Counter(p + "objects_pruned_total", "Objects deleted by prune.", ["kind"])
        self.drift = Counter(
            p + "drift_detected_total",
            "Objects found changed or deleted in the cluster by hand.",
            ["kind"],
        )
        self.blocked = Gauge(
            p + "blocked_objects", "Actions the last pass refused for safety (see the plan)."
        )
        self.inventory = Gauge(
            p + "inventory_objects", "Objects in this reconciler instance's inventory."
        )
        self.pool_allocated = Gauge(
            p + "pool_allocated_ips",
            "Allocated IPs of a SpiderIPPool (status.allocatedIPCount).",
            ["pool"],
        )
        self.pool_total = Gauge(
            p + "pool_total_ips",
            "Allocatable IPs of a SpiderIPPool (status.totalIPCount).",
            ["pool"],
        )
        self.leader = Gauge(p + "leader", "1 while this replica holds the leader Lease, else 0.")
        self.retries = Counter(
            p + "api_retries_total",
            "Kubernetes API requests retried, by reason (HTTP status or error).",
            ["reason"],
        )
        self.revision = Gauge(
            p + "applied_revision_info", "1 for the revision last fully applied.", ["revision"]
        )
        for m in (
            self.duration,
            self.passes,
            self.last_success,
            self.applied,
            self.pruned,
            self.drift,
            self.blocked,
            self.inventory,
            self.pool_allocated,
            self.pool_total,
            self.leader,
            self.retries,
            self.revision,
        ):
            r.add(m)
        self.leader.set(0)

    def on_retry(self, method: str, path: str, reason: str, delay: float) -> None:
        """Hook for :class:`reconciler.retry.RetryingApiClient`."""
        self.retries.inc(reason=reason)

    def render(self) -> str:
        """HELP, TYPE and sample lines, newline-terminated."""
        return self.registry.render()
