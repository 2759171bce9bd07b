"""Kubernetes client adapter: building an ApiClient and addressing our resources.

Everything that talks to the API server goes through the official ``kubernetes`` client; this
module only chooses the configuration (kubeconfig file, or in-cluster service account) and maps
a :class:`reconciler.vocab.Resource` onto ``CustomObjectsApi`` calls.
Source: Kubernetes API conventions; client-go loading rules (KUBECONFIG, in-cluster).
"""

from __future__ import annotations

import json
import os
from typing import Any, cast

from kubernetes import client, config

from reconciler.retry import RetryHook, RetryingApiClient, RetryPolicy
from reconciler.vocab import Resource


class NoClusterConfigured(RuntimeError):
    """Neither a kubeconfig nor an in-cluster service account is available, or the kubeconfig
    named by ``--kubeconfig``/``$KUBECONFIG`` does not exist (the message names it)."""


def _kubeconfig_path(kubeconfig: str | None) -> tuple[str | None, str]:
    """(the kubeconfig to load or None, where it came from) by client-go's loading rules:
    ``--kubeconfig``, else ``$KUBECONFIG`` (a list, the files that exist are merged), else
    ``~/.kube/config`` when it exists. A kubeconfig that was named but does not exist raises
    NoClusterConfigured naming it: it must never silently fall back to another cluster, or to
    none at all."""
    if kubeconfig:
        if not os.path.exists(kubeconfig):
            raise NoClusterConfigured(f"kubeconfig {kubeconfig} (--kubeconfig): no such file")
        return kubeconfig, kubeconfig
    env = os.environ.get("KUBECONFIG")
    if env:
        files = [f for f in env.split(os.pathsep) if f]
        if files and not any(os.path.exists(f) for f in files):
            raise NoClusterConfigured(
                f"KUBECONFIG={env}: no such file"
                + ("s" if len(files) > 1 else "")
                + " (unset KUBECONFIG to use ~/.kube/config or the in-cluster service account)"
            )
        existing = os.pathsep.join(f for f in files if os.path.exists(f))
        return existing, f"KUBECONFIG={env}"
    default = os.path.expanduser("~/.kube/config")
    if os.path.exists(default):
        return default, default
    return None, ""


def load_configuration(
    kubeconfig: str | None = None, context: str | None = None
) -> client.Configuration:
    """The client Configuration from ``kubeconfig`` (or $KUBECONFIG, ~/.kube/config), else in-cluster.

    Raises NoClusterConfigured when none of them exists or a named kubeconfig is missing, and
    the kubernetes ConfigException when a kubeconfig exists but is broken. Source: client-go
    loading rules.
    """
    path, _where = _kubeconfig_path(kubeconfig)
    cfg = client.Configuration()
    if path is not None:
        config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
        return cfg
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=cfg)
        return cfg
    raise NoClusterConfigured(
        "no cluster configured: pass --kubeconfig, set KUBECONFIG, or run in a pod"
    )


def describe_target(kubeconfig: str | None = None, context: str | None = None) -> str:
    """Which configuration a client of ``kubeconfig``/``context`` uses, for error messages:
    ``kubeconfig /root/.kube/config, context prod`` or ``in-cluster service account``. Never
    raises."""
    try:
        _path, where = _kubeconfig_path(kubeconfig)
    except NoClusterConfigured:
        where = kubeconfig or os.environ.get("KUBECONFIG") or ""
    if not where:
        return "in-cluster service account" if os.environ.get("KUBERNETES_SERVICE_HOST") else ""
    text = where if where.startswith("KUBECONFIG=") else f"kubeconfig {where}"
    return text + (f", context {context}" if context else ", its current context")


