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
(per its SpiderEndpoint), in any candidate pool, are reused, so a retried ADD never takes a
second IP. Each SpiderEndpoint entry also names the CNI container (sandbox) that holds the
interface (``containerID``), and a DEL releases only what its container holds: the late DEL
of a pod's dead sandbox never frees the address its new sandbox uses. No pool hands out an
address that another SpiderIPPool covers (:class:`PoolIndex`): overlapping pools never give one
address twice.
Sources: reference/spiderpool.md (Spiderpool 1.2.x, v2beta1); Kubernetes API conventions,
"Concurrency Control and Consistency"; Kubernetes label selectors (matchLabels/matchExpressions).
"""

from __future__ import annotations

import bisect
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
    INTERNAL,
    INVALID_CONFIG,
    NO_POOL_ELIGIBLE,
    NO_POOL_SELECTED,
    POD_NOT_FOUND,
    POOL_EXHAUSTED,
    POOL_NOT_FOUND,
    TRY_AGAIN_LATER,
    CniError,
)
from reconciler import ippool, vocab
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


MAX_RECORDS = vocab.MAX_POOL_RECORDS
MAX_SAFE_INTEGER = vocab.MAX_SAFE_INTEGER


class BadRecordKey(ValueError):
    """A ``status.allocatedIPs`` key, or an address in a pool spec, is not a canonical IP."""


def ip_value(text: str, what: str = "status.allocatedIPs key") -> int:
    """The integer value of a canonical IP address string.

    Raises BadRecordKey naming ``what`` for anything else (a CIDR, a padded or
    non-canonical form such as ``172.18.030.131`` or ``fd00::0001``, an empty string): a
    record key that differs from the canonical form could hide a taken address.
    """
    return _ip_key(text, what)[1]


def _ip_key(text: str, what: str = "status.allocatedIPs key") -> tuple[int, int]:
    """``(version, value)`` of a canonical IP address string; BadRecordKey as :func:`ip_value`."""
    key = ippool.canonical_ip(text) if isinstance(text, str) else None
    if key is not None:
        return key
    try:
        addr = netaddr.IPAddress(text)
    except (netaddr.AddrFormatError, ValueError, TypeError) as exc:
        raise BadRecordKey(f"{what} {text!r} is not an IP address") from exc
    raise BadRecordKey(f"{what} {text!r} is not in canonical form ({addr})")


def lowest_free(
    spec: dict[str, Any],
    taken: Iterable[str],
    reserved: Iterable[str] = (),
    covered: netaddr.IPSet | None = None,
) -> str | None:
    """Lowest IP of ``ips - excludeIPs`` not in ``taken``, not the pool's gateway, not one of
    ``reserved`` (the gateways of other pools) and not in ``covered`` (addresses other
    SpiderIPPools cover, see :meth:`PoolIndex.overlap`); None when full.

    Raises BadRecordKey when a ``taken`` key is not a canonical IP, PoolSyntaxError (a
    ValueError) for a malformed ``ips``/``excludeIPs`` entry.
    """
    busy = {_ip_key(ip) for ip in taken}
    if spec.get("gateway"):
        busy.add(_ip_key(str(spec["gateway"]), "spec.gateway"))
    for gw in reserved:
        addr = netaddr.IPAddress(gw)
        busy.add((addr.version, int(addr)))
    allowed = ippool.allocatable(spec)
    if covered:
        allowed = allowed - covered
    for cidr in allowed.iter_cidrs():
        for value in range(cidr.first, cidr.last + 1):
            if (cidr.version, value) not in busy:
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
    def __init__(
        self, pool: str, total: int, used: int, why: str = "", overlap: str = "", covered: int = 0
    ) -> None:
        super().__init__(pool)
        self.pool, self.total, self.used, self.why = pool, total, used, why
        self.overlap, self.covered = overlap, covered

    def describe(self) -> str:
        if self.why:
            return f"SpiderIPPool {self.pool} {self.why}"
        if self.overlap:
            return (
                f"SpiderIPPool {self.pool}: {self.overlap}; an address that another "
                f"SpiderIPPool covers is never handed out (remove the overlap), and the other "
                f"{max(0, self.total - self.covered)} of its {self.total} IPs are taken "
                f"({self.used} allocation records)"
            )
        return f"SpiderIPPool {self.pool} has all {self.total} IPs allocated ({self.used} records)"


ETCD_REQUEST_LIMIT = "1.5 MiB"
"""etcd's default ``--max-request-bytes``: the most one object (with its status) may weigh."""


def size_refusal(exc: ApiException) -> str | None:
    """The API server's message when it refused a write because the object is too large, else
    None.

    kube-apiserver answers 413 (RequestEntityTooLarge) to a body over its own limit (3 MiB for
    JSON), and 500 with etcd's ``etcdserver: request is too large`` (or its gRPC client's
    ``trying to send message larger than max``) to an object over what one etcd request may
    carry (``--max-request-bytes``, 1.5 MiB by default: reached first). Sources: etcd
    configuration flags (``--max-request-bytes``); Kubernetes API concepts.
    """
    if exc.status not in (413, 500):
        return None
    text = str(exc.body or exc.reason or "")
    try:
        message = str(json.loads(text).get("message") or text)
    except (ValueError, AttributeError):
        message = text
    if exc.status == 413 or "request is too large" in message or "larger than max" in message:
        return message.strip() or f"{exc.status} {exc.reason}"
    return None


def _too_large(before: int, after: int, size: int, refusal: str) -> str:
    """The ``why`` of a pool holding ``before`` records whose status with ``after`` records
    (``size`` bytes of JSON) the API server refused as too large."""
    return (
        f"cannot record another address: it holds {before} allocation records and the API "
        f"server refused its status with {after} (a {size}-byte object) as too large "
        f"({refusal}); an object must fit in one etcd request (etcd's --max-request-bytes, "
        f"{ETCD_REQUEST_LIMIT} by default): release addresses, or split its spec.ips into "
        f"smaller pools"
    )


class _Ineligible(Exception):
    def __init__(self, pool: str, why: str) -> None:
        super().__init__(f"{pool}: {why}")
        self.pool, self.why = pool, why


