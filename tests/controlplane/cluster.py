"""What one test sees of the shared control plane: :class:`Kube`.

The control plane starts once per test run (tests/conftest.py, fixture ``controlplane``); each
test gets a :class:`Kube` with its own fault proxy and request log, and after the test
:meth:`Kube.reset` removes what the test made (objects of the kinds below that were not there
when the control plane came up, new namespaces, changed CRDs or RBAC), so the next test starts
from the same cluster. Tests should still prefer fresh names.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client

from tests.controlplane.proxy import FaultProxy, RequestRecord
from tests.controlplane.server import ControlPlane

RECONCILER_SA = ("underlay-system", "underlay-reconciler")
AGENT_SA = ("underlay-system", "underlay-agent")


@dataclass(frozen=True)
class Kind:
    """A resource a test may create: API group ("" = core), version, plural, namespaced, and
    whether a whole namespace's collection may be deleted at once (no object of it exists
    when the control plane starts)."""

    group: str
    version: str
    plural: str
    namespaced: bool
    collection: bool = True

    def path(self, namespace: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if namespace:
            return f"{base}/namespaces/{namespace}/{self.plural}"
        return f"{base}/{self.plural}"


RESET_KINDS = (
    Kind("underlay.dev", "v1alpha1", "gitsyncs", True),
    Kind("underlay.dev", "v1alpha1", "ovsbridgeenactments", False),
    Kind("underlay.dev", "v1alpha1", "ovsbridges", False),
    Kind("spiderpool.spidernet.io", "v2beta1", "spiderendpoints", True),
    Kind("spiderpool.spidernet.io", "v2beta1", "spidermultusconfigs", True),
    Kind("spiderpool.spidernet.io", "v2beta1", "spiderippools", False),
    Kind("k8s.cni.cncf.io", "v1", "network-attachment-definitions", True),
    Kind("apps", "v1", "statefulsets", True),
    Kind("apps", "v1", "deployments", True),
    Kind("apps", "v1", "replicasets", True),
    Kind("", "v1", "pods", True),
    Kind("", "v1", "nodes", False),
    Kind("", "v1", "events", True),
    Kind("", "v1", "services", True, collection=False),
    Kind("", "v1", "configmaps", True, collection=False),
    Kind("", "v1", "secrets", True, collection=False),
    Kind("", "v1", "serviceaccounts", True, collection=False),
    Kind("coordination.k8s.io", "v1", "leases", True, collection=False),
    Kind("discovery.k8s.io", "v1", "endpointslices", True, collection=False),
    Kind("networking.k8s.io", "v1", "servicecidrs", False, collection=False),
)
"""What :meth:`Kube.reset` cleans, in this order (owners before what they own, pods after
their controllers so nothing re-creates them)."""


class Baseline:
    """The uids of every object of :data:`RESET_KINDS`, the namespaces, and the CRDs' and RBAC's
    resourceVersions, read once after the control plane is installed."""

    def __init__(self, api: Any) -> None:
        self.uids: set[str] = set()
        for kind in RESET_KINDS:
            for obj in _list(api, kind):
                self.uids.add(obj["metadata"]["uid"])
        self.namespaces = {
            ns["metadata"]["name"] for ns in _list(api, Kind("", "v1", "namespaces", False))
        }
        self.crds = _versions(api, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        self.rbac = {
            p: _versions(api, f"/apis/rbac.authorization.k8s.io/v1/{p}")
            for p in ("clusterroles", "clusterrolebindings", "roles", "rolebindings")
        }


def _request(
    api: Any, method: str, path: str, body: Any = None, ctype: str = "application/json"
) -> Any:
    """One admin request by path, JSON in and out; ApiException for a non-2xx answer."""
    headers = {"Accept": "application/json", "Content-Type": ctype}
    params = api.param_serialize(
        method=method, resource_path=path, header_params=headers, body=body,
        auth_settings=["BearerToken"],
    )  # fmt: skip
    resp = api.call_api(*params)
    data = resp.read()
    if not 200 <= resp.status <= 299:
        raise client.ApiException.from_response(http_resp=resp, body=data.decode(), data=None)
    return json.loads(data) if data else {}


def _list(api: Any, kind: Kind) -> list[dict[str, Any]]:
    try:
        return list(_request(api, "GET", kind.path()).get("items") or [])
    except client.ApiException as exc:
        if exc.status == 404:
            return []
        raise


def _versions(api: Any, path: str) -> dict[str, str]:
    items = _request(api, "GET", path).get("items") or []
    return {
        o["metadata"].get("namespace", "") + "/" + o["metadata"]["name"]: o["metadata"][
            "resourceVersion"
        ]
        for o in items
    }


class Kube:
    """The control plane as one test sees it.

    - :attr:`url`: this test's fault proxy in front of the server (``https://127.0.0.1:...``);
      :attr:`kubeconfig`: the admin (static token) through it. Programs under test get
      ServiceAccount kubeconfigs instead (:meth:`reconciler_kubeconfig`, :meth:`agent_kubeconfig`).
    - :attr:`api`, :attr:`core`, :attr:`custom`, :attr:`coord`: admin clients straight to the
      server, for the test's own setup and assertions (never logged, never faulted).
    - The proxy's test controls: :meth:`inject_fault`, :meth:`requests`, :meth:`open_watches`...
    """

    def __init__(self, cp: ControlPlane, baseline: Baseline, workdir: Path) -> None:
        self.cp, self.baseline, self.workdir = cp, baseline, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.proxy: FaultProxy = cp.proxy()
        self.url = self.proxy.listen()
        self.kubeconfig = cp.token_kubeconfig(workdir / "admin-via-proxy.kubeconfig", self.url)
        self.api = cp.api_client()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.coord = client.CoordinationV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)

    # ---- kubeconfigs -----------------------------------------------------------------------

    def reconciler_kubeconfig(self, path: Path | None = None, server: str | None = None) -> Path:
        """The reconciler's ServiceAccount (deploy/rbac.yaml) through the proxy, or ``server``."""
        ns, name = RECONCILER_SA
        return self.cp.serviceaccount_kubeconfig(
            path or self.workdir / "reconciler.kubeconfig", ns, name, server or self.url
        )

    def agent_kubeconfig(self, path: Path | None = None, server: str | None = None) -> Path:
        """The node agent's ServiceAccount (deploy/rbac.yaml) through the proxy, or ``server``."""
        ns, name = AGENT_SA
        return self.cp.serviceaccount_kubeconfig(
            path or self.workdir / "agent.kubeconfig", ns, name, server or self.url
        )

    def admin_kubeconfig(self, path: Path | None = None, server: str | None = None) -> Path:
        """The admin (static token) through the proxy, or ``server``."""
        return self.cp.token_kubeconfig(
            path or self.workdir / "admin.kubeconfig", server or self.url
        )

    def api_client(self, kubeconfig: Path | str | None = None) -> Any:
        """An ApiClient from ``kubeconfig`` (default: admin, straight to the server)."""
        return self.cp.api_client(kubeconfig)

    def listen_in_netns(self, netns: str, host: str, port: int = 6443) -> str:
        """Make this test's proxy listen on ``host:port`` inside network namespace ``netns`` as
        well (the rig's API address); returns its URL."""
        return self.proxy.listen(host, port, netns)

    def kubectl(self, *args: str, check: bool = True, **kw: Any) -> Any:
        """kubectl as the admin, straight to the server (see ControlPlane.kubectl)."""
        return self.cp.kubectl(*args, check=check, **kw)

    # ---- the proxy's controls ---------------------------------------------------------------

    def inject_fault(self, path: str, **kw: Any) -> Any:
        return self.proxy.inject_fault(path, **kw)

    def clear_faults(self) -> None:
        self.proxy.clear_faults()

    def faults(self) -> list[Any]:
        return self.proxy.faults()

    def requests(
        self, method: str | None = None, path: str | None = None, *, writes: bool = False
    ) -> list[RequestRecord]:
        return self.proxy.requests(method, path, writes=writes)

    def reset_requests(self) -> None:
        self.proxy.reset_requests()

    def open_watches(self, plural: str | None = None) -> int:
        return self.proxy.open_watches(plural)

    def close_watches(self, plural: str | None = None) -> int:
        return self.proxy.close_watches(plural)

    def wait_for_watches(
        self, count: int = 1, plural: str | None = None, timeout: float = 10.0
    ) -> bool:
        return self.proxy.wait_for_watches(count, plural, timeout)

    # ---- objects tests need -------------------------------------------------------------------

    def ensure_namespace(self, name: str, timeout: float = 60) -> None:
        """Create namespace ``name`` if missing (waiting for an earlier one of that name to
        finish terminating), and wait for its ``default`` ServiceAccount (made by
        kube-controller-manager; pods cannot be created before it exists)."""
        deadline = time.monotonic() + timeout
        body = client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
        while True:
            try:
                self.core.create_namespace(body)
                break
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
            ns = self.core.read_namespace(name)
            if not ns.metadata.deletion_timestamp:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"namespace {name} still terminating after {timeout:.0f} s")
            time.sleep(0.1)
        while True:
            try:
                self.core.read_namespaced_service_account("default", name)
                return
            except client.ApiException as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def create_node(self, name: str, labels: dict[str, str] | None = None, **status: Any) -> Any:
        """A Node object as a kubelet registers it (labels ``kubernetes.io/hostname`` and
        ``kubernetes.io/os``, plus ``labels``)."""
        lab = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **(labels or {})}
        body = client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=lab))
        return self.core.create_node(body)

    # ---- between tests ------------------------------------------------------------------------

    def reset(self) -> None:
        """Remove what the test made, so the next test sees the cluster as it was at start."""
        self.proxy.stop()
        self.cp.check_alive()
        api = self.api
        base = self.baseline
        for kind in RESET_KINDS:
            objs = [o for o in _list(api, kind) if o["metadata"]["uid"] not in base.uids]
            if not objs:
                continue
            namespaces = {o["metadata"].get("namespace") for o in objs}
            body = {
                "kind": "DeleteOptions",
                "apiVersion": "v1",
                "gracePeriodSeconds": 0,
                "propagationPolicy": "Background",
            }
            if kind.collection:
                for ns in namespaces:
                    with contextlib.suppress(client.ApiException):
                        _request(api, "DELETE", kind.path(ns), body=body)
            else:
                for o in objs:
                    md = o["metadata"]
                    with contextlib.suppress(client.ApiException):
                        _request(
                            api,
                            "DELETE",
                            f"{kind.path(md.get('namespace'))}/{md['name']}",
                            body=body,
                        )
            # objects holding finalizers (ours never do; a test's might) are released
            for o in objs:
                if o["metadata"].get("finalizers"):
                    md = o["metadata"]
                    with contextlib.suppress(client.ApiException):
                        _request(
                            api, "PATCH", f"{kind.path(md.get('namespace'))}/{md['name']}",
                            body={"metadata": {"finalizers": None}},
                            ctype="application/merge-patch+json",
                        )  # fmt: skip
        self._reset_namespaces()
        self._reset_installed()

    def _reset_namespaces(self) -> None:
        """Delete the namespaces the test made (kube-controller-manager empties them; a later
        :meth:`ensure_namespace` of the same name waits for that)."""
        for ns in _list(self.api, Kind("", "v1", "namespaces", False)):
            name = ns["metadata"]["name"]
            if name not in self.baseline.namespaces and not ns["metadata"].get("deletionTimestamp"):
                with contextlib.suppress(client.ApiException):
                    self.core.delete_namespace(name)

    def _reset_installed(self) -> None:
        """Re-apply deploy/'s CRDs and RBAC when a test changed or removed them; delete CRDs a
        test added."""
        base = self.baseline
        crds = _versions(self.api, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        for key in set(crds) - set(base.crds):
            with contextlib.suppress(client.ApiException):
                _request(
                    self.api,
                    "DELETE",
                    f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{key.lstrip('/')}",
                )
        rbac_now = {
            p: _versions(self.api, f"/apis/rbac.authorization.k8s.io/v1/{p}") for p in base.rbac
        }
        changed = any(crds.get(k) != v for k, v in base.crds.items()) or any(
            rbac_now[p].get(k) != v for p in base.rbac for k, v in base.rbac[p].items()
        )
        if changed:
            self.cp.install()
            base.crds = _versions(
                self.api, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
            )
            base.rbac = {
                p: _versions(self.api, f"/apis/rbac.authorization.k8s.io/v1/{p}") for p in base.rbac
            }
