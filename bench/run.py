"""Side-by-side benchmark: what does the extauthz sidecar cost on top of Envoy?

    python bench/run.py                       # everything, defaults below (~4 minutes)
    python bench/run.py --quick               # 1 round, 3 s per measurement (smoke test)
    python bench/run.py --scenario extauthz --scenario jwt --policies policies/

Scenarios (each gets its own Envoy, --concurrency 1, no access log; all answer with a direct_response
200 so that no upstream app is measured — only the ext_authz filter differs):
  (a) direct      Envoy alone
  (b) allow-all   Envoy + ext_authz -> bench/allow_all_server.py (minimal grpc.aio Check, always OK)
  (c) extauthz    Envoy + ext_authz -> the real sidecar serving --policies (same command as the e2e
                  fixture); more sidecar scenarios are entries in SIDECAR_SCENARIOS (see --list).
                  Every scenario NAME also exists as NAME-http: the same sidecar behind Envoy's HTTP
                  ext_authz mode (deploy/envoy/envoy-http.yaml, serve --http-authz-listen).
  (bh) allow-all-http   Envoy (HTTP ext_authz mode) -> bench/allow_all_http_server.py (uvloop +
                  httptools, 200 with no body): added when an -http scenario runs (or --allow-all-http).
  (b:NAME)        allow-all again, sent exactly the request of sidecar scenario NAME (method, path, host,
                  headers, body) when that request is not the default one (e.g. hmac: a signed POST with
                  a body, which Envoy buffers and sends in a bigger CheckRequest).
Every ext_authz Envoy (allow-all and sidecars) is rendered from the same settings, with_request_body
included, and the harness checks that their ext_authz filters are identical before measuring.

Modes (same load generator for every scenario, scenarios alternate, median over --rounds):
  throughput  closed loop, --connections keep-alive connections, --duration s after --warmup s;
              wrk if installed (apt-get install wrk), else a Python asyncio closed-loop generator.
  rate        open loop at --rate req/s (Python asyncio, keep-alive connections, latency measured
              from the scheduled send time, so queueing shows up in p99).

Output: a table with req/s, p50, p99, non-2xx/errors and, per row, the ratios to the allow-all baseline
that received the same request (column "vs": (b) for the default request, (b:NAME) otherwise); the ratio
of a sidecar row is its overhead relative to the cheapest possible gRPC authz server doing the same
request. Baseline rows (b:NAME) are compared with (b): the cost of the bigger request itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import _procs  # noqa: E402  (the one home of the process helpers, shared with the e2e tests)

# --------------------------------------------------------------------------------------------------
# scenarios


@dataclass(frozen=True)
class RequestSpec:
    method: str = "GET"
    path: str = "/api/orders"
    host: str = "orders.example.com"
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def raw(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {self.host}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


@dataclass(frozen=True)
class SidecarScenario:
    """A named way to run the sidecar. Fields left as None/empty use the command-line defaults.

    setup(workdir) is an optional context manager factory run once before the sidecar starts (e.g. to
    start a real Redis, write keys, mint a JWT); it yields a dict that may contain "extra_args"
    (list), "env" (dict), "headers" (dict), "path", "host", "method", "body" — merged over the fields —
    and "cpu_pids" (servers whose CPU time counts as the sidecar's, e.g. its redis-server).
    """

    description: str
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    setup: Callable[[Path], contextlib.AbstractContextManager[dict]] | None = None
    #: Envoy's ext_authz transport: "grpc" (deploy/envoy/envoy.yaml) or "http" (envoy-http.yaml).
    transport: str = "grpc"


#: name -> scenario. Add "jwt", "quota-redis", "hmac", ... here.
SIDECAR_SCENARIOS: dict[str, SidecarScenario] = {
    "extauthz": SidecarScenario("sidecar serving --policies, request from --method/--path/--host/-H"),
    "hmac": SidecarScenario("RFC 9421 hmac-sha256 signed POST with Content-Digest (bench/hmac_scenario.py)",
                            setup=lambda workdir: __import__("hmac_scenario").hmac_setup(workdir)),
    "tracing": SidecarScenario("tracing on: every Check's spans exported over OTLP gRPC (bench/tracing_scenario.py)",
                               setup=lambda workdir: __import__("tracing_scenario").tracing_setup(workdir)),
    "tracing-10pct": SidecarScenario(
        "tracing on as deploy/k8s ships it: parentbased_traceidratio 0.1, requests without trace headers",
        setup=lambda workdir: __import__("tracing_scenario").tracing_setup(workdir, ratio=0.1)),
    "jwt": SidecarScenario("RS256 JWT bearer token on the accounts-api example policy (bench/jwt_scenario.py)",
                           setup=lambda workdir: __import__("jwt_scenario").jwt_setup(workdir)),
    "quota-memory": SidecarScenario("orders-api + the same 3 quotas in the in-process store (bench/quota_scenario.py)",
                                    setup=lambda workdir: __import__("quota_scenario").quota_memory_setup(workdir)),
    "quota-redis": SidecarScenario("orders-api + 3 quotas charged in a local Redis (bench/quota_scenario.py)",
                                   setup=lambda workdir: __import__("quota_scenario").quota_redis_setup(workdir)),
    "openapi": SidecarScenario("OpenAPI 3.1 spec enforced: POST of a 1 KiB JSON body validated against its schema "
                               "(bench/openapi_scenario.py)",
                               setup=lambda workdir: __import__("openapi_scenario").openapi_setup(workdir)),
    "openapi-off": SidecarScenario("the openapi scenario's policy and request without its openapi section "
                                   "(bench/openapi_scenario.py)",
                                   setup=lambda workdir: __import__("openapi_scenario").openapi_setup(workdir, False)),
    "layers-none": SidecarScenario("orders.yaml alone, no layer (bench/layer_scenario.py)",
                                   setup=lambda workdir: __import__("layer_scenario").layer_setup(workdir, "none")),
    "layers-elsewhere": SidecarScenario(
        "orders.yaml + a layer for another host: the request matches no layer (bench/layer_scenario.py)",
        setup=lambda workdir: __import__("layer_scenario").layer_setup(workdir, "elsewhere")),
    "layers-one": SidecarScenario(
        "orders.yaml + a mesh-wide layer: CIDR denylist and one rule (bench/layer_scenario.py)",
        setup=lambda workdir: __import__("layer_scenario").layer_setup(workdir, "one")),
    "detect-memory": SidecarScenario("quota-memory's policy + 3 abuse detectors in process (bench/detect_scenario.py)",
                                     setup=lambda workdir: __import__("detect_scenario").detect_memory_setup(workdir)),
    "detect-redis": SidecarScenario("quota-redis's policy + 3 abuse detectors, one Redis round trip "
                                    "(bench/detect_scenario.py)",
                                    setup=lambda workdir: __import__("detect_scenario").detect_redis_setup(workdir)),
    "inspect": SidecarScenario("orders-api + payload inspection (inspect: {}), POST with a 1 KB JSON body "
                               "(bench/inspect_scenario.py)",
                               setup=lambda workdir: __import__("inspect_scenario").inspect_setup(workdir)),
}

# Every scenario in Envoy's HTTP ext_authz mode too, as NAME-http.
for _name, _sc in list(SIDECAR_SCENARIOS.items()):
    SIDECAR_SCENARIOS[f"{_name}-http"] = replace(_sc, description=f"{_sc.description} [HTTP ext_authz mode]",
                                                 transport="http")

DIRECT, ALLOW_ALL, ALLOW_ALL_HTTP = "direct", "allow-all", "allow-all-http"
DEFAULT_REQUEST = "default"
#: The figures issue 20 asks of HTTP mode: scenario -> (min x same-request allow-all gRPC, min x allow-all HTTP).
HTTP_MODE_TARGETS: dict[str, tuple[float, float | None]] = {
    "extauthz-http": (2.0, 0.8),
    "jwt-http": (1.6, None),
    "hmac-http": (1.6, None),
}


# --------------------------------------------------------------------------------------------------
# load generators


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    bad: int  # non-2xx/3xx responses + socket errors + timeouts
    #: CPU time per request (µs) of the authorization server (all its threads and child processes,
    #: e.g. the span-export helper) and of its Envoy, over the measured window: less noisy than req/s.
    authz_cpu_us: float = float("nan")
    envoy_cpu_us: float = float("nan")


def _percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def _lua_string(data: bytes | str) -> str:
    raw = data.encode("latin-1") if isinstance(data, str) else data
    out = []
    for b in raw:
        c = chr(b)
        out.append(c if 32 <= b < 127 and c not in '"\\' else f"\\{b:03d}")
    return '"' + "".join(out) + '"'


WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def run_wrk(wrk: str, port: int, req: RequestSpec, connections: int, seconds: float, workdir: Path) -> Result:
    script = workdir / "wrk.lua"
    lines = [
        f"wrk.method = {_lua_string(req.method)}",
        f"wrk.path = {_lua_string(req.path)}",
        f'wrk.headers["Host"] = {_lua_string(req.host)}',
        *[f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in req.headers.items()],
    ]
    if req.body:
        lines.append(f"wrk.body = {_lua_string(req.body)}")
    script.write_text("\n".join(lines) + "\n" + WRK_DONE)
    argv = [
        wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
        "-s", str(script), f"http://127.0.0.1:{port}{req.path}",
    ]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, preexec_fn=_LOADGEN_AFFINITY)
    for line in res.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            d = json.loads(line[len("WRK_JSON ") :])
            bad = d["status"] + d["connect"] + d["read"] + d["write"] + d["timeout"]
            return Result(
                rps=d["requests"] / (d["duration_us"] / 1e6),
                p50_ms=d["p50_us"] / 1000,
                p99_ms=d["p99_us"] / 1000,
                requests=d["requests"],
                bad=bad,
            )
    raise RuntimeError(f"wrk produced no result (rc={res.returncode}):\n{res.stdout}\n{res.stderr}")


class _Conn:
    """One keep-alive HTTP/1.1 connection on raw asyncio streams (Content-Length or chunked)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> _Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, raw: bytes) -> tuple[int, bool]:
        """Send one request, read the full response. Returns (status, keep_alive)."""
        self.writer.write(raw)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed")
        status = int(status_line.split(b" ", 2)[1])
        length, chunked, keep_alive = 0, False, True
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                keep_alive = False
        if chunked:
            while True:
                size = int((await self.reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                await self.reader.readexactly(size + 2)
        elif length:
            await self.reader.readexactly(length)
        return status, keep_alive

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def _one(conn: _Conn | None, port: int, raw: bytes, timeout: float) -> tuple[_Conn | None, bool]:
    """Returns (connection to reuse or None, ok)."""
    try:
        if conn is None:
            conn = await _Conn.open(port)
        status, keep_alive = await asyncio.wait_for(conn.request(raw), timeout)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        if conn is not None:
            conn.close()
        return None, False
    if not keep_alive:
        conn.close()
        conn = None
    return conn, 200 <= status < 400


async def _closed_loop(port: int, raw: bytes, connections: int, seconds: float) -> Result:
    latencies: list[float] = []
    bad = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def worker() -> None:
        nonlocal bad
        conn: _Conn | None = None
        while loop.time() < deadline:
            t0 = loop.time()
            conn, ok = await _one(conn, port, raw, timeout=5.0)
            latencies.append(loop.time() - t0)
            bad += not ok
        if conn is not None:
            conn.close()

    start = loop.time()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(connections))), seconds + 15)
    elapsed = loop.time() - start
    latencies.sort()
    return Result(len(latencies) / elapsed, _percentile(latencies, 50) * 1e3,
                  _percentile(latencies, 99) * 1e3, len(latencies), bad)  # fmt: skip


