"""deploy/ and the Dockerfile, checked statically (no cluster, no Docker here).

Every manifest validates against the Kubernetes OpenAPI schemas (``kubernetes-validate``,
strict: unknown fields are errors) of the oldest and newest versions it ships; the kustomize
base lists every file; RBAC has no wildcards; the reconciler Deployment and the agent DaemonSet
have what production needs, and their container args parse with underlay's own CLI; the
Dockerfile is multi-stage, pinned, non-root, and copies everything the package is built from.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler import cli

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install kubernetes-validate (test extra)"
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSIONS = ("1.29.0", "1.33.0", kubernetes_validate.latest_version())


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    files = sorted(DEPLOY.glob("*.yaml")) + sorted((DEPLOY / "crds").glob("*.yaml"))
    return [(f, d) for f in files if f.name != "kustomization.yaml" for d in docs(f)]


def find(kind: str, name: str) -> dict[str, Any]:
    for _f, d in manifests():
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} {name} in deploy/")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    for path, doc in manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']}: {exc.message}"
                f" at {'.'.join(str(p) for p in exc.path)}"
            ) from None
        checked += 1
    assert checked >= 20


def test_kustomization_lists_every_file_and_one_namespace() -> None:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    on_disk = {
        str(p.relative_to(DEPLOY))
        for p in [*DEPLOY.glob("*.yaml"), *(DEPLOY / "crds").glob("*.yaml")]
        if p.name != "kustomization.yaml"
    }
    assert listed == on_disk
    # the namespace is set only where a manifest names none (a plain `namespace:` would move
    # the agent's Events Role out of default)
    assert "namespace" not in kust
    (transformer,) = (yaml.safe_load(t) for t in kust["transformers"])
    assert transformer["kind"] == "NamespaceTransformer" and transformer["unsetOnly"] is True
    ns = transformer["metadata"]["namespace"]
    assert find("Namespace", ns)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == (
        "privileged"
    ), "the agent is privileged: the namespace must admit it"
    for _f, d in manifests():
        if d["kind"] in ("Namespace", "CustomResourceDefinition", "ClusterRole"):
            continue
        if d["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            assert all(s["namespace"] == ns for s in d["subjects"])
        if d["kind"] == "ClusterRoleBinding":
            continue
        if (d["kind"], d["metadata"]["name"]) in (
            ("Role", "underlay-agent-events"),
            ("RoleBinding", "underlay-agent-events"),
        ):
            # Events about cluster-scoped enactments: the API server takes them in default only
            assert d["metadata"]["namespace"] == "default"
            continue
        assert d["metadata"]["namespace"] == ns, f"{d['kind']} {d['metadata']['name']}"
    events = find("Role", "underlay-agent-events")["rules"]
    assert events == [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]
    images = {i["name"] for i in kust["images"]}
    for kind, name in (("Deployment", "underlay-reconciler"), ("DaemonSet", "underlay-agent")):
        (c,) = find(kind, name)["spec"]["template"]["spec"]["containers"]
        assert c["image"].rsplit(":", 1)[0] in images


def test_rbac_has_no_wildcards_and_no_dangerous_verbs() -> None:
    for _f, d in manifests():
        if d["kind"] not in ("ClusterRole", "Role"):
            continue
        for rule in d["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), f"{d['metadata']['name']}: wildcard in {key}"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
            if "secrets" in rule["resources"]:
                assert rule.get("resourceNames"), "Secrets only by name"
                assert rule["verbs"] == ["get"]
    for sa in ("underlay-reconciler", "underlay-agent"):
        find("ServiceAccount", sa)


def _container(kind: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = find(kind, name)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    return pod, c


def _expand(args: list[str], env: list[dict[str, Any]]) -> list[str]:
    values = {e["name"]: e.get("value", f"<{e['name']}>") for e in env}
    return [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in args]


def test_reconciler_deployment() -> None:
    dep = find("Deployment", "underlay-reconciler")
    assert dep["spec"]["replicas"] == 2
    pod, c = _container("Deployment", "underlay-reconciler")
    assert pod["serviceAccountName"] == "underlay-reconciler"
    sc, psc = c["securityContext"], pod["securityContext"]
    assert psc["runAsNonRoot"] and psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    # the args are a valid underlay command line, with leader election and the probe port
    args = cli.build_parser().parse_args(_expand(c["args"], c["env"]))
    assert args.command == "reconcile" and args.leader_elect and args.log_format == "json"
    port = int(args.http_address.rsplit(":", 1)[1])
    (p,) = c["ports"]
    assert p["containerPort"] == port and p["name"] == "http"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert {e["name"] for e in c["env"]} >= {"POD_NAME", "POD_NAMESPACE"}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert str(args.cache_dir) in mounts and "/tmp" in mounts, "writable dirs on a read-only root"
    # a clean stop finishes the pass and releases the Lease within the grace period
    assert pod["terminationGracePeriodSeconds"] >= 30
    pdb = find("PodDisruptionBudget", "underlay-reconciler")
    assert pdb["spec"]["minAvailable"] == 1
    svc = find("Service", "underlay-reconciler-metrics")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_agent_daemonset() -> None:
    pod, c = _container("DaemonSet", "underlay-agent")
    assert pod["hostNetwork"] and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert c["securityContext"]["privileged"]
    assert pod["serviceAccountName"] == "underlay-agent"
    assert {"operator": "Exists"} in pod["tolerations"]
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    required = {
        "/var/run/openvswitch",
        "/etc/netplan",
        "/etc/NetworkManager",
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/run/underlay",
    }
    assert required <= set(host.values())
    args = cli.build_parser().parse_args(_expand(c["args"], c["env"]))
    assert args.command == "agent"
    # probes on the agent's --http-address: the node's loopback (hostNetwork: any other address
    # is open to the node's LAN), where the kubelet, on the node, asks
    probe_host, _, port_text = args.http_address.rpartition(":")
    port = int(port_text)
    assert probe_host == "127.0.0.1", "the probe endpoint must not be bound to the node's LAN"
    (p,) = c["ports"]
    assert p["name"] == "http" and p["containerPort"] == port and "hostPort" not in p
    live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
    assert live == {"host": probe_host, "path": "/healthz", "port": "http"}
    assert ready == {"host": probe_host, "path": "/readyz", "port": "http"}
    assert not args.metrics_address and args.cni_managed_bridges_only
    live = c["livenessProbe"]
    # a liveness check (CNI call up to 2 s) fits its timeout; a restart needs a minute of failures
    assert live["timeoutSeconds"] >= 3 and live["periodSeconds"] * live["failureThreshold"] >= 60

    def mounted(path: str) -> bool:
        return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts.values())

    assert mounted(args.ovsdb.removeprefix("unix:")), "OVSDB socket not mounted"
    assert mounted(args.socket), "CNI socket directory not mounted"
    assert mounted(str(args.cni_bin_dir))
    root = str(args.root)
    for node_path in ("/etc/netplan", "/etc/NetworkManager", "/etc/cni/net.d", "/var/lib/underlay"):
        assert mounted(root.rstrip("/") + node_path), f"{node_path} not under --root {root}"
        name = next(n for n, m in mounts.items() if m == root.rstrip("/") + node_path)
        assert host[name] == node_path, "mounted from the same host path"


def _dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_pinned_and_non_root() -> None:
    ins = _dockerfile()
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    froms = [rest for i, rest in ins if i == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    for f in froms:
        image = f.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), image
    stages = [f.split()[-1] for f in froms if " AS " in f.upper()]
    assert any(i == "COPY" and rest.startswith("--from=") for i, rest in ins)
    assert all(rest.split("=")[1].split()[0] in stages for i, rest in ins
               if i == "COPY" and rest.startswith("--from="))  # fmt: skip
    # every COPY source exists, and the build stage copies every package directory
    copied = set()
    for i, rest in ins:
        if i == "COPY" and not rest.startswith("--from"):
            *srcs, _dest = shlex.split(rest)
            for s in srcs:
                assert (ROOT / s).exists(), f"COPY {s}: no such file"
                copied.add(s.rstrip("/"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setup = project["tool"]["setuptools"]

    def package_dir(pkg: str) -> str:  # setuptools: the longest mapped parent package wins
        parts = pkg.split(".")
        for n in range(len(parts), 0, -1):
            base = setup["package-dir"].get(".".join(parts[:n]))
            if base is not None:
                return "/".join([base, *parts[n:]])
        return "/".join(parts)

    dirs = {package_dir(p) for p in setup["packages"]}
    assert all((ROOT / d).is_dir() for d in dirs)
    for d in dirs:
        assert any(d == c or d.startswith(c + "/") for c in copied), f"{d} not copied"
    assert "pyproject.toml" in copied and project["project"]["readme"] in copied
    # runtime: non-root numeric user (the Deployment's), entrypoint a console script
    user = [rest for i, rest in ins if i == "USER"][-1]
    uid = int(user.split(":")[0])
    assert uid != 0
    _pod, _c = _container("Deployment", "underlay-reconciler")
    assert _pod["securityContext"]["runAsUser"] == uid
    (entry,) = [rest for i, rest in ins if i == "ENTRYPOINT"]
    assert yaml.safe_load(entry)[0] in project["project"]["scripts"]
    for i, rest in ins:
        assert i != "ADD", "COPY, not ADD"
        if i == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists" in rest
        if i == "RUN" and "pip install" in rest:
            assert "--no-cache-dir" in rest
    runtime = " ".join(
        rest for i, rest in ins[[x[0] for x in ins].index("FROM", 1) :] if i == "RUN"
    )
    for tool in ("git", "openssh-client", "gnupg", "ca-certificates"):
        assert tool in runtime, f"the reconciler's source stage needs {tool}"
