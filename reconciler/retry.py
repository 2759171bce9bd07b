"""Retries with exponential backoff for every Kubernetes API request of the reconciler.

The API server answers 429 (priority and fairness, with ``Retry-After``), 500/502/503/504 when
it or etcd is briefly unwell, and connections time out or reset. client-go retries such
answers with exponential backoff and honours ``Retry-After``; the Python client does not
(it retries only some GETs), so :class:`RetryingApiClient` does it at the one place every
generated API call goes through, ``ApiClient.call_api``.

Retrying is safe for what the reconciler sends: server-side apply and status updates with a
resourceVersion are idempotent or conflict-checked, deletes carry a uid precondition (a retried
delete that already happened answers 404, which the caller treats as done), and a retried create
that already happened answers 409 AlreadyExists.
Sources: Kubernetes API concepts, "Retry-After" and API Priority and Fairness; client-go
``rest.Request`` retry behaviour (``WithRetry``, ``checkWait``).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import urllib3
from kubernetes import client

log = logging.getLogger("underlay.api")

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
"""HTTP answers worth another try: throttled, or the server (or a proxy) briefly unwell."""

TOO_LARGE = b"etcdserver: request is too large"
"""What kube-apiserver answers (500) for an object larger than etcd stores (1.5 MiB by
default, etcd ``--max-request-bytes``): never worth another try."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one request.

    ``attempts`` is the total number of tries (1 = no retry). The n-th retry waits
    ``min(cap, base * factor**(n-1))`` seconds, +/- ``jitter`` (fraction), or the server's
    ``Retry-After`` when it sent one (capped at ``max_retry_after``). ``timeout`` (seconds) is
    the per-request timeout used when the caller sets none, so a hung connection is a retryable
    error instead of a stuck reconciler.
    """

    attempts: int = 6
    base: float = 0.25
    factor: float = 2.0
    cap: float = 8.0
    jitter: float = 0.2
    timeout: float = 30.0
    max_retry_after: float = 60.0

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_retry_after))
        d = min(self.cap, self.base * self.factor ** max(0, retry - 1))
        return max(0.0, d * (1 + random.uniform(-self.jitter, self.jitter)))


NO_RETRY = RetryPolicy(attempts=1)


def retry_after_seconds(value: str | None) -> float | None:
    """Parse a ``Retry-After`` header (delta-seconds or an HTTP date, RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


RetryHook = Callable[[str, str, str, float], None]
"""Called before each retry with (method, url path, reason, delay seconds)."""


class RetryingApiClient(client.ApiClient):
    """A ``kubernetes.client.ApiClient`` that retries 429/5xx answers and transport errors.

    Drop-in for the generated API classes (``CustomObjectsApi(api)`` etc.). After the last
    attempt the final answer is returned (the generated code then raises ``ApiException``
    with its status) or the last transport error is raised (``urllib3`` timeouts, resets).
    ``on_retry`` is told about every retry (for logs and metrics).
    """

    def __init__(
        self,
        configuration: client.Configuration,
        policy: RetryPolicy = RetryPolicy(),
        on_retry: RetryHook | None = None,
    ) -> None:
        # urllib3 must not retry on its own: one policy, one place (and POST/PATCH included)
        configuration.retries = False
        super().__init__(configuration)
        self.policy = policy
        self.on_retry = on_retry

    def call_api(
        self,
        method: str,
        url: str,
        header_params: Any = None,
        body: Any = None,
        post_params: Any = None,
        _request_timeout: Any = None,
    ) -> Any:
        """``ApiClient.call_api`` with retries (see the class docstring)."""
        timeout = _request_timeout or self.policy.timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = super().call_api(
                    method, url, header_params, body, post_params, _request_timeout=timeout
                )
            except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
                if attempt >= self.policy.attempts:
                    raise
                self._wait(method, url, type(exc).__name__, self.policy.delay(attempt))
                continue
            if resp.status not in RETRY_STATUS or attempt >= self.policy.attempts:
                return resp
            after = retry_after_seconds(resp.getheader("Retry-After"))
            answer = b""
            with contextlib.suppress(urllib3.exceptions.HTTPError, OSError):
                answer = resp.read() or b""  # drain so the connection goes back to the pool
            if resp.status == 500 and TOO_LARGE in answer:
                return resp  # the same object is as large on every try (read() keeps the body)
            self._wait(method, url, str(resp.status), self.policy.delay(attempt, after))

    def _wait(self, method: str, url: str, reason: str, delay: float) -> None:
        path = url.split("://", 1)[-1]
        path = "/" + path.split("/", 1)[1] if "/" in path else path
        log.warning("%s %s: %s, retrying in %.2fs", method, path.split("?")[0], reason, delay)
        if self.on_retry is not None:
            self.on_retry(method, path, reason, delay)
        time.sleep(delay)
