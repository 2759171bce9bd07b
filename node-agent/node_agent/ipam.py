"""Spiderpool-compatible IPAM: pool choice, lowest-free allocation with optimistic concurrency.

Pure functions (plain dicts in, plain values out) decide everything that does not need the
API server: :func:`choose_pools` (Spiderpool's annotation order), :func:`pool_rejection`
(filters), :func:`lowest_free`, :func:`reconciler.ippool.allocated_ips` / :func:`reconciler.ippool.pool_status`. The
:class:`Ipam` engine reads Pod, Namespace, Node and SpiderIPPool objects through the
``kubernetes`` client and writes pool status with the resourceVersion it read (a 409 means
someone else wrote first: re-read, retry with jitter, bounded), then records the pod in its
SpiderEndpoint.

Records are Spiderpool's: ``status.allocatedIPs`` is a JSON *string*
``{"<ip>": {"pod": "<ns>/<name>", "podUid": "<uid>"}}`` (absent when empty),
``allocatedIPCount`` and ``totalIPCount`` are recomputed on every write, so they cannot drift
from the records. Idempotency: a pod UID's records that no other interface of the pod claims
(per its SpiderEndpoint) are reused, so a retried ADD never takes a second IP.
Sources: reference/spiderpool.md (Spiderpool 1.2.x, v2beta1); Kubernetes API conventions,
"Concurrency Control and Consistency"; Kubernetes label selectors (matchLabels/matchExpressions).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import netaddr
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from node_agent.cni.errors import (
    CHECK_FAILED,
    INVALID_CONFIG,
    NO_POOL_ELIGIBLE,
    NO_POOL_SELECTED,
    POD_NOT_FOUND,
    POOL_EXHAUSTED,
    POOL_NOT_FOUND,
    TRY_AGAIN_LATER,
    CniError,
)
from reconciler import ippool
from reconciler.kube import Objects
from reconciler.vocab import (
    ANNO_MULTUS_DEFAULT_NETWORK,
    ANNO_MULTUS_NETWORKS,
    ANNO_NS_DEFAULT_V4,
    ANNO_NS_DEFAULT_V6,
    ANNO_POD_IPPOOL,
    ANNO_POD_IPPOOLS,
    SPIDER_ENDPOINT,
    SPIDER_IPPOOL,
    SPIDERPOOL_API_VERSION,
    SYSTEM_NAMESPACE,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

CONF_DEFAULT_V4 = "default_ipv4_ippool"
CONF_DEFAULT_V6 = "default_ipv6_ippool"
"""Keys of the CNI ``ipam`` section naming default pools (Spiderpool's spelling)."""


# ============================================================================================
# pure functions
# ============================================================================================
def pool_family(spec: dict[str, Any]) -> int:
    """``spec.ipVersion``, else inferred from ``spec.subnet`` (4 or 6)."""
    version = spec.get("ipVersion")
    if version in (4, 6):
        return int(version)
    return 6 if ":" in str(spec.get("subnet", "")) else 4


def lowest_free(spec: dict[str, Any], taken: Iterable[str]) -> str | None:
    """Lowest IP of ``ips - excludeIPs`` not in ``taken`` and not the gateway; None when full."""
    busy = {int(netaddr.IPAddress(ip)) for ip in taken}
    if spec.get("gateway"):
        busy.add(int(netaddr.IPAddress(spec["gateway"])))
    for cidr in ippool.allocatable(spec).iter_cidrs():
        for value in range(cidr.first, cidr.last + 1):
            if value not in busy:
                return str(netaddr.IPAddress(value, cidr.version))
    return None


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str] | None) -> bool:
    """Kubernetes LabelSelector semantics: matchLabels AND every matchExpression.

    Operators In, NotIn, Exists, DoesNotExist. An empty selector matches everything.
    Raises ValueError for an unknown operator.
    """
    if not selector:
        return True
    labels = labels or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In":
            ok = key in labels and labels[key] in values
        elif op == "NotIn":
            ok = key not in labels or labels[key] not in values
        elif op == "Exists":
            ok = key in labels
        elif op == "DoesNotExist":
            ok = key not in labels
        else:
            raise ValueError(f"unknown label selector operator {op!r}")
        if not ok:
            return False
    return True


