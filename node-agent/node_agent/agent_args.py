"""The command-line options of ``underlay agent``, without importing the agent.

``underlay --help`` and every other command build the whole argparse tree; importing
:mod:`node_agent.daemon` for it would load kubernetes, pyroute2 and ovsdbapp (most of a
second). This module imports only the standard library and :mod:`reconciler.vocab`;
:func:`node_agent.daemon.add_arguments` is this module's :func:`add_arguments`.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from pathlib import Path

from reconciler import vocab

DEFAULT_OVSDB_REMOTE = "unix:/var/run/openvswitch/db.sock"
"""OVSDB the agent manages by default (the same as ``node_agent.ovsdb.DEFAULT_REMOTE``)."""

DEFAULT_LEASE_NAMESPACE = "kube-system"
"""Namespace of the rollout slot Leases without $POD_NAMESPACE (``daemon.DEFAULT_LEASE_NAMESPACE``)."""

DESCRIPTION = (
    "Watch OvsBridge objects, make this node's bridges match the ones that select it (OVS "
    "through ovsdbapp, addresses and routes through pyroute2), persist them (netplan / "
    "NetworkManager), report OvsBridgeEnactment <node>.<bridge>, and serve the underlay-ovs "
    "and underlay-ipam CNI plugins over a unix socket."
)

DEFAULT_HTTP_ADDRESS = "127.0.0.1:9441"
"""Where ``/healthz``, ``/readyz`` and ``/metrics`` are served by default: loopback only (the
agent runs with hostNetwork, so any other address is reachable from the node's LAN; the
DaemonSet's probes ask ``127.0.0.1``)."""

DEFAULT_STUCK_AFTER = 600.0
"""Seconds a bridge pass may run (the bridge loop gives no heartbeat) before ``/healthz`` fails."""

EPILOG = """\
exit codes: 0 stopped cleanly (SIGTERM/SIGINT) or --noop done; 1 --noop: this node's Node
object does not exist, or the --from repository has errors; 2 usage error, or the API server,
OVSDB or the --http-address cannot be reached/bound at start

examples:
  underlay agent --noop --node-name n1     # the OvsBridges and Node labels of the cluster
  underlay agent --noop --from examples/quickstart --node-labels kubernetes.io/hostname=n1
"""


_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def label_problem(key: str, value: str) -> str | None:
    """Why ``key=value`` is not a Kubernetes label, or None: the key an optional DNS-1123
    subdomain prefix and ``/`` and a name of at most 63 characters, the value at most 63
    characters, both letters, digits, ``-``, ``_``, ``.`` starting and ending alphanumeric,
    matched whole (k8s.io/apimachinery ``IsQualifiedName``, ``IsValidLabelValue``)."""
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(prefix)):
        return f"label key {key!r}: prefix {prefix!r} is not a DNS-1123 subdomain"
    if len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return f"label key {key!r} is not a qualified name"
    if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
        return f"label value {value!r} (of {key}) is not a label value"
    return None


