"""Reaching the emulator from inside rig network namespaces, and running it as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from reconciler import vocab
from tests.kube.emulator import Emulator
from tests.kube.helpers import GROUP, clients, crd
from tests.rig import APISERVER_IP, Rig

ROOT = Path(__file__).resolve().parents[2]

LIST_FROM_NODE = textwrap.dedent(
    """
    import sys
    from kubernetes import client, config
    cfg = client.Configuration()
    config.load_kube_config(config_file=sys.argv[1], client_configuration=cfg)
    core = client.CoreV1Api(client.ApiClient(cfg))
    core.create_namespaced_config_map("default", {"metadata": {"name": "from-node"}, "data": {"k": "v"}})
    print(sorted(n.metadata.name for n in core.list_namespace().items))
    """
)


def test_listener_inside_switch_namespace_serves_the_same_store(
    apiserver: Emulator, rig: Rig, tmp_path: Path
) -> None:
    url = apiserver.listen_in_netns(rig.switch.path, APISERVER_IP, 6443)
    assert url == f"http://{APISERVER_IP}:6443"
    node = rig.add_node("n1", "172.18.10.11", ovs=False)
    out = node.run("curl", "-s", "--max-time", "5", f"{url}/version").stdout
    assert json.loads(out)["gitVersion"].startswith("v1.")
    kc = apiserver.write_kubeconfig(tmp_path / "node-kubeconfig", server_url=url)
    script = tmp_path / "node_client.py"
    script.write_text(LIST_FROM_NODE)
    out = node.run(sys.executable, str(script), str(kc), timeout=60).stdout
    assert "default" in out
    kube = clients(apiserver)  # over 127.0.0.1, same objects
    assert kube.core.read_namespaced_config_map("from-node", "default").data == {"k": "v"}
    # the host's own namespace has no 172.18.0.2
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/version", timeout=1)


def test_listen_in_missing_namespace_names_it(apiserver: Emulator) -> None:
    with pytest.raises(OSError, match="/run/netns/does-not-exist"):
        apiserver.listen_in_netns("/run/netns/does-not-exist", "127.0.0.1", 0)


@pytest.fixture
def process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    crds = tmp_path / "crds"
    crds.mkdir()
    (crds / "widgets.yaml").write_text(yaml.safe_dump(crd()))
    kc = tmp_path / "kubeconfig"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kube.emulator", "--listen", "127.0.0.1:0", "--crds", str(crds),
         "--register-underlay-kinds", "--kubeconfig", str(kc)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    try:
        yield proc, url, kc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


def test_process_mode(process: tuple[subprocess.Popen[str], str, Path]) -> None:
    proc, url, kc = process
    assert url.startswith("http://127.0.0.1:")
    emu = Emulator()  # only to reuse the client helper with the process's kubeconfig
    emu.kubeconfig = kc
    kube = clients(emu)
    assert (
        kube.custom.list_namespaced_custom_object(GROUP, "v1", "default", "widgets")["items"] == []
    )
    for res in vocab.ALL_CUSTOM:
        kube.custom.get_api_resources(res.group, res.version)
        crd_obj = kube.apiext.read_custom_resource_definition(f"{res.plural}.{res.group}")
        assert crd_obj.spec.names.kind == res.kind
    req = urllib.request.Request(
        f"{url}/__emulator/faults",
        data=json.dumps({"path": "/namespaces$", "status": 503}).encode(),
        method="POST",
    )
    assert urllib.request.urlopen(req, timeout=5).status == 201
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as ei:
        kube.core.list_namespace()
    assert ei.value.status == 503
    log = json.loads(urllib.request.urlopen(f"{url}/__emulator/requests", timeout=5).read())[
        "requests"
    ]
    assert log[-1]["code"] == 503 and log[-1]["fault"] == "status 503"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_process_mode_with_netns_listener(rig: Rig, tmp_path: Path) -> None:
    nkc = tmp_path / "node-kubeconfig"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kube.emulator", "--listen", "127.0.0.1:0",
         "--netns-listen", f"{rig.switch.path}:{APISERVER_IP}:6443", "--netns-kubeconfig", str(nkc)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        extra = proc.stdout.readline().split()
        assert url.startswith("http://127.0.0.1:")
        assert extra == ["netns", rig.switch.path, f"http://{APISERVER_IP}:6443"]
        assert (
            yaml.safe_load(nkc.read_text())["clusters"][0]["cluster"]["server"]
            == f"http://{APISERVER_IP}:6443"
        )
        node = rig.add_node("n1", "172.18.10.11", ovs=False)
        out = node.run(
            "curl", "-s", "--max-time", "5", f"http://{APISERVER_IP}:6443/api/v1/namespaces/default"
        ).stdout
        assert json.loads(out)["metadata"]["name"] == "default"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
