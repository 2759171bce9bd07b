"""One test per validation rule: exact ``file:line:column``, object, field, message and hint.

Each case writes a small repository into a temporary directory, runs the same
``validate_repo`` the CLI and the reconciler run, and compares every formatted problem.
The loader's own rules are in test_loader.py; every rule id of ``reconciler.rules.RULES`` is
covered by one of the two files (test_every_rule_has_a_case).
"""

from __future__ import annotations

import ipaddress
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from reconciler.loader import load_repo, load_text
from reconciler.rules import RULES
from reconciler.validation import has_errors, validate, validate_repo

POOL = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\n"
SMC = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderMultusConfig\n"
BR = "apiVersion: underlay.dev/v1alpha1\nkind: OvsBridge\n"


def y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def run(tmp_path: Path, files: dict[str, str], **kw: bool) -> list[str]:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    _docs, problems = validate_repo(tmp_path, **kw)
    return [p.format() for p in problems]


# (case id, rule id, files, expected lines, validate_repo kwargs)
CASES: list[tuple[str, str, dict[str, str], list[str], dict[str, bool]]] = [
    # --- JSON Schema -------------------------------------------------------------------
    (
        "unknown-field",
        "unknown-field",
        {
            "p.yaml": POOL
            + y("""
            metadata:
              name: p1
            spec:
              subnet: 172.18.0.0/16
              gatway: 172.18.0.1
            """)
        },
        [
            'p.yaml:7:3: error: SpiderIPPool p1 spec.gatway: unknown field "gatway" (did you mean gateway?)'
        ],
        {},
    ),
    (
        "unknown-field-namespace-on-cluster-scoped",
        "unknown-field",
        {
            "p.yaml": POOL
            + y("""
            metadata:
              name: p1
              namespace: kube-system
            spec:
              subnet: 172.18.0.0/16
            """)
        },
        [
            "p.yaml:5:3: error: SpiderIPPool p1 metadata.namespace: SpiderIPPool is cluster-scoped: "
            "metadata.namespace is not allowed (remove namespace)"
        ],
        {},
    ),
    (
        "missing-field",
        "missing-field",
        {
            "p.yaml": POOL
            + y("""
            metadata:
              name: p1
            spec:
              ips: [172.18.30.131]
            """)
        },
        [
            'p.yaml:5:1: error: SpiderIPPool p1 spec.subnet: missing required field "subnet" '
            "(add subnet: 172.18.0.0/16)"
        ],
        {},
    ),
    (
        "wrong-type",
        "wrong-type",
        {
            "p.yaml": POOL
            + y("""
            metadata:
              name: p1
            spec:
              subnet: 172.18.0.0/16
              ipVersion: "4"
            """)
        },
        [
            'p.yaml:7:14: error: SpiderIPPool p1 spec.ipVersion: must be an integer, got string "4" '
            "(remove the quotes: 4)",
        ],
        {},
    ),
    (
        "invalid-value",
        "invalid-value",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: ovs-conf
              namespace: kube-system
            spec:
              cniType: OVS
            """)
        },
        [
            'm.yaml:7:12: error: SpiderMultusConfig kube-system/ovs-conf spec.cniType: string "OVS" '
            "is not one of macvlan, ipvlan, vlan, sriov, ovs, ib-sriov, ipoib, custom (write ovs)"
        ],
        {},
    ),
    (
        "pattern-mismatch",
        "pattern-mismatch",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: ovs-conf
              namespace: kube-system
            spec:
              cniType: ovs
              ovs:
                bridge: br1
                deviceID: "03:00.1"
            """),
            "b.yaml": BR + "metadata:\n  name: br1\nspec:\n  uplinks: [eth0]\n",
        },
        [
            "m.yaml:10:15: error: SpiderMultusConfig kube-system/ovs-conf spec.ovs.deviceID: string "
            '"03:00.1" is not a PCI address like 0000:03:00.1 (write a PCI address like 0000:03:00.1)'
        ],
        {},
    ),
    (
        "out-of-range",
        "out-of-range",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: ovs-conf
              namespace: kube-system
            spec:
              cniType: ovs
              ovs:
                bridge: br1
                vlan: 4095
            """),
            "b.yaml": BR + "metadata:\n  name: br1\nspec:\n  uplinks: [eth0]\n",
        },
        [
            "m.yaml:10:11: error: SpiderMultusConfig kube-system/ovs-conf spec.ovs.vlan: 4095 is out "
            "of range 0-4094 (write a number from 0 to 4094)"
        ],
        {},
    ),
    (
        "bad-length",
        "bad-length",
        {"b.yaml": BR + "metadata:\n  name: br1\nspec:\n  uplinks: []\n"},
        [
            "b.yaml:6:12: error: OvsBridge br1 spec.uplinks: has 0 items, needs at least 1 "
            "(write at least 1 item)"
        ],
        {},
    ),
    # --- every kind -----------------------------------------------------------------------
    (
        "name-not-dns1123",
        "name-not-dns1123",
        {"p.yaml": POOL + "metadata:\n  name: IPPool_Test\nspec:\n  subnet: 172.18.0.0/16\n"},
        [
            'p.yaml:4:9: error: SpiderIPPool IPPool_Test metadata.name: name "IPPool_Test" is not a '
            "DNS-1123 subdomain: it may only hold lower-case letters, digits, '-' and '.', starting "
            "and ending with a letter or digit (write ippool-test)"
        ],
        {},
    ),
    (
        "label-invalid",
        "label-invalid",
        {
            "p.yaml": POOL
            + y("""
            metadata:
              name: p1
              labels:
                team/net/x: a
            spec:
              subnet: 172.18.0.0/16
            """)
        },
        [
            'p.yaml:6:5: error: SpiderIPPool p1 metadata.labels["team/net/x"]: label key "team/net/x" '
            'is not valid: prefix "team/net" is not a DNS-1123 subdomain (write a key like '
            "example.com/name)"
        ],
        {},
    ),
    (
        "duplicate-object",
        "duplicate-object",
        {
            "a.yaml": POOL + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0/16\n",
            "b.yaml": POOL + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0/16\n",
        },
        [
            "b.yaml:4:9: error: SpiderIPPool p1 metadata.name: SpiderIPPool p1 is already defined at "
            "a.yaml:4:9 (rename one of them or delete the copy)"
        ],
        {},
    ),
    (
        "namespace-defaulted",
        "namespace-defaulted",
        {
            "m.yaml": SMC + "metadata:\n  name: c1\nspec:\n  cniType: custom\n",
        },
        [
            "m.yaml:3:1: warning: SpiderMultusConfig default/c1 metadata: namespace is missing; "
            'SpiderMultusConfig is namespaced, so it goes into "default" (add namespace: default, '
            "or the namespace you mean)"
        ],
        {},
    ),
    (
        "status-ignored",
        "status-ignored",
        {
            "p.yaml": POOL
            + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0/16\nstatus:\n  allocatedIPCount: 1\n"
        },
        [
            "p.yaml:7:1: warning: SpiderIPPool p1 status: status is written by the cluster; the "
            "reconciler ignores it here (remove status)"
        ],
        {},
    ),
    # --- SpiderIPPool -----------------------------------------------------------------------
    (
        "subnet-invalid",
        "subnet-invalid",
        {"p.yaml": POOL + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0\n"},
        [
            'p.yaml:6:11: error: SpiderIPPool p1 spec.subnet: "172.18.0.0" is not a CIDR '
            "(address/prefix length) (write a network like 172.18.0.0/16)"
        ],
        {},
    ),
    (
        "subnet-not-canonical",
        "subnet-not-canonical",
        {"p.yaml": POOL + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.1/16\n"},
        [
            'p.yaml:6:11: error: SpiderIPPool p1 spec.subnet: "172.18.0.1/16" is not a canonical '
            "CIDR: host bits are set (write 172.18.0.0/16)"
        ],
        {},
    ),
    (
        "subnet-not-canonical-ipv6",
        "subnet-not-canonical",
        {"p.yaml": POOL + "metadata:\n  name: p1\nspec:\n  subnet: FD00:0::/64\n"},
        [
            'p.yaml:6:11: error: SpiderIPPool p1 spec.subnet: "FD00:0::/64" is not a canonical '
            "CIDR: not in canonical form (write fd00::/64)"
        ],
        {},
    ),
    (
        "ip-version-mismatch",
        "ip-version-mismatch",
        {"p.yaml": POOL + "metadata:\n  name: p1\nspec:\n  subnet: fd00::/64\n  ipVersion: 4\n"},
        [
            "p.yaml:7:14: error: SpiderIPPool p1 spec.ipVersion: ipVersion 4 does not match subnet "
            "fd00::/64 (IPv6) (write ipVersion: 6, or leave it out)"
        ],
        {},
    ),
    (
        "ip-invalid",
        "ip-invalid",
        {
            "p.yaml": POOL
            + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0/16\n  ips:\n  - 172.18.30.300\n"
        },
        [
            'p.yaml:8:5: error: SpiderIPPool p1 spec.ips[0]: "172.18.30.300" is not an IP address '
            "or a first-last range (write one address like 172.18.30.131 or a range like "
            "172.18.30.131-172.18.30.140)"
        ],
        {},
    ),
    (
        "ip-invalid-spaces",
        "ip-invalid",
        {
            "p.yaml": POOL
            + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0/16\n  excludeIPs:\n"
            + '  - "172.18.30.131 - 172.18.30.133"\n'
        },
        [
            'p.yaml:8:5: error: SpiderIPPool p1 spec.excludeIPs[0]: "172.18.30.131 - 172.18.30.133" '
            "is not an IP address or a first-last range (write 172.18.30.131-172.18.30.133 "
            "(no spaces))"
        ],
        {},
    ),
    (
        "range-reversed",
        "range-reversed",
        {
            "p.yaml": POOL
            + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0/16\n  ips:\n"
            + "  - 172.18.30.140-172.18.30.131\n"
        },
        [
            'p.yaml:8:5: error: SpiderIPPool p1 spec.ips[0]: range "172.18.30.140-172.18.30.131" '
            "starts above its end (write 172.18.30.131-172.18.30.140)"
        ],
        {},
    ),
    (
        "ip-outside-subnet",
        "ip-outside-subnet",
        {
            "p.yaml": POOL
            + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0/16\n  ips:\n"
            + "  - 172.18.255.250-172.19.0.5\n  excludeIPs: [fd00::1]\n"
        },
        [
            'p.yaml:8:5: error: SpiderIPPool p1 spec.ips[0]: "172.18.255.250-172.19.0.5" is outside '
            "subnet 172.18.0.0/16 (use addresses inside 172.18.0.0/16)",
            'p.yaml:9:16: error: SpiderIPPool p1 spec.excludeIPs[0]: "fd00::1" is an IPv6 address '
            "but subnet 172.18.0.0/16 is IPv4 (use addresses inside 172.18.0.0/16)",
        ],
        {},
    ),
    (
        "ip-duplicate",
        "ip-duplicate",
        {
            "p.yaml": POOL
            + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0/16\n  ips:\n"
            + "  - 172.18.30.131-172.18.30.140\n  - 172.18.30.135\n"
        },
        [
            'p.yaml:9:5: warning: SpiderIPPool p1 spec.ips[1]: "172.18.30.135" overlaps '
            '"172.18.30.131-172.18.30.140" (spec.ips[0]) of the same pool (list each address once)'
        ],
        {},
    ),
    (
        "gateway-outside-subnet",
        "gateway-outside-subnet",
        {
            "p.yaml": POOL
            + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0/16\n  gateway: 172.19.0.1\n"
        },
        [
            "p.yaml:7:12: error: SpiderIPPool p1 spec.gateway: gateway 172.19.0.1 is outside subnet "
            "172.18.0.0/16 (use an address inside 172.18.0.0/16)"
        ],
        {},
    ),
    (
        "gateway-invalid",
        "ip-invalid",
        {"p.yaml": POOL + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0/16\n  gateway: gw\n"},
        [
            'p.yaml:7:12: error: SpiderIPPool p1 spec.gateway: gateway "gw" is not an IP address '
            "(write one address such as 172.18.0.1)"
        ],
        {},
    ),
    (
        "gateway-allocatable",
        "gateway-allocatable",
        {
            "p.yaml": POOL
            + y("""
            metadata:
              name: p1
            spec:
              subnet: 172.18.0.0/16
              ips: [172.18.0.1-172.18.0.10]
              gateway: 172.18.0.1
            """)
        },
        [
            "p.yaml:8:12: error: SpiderIPPool p1 spec.gateway: gateway 172.18.0.1 is inside ips "
            '("172.18.0.1-172.18.0.10") and not excluded, so a pod could get it (add 172.18.0.1 to '
            "excludeIPs, or take it out of ips)"
        ],
        {},
    ),
    (
        "gateway-excluded-is-fine",
        "gateway-allocatable",
        {
            "p.yaml": POOL
            + y("""
            metadata:
              name: p1
            spec:
              subnet: 172.18.0.0/16
              ips: [172.18.0.1-172.18.0.10]
              excludeIPs: [172.18.0.1]
              gateway: 172.18.0.1
            """)
        },
        [],
        {},
    ),
    (
        "route-invalid",
        "route-invalid",
        {
            "p.yaml": POOL
            + y("""
            metadata:
              name: p1
            spec:
              subnet: 172.18.0.0/16
              routes:
              - dst: 10.10.0.1/16
                gw: 172.18.0.1
              - dst: fd00::/64
                gw: nexthop
            """)
        },
        [
            'p.yaml:8:10: error: SpiderIPPool p1 spec.routes[0].dst: route dst "10.10.0.1/16" is not '
            "a canonical CIDR (write 10.10.0.0/16)",
            "p.yaml:10:10: error: SpiderIPPool p1 spec.routes[1].dst: route dst fd00::/64 is IPv6 "
            "but the pool is IPv4 (write an IPv4 destination)",
            'p.yaml:11:9: error: SpiderIPPool p1 spec.routes[1].gw: route gw "nexthop" is not an IP '
            "address (write one address inside the subnet)",
        ],
        {},
    ),
    (
        "route-default",
        "route-default",
        {
            "p.yaml": POOL
            + y("""
            metadata:
              name: p1
            spec:
              subnet: 172.18.0.0/16
              routes:
              - {dst: 0.0.0.0/0, gw: 172.18.0.1}
            """)
        },
        [
            "p.yaml:8:11: error: SpiderIPPool p1 spec.routes[0].dst: route dst 0.0.0.0/0 is a "
            "default route (set spec.gateway instead of a default route)"
        ],
        {},
    ),
    (
        "route-gateway-outside-subnet",
        "route-gateway-outside-subnet",
        {
            "p.yaml": POOL
            + y("""
            metadata:
              name: p1
            spec:
              subnet: 172.18.0.0/16
              routes:
              - {dst: 10.10.0.0/16, gw: 10.0.0.1}
            """)
        },
        [
            "p.yaml:8:29: error: SpiderIPPool p1 spec.routes[0].gw: route gw 10.0.0.1 is outside "
            "subnet 172.18.0.0/16 (use a next hop inside 172.18.0.0/16)"
        ],
        {},
    ),
    (
        "route-duplicate",
        "route-duplicate",
        {
            "p.yaml": POOL
            + y("""
            metadata:
              name: p1
            spec:
              subnet: 172.18.0.0/16
              routes:
              - {dst: 10.10.0.0/16, gw: 172.18.0.1}
              - {dst: 10.10.0.0/16, gw: 172.18.0.2}
            """)
        },
        [
            "p.yaml:9:11: error: SpiderIPPool p1 spec.routes[1].dst: route dst 10.10.0.0/16 is "
            "already in spec.routes[0] (keep one route per destination)"
        ],
        {},
    ),
    (
        "subnet-overlap",
        "subnet-overlap",
        {
            "a.yaml": POOL + "metadata:\n  name: a\nspec:\n  subnet: 172.18.0.0/16\n",
            "b.yaml": POOL + "metadata:\n  name: b\nspec:\n  subnet: 172.18.1.0/24\n",
            "c.yaml": POOL + "metadata:\n  name: c\nspec:\n  subnet: 172.18.0.0/16\n",
        },
        [
            "b.yaml:6:11: error: SpiderIPPool b spec.subnet: subnet 172.18.1.0/24 overlaps subnet "
            "172.18.0.0/16 of SpiderIPPool a (a.yaml:6:11) (use subnet 172.18.0.0/16 here too, or a "
            "subnet that does not overlap)"
        ],
        {},
    ),
    (
        "ip-overlap",
        "ip-overlap",
        {
            "a.yaml": POOL
            + "metadata:\n  name: a\nspec:\n  subnet: 172.18.0.0/16\n  ips:\n"
            + "  - 172.18.30.131-172.18.30.140\n",
            "b.yaml": POOL
            + "metadata:\n  name: b\nspec:\n  subnet: 172.18.0.0/16\n  ips:\n"
            + "  - 172.18.30.100\n  - 172.18.30.138-172.18.30.150\n"
            + "  excludeIPs: [172.18.30.138]\n",
        },
        [
            'b.yaml:9:5: error: SpiderIPPool b spec.ips[1]: "172.18.30.138-172.18.30.150" overlaps '
            '"172.18.30.131-172.18.30.140" of SpiderIPPool a (a.yaml:8:5) at '
            "172.18.30.139-172.18.30.140 (give each pool its own addresses, or add the shared ones "
            "to excludeIPs)"
        ],
        {},
    ),
    (
        "multus-name-invalid",
        "multus-name-invalid",
        {
            "p.yaml": POOL
            + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0/16\n  multusName: [a/b/c]\n"
        },
        [
            'p.yaml:7:16: error: SpiderIPPool p1 spec.multusName[0]: multusName "a/b/c" is not name '
            "or namespace/name (write e.g. kube-system/ovs-conf)"
        ],
        {},
    ),
    (
        "multus-config-not-found",
        "multus-config-not-found",
        {
            "p.yaml": POOL
            + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0/16\n  multusName: [ovs-conf]\n"
        },
        [
            "p.yaml:7:16: warning: SpiderIPPool p1 spec.multusName[0]: no SpiderMultusConfig in the "
            "repository renders kube-system/ovs-conf (check the name; fine if that Multus config is "
            "managed outside Git)"
        ],
        {},
    ),
    (
        "multus-config-not-found-strict",
        "multus-config-not-found",
        {
            "p.yaml": POOL
            + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0/16\n  multusName: [ovs-conf]\n"
        },
        [
            "p.yaml:7:16: error: SpiderIPPool p1 spec.multusName[0]: no SpiderMultusConfig in the "
            "repository renders kube-system/ovs-conf (check the name; fine if that Multus config is "
            "managed outside Git)"
        ],
        {"strict": True},
    ),
    # --- SpiderMultusConfig -------------------------------------------------------------------
    (
        "cni-type-section",
        "cni-type-section",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: ovs
              macvlan:
                master: [eth0]
              customCNI: "{}"
            """)
        },
        [
            "m.yaml:7:12: error: SpiderMultusConfig kube-system/c1 spec.cniType: cniType ovs needs an "
            '"ovs" section (add ovs: {bridge: br1})',
            'm.yaml:8:3: error: SpiderMultusConfig kube-system/c1 spec.macvlan: section "macvlan" '
            "does not match cniType ovs (remove macvlan, or set cniType: macvlan)",
            "m.yaml:10:3: error: SpiderMultusConfig kube-system/c1 spec.customCNI: customCNI is only "
            "used with cniType custom, not ovs (remove customCNI, or set cniType: custom)",
        ],
        {},
    ),
    (
        "cni-type-unsupported",
        "cni-type-unsupported",
        {
            "m.yaml": SMC
            + "metadata:\n  name: c1\n  namespace: kube-system\nspec:\n  cniType: sriov\n"
        },
        [
            "m.yaml:7:12: error: SpiderMultusConfig kube-system/c1 spec.cniType: cniType sriov is not "
            "supported by underlay (use ovs, macvlan, ipvlan or custom)"
        ],
        {},
    ),
    (
        "custom-cni-invalid-json",
        "custom-cni-invalid-json",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: custom
              customCNI: '{"type": "bridge",}'
            """)
        },
        [
            "m.yaml:8:14: error: SpiderMultusConfig kube-system/c1 spec.customCNI: customCNI is not "
            "valid JSON: Expecting property name enclosed in double quotes at line 1 column 19 "
            '(write a CNI config object, e.g. {"cniVersion": "1.0.0", "type": "bridge"})'
        ],
        {},
    ),
    (
        "chain-cni-invalid-json",
        "chain-cni-invalid-json",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: custom
              chainCNIJsonData:
              - '{"type": "tuning"}'
              - '["tuning"]'
            """)
        },
        [
            "m.yaml:10:5: error: SpiderMultusConfig kube-system/c1 spec.chainCNIJsonData[1]: chained "
            'plugin must be a JSON object ({...}) (write one plugin object, e.g. {"type": "tuning"})'
        ],
        {},
    ),
    (
        "bond-required",
        "bond-required",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: macvlan
              macvlan:
                master: [eth0, eth1]
            """)
        },
        [
            "m.yaml:9:13: error: SpiderMultusConfig kube-system/c1 spec.macvlan.master: 2 master "
            "interfaces need a bond (add bond: {name: bond0, mode: 1}, or keep one master)"
        ],
        {},
    ),
    (
        "own-plugin-invalid",
        "own-plugin-invalid",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: custom
              customCNI: '{"cniVersion": "1.0.0", "plugins": [{"type": "underlay-ovs", "bridge": "br1", "vlan": "10"}]}'
              chainCNIJsonData:
              - '{"type": "underlay-ovs", "bridge": "nosuchbr", "ipam": {"type": "underlay-ipam", "default_ipv4_ippool": ["nopool"]}}'
            """)
        },
        [
            "m.yaml:8:14: error: SpiderMultusConfig kube-system/c1 spec.customCNI: the underlay-ovs "
            "plugin would refuse every pod ADD: vlan must be an integer in 0..4094, got '10' (fix "
            "that field, or use cniType ovs and let underlay render the plugin)",
            "m.yaml:10:5: warning: SpiderMultusConfig kube-system/c1 spec.chainCNIJsonData[0]: no "
            'OvsBridge in the repository makes bridge "nosuchbr" (add an OvsBridge for it; fine if '
            "the bridge is made outside Git)",
            "m.yaml:10:5: warning: SpiderMultusConfig kube-system/c1 spec.chainCNIJsonData[0]: no "
            'SpiderIPPool "nopool" in the repository (check the name; fine if the pool is managed '
            "outside Git)",
        ],
        {},
    ),
    (
        "coordinator-not-rendered",
        "coordinator-not-rendered",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: macvlan
              macvlan:
                master: [eth0]
              coordinator:
                mode: underlay
            """)
        },
        [
            "m.yaml:10:3: warning: SpiderMultusConfig kube-system/c1 spec.coordinator: underlay "
            "renders no coordinator plugin, so these settings have no effect (Spiderpool's "
            "coordinator would tune the pod's routes and MAC and check the gateway and IP "
            "conflicts) (remove coordinator, or chain the plugins you need with chainCNIJsonData)",
        ],
        {},
    ),
    (
        "vlan-interface-not-created",
        "vlan-interface-not-created",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: macvlan
              macvlan:
                master: [eth1]
                vlanID: 100
            """)
        },
        [
            "m.yaml:10:13: warning: SpiderMultusConfig kube-system/c1 spec.macvlan.vlanID: underlay "
            'does not create the VLAN interface "eth1.100" (Spiderpool\'s ifacer plugin does); the '
            "NetworkAttachmentDefinition uses it as the macvlan master, so it must exist on every "
            "node or every pod ADD fails (create eth1.100 on the nodes as a netplan or "
            "NetworkManager VLAN, or use cniType ovs with vlan: an OVS access port)"
        ],
        {},
    ),
    (
        "bond-not-created",
        "bond-not-created",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: ipvlan
              ipvlan:
                master: [eth0, eth1]
                bond:
                  name: bond0
                  mode: 1
            """)
        },
        [
            "m.yaml:11:7: warning: SpiderMultusConfig kube-system/c1 spec.ipvlan.bond: underlay does not "
            'create bond "bond0" as Spiderpool\'s ifacer plugin does: the NetworkAttachmentDefinition '
            "uses it as the ipvlan master, so it must already exist on every node (create the bond on "
            "the nodes with netplan or NetworkManager, or keep one master and drop bond)"
        ],
        {},
    ),
    (
        "trunk-entry-invalid",
        "trunk-entry-invalid",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: ovs
              ovs:
                bridge: br1
                trunk:
                - minID: 10
                - {id: 5, minID: 1, maxID: 4}
            """),
            "b.yaml": BR + "metadata:\n  name: br1\nspec:\n  uplinks: [eth0]\n",
        },
        [
            "m.yaml:11:7: error: SpiderMultusConfig kube-system/c1 spec.ovs.trunk[0]: a trunk entry "
            "has either id, or both minID and maxID (write {id: 100} or {minID: 100, maxID: 200})",
            "m.yaml:12:7: error: SpiderMultusConfig kube-system/c1 spec.ovs.trunk[1]: a trunk entry "
            "has either id, or both minID and maxID (write {id: 100} or {minID: 100, maxID: 200})",
        ],
        {},
    ),
    (
        "trunk-range-reversed",
        "trunk-range-reversed",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: ovs
              ovs:
                bridge: br1
                trunk:
                - {minID: 200, maxID: 100}
            """),
            "b.yaml": BR + "metadata:\n  name: br1\nspec:\n  uplinks: [eth0]\n",
        },
        [
            "m.yaml:11:15: error: SpiderMultusConfig kube-system/c1 spec.ovs.trunk[0].minID: minID "
            "200 is above maxID 100 (write minID: 100, maxID: 200)"
        ],
        {},
    ),
    (
        "bridge-not-found",
        "bridge-not-found",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: ovs
              ovs:
                bridge: br2
            """),
            "b.yaml": BR + "metadata:\n  name: br1\nspec:\n  uplinks: [eth0]\n",
        },
        [
            "m.yaml:9:13: warning: SpiderMultusConfig kube-system/c1 spec.ovs.bridge: no OvsBridge in "
            'the repository makes bridge "br2" (did you mean br1?)'
        ],
        {},
    ),
    (
        "bridge-not-found-strict",
        "bridge-not-found",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: ovs
              ovs:
                bridge: trunk0
            """),
        },
        [
            "m.yaml:9:13: error: SpiderMultusConfig kube-system/c1 spec.ovs.bridge: no OvsBridge in "
            'the repository makes bridge "trunk0" (add an OvsBridge for it; fine if the bridge is '
            "made outside Git)"
        ],
        {"strict": True},
    ),
    (
        "ippool-not-found",
        "ippool-not-found",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: macvlan
              macvlan:
                master: [eth0]
                ippools:
                  ipv4: [pool-v4]
            """)
        },
        [
            "m.yaml:11:14: warning: SpiderMultusConfig kube-system/c1 spec.macvlan.ippools.ipv4[0]: no "
            'SpiderIPPool "pool-v4" in the repository (check the name; fine if the pool is managed '
            "outside Git)"
        ],
        {},
    ),
    (
        "ippool-family-mismatch",
        "ippool-family-mismatch",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: macvlan
              macvlan:
                master: [eth0]
                ippools:
                  ipv4: [v6pool]
            """),
            "p.yaml": POOL + "metadata:\n  name: v6pool\nspec:\n  subnet: fd00::/64\n",
        },
        [
            "m.yaml:11:14: error: SpiderMultusConfig kube-system/c1 spec.macvlan.ippools.ipv4[0]: "
            "SpiderIPPool v6pool is IPv6 but is listed under ipv4 (move it to ippools.ipv6)"
        ],
        {},
    ),
    (
        "ippool-multus-mismatch",
        "ippool-multus-mismatch",
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: c1
              namespace: kube-system
            spec:
              cniType: macvlan
              macvlan:
                master: [eth0]
                ippools:
                  ipv4: [p1]
            """),
            "p.yaml": POOL
            + y("""
            metadata:
              name: p1
            spec:
              subnet: 172.18.0.0/16
              multusName: [kube-system/c2]
            """),
        },
        [
            "m.yaml:11:14: warning: SpiderMultusConfig kube-system/c1 spec.macvlan.ippools.ipv4[0]: "
            "SpiderIPPool p1 only serves multusName kube-system/c2, so pods attached through "
            "kube-system/c1 never get it (add kube-system/c1 to the pool's multusName)",
            "p.yaml:7:16: warning: SpiderIPPool p1 spec.multusName[0]: no SpiderMultusConfig in the "
            "repository renders kube-system/c2 (did you mean kube-system/c1? fine if that Multus config is "
            "managed outside Git)",
        ],
        {},
    ),
    (
        "nad-name-conflict",
        "nad-name-conflict",
        {
            "m.yaml": SMC
            + "metadata:\n  name: c1\n  namespace: kube-system\nspec:\n  cniType: custom\n---\n"
            + SMC
            + y("""
            metadata:
              name: c2
              namespace: kube-system
              annotations:
                multus.spidernet.io/cr-name: c1
            spec:
              cniType: custom
            """),
        },
        [
            'm.yaml:15:34: error: SpiderMultusConfig kube-system/c2 metadata.annotations["multus.'
            'spidernet.io/cr-name"]: NetworkAttachmentDefinition kube-system/c1 is also rendered '
            "from SpiderMultusConfig kube-system/c1 (m.yaml:4:9) (set another "
            "multus.spidernet.io/cr-name annotation)"
        ],
        {},
    ),
    # --- OvsBridge ----------------------------------------------------------------------------
    (
        "bridge-name-invalid",
        "bridge-name-invalid",
        {
            "b.yaml": BR
            + "metadata:\n  name: bridge-for-the-storage-net\nspec:\n  uplinks: [eth1]\n"
        },
        [
            "b.yaml:4:9: error: OvsBridge bridge-for-the-storage-net metadata.name: without "
            'spec.bridge the bridge is named "bridge-for-the-storage-net", which is not a Linux '
            "interface name (1-15 letters, digits, '_', '.', '-') (set spec.bridge to a name of at "
            "most 15 characters, e.g. br1)"
        ],
        {},
    ),
    (
        "bridge-conflict",
        "bridge-conflict",
        {
            "a.yaml": BR + "metadata:\n  name: br1\nspec:\n  uplinks: [eth0]\n",
            "b.yaml": BR
            + y("""
            metadata:
              name: storage
            spec:
              bridge: br1
              uplinks: [eth1]
              nodeSelector: {role: storage}
            """),
        },
        [
            "b.yaml:6:11: error: OvsBridge storage spec.bridge: bridge br1 is also made by OvsBridge "
            "br1 (a.yaml:4:9) on nodes both select (keep one OvsBridge per bridge, or give the "
            "nodeSelectors different values for one label)"
        ],
        {},
    ),
    (
        "uplink-conflict",
        "uplink-conflict",
        {
            "a.yaml": BR + "metadata:\n  name: br1\nspec:\n  uplinks: [eth0]\n",
            "b.yaml": BR
            + "metadata:\n  name: br2\nspec:\n  uplinks: [eth1, eth0]\n"
            + "  nodeSelector: {role: storage}\n"
            + "---\n"
            + BR
            + "metadata:\n  name: br3\nspec:\n  uplinks: [eth1]\n"
            + "  nodeSelector: {role: compute}\n",
        },
        [
            "b.yaml:6:19: error: OvsBridge br2 spec.uplinks[1]: uplink eth0 is also an uplink of "
            "OvsBridge br1 (a.yaml:6:13) on nodes both select (a NIC can be the uplink of one "
            "bridge only; use another NIC or disjoint nodeSelectors)"
        ],
        {},
    ),
    (
        "uplink-duplicate",
        "uplink-duplicate",
        {"b.yaml": BR + "metadata:\n  name: br1\nspec:\n  uplinks: [eth0, eth1, eth0]\n"},
        [
            "b.yaml:6:25: error: OvsBridge br1 spec.uplinks[2]: uplink eth0 is listed twice (also at "
            "index 0) (list each NIC once)"
        ],
        {},
    ),
    (
        "uplink-is-bridge",
        "uplink-is-bridge",
        {"b.yaml": BR + "metadata:\n  name: br1\nspec:\n  uplinks: [br1]\n"},
        [
            "b.yaml:6:13: error: OvsBridge br1 spec.uplinks[0]: uplink br1 is the bridge itself "
            "(name the node's physical NIC, e.g. eth0)"
        ],
        {},
    ),
    (
        "node-override-duplicate",
        "node-override-duplicate",
        {
            "b.yaml": BR
            + y("""
            metadata:
              name: br1
            spec:
              uplinks: [eth0]
              nodeOverrides:
              - nodeName: worker-1
                uplinks: [ens3]
              - nodeName: worker-1
                mtu: 9000
            """)
        },
        [
            "b.yaml:10:15: error: OvsBridge br1 spec.nodeOverrides[1].nodeName: node worker-1 "
            "already has an override (spec.nodeOverrides[0]) (merge the two overrides)"
        ],
        {},
    ),
    # --- numbers, selectors, addresses, CNI configs and interface names ---------------------
    (
        "number-out-of-range",
        "number-out-of-range",
        {
            "b.yaml": BR
            + y("""
          metadata:
            name: br1
          spec:
            uplinks: [eth0]
            mtu: 99999999999999999999
            probeTimeoutSeconds: .inf
          """)
        },
        [
            (
                "b.yaml:7:8: error: OvsBridge br1 spec.mtu: integer 99999999999999999999 is out of range: "
                "Kubernetes clients read integers exactly only up to 2^53-1 (9007199254740991) in "
                "magnitude (write a number within the field's range)"
            ),
            (
                "b.yaml:8:24: error: OvsBridge br1 spec.probeTimeoutSeconds: number .inf is not finite: "
                "JSON and Kubernetes cannot store infinity or NaN (write a finite number)"
            ),
        ],
        {},
    ),
    (
        "label-selector-invalid",
        "label-selector-invalid",
        {
            "p.yaml": POOL
            + y("""
          metadata:
            name: p1
          spec:
            subnet: 172.18.0.0/16
            podAffinity:
              matchExpressions:
              - key: app
                operator: In
            nodeAffinity:
              matchExpressions:
              - key: rack
                operator: Exists
                values: [r1]
          """)
        },
        [
            (
                "p.yaml:10:17: error: SpiderIPPool p1 spec.podAffinity.matchExpressions[0].operator: "
                "operator In needs at least one value (Kubernetes refuses to evaluate a selector with an "
                "empty In or NotIn list) (add values: [<label value>], or use operator Exists to test "
                "only the key)"
            ),
            (
                "p.yaml:15:7: error: SpiderIPPool p1 spec.nodeAffinity.matchExpressions[0].values: "
                "operator Exists tests only whether the key is present and must not have values (remove "
                "values, or use operator In to match these values)"
            ),
        ],
        {},
    ),
    (
        "label-invalid-in-selectors",
        "label-invalid",
        {
            "p.yaml": POOL
            + y("""
          metadata:
            name: p1
          spec:
            subnet: 172.18.0.0/16
            namespaceAffinity:
              matchLabels:
                team/a/b: net
              matchExpressions:
              - key: tier
                operator: NotIn
                values: ["front end"]
          """),
            "b.yaml": BR
            + y("""
          metadata:
            name: br1
          spec:
            uplinks: [eth0]
            nodeSelector:
              rack: "r 1"
          """),
        },
        [
            (
                'b.yaml:8:11: error: OvsBridge br1 spec.nodeSelector.rack: label value "r 1" is not '
                "valid: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or "
                "digit (shorten it or replace the other characters with '-')"
            ),
            (
                'p.yaml:9:7: error: SpiderIPPool p1 spec.namespaceAffinity.matchLabels["team/a/b"]: label '
                'key "team/a/b" is not valid: prefix "team/a" is not a DNS-1123 subdomain (write a key '
                "like example.com/name)"
            ),
            (
                "p.yaml:13:16: error: SpiderIPPool p1 "
                'spec.namespaceAffinity.matchExpressions[0].values[0]: label value "front end" is not '
                "valid: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or "
                "digit (shorten it or replace the other characters with '-')"
            ),
        ],
        {},
    ),
    (
        "subnet-reserved",
        "subnet-reserved",
        {
            "p.yaml": POOL
            + y("""
          metadata:
            name: lo
          spec:
            subnet: 127.0.0.0/8
          ---
          """)
            + POOL
            + y("""
          metadata:
            name: ll6
          spec:
            subnet: fe80::/64
          ---
          """)
            + POOL
            + y("""
          metadata:
            name: mapped
          spec:
            subnet: ::ffff:10.9.0.0/120
          """)
        },
        [
            (
                "p.yaml:6:11: error: SpiderIPPool lo spec.subnet: subnet 127.0.0.0/8 is loopback: pods "
                "cannot use these addresses on a network (use a unicast subnet of the network the pods "
                "attach to, e.g. 172.18.0.0/16)"
            ),
            (
                "p.yaml:13:11: error: SpiderIPPool ll6 spec.subnet: subnet fe80::/64 is link-local: pods "
                "cannot use these addresses on a network (use a unicast subnet of the network the pods "
                "attach to, e.g. fd00:18::/64)"
            ),
            (
                "p.yaml:20:11: error: SpiderIPPool mapped spec.subnet: subnet ::ffff:10.9.0.0/120 is "
                "IPv4-mapped (RFC 4291 2.5.5.2; write the IPv4 subnet instead): pods cannot use these "
                "addresses on a network (use a unicast subnet of the network the pods attach to, e.g. "
                "fd00:18::/64)"
            ),
        ],
        {},
    ),
    (
        "gateway-network-or-broadcast",
        "gateway-network-or-broadcast",
        {
            "p.yaml": POOL
            + y("""
          metadata:
            name: p1
          spec:
            subnet: 10.2.0.0/24
            ips: [10.2.0.10-10.2.0.20]
            gateway: 10.2.0.255
          """)
        },
        [
            (
                "p.yaml:8:12: error: SpiderIPPool p1 spec.gateway: gateway 10.2.0.255 is the broadcast "
                "address of subnet 10.2.0.0/24, not a router's address (write the router's host address, "
                "e.g. 10.2.0.254)"
            ),
        ],
        {},
    ),
    (
        "ip-network-or-broadcast",
        "ip-network-or-broadcast",
        {
            "p.yaml": POOL
            + y("""
          metadata:
            name: p1
          spec:
            subnet: 10.3.0.0/24
            ips:
            - 10.3.0.0-10.3.0.100
            - 10.3.0.255
            excludeIPs: [10.3.0.1]
            gateway: 10.3.0.1
          """)
        },
        [
            (
                'p.yaml:8:5: error: SpiderIPPool p1 spec.ips[0]: "10.3.0.0-10.3.0.100" includes 10.3.0.0, '
                "the network address of subnet 10.3.0.0/24; hosts on the subnet do not take it for a "
                "pod's address (start the range at 10.3.0.1, or add 10.3.0.0 to excludeIPs)"
            ),
            (
                'p.yaml:9:5: error: SpiderIPPool p1 spec.ips[1]: "10.3.0.255" is the broadcast address of '
                "subnet 10.3.0.0/24; hosts on the subnet do not take it for a pod's address (remove it, "
                "or add 10.3.0.255 to excludeIPs)"
            ),
        ],
        {},
    ),
    (
        "ip-network-or-broadcast-excluded-is-fine",
        "ip-network-or-broadcast",
        {
            "p.yaml": POOL
            + y("""
          metadata:
            name: p1
          spec:
            subnet: 10.3.0.0/24
            ips: [10.3.0.0-10.3.0.255]
            excludeIPs: [10.3.0.0-10.3.0.1, 10.3.0.255]
            gateway: 10.3.0.1
          ---
          """)
            + POOL
            + y("""
          metadata:
            name: p31
          spec:
            subnet: 10.4.0.0/31
            ips: [10.4.0.0-10.4.0.1]
          """)
        },
        [],
        {},
    ),
    (
        "gateway-in-other-pool",
        "gateway-in-other-pool",
        {
            "a.yaml": POOL
            + y("""
          metadata:
            name: a
          spec:
            subnet: 172.18.0.0/16
            ips: [172.18.30.131-172.18.30.140]
            gateway: 172.18.31.5
          """),
            "b.yaml": POOL
            + y("""
          metadata:
            name: b
          spec:
            subnet: 172.18.0.0/16
            ips: [172.18.31.1-172.18.31.10]
            gateway: 172.18.0.1
          """),
        },
        [
            (
                "a.yaml:8:12: error: SpiderIPPool a spec.gateway: gateway 172.18.31.5 is an address "
                'SpiderIPPool b hands to pods ("172.18.31.1-172.18.31.10" at b.yaml:7:9); IPAM would give '
                "this pool's gateway to a pod (add 172.18.31.5 to the excludeIPs of b, or take it out of "
                "its ips)"
            ),
        ],
        {},
    ),
    (
        "pool-too-large",
        "pool-too-large",
        {
            "p.yaml": POOL
            + y("""
          metadata:
            name: big
          spec:
            subnet: 10.0.0.0/16
            ips: [10.0.0.2-10.0.255.254]
            excludeIPs: [10.0.0.100-10.0.0.199]
          ---
          """)
            + POOL
            + y("""
          metadata:
            name: big6
          spec:
            subnet: fd00::/64
            ips: ["fd00::2-fd00::ffff:ffff:ffff:ffff"]
          ---
          """)
            + POOL
            + y("""
          metadata:
            name: just-fits
          spec:
            subnet: 10.1.0.0/16
            ips: [10.1.0.1-10.1.19.136]
          """)
        },
        [
            (
                "p.yaml:7:3: warning: SpiderIPPool big spec.ips: ips minus excludeIPs hold 65433 "
                "addresses, but a SpiderIPPool keeps at most 5000 allocation records, so the rest is "
                "never handed out (narrow ips to at most 5000 addresses, or split the range into several "
                "pools)"
            ),
            (
                "p.yaml:16:3: warning: SpiderIPPool big6 spec.ips: ips minus excludeIPs hold "
                "18446744073709551614 addresses, but a SpiderIPPool keeps at most 5000 allocation "
                "records, so the rest is never handed out; totalIPCount is also capped at "
                "9007199254740991 (2^53-1), the largest count JSON clients read exactly (narrow ips to at "
                "most 5000 addresses, or split the range into several pools)"
            ),
        ],
        {},
    ),
    (
        "route-gateway-allocatable",
        "route-gateway-allocatable",
        {
            "p.yaml": POOL
            + y("""
          metadata:
            name: p1
          spec:
            subnet: 10.6.0.0/24
            ips: [10.6.0.10-10.6.0.12]
            gateway: 10.6.0.1
            routes:
            - dst: 192.168.0.0/16
              gw: 10.6.0.11
            - dst: 192.169.0.0/16
              gw: 10.6.0.50
          """),
            "q.yaml": POOL
            + y("""
          metadata:
            name: p2
          spec:
            subnet: 10.6.0.0/24
            ips: [10.6.0.40-10.6.0.60]
            gateway: 10.6.0.1
          """),
        },
        [
            (
                "p.yaml:11:9: error: SpiderIPPool p1 spec.routes[0].gw: route gw 10.6.0.11 is an address "
                'this pool ("10.6.0.10-10.6.0.12" at p.yaml:7:9) hands to pods, not a router\'s (write the '
                "router's address, or add 10.6.0.11 to the excludeIPs of this pool)"
            ),
            (
                "p.yaml:13:9: error: SpiderIPPool p1 spec.routes[1].gw: route gw 10.6.0.50 is an address "
                'SpiderIPPool p2 ("10.6.0.40-10.6.0.60" at q.yaml:7:9) hands to pods, not a router\'s '
                "(write the router's address, or add 10.6.0.50 to the excludeIPs of p2)"
            ),
        ],
        {},
    ),
    (
        "route-to-own-subnet",
        "route-to-own-subnet",
        {
            "p.yaml": POOL
            + y("""
          metadata:
            name: p1
          spec:
            subnet: 10.5.0.0/24
            ips: [10.5.0.10]
            gateway: 10.5.0.1
            routes:
            - dst: 10.5.0.0/24
              gw: 10.5.0.1
          """)
        },
        [
            (
                "p.yaml:10:10: warning: SpiderIPPool p1 spec.routes[0].dst: route dst 10.5.0.0/24 is the "
                "pool's own subnet: pods reach it on-link through the route their address brings, and a "
                "second route to it through a gateway conflicts with that one (remove this route)"
            ),
        ],
        {},
    ),
    (
        "custom-cni-invalid-config",
        "custom-cni-invalid-config",
        {
            "m.yaml": SMC
            + y("""
          metadata:
            name: c1
            namespace: default
          spec:
            cniType: custom
            customCNI: '{"cniVersion": "1.0.0", "plugins": 5}'
          ---
          """)
            + SMC
            + y("""
          metadata:
            name: c2
            namespace: default
          spec:
            customCNI: |
              {"cniVersion": "1.0.0", "name": "c2",
               "plugins": [{"type": "bridge"}, {"capabilities": {"mac": true}}]}
          ---
          """)
            + SMC
            + y("""
          metadata:
            name: c3
            namespace: default
          spec:
            customCNI: '{"cniVersion": "1.0.0", "name": "c3"}'
          """)
        },
        [
            (
                "m.yaml:8:14: error: SpiderMultusConfig default/c1 spec.customCNI: customCNI is not a CNI "
                'configuration: "plugins" must be a list of plugin objects, got number 5 (write '
                '{"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]} or a single plugin '
                '{"cniVersion": "1.0.0", "type": "bridge"})'
            ),
            (
                "m.yaml:16:14: error: SpiderMultusConfig default/c2 spec.customCNI: customCNI is not a "
                'CNI configuration: plugins[1] has no "type" (the name of the plugin binary) (write '
                '{"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]} or a single plugin '
                '{"cniVersion": "1.0.0", "type": "bridge"})'
            ),
            (
                "m.yaml:26:14: error: SpiderMultusConfig default/c3 spec.customCNI: customCNI is not a "
                'CNI configuration: has neither "plugins" (a configuration list) nor "type" (a single '
                'plugin) (write {"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]} or a single '
                'plugin {"cniVersion": "1.0.0", "type": "bridge"})'
            ),
        ],
        {},
    ),
    (
        "chain-cni-invalid-plugin",
        "chain-cni-invalid-plugin",
        {
            "m.yaml": SMC
            + y("""
          metadata:
            name: c1
            namespace: default
          spec:
            customCNI: '{"cniVersion": "1.0.0", "type": "bridge"}'
            chainCNIJsonData:
            - '{"type": "tuning"}'
            - '{"type": 7}'
            - '{"mtu": 1500}'
          """)
        },
        [
            (
                "m.yaml:10:5: error: SpiderMultusConfig default/c1 spec.chainCNIJsonData[1]: "
                "chainCNIJsonData[1] is not a CNI plugin configuration: type must be the name of a plugin "
                'binary, got number 7 (write one plugin object with its type, e.g. {"type": "tuning"})'
            ),
            (
                "m.yaml:11:5: error: SpiderMultusConfig default/c1 spec.chainCNIJsonData[2]: "
                'chainCNIJsonData[2] is not a CNI plugin configuration: it has no "type" (the name of the '
                'plugin binary) (write one plugin object with its type, e.g. {"type": "tuning"})'
            ),
        ],
        {},
    ),
    (
        "master-name-invalid",
        "master-name-invalid",
        {
            "m.yaml": SMC
            + y("""
          metadata:
            name: c1
            namespace: default
          spec:
            cniType: ipvlan
            ipvlan:
              master: [".."]
          """)
        },
        [
            (
                'm.yaml:9:14: error: SpiderMultusConfig default/c1 spec.ipvlan.master[0]: ".." is not a '
                'Linux interface name: ".." names a directory in /sys/class/net and /proc/sys/net, never '
                "an interface (write the NIC's name as `ip link` shows it on the node, e.g. eth0)"
            ),
        ],
        {},
    ),
    (
        "vlan-interface-name-too-long",
        "vlan-interface-name-too-long",
        {
            "m.yaml": SMC
            + y("""
          metadata:
            name: c1
            namespace: default
          spec:
            cniType: macvlan
            macvlan:
              master: [enp0s31f6abcde]
              vlanID: 4094
          ---
          """)
            + SMC
            + y("""
          metadata:
            name: c2
            namespace: default
          spec:
            cniType: macvlan
            macvlan:
              master: [eth0, eth1]
              bond:
                name: bond-uplink0
                mode: 1
              vlanID: 100
          ---
          """)
            + SMC
            + y("""
          metadata:
            name: fits
            namespace: default
          spec:
            cniType: macvlan
            macvlan:
              master: [enp0s31f6a]
              vlanID: 4094
          """)
        },
        [
            (
                "m.yaml:9:14: error: SpiderMultusConfig default/c1 spec.macvlan.master[0]: the VLAN "
                'interface "enp0s31f6abcde.4094" made for vlanID 4094 has 19 characters; Linux interface '
                "names are at most 15 (IFNAMSIZ 16 with the terminating NUL), so the interface cannot be "
                "created (for vlanID 4094 the parent name may have at most 10 characters: give the NIC a "
                "shorter name on the nodes with a systemd .link file, or create the VLAN interface on the "
                "nodes and name it as master, without vlanID)"
            ),
            (
                "m.yaml:22:7: warning: SpiderMultusConfig default/c2 spec.macvlan.bond: underlay does "
                'not create bond "bond-uplink0" as Spiderpool\'s ifacer plugin does: the '
                "NetworkAttachmentDefinition uses it as the macvlan master, so it must already exist on "
                "every node (create the bond on the nodes with netplan or NetworkManager, or keep one "
                "master and drop bond)"
            ),
            (
                "m.yaml:22:13: error: SpiderMultusConfig default/c2 spec.macvlan.bond.name: the VLAN "
                'interface "bond-uplink0.100" made for vlanID 100 has 16 characters; Linux interface '
                "names are at most 15 (IFNAMSIZ 16 with the terminating NUL), so the interface cannot be "
                "created (for vlanID 100 the parent name may have at most 11 characters: give the NIC a "
                "shorter name on the nodes with a systemd .link file, or create the VLAN interface on the "
                "nodes and name it as master, without vlanID)"
            ),
            (
                "m.yaml:35:13: warning: SpiderMultusConfig default/fits spec.macvlan.vlanID: underlay "
                'does not create the VLAN interface "enp0s31f6a.4094" (Spiderpool\'s ifacer plugin '
                "does); the NetworkAttachmentDefinition uses it as the macvlan master, so it must "
                "exist on every node or every pod ADD fails (create enp0s31f6a.4094 on the nodes as a "
                "netplan or NetworkManager VLAN, or use cniType ovs with vlan: an OVS access port)"
            ),
        ],
        {},
    ),
    (
        "bridge-object-name-invalid",
        "bridge-object-name-invalid",
        {
            "b.yaml": BR
            + y("""
          metadata:
            name: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb
          spec:
            bridge: br1
            uplinks: [eth0]
          """)
        },
        [
            (
                "b.yaml:4:9: error: OvsBridge "
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb metadata.name: "
                "OvsBridge name has 64 characters: the node agent labels each OvsBridgeEnactment "
                "underlay.dev/bridge=<name>, and label values are at most 63 characters (write a name of "
                "at most 63 characters, e.g. "
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbb)"
            ),
        ],
        {},
    ),
    (
        "uplink-name-invalid",
        "uplink-name-invalid",
        {
            "b.yaml": BR
            + y("""
          metadata:
            name: br1
          spec:
            uplinks: [eth0]
            nodeOverrides:
            - nodeName: worker-1
              uplinks: ["."]
          """)
        },
        [
            (
                'b.yaml:9:15: error: OvsBridge br1 spec.nodeOverrides[0].uplinks[0]: uplink "." is not a '
                'Linux interface name: "." names a directory in /sys/class/net and /proc/sys/net, never '
                "an interface (write the NIC's name as `ip link` shows it on the node, e.g. eth0)"
            ),
        ],
        {},
    ),
    (
        "bridge-name-invalid-dots",
        "bridge-name-invalid",
        {
            "b.yaml": BR
            + y("""
          metadata:
            name: dots
          spec:
            bridge: ".."
            uplinks: [eth0]
          """)
        },
        [
            (
                'b.yaml:6:11: error: OvsBridge dots spec.bridge: bridge ".." is not a Linux interface '
                'name: ".." names a directory in /sys/class/net and /proc/sys/net, never an interface '
                "(write a name such as br1)"
            ),
        ],
        {},
    ),
    (
        "bridge-is-uplink",
        "bridge-is-uplink",
        {
            "b.yaml": BR
            + y("""
          metadata:
            name: b1
          spec:
            bridge: eth1
            uplinks: [eth0]
          ---
          """)
            + BR
            + y("""
          metadata:
            name: b2
          spec:
            bridge: br2
            uplinks: [eth1]
          """)
        },
        [
            (
                "b.yaml:6:11: error: OvsBridge b1 spec.bridge: bridge eth1 has the name of an uplink of "
                "OvsBridge b2 (b.yaml:15:13): the bridge's internal interface and that NIC cannot both "
                "exist on a node (rename the bridge, e.g. br-eth1)"
            ),
        ],
        {},
    ),
    (
        "bridge-name-like-nic",
        "bridge-name-like-nic",
        {
            "b.yaml": BR
            + y("""
          metadata:
            name: b1
          spec:
            bridge: ens5
            uplinks: [eth0]
          """)
        },
        [
            (
                "b.yaml:6:11: warning: OvsBridge b1 spec.bridge: bridge ens5 is named like a physical "
                "NIC: on a node that has a NIC of that name the node agent refuses to make the bridge "
                "(Git cannot tell which nodes have it) (name bridges apart from NICs, e.g. br-ens5)"
            ),
        ],
        {},
    ),
    (
        "uplink-conflict-through-node-override",
        "uplink-conflict",
        {
            "b.yaml": BR
            + y("""
          metadata:
            name: br1
          spec:
            uplinks: [eth0]
          ---
          """)
            + BR
            + y("""
          metadata:
            name: br2
          spec:
            uplinks: [eth1]
            nodeOverrides:
            - nodeName: n1
              uplinks: [eth0]
          ---
          """)
            + BR
            + y("""
          metadata:
            name: br3
          spec:
            uplinks: [eth2]
            nodeSelector:
              kubernetes.io/hostname: n2
            nodeOverrides:
            - nodeName: n2
              uplinks: [eth3]
          ---
          """)
            + BR
            + y("""
          metadata:
            name: br4
          spec:
            uplinks: [eth3]
            nodeSelector:
              kubernetes.io/hostname: n3
          ---
          """)
            + BR
            + y("""
          metadata:
            name: br5
          spec:
            uplinks: [eth4]
            nodeOverrides:
            - nodeName: n1
              uplinks: [eth5]
          ---
          """)
            + BR
            + y("""
          metadata:
            name: br6
          spec:
            uplinks: [eth6]
            nodeOverrides:
            - nodeName: n1
              uplinks: [eth4]
          """)
        },
        [
            (
                "b.yaml:16:15: error: OvsBridge br2 spec.nodeOverrides[0].uplinks[0]: uplink eth0 is also "
                "an uplink of OvsBridge br1 (b.yaml:6:13) on node n1 (a NIC can be the uplink of one "
                "bridge only; use another NIC in the override for n1)"
            ),
        ],
        {},
    ),
    (
        "duplicate-object-is-not-compared-with-itself",
        "duplicate-object",
        {
            "a.yaml": POOL
            + y("""
          metadata:
            name: p1
          spec:
            subnet: 172.18.0.0/16
            ips: [172.18.30.131-172.18.30.140]
            gateway: 172.18.30.1
          """),
            "b.yaml": POOL
            + y("""
          metadata:
            name: p1
          spec:
            subnet: 172.18.0.0/16
            ips: [172.18.30.1-172.18.30.140]
            excludeIPs: [172.18.30.1]
            gateway: 172.18.30.135
            routes:
            - dst: 10.0.0.0/8
              gw: 172.18.30.132
          """),
            "c.yaml": BR
            + y("""
          metadata:
            name: br1
          spec:
            bridge: eth9
            uplinks: [eth0]
          ---
          """)
            + BR
            + y("""
          metadata:
            name: br1
          spec:
            bridge: br7
            uplinks: [eth0, eth9]
          """),
        },
        [
            (
                "b.yaml:4:9: error: SpiderIPPool p1 metadata.name: SpiderIPPool p1 is already defined at "
                "a.yaml:4:9 (rename one of them or delete the copy)"
            ),
            (
                "b.yaml:9:12: error: SpiderIPPool p1 spec.gateway: gateway 172.18.30.135 is inside ips "
                '("172.18.30.1-172.18.30.140") and not excluded, so a pod could get it (add 172.18.30.135 '
                "to excludeIPs, or take it out of ips)"
            ),
            (
                "b.yaml:12:9: error: SpiderIPPool p1 spec.routes[0].gw: route gw 172.18.30.132 is an "
                'address this pool ("172.18.30.1-172.18.30.140" at b.yaml:7:9) hands to pods, not a '
                "router's (write the router's address, or add 172.18.30.132 to the excludeIPs of this "
                "pool)"
            ),
            (
                "c.yaml:6:11: warning: OvsBridge br1 spec.bridge: bridge eth9 is named like a physical "
                "NIC: on a node that has a NIC of that name the node agent refuses to make the bridge "
                "(Git cannot tell which nodes have it) (name bridges apart from NICs, e.g. br-eth9)"
            ),
            (
                "c.yaml:12:9: error: OvsBridge br1 metadata.name: OvsBridge br1 is already defined at "
                "c.yaml:4:9 (rename one of them or delete the copy)"
            ),
        ],
        {},
    ),
]