async def _open_loop(port: int, raw: bytes, rate: float, seconds: float, connections: int) -> Result:
    """Requests are scheduled at t0 + i/rate regardless of responses; a request waits for a free
    connection if all are busy, and its latency counts from the scheduled time."""
    loop = asyncio.get_running_loop()
    total = max(1, int(rate * seconds))
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    bad = 0

    async def worker() -> None:
        nonlocal bad
        conn: _Conn | None = None
        while (scheduled := await queue.get()) is not None:
            conn, ok = await _one(conn, port, raw, timeout=5.0)
            latencies.append(loop.time() - scheduled)
            bad += not ok
        if conn is not None:
            conn.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    t0 = loop.time() + 0.05
    for i in range(total):
        at = t0 + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(at)
    for _ in workers:
        queue.put_nowait(None)
    try:
        await asyncio.wait_for(asyncio.gather(*workers), timeout=15)
    except TimeoutError:
        for w in workers:
            w.cancel()
        bad += total - len(latencies)
    elapsed = loop.time() - t0
    latencies.sort()
    return Result(len(latencies) / elapsed, _percentile(latencies, 50) * 1e3,
                  _percentile(latencies, 99) * 1e3, len(latencies), bad)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the run


@dataclass
class Target:
    name: str
    label: str
    envoy: _procs.EnvoyProcess
    request: RequestSpec
    #: "default", or the sidecar scenario whose request this is (a key of the request legend).
    request_name: str = DEFAULT_REQUEST
    #: The target whose numbers this row's ratios divide by (None: no ratios).
    baseline: str | None = None
    #: "direct", "baseline" or "sidecar".
    kind: str = "sidecar"
    #: pid of the authorization server behind this Envoy (None: no ext_authz).
    authz_pid: int | None = None
    #: Servers the sidecar needs on this machine (the scenario's redis-server): their CPU counts as its.
    helper_pids: tuple[int, ...] = ()
    #: Envoy's ext_authz transport ("grpc" | "http"; "" for direct).
    transport: str = "grpc"