def transport_error(exc: BaseException, api: Any = None, target: str = "") -> str | None:
    """A one-line description of a failure to reach the API server (connection refused, DNS,
    TLS, timeout; the urllib3/OS errors the client raises), naming the server ``api`` talks to
    and ``target`` (see :func:`describe_target`); None when ``exc`` is not such a failure."""
    import re

    import urllib3

    if not isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return None
    reason: Any = getattr(exc, "reason", None) or exc
    text = str(reason)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if m:
        why = m.group(1).strip()
    elif isinstance(reason, (urllib3.exceptions.TimeoutError, TimeoutError)) or "timed out" in text:
        why = "timed out"
    elif "CERTIFICATE_VERIFY_FAILED" in text or "SSLError" in text:
        why = "TLS certificate not trusted"
    else:
        why = text.split(": ", 1)[-1][:200] or type(exc).__name__
    host = getattr(getattr(api, "configuration", None), "host", "") or ""
    # the connection (urllib3 NewConnectionError) or pool (MaxRetryError) that failed
    conn: Any = exc.__dict__.get("conn") or exc.__dict__.get("pool")
    if not host and conn is not None and getattr(conn, "host", None):
        scheme = getattr(conn, "scheme", None) or (
            "https" if "HTTPS" in type(conn).__name__ else "http"
        )
        port = f":{conn.port}" if getattr(conn, "port", None) else ""
        host = f"{scheme}://{conn.host}{port}"
    target = target or str(getattr(api, "underlay_target", "") or "")
    where = f" at {host}" if host else ""
    via = f" ({target})" if target else ""
    return f"cannot reach the Kubernetes API server{where}{via}: {why}"


def api_client(
    kubeconfig: str | None = None,
    context: str | None = None,
    *,
    retry: RetryPolicy | None = None,
    on_retry: RetryHook | None = None,
    user_agent: str | None = None,
) -> client.ApiClient:
    """Return an ApiClient (see :func:`load_configuration` for where the configuration comes from).

    With ``retry`` the client retries 429/5xx answers and transport errors with exponential
    backoff (:class:`reconciler.retry.RetryingApiClient`); without it, it is the plain client.
    ``user_agent`` replaces the generated client's User-Agent (API server audit logs show it).
    """
    cfg = load_configuration(kubeconfig, context)
    api = RetryingApiClient(cfg, retry, on_retry) if retry is not None else client.ApiClient(cfg)
    if user_agent:
        api.user_agent = user_agent
    cast(Any, api).underlay_target = describe_target(kubeconfig, context)  # transport_error
    return api


