"""Catalogue of validation rules: stable ids, default severity, one-line summary.

Every :class:`reconciler.loader.Problem` carries one of these ids in ``rule``. Ids never change
meaning once released (CI configurations and SARIF baselines refer to them); new rules get new
ids. ``--strict`` turns every warning into an error.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuleInfo:
    """One rule: ``id`` (kebab-case), default ``severity`` ("error"|"warning"), ``summary``,
    and ``stage``: "load" (reading YAML), "schema" (JSON Schema) or "semantic"."""

    id: str
    severity: str
    stage: str
    summary: str


_E, _W = "error", "warning"

_TABLE: tuple[tuple[str, str, str, str], ...] = (
    # loading
    ("yaml-syntax", _E, "load", "the file is not valid YAML"),
    ("duplicate-key", _E, "load", "a mapping repeats a key (YAML 1.2 forbids it)"),
    ("alias-expansion-limit", _E, "load", "aliases expand to too many nodes (alias bomb)"),
    ("node-limit", _E, "load", "the file has too many YAML nodes"),
    ("nesting-limit", _E, "load", "mappings/sequences nest too deeply"),
    ("recursive-alias", _E, "load", "an alias refers to a node containing it"),
    (
        "unsupported-yaml-tag",
        _E,
        "load",
        "a YAML tag outside the JSON data model (!!binary, !!set...)",
    ),
    ("non-string-key", _E, "load", "a mapping key is not a string (yes, 1, null...)"),
    ("not-utf8", _E, "load", "the file is not UTF-8"),
    ("file-too-large", _E, "load", "the file is over the size limit"),
    ("not-a-regular-file", _E, "load", "the path is a FIFO, socket or device"),
    ("io-error", _E, "load", "the file or directory cannot be read"),
    ("path-not-found", _E, "load", "a path given does not exist"),
    ("path-outside-root", _E, "load", "a path given lies outside the repository root"),
    ("symlink-outside-root", _E, "load", "a symlink resolves outside the repository root"),
    ("document-not-mapping", _E, "load", "a YAML document is not a mapping"),
    ("missing-apiversion", _E, "load", "a document has no apiVersion"),
    ("missing-kind", _E, "load", "a document has no kind"),
    ("unknown-kind", _E, "load", "a kind underlay does not read from Git"),
    ("wrong-apiversion", _E, "load", "a known kind with an apiVersion underlay does not read"),
    (
        "number-out-of-range",
        _E,
        "load",
        "an integer beyond 2^53-1 in magnitude, or a number that is not finite (.inf, .nan)",
    ),
    # JSON Schema
    ("unknown-field", _E, "schema", "a field the schema does not define (typo?)"),
    ("missing-field", _E, "schema", "a required field is absent"),
    ("wrong-type", _E, "schema", "a value has the wrong type"),
    ("invalid-value", _E, "schema", "a value is not one of the allowed values"),
    ("pattern-mismatch", _E, "schema", "a string does not have the required form"),
    ("out-of-range", _E, "schema", "a number is outside its allowed range"),
    ("bad-length", _E, "schema", "a string or list is too short or too long"),
    ("schema", _E, "schema", "another JSON Schema constraint failed"),
    # all kinds
    ("name-not-dns1123", _E, "semantic", "a name is not a DNS-1123 subdomain/label"),
    ("label-invalid", _E, "semantic", "a label or annotation key/value is not valid"),
    ("duplicate-object", _E, "semantic", "the same kind/namespace/name is defined twice"),
    ("namespace-defaulted", _W, "semantic", "a namespaced object has no namespace (default used)"),
    ("status-ignored", _W, "semantic", "status in Git is ignored"),
    (
        "label-selector-invalid",
        _E,
        "semantic",
        "a LabelSelector expression lacks the values In/NotIn need, or has values "
        "Exists/DoesNotExist forbid",
    ),
    # SpiderIPPool
    ("subnet-invalid", _E, "semantic", "subnet is not a CIDR"),
    (
        "subnet-not-canonical",
        _E,
        "semantic",
        "subnet has host bits set or is not in canonical form",
    ),
    (
        "subnet-reserved",
        _E,
        "semantic",
        "subnet is loopback, multicast, link-local, unspecified or IPv4-mapped",
    ),
    ("ip-version-mismatch", _E, "semantic", "ipVersion does not match the subnet's family"),
    ("ip-invalid", _E, "semantic", "an address or range is malformed"),
    ("range-reversed", _E, "semantic", "a first-last range has first above last"),
    ("ip-outside-subnet", _E, "semantic", "an ips/excludeIPs entry lies outside the subnet"),
    ("ip-duplicate", _W, "semantic", "an address is listed twice in one pool"),
    ("gateway-outside-subnet", _E, "semantic", "gateway lies outside the subnet"),
    ("gateway-allocatable", _E, "semantic", "gateway is inside ips and not excluded"),
    (
        "gateway-network-or-broadcast",
        _E,
        "semantic",
        "gateway is the network or broadcast address of an IPv4 subnet",
    ),
    (
        "ip-network-or-broadcast",
        _E,
        "semantic",
        "ips hand out the network or broadcast address of an IPv4 subnet",
    ),
    ("gateway-in-other-pool", _E, "semantic", "gateway is an address another pool hands out"),
    ("pool-too-large", _W, "semantic", "ips minus excludeIPs exceed Spiderpool's 5000 records"),
    (
        "route-invalid",
        _E,
        "semantic",
        "a route dst/gw is malformed, of the wrong family or not canonical",
    ),
    ("route-default", _E, "semantic", "routes holds a default route (use gateway)"),
    ("route-gateway-outside-subnet", _E, "semantic", "a route gw lies outside the subnet"),
    ("route-duplicate", _E, "semantic", "two routes have the same dst"),
    ("route-gateway-allocatable", _E, "semantic", "a route gw is an address a pool hands out"),
    ("route-to-own-subnet", _W, "semantic", "a route's dst is the pool's own on-link subnet"),
    ("subnet-overlap", _E, "semantic", "subnets of one family overlap without being identical"),
    ("ip-overlap", _E, "semantic", "two pools hand out the same addresses"),
    ("multus-name-invalid", _E, "semantic", "a multusName entry is not name or namespace/name"),
    (
        "multus-config-not-found",
        _W,
        "semantic",
        "multusName names no SpiderMultusConfig in the repo",
    ),
    # SpiderMultusConfig
    ("cni-type-section", _E, "semantic", "per-type sections do not match cniType"),
    ("cni-type-unsupported", _E, "semantic", "cniType underlay cannot render"),
    ("custom-cni-invalid-json", _E, "semantic", "customCNI is not a JSON object"),
    ("chain-cni-invalid-json", _E, "semantic", "a chainCNIJsonData entry is not a JSON object"),
    (
        "custom-cni-invalid-config",
        _E,
        "semantic",
        "customCNI is not a CNI config ({type}) or config list ({plugins: [{type}...]})",
    ),
    (
        "chain-cni-invalid-plugin",
        _E,
        "semantic",
        "a chainCNIJsonData entry is not a CNI plugin config (a string type)",
    ),
    (
        "master-name-invalid",
        _E,
        "semantic",
        "a macvlan/ipvlan master or bond name is not a Linux interface name",
    ),
    (
        "vlan-interface-name-too-long",
        _E,
        "semantic",
        "master.vlanID is longer than Linux's 15-character interface name limit",
    ),
    ("bond-required", _E, "semantic", "two or more master interfaces without bond"),
    (
        "own-plugin-invalid",
        _E,
        "semantic",
        "an underlay-ovs plugin in customCNI/chainCNIJsonData that the plugin would refuse",
    ),
    (
        "coordinator-not-rendered",
        _W,
        "semantic",
        "coordinator settings: underlay renders no coordinator plugin",
    ),
    (
        "vlan-interface-not-created",
        _W,
        "semantic",
        "a macvlan/ipvlan vlanID: underlay uses <parent>.<vlanID> as master but does not create it",
    ),
    (
        "bond-not-created",
        _W,
        "semantic",
        "a macvlan/ipvlan bond: underlay uses it as master but does not create it",
    ),
    ("trunk-entry-invalid", _E, "semantic", "a trunk entry is neither {id} nor {minID, maxID}"),
    ("trunk-range-reversed", _E, "semantic", "a trunk entry has minID above maxID"),
    (
        "bridge-not-found",
        _W,
        "semantic",
        "ovs.bridge names no bridge an OvsBridge in the repo defines",
    ),
    ("ippool-not-found", _W, "semantic", "ippools names a SpiderIPPool not in the repo"),
    ("ippool-family-mismatch", _E, "semantic", "a pool is listed under the other IP family"),
    ("ippool-multus-mismatch", _W, "semantic", "a listed pool's multusName excludes this config"),
    (
        "nad-name-conflict",
        _E,
        "semantic",
        "two configs render the same NetworkAttachmentDefinition",
    ),
    # OvsBridge
    ("bridge-name-invalid", _E, "semantic", "the bridge name is not a valid interface name"),
    (
        "bridge-object-name-invalid",
        _E,
        "semantic",
        "an OvsBridge name is over 63 characters (it labels its OvsBridgeEnactments)",
    ),
    ("uplink-name-invalid", _E, "semantic", "an uplink is not a valid Linux interface name"),
    ("bridge-is-uplink", _E, "semantic", "a bridge has the name of another OvsBridge's uplink"),
    (
        "bridge-name-like-nic",
        _W,
        "semantic",
        "a bridge is named like a physical NIC (eth*, en*, ib*, wl*, bond*)",
    ),
    ("bridge-conflict", _E, "semantic", "two OvsBridges define one bridge on the same nodes"),
    ("uplink-conflict", _E, "semantic", "one NIC is an uplink of two bridges on the same nodes"),
    ("uplink-duplicate", _E, "semantic", "an uplink is listed twice"),
    ("uplink-is-bridge", _E, "semantic", "an uplink has the bridge's own name"),
    ("node-override-duplicate", _E, "semantic", "two nodeOverrides name the same node"),
)

RULES: dict[str, RuleInfo] = {r[0]: RuleInfo(*r) for r in _TABLE}
"""Every rule id -> :class:`RuleInfo`, in catalogue order."""


def rule(rule_id: str) -> RuleInfo:
    """The :class:`RuleInfo` of ``rule_id``; raises KeyError for an unknown id."""
    return RULES[rule_id]