def parse_network_selections(value: str, pod_namespace: str) -> list[tuple[str, str, str]]:
    """Multus ``k8s.v1.cni.cncf.io/networks`` → ``[(namespace, name, interface)]``.

    Accepts the JSON list form (``[{"name", "namespace"?, "interface"?}]``) and the short
    form ``ns/name@if, name``. A missing namespace is the pod's; a missing interface is
    ``net<N>`` (1-based position), as Multus names them. Raises ValueError when malformed.
    Source: Network Plumbing WG spec v1.2, section 4.1.2.
    """
    value = (value or "").strip()
    if not value:
        return []
    out = []
    if value.startswith("["):
        items = json.loads(value)
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict) or not item.get("name"):
                raise ValueError(f"network selection element {item!r} has no name")
            ns = item.get("namespace") or pod_namespace
            out.append((ns, item["name"], item.get("interface") or f"net{i}"))
        return out
    for i, part in enumerate([p.strip() for p in value.split(",") if p.strip()], 1):
        ref, _, iface = part.partition("@")
        ns, _, name = ref.rpartition("/")
        if not name:
            raise ValueError(f"network selection element {part!r} has no name")
        out.append((ns or pod_namespace, name, iface or f"net{i}"))
    return out


def pod_network(
    pod: dict[str, Any], ifname: str, system_namespace: str = SYSTEM_NAMESPACE
) -> str | None:
    """``"<namespace>/<name>"`` of the Multus network a pod's interface is attached through.

    ``eth0`` ← ``v1.multus-cni.io/default-network`` (no namespace: the system namespace, as
    Multus keeps default networks there); any other interface ← its entry in
    ``k8s.v1.cni.cncf.io/networks``. None when the pod does not say.
    """
    md = pod.get("metadata") or {}
    annos = md.get("annotations") or {}
    if ifname == "eth0":
        ref = annos.get(ANNO_MULTUS_DEFAULT_NETWORK)
        if not ref:
            return None
        ref = ref.strip()
        if ref.startswith("{"):
            obj = json.loads(ref)
            ns, name = obj.get("namespace") or system_namespace, obj.get("name", "")
        else:
            ref = ref.partition("@")[0]
            ns, _, name = ref.rpartition("/")
            ns = ns or system_namespace
        return f"{ns}/{name}"
    try:
        selections = parse_network_selections(
            annos.get(ANNO_MULTUS_NETWORKS, ""), md.get("namespace", "")
        )
    except ValueError:
        return None
    for ns, name, iface in selections:
        if iface == ifname:
            return f"{ns}/{name}"
    return None


def _as_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"expected a pool name or a list of pool names, got {value!r}")


@dataclass
class PoolChoice:
    """Candidate pool names per family, in preference order, and where they came from."""

    v4: list[str]
    v6: list[str]
    source: str


def choose_pools(
    pod: dict[str, Any],
    namespace: Callable[[], dict[str, Any]],
    ipam_config: dict[str, Any],
    ifname: str,
    default_pools: Callable[[], list[dict[str, Any]]],
) -> PoolChoice:
    """Spiderpool's pool choice for one interface (first source that names any pool wins).

    1. pod annotation ``ipam.spidernet.io/ippools`` entry whose ``interface`` is ``ifname``;
    2. pod annotation ``ipam.spidernet.io/ippool`` (unless its ``interface`` is another one);
    3. namespace annotations ``ipam.spidernet.io/default-ipv4-ippool`` / ``-ipv6-``;
    4. the CNI config's ``default_ipv4_ippool`` / ``default_ipv6_ippool``;
    5. pools with ``spec.default: true`` (``default_pools()`` lists the pools, lazily).
    ``namespace()`` returns the pod's Namespace (``{}`` when unknown); called only if needed.
    Raises CniError 7 for malformed annotations/config, 103 when no source names a pool
    (the message lists what was looked at).
    """
    md = pod.get("metadata") or {}
    annos = md.get("annotations") or {}
    who = f"pod {md.get('namespace')}/{md.get('name')}"
    try:
        raw = annos.get(ANNO_POD_IPPOOLS)
        if raw:
            for entry in json.loads(raw):
                if entry.get("interface") == ifname:
                    v4, v6 = _as_list(entry.get("ipv4")), _as_list(entry.get("ipv6"))
                    if v4 or v6:
                        return PoolChoice(v4, v6, f"{who} annotation {ANNO_POD_IPPOOLS}")
        raw = annos.get(ANNO_POD_IPPOOL)
        if raw:
            entry = json.loads(raw)
            if entry.get("interface") in (None, "", ifname):
                v4, v6 = _as_list(entry.get("ipv4")), _as_list(entry.get("ipv6"))
                if v4 or v6:
                    return PoolChoice(v4, v6, f"{who} annotation {ANNO_POD_IPPOOL}")
    except (ValueError, AttributeError, TypeError) as exc:
        raise CniError(INVALID_CONFIG, f"{who}: malformed IP pool annotation: {exc}") from exc
    ns_name = md.get("namespace")
    ns_annos = ((namespace() or {}).get("metadata") or {}).get("annotations") or {}
    try:
        v4 = (
            _as_list(json.loads(ns_annos[ANNO_NS_DEFAULT_V4]))
            if ns_annos.get(ANNO_NS_DEFAULT_V4)
            else []
        )
        v6 = (
            _as_list(json.loads(ns_annos[ANNO_NS_DEFAULT_V6]))
            if ns_annos.get(ANNO_NS_DEFAULT_V6)
            else []
        )
    except ValueError as exc:
        raise CniError(
            INVALID_CONFIG, f"namespace {ns_name}: malformed default pool annotation: {exc}"
        ) from exc
    if v4 or v6:
        return PoolChoice(v4, v6, f"namespace {ns_name} default pool annotations")
    try:
        v4 = _as_list(ipam_config.get(CONF_DEFAULT_V4))
        v6 = _as_list(ipam_config.get(CONF_DEFAULT_V6))
    except ValueError as exc:
        raise CniError(INVALID_CONFIG, f"ipam config: {exc}") from exc
    if v4 or v6:
        return PoolChoice(v4, v6, f"CNI config {CONF_DEFAULT_V4}/{CONF_DEFAULT_V6}")
    pools = sorted(
        (p for p in default_pools() if (p.get("spec") or {}).get("default")),
        key=lambda p: p["metadata"]["name"],
    )
    v4 = [p["metadata"]["name"] for p in pools if pool_family(p["spec"]) == 4]
    v6 = [p["metadata"]["name"] for p in pools if pool_family(p["spec"]) == 6]
    if v4 or v6:
        return PoolChoice(v4, v6, "SpiderIPPools with spec.default=true")
    raise CniError(
        NO_POOL_SELECTED,
        f"no IP pool selected for {who} interface {ifname}: looked at pod annotations "
        f"{ANNO_POD_IPPOOLS} and {ANNO_POD_IPPOOL}, namespace {ns_name} annotations "
        f"{ANNO_NS_DEFAULT_V4}/{ANNO_NS_DEFAULT_V6}, CNI config ipam "
        f"{CONF_DEFAULT_V4}/{CONF_DEFAULT_V6}, and SpiderIPPools with spec.default=true",
    )