@pytest.mark.parametrize(
    ("files", "expected", "kwargs"),
    [pytest.param(c[2], c[3], c[4], id=c[0]) for c in CASES],
)
def test_rule(
    tmp_path: Path, files: dict[str, str], expected: list[str], kwargs: dict[str, bool]
) -> None:
    assert run(tmp_path, files, **kwargs) == expected


def test_cases_name_their_rule(tmp_path: Path) -> None:
    """Each case that expects findings produces findings of the rule it is filed under."""
    for case_id, rule_id, files, expected, kwargs in CASES:
        d = tmp_path / case_id
        d.mkdir()
        for name, text in files.items():
            (d / name).write_text(text)
        _docs, problems = validate_repo(d, **kwargs)
        if expected:
            assert rule_id in {p.rule for p in problems}, case_id


def test_quickstart_is_clean() -> None:
    root = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
    docs, problems = validate_repo(root, strict=True)
    assert problems == []
    assert sorted(d.ref() for d in docs) == [
        "OvsBridge br1",
        "SpiderIPPool ippool-test",
        "SpiderMultusConfig kube-system/ovs-conf",
    ]
    pool = next(d for d in docs if d.kind == "SpiderIPPool")
    assert pool.obj["spec"] == {
        "ips": ["172.18.30.131-172.18.30.140"],
        "subnet": "172.18.0.0/16",
        "gateway": "172.18.0.1",
        "multusName": ["kube-system/ovs-conf"],
    }


