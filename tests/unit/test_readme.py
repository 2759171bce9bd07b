"""README's set-up commands: the first works as written, the second (the control plane's build)
and the third (the test command) are what .ci/run runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_exactly_three_setup_commands() -> None:
    assert len(setup_commands()) == 3


def test_ci_builds_the_control_plane_as_the_readme_says() -> None:
    build = setup_commands()[1].split("#", 1)[0].strip()
    assert build == "tests/controlplane/build.sh"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(rf"\$\({re.escape(build)}\)", ci), f"{build!r} not in .ci/run"


def test_ci_runs_the_readme_test_command() -> None:
    test_cmd = setup_commands()[2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(rf"^\s*{re.escape(test_cmd)}\s*$", ci, re.M), f"{test_cmd!r} not in .ci/run"


def test_plan_of_the_quickstart_prints_every_object_and_exits_0() -> None:
    first = setup_commands()[0]
    assert first.endswith(".venv/bin/underlay plan examples/quickstart")
    underlay = Path(sys.executable).parent / "underlay"
    p = subprocess.run(
        [str(underlay), "plan", "examples/quickstart"],
        cwd=ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "No cluster configured: planning against an empty cluster." in p.stdout
    for ref in (
        "OvsBridge br1",
        "SpiderIPPool ippool-test",
        "SpiderMultusConfig kube-system/ovs-conf",
        "NetworkAttachmentDefinition kube-system/ovs-conf",
    ):
        assert f"+ create    {ref}" in p.stdout
    assert "Plan: 4 to create" in p.stdout
