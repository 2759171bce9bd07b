"""deploy/crds is generated from schemas/ and must not drift from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from reconciler import crdgen, vocab

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_crds_match_the_schemas() -> None:
    for crd in crdgen.generate_all():
        path = ROOT / "deploy" / "crds" / crdgen.file_name(crd)
        assert path.exists(), f"{path} missing: run `underlay crds --out-dir deploy/crds`"
        assert path.read_text() == crdgen.dump(crd), (
            f"{path} is out of date with schemas/: run `underlay crds --out-dir deploy/crds`"
        )


def test_kustomization_lists_every_crd() -> None:
    kust = yaml.safe_load((ROOT / "deploy" / "kustomization.yaml").read_text())
    listed = {r for r in kust["resources"] if r.startswith("crds/")}
    assert listed == {f"crds/{crdgen.file_name(c)}" for c in crdgen.generate_all()}


def test_crds_are_structural() -> None:
    """No JSON-Schema-only keywords survive, and every object node has properties or a rule."""
    forbidden = {"$schema", "$id", "$ref", "$defs", "const", "unevaluatedProperties"}

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            bad = forbidden & node.keys()
            assert not bad, f"{path}: {bad}"
            assert node.get("additionalProperties") is not False, (
                f"{path}: additionalProperties false"
            )
            if "properties" in node:
                assert "additionalProperties" not in node, (
                    f"{path}: properties + additionalProperties"
                )
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    for crd in crdgen.generate_all():
        walk(crd["spec"]["versions"][0]["schema"], crd["metadata"]["name"])


def test_scope_status_and_names_follow_the_vocabulary() -> None:
    by_name = {c["metadata"]["name"]: c for c in crdgen.generate_all()}
    for res in vocab.ALL_CUSTOM:
        crd = by_name[f"{res.plural}.{res.group}"]
        assert crd["spec"]["scope"] == ("Namespaced" if res.namespaced else "Cluster")
        assert ("subresources" in crd["spec"]["versions"][0]) == res.status
        assert crd["spec"]["names"]["kind"] == res.kind
    pool = by_name["spiderippools.spiderpool.spidernet.io"]
    cols = [c["name"] for c in pool["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert cols[:5] == ["VERSION", "SUBNET", "ALLOCATED-IP-COUNT", "TOTAL-IP-COUNT", "DEFAULT"]


def test_crds_out_dir_that_cannot_be_written_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reconciler.cli import main

    blocker = tmp_path / "afile"
    blocker.write_text("")
    assert main(["crds", "--out-dir", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the CRDs into {blocker}: {blocker}: File exists" in err
    assert main(["crds", "--out-dir", str(tmp_path / "new")]) == 0
    assert len(list((tmp_path / "new").glob("*.yaml"))) == len(crdgen.generate_all())