def test_warnings_do_not_block_but_errors_do(tmp_path: Path) -> None:
    warn = run(
        tmp_path,
        {
            "p.yaml": POOL
            + "metadata:\n  name: p1\nspec:\n  subnet: 172.18.0.0/16\n  multusName: [x]\n"
        },
    )
    assert len(warn) == 1 and ": warning: " in warn[0]
    _docs, problems = validate_repo(tmp_path)
    assert not has_errors(problems)
    _docs, problems = validate_repo(tmp_path, strict=True)
    assert has_errors(problems)


def test_validate_accepts_documents_from_load_text() -> None:
    """validate() works on any Documents (the reconciler passes what the loader read)."""
    res = load_text(POOL + "metadata:\n  name: p1\nspec:\n  subnet: 10.0.0.1/8\n", "x.yaml")
    problems = validate(res.documents)
    assert [p.rule for p in problems] == ["subnet-not-canonical"]
    assert (problems[0].line, problems[0].column) == (6, 11)


def test_overlap_detection_scales_to_many_pools(tmp_path: Path) -> None:
    """2,000 disjoint pools in one subnet are clean; a pool overlapping three is reported thrice."""
    base = int(ipaddress.IPv4Address("10.0.1.0"))
    docs = []
    for i in range(2000):
        first = ipaddress.IPv4Address(base + 10 * i)
        docs.append(
            POOL
            + f"metadata:\n  name: p{i}\nspec:\n  subnet: 10.0.0.0/8\n  ips:\n"
            + f"  - {first}-{first + 9}\n"
        )
    (tmp_path / "pools.yaml").write_text("---\n".join(docs))
    _docs, problems = validate_repo(tmp_path)
    assert problems == []
    (tmp_path / "zz-extra.yaml").write_text(
        POOL
        + "metadata:\n  name: extra\nspec:\n  subnet: 10.0.0.0/8\n  ips: [10.0.1.5-10.0.1.25]\n"
    )
    _docs, problems = validate_repo(tmp_path)
    assert [(p.file, p.line, p.rule, p.message.split(" at ")[-1]) for p in problems] == [
        ("zz-extra.yaml", 7, "ip-overlap", "10.0.1.5-10.0.1.9"),
        ("zz-extra.yaml", 7, "ip-overlap", "10.0.1.10-10.0.1.19"),
        ("zz-extra.yaml", 7, "ip-overlap", "10.0.1.20-10.0.1.25"),
    ]


