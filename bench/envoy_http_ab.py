"""What deploy/envoy/envoy-http.yaml's own choices cost Envoy: variants of the deployed file, each in
front of the same allow-all HTTP server (bench/allow_all_http_server.py), loaded in turn by wrk.

    python bench/envoy_http_ab.py [--rounds 5] [--duration 3]

Prints Envoy's CPU time per request (median over interleaved rounds) for: the deployed file; without
the route's request_headers_to_remove; allowed_headers as a list of prefixes instead of the regex
".*"; exact-name response matchers instead of the generated regexes; a single headers_to_add entry
instead of all the trusted headers. Needs wrk. Everything on 127.0.0.1; processes stopped by pid.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "e2e"), str(ROOT / "bench")]

import _procs  # noqa: E402
import run  # noqa: E402


def _authz(config: dict) -> tuple[dict, dict]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm, next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")["typed_config"]


def variants(base: dict) -> dict[str, dict]:
    out = {"deployed": base}
    v = copy.deepcopy(base)
    _authz(v)[0]["route_config"].pop("request_headers_to_remove")
    out["no-route-remove"] = v
    v = copy.deepcopy(base)
    # (no "n" or "y": YAML 1.1 would read those as booleans)
    _authz(v)[1]["allowed_headers"] = {"patterns": [{"prefix": c} for c in "abcdefghijklmopqrstuvwxz0123456789"]}
    out["prefix-list"] = v
    v = copy.deepcopy(base)
    response = _authz(v)[1]["http_service"]["authorization_response"]
    response["allowed_upstream_headers"] = {"patterns": [{"exact": "x-user"}]}
    response["allowed_client_headers"] = {"patterns": [{"exact": "content-type"}]}
    out["exact-response"] = v
    v = copy.deepcopy(base)
    request = _authz(v)[1]["http_service"]["authorization_request"]
    request["headers_to_add"] = request["headers_to_add"][:1]
    out["one-trusted-header"] = v
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    args = p.parse_args(argv)
    if not (1 <= args.rounds <= 20 and 1 <= args.duration <= 60):
        p.error("bounds: 1 <= --rounds <= 20, 1 <= --duration <= 60")
    wrk = shutil.which("wrk")
    if wrk is None:
        p.error("wrk not found (apt-get install -y wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="envoy-http-ab-"))
    allow_all = _procs.start_allow_all(workdir, mode="http")
    envoys: dict[str, _procs.EnvoyProcess] = {}
    try:
        base = _procs.render_envoy_bootstrap(mode="http", ext_authz=allow_all.target, upstream_port=None,
                                             access_log=False)
        for name, config in variants(base).items():
            envoys[name] = _procs.start_envoy(config, workdir / name, name=name, log_level="warning")
        request = run.RequestSpec(headers={"User-Agent": "curl/8", "Accept": "*/*", "X-Tenant": "acme", "Cookie": "a=b"})
        cpu: dict[str, list[float]] = {name: [] for name in envoys}
        for _ in range(args.rounds):
            for name, envoy in envoys.items():
                before = run._cpu_seconds(envoy.proc.pid, with_children=False)
                result = run.run_wrk(wrk, envoy.port, request, 16, args.duration, workdir)
                cpu[name].append((run._cpu_seconds(envoy.proc.pid, with_children=False) - before) / result.requests * 1e6)
        for name, values in cpu.items():
            print(f"{name:<20} Envoy CPU per request, median {statistics.median(values):6.1f} us   "
                  f"rounds {', '.join(f'{x:.1f}' for x in values)}")
    finally:
        for envoy in envoys.values():
            envoy.stop()
        allow_all.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
