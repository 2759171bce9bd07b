"""The test rig's control plane itself: the real binaries, the real version, real RBAC, and a
fault proxy that forwards everything it does not inject."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from kubernetes import client, watch

from reconciler import vocab
from tests.controlplane.cluster import Kube
from tests.rig import wait_for

POOL = vocab.SPIDER_IPPOOL


def pool(name: str) -> dict[str, Any]:
    return {
        "apiVersion": vocab.SPIDERPOOL_API_VERSION,
        "kind": POOL.kind,
        "metadata": {"name": name},
        "spec": {"subnet": "10.20.0.0/16", "ips": ["10.20.0.10-10.20.0.20"]},
    }


def custom(kube: Kube, kubeconfig: Any = None) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube.api_client(kubeconfig or kube.kubeconfig))


def test_version_is_the_built_release(kube: Kube) -> None:
    v = kube.cp.version()
    assert v["gitVersion"].startswith("v1.36."), v
    assert (v["major"], v["minor"]) == ("1", "36")


def test_serviceaccounts_get_exactly_deploy_rbac(kube: Kube) -> None:
    agent = client.CoreV1Api(kube.api_client(kube.agent_kubeconfig()))
    kube.create_node("cp-n1")
    assert agent.read_node("cp-n1").metadata.name == "cp-n1"
    with pytest.raises(client.ApiException) as exc:
        agent.list_namespaced_secret("underlay-system")
    assert exc.value.status == 403
    reconciler = custom(kube, kube.reconciler_kubeconfig())
    reconciler.create_cluster_custom_object(POOL.group, POOL.version, POOL.plural, pool("cp-p1"))
    with pytest.raises(client.ApiException) as exc:
        reconciler.list_namespaced_custom_object(
            vocab.SPIDER_ENDPOINT.group, vocab.SPIDER_ENDPOINT.version, "default",
            vocab.SPIDER_ENDPOINT.plural,
        )  # fmt: skip
    assert exc.value.status == 403


def test_proxy_forwards_and_logs_and_injects(kube: Kube) -> None:
    api = custom(kube)
    api.create_cluster_custom_object(POOL.group, POOL.version, POOL.plural, pool("cp-p2"))
    kube.reset_requests()
    kube.inject_fault(r"/spiderippools/cp-p2$", method="GET", status=409, count=2)
    for _ in range(2):
        with pytest.raises(client.ApiException) as exc:
            api.get_cluster_custom_object(POOL.group, POOL.version, POOL.plural, "cp-p2")
        assert exc.value.status == 409
        assert '"reason":"Conflict"' in (exc.value.body or "")
    got = api.get_cluster_custom_object(POOL.group, POOL.version, POOL.plural, "cp-p2")
    assert got["metadata"]["name"] == "cp-p2"
    codes = [(r.method, r.code, r.fault) for r in kube.requests(path="cp-p2")]
    assert codes == [("GET", 409, "status 409"), ("GET", 409, "status 409"), ("GET", 200, None)]
    assert kube.requests(writes=True) == []

    kube.inject_fault(r"/spiderippools/cp-p2$", method="DELETE", drop_after=True)
    with pytest.raises(Exception):  # noqa: B017 - the client sees a cut connection
        api.delete_cluster_custom_object(
            POOL.group, POOL.version, POOL.plural, "cp-p2", _request_timeout=5
        )
    # ... yet the server deleted it
    with pytest.raises(client.ApiException) as exc:
        kube.custom.get_cluster_custom_object(POOL.group, POOL.version, POOL.plural, "cp-p2")
    assert exc.value.status == 404


def test_proxy_streams_watches_and_can_end_them(kube: Kube) -> None:
    api = custom(kube)
    events: list[tuple[str, str]] = []
    ended = threading.Event()

    def run() -> None:
        w = watch.Watch()
        for ev in w.stream(
            api.list_cluster_custom_object, POOL.group, POOL.version, POOL.plural,
            timeout_seconds=60,
        ):  # fmt: skip
            events.append((ev["type"], ev["object"]["metadata"]["name"]))
        ended.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert kube.wait_for_watches(1, "spiderippools")
    kube.custom.create_cluster_custom_object(POOL.group, POOL.version, POOL.plural, pool("cp-p3"))
    wait_for(lambda: ("ADDED", "cp-p3") in events, 10, "the watch event through the proxy")
    assert kube.close_watches("spiderippools") == 1
    assert ended.wait(10), "the watch did not end when the proxy closed it"


def test_proxy_down_refuses_connections_until_up(kube: Kube) -> None:
    core = client.CoreV1Api(kube.api_client(kube.kubeconfig))
    core.list_namespace()
    kube.proxy.down()
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - connection refused, as from a down server
        core.list_namespace(_request_timeout=3)
    assert time.monotonic() - started < 3
    kube.proxy.up()
    assert core.list_namespace().items