def default_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The namespace kubectl would use: the pod's own in a cluster, else the kubeconfig
    context's, else ``default``. Sources: kubectl, "--namespace"; the service account volume
    (``/var/run/secrets/kubernetes.io/serviceaccount/namespace``)."""
    env = os.environ.get("POD_NAMESPACE")
    if env:
        return env
    try:
        path, _where = _kubeconfig_path(kubeconfig)
    except NoClusterConfigured:
        path = None  # reported by api_client
    if path is not None:
        try:
            contexts, current = config.list_kube_config_contexts(config_file=path)
        except Exception:  # a broken kubeconfig is reported by api_client, not here
            return "default"
        ctx = next((c for c in contexts if c["name"] == context), current) if context else current
        return str(((ctx or {}).get("context") or {}).get("namespace") or "default")
    sa = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if os.path.exists(sa):
        with open(sa) as f:
            return f.read().strip() or "default"
    return "default"


def has_cluster_config(kubeconfig: str | None = None) -> bool:
    """True when a cluster is configured: ``kubeconfig`` or ``$KUBECONFIG`` given (even when
    missing: :func:`api_client` then raises naming it), ``~/.kube/config`` exists, or in a pod."""
    if kubeconfig or os.environ.get("KUBECONFIG"):
        return True
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    return os.path.exists(os.path.expanduser("~/.kube/config")) or in_cluster


class Objects:
    """CRUD on one custom resource type through ``CustomObjectsApi``.

    Objects are plain dicts as the API server returns them. Errors are the client's
    ``kubernetes.client.ApiException`` (``.status`` 404, 409, 422...).
    """

    def __init__(self, api: client.ApiClient, resource: Resource) -> None:
        self.res = resource
        self.api: Any = client.CustomObjectsApi(api)

    def _ns(self, namespace: str | None) -> list[str]:
        if self.res.namespaced:
            if not namespace:
                raise ValueError(f"{self.res.kind} is namespaced: a namespace is required")
            return [namespace]
        return []

    def get(self, name: str, namespace: str | None = None, **kw: Any) -> dict[str, Any]:
        """GET one object; ApiException 404 when absent. ``kw`` goes to the client call
        (e.g. ``_request_timeout``)."""
        r = self.res
        if r.namespaced:
            return self.api.get_namespaced_custom_object(
                r.group, r.version, namespace, r.plural, name, **kw
            )
        return self.api.get_cluster_custom_object(r.group, r.version, r.plural, name, **kw)

    def list(
        self, namespace: str | None = None, label_selector: str = "", **kw: Any
    ) -> dict[str, Any]:
        """LIST (all namespaces when ``namespace`` is None); returns the List object.

        The answer is decoded with ``json.loads`` directly (no generated-model pass over
        thousands of items).
        """
        r = self.res
        kw = {**kw, "label_selector": label_selector, "_preload_content": False}
        if r.namespaced and namespace:
            resp = self.api.list_namespaced_custom_object(
                r.group, r.version, namespace, r.plural, **kw
            )
        else:
            resp = self.api.list_cluster_custom_object(r.group, r.version, r.plural, **kw)
        data: dict[str, Any] = json.loads(resp.data)
        return data

    def create(self, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        """POST ``body``; ApiException 409 AlreadyExists when the name is taken."""
        r = self.res
        ns = body.get("metadata", {}).get("namespace")
        if r.namespaced:
            return self.api.create_namespaced_custom_object(
                r.group, r.version, ns, r.plural, body, **kw
            )
        return self.api.create_cluster_custom_object(r.group, r.version, r.plural, body, **kw)

    def replace_status(self, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        """PUT the status subresource; ``metadata.resourceVersion`` makes it a CAS (409 if stale).
        ``kw`` goes to the client call (e.g. ``_request_timeout``)."""
        r = self.res
        md = body["metadata"]
        if r.namespaced:
            return self.api.replace_namespaced_custom_object_status(
                r.group, r.version, md["namespace"], r.plural, md["name"], body, **kw
            )
        return self.api.replace_cluster_custom_object_status(
            r.group, r.version, r.plural, md["name"], body, **kw
        )

    def apply(
        self, body: dict[str, Any], field_manager: str, *, force: bool = True, dry_run: bool = False
    ) -> dict[str, Any]:
        """Server-side apply ``body`` (``application/apply-patch+yaml``) as ``field_manager``.

        Returns the object the API server answered with. The body is read raw: an apply that
        creates answers 201 Created, which the generated client does not deserialize.
        """
        r = self.res
        md = body["metadata"]
        kw: dict[str, Any] = {
            "field_manager": field_manager,
            "force": force,
            "_content_type": "application/apply-patch+yaml",
            "_preload_content": False,
        }
        if dry_run:
            kw["dry_run"] = "All"
        if r.namespaced:
            resp = self.api.patch_namespaced_custom_object(
                r.group, r.version, md["namespace"], r.plural, md["name"], body, **kw
            )
        else:
            resp = self.api.patch_cluster_custom_object(
                r.group, r.version, r.plural, md["name"], body, **kw
            )
        data: dict[str, Any] = json.loads(resp.data)
        return data

    def merge_patch(
        self,
        name: str,
        namespace: str | None,
        patch: dict[str, Any],
        *,
        field_manager: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """JSON merge patch (RFC 7386, ``application/merge-patch+json``) of one object; a
        ``null`` removes a field whoever owns it, ``metadata.resourceVersion`` in ``patch``
        makes it a compare-and-swap (409 Conflict when stale). Returns the patched object.
        Source: Kubernetes API concepts, "Patch" and "Concurrency control"."""
        r = self.res
        kw: dict[str, Any] = {
            "_content_type": "application/merge-patch+json",
            "_preload_content": False,
        }
        if field_manager:
            kw["field_manager"] = field_manager
        if dry_run:
            kw["dry_run"] = "All"
        if r.namespaced:
            resp = self.api.patch_namespaced_custom_object(
                r.group, r.version, namespace, r.plural, name, patch, **kw
            )
        else:
            resp = self.api.patch_cluster_custom_object(
                r.group, r.version, r.plural, name, patch, **kw
            )
        data: dict[str, Any] = json.loads(resp.data)
        return data

    def delete(self, name: str, namespace: str | None = None, **kw: Any) -> dict[str, Any]:
        """DELETE one object; ApiException 404 when already gone."""
        r = self.res
        if r.namespaced:
            return self.api.delete_namespaced_custom_object(
                r.group, r.version, namespace, r.plural, name, **kw
            )
        return self.api.delete_cluster_custom_object(r.group, r.version, r.plural, name, **kw)


def request(
    api: client.ApiClient,
    method: str,
    path: str,
    body: Any = None,
    query: dict[str, str] | None = None,
    accept: str = "application/json",
) -> dict[str, Any]:
    """One API request by path (``/api/v1/namespaces/x/events``), JSON in and out.

    For the few core/v1 calls the reconciler makes: going through ``CoreV1Api`` would import
    the generated models of every core kind (about 2 s of start-up). Authentication, retries
    and timeouts are the ApiClient's. ``accept`` may ask for another representation (e.g.
    :data:`METADATA_ONLY`). Raises ApiException for a non-2xx answer.
    """
    headers = {"Accept": accept}
    if body is not None:
        headers["Content-Type"] = "application/json"
    params = api.param_serialize(
        method=method,
        resource_path=path,
        query_params=list((query or {}).items()),
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    resp = api.call_api(*params)
    data = resp.read()
    if not 200 <= resp.status <= 299:
        raise client.ApiException.from_response(http_resp=resp, body=data.decode(), data=None)
    out: dict[str, Any] = json.loads(data) if data else {}
    return out


METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
"""``Accept`` for an object's metadata alone (Kubernetes API concepts, "Receiving resources as
Tables" and partial object metadata): what a metadata informer reads."""

