"""What the real kube-apiserver admits, against what ``underlay validate`` accepts.

Our JSON Schemas are the single source of truth and ``deploy/crds`` is generated from them, so
the two must agree where it matters: every CRD is admitted as a structural schema, and every
object the validator accepts on its own (schema, metadata and the rules of its kind), rendered
as the reconciler sends it, is admitted by the server (a dry run: nothing is stored). The other way round (the
validator refusing what the server would take) is allowed: the validator knows Spiderpool's
rules, which no CRD schema can say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from reconciler import render, vocab
from reconciler.loader import load_repo
from reconciler.validation import has_errors, validate
from tests.controlplane.cluster import Kube

ROOT = Path(__file__).resolve().parents[2]
REPOS = sorted(
    [p for p in (ROOT / "examples").iterdir() if p.is_dir()]
    + [p for p in (ROOT / "tests" / "bad-repos").iterdir() if p.is_dir()]
)


def _dry_run_create(kube: Kube, res: vocab.Resource, body: dict[str, Any]) -> str | None:
    """None when the server admits ``body`` (create, dryRun=All), else its message."""
    try:
        if res.namespaced:
            ns = body["metadata"].get("namespace") or "default"
            kube.ensure_namespace(ns)
            kube.custom.create_namespaced_custom_object(
                res.group, res.version, ns, res.plural, body, dry_run="All"
            )
        else:
            kube.custom.create_cluster_custom_object(
                res.group, res.version, res.plural, body, dry_run="All"
            )
    except client.ApiException as exc:
        return f"{exc.status} {exc.body}"
    return None


def test_every_crd_is_admitted_as_a_structural_schema(kube: Kube) -> None:
    ext = client.ApiextensionsV1Api(kube.api)
    names = {p.stem for p in (ROOT / "deploy" / "crds").glob("*.yaml")}
    for name in sorted(names):
        crd = ext.read_custom_resource_definition(name)
        conds = {c.type: c for c in crd.status.conditions or []}
        assert conds["Established"].status == "True", (name, conds)
        assert conds["NamesAccepted"].status == "True", (name, conds)
        assert "NonStructuralSchema" not in conds, (name, conds["NonStructuralSchema"].message)


@pytest.mark.parametrize("repo", REPOS, ids=[p.name for p in REPOS])
def test_what_the_validator_accepts_the_server_admits(kube: Kube, repo: Path) -> None:
    loaded = load_repo(repo)
    refused: list[str] = []
    checked = 0
    for doc in loaded.documents:
        if doc.resource not in vocab.USER_KINDS:
            continue
        if has_errors(validate([doc])):
            continue  # the validator stops it before any write; the server may say otherwise
        try:
            desired = render.render([doc])
        except ValueError:
            continue  # not renderable: the validator's semantic rules report it
        for d in desired:
            checked += 1
            why = _dry_run_create(kube, d.resource, d.body)
            if why is not None:
                refused.append(f"{doc.location()} {d.ref()}: {why}")
    assert not refused, "the validator accepts what the real API server refuses:\n" + "\n".join(
        refused
    )
    if repo.parent.name == "examples":
        assert checked >= 4, f"{repo}: expected every example object to be checked"


def test_kustomize_install_is_accepted_by_the_server(kube: Kube) -> None:
    proc = kube.kubectl(
        "apply", "-k", str(ROOT / "deploy"), "--server-side", "--dry-run=server", check=False,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for kind in ("customresourcedefinition.apiextensions.k8s.io/ovsbridges.underlay.dev",
                 "daemonset.apps/underlay-agent", "deployment.apps/underlay-reconciler"):  # fmt: skip
        assert kind in proc.stdout, proc.stdout