def node_labels(text: str) -> dict[str, str]:
    """Parse ``--node-labels``: ``k=v[,k=v...]`` -> {k: v}; "" -> {} (a node without labels).

    Raises argparse.ArgumentTypeError naming the bad item (no ``=``, empty key, a key twice,
    a key or value that is not a Kubernetes label: :func:`label_problem`). Keys and values are
    taken as written otherwise (the nodeSelector compares them verbatim).
    """
    labels: dict[str, str] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE (e.g. zone=a,rack=r1)")
        if key in labels:
            raise argparse.ArgumentTypeError(f"label {key!r} given twice")
        why = label_problem(key, value.strip())
        if why:
            raise argparse.ArgumentTypeError(why)
        labels[key] = value.strip()
    return labels


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``underlay agent`` (node name, kubeconfig, OVSDB, CNI socket and plugins,
    resync and GC intervals, rollout Leases, health endpoint, --noop and its --from and
    --node-labels)."""
    p.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME") or socket.gethostname(),
        help="this node's name in Kubernetes (default: $NODE_NAME, else the hostname)",
    )
    p.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then in-cluster)",
    )
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument(
        "--ovsdb", default=DEFAULT_OVSDB_REMOTE, help="OVSDB to manage (default: %(default)s)"
    )
    p.add_argument(
        "--socket",
        default=vocab.DEFAULT_AGENT_SOCKET,
        help="unix socket the CNI plugins call (default: %(default)s)",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help="directory that stands for the node's / when writing netplan/NetworkManager "
        "files (default: /)",
    )
    p.add_argument(
        "--cni-bin-dir",
        type=Path,
        help="install the underlay-ovs and underlay-ipam plugins into this directory at start "
        "(e.g. /opt/cni/bin)",
    )
    p.add_argument(
        "--cni-python",
        default="/usr/bin/python3",
        help="interpreter the installed plugins run with (default: %(default)s)",
    )
    p.add_argument(
        "--resync",
        type=float,
        default=60.0,
        help="seconds between full re-checks of the node against the OvsBridges "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE") or DEFAULT_LEASE_NAMESPACE,
        help="namespace of the rollout slot Leases (default: $POD_NAMESPACE, else %(default)s)",
    )
    p.add_argument(
        "--rollout-retry",
        type=float,
        default=2.0,
        help="seconds between attempts to get a rollout slot while Pending, jittered "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--noop",
        action="store_true",
        help="print what would change on this node (bridge plan, files it would write, bridges "
        "it would remove), change nothing, exit; OvsBridges come from the cluster, or from "
        "--from without one",
    )
    p.add_argument(
        "--from",
        dest="source",
        metavar="PATH",
        type=Path,
        help="with --noop: take the OvsBridges from this repository directory or file (loaded "
        "and validated as the reconciler does; refused when it has errors) instead of the "
        "cluster; no kubeconfig needed; bridges to remove are known from this node's replay "
        "records only",
    )
    p.add_argument(
        "--node-labels",
        metavar="K=V[,K=V]",
        type=node_labels,
        help="with --noop: this node's labels for the nodeSelectors, instead of its Node "
        "object's (default: read from the cluster when one is configured, else none)",
    )
    p.add_argument(
        "--no-probe",
        action="store_true",
        help="skip the gateway/API server probes after a change (not recommended)",
    )
    p.add_argument(
        "--no-bridges", action="store_true", help="serve the CNI plugins only; leave bridges alone"
    )
    p.add_argument(
        "--gc-interval",
        type=float,
        default=300.0,
        help="seconds between garbage collections of leaked IP allocations (a pass also runs "
        "at start; 0 turns it off) (default: %(default)s)",
    )
    p.add_argument(
        "--http-address",
        default=DEFAULT_HTTP_ADDRESS,
        metavar="[HOST]:PORT",
        help="where /healthz (bridge loop and CNI server alive), /readyz (first bridge pass "
        "done, CNI server serving) and /metrics are served: loopback by default, where the "
        "DaemonSet's probes ask; empty to disable (default: %(default)s)",
    )
    p.add_argument(
        "--metrics-address",
        default="",
        metavar="[HOST]:PORT",
        help="also serve /metrics alone here, e.g. :9442 for a Prometheus that scrapes the "
        "node's address (hostNetwork: every host on the node's LAN can reach it); empty: only "
        "on --http-address (default: none)",
    )
    p.add_argument(
        "--cni-managed-bridges-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="attach pods only to OVS bridges this agent made for an OvsBridge (a CNI config "
        "naming another bridge on the node fails with code 112); --no-cni-managed-bridges-only "
        "allows any OVS bridge (default: on)",
    )
    p.add_argument(
        "--cni-state-dir",
        type=Path,
        default=None,
        help="where CNI ADD records the veths it made, so DEL deletes exactly those (a tmpfs: "
        "records last as long as the pods' namespaces) (default: the --socket path without "
        "its extension + .attachments, /run/underlay/agent.attachments)",
    )
    p.add_argument(
        "--stuck-after",
        type=float,
        default=DEFAULT_STUCK_AFTER,
        metavar="SECONDS",
        help="/healthz fails when a bridge pass has been running this long (default: %(default)s)",
    )
    p.add_argument(
        "--cni-api-timeout",
        type=float,
        default=10.0,
        help="seconds one API request of a CNI call may take before the call fails with code "
        "11, try again later (default: %(default)s)",
    )