def _request_for(args: argparse.Namespace, overrides: Mapping[str, object] | None = None) -> RequestSpec:
    o = dict(overrides or {})
    headers = dict(_parse_headers(args.header))
    headers.update(o.get("headers") or {})  # type: ignore[call-overload]
    body = o.get("body")
    return RequestSpec(
        method=str(o.get("method") or args.method),
        path=str(o.get("path") or args.path),
        host=str(o.get("host") or args.host),
        headers=headers,
        body=body if isinstance(body, bytes) else (args.body or "").encode(),
    )


def _parse_headers(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition(":")
        if not sep:
            raise SystemExit(f"bad -H {item!r}: expected 'Name: value'")
        out.append((name.strip(), value.strip()))
    return out


def _probe(target: Target) -> str | None:
    """One request before the load; returns a warning if it is not a 2xx."""
    import http.client

    req = target.request
    conn = http.client.HTTPConnection("127.0.0.1", target.envoy.port, timeout=5)
    try:
        conn.request(req.method, req.path, body=req.body or None, headers={"Host": req.host, **req.headers})
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        return f"{target.name}: probe request failed: {exc}"
    finally:
        conn.close()
    if not 200 <= resp.status < 300:
        return (
            f"{target.name}: probe {req.method} {req.path} (Host {req.host}) answered {resp.status} "
            f"{body[:200]!r} — its numbers measure that response, not an allowed request"
        )
    return None


def _authz_filter(config: dict) -> dict | None:
    """The ext_authz HTTP filter's typed_config of a rendered bootstrap (None: no such filter)."""
    for listener in config["static_resources"]["listeners"]:
        for chain in listener.get("filter_chains", ()):
            for network_filter in chain.get("filters", ()):
                for http_filter in network_filter.get("typed_config", {}).get("http_filters", ()):
                    if http_filter["name"] == "envoy.filters.http.ext_authz":
                        return http_filter["typed_config"]
    return None


#: ext_authz settings that must be the same in both transports for rows to be comparable.
_COMMON_AUTHZ = ("with_request_body", "failure_mode_allow", "status_on_error")


def _authz_timeout(authz: dict) -> str | None:
    service = authz.get("grpc_service") or authz.get("http_service", {}).get("server_uri", {})
    return service.get("timeout")


def _check_same_authz_filters(targets: list[Target]) -> dict:
    """Every ext_authz Envoy of one transport must carry the same filter settings (with_request_body,
    timeout, ...), and the two transports the same body, failure and timeout settings, or the comparison
    with allow-all would measure a configuration difference. Returns the settings of the first."""
    def settings(config: dict) -> dict | None:
        authz = _authz_filter(config)
        if authz is not None and "http_service" in authz:  # its uri names the server's own port
            authz = json.loads(json.dumps(authz))
            authz["http_service"]["server_uri"].pop("uri", None)
        return authz

    filters = {t.envoy.config_path: (t.transport, settings(t.envoy.config)) for t in targets
               if t.kind != "direct"}  # fmt: skip
    references: dict[str, dict | None] = {}
    differing = []
    for path, (transport, f) in filters.items():
        reference = references.setdefault(transport, f)
        if f is None or f != reference:
            differing.append(str(path))
    refs = [r for r in references.values() if r is not None]
    if differing or not refs:
        raise SystemExit(f"ext_authz filter settings differ between Envoys ({', '.join(differing)}): not comparable")
    def shared(authz: dict) -> tuple:
        settings = {k: authz.get(k) for k in _COMMON_AUTHZ}
        # pack_as_bytes only says how the gRPC CheckRequest carries the body (HTTP mode sends it as is).
        settings["with_request_body"] = {k: v for k, v in (settings["with_request_body"] or {}).items()
                                         if k != "pack_as_bytes"}
        return json.dumps(settings, sort_keys=True), _authz_timeout(authz)

    common = {shared(r) for r in refs}
    if len(common) > 1:
        raise SystemExit(f"the gRPC and HTTP ext_authz filters differ in {', '.join(_COMMON_AUTHZ)} or timeout: "
                         "not comparable")
    return refs[0]


#: With --cpu-split: called in the load generator's child before it runs (pins it to Envoy's CPU).
_LOADGEN_AFFINITY: Callable[[], None] | None = None


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` and of its descendants on ``cpus`` (sched_setaffinity is per thread)."""
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task), cpus)
            with contextlib.suppress(OSError):
                for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                    _pin(int(child), cpus)


def _split_cpus(targets: list[Target]) -> None:
    """--cpu-split: authorization servers and their children (the span exporter) on CPU 1, everything
    else on CPU 0: Envoys, the load generator and the scenario's helpers (redis-server). As when the
    sidecar has a core of its own (Kubernetes' static CPU manager) and Redis runs elsewhere, instead
    of every process migrating over both cores. The closed-loop rows then measure the authorization
    server's own CPU, as on a machine where it is the bottleneck."""
    global _LOADGEN_AFFINITY

    def loadgen_affinity() -> None:
        os.sched_setaffinity(0, {0})

    _LOADGEN_AFFINITY = loadgen_affinity
    os.sched_setaffinity(0, {0})  # this process: the Python load generator (rate mode, --loadgen python)
    for t in targets:
        for pid in (t.envoy.proc.pid, *t.helper_pids):
            _pin(pid, {0})
        if t.authz_pid is not None:
            _pin(t.authz_pid, {1})


def _start_targets(args: argparse.Namespace, stack: contextlib.ExitStack, workdir: Path) -> list[Target]:
    """(a), (b), then one same-request allow-all baseline per distinct non-default sidecar request, then
    the sidecars. Every ext_authz Envoy comes from envoy_for, so their ext_authz settings are identical."""

    def envoy_for(name: str, ext_authz: str | None, transport: str = "grpc") -> _procs.EnvoyProcess:
        cfg = _procs.render_envoy_bootstrap(mode=transport, ext_authz=ext_authz, upstream_port=None,
                                            access_log=False)
        envoy = _procs.start_envoy(cfg, workdir / name, name=f"envoy-{name}", log_level="warning")
        stack.callback(envoy.stop)
        return envoy

    default_request = _request_for(args)
    targets = [Target(DIRECT, "(a) direct", envoy_for(DIRECT, None), default_request, baseline=ALLOW_ALL,
                      kind="direct")]
    allow_all = _procs.start_allow_all(workdir / ALLOW_ALL)
    stack.callback(allow_all.stop)
    allow_all_envoy = envoy_for(ALLOW_ALL, allow_all.target)
    targets.append(Target(ALLOW_ALL, "(b) allow-all", allow_all_envoy, default_request, kind="baseline",
                          authz_pid=allow_all.proc.pid))
    baselines: dict[bytes, Target] = {default_request.raw(): targets[-1]}
    sidecars: list[Target] = []

    wanted = args.scenario or ["extauthz"]
    # (bh) the HTTP-mode floor, baselined on (b): what the transport alone gains.
    http_baselines: dict[bytes, Target] = {}
    allow_all_http_envoy: _procs.EnvoyProcess | None = None
    allow_all_http_pid: int | None = None
    if args.allow_all_http or any(SIDECAR_SCENARIOS[n].transport == "http" for n in wanted):
        allow_all_http = _procs.start_allow_all(workdir / ALLOW_ALL_HTTP, mode="http")
        stack.callback(allow_all_http.stop)
        allow_all_http_pid = allow_all_http.proc.pid
        allow_all_http_envoy = envoy_for(ALLOW_ALL_HTTP, allow_all_http.target, "http")
        targets.append(Target(ALLOW_ALL_HTTP, "(bh) allow-all-http", allow_all_http_envoy, default_request,
                              baseline=ALLOW_ALL, kind="baseline", authz_pid=allow_all_http_pid, transport="http"))
        http_baselines[default_request.raw()] = targets[-1]
    available, why = _procs.extauthz_available()
    if not available:
        print(f"SKIPPING sidecar scenarios {wanted}: python -m extauthz is unavailable ({why})")
        return targets
    policies = Path(args.policies)
    if not policies.is_dir():
        print(f"SKIPPING sidecar scenarios {wanted}: policies directory {policies} does not exist")
        return targets
    for i, name in enumerate(wanted):
        sc = SIDECAR_SCENARIOS[name]
        overrides: dict = {}
        if sc.setup is not None:
            overrides = dict(stack.enter_context(sc.setup(workdir / f"{name}-setup")) or {})
        extra_args = [*sc.extra_args, *overrides.get("extra_args", ()), *args.sidecar_arg]
        env = {**sc.env, **overrides.get("env", {})}
        try:
            sidecar = _procs.start_extauthz(
                policies, workdir / name, extra_args=extra_args, env=env, name=f"extauthz-{name}",
                mode=sc.transport,
            )
        except _procs.StartupError as exc:
            print(f"SKIPPING sidecar scenario {name!r}: {exc}")
            continue
        stack.callback(sidecar.stop)
        fields = {k: getattr(sc, k) for k in ("method", "path", "host", "body") if getattr(sc, k)}
        fields["headers"] = {**sc.headers, **overrides.get("headers", {})}
        fields.update({k: overrides[k] for k in ("method", "path", "host", "body") if k in overrides})
        label = f"({chr(ord('c') + i)}) {name}"
        request = _request_for(args, fields)
        baseline = baselines.get(request.raw())
        if baseline is None:  # the same allow-all Envoy and server, sent exactly this scenario's request
            baseline = Target(f"{ALLOW_ALL}:{name}", f"(b:{name}) allow-all", allow_all_envoy, request,
                              request_name=name, baseline=ALLOW_ALL, kind="baseline",
                              authz_pid=allow_all.proc.pid)
            baselines[request.raw()] = baseline
            targets.append(baseline)
        if (allow_all_http_envoy is not None and sc.transport == "http"
                and request.raw() not in http_baselines):  # the HTTP floor for this request, too
            http_baselines[request.raw()] = Target(
                f"{ALLOW_ALL_HTTP}:{name}", f"(bh:{name}) allow-all-http", allow_all_http_envoy, request,
                request_name=baseline.request_name, baseline=baseline.name, kind="baseline",
                authz_pid=allow_all_http_pid, transport="http")
            targets.append(http_baselines[request.raw()])
        sidecars.append(Target(name, label, envoy_for(name, sidecar.target, sc.transport), request,
                               request_name=baseline.request_name, baseline=baseline.name,
                               authz_pid=sidecar.proc.pid, helper_pids=tuple(overrides.get("cpu_pids", ())),
                               transport=sc.transport))
    return targets + sidecars


def _http_mode_summary(targets: list[Target], med: dict[str, Result], raw: dict[str, list[Result]]) -> str:
    """Each HTTP-mode sidecar row against both floors for its request: allow-all gRPC (its "vs") and
    allow-all HTTP, in req/s (ratio of medians, and median of per-round ratios) and in CPU per
    request; with the targets of issue 20 where it sets one."""
    http_floor = {t.request_name: t for t in targets if t.kind == "baseline" and t.transport == "http"}
    lines = []
    for t in targets:
        if t.kind != "sidecar" or t.transport != "http" or t.baseline is None:
            continue
        parts = [f"{t.label}:"]
        for floor, target in ((t.baseline, HTTP_MODE_TARGETS.get(t.name, (None, None))[0]),
                              (getattr(http_floor.get(t.request_name), "name", None),
                               HTTP_MODE_TARGETS.get(t.name, (None, None))[1])):
            if floor is None or floor not in med:
                continue
            rps = med[t.name].rps / med[floor].rps if med[floor].rps else float("nan")
            per_round = _round_ratio(raw, t.name, floor)
            cpu = _cpu_ratio(med[t.name], med[floor])
            goal = ""
            if target:
                readings = {"req/s": rps, "per round": per_round, "cpu": float(cpu.rstrip("x")) if cpu != "-" else 0.0}
                goal = " (target >= {:g}x: {})".format(target, ", ".join(
                    f"{name} {'met' if value >= target else 'MISSED'}" for name, value in readings.items()))
            parts.append(f"vs {floor} {rps:.2f}x req/s, {per_round:.2f}x per round, {cpu} cpu{goal};")
        lines.append(" ".join(parts))
    return ("HTTP ext_authz mode, each row against both floors:\n  " + "\n  ".join(lines)) if lines else ""


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int | None, *, with_children: bool) -> float:
    """utime+stime of a process (all threads) and, optionally, of its live descendants, from /proc."""
    if pid is None or not Path("/proc").is_dir():
        return float("nan")

    def stat(p: int) -> list[str] | None:
        try:
            text = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            return None
        return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on; comm may hold spaces

    pids = {pid}
    if with_children:
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (fields := stat(int(entry.name))) is not None:
                parents[int(entry.name)] = int(fields[1])
        grew = True
        while grew:
            new = {p for p, parent in parents.items() if parent in pids and p not in pids}
            pids |= new
            grew = bool(new)
    ticks = 0
    for p in pids:
        if (fields := stat(p)) is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / _CLOCK_TICKS


def _measure(args: argparse.Namespace, mode: str, target: Target, workdir: Path) -> Result:
    """One measured run, with the CPU the authorization server and Envoy spent on it."""
    cpu_pids = (target.authz_pid, target.envoy.proc.pid)
    if args.warmup > 0:
        _load(args, mode, target, workdir, args.warmup)

    def authz_cpu() -> float:
        own = _cpu_seconds(cpu_pids[0], with_children=True)
        return own + sum(_cpu_seconds(pid, with_children=False) for pid in target.helper_pids)

    authz0 = authz_cpu()
    envoy0 = _cpu_seconds(cpu_pids[1], with_children=False)
    r = _load(args, mode, target, workdir, args.duration)
    authz1 = authz_cpu()
    envoy1 = _cpu_seconds(cpu_pids[1], with_children=False)
    if r.requests:
        r.authz_cpu_us = (authz1 - authz0) / r.requests * 1e6
        r.envoy_cpu_us = (envoy1 - envoy0) / r.requests * 1e6
    return r


def _load(args: argparse.Namespace, mode: str, target: Target, workdir: Path, seconds: float) -> Result:
    raw = target.request.raw()
    port = target.envoy.port
    if mode == "throughput":
        if args.loadgen == "wrk":
            return run_wrk(args.wrk, port, target.request, args.connections, seconds, workdir)
        return asyncio.run(_closed_loop(port, raw, args.connections, seconds))
    return asyncio.run(_open_loop(port, raw, args.rate, seconds, args.rate_connections))


def _median(results: list[Result]) -> Result:
    return Result(
        rps=statistics.median(r.rps for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        requests=sum(r.requests for r in results),
        bad=sum(r.bad for r in results),
        authz_cpu_us=statistics.median(r.authz_cpu_us for r in results),
        envoy_cpu_us=statistics.median(r.envoy_cpu_us for r in results),
    )


def _ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}x" if base else "-"


def _cpu(us: float) -> str:
    return "-" if us != us else f"{us:.0f}"  # NaN: no such process


def _cpu_ratio(row: Result, base: Result) -> str:
    """Baseline CPU per request over this row's (authorization server + Envoy): the throughput ratio
    a CPU-bound machine would show, without the noise of req/s on a shared one."""
    row_us, base_us = row.authz_cpu_us + row.envoy_cpu_us, base.authz_cpu_us + base.envoy_cpu_us
    return "-" if row_us != row_us or base_us != base_us or not row_us else f"{base_us / row_us:.2f}x"


def _short(label: str) -> str:
    return label.split(" ", 1)[0]


def _describe(req: RequestSpec | str) -> str:
    if isinstance(req, str):  # already described (a saved run)
        return req
    headers = f"{len(req.headers)} header{'s' if len(req.headers) != 1 else ''}" if req.headers else "no headers"
    body = f"{len(req.body)} B body" if req.body else "no body"
    return f"{req.method} {req.path} (Host {req.host}), {headers}, {body}"


def _round_ratio(raw: dict[str, list[Result]], name: str, baseline: str) -> float:
    """The median over rounds of (this row's req/s / its baseline's req/s in the same round): a
    slowdown of the whole machine during one round moves both, so this moves less than the ratio
    of the two medians."""
    pairs = zip(raw.get(name, ()), raw.get(baseline, ()), strict=False)
    ratios = [r.rps / b.rps for r, b in pairs if b.rps]
    return statistics.median(ratios) if ratios else float("nan")


def _table(mode: str, targets: list[Target], med: dict[str, Result], rounds: int,
           raw: dict[str, list[Result]] | None = None) -> str:
    labels = {t.name: t.label for t in targets}
    width = max(22, *(len(t.label) for t in targets))
    rwidth = max(8, *(len(t.request_name) for t in targets))
    vwidth = max(4, *(len(_short(t.label)) for t in targets))
    head = (f"{'scenario':<{width}} {'request':<{rwidth}} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'bad':>6}   "
            f"{'vs':<{vwidth}} {'req/s/vs':>9} {'rounds':>7} {'p50/vs':>8} {'p99/vs':>8}   {'authz us':>8} {'envoy us':>8}"
            f" {'cpu/vs':>7}")  # fmt: skip
    out = [f"== {mode}: median of {rounds} round(s) ==", head, "-" * len(head)]
    for t in targets:
        r = med[t.name]
        base = med.get(t.baseline) if t.baseline else None
        vs, ratios, per_round, cpu_ratio = "", ("", "", ""), "", ""
        if base is not None and t.baseline is not None:
            vs = _short(labels[t.baseline])
            ratios = (_ratio(r.rps, base.rps), _ratio(r.p50_ms, base.p50_ms), _ratio(r.p99_ms, base.p99_ms))
            cpu_ratio = _cpu_ratio(r, base)
            if raw is not None:
                per_round = f"{_round_ratio(raw, t.name, t.baseline):.2f}x"
        out.append(
            f"{t.label:<{width}} {t.request_name:<{rwidth}} {r.rps:>9.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
            f"{r.bad:>6}   {vs:<{vwidth}} {ratios[0]:>9} {per_round:>7} {ratios[1]:>8} {ratios[2]:>8}   "
            f"{_cpu(r.authz_cpu_us):>8} {_cpu(r.envoy_cpu_us):>8} {cpu_ratio:>7}"
        )
    requests: dict[str, RequestSpec] = {}
    for t in targets:
        requests.setdefault(t.request_name, t.request)
    out.append("requests: " + "\n          ".join(f"{n:<{rwidth}} {_describe(q)}" for n, q in requests.items()))
    if len(requests) > 1:
        out.append("vs: each sidecar row is divided by the allow-all row that received the same request;"
                   " (b:NAME) rows by (b)")
    out.append("req/s/vs: ratio of the medians; rounds: median of the ratios within each round")
    out.append("authz us / envoy us: CPU time per request of the authorization server (all threads and child"
               " processes, and the scenario's redis-server) and of its Envoy")
    out.append("cpu/vs: the baseline's authz+envoy CPU per request divided by this row's: the throughput ratio on"
               " a CPU-bound machine, with less noise than req/s")
    return "\n".join(out)


def report_from_json(path: Path) -> str:
    """The tables of a run saved with --json (e.g. to add a column to an old run)."""
    saved = json.loads(path.read_text())
    targets = []
    for name, t in saved["targets"].items():
        targets.append(SimpleNamespace(name=name, label=t["label"], request_name=t["request"], baseline=t["vs"],
                                       request=t["describe"], kind=t.get("kind", ""),
                                       transport=t.get("transport", "grpc")))  # fmt: skip
    tables = []
    for mode, data in saved["modes"].items():
        raw = {n: [Result(**r) for r in rs] for n, rs in data["rounds"].items()}
        med = {n: Result(**r) for n, r in data["median"].items()}
        rounds = max(len(rs) for rs in raw.values())
        tables.append(_table(mode, targets, med, rounds, raw))  # type: ignore[arg-type]
        summary = _http_mode_summary(targets, med, raw)  # type: ignore[arg-type]
        if summary:
            tables.append(summary)
    return "\n\n".join(tables)


def _envoy_version() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run([_procs.envoy_binary(), "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().split("version:")[-1].strip()
    return "?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default=str(_procs.DEFAULT_POLICIES), help="policies dir for the sidecar")
    p.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SIDECAR_SCENARIOS),
        metavar="NAME",
        help="sidecar scenario(s) to add as (c), (d), ... (repeatable; default: extauthz)",
    )
    p.add_argument("--list", action="store_true", help="list sidecar scenarios and exit")
    p.add_argument("--allow-all-http", action="store_true",
                   help="add (bh): Envoy in HTTP ext_authz mode -> bench/allow_all_http_server.py "
                        "(automatic with any NAME-http scenario)")
    p.add_argument(
        "--sidecar-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every sidecar (repeatable)",
    )
    p.add_argument(
        "--mode",
        action="append",
        choices=["throughput", "rate"],
        help="throughput (closed loop) and/or rate (open loop); default: both",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds; scenario order rotates (default 3)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="discarded warm-up seconds per run (default 2)")
    p.add_argument("--connections", type=int, default=16, help="closed-loop connections (default 16)")
    p.add_argument("--rate", type=float, default=500.0, help="open-loop requests/s (default 500)")
    p.add_argument(
        "--rate-connections",
        type=int,
        default=32,
        help="open-loop keep-alive connection pool size (default 32)",
    )
    p.add_argument(
        "--loadgen",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="closed-loop generator (auto: wrk if on PATH, else python)",
    )
    p.add_argument("--method", default="GET")
    p.add_argument("--path", default="/api/orders")
    p.add_argument("--host", default="orders.example.com", help="Host header")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'")
    p.add_argument("--body", default="", help="request body (text)")
    p.add_argument(
        "--cpu-split",
        action="store_true",
        help="what-if: authorization servers on CPU 1; Envoys, the load generator and redis-server on CPU 0",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 3 s, 1 s warm-up")
    p.add_argument("--json", metavar="FILE", help="also write all raw and median results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    p.add_argument("--report", metavar="FILE", help="print the tables of a run saved with --json, and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 3.0, 1.0
    args.mode = args.mode or ["throughput", "rate"]
    if not (0 < args.duration <= 600 and 0 <= args.warmup <= 60 and 1 <= args.rounds <= 20):
        p.error("bounds: 0 < --duration <= 600, 0 <= --warmup <= 60, 1 <= --rounds <= 20")
    if not (1 <= args.connections <= 1000 and 1 <= args.rate_connections <= 1000 and 0 < args.rate <= 20000):
        p.error("bounds: connections 1..1000, 0 < --rate <= 20000")
    args.wrk = shutil.which("wrk")
    if args.loadgen == "auto":
        args.loadgen = "wrk" if args.wrk else "python"
    elif args.loadgen == "wrk" and not args.wrk:
        p.error("wrk not found (apt-get install -y wrk)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        print(report_from_json(Path(args.report)))
        return 0
    if args.list:
        for name, sc in SIDECAR_SCENARIOS.items():
            print(f"{name:<22} {sc.description}")
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="extauthz-bench-"))
    print(
        f"envoy {_envoy_version()} | {os.cpu_count()} CPUs | python {platform.python_version()}\n"
        f"closed loop: {args.loadgen}, {args.connections} connections | "
        f"open loop: python, {args.rate:.0f} req/s over {args.rate_connections} connections | "
        f"{args.rounds} round(s) x ({args.warmup:g}s warm-up + {args.duration:g}s)"
    )
    print(f"work dir: {workdir}")
    failed = False
    report: dict = {"args": {k: v for k, v in vars(args).items() if k != "wrk"}, "modes": {}}
    with contextlib.ExitStack() as stack:
        try:
            targets = _start_targets(args, stack, workdir)
            authz = _check_same_authz_filters(targets)
            if args.cpu_split:
                if (os.cpu_count() or 1) < 2 or not hasattr(os, "sched_setaffinity"):
                    raise SystemExit("--cpu-split needs two CPUs and sched_setaffinity")
                _split_cpus(targets)
                print("cpu split: authorization servers (and their children) on CPU 1; Envoys, load generator, redis-server on CPU 0")
            body = authz.get("with_request_body", {})
            print("ext_authz filter, identical in every ext_authz Envoy of a transport (allow-all and sidecars): "
                  "with_request_body " + ", ".join(f"{k}={v}" for k, v in body.items())
                  + f"; timeout {_authz_timeout(authz)}")
            report["targets"] = {t.name: {"label": t.label, "request": t.request_name, "vs": t.baseline,
                                          "describe": _describe(t.request), "kind": t.kind,
                                          "transport": t.transport} for t in targets}
            for t in targets:
                warning = _probe(t)
                if warning:
                    print("WARNING:", warning)
            tables = []
            for mode in args.mode:
                raw: dict[str, list[Result]] = {t.name: [] for t in targets}
                for rnd in range(args.rounds):
                    order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
                    for t in order:
                        r = _measure(args, mode, t, workdir)
                        raw[t.name].append(r)
                        print(
                            f"  [{mode} round {rnd + 1}/{args.rounds}] {t.label:<24} {r.rps:>8.0f} req/s  "
                            f"p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:7.2f} ms  bad {r.bad}",
                            flush=True,
                        )
                med = {name: _median(rs) for name, rs in raw.items()}
                if mode == "throughput":
                    title = f"throughput (closed loop, {args.loadgen}, {args.connections} connections)"
                else:
                    title = f"rate (open loop, {args.rate:.0f} req/s)"
                tables.append(_table(title, targets, med, args.rounds, raw))
                summary = _http_mode_summary(targets, med, raw)
                if summary:
                    tables.append(summary)
                report["modes"][mode] = {
                    "rounds": {n: [vars(r) for r in rs] for n, rs in raw.items()},
                    "median": {n: vars(r) for n, r in med.items()},
                }
            print()
            print("\n\n".join(tables))
            if not any(t.kind == "sidecar" for t in targets):
                print("\n(sidecar scenario(s) skipped — see the message above)")
        except BaseException:
            failed = True
            for proc in list(_procs.LIVE_PROCESSES):
                print(f"--- {proc.name} (pid {proc.pid}, rc={proc.returncode}) {proc.log_path} ---")
                print(proc.log_tail(30))
            raise
        finally:
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2))
    # all processes are stopped here (ExitStack)
    if failed:
        print(f"logs kept in {workdir}")
    elif not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