@dataclass
class _PoolOp:
    """One queued read-modify-write of a pool (see Ipam.update_pool)."""

    mutate: Callable[[dict[str, Any], dict[str, dict[str, str]]], tuple[bool, Any]]
    first: dict[str, Any] | None
    fresh: bool
    done: threading.Event = field(default_factory=threading.Event)
    claimed: bool = False
    value: Any = None
    error: BaseException | None = None


class _KeyedLocks:
    """One lock per key, created on demand and dropped when nobody holds or waits for it.

    Unlike ``threading.Lock`` in a dict that only grows, the table holds only keys in use.
    A key may be released by another thread than the one that acquired it.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Any, list[Any]] = {}

    def acquire(self, key: Any, timeout: float) -> bool:
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        if entry[0].acquire(timeout=timeout):
            return True
        self._forget(key, entry)
        return False

    def release(self, key: Any) -> None:
        with self._guard:
            entry = self._locks[key]
        entry[0].release()
        self._forget(key, entry)

    def _forget(self, key: Any, entry: list[Any]) -> None:
        with self._guard:
            entry[1] -= 1
            if entry[1] == 0 and self._locks.get(key) is entry:
                del self._locks[key]


def _entry_ips(entry: dict[str, Any]) -> set[str]:
    return {entry[k].split("/")[0] for k in ("ipv4", "ipv6") if entry.get(k)}


def _ranges_text(addresses: netaddr.IPSet) -> str:
    """``a-b, c`` for an IPSet (ranges as Spiderpool writes ``spec.ips``)."""
    parts = []
    for r in addresses.iter_ipranges():
        parts.append(str(r[0]) if r.size == 1 else f"{r[0]}-{r[-1]}")
    return ", ".join(parts)


class _IndexedPool:
    """One SpiderIPPool as a LIST saw it: identity and the addresses it covers.

    ``covers`` = ``ips - excludeIPs`` plus the ``status.allocatedIPs`` keys outside that set
    (records left behind by a spec change). Built from ``previous`` (the same pool, same UID,
    in the index before) where possible: the spec's set is reused when ``ips``/``excludeIPs``
    are unchanged and only record keys not seen before are parsed, so re-listing a pool whose
    status changed with each ADD costs a set difference, not a parse of every record.
    """

    __slots__ = (
        "bounds", "covers", "family", "generation", "name", "outliers", "record_keys",
        "resource_version", "spec_key", "spec_ranges", "spec_set", "spec_starts", "uid",
    )  # fmt: skip

    def __init__(self, pool: dict[str, Any], previous: _IndexedPool | None) -> None:
        md = pool.get("metadata") or {}
        spec = pool.get("spec") or {}
        self.name = str(md.get("name", ""))
        self.family = pool_family(spec)
        self.uid = str(md.get("uid", ""))
        gen = md.get("generation")
        self.generation: int | None = gen if isinstance(gen, int) else None
        self.resource_version = str(md.get("resourceVersion", ""))
        self.spec_key = _spec_key(spec)
        if previous is not None and previous.uid != self.uid:
            previous = None
        if previous is not None and previous.spec_key == self.spec_key:
            self.spec_set: netaddr.IPSet = previous.spec_set
            self.spec_ranges: list[tuple[int, int, int]] = previous.spec_ranges
        else:
            previous = None  # outliers are relative to the spec's set
            try:
                self.spec_set = ippool.allocatable(spec)
            except (ValueError, TypeError) as exc:  # such a pool cannot allocate either
                log.warning("SpiderIPPool %s: spec.ips unreadable (%s)", self.name, exc)
                self.spec_set = netaddr.IPSet()
            self.spec_ranges = sorted(
                (r.version, r.first, r.last) for r in self.spec_set.iter_ipranges()
            )
        # (version, first) of each range, for bisect: IPSet membership costs ~40 us an address
        self.spec_starts = [(v, first) for v, first, _ in self.spec_ranges]
        try:
            keys = frozenset(ippool.allocated_ips(pool.get("status")))
        except ValueError as exc:
            log.warning("SpiderIPPool %s: status.allocatedIPs unreadable (%s)", self.name, exc)
            keys = frozenset()
        self.record_keys = keys
        if previous is not None:
            outliers = {k: v for k, v in previous.outliers.items() if k in keys}
            new = keys - previous.record_keys
        else:
            outliers, new = {}, keys
        for key in new:
            try:
                addr = netaddr.IPAddress(key)
            except (netaddr.AddrFormatError, ValueError, TypeError):
                continue  # not an address: covers nothing (the pool's own writes refuse it)
            if not self._in_spec(addr):
                outliers[key] = addr
        self.outliers: dict[str, netaddr.IPAddress] = outliers
        if outliers:
            self.covers = self.spec_set | netaddr.IPSet(outliers.values())
        else:
            self.covers = self.spec_set
        cidrs = list(self.covers.iter_cidrs())
        self.bounds: tuple[int, int] | None = (cidrs[0].first, cidrs[-1].last) if cidrs else None

    def _in_spec(self, addr: netaddr.IPAddress) -> bool:
        value = int(addr)
        i = bisect.bisect_right(self.spec_starts, (addr.version, value)) - 1
        return i >= 0 and self.spec_ranges[i][0] == addr.version and self.spec_ranges[i][2] >= value


def _spec_key(spec: dict[str, Any]) -> tuple[Any, ...]:
    """What ``ips - excludeIPs`` depends on, hashable (a malformed value hashes by its repr)."""

    def part(value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        return repr(value)

    return (part(spec.get("ips")), part(spec.get("excludeIPs")))


class PoolIndex:
    """Every SpiderIPPool as one LIST saw it: each pool's gateway and the addresses it covers.

    Built by :meth:`Ipam.list_pools`; read by every ADD. ``gateways``: every pool's
    ``spec.gateway`` (never a pod address in any pool). :meth:`overlap` gives the addresses of a
    pool that other SpiderIPPools of its family cover (their ``ips - excludeIPs`` or their
    ``status.allocatedIPs`` keys), computed once per index and pool spec. :meth:`knows` says
    whether a pool copy is what the LIST saw (or older): when it is not, the index is stale for
    that pool's decisions and must be re-listed. ``stamp``: ``time.monotonic()`` of the LIST.
    Source: reference/spiderpool.md ("pools sharing a subnet may not overlap in IPs", enforced
    there by Spiderpool's admission webhook; we have none, so the IPAM enforces it).
    """

    def __init__(
        self, items: list[dict[str, Any]], previous: PoolIndex | None, stamp: float
    ) -> None:
        self.stamp = stamp
        self.gateways = frozenset(
            str(p["spec"]["gateway"])
            for p in items
            if (p.get("spec") or {}).get("gateway") and _is_ip(str(p["spec"]["gateway"]))
        )
        before = previous.pools if previous is not None else {}
        self.pools: dict[str, _IndexedPool] = {}
        for p in items:
            name = str((p.get("metadata") or {}).get("name", ""))
            old = before.get(name)
            rv = str((p.get("metadata") or {}).get("resourceVersion", ""))
            if old is not None and rv and old.resource_version == rv:
                self.pools[name] = old  # unchanged since the last LIST
            else:
                self.pools[name] = _IndexedPool(p, old)
        self._overlaps: dict[tuple[Any, ...], tuple[netaddr.IPSet, dict[str, netaddr.IPSet]]] = {}

    def knows(self, pool: dict[str, Any]) -> bool:
        """True when the LIST saw ``pool`` as this copy shows it, or later.

        False when the index has no pool of that name, has one with another UID (deleted and
        recreated), or ``pool`` has a higher ``metadata.generation`` (its spec changed after
        the LIST); without generations, when the spec's ``ips``/``excludeIPs`` differ.
        A copy older than the index (a stale cache, lower generation) is known: a status
        write from it is refused with 409 anyway.
        """
        md = pool.get("metadata") or {}
        seen = self.pools.get(str(md.get("name", "")))
        if seen is None or seen.uid != str(md.get("uid", "")):
            return False
        gen = md.get("generation")
        if isinstance(gen, int) and seen.generation is not None:
            return gen <= seen.generation
        return seen.spec_key == _spec_key(pool.get("spec") or {})

    def overlap(
        self, name: str, spec: dict[str, Any]
    ) -> tuple[netaddr.IPSet, dict[str, netaddr.IPSet]]:
        """The addresses of pool ``name`` (with ``spec``) that other pools of its family cover.

        Returns ``(union, {other pool name: its part})``; both empty in the usual case.
        Memoized per ``(name, ips, excludeIPs)`` for the life of the index, so an ADD pays a
        dict lookup. Raises PoolSyntaxError (a ValueError) for a malformed ``spec``.
        """
        key = (name, *_spec_key(spec))
        hit = self._overlaps.get(key)
        if hit is not None:
            return hit
        family = pool_family(spec)
        allowed = ippool.allocatable(spec)
        cidrs = list(allowed.iter_cidrs())
        parts: dict[str, netaddr.IPSet] = {}
        if cidrs:
            lo, hi = cidrs[0].first, cidrs[-1].last
            for other, seen in self.pools.items():
                if other == name or seen.family != family or seen.bounds is None:
                    continue
                if seen.bounds[1] < lo or seen.bounds[0] > hi:
                    continue
                common = seen.covers & allowed
                if common:
                    parts[other] = common
        union = netaddr.IPSet()
        for common in parts.values():
            union |= common
        out = (union, parts)
        self._overlaps[key] = out
        return out

    @staticmethod
    def describe(parts: dict[str, netaddr.IPSet]) -> str:
        """``10.1.0.10-10.1.0.20 are also in SpiderIPPool pool-a; ...`` for an error message,
        from the ``{other pool name: addresses}`` that :meth:`overlap` returns."""
        return "; ".join(
            f"{_ranges_text(common)} {'is' if common.size == 1 else 'are'} also in "
            f"SpiderIPPool {other}"
            for other, common in sorted(parts.items())
        )


class Ipam:
    """The IPAM engine of one node agent (thread-safe).

    ``api`` is a ``kubernetes.client.ApiClient``; ``node_name`` this node's Node name.

    Concurrency: every call for one pod (ADD, DEL, CHECK of any of its interfaces) holds that
    pod's lock from its SpiderEndpoint read to its SpiderEndpoint write, so two interfaces
    attached at once never both take "the pod's unclaimed record", and a DEL never runs between
    an ADD's pool write and its endpoint write. Allocations on one pool are serialised inside
    this process by a per-pool lock around one read-modify-write, waited for at most
    ``pool_lock_wait`` seconds (then the write goes ahead unserialised: the resourceVersion
    compare-and-swap keeps it correct, the lock only saves 409s), so one hung request never
    stalls the other pods of the pool. Conflicts (409) are retried up to ``max_attempts``
    times with jittered exponential backoff (``backoff`` seconds, capped at ``backoff_cap``).

    Every API request carries a timeout of ``request_timeout`` seconds: a request the server
    does not answer fails the call with CniError 11. ``gateway_ttl``: how long the index of
    every pool (:class:`PoolIndex`, one LIST: gateways and covered addresses, see
    :meth:`_pool_index`) is reused.

    Overlapping pools: a pool never hands out an address that another SpiderIPPool of its
    family covers (in that pool's ``ips - excludeIPs`` or its ``status.allocatedIPs``), so
    two pools with overlapping ``spec.ips`` (made by hand, by another reconciler, or a pool
    renamed in Git whose old copy is kept while it has allocations) never give one address
    twice; the overlap is handed out by neither (Spiderpool refuses such pools in its
    webhook). A pod's own record in the overlap is still returned to its retried ADD. A pool
    left with no free address for that reason fails with CniError 101 naming the other pools
    and the ranges.

    Freshness: a pool copy is trusted for a decision only when it was just read, or when a
    status write made from it succeeded (the API server refuses a write from a stale copy with
    409): eligibility (``disable``, affinities...), gateway, prefix and routes always come from
    such a copy, so an edit made in Git is seen by the next ADD.

    Every error is a CniError: 11 when the API server cannot be reached, does not answer in
    time or the conflicts do not stop, 7 for malformed pool objects, 101-104/110 for pool
    problems (see node_agent.cni.errors).
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
        request_timeout: float = 10.0,
        pool_lock_wait: float = 2.0,
        gateway_ttl: float = 30.0,
        max_records: int = MAX_RECORDS,
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.system_namespace = system_namespace
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self.cache_ttl = cache_ttl
        self.request_timeout = request_timeout
        self.pool_lock_wait = pool_lock_wait
        self.gateway_ttl = gateway_ttl
        self.max_records = max_records
        self.pod_lock_wait = 3 * request_timeout + 5
        """Seconds a call waits for another call of the same pod before failing with 11."""
        self._kw: dict[str, Any] = {"_request_timeout": request_timeout}
        self.pools = Objects(api, SPIDER_IPPOOL)
        self.endpoints = Objects(api, SPIDER_ENDPOINT)
        self.core: Any = client.CoreV1Api(api)
        self._pool_locks = _KeyedLocks()
        self._batch_guard = threading.Lock()
        self._batches: dict[str, list[_PoolOp]] = {}
        self._pod_locks = _KeyedLocks()
        self._executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ipam")
        self._pool_cache: dict[str, dict[str, Any]] = {}
        self._ttl_cache: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._index_lock = threading.Lock()
        self._index: PoolIndex | None = None
        self.index_refreshes = 0
        """LISTs of every SpiderIPPool made (for benchmarks and tests)."""
        self.conflicts = 0
        """Status writes that got 409 Conflict (for benchmarks and tests)."""

    # --- API access ---------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run an API call; connection failures and timeouts become CniError 11 naming the
        server."""
        try:
            return fn()
        except ApiException:
            raise
        except Exception as exc:  # urllib3 MaxRetryError, connection refused, timeouts
            host = getattr(getattr(self.api, "configuration", None), "host", "?")
            raise CniError(
                TRY_AGAIN_LATER,
                f"Kubernetes API server {host} unreachable or not answering within "
                f"{self.request_timeout:g} s while {what}: {type(exc).__name__}: {exc}",
            ) from exc

    def _read_json(self, what: str, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        resp = self._call(what, lambda: fn(*args, _preload_content=False, **self._kw))
        out: dict[str, Any] = json.loads(resp.data)
        return out

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """The Pod as a dict; CniError 110 when it does not exist, 11 on other API errors."""
        try:
            return self._read_json(
                f"reading pod {namespace}/{name}", self.core.read_namespaced_pod, name, namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                raise CniError(
                    POD_NOT_FOUND, f"pod {namespace}/{name} not found in the API server"
                ) from exc
            raise CniError(
                TRY_AGAIN_LATER, f"reading pod {namespace}/{name}: {exc.status} {exc.reason}"
            ) from exc

    def _get_optional(self, what: str, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        try:
            return self._read_json(what, fn, *args)
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise CniError(TRY_AGAIN_LATER, f"{what}: {exc.status} {exc.reason}") from exc

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
        """The SpiderIPPool ``name``, read now; CniError 102 (naming it and ``source``) when
        absent, 11 on other API errors."""
        try:
            pool = self._call(
                f"reading SpiderIPPool {name}", lambda: self.pools.get(name, **self._kw)
            )
        except ApiException as exc:
            if exc.status == 404:
                self._pool_cache.pop(name, None)
                by = f" (named by {source})" if source else ""
                raise CniError(POOL_NOT_FOUND, f"SpiderIPPool {name} not found{by}") from exc
            raise CniError(
                TRY_AGAIN_LATER, f"reading SpiderIPPool {name}: {exc.status} {exc.reason}"
            ) from exc
        self._pool_cache[name] = pool
        return pool

    def list_pools(self) -> list[dict[str, Any]]:
        """Every SpiderIPPool (one LIST); CniError 11 on API errors."""
        try:
            items: list[dict[str, Any]] = self._call(
                "listing SpiderIPPools", lambda: self.pools.list(**self._kw)
            ).get("items", [])
        except ApiException as exc:
            raise CniError(
                TRY_AGAIN_LATER, f"listing SpiderIPPools: {exc.status} {exc.reason}"
            ) from exc
        self.index_refreshes += 1
        self._index = PoolIndex(items, self._index, time.monotonic())
        return items

    def _pool_index(self, pool: dict[str, Any]) -> PoolIndex:
        """The index of every pool (gateways, covered addresses) to decide an ADD from ``pool``.

        One LIST, reused for ``gateway_ttl`` seconds, and re-listed at once when ``pool`` is not
        in it (a new pool), has another UID (recreated) or a newer ``metadata.generation``
        (its spec changed since the LIST: it may have grown into another pool's range).
        ``pool`` is the copy the ADD decides from, read anyway for the compare-and-swap, so
        this costs no request in the steady state.

        Why this is enough for "an IP is never handed out twice" across pools with
        overlapping ``spec.ips``: a status write succeeds only from the pool's current copy
        (409 otherwise), so every committed allocation from pool P used an index listed
        after P's current spec was written. For P and Q to both hand out X, P's index must
        not show Q covering X, and Q's index must not show P covering X (spec or record).
        Q's index was listed after Q's spec was written, and P's after P's; P covers X from
        its spec write until its allocation of X is released, so Q's index must predate P's
        spec write, and likewise P's index must predate Q's: both cannot hold. A newly
        created overlapping pool therefore always sees the older ones, and a pool *updated*
        to grow into another's range re-lists on its first ADD. What is left: an API server
        that sets no ``metadata.generation`` and a copy whose spec equals the indexed one
        (then only ``gateway_ttl`` bounds the staleness), and addresses written into
        another pool's ``status.allocatedIPs`` outside its ``spec.ips`` by hand after the LIST
        (seen within ``gateway_ttl``).
        """
        with self._index_lock:
            idx = self._index
            if (
                idx is None
                or time.monotonic() - idx.stamp >= self.gateway_ttl
                or not idx.knows(pool)
            ):
                self.list_pools()
                idx = self._index
            assert idx is not None
            return idx

    def _sleep(self, attempt: int) -> None:
        time.sleep(random.uniform(0, min(self.backoff_cap, self.backoff * (2**attempt))))

    def update_pool(
        self,
        name: str,
        mutate: Callable[[dict[str, Any], dict[str, dict[str, str]]], tuple[bool, T]],
        first: dict[str, Any] | None = None,
        *,
        fresh: bool = False,
    ) -> T:
        """Read-modify-write pool ``name``'s status with the read resourceVersion.

        ``mutate(pool, records)`` changes ``records`` in place and returns ``(changed, value)``;
        nothing is written when ``changed`` is false. The first attempt may use ``first``
        (``fresh``: it was just read) or this agent's last seen copy of the pool (what its own
        last write returned): a write from a stale copy is refused with 409 Conflict by the API
        server, and decisions that write nothing or refuse (a record already there, the pool
        full or not eligible: ``mutate`` raising _Exhausted/_Ineligible) are only trusted on a
        fresh read. On 409 the pool is re-read and ``mutate`` runs again, up to
        ``max_attempts``. Returns ``value``. Raises CniError 102/11/7, or what ``mutate`` raises.

        Group commit: calls for one pool that wait while another runs are applied together,
        one after the other to the same records, and written with one status write by the
        thread that holds the pool's lock (waited for at most ``pool_lock_wait`` seconds;
        a call that got neither the lock nor a place in a running batch runs alone).
        """
        op = _PoolOp(mutate, first, fresh and first is not None)
        with self._batch_guard:
            self._batches.setdefault(name, []).append(op)
        if self._pool_locks.acquire(name, self.pool_lock_wait):
            try:
                while not op.done.is_set():  # lead batches until this call's is done
                    with self._batch_guard:
                        ops = self._batches.pop(name, [])
                        for o in ops:
                            o.claimed = True
                    if not ops:  # cannot happen: an unclaimed op is queued
                        raise CniError(INTERNAL, f"SpiderIPPool {name}: lost a queued update")
                    self._run_batch(name, ops)
            finally:
                self._pool_locks.release(name)
        else:
            with self._batch_guard:
                alone = not op.claimed
                if alone:
                    self._batches[name].remove(op)
                    if not self._batches[name]:
                        del self._batches[name]
                    op.claimed = True
            if alone:
                self._run_batch(name, [op])
            else:
                op.done.wait()
        if op.error is not None:
            raise op.error
        value: T = op.value
        return value

    def _run_batch(self, name: str, ops: list[_PoolOp]) -> None:
        """Apply ``ops`` in order to one copy of pool ``name`` and write it once (see
        :meth:`update_pool`); every op ends done with a value or an error."""
        try:
            self._apply_batch(name, ops)
        except BaseException as exc:
            for op in ops:
                if not op.done.is_set():
                    op.error = exc
        finally:
            for op in ops:
                op.done.set()

    def _apply_batch(self, name: str, ops: list[_PoolOp]) -> None:
        lead = next((o for o in ops if o.fresh), None) or next((o for o in ops if o.first), None)
        pool = lead.first if lead is not None else self._pool_cache.get(name)
        fresh = lead is not None and lead.fresh
        for attempt in range(self.max_attempts):
            if pool is None:
                pool = self.get_pool(name)
                fresh = True
            try:
                records = ippool.allocated_ips(pool.get("status"))
            except ValueError as exc:
                raise CniError(INVALID_CONFIG, f"SpiderIPPool {name}: {exc}") from exc
            outcomes: list[tuple[_PoolOp, bool, Any, BaseException | None]] = []
            stale = False
            for op in ops:
                try:
                    changed, value = op.mutate(pool, records)
                except (_Exhausted, _Ineligible) as exc:
                    if not fresh:
                        stale = True
                        break
                    outcomes.append((op, False, None, exc))
                    continue
                except Exception as exc:  # a CniError of this op only; records untouched
                    outcomes.append((op, False, None, exc))
                    continue
                if not changed and not fresh:
                    stale = True
                    break
                outcomes.append((op, changed, value, None))
            if stale:
                pool = None
                continue
            if any(changed for _, changed, _, _ in outcomes):
                body = dict(pool)
                try:
                    body["status"] = {
                        **(pool.get("status") or {}),
                        **ippool.pool_status(pool.get("spec") or {}, records),
                    }
                except ValueError as exc:
                    raise CniError(INVALID_CONFIG, f"SpiderIPPool {name}: {exc}") from exc
                if not records:
                    body["status"].pop("allocatedIPs", None)
                try:
                    written = self._call(
                        f"writing SpiderIPPool {name} status",
                        partial(self.pools.replace_status, body, **self._kw),
                    )
                except ApiException as exc:
                    if exc.status == 404:
                        self._pool_cache.pop(name, None)
                        raise CniError(POOL_NOT_FOUND, f"SpiderIPPool {name} was deleted") from exc
                    refusal = size_refusal(exc)
                    if refusal is not None:
                        if len(ops) > 1:  # the first ones may fit on their own
                            self._apply_one_by_one(name, ops)
                            return
                        if not fresh:  # a newer copy may have fewer records
                            pool = None
                            continue
                        log.warning(
                            "SpiderIPPool %s: status refused as too large: %s", name, refusal
                        )
                        before = len(ippool.allocated_ips(pool.get("status")))
                        why = _too_large(before, len(records), len(json.dumps(body)), refusal)
                        raise _Exhausted(name, 0, before, why) from exc
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
            for op, _, value, error in outcomes:
                op.value, op.error = value, error
            return
        raise CniError(
            TRY_AGAIN_LATER,
            f"SpiderIPPool {name}: {self.max_attempts} conflicting status writes in a row; try again",
        )

    def _apply_one_by_one(self, name: str, ops: list[_PoolOp]) -> None:
        """Apply ``ops`` as batches of one, in order (a group commit the API server refused as
        too large: as many of them as fit are written). Each starts from this agent's last
        written copy, so nothing is decided from the refused batch's copy."""
        for op in ops:
            op.first, op.fresh = None, False
            try:
                self._apply_batch(name, [op])
            except BaseException as exc:
                op.error = exc

    # --- allocation ---------------------------------------------------------------------
    def allocate(self, req: IpamRequest) -> list[Allocation]:
        """Allocate one IP per family the chosen pools ask for; idempotent per pod
        UID+interface.

        Records the result in the pod's SpiderEndpoint before returning. On failure of a
        later family, or of the endpoint write, the IPs taken are released again. Raises
        CniError (see class docstring).
        """
        done, recorded = self.allocate_begin(req)
        recorded.result()
        return done

    def _lock_pod(self, req: IpamRequest) -> tuple[str, str]:
        key = (req.namespace, req.pod_name)
        if not self._pod_locks.acquire(key, self.pod_lock_wait):
            raise CniError(
                TRY_AGAIN_LATER,
                f"another CNI call for pod {req.pod_ref} has been running for more than "
                f"{self.pod_lock_wait:g} s on node {self.node_name}",
            )
        return key

    def allocate_begin(self, req: IpamRequest) -> tuple[list[Allocation], Future[None]]:
        """Like :meth:`allocate`, but returns as soon as the pool records are written.

        The SpiderEndpoint write continues in a worker thread; the returned future completes
        when it is done and raises its CniError after releasing the IPs again. A caller must
        wait for it before reporting success (the CNI ADD answer), and can configure the pod
        interface meanwhile. The pod's lock is held until the future completes.

        Idempotency: the pod UID's records that no other interface of the pod claims (per its
        SpiderEndpoint) are this interface's, in whichever candidate pool they are: a retried
        ADD, or the ADD of a recreated sandbox of the same pod, gets the same IP again, and
        leftovers of earlier failed attempts in other candidate pools are released.
        """
        key = self._lock_pod(req)
        try:
            done, rollback, uid, pod, endpoint = self._allocate_locked(req)
        except BaseException:
            self._pod_locks.release(key)
            raise

        def record() -> None:
            try:
                self._record_endpoint(req, uid, pod, done, endpoint)
            except BaseException:
                rollback()
                raise
            finally:
                self._pod_locks.release(key)

        try:
            return done, self._executor.submit(record)
        except BaseException:
            rollback()
            self._pod_locks.release(key)
            raise

    def _allocate_locked(
        self, req: IpamRequest
    ) -> tuple[list[Allocation], Callable[[], None], str, dict[str, Any], dict[str, Any] | None]:
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
                listed.extend(self.list_pools())
            return listed

        choice = choose_pools(pod, namespace, req.config, req.ifname, all_pools)
        claimed = self._claimed_by_others(endpoint, uid, req.ifname)
        own = self._own_entry(endpoint, uid, req.ifname)
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
                            own.get(f"ipv{family}", "").split("/")[0],
                            node,
                            namespace,
                            listed,
                        )
                    )
        except BaseException:
            rollback()
            raise
        return done, rollback, uid, pod, endpoint

    def _candidates(
        self, names: list[str], source: str, listed: list[dict[str, Any]]
    ) -> dict[str, tuple[dict[str, Any] | None, bool]]:
        """``{name: (copy or None, fresh)}`` for the candidate pools.

        With one candidate its last known copy is enough (the write validates it); with
        several, every one is read now (in parallel), because this pod's records may be in any
        of them. CniError 102 when a candidate does not exist.
        """
        known = {p["metadata"]["name"]: p for p in listed}
        if len(names) == 1:
            name = names[0]
            if name in known:
                return {name: (known[name], True)}
            cached = self._pool_cache.get(name)
            if cached is None:
                return {name: (self.get_pool(name, source), True)}
            return {name: (cached, False)}
        reads = {
            n: self._executor.submit(self.get_pool, n, source) for n in names if n not in known
        }
        wait(list(reads.values()))
        out: dict[str, tuple[dict[str, Any] | None, bool]] = {}
        for n in names:
            out[n] = (known[n], True) if n in known else (reads[n].result(), True)
        return out

    def _allocate_family(
        self,
        req: IpamRequest,
        uid: str,
        pod: dict[str, Any],
        family: int,
        names: list[str],
        source: str,
        claimed: set[str],
        own_ip: str,
        node: Callable[[], dict[str, Any]],
        namespace: Callable[[], dict[str, Any]],
        listed: list[dict[str, Any]],
    ) -> Allocation:
        copies = self._candidates(names, source, listed)

        def unclaimed(pool: dict[str, Any] | None) -> list[str]:
            try:
                records = ippool.allocated_ips((pool or {}).get("status"))
            except ValueError:
                return []
            return [ip for ip, r in records.items() if r.get("podUid") == uid and ip not in claimed]

        holders = [n for n in names if unclaimed(copies[n][0])]
        order = holders + [n for n in names if n not in holders]
        rejected: list[str] = []
        full: list[_Exhausted] = []
        for name in order:
            first, fresh = copies[name]
            try:
                ip, pool = self.update_pool(
                    name,
                    self._take(req, uid, pod, family, claimed, own_ip, node, namespace),
                    first=first,
                    fresh=fresh,
                )
            except _Ineligible as exc:
                rejected.append(f"{name}: {exc.why}")
                continue
            except _Exhausted as exc:
                full.append(exc)
                continue
            for other in holders:
                if other != name:  # leftovers of an earlier attempt that fell back elsewhere
                    leftovers = set(unclaimed(copies[other][0]))
                    try:
                        self._release_in_pool(other, uid, leftovers)
                    except CniError as exc:
                        log.warning("releasing leftovers %s in %s: %s", leftovers, other, exc.msg)
            spec = pool.get("spec") or {}
            try:
                plen = netaddr.IPNetwork(spec["subnet"]).prefixlen
            except (KeyError, netaddr.AddrFormatError, ValueError, TypeError) as exc:
                raise CniError(
                    INVALID_CONFIG,
                    f"SpiderIPPool {name}: spec.subnet {spec.get('subnet')!r} is not a CIDR",
                ) from exc
            return Allocation(
                family=family,
                address=f"{ip}/{plen}",
                pool=name,
                gateway=spec.get("gateway") or None,
                routes=[dict(r) for r in spec.get("routes") or []],
            )
        where = f"pod {req.pod_ref} interface {req.ifname}"
        if full:
            raise CniError(
                POOL_EXHAUSTED,
                "IP pool exhausted: "
                + "; ".join(e.describe() for e in full)
                + (f"; not usable: {'; '.join(rejected)}" if rejected else "")
                + f" ({where})",
            )
        raise CniError(
            NO_POOL_ELIGIBLE,
            f"no usable IPv{family} SpiderIPPool for {where} (candidates from {source}): "
            + "; ".join(rejected),
        )

    def _take(
        self,
        req: IpamRequest,
        uid: str,
        pod: dict[str, Any],
        family: int,
        claimed: set[str],
        own_ip: str,
        node: Callable[[], dict[str, Any]],
        namespace: Callable[[], dict[str, Any]],
    ) -> Callable[
        [dict[str, Any], dict[str, dict[str, str]]], tuple[bool, tuple[str, dict[str, Any]]]
    ]:
        def mutate(
            pool: dict[str, Any], records: dict[str, dict[str, str]]
        ) -> tuple[bool, tuple[str, dict[str, Any]]]:
            name = pool["metadata"]["name"]
            try:
                why = pool_rejection(
                    pool, family, pod=pod, ifname=req.ifname, node_name=self.node_name,
                    node=node, namespace=namespace, system_namespace=self.system_namespace,
                )  # fmt: skip
            except ValueError as exc:
                raise CniError(INVALID_CONFIG, f"SpiderIPPool {name}: {exc}") from exc
            if why:
                raise _Ineligible(name, why)
            mine = sorted(
                (ip for ip, r in records.items() if r.get("podUid") == uid and ip not in claimed),
                key=lambda ip: (ip != own_ip, _sort_key(ip)),
            )
            if mine:  # a retried ADD, or a new sandbox of the pod: the same IP again
                for extra in mine[1:]:
                    del records[extra]  # leftovers of failed attempts of this interface
                return bool(mine[1:]), (mine[0], pool)
            spec = pool.get("spec") or {}
            if len(records) >= self.max_records:
                raise _Exhausted(
                    name, 0, len(records),
                    f"holds {len(records)} allocation records, the most a pool may hold "
                    f"({self.max_records}, as Spiderpool)",
                )  # fmt: skip
            index = self._pool_index(pool)
            try:
                covered, parts = index.overlap(name, spec)
                ip = lowest_free(spec, records, index.gateways, covered)
                total = ippool.allocatable(spec).size
            except ValueError as exc:
                raise CniError(INVALID_CONFIG, f"SpiderIPPool {name}: {exc}") from exc
            if ip is None:
                if parts:
                    raise _Exhausted(
                        name,
                        total,
                        len(records),
                        overlap=PoolIndex.describe(parts),
                        covered=covered.size,
                    )
                raise _Exhausted(name, total, len(records))
            records[ip] = {"pod": req.pod_ref, "podUid": uid}
            return True, (ip, pool)

        return mutate

    # --- endpoint ---------------------------------------------------------------------------
    def _get_endpoint(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(
                f"reading SpiderEndpoint {namespace}/{name}",
                lambda: self.endpoints.get(name, namespace, **self._kw),
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
        out: set[str] = set()
        for entry in cur.get("ips") or []:
            if entry.get("interface") != ifname:
                out |= _entry_ips(entry)
        return out

    def _own_entry(self, endpoint: dict[str, Any] | None, uid: str, ifname: str) -> dict[str, Any]:
        cur = self._current(endpoint)
        if cur.get("uid") != uid:
            return {}
        return next((e for e in cur.get("ips") or [] if e.get("interface") == ifname), {})

    def _entry(self, req: IpamRequest, done: list[Allocation]) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "interface": req.ifname,
            "containerID": req.container_id,
            "vlan": req.vlan,
        }
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

    @staticmethod
    def _pod_owner(name: str, uid: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}

    def _replace_endpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        r, md = self.endpoints.res, body["metadata"]
        out: dict[str, Any] = self.endpoints.api.replace_namespaced_custom_object(
            r.group, r.version, md["namespace"], r.plural, md["name"], body, **self._kw
        )
        return out

    def _record_endpoint(
        self,
        req: IpamRequest,
        uid: str,
        pod: dict[str, Any],
        done: list[Allocation],
        first: dict[str, Any] | None = None,
    ) -> None:
        """Write this interface's entry (with the CNI container ID) into the pod's
        SpiderEndpoint, creating it, or taking it over from an older pod of the same name:
        entries of another UID are dropped and the ownerReference is moved to this pod (a
        StatefulSet pod recreated under its name must not keep an endpoint that the garbage
        collector deletes with the old pod). Every write carries the read resourceVersion."""
        entry = self._entry(req, done)
        owner = next(
            (o for o in pod["metadata"].get("ownerReferences") or [] if o.get("controller")), None
        )
        ep: dict[str, Any] | None = first
        for attempt in range(self.max_attempts):
            if attempt > 0 or ep is None:
                ep = self._get_endpoint(req.namespace, req.pod_name)
            try:
                if ep is None:
                    body = {
                        "apiVersion": SPIDERPOOL_API_VERSION,
                        "kind": SPIDER_ENDPOINT.kind,
                        "metadata": {
                            "name": req.pod_name,
                            "namespace": req.namespace,
                            "ownerReferences": [self._pod_owner(req.pod_name, uid)],
                        },
                    }
                    ep = self._call(
                        "creating SpiderEndpoint", partial(self.endpoints.create, body, **self._kw)
                    )
                refs = ep["metadata"].get("ownerReferences") or []
                if not any(o.get("kind") == "Pod" and o.get("uid") == uid for o in refs):
                    body = dict(ep)
                    body["metadata"] = {
                        **ep["metadata"],
                        "ownerReferences": [
                            *(o for o in refs if o.get("kind") != "Pod"),
                            self._pod_owner(req.pod_name, uid),
                        ],
                    }
                    try:
                        ep = self._call(
                            "moving the SpiderEndpoint ownerReference",
                            partial(self._replace_endpoint, body),
                        )
                    except ApiException as exc:
                        if exc.status != 403:
                            raise
                        log.warning(
                            "SpiderEndpoint %s: cannot move its ownerReference to pod UID %s "
                            "(403: the agent's role needs update on spiderendpoints)",
                            req.pod_ref, uid,
                        )  # fmt: skip
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
                self._call(
                    "writing SpiderEndpoint status",
                    partial(self.endpoints.replace_status, body, **self._kw),
                )
                return
            except ApiException as exc:
                if exc.status not in (404, 409):
                    raise CniError(
                        TRY_AGAIN_LATER,
                        f"writing SpiderEndpoint {req.pod_ref}: {exc.status} {exc.reason}",
                    ) from exc
                ep = None
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
        except _Exhausted as exc:  # refused as too large (a release only shrinks a pool)
            raise CniError(TRY_AGAIN_LATER, exc.describe()) from exc

    def release(self, req: IpamRequest) -> list[tuple[str, str]]:
        """Release what container ``req.container_id`` was given for ``req.ifname``.

        The pod's SpiderEndpoint says which container an interface's IPs belong to: a DEL
        from another container (the late DEL of a pod's dead sandbox, after its new sandbox
        took the interface over) releases nothing. When the endpoint has no entry for the
        interface, the UID's records that no entry claims (leftovers of failed ADDs, or of a
        recreated pod's old UID) are released from every pool. Without ``req.pod_uid`` the
        endpoint's UID is used only when the endpoint names this container for this
        interface; otherwise nothing is released (garbage collection returns leaks).
        Idempotent. Returns ``[(pool, ip)]`` released. Raises CniError 11.
        """
        key = self._lock_pod(req)
        try:
            return self._release_locked(req)
        finally:
            self._pod_locks.release(key)

    def _release_locked(self, req: IpamRequest) -> list[tuple[str, str]]:
        endpoint = self._get_endpoint(req.namespace, req.pod_name)
        cur = self._current(endpoint)
        cur_uid = str(cur.get("uid") or "")
        entry = (
            next((e for e in cur.get("ips") or [] if e.get("interface") == req.ifname), None)
            if cur_uid
            else None
        )
        if req.pod_uid:
            uid = req.pod_uid
        elif entry is not None and entry.get("containerID") == req.container_id:
            uid = cur_uid
        else:
            log.info(
                "DEL of %s %s without K8S_POD_UID: the SpiderEndpoint does not name container "
                "%s for it; nothing released", req.pod_ref, req.ifname, req.container_id,
            )  # fmt: skip
            return []
        released: list[tuple[str, str]] = []
        if cur_uid == uid and entry is not None:
            holder = entry.get("containerID")
            if holder and holder != req.container_id:
                log.info(
                    "DEL of %s %s from container %s ignored: the interface belongs to "
                    "container %s now", req.pod_ref, req.ifname, req.container_id, holder,
                )  # fmt: skip
                return []
            dropped = self._executor.submit(self._drop_endpoint_entry, req, uid, endpoint)
            try:
                for f in (4, 6):
                    pool, address = entry.get(f"ipv{f}Pool"), entry.get(f"ipv{f}")
                    if pool and address:
                        ip = address.split("/")[0]
                        released += [(pool, i) for i in self._release_in_pool(pool, uid, {ip})]
            finally:
                wait([dropped])
            dropped.result()
            return released
        keep: set[str] = set()
        if cur_uid == uid:
            for e in cur.get("ips") or []:
                keep |= _entry_ips(e)
        for pool in self.list_pools():
            try:
                records = ippool.allocated_ips(pool.get("status"))
            except ValueError:
                continue
            if any(r.get("podUid") == uid and ip not in keep for ip, r in records.items()):
                name = pool["metadata"]["name"]
                released += [
                    (name, i) for i in self._release_in_pool(name, uid, None, frozenset(keep))
                ]
        return released

    def _drop_endpoint_entry(
        self, req: IpamRequest, uid: str, first: dict[str, Any] | None = None
    ) -> None:
        """Remove this container's entry for ``req.ifname``; delete the endpoint when it was the
        last one. Both are conditional on the resourceVersion read (a write in between, e.g.
        the ADD of a recreated pod of the same name, wins and is re-read)."""
        ep = first
        for attempt in range(self.max_attempts):
            if attempt > 0 or ep is None:
                ep = self._get_endpoint(req.namespace, req.pod_name)
            cur = self._current(ep)
            if ep is None or cur.get("uid") != uid:
                return
            mine = [e for e in cur.get("ips") or [] if e.get("interface") == req.ifname]
            if not mine or any(
                e.get("containerID") not in (None, "", req.container_id) for e in mine
            ):
                return
            rest = [e for e in cur.get("ips") or [] if e.get("interface") != req.ifname]
            md = ep["metadata"]
            try:
                if rest:
                    body = dict(ep)
                    body["status"] = {**ep["status"], "current": {**cur, "ips": rest}}
                    self._call(
                        "writing SpiderEndpoint status",
                        partial(self.endpoints.replace_status, body, **self._kw),
                    )
                else:
                    opts = client.V1DeleteOptions(
                        preconditions=client.V1Preconditions(
                            resource_version=md.get("resourceVersion"), uid=md.get("uid")
                        )
                    )
                    self._call(
                        "deleting SpiderEndpoint",
                        partial(
                            self.endpoints.delete, req.pod_name, req.namespace, body=opts,
                            **self._kw,
                        ),
                    )  # fmt: skip
                return
            except ApiException as exc:
                if exc.status == 404:
                    return
                if exc.status != 409:
                    raise CniError(
                        TRY_AGAIN_LATER,
                        f"updating SpiderEndpoint {req.pod_ref}: {exc.status} {exc.reason}",
                    ) from exc
                ep = None
                self._sleep(attempt)

    # --- check --------------------------------------------------------------------------------
    def check(self, req: IpamRequest) -> None:
        """CHECK: the SpiderEndpoint names this interface for this container, and each pool
        still holds its IP for the pod. Raises CniError 108 (or 11/7)."""
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
        holder = entry.get("containerID")
        if holder and holder != req.container_id:
            raise CniError(
                CHECK_FAILED,
                f"SpiderEndpoint {req.pod_ref} gives {req.ifname} to container {holder}, "
                f"not {req.container_id}",
            )
        for f in (4, 6):
            pool, address = entry.get(f"ipv{f}Pool"), entry.get(f"ipv{f}")
            if not (pool and address):
                continue
            try:
                records = ippool.allocated_ips(self.get_pool(pool).get("status"))
            except ValueError as exc:
                raise CniError(INVALID_CONFIG, f"SpiderIPPool {pool}: {exc}") from exc
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

    def close(self) -> None:
        """Stop the worker threads (calls already running finish). Idempotent."""
        self._executor.shutdown(wait=False)


def _is_ip(text: str) -> bool:
    try:
        netaddr.IPAddress(text)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return False
    return True


def _sort_key(ip: str) -> tuple[int, int]:
    key = ippool.canonical_ip(ip) if isinstance(ip, str) else None
    if key is not None:
        return key
    try:
        addr = netaddr.IPAddress(ip)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return (9, 0)
    return (addr.version, int(addr))
