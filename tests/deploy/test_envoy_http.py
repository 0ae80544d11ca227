"""deploy/envoy/envoy-http.yaml (Envoy's HTTP ext_authz mode), checked offline and with the real Envoy.

The real binary validates it; its header matchers are what scripts/envoy_header_regex.py generates and
accept/refuse what they should under RE2 (Envoy's engine); the headers Envoy sets for the sidecar are the
ones the sidecar reads, none of them can come from the client; and everything that is not the ext_authz
transport is the same as in deploy/envoy/envoy.yaml.
"""

from __future__ import annotations

import copy
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import re2
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRPC_YAML = ROOT / "deploy" / "envoy" / "envoy.yaml"
HTTP_YAML = ROOT / "deploy" / "envoy" / "envoy-http.yaml"

sys.path.insert(0, str(ROOT / "scripts"))
import envoy_header_regex  # noqa: E402

from extauthz.dev.envoy import envoy_binary  # noqa: E402


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    listener = next(x for x in config["static_resources"]["listeners"] if x["name"] == "ingress_http")
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def _authz(config: dict[str, Any]) -> dict[str, Any]:
    return next(f for f in _hcm(config)["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")["typed_config"]


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return _load(HTTP_YAML)


def test_the_real_envoy_accepts_it() -> None:
    res = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(HTTP_YAML)], capture_output=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout.decode()[-3000:] + res.stderr.decode()[-3000:]


def test_fail_closed_and_the_body_as_in_grpc_mode(config) -> None:
    http, grpc = _authz(config), _authz(_load(GRPC_YAML))
    assert "grpc_service" not in http
    assert http["failure_mode_allow"] is False
    assert http["status_on_error"] == {"code": 503}
    assert http["http_service"]["server_uri"]["timeout"] == grpc["grpc_service"]["timeout"]
    grpc_body = {k: v for k, v in grpc["with_request_body"].items() if k != "pack_as_bytes"}  # gRPC-only
    assert http["with_request_body"] == grpc_body
    assert http["validate_mutations"] is True