Key = tuple[str, str | None, str]


def observe(api: client.ApiClient, resources: tuple[Resource, ...]) -> dict[Key, dict[str, Any]]:
    """List every object of ``resources`` in the cluster (all namespaces), keyed by identity.

    Returns {(kind, namespace or None, name): object}. One LIST per resource type. Raises
    MissingCRD naming the CustomResourceDefinition when the API server does not serve a type.
    """
    out, missing = observe_served(api, resources)
    if missing:
        raise MissingCRD(missing[0])
    return out


def observe_served(
    api: client.ApiClient, resources: tuple[Resource, ...]
) -> tuple[dict[Key, dict[str, Any]], list[Resource]]:
    """Like :func:`observe`, but types the API server does not serve (404 on the LIST: no
    CRD) are returned in the second element instead of raising, so the caller decides whether
    it needs them."""
    out: dict[Key, dict[str, Any]] = {}
    missing: list[Resource] = []
    for res in resources:
        try:
            items = Objects(api, res).list()["items"]
        except client.ApiException as exc:
            if exc.status == 404:
                missing.append(res)
                continue
            raise
        for obj in items:
            md = obj.get("metadata") or {}
            obj.setdefault("apiVersion", res.api_version)
            obj.setdefault("kind", res.kind)
            out[(res.kind, md.get("namespace") if res.namespaced else None, md["name"])] = obj
    return out, missing


class MissingCRD(RuntimeError):
    """The API server does not serve a resource we need: its CRD is not installed."""

    def __init__(self, res: Resource) -> None:
        self.resource = res
        super().__init__(
            f"the cluster does not serve {res.kind} ({res.plural}.{res.group}/{res.version}): "
            f"install the CustomResourceDefinition {res.plural}.{res.group} "
            "(kubectl apply -k deploy/ or `underlay crds | kubectl apply -f -`)"
        )
