"""Test controls: fault injection (status codes, hangs, dropped connections) and the request
log, through the Python API and the HTTP control endpoints."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from tests.kube.emulator import Emulator
from tests.kube.helpers import GROUP, Kube, clients, crd, status_of, widget


@pytest.fixture
def kube(apiserver: Emulator) -> Kube:
    k = clients(apiserver)
    k.apiext.create_custom_resource_definition(crd())
    return k


def _control(emu: Emulator, method: str, what: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{emu.url}/__emulator/{what}", data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())


def test_injected_status_codes(apiserver: Emulator, kube: Kube) -> None:
    ws = kube.widgets()
    ws.create(widget("w1"))
    apiserver.inject_fault(r"/widgets/w1$", method="GET", status=503)
    with pytest.raises(ApiException) as ei:
        ws.get("w1")
    st = status_of(ei.value)
    assert st["reason"] == "ServiceUnavailable" and st["code"] == 503
    assert ws.get("w1")["metadata"]["name"] == "w1"  # only the next matching request failed
    apiserver.inject_fault(r"/widgets", method="PUT", status=500, count=2)
    cur = ws.get("w1")
    for _ in range(2):
        with pytest.raises(ApiException) as ei:
            ws.replace("w1", cur)
        assert ei.value.status == 500 and status_of(ei.value)["reason"] == "InternalError"
    ws.replace("w1", dict(cur, spec={"bridge": "br1", "mtu": 1400}))
    apiserver.inject_fault(r"/widgets", status=429, retry_after=3)
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(
            f"{apiserver.url}/apis/{GROUP}/v1/namespaces/default/widgets", timeout=5
        )
    assert he.value.code == 429 and he.value.headers["Retry-After"] == "3"
    st = json.loads(he.value.read())
    assert st["reason"] == "TooManyRequests" and st["details"] == {"retryAfterSeconds": 3}
    # urllib3 (under the kubernetes client) honours Retry-After on 429 and tries again
    apiserver.reset_requests()
    apiserver.inject_fault(r"/widgets", status=429, retry_after=0)
    assert ws.list()["items"]
    assert [r.code for r in apiserver.requests()] == [429, 200]
    assert apiserver.faults() == []


def test_hang_makes_clients_time_out_while_the_write_still_happens(
    apiserver: Emulator, kube: Kube
) -> None:
    ws = kube.widgets()
    apiserver.inject_fault(r"/widgets$", method="POST", hang=1.0)
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        ws.create(widget("slow"), _request_timeout=0.3)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            ws.get("slow")
            break
        except ApiException:
            time.sleep(0.05)
    assert ws.get("slow")["metadata"]["name"] == "slow"  # the server finished the request anyway
    (rec,) = apiserver.requests("POST", path="/widgets$")
    assert rec.fault == "hang" and rec.code == 201
    apiserver.inject_fault(r"/widgets/slow$", method="GET", hang=1.0, status=504, count=5)
    with pytest.raises(urllib3.exceptions.MaxRetryError):  # urllib3 retries idempotent reads
        kube.custom.get_namespaced_custom_object(
            GROUP, "v1", "default", "widgets", "slow", _request_timeout=0.2
        )
    apiserver.clear_faults()


def test_dropped_connection(apiserver: Emulator, kube: Kube) -> None:
    ws = kube.widgets()
    apiserver.inject_fault(r"/widgets$", method="POST", drop=True)
    with pytest.raises(urllib3.exceptions.ProtocolError):
        ws.create(widget("lost"))
    with pytest.raises(ApiException) as ei:
        ws.get("lost")
    assert ei.value.status == 404  # the request never reached the store
    (rec,) = apiserver.requests("POST", path="/widgets$")
    assert rec.code == 0 and rec.fault == "drop"
    ws.create(widget("lost"))


def test_http_control_endpoints(apiserver: Emulator, kube: Kube) -> None:
    code, body = _control(
        apiserver,
        "POST",
        "faults",
        {"method": "GET", "path": "/widgets$", "status": 503, "count": 1},
    )
    assert code == 201 and body["fault"]["status"] == 503
    assert _control(apiserver, "GET", "faults")[1]["faults"][0]["path"] == "/widgets$"
    with pytest.raises(ApiException) as ei:
        kube.widgets().list()
    assert ei.value.status == 503
    _control(apiserver, "POST", "faults", {"path": "/widgets$", "status": 500, "count": 5})
    _control(apiserver, "DELETE", "faults")
    kube.widgets().list()
    _, body = _control(apiserver, "GET", "requests")
    last = body["requests"][-1]
    assert (
        last["method"] == "GET" and last["path"] == f"/apis/{GROUP}/v1/namespaces/default/widgets"
    )
    assert last["code"] == 200
    _control(apiserver, "DELETE", "requests")
    assert _control(apiserver, "GET", "requests")[1]["requests"] == []
    code, body = _control(apiserver, "GET", "healthz")
    assert code == 200 and body["status"] == "ok"


def test_request_log(apiserver: Emulator, kube: Kube) -> None:
    apiserver.reset_requests()
    ws = kube.widgets()
    ws.create(widget("w1"))
    ws.list(label_selector="a=b")
    ws.patch("w1", {"spec": {"mtu": 1400}}, field_manager="me")
    with pytest.raises(ApiException):
        ws.get("nope")
    recs = apiserver.requests()
    assert [(r.method, r.code) for r in recs] == [
        ("POST", 201),
        ("GET", 200),
        ("PATCH", 200),
        ("GET", 404),
    ]
    assert recs[1].params == {"labelSelector": "a=b"} and recs[1].query == "labelSelector=a%3Db"
    assert (
        recs[2].content_type == "application/merge-patch+json"
        and recs[2].params["fieldManager"] == "me"
    )
    assert recs[0].user_agent.startswith("OpenAPI-Generator/")
    assert [r.method for r in apiserver.requests(writes=True)] == ["POST", "PATCH"]
    assert len(apiserver.requests("GET", path="/nope$")) == 1
    apiserver.reset_requests()
    assert apiserver.requests() == []