def test_every_rule_has_a_case(tmp_path: Path) -> None:
    """Every rule id of the catalogue is produced by a case here, in the corpus or below.

    ``schema`` is the fallback for JSON Schema keywords our schemas do not use (none today).
    The exact messages of the loading rules are asserted in test_loader.py.
    """
    produced: set[str] = set()
    for case_id, _rule, files, _expected, kwargs in CASES:
        d = tmp_path / case_id
        d.mkdir()
        for name, text in files.items():
            (d / name).write_text(text)
        produced |= {p.rule for p in validate_repo(d, **kwargs)[1]}
    corpus = Path(__file__).resolve().parents[1] / "bad-repos"
    for case in corpus.iterdir():
        args = (case / "args.txt").read_text().split() if (case / "args.txt").exists() else []
        limit = (
            int(args[args.index("--max-file-bytes") + 1]) if "--max-file-bytes" in args else None
        )
        kwargs2: dict[str, Any] = {"strict": "--strict" in args}
        if limit:
            kwargs2["max_file_bytes"] = limit
        produced |= {p.rule for p in validate_repo(case, **kwargs2)[1]}
    loader_only = tmp_path / "loader-only"
    loader_only.mkdir()
    os.mkfifo(loader_only / "fifo.yaml")
    (loader_only / "broken.yaml").symlink_to(loader_only / "nowhere.yaml")
    produced |= {p.rule for p in load_repo(loader_only, ["missing.yaml", "/", "."]).problems}
    for text, kw in [
        ("a: [1, 2, 3]", {"max_nodes": 2}),
        ("a: &x [1, *x]", {}),
        ("a: " + "[" * 70 + "]" * 70, {}),
        ("a: !!set {x}\n? [k]\n: v\n", {}),
        ("kind: X\n", {}),
        ("- 1\n", {}),
    ]:
        produced |= {p.rule for p in load_text(text, "t.yaml", **kw).problems}
    assert set(RULES) - {"schema"} - produced == set()


