"""Kubernetes Events (core/v1) about the GitSync object, as ``kubectl describe gitsync`` shows them.

The reconciler emits an Event when something changes (a revision applied, drift found, a
revision refused, an action blocked, a pass failing), never for a pass that changed nothing.
Messages pass through :func:`reconciler.source.redact` so credentials in URLs never reach the
API server. The node agent records its Events about OvsBridgeEnactments with the same recorder
(its own component, no redaction: it never handles Git URLs). A failure to record an Event is logged and otherwise ignored: Events are best effort,
as in client-go's EventRecorder.
Source: Kubernetes API reference, core/v1 Event (involvedObject, reason, message, type, source,
firstTimestamp, lastTimestamp, count, reportingComponent, reportingInstance).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from kubernetes import client

from reconciler.status import now_rfc3339

log = logging.getLogger("underlay.events")

COMPONENT = "underlay-reconciler"
REPORTING_CONTROLLER = "underlay.dev/reconciler"
MAX_MESSAGE = 1024
NORMAL, WARNING = "Normal", "Warning"


def _redact(text: str) -> str:
    from reconciler.source import redact

    return redact(text)


class EventRecorder:
    """Creates core/v1 Events in ``namespace`` about one object.

    ``identity`` is this replica's name (``reportingInstance`` and ``source.host``);
    ``component`` and ``controller`` are ``source.component`` and ``reportingComponent``;
    ``redact``: pass messages through :func:`reconciler.source.redact`. For a cluster-scoped
    object ``namespace`` must be ``default``: the API server refuses a core/v1 Event about an
    object without a namespace anywhere else.
    ``emitted`` lists (type, reason, message) of every Event created, for logs and tests.
    """

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        identity: str,
        *,
        component: str = COMPONENT,
        controller: str = REPORTING_CONTROLLER,
        redact: bool = True,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.identity = identity
        self.component = component
        self.controller = controller
        self.redact = redact
        self.emitted: list[tuple[str, str, str]] = []

    def emit(self, obj: Mapping[str, Any] | None, etype: str, reason: str, message: str) -> None:
        """Record an Event of ``etype`` (Normal/Warning) with ``reason`` about ``obj``.

        ``obj`` is the live object (apiVersion, kind, metadata.name/namespace/uid); with None
        nothing is recorded. Never raises for API errors (logged at warning).
        """
        if obj is None:
            return
        md = obj.get("metadata") or {}
        if self.redact:
            message = _redact(message)
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        now = now_rfc3339()
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{md.get('name')}.{time.time_ns():x}",
                "namespace": md.get("namespace") or self.namespace,
            },
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": md.get("name"),
                "namespace": md.get("namespace"),
                "uid": md.get("uid"),
                "resourceVersion": md.get("resourceVersion"),
            },
            "reason": reason,
            "message": message,
            "type": etype,
            "source": {"component": self.component, "host": self.identity},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": self.controller,
            "reportingInstance": self.identity,
        }
        from reconciler.kube import request

        try:
            request(
                self.api, "POST", f"/api/v1/namespaces/{body['metadata']['namespace']}/events", body
            )
        except Exception as exc:  # API errors and transport errors after retries
            log.warning("could not record event %s %s: %s", etype, reason, exc)
            return
        self.emitted.append((etype, reason, message))