def test_everything_but_the_authz_transport_is_the_deployed_grpc_configuration(config) -> None:
    """A fix to envoy.yaml's listener, route or app cluster must reach envoy-http.yaml too."""
    http, grpc = copy.deepcopy(config), _load(GRPC_YAML)
    for cfg in (http, grpc):
        hcm = _hcm(cfg)
        hcm["http_filters"] = [f["name"] for f in hcm["http_filters"]]
        hcm["access_log"][0]["typed_config"]["log_format"]["json_format"] = {
            k: v for k, v in hcm["access_log"][0]["typed_config"]["log_format"]["json_format"].items()
            if not k.startswith("authz_")}
        hcm["route_config"].pop("request_headers_to_remove", None)
        cfg["static_resources"]["clusters"] = [c for c in cfg["static_resources"]["clusters"]
                                               if c["name"] not in ("ext_authz", "sidecar_grpc")]
        # the access log of outcomes goes to the sidecar's gRPC port: the ext_authz cluster in gRPC
        # mode, a cluster of its own (sidecar_grpc) in HTTP mode
        for log in hcm["access_log"]:
            if log["name"] == "envoy.access_loggers.http_grpc":
                log["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = "sidecar"
        cfg.pop("layered_runtime", None)
    assert http == grpc


def test_the_outcomes_log_reaches_the_sidecars_grpc_port(config) -> None:
    """Envoy's gRPC Access Log Service cannot ride the HTTP/1.1 authorization cluster."""
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    log = next(a for a in _hcm(config)["access_log"] if a["name"] == "envoy.access_loggers.http_grpc")
    cluster = clusters[log["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]]
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    grpc = next(c for c in _load(GRPC_YAML)["static_resources"]["clusters"] if c["name"] == "ext_authz")
    assert address == grpc["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]


def test_the_access_log_reads_the_metadata_the_headers_become(config) -> None:
    fields = _hcm(config)["access_log"][0]["typed_config"]["log_format"]["json_format"]
    metadata = _authz(config)["http_service"]["authorization_response"]["dynamic_metadata_from_headers"]
    prefixes = [p["prefix"] for p in metadata["patterns"]]
    for key in ("authz_decision_id", "authz_policy", "authz_rule", "authz_reason"):
        name = fields[key].removeprefix("%DYNAMIC_METADATA(envoy.filters.http.ext_authz:").removesuffix(")%")
        assert any(name.startswith(p) for p in prefixes), (key, name)


def _headers_to_add(config: dict[str, Any]) -> dict[str, str]:
    entries = _authz(config)["http_service"]["authorization_request"]["headers_to_add"]
    return {e["key"]: e["value"] for e in entries}


def test_the_headers_envoy_sets_for_the_sidecar_can_never_come_from_the_client(config) -> None:
    """Envoy skips a headers_to_add entry whose value is empty (no client certificate, no SNI) and would
    then pass the client's own header of that name: every value has a constant prefix (never empty), and
    disallowed_headers drops every such name from the client's headers as well."""
    authz = _authz(config)
    added = _headers_to_add(config)
    disallowed = [p["prefix"] for p in authz["disallowed_headers"]["patterns"]]
    for name, value in added.items():
        assert any(name.startswith(p) for p in disallowed), name
        assert value.startswith("v1:%") and value.endswith("%"), (name, value)
    # ...and the application never sees the client's copy either.
    assert sorted(_hcm(config)["route_config"]["request_headers_to_remove"]) == sorted(added)
    # Every other header reaches the sidecar: a policy may read any of them.
    assert authz["allowed_headers"] == {"patterns": [{"safe_regex": {"regex": ".*"}}]}


def test_the_headers_envoy_sets_are_the_ones_the_sidecar_reads(config) -> None:
    from extauthz import request

    every = {**request.ENVOY_HEADERS, **request.ENVOY_OPTIONAL_HEADERS}  # the optional ones too: recommended
    assert _headers_to_add(config) == {name: request.ENVOY_VALUE_PREFIX + formatter for name, formatter in every.items()}


def _matcher(config: dict[str, Any], field: str) -> str:
    patterns = _authz(config)["http_service"]["authorization_response"][field]["patterns"]
    assert len(patterns) == 1
    return patterns[0]["safe_regex"]["regex"]


@pytest.mark.parametrize(("field", "excluded"), [
    ("allowed_upstream_headers", envoy_header_regex.UPSTREAM_EXCLUDED),
    ("allowed_client_headers", envoy_header_regex.CLIENT_EXCLUDED),
])  # fmt: skip
def test_response_matchers_are_every_name_but_the_excluded(config, field: str, excluded: tuple[str, ...]) -> None:
    regex = _matcher(config, field)
    assert regex == envoy_header_regex.all_but(excluded), "regenerate: python scripts/envoy_header_regex.py"
    compiled = re2.compile(regex)

    def allowed(name: str) -> bool:
        return name not in excluded and not name.startswith(envoy_header_regex.EXCLUDED_PREFIXES)

    for name in excluded:
        assert not compiled.fullmatch(name), name
    for name in ("x-extauthz-policy", "x-extauthz-decision-id", "x-envoy-auth-headers-to-remove", ":status"):
        assert not compiled.fullmatch(name), name
    for name in ("x-user", "x-caller", "authorization", "www-authenticate", "retry-after", "accept-signature",
                 "x-envoy", "x-extauthz", "x-e", "hosts", "contents", "c", "t", "te2", "ratelimit-remaining"):
        assert bool(compiled.fullmatch(name)) == allowed(name), name
    # Every prefix of an excluded name, every one-character change, and random names.
    rng = random.Random(20)
    alphabet = "abcdefghijklmnopqrstuvwxyz-0123456789:_"
    samples = set()
    for word in (*excluded, *envoy_header_regex.EXCLUDED_PREFIXES):
        for i in range(len(word) + 1):
            samples.add(word[:i])
            for char in "ax-:":
                samples.add(word[:i] + char + word[i + 1:])
                samples.add(word[:i] + char + word[i:])
    samples |= {"".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(3000)}
    samples.discard("")
    for name in samples:
        assert bool(compiled.fullmatch(name)) == allowed(name), name


def test_the_rate_limit_headers_go_to_the_client_on_success_only(config) -> None:
    response = _authz(config)["http_service"]["authorization_response"]
    on_success = {p["exact"] for p in response["allowed_client_headers_on_success"]["patterns"]}
    assert on_success == {"ratelimit", "ratelimit-policy"}
    upstream = re2.compile(_matcher(config, "allowed_upstream_headers"))
    assert not any(upstream.fullmatch(name) for name in on_success)
