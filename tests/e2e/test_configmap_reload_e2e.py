"""Policy updates the way the kubelet applies a ConfigMap change, under load through a real Envoy.

The kubelet writes the new files into a fresh hidden timestamped folder, points a temporary symlink
at it, renames that over ``..data`` (one atomic step) and then removes the old folder; the visible
file names are symlinks through ``..data``. While a bounded load runs, no request may fail or be
decided by anything but the old or the new policy, and the new one must be in effect within 2 s.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

HOST = "reload.example.com"


def _policy(version: int) -> dict[str, str]:
    """v1 and v2 of the ConfigMap: items are readable in both (tagged with the version); /api/new only in v2."""
    items = f"""\
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata:
  name: items
spec:
  match:
    hosts: [{HOST}]
    paths: [/api/items]
  rules:
    - {{name: no-deletes, when: "request.method == 'DELETE'", decision: deny}}
    - {{name: reads, when: "request.method == 'GET'", decision: allow}}
  response:
    headers:
      x-policy-version: "'{version}'"
"""
    files = {"items.yaml": items}
    if version == 2:
        files["new.yaml"] = f"""\
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata:
  name: new-api
spec:
  match:
    hosts: [{HOST}]
    paths: [/api/new]
  rules:
    - {{name: reads, when: "request.method == 'GET'", decision: allow}}
"""
    return files


class KubeletVolume:
    """A ConfigMap volume: visible names -> ..data/<name>, ..data -> ..<timestamp>/ (swapped atomically)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.current: Path | None = None
        self.serial = 0

    def publish(self, files: dict[str, str]) -> None:
        self.serial += 1
        stamp = self.root / f"..2026_01_0{self.serial}_00_00_00.{self.serial:09d}"
        stamp.mkdir()
        for name, text in files.items():
            (stamp / name).write_text(text)
        tmp = self.root / "..data_tmp"
        os.symlink(stamp.name, tmp)
        os.rename(tmp, self.root / "..data")  # the atomic swap
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        if self.current is not None:
            shutil.rmtree(self.current)
        self.current = stamp


@dataclass
class Outcome:
    started: float
    finished: float
    kind: str
    status: int
    version: str | None


def _request(port: int, method: str, path: str) -> tuple[int, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers={"Host": HOST})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    version = None
    if response.status == 200 and path == "/api/items":
        version = json.loads(body)["headers"].get("x-policy-version", [None])[0]
    return response.status, version


def test_kubelet_symlink_swap_under_load(tmp_path, extauthz_factory, envoy_factory, echo_upstream) -> None:
    volume = KubeletVolume(tmp_path / "policies")
    volume.publish(_policy(1))
    sidecar = extauthz_factory(volume.root, extra_args=["--decision-log", "off"])
    envoy = envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port)

    outcomes: list[Outcome] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    kinds = [("read", "GET", "/api/items"), ("delete", "DELETE", "/api/items"), ("new", "GET", "/api/new")]

    def client(offset: int) -> None:
        for i in range(2000):  # bounded in count ...
            if stop.is_set():  # ... and in time
                return
            kind, method, path = kinds[(i + offset) % len(kinds)]
            started = time.monotonic()
            try:
                status, version = _request(envoy.port, method, path)
            except Exception as exc:  # anything (a torn answer, a bad body) is a failed request, not a dead thread
                with lock:
                    errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                outcomes.append(Outcome(started, time.monotonic(), kind, status, version))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        swapped = time.monotonic()
        volume.publish(_policy(2))
        time.sleep(3.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)

    assert not errors, errors[:5]
    assert len(outcomes) > 100, "the load ran"
    before = [o for o in outcomes if o.finished < swapped]
    assert before and all(o.version in (None, "1") for o in before)
    # Every request got the answer of v1 or of v2, nothing else.
    for o in outcomes:
        if o.kind == "read":
            assert o.status == 200 and o.version in ("1", "2"), o
        elif o.kind == "delete":
            assert o.status == 403, o
        else:
            assert o.status in (200, 403), o
    # v2 takes over within 2 s and, once it has answered, v1 never answers a later request.
    first_v2 = min(o.finished for o in outcomes if o.version == "2" or (o.kind == "new" and o.status == 200))
    assert first_v2 - swapped <= 2.0, f"new policy took {first_v2 - swapped:.2f}s"  # default --reload-interval 1s
    print(f"new policy in effect {first_v2 - swapped:.2f}s after the swap; {len(outcomes)} requests")
    late = [o for o in outcomes if o.started > first_v2]
    assert late and all(o.version in (None, "2") for o in late)
    assert all(o.status == 200 for o in late if o.kind == "new")
    assert all(o.status == 403 for o in outcomes if o.kind == "new" and o.finished < swapped)
    readiness = json.loads(_procs_get(sidecar.http_port, "/readyz"))
    assert readiness["generation"] == 2 and readiness["last_reload"]["ok"] is True


def _procs_get(port: int, path: str) -> bytes:
    import _procs

    status, body = _procs.http_get("127.0.0.1", port, path)
    assert status == 200
    return body


def _rejections(port: int) -> float:
    for line in _procs_get(port, "/metrics").decode().splitlines():
        if line.startswith('extauthz_policy_reloads_total{result="error"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_half_written_update_keeps_the_last_good_set(tmp_path, extauthz_factory, envoy_factory, echo_upstream,
                                                       yaml_bomb) -> None:
    """An empty or comment-only file (a ConfigMap update caught half-way), a YAML bomb, or a folder
    named like a policy file is refused; the old set keeps deciding; a valid update goes live."""
    volume = KubeletVolume(tmp_path / "policies")
    volume.publish(_policy(1))
    sidecar = extauthz_factory(volume.root, extra_args=["--decision-log", "off", "--reload-interval", "0.2"])
    envoy = envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port)
    assert _request(envoy.port, "GET", "/api/items") == (200, "1")

    def refused(change, expected: str) -> None:
        before = _rejections(sidecar.http_port)
        change()
        deadline = time.monotonic() + 10
        while _rejections(sidecar.http_port) == before:
            assert time.monotonic() < deadline, f"no rejection for {expected!r}"
            time.sleep(0.1)
        readiness = json.loads(_procs_get(sidecar.http_port, "/readyz"))
        assert readiness["generation"] == 1 and readiness["last_reload"]["ok"] is False
        assert any(expected in error for error in readiness["last_reload"]["errors"]), readiness
        assert _request(envoy.port, "GET", "/api/items") == (200, "1")  # the last good set decides
        assert _request(envoy.port, "DELETE", "/api/items")[0] == 403

    v1 = _policy(1)
    refused(lambda: volume.publish({**v1, "new.yaml": ""}), "new.yaml: document 0: holds no documents")
    refused(lambda: volume.publish({**v1, "new.yaml": "# new-api: coming\n---\n"}), "holds no documents")
    refused(lambda: volume.publish({**v1, "new.yaml": yaml_bomb(levels=10)}),
            "new.yaml:1: document 1: YAML anchors are not allowed")
    refused(lambda: (volume.root / "extra.yaml").mkdir(), "extra.yaml: document 0: is a folder")
    (volume.root / "extra.yaml").rmdir()
    volume.publish(_policy(2))
    deadline = time.monotonic() + 10
    while _request(envoy.port, "GET", "/api/new")[0] != 200:
        assert time.monotonic() < deadline, "v2 never went live"
        time.sleep(0.1)
    readiness = json.loads(_procs_get(sidecar.http_port, "/readyz"))
    assert readiness["generation"] == 2 and readiness["last_reload"]["ok"] is True