def test_render_refuses_what_validation_refuses_naming_the_object(tmp_path: Path) -> None:
    """customCNI '{"plugins": 5}' crashed plan with "'int' object is not iterable" and
    '{"plugins": "abc"}' rendered plugins a, b, c: validation reports both, and render, should
    they ever reach it, raises a ValueError naming the object and its file:line."""
    from reconciler import render

    for custom, why in [
        ('{"plugins": 5}', '"plugins" must be a list of plugin objects, got number 5'),
        ('{"plugins": "abc"}', '"plugins" must be a list of plugin objects, got string "abc"'),
        ('{"plugins": [{"type": "bridge"}, 7]}', "plugins[1] must be a plugin object"),
        ('{"type": NaN}', "NaN is not JSON"),
    ]:
        (tmp_path / "smc.yaml").write_text(
            SMC
            + "metadata:\n  name: cd\n  namespace: default\nspec:\n"
            + f"  cniType: custom\n  customCNI: '{custom}'\n"
        )
        docs, problems = validate_repo(tmp_path)
        assert [p.rule for p in problems if p.severity == "error"] in (
            ["custom-cni-invalid-config"],
            ["custom-cni-invalid-json"],
        ), custom
        with pytest.raises(ValueError) as exc:
            render.render(docs)
        assert str(exc.value).startswith(
            "cannot render SpiderMultusConfig default/cd (smc.yaml:1): customCNI is not "
        ), exc.value
        assert why in str(exc.value)
    # an ovs config without bridge, as a plain dict that never met the validator
    bad = {
        "apiVersion": "spiderpool.spidernet.io/v2beta1",
        "kind": "SpiderMultusConfig",
        "metadata": {"name": "o", "namespace": "kube-system"},
        "spec": {"cniType": "ovs", "ovs": {"vlan": 5}},
    }
    with pytest.raises(ValueError, match=r"^cannot render SpiderMultusConfig kube-system/o: "):
        render.render([bad])
    with pytest.raises(
        ValueError, match=r"^cannot render SpiderIPPool \(no name\): missing field 'name'"
    ):
        render.render([{**bad, "kind": "SpiderIPPool", "metadata": {}, "spec": {}}])