def pool_rejection(
    pool: dict[str, Any],
    family: int,
    *,
    pod: dict[str, Any],
    ifname: str,
    node_name: str,
    node: Callable[[], dict[str, Any]],
    namespace: Callable[[], dict[str, Any]],
    system_namespace: str = SYSTEM_NAMESPACE,
) -> str | None:
    """Why ``pool`` cannot serve this pod interface, or None when it can (Spiderpool filters).

    Checks, in order: terminating, ``disable``, family, ``nodeName`` (else ``nodeAffinity``
    against the Node's labels), ``namespaceName`` (else ``namespaceAffinity``), ``podAffinity``,
    ``multusName`` (must contain the pod's Multus network for ``ifname``; entries without a
    namespace are in ``system_namespace``). ``node``/``namespace`` are fetched only if needed.
    """
    spec = pool.get("spec") or {}
    md = pool.get("metadata") or {}
    pod_md = pod.get("metadata") or {}
    if md.get("deletionTimestamp"):
        return "terminating"
    if spec.get("disable"):
        return "disabled (spec.disable=true)"
    if pool_family(spec) != family:
        return f"IPv{pool_family(spec)} pool where an IPv{family} pool is needed"
    if spec.get("nodeName"):
        if node_name not in spec["nodeName"]:
            return f"node {node_name} not in spec.nodeName {spec['nodeName']}"
    elif spec.get("nodeAffinity"):
        labels = (node().get("metadata") or {}).get("labels") or {}
        if not selector_matches(spec["nodeAffinity"], labels):
            return f"node {node_name} labels do not match spec.nodeAffinity"
    pod_ns = pod_md.get("namespace", "")
    if spec.get("namespaceName"):
        if pod_ns not in spec["namespaceName"]:
            return f"namespace {pod_ns} not in spec.namespaceName {spec['namespaceName']}"
    elif spec.get("namespaceAffinity"):
        labels = (namespace().get("metadata") or {}).get("labels") or {}
        if not selector_matches(spec["namespaceAffinity"], labels):
            return f"namespace {pod_ns} labels do not match spec.namespaceAffinity"
    if spec.get("podAffinity") and not selector_matches(spec["podAffinity"], pod_md.get("labels")):
        return "pod labels do not match spec.podAffinity"
    if spec.get("multusName"):
        wanted = {m if "/" in m else f"{system_namespace}/{m}" for m in spec["multusName"]}
        net = pod_network(pod, ifname, system_namespace)
        if net not in wanted:
            return (
                f"spec.multusName {sorted(wanted)} does not include the pod's network for "
                f"{ifname} ({net or 'none given by the Multus annotations'})"
            )
    return None


