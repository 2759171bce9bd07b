"""Shared vocabulary of underlay: API groups, kinds, labels and annotations.

Both import packages (``reconciler`` and ``node_agent``) take every group name, kind,
label key and annotation key from here, so a rename happens in one place.

Sources: Spiderpool 1.2.x API (``spiderpool.spidernet.io/v2beta1``), Multus
NetworkAttachmentDefinition (``k8s.cni.cncf.io/v1``, Network Plumbing WG spec v1.2),
Kubernetes recommended labels (``app.kubernetes.io/managed-by``).
"""

from __future__ import annotations

from dataclasses import dataclass

# --- API groups -------------------------------------------------------------------------

SPIDERPOOL_GROUP = "spiderpool.spidernet.io"
SPIDERPOOL_VERSION = "v2beta1"
SPIDERPOOL_API_VERSION = f"{SPIDERPOOL_GROUP}/{SPIDERPOOL_VERSION}"

UNDERLAY_GROUP = "underlay.dev"
UNDERLAY_VERSION = "v1alpha1"
UNDERLAY_API_VERSION = f"{UNDERLAY_GROUP}/{UNDERLAY_VERSION}"

NAD_GROUP = "k8s.cni.cncf.io"
NAD_VERSION = "v1"
NAD_API_VERSION = f"{NAD_GROUP}/{NAD_VERSION}"

# --- ownership --------------------------------------------------------------------------

FIELD_MANAGER = "underlay"
"""Server-side apply field manager of the reconciler (Kubernetes API concepts, SSA)."""

AGENT_FIELD_MANAGER = "underlay-agent"
"""Field manager the node agent uses for what it writes (enactments, Node capacity)."""

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "underlay"
LABEL_INSTANCE = "underlay.dev/instance"
"""Name of the reconciler instance that owns an object; prune only touches its own."""

DEFAULT_INSTANCE = "underlay"

LABEL_ENACTMENT_NODE = "underlay.dev/node"
LABEL_ENACTMENT_BRIDGE = "underlay.dev/bridge"

# --- annotations we read (Spiderpool, Multus) ---------------------------------------------

ANNO_POD_IPPOOLS = "ipam.spidernet.io/ippools"
ANNO_POD_IPPOOL = "ipam.spidernet.io/ippool"
ANNO_NS_DEFAULT_V4 = "ipam.spidernet.io/default-ipv4-ippool"
ANNO_NS_DEFAULT_V6 = "ipam.spidernet.io/default-ipv6-ippool"
ANNO_MULTUS_DEFAULT_NETWORK = "v1.multus-cni.io/default-network"
ANNO_MULTUS_NETWORKS = "k8s.v1.cni.cncf.io/networks"
ANNO_SMC_CR_NAME = "multus.spidernet.io/cr-name"
ANNO_SMC_CNI_VERSION = "multus.spidernet.io/cni-version"
ANNO_SMC_CNICONFIG_NAME = "cni.spidernet.io/cniconfig-name"
ANNO_NAD_RESOURCE_NAME = "k8s.v1.cni.cncf.io/resourceName"

SYSTEM_NAMESPACE = "kube-system"
"""Namespace a ``multusName`` entry without a namespace refers to (Spiderpool)."""

# --- CNI plugin types -------------------------------------------------------------------

CNI_OVS_TYPE = "underlay-ovs"
CNI_IPAM_TYPE = "underlay-ipam"
CNI_SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
CNI_DEFAULT_VERSION = "1.0.0"

DEFAULT_AGENT_SOCKET = "/run/underlay/agent.sock"

MAX_POOL_RECORDS = 5000
"""Allocation records one SpiderIPPool holds at most (Spiderpool's
SPIDERPOOL_IPPOOL_MAX_ALLOCATED_IPS default: "threshold of IP allocations exceeded")."""
MAX_SAFE_INTEGER = 2**53 - 1
"""Largest integer JSON clients read exactly; counts and YAML integers are bounded by it."""
NODE_RESOURCE_PREFIX = f"{UNDERLAY_GROUP}/"
NODE_RESOURCE_CAPACITY = 1000


@dataclass(frozen=True)
class Resource:
    """One Kubernetes resource type as the API server serves it.

    ``plural`` is the URL path segment, ``namespaced`` its scope, ``status`` whether it has a
    status subresource (Kubernetes API conventions, "spec and status").
    """

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    status: bool = True
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        """``group/version``, or just ``version`` for the core group."""
        return f"{self.group}/{self.version}" if self.group else self.version

    def key(self) -> tuple[str, str]:
        """``(apiVersion, kind)``: how a YAML document names its type."""
        return (self.api_version, self.kind)


SPIDER_IPPOOL = Resource(
    SPIDERPOOL_GROUP, SPIDERPOOL_VERSION, "SpiderIPPool", "spiderippools", False, True, ("sp",)
)
SPIDER_MULTUS_CONFIG = Resource(
    SPIDERPOOL_GROUP,
    SPIDERPOOL_VERSION,
    "SpiderMultusConfig",
    "spidermultusconfigs",
    True,
    False,
    ("smc",),
)
SPIDER_ENDPOINT = Resource(
    SPIDERPOOL_GROUP, SPIDERPOOL_VERSION, "SpiderEndpoint", "spiderendpoints", True, True, ("se",)
)
OVS_BRIDGE = Resource(
    UNDERLAY_GROUP, UNDERLAY_VERSION, "OvsBridge", "ovsbridges", False, True, ("ovsbr",)
)
OVS_BRIDGE_ENACTMENT = Resource(
    UNDERLAY_GROUP,
    UNDERLAY_VERSION,
    "OvsBridgeEnactment",
    "ovsbridgeenactments",
    False,
    True,
    ("obe",),
)
GIT_SYNC = Resource(UNDERLAY_GROUP, UNDERLAY_VERSION, "GitSync", "gitsyncs", True, True, ("gs",))
"""Status object of one reconciler instance (inventory, conditions, revisions)."""

NETWORK_ATTACHMENT_DEFINITION = Resource(
    NAD_GROUP,
    NAD_VERSION,
    "NetworkAttachmentDefinition",
    "network-attachment-definitions",
    True,
    False,
    ("net-attach-def",),
)

USER_KINDS: tuple[Resource, ...] = (OVS_BRIDGE, SPIDER_IPPOOL, SPIDER_MULTUS_CONFIG)
"""Kinds an operator commits to Git, in apply order (bridges, pools, then Multus configs)."""

ALL_CUSTOM: tuple[Resource, ...] = (
    OVS_BRIDGE,
    OVS_BRIDGE_ENACTMENT,
    GIT_SYNC,
    SPIDER_IPPOOL,
    SPIDER_MULTUS_CONFIG,
    SPIDER_ENDPOINT,
    NETWORK_ATTACHMENT_DEFINITION,
)

BY_KEY: dict[tuple[str, str], Resource] = {r.key(): r for r in ALL_CUSTOM}