def test_whole_floats_are_not_integers_and_hints_quote_what_was_written(tmp_path: Path) -> None:
    """A YAML float is never an integer (Go and our CNI plugins refuse "vlan": 100.0, so every
    pod ADD would fail), and "quote it" repeats the text as written, not what YAML made of it
    (5.10 is the float 5.1, 010 the octal 8, 1:30 the sexagesimal 90)."""
    got = run(
        tmp_path,
        {
            "a.yaml": POOL
            + y("""
            metadata:
              name: p
            spec:
              ipVersion: 4.0
              subnet: 10.3.0.0/24
              ips: [10.3.0.10-10.3.0.20]
            ---
            """)
            + BR
            + y("""
            metadata:
              name: br1
            spec:
              uplinks: [eth0]
              nodeSelector: {kernel: 5.10, rack: 010, zone: 1:30}
            ---
            """)
            + SMC
            + y("""
            metadata:
              name: s
              namespace: kube-system
            spec:
              cniType: ovs
              ovs:
                bridge: br1
                vlan: 1e2
                trunk: [{id: 10.0}]
            """)
        },
    )
    assert got == [
        "a.yaml:6:14: error: SpiderIPPool p spec.ipVersion: must be an integer, got number 4.0 "
        "(write 4)",
        "a.yaml:16:26: error: OvsBridge br1 spec.nodeSelector.kernel: must be a string, got number "
        '5.1 (quote it: "5.10")',
        "a.yaml:16:38: error: OvsBridge br1 spec.nodeSelector.rack: must be a string, got integer "
        '8 (quote it: "010")',
        "a.yaml:16:49: error: OvsBridge br1 spec.nodeSelector.zone: must be a string, got integer "
        '90 (quote it: "1:30")',
        "a.yaml:27:11: error: SpiderMultusConfig kube-system/s spec.ovs.vlan: must be an integer, "
        'got string "1e2" (write 100)',
        "a.yaml:28:18: error: SpiderMultusConfig kube-system/s spec.ovs.trunk[0].id: must be an "
        "integer, got number 10.0 (write 10)",
    ]