# ============================================================================================
# the engine
# ============================================================================================
@dataclass
class IpamRequest:
    """One pod interface to allocate for / release: pod identity, interface, ``ipam`` config."""

    namespace: str
    pod_name: str
    pod_uid: str
    container_id: str
    ifname: str
    config: dict[str, Any] = field(default_factory=dict)
    vlan: int = 0

    @property
    def pod_ref(self) -> str:
        return f"{self.namespace}/{self.pod_name}"


@dataclass
class Allocation:
    """One allocated IP: ``address`` in CIDR form (prefix of the pool's subnet)."""

    family: int
    address: str
    pool: str
    gateway: str | None
    routes: list[dict[str, str]]

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


class _Exhausted(Exception):
    def __init__(self, pool: str, total: int, used: int) -> None:
        super().__init__(pool)
        self.pool, self.total, self.used = pool, total, used


class Ipam:
    """The IPAM engine of one node agent (thread-safe).

    ``api`` is a ``kubernetes.client.ApiClient``; ``node_name`` this node's Node name.
    Allocations on one pool are serialised inside this process (a lock per pool), so only
    other agents can make a status write conflict; conflicts are retried up to
    ``max_attempts`` times with jittered exponential backoff (``backoff`` seconds, capped at
    ``backoff_cap``). Every error is a CniError: 11 when the API server cannot be reached or
    the conflicts do not stop, 101-104/110 for pool problems (see node_agent.cni.errors).
    """

    def __init__(
        self,
        api: Any,
        node_name: str,
        *,
        system_namespace: str = SYSTEM_NAMESPACE,
        max_attempts: int = 60,
        backoff: float = 0.004,
        backoff_cap: float = 0.25,
        cache_ttl: float = 5.0,
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.system_namespace = system_namespace
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self.cache_ttl = cache_ttl
        self.pools = Objects(api, SPIDER_IPPOOL)
        self.endpoints = Objects(api, SPIDER_ENDPOINT)
        self.core: Any = client.CoreV1Api(api)
        self._locks: dict[str, threading.Lock] = {}
        self._executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ipam")
        self._pool_cache: dict[str, dict[str, Any]] = {}
        self._ttl_cache: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._locks_guard = threading.Lock()
        self.conflicts = 0
        """Status writes that got 409 Conflict (for benchmarks and tests)."""

    # --- API access ---------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run an API call; connection failures become CniError 11 naming the server."""
        try:
            return fn()
        except ApiException:
            raise
        except Exception as exc:  # urllib3 MaxRetryError, connection refused, timeouts
            host = getattr(getattr(self.api, "configuration", None), "host", "?")
            raise CniError(
                TRY_AGAIN_LATER,
                f"Kubernetes API server {host} unreachable while {what}: {type(exc).__name__}: {exc}",
            ) from exc

    def _read_json(self, what: str, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        resp = self._call(what, lambda: fn(*args, _preload_content=False))
        out: dict[str, Any] = json.loads(resp.data)
        return out

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """The Pod as a dict; CniError 110 when it does not exist."""
        try:
            return self._read_json(
                f"reading pod {namespace}/{name}", self.core.read_namespaced_pod, name, namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                raise CniError(
                    POD_NOT_FOUND, f"pod {namespace}/{name} not found in the API server"
                ) from exc
            raise

    def _get_optional(self, what: str, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        try:
            return self._read_json(what, fn, *args)
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise

    def _cached(self, kind: str, name: str, read: Callable[..., Any]) -> dict[str, Any]:
        """A Namespace or Node, read at most once per ``cache_ttl`` seconds (``{}`` if absent).

        Their labels and annotations change rarely; Spiderpool reads them from informer
        caches too.
        """
        key = (kind, name)
        hit = self._ttl_cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self.cache_ttl:
            return hit[1]
        obj = self._get_optional(f"reading {kind} {name}", read, name)
        self._ttl_cache[key] = (now, obj)
        return obj

    def get_pool(self, name: str, source: str = "") -> dict[str, Any]:
        """The SpiderIPPool ``name``; CniError 102 (naming it and ``source``) when absent."""
        try:
            pool = self._call(f"reading SpiderIPPool {name}", lambda: self.pools.get(name))
        except ApiException as exc:
            if exc.status == 404:
                self._pool_cache.pop(name, None)
                by = f" (named by {source})" if source else ""
                raise CniError(POOL_NOT_FOUND, f"SpiderIPPool {name} not found{by}") from exc
            raise
        self._pool_cache[name] = pool
        return pool

    def _lock(self, pool: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(pool, threading.Lock())

    def _sleep(self, attempt: int) -> None:
        time.sleep(random.uniform(0, min(self.backoff_cap, self.backoff * (2**attempt))))

    def update_pool(
        self,
        name: str,
        mutate: Callable[[dict[str, Any], dict[str, dict[str, str]]], tuple[bool, T]],
        first: dict[str, Any] | None = None,
    ) -> T:
        """Read-modify-write pool ``name``'s status with the read resourceVersion.

        ``mutate(pool, records)`` changes ``records`` in place and returns ``(changed, value)``;
        nothing is written when ``changed`` is false. The first attempt may use ``first`` or
        this agent's last seen copy of the pool (what its own last write returned): a write
        from a stale copy is refused with 409 Conflict by the API server, and decisions that
        write nothing (a record already there, the pool full) are only trusted on a fresh
        read. On 409 the pool is re-read and ``mutate`` runs again, up to ``max_attempts``.
        Returns ``value``. Raises CniError 102/11, or what ``mutate`` raises.
        """
        with self._lock(name):
            pool = first or self._pool_cache.get(name)
            fresh = False
            for attempt in range(self.max_attempts):
                if pool is None:
                    pool = self.get_pool(name)
                    fresh = True
                try:
                    records = ippool.allocated_ips(pool.get("status"))
                except ValueError as exc:
                    raise CniError(INVALID_CONFIG, f"SpiderIPPool {name}: {exc}") from exc
                try:
                    changed, value = mutate(pool, records)
                except _Exhausted:
                    if not fresh:
                        pool = None
                        continue
                    raise
                if not changed:
                    if not fresh:
                        pool = None
                        continue
                    return value
                body = dict(pool)
                body["status"] = {
                    **(pool.get("status") or {}),
                    **ippool.pool_status(pool["spec"], records),
                }
                if not records:
                    body["status"].pop("allocatedIPs", None)
                try:
                    written = self._call(
                        f"writing SpiderIPPool {name} status",
                        partial(self.pools.replace_status, body),
                    )
                except ApiException as exc:
                    if exc.status == 404:
                        self._pool_cache.pop(name, None)
                        raise CniError(POOL_NOT_FOUND, f"SpiderIPPool {name} was deleted") from exc
                    if exc.status != 409:
                        raise CniError(
                            TRY_AGAIN_LATER,
                            f"writing SpiderIPPool {name} status: {exc.status} {exc.reason}",
                        ) from exc
                    self.conflicts += 1
                    pool = None
                    if fresh:
                        self._sleep(attempt)
                    continue
                if isinstance(written, dict) and written.get("metadata"):
                    self._pool_cache[name] = written
                return value
            raise CniError(
                TRY_AGAIN_LATER,
                f"SpiderIPPool {name}: {self.max_attempts} conflicting status writes in a row; try again",
            )

    # --- allocation ---------------------------------------------------------------------
    def allocate(self, req: IpamRequest) -> list[Allocation]:
        """Allocate one IP per family the chosen pools ask for; idempotent per pod UID+interface.

        Records the result in the pod's SpiderEndpoint before returning. On failure of a
        later family, or of the endpoint write, the IPs taken are released again. Raises
        CniError (see class docstring).
        """
        done, recorded = self.allocate_begin(req)
        recorded.result()
        return done

    def allocate_begin(self, req: IpamRequest) -> tuple[list[Allocation], Future[None]]:
        """Like :meth:`allocate`, but returns as soon as the pool records are written.

        The SpiderEndpoint write continues in a worker thread; the returned future completes
        when it is done and raises its CniError after releasing the IPs again. A caller must
        wait for it before reporting success (the CNI ADD answer), and can configure the pod
        interface meanwhile.
        """
        endpoint_read = self._executor.submit(self._get_endpoint, req.namespace, req.pod_name)
        try:
            pod = self.get_pod(req.namespace, req.pod_name)
        finally:
            wait([endpoint_read])
        endpoint = endpoint_read.result()
        uid = req.pod_uid or pod["metadata"].get("uid", "")
        pod_uid = pod["metadata"].get("uid", "")
        if req.pod_uid and pod_uid and pod_uid != req.pod_uid:
            raise CniError(
                TRY_AGAIN_LATER,
                f"pod {req.pod_ref} has UID {pod_uid} in the API server but the runtime asks for "
                f"UID {req.pod_uid} (recreated pod?)",
            )

        def namespace() -> dict[str, Any]:
            return self._cached("Namespace", req.namespace, self.core.read_namespace)

        def node() -> dict[str, Any]:
            return self._cached("Node", self.node_name, self.core.read_node)

        listed: list[dict[str, Any]] = []

        def all_pools() -> list[dict[str, Any]]:
            if not listed:
                listed.extend(
                    self._call("listing SpiderIPPools", lambda: self.pools.list()).get("items", [])
                )
            return listed

        choice = choose_pools(pod, namespace, req.config, req.ifname, all_pools)
        claimed = self._claimed_by_others(endpoint, uid, req.ifname)
        done: list[Allocation] = []

        def rollback() -> None:
            for a in done:
                try:
                    self._release_in_pool(a.pool, uid, {a.ip})
                except Exception:
                    log.exception("rollback of %s in %s failed", a.ip, a.pool)

        try:
            for family, names in ((4, choice.v4), (6, choice.v6)):
                if names:
                    done.append(
                        self._allocate_family(
                            req,
                            uid,
                            pod,
                            family,
                            names,
                            choice.source,
                            claimed,
                            node,
                            namespace,
                            listed,
                        )
                    )
        except BaseException:
            rollback()
            raise

        def record() -> None:
            try:
                self._record_endpoint(req, uid, pod, done, endpoint)
            except BaseException:
                rollback()
                raise

        return done, self._executor.submit(record)

    def _allocate_family(
        self,
        req: IpamRequest,
        uid: str,
        pod: dict[str, Any],
        family: int,
        names: list[str],
        source: str,
        claimed: set[str],
        node: Callable[[], dict[str, Any]],
        namespace: Callable[[], dict[str, Any]],
        listed: list[dict[str, Any]],
    ) -> Allocation:
        known = {p["metadata"]["name"]: p for p in listed}
        eligible: list[dict[str, Any]] = []
        rejected: list[str] = []
        for name in names:
            pool = known.get(name) or self._pool_cache.get(name) or self.get_pool(name, source)
            why = pool_rejection(
                pool, family, pod=pod, ifname=req.ifname, node_name=self.node_name,
                node=node, namespace=namespace, system_namespace=self.system_namespace,
            )  # fmt: skip
            if why:
                rejected.append(f"{name}: {why}")
            else:
                eligible.append(pool)
        if not eligible:
            raise CniError(
                NO_POOL_ELIGIBLE,
                f"no usable IPv{family} SpiderIPPool for pod {req.pod_ref} interface {req.ifname} "
                f"(candidates from {source}): " + "; ".join(rejected),
            )
        full: list[_Exhausted] = []
        for pool in eligible:
            name = pool["metadata"]["name"]
            try:
                ip = self.update_pool(name, self._take(req, uid, claimed), first=pool)
            except _Exhausted as exc:
                full.append(exc)
                continue
            spec = pool["spec"]
            plen = netaddr.IPNetwork(spec["subnet"]).prefixlen
            return Allocation(
                family=family,
                address=f"{ip}/{plen}",
                pool=name,
                gateway=spec.get("gateway") or None,
                routes=[dict(r) for r in spec.get("routes") or []],
            )
        raise CniError(
            POOL_EXHAUSTED,
            "IP pool exhausted: "
            + "; ".join(
                f"SpiderIPPool {e.pool} has all {e.total} IPs allocated ({e.used} records)"
                for e in full
            )
            + f" (pod {req.pod_ref} interface {req.ifname})",
        )

    def _take(
        self, req: IpamRequest, uid: str, claimed: set[str]
    ) -> Callable[[dict[str, Any], dict[str, dict[str, str]]], tuple[bool, str]]:
        def mutate(pool: dict[str, Any], records: dict[str, dict[str, str]]) -> tuple[bool, str]:
            mine = sorted(
                (ip for ip, r in records.items() if r.get("podUid") == uid and ip not in claimed),
                key=lambda ip: int(netaddr.IPAddress(ip)),
            )
            if mine:
                return False, mine[0]  # a retried ADD: the same IP again
            spec = pool.get("spec") or {}
            try:
                ip = lowest_free(spec, records)
            except ValueError as exc:
                raise CniError(
                    INVALID_CONFIG, f"SpiderIPPool {pool['metadata']['name']}: {exc}"
                ) from exc
            if ip is None:
                raise _Exhausted(
                    pool["metadata"]["name"], ippool.allocatable(spec).size, len(records)
                )
            records[ip] = {"pod": req.pod_ref, "podUid": uid}
            return True, ip

        return mutate

    # --- endpoint ---------------------------------------------------------------------------
    def _get_endpoint(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(
                f"reading SpiderEndpoint {namespace}/{name}",
                lambda: self.endpoints.get(name, namespace),
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise CniError(
                TRY_AGAIN_LATER,
                f"reading SpiderEndpoint {namespace}/{name}: {exc.status} {exc.reason}",
            ) from exc

    @staticmethod
    def _current(endpoint: dict[str, Any] | None) -> dict[str, Any]:
        return ((endpoint or {}).get("status") or {}).get("current") or {}

    def _claimed_by_others(
        self, endpoint: dict[str, Any] | None, uid: str, ifname: str
    ) -> set[str]:
        cur = self._current(endpoint)
        if cur.get("uid") != uid:
            return set()
        out = set()
        for entry in cur.get("ips") or []:
            if entry.get("interface") != ifname:
                for key in ("ipv4", "ipv6"):
                    if entry.get(key):
                        out.add(entry[key].split("/")[0])
        return out

    def _entry(self, req: IpamRequest, done: list[Allocation]) -> dict[str, Any]:
        entry: dict[str, Any] = {"interface": req.ifname, "vlan": req.vlan}
        routes: list[dict[str, str]] = []
        for a in done:
            key = f"ipv{a.family}"
            entry[key] = a.address
            entry[f"{key}Pool"] = a.pool
            if a.gateway:
                entry[f"{key}Gateway"] = a.gateway
            routes.extend(a.routes)
        if routes:
            entry["routes"] = routes
        return entry

    def _record_endpoint(
        self,
        req: IpamRequest,
        uid: str,
        pod: dict[str, Any],
        done: list[Allocation],
        first: dict[str, Any] | None = None,
    ) -> None:
        entry = self._entry(req, done)
        owner = next(
            (o for o in pod["metadata"].get("ownerReferences") or [] if o.get("controller")), None
        )
        ep: dict[str, Any] | None = first
        for attempt in range(self.max_attempts):
            if attempt > 0 or ep is None:
                ep = self._get_endpoint(req.namespace, req.pod_name)
            if ep is None:
                body = {
                    "apiVersion": SPIDERPOOL_API_VERSION,
                    "kind": SPIDER_ENDPOINT.kind,
                    "metadata": {
                        "name": req.pod_name,
                        "namespace": req.namespace,
                        "ownerReferences": [
                            {"apiVersion": "v1", "kind": "Pod", "name": req.pod_name, "uid": uid}
                        ],
                    },
                }
                try:
                    ep = self._call("creating SpiderEndpoint", partial(self.endpoints.create, body))
                except ApiException as exc:
                    if exc.status == 409:
                        continue
                    raise CniError(
                        TRY_AGAIN_LATER,
                        f"creating SpiderEndpoint {req.pod_ref}: {exc.status} {exc.reason}",
                    ) from exc
            cur = self._current(ep)
            if cur.get("uid") == uid:
                ips = [e for e in cur.get("ips") or [] if e.get("interface") != req.ifname]
            else:
                ips = []  # a recreated pod of the same name: the old record is outdated
            ips.append(entry)
            body = dict(ep)
            body["status"] = {
                "current": {"uid": uid, "node": self.node_name, "ips": ips},
                "ownerControllerType": owner["kind"] if owner else "Pod",
                "ownerControllerName": owner["name"] if owner else req.pod_name,
            }
            try:
                self._call(
                    "writing SpiderEndpoint status", partial(self.endpoints.replace_status, body)
                )
                return
            except ApiException as exc:
                if exc.status not in (404, 409):
                    raise CniError(
                        TRY_AGAIN_LATER,
                        f"writing SpiderEndpoint {req.pod_ref}: {exc.status} {exc.reason}",
                    ) from exc
                self._sleep(attempt)
        raise CniError(
            TRY_AGAIN_LATER, f"SpiderEndpoint {req.pod_ref}: too many conflicting writes"
        )

    # --- release ------------------------------------------------------------------------------
    def _release_in_pool(
        self, pool: str, uid: str, ips: set[str] | None, keep: frozenset[str] = frozenset()
    ) -> list[str]:
        """Drop this UID's records (only ``ips`` when given, never ``keep``) from ``pool``."""

        def mutate(
            _pool: dict[str, Any], records: dict[str, dict[str, str]]
        ) -> tuple[bool, list[str]]:
            gone = [
                ip
                for ip, r in records.items()
                if r.get("podUid") == uid and (ips is None or ip in ips) and ip not in keep
            ]
            for ip in gone:
                del records[ip]
            return bool(gone), gone

        try:
            return self.update_pool(pool, mutate)
        except CniError as exc:
            if exc.code == POOL_NOT_FOUND:
                return []
            raise

    def release(self, req: IpamRequest) -> list[tuple[str, str]]:
        """Release this pod UID's IPs for ``req.ifname`` and its SpiderEndpoint entry.

        Idempotent: releasing twice, or for a pod never allocated, does nothing. Without
        ``req.pod_uid`` the SpiderEndpoint's UID is used. When the endpoint does not say which
        pools hold the interface's IPs, every pool is scanned for the UID's records (those of
        the pod's other interfaces are kept). Returns ``[(pool, ip)]`` released.
        """
        endpoint = self._get_endpoint(req.namespace, req.pod_name)
        cur = self._current(endpoint)
        uid = req.pod_uid or cur.get("uid", "")
        if not uid:
            return []
        mine = cur.get("uid") == uid
        entry = (
            next((e for e in cur.get("ips") or [] if e.get("interface") == req.ifname), None)
            if mine
            else None
        )
        keep = frozenset(self._claimed_by_others(endpoint, uid, req.ifname))
        released: list[tuple[str, str]] = []
        dropped = (
            self._executor.submit(self._drop_endpoint_entry, req, uid, endpoint) if mine else None
        )
        if entry is not None:
            targets = [(entry.get(f"ipv{f}Pool"), entry.get(f"ipv{f}")) for f in (4, 6)]
            for pool, address in targets:
                if pool and address:
                    ip = address.split("/")[0]
                    released += [(pool, i) for i in self._release_in_pool(pool, uid, {ip})]
        else:
            items = self._call("listing SpiderIPPools", lambda: self.pools.list()).get("items", [])
            for pool in items:
                try:
                    records = ippool.allocated_ips(pool.get("status"))
                except ValueError:
                    continue
                if any(r.get("podUid") == uid and ip not in keep for ip, r in records.items()):
                    name = pool["metadata"]["name"]
                    released += [(name, i) for i in self._release_in_pool(name, uid, None, keep)]
        if dropped is not None:
            dropped.result()
        return released

    def _drop_endpoint_entry(
        self, req: IpamRequest, uid: str, first: dict[str, Any] | None = None
    ) -> None:
        ep = first
        for attempt in range(self.max_attempts):
            if attempt > 0 or ep is None:
                ep = self._get_endpoint(req.namespace, req.pod_name)
            cur = self._current(ep)
            if ep is None or cur.get("uid") != uid:
                return
            rest = [e for e in cur.get("ips") or [] if e.get("interface") != req.ifname]
            try:
                if rest:
                    body = dict(ep)
                    body["status"] = {**ep["status"], "current": {**cur, "ips": rest}}
                    self._call(
                        "writing SpiderEndpoint status",
                        partial(self.endpoints.replace_status, body),
                    )
                else:
                    self._call(
                        "deleting SpiderEndpoint",
                        lambda: self.endpoints.delete(req.pod_name, req.namespace),
                    )
                return
            except ApiException as exc:
                if exc.status == 404:
                    return
                if exc.status != 409:
                    raise CniError(
                        TRY_AGAIN_LATER,
                        f"updating SpiderEndpoint {req.pod_ref}: {exc.status} {exc.reason}",
                    ) from exc
                self._sleep(attempt)

    # --- check --------------------------------------------------------------------------------
    def check(self, req: IpamRequest) -> None:
        """CHECK: the SpiderEndpoint names this interface and each pool still holds its IP."""
        endpoint = self._get_endpoint(req.namespace, req.pod_name)
        cur = self._current(endpoint)
        uid = req.pod_uid or cur.get("uid", "")
        if endpoint is None or cur.get("uid") != uid:
            raise CniError(CHECK_FAILED, f"no SpiderEndpoint {req.pod_ref} for pod UID {uid}")
        entry = next((e for e in cur.get("ips") or [] if e.get("interface") == req.ifname), None)
        if entry is None:
            raise CniError(
                CHECK_FAILED, f"SpiderEndpoint {req.pod_ref} has no entry for {req.ifname}"
            )
        for f in (4, 6):
            pool, address = entry.get(f"ipv{f}Pool"), entry.get(f"ipv{f}")
            if not (pool and address):
                continue
            records = ippool.allocated_ips(self.get_pool(pool).get("status"))
            ip = address.split("/")[0]
            if records.get(ip, {}).get("podUid") != uid:
                raise CniError(
                    CHECK_FAILED,
                    f"SpiderIPPool {pool} no longer records {ip} for pod {req.pod_ref}",
                )

    # --- results ------------------------------------------------------------------------------
    @staticmethod
    def to_cni_result(allocations: list[Allocation]) -> dict[str, Any]:
        """The CNI IPAM result (1.0.0 shape): ips with gateway, default route via each gateway
        plus the pools' routes, empty dns."""
        ips: list[dict[str, Any]] = []
        routes: list[dict[str, str]] = []
        for a in allocations:
            ip: dict[str, Any] = {"address": a.address}
            if a.gateway:
                ip["gateway"] = a.gateway
                routes.append({"dst": "0.0.0.0/0" if a.family == 4 else "::/0", "gw": a.gateway})
            ips.append(ip)
            routes.extend(
                {"dst": r["dst"], "gw": r["gw"]} if r.get("gw") else {"dst": r["dst"]}
                for r in a.routes
            )
        return {"ips": ips, "routes": routes, "dns": {}}
