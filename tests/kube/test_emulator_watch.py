"""LIST + WATCH with resourceVersion, 410 Gone, selectors, bookmarks and timeouts, through
``kubernetes.watch.Watch().stream``."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from tests.kube.emulator import Emulator
from tests.kube.helpers import GROUP, Kube, clients, crd, widget


@pytest.fixture
def kube(apiserver: Emulator) -> Kube:
    k = clients(apiserver)
    k.apiext.create_custom_resource_definition(crd())
    return k


def _collect(
    stream: Iterator[dict[str, Any]], w: watch.Watch, n: int
) -> list[tuple[str, str, str]]:
    out = []
    for ev in stream:
        obj = ev["raw_object"]
        out.append(
            (ev["type"], obj["metadata"].get("name", ""), obj["metadata"]["resourceVersion"])
        )
        if len(out) == n:
            w.stop()
    return out


def _widget_stream(kube: Kube, w: watch.Watch, **kw: Any) -> Iterator[dict[str, Any]]:
    kw.setdefault("timeout_seconds", 10)
    return w.stream(
        kube.custom.list_namespaced_custom_object, GROUP, "v1", "default", "widgets", **kw
    )


def test_watch_from_list_resource_version_sees_every_later_change(kube: Kube) -> None:
    ws = kube.widgets()
    ws.create(widget("w1"))
    ws.create(widget("w2"))
    listed = ws.list()
    rv = listed["metadata"]["resourceVersion"]
    m = ws.patch("w1", {"spec": {"mtu": 1400}})
    a = ws.create(widget("w3"))
    d = ws.delete("w2")
    w = watch.Watch()
    events = _collect(_widget_stream(kube, w, resource_version=rv), w, 3)
    assert events == [
        ("MODIFIED", "w1", m["metadata"]["resourceVersion"]),
        ("ADDED", "w3", a["metadata"]["resourceVersion"]),
        ("DELETED", "w2", d["metadata"]["resourceVersion"]),
    ]
    assert int(d["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])


def test_watch_without_resource_version_starts_with_current_state(kube: Kube) -> None:
    ws = kube.widgets()
    ws.create(widget("w1"))
    ws.create(widget("w2"))
    w = watch.Watch()
    stream = _widget_stream(kube, w)
    first = [next(stream), next(stream)]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in first] == [
        ("ADDED", "w1"),
        ("ADDED", "w2"),
    ]
    threading.Timer(0.2, lambda: ws.create(widget("w3"))).start()
    live = next(stream)
    w.stop()
    assert (live["type"], live["object"]["metadata"]["name"]) == ("ADDED", "w3")
    w0 = watch.Watch()  # "0" means "any": the same synthetic ADDED events
    got = _collect(_widget_stream(kube, w0, resource_version="0"), w0, 3)
    assert [e[0] for e in got] == ["ADDED"] * 3


def test_watch_from_compacted_resource_version_is_410(apiserver: Emulator, kube: Kube) -> None:
    ws = kube.widgets()
    old = ws.create(widget("w1"))["metadata"]["resourceVersion"]
    ws.patch("w1", {"spec": {"mtu": 1400}})
    apiserver.compact()
    with pytest.raises(ApiException) as ei:
        list(_widget_stream(kube, watch.Watch(), resource_version=old, timeout_seconds=2))
    assert ei.value.status == 410 and "Expired" in str(ei.value.reason)
    url = f"{apiserver.url}/apis/{GROUP}/v1/namespaces/default/widgets?watch=true&resourceVersion={old}"
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        lines = [json.loads(x) for x in r.read().splitlines() if x.strip()]
    assert lines == [{
        "type": "ERROR",
        "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f"too old resource version: {old} ({apiserver.resource_version + 1})",
            "reason": "Expired", "code": 410,
        },
    }]  # fmt: skip
    # a watch from the current resourceVersion is fine after compaction
    current = ws.list()["metadata"]["resourceVersion"]
    w = watch.Watch()
    threading.Timer(0.2, lambda: ws.create(widget("w2"))).start()
    assert _collect(_widget_stream(kube, w, resource_version=current), w, 1)[0][:2] == (
        "ADDED",
        "w2",
    )


def test_bounded_history_expires_old_versions() -> None:
    emu = Emulator(history_size=5)
    emu.start()
    try:
        import tempfile

        emu.write_kubeconfig(tempfile.mkdtemp() + "/kc")
        kube = clients(emu)
        start = kube.core.list_namespaced_config_map("default").metadata.resource_version
        for i in range(10):
            kube.core.create_namespaced_config_map("default", {"metadata": {"name": f"c{i}"}})
        with pytest.raises(ApiException) as ei:
            list(
                watch.Watch().stream(
                    kube.core.list_namespaced_config_map,
                    "default",
                    resource_version=start,
                    timeout_seconds=2,
                )
            )
        assert ei.value.status == 410
    finally:
        emu.stop()


def test_watch_selectors_and_objects_moving_in_and_out(kube: Kube) -> None:
    ws = kube.widgets()
    rv = ws.list()["metadata"]["resourceVersion"]
    a = widget("a")
    a["metadata"]["labels"] = {"team": "net"}
    ws.create(a)
    ws.create(widget("b"))
    ws.patch("b", {"metadata": {"labels": {"team": "net"}}})  # enters the selection
    ws.patch("a", {"metadata": {"labels": {"team": "db"}}})  # leaves it
    ws.patch("a", {"spec": {"mtu": 1400}})  # invisible
    ws.patch("b", {"spec": {"mtu": 1400}})
    w = watch.Watch()
    got = [
        (t, n)
        for t, n, _ in _collect(
            _widget_stream(kube, w, resource_version=rv, label_selector="team=net"), w, 4
        )
    ]
    assert got == [("ADDED", "a"), ("ADDED", "b"), ("DELETED", "a"), ("MODIFIED", "b")]


def test_typed_watch_with_field_selector(kube: Kube) -> None:
    rv = kube.core.list_pod_for_all_namespaces().metadata.resource_version
    for name, node in (("p1", "n1"), ("p2", "n2")):
        kube.core.create_namespaced_pod("default", {
            "metadata": {"name": name}, "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
        })  # fmt: skip
    w = watch.Watch()
    events = []
    for ev in w.stream(
        kube.core.list_pod_for_all_namespaces,
        field_selector="spec.nodeName=n2",
        resource_version=rv,
        timeout_seconds=5,
    ):
        events.append(ev)
        w.stop()
    assert events[0]["type"] == "ADDED"
    assert events[0]["object"].metadata.name == "p2"  # deserialized into V1Pod
    assert events[0]["object"].spec.node_name == "n2"


def test_bookmarks(tmp_path: Any) -> None:
    emu = Emulator(bookmark_interval=0.2)
    emu.start()
    try:
        emu.write_kubeconfig(tmp_path / "kc")
        kube = clients(emu)
        rv = kube.core.list_namespaced_config_map("default").metadata.resource_version
        kube.core.create_namespaced_config_map("default", {"metadata": {"name": "c"}})
        w = watch.Watch()
        seen = []
        for ev in w.stream(kube.core.list_namespaced_config_map, "default", resource_version=rv,
                           allow_watch_bookmarks=True, timeout_seconds=5):  # fmt: skip
            seen.append(ev)
            if ev["type"] == "BOOKMARK":
                w.stop()
        assert [e["type"] for e in seen] == ["ADDED", "BOOKMARK"]
        bm = seen[1]["raw_object"]
        assert bm["kind"] == "ConfigMap" and bm["apiVersion"] == "v1"
        assert bm["metadata"]["resourceVersion"] == str(emu.resource_version)
        assert w.resource_version == str(emu.resource_version)
        # without allowWatchBookmarks there are none
        w2 = watch.Watch()
        quiet = list(w2.stream(kube.core.list_namespaced_config_map, "default",
                               resource_version=str(emu.resource_version), timeout_seconds=1))  # fmt: skip
        assert quiet == []
    finally:
        emu.stop()


def test_timeout_seconds_ends_the_stream(kube: Kube) -> None:
    start = time.monotonic()
    events = list(
        _widget_stream(
            kube,
            watch.Watch(),
            resource_version=kube.widgets().list()["metadata"]["resourceVersion"],
            timeout_seconds=1,
        )
    )
    assert events == []
    assert time.monotonic() - start < 5


def test_send_initial_events_ends_with_annotated_bookmark(apiserver: Emulator, kube: Kube) -> None:
    kube.widgets().create(widget("w1"))
    url = (
        f"{apiserver.url}/apis/{GROUP}/v1/namespaces/default/widgets?watch=1&sendInitialEvents=true"
        "&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1"
    )
    with urllib.request.urlopen(url, timeout=5) as r:
        lines = [json.loads(x) for x in r.read().splitlines() if x.strip()]
    assert lines[0]["type"] == "ADDED" and lines[0]["object"]["metadata"]["name"] == "w1"
    assert lines[1]["type"] == "BOOKMARK"
    assert lines[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_one_object_by_name_path(apiserver: Emulator, kube: Kube) -> None:
    rv = kube.widgets().create(widget("w1"))["metadata"]["resourceVersion"]
    kube.widgets().create(widget("w2"))
    kube.widgets().patch("w1", {"spec": {"mtu": 1400}})
    url = f"{apiserver.url}/apis/{GROUP}/v1/namespaces/default/widgets/w1?watch=true&resourceVersion={rv}&timeoutSeconds=1"
    with urllib.request.urlopen(url, timeout=5) as r:
        lines = [json.loads(x) for x in r.read().splitlines() if x.strip()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [("MODIFIED", "w1")]


def test_stop_ends_open_watches(tmp_path: Any) -> None:
    emu = Emulator()
    emu.start()
    emu.write_kubeconfig(tmp_path / "kc")
    kube = clients(emu)
    done = threading.Event()

    def consume() -> None:
        try:
            for _ in watch.Watch().stream(
                kube.core.list_namespaced_config_map, "default", resource_version="1"
            ):
                pass
        except Exception:
            pass
        done.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    time.sleep(0.3)
    emu.stop()
    assert done.wait(10)


def test_server_side_watch_end_and_close_watches(tmp_path: Any) -> None:
    """Streams end on the server's request timeout or on close_watches(); the client's Watch
    then resumes from the last resourceVersion it saw, losing nothing."""
    emu = Emulator(watch_timeout=0.5)
    emu.start()
    try:
        emu.write_kubeconfig(tmp_path / "kc")
        kube = clients(emu)
        start = time.monotonic()
        assert (
            list(
                kube.core.list_namespaced_config_map(
                    "default", watch=True, _preload_content=False
                ).stream()
            )
            == []
        )
        assert time.monotonic() - start < 5
        emu.watch_timeout = None
        rv = kube.core.list_namespaced_config_map("default").metadata.resource_version
        names: list[str] = []
        w = watch.Watch()

        def consume() -> None:
            for ev in w.stream(
                kube.core.list_namespaced_config_map, "default", resource_version=rv
            ):
                names.append(ev["object"].metadata.name)
                if len(names) == 2:
                    w.stop()

        t = threading.Thread(target=consume)
        t.start()
        assert emu.wait_for_watches(1, "configmaps")
        kube.core.create_namespaced_config_map("default", {"metadata": {"name": "one"}})
        deadline = time.monotonic() + 5
        while not names and time.monotonic() < deadline:
            time.sleep(0.02)
        assert emu.close_watches("configmaps") == 1
        kube.core.create_namespaced_config_map("default", {"metadata": {"name": "two"}})
        t.join(10)
        assert names == ["one", "two"]
    finally:
        emu.stop()