def test_hand_written_ipam_pool_names_and_lone_surrogates(tmp_path: Path) -> None:
    """One pool name as a string is checked like a list of one (the IPAM takes both); other
    shapes would fail every ADD; a \\u escape that makes a lone surrogate is refused, never an
    internal error (found by the hostile tester)."""
    got = run(
        tmp_path,
        {
            "m.yaml": SMC
            + y("""
            metadata:
              name: t
              namespace: kube-system
            spec:
              cniType: custom
              customCNI: '{"type": "underlay-ovs", "bridge": "br1", "ipam": {"type": "underlay-ipam", "default_ipv4_ippool": "nosuchpool", "default_ipv6_ippool": [5]}}'
            ---
            """)
            + SMC
            + y("""
            metadata:
              name: s
              namespace: kube-system
            spec:
              cniType: custom
              customCNI: '{"type": "underlay-ovs", "bridge": "\\ud800"}'
            """)
        },
    )
    assert [g.split(": ", 1)[1] for g in got] == [
        "warning: SpiderMultusConfig kube-system/t spec.customCNI: no OvsBridge in the repository "
        'makes bridge "br1" (add an OvsBridge for it; fine if the bridge is made outside Git)',
        'warning: SpiderMultusConfig kube-system/t spec.customCNI: no SpiderIPPool "nosuchpool" '
        "in the repository (check the name; fine if the pool is managed outside Git)",
        "error: SpiderMultusConfig kube-system/t spec.customCNI: the underlay-ipam plugin would "
        "refuse every pod ADD without pool annotations: ipam.default_ipv6_ippool must be a pool "
        'name or a list of pool names, got [5] (write "default_ipv6_ippool": ["pool-name"])',
        "error: SpiderMultusConfig kube-system/s spec.customCNI: customCNI is not usable JSON: a "
        "\\u escape makes a lone UTF-16 surrogate ('\\ud800'), which is not a Unicode character "
        '(write a CNI config object, e.g. {"cniVersion": "1.0.0", "type": "bridge"})',
    ]
