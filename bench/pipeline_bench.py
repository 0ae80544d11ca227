"""The sidecar's whole Check in process, for the scenarios of bench/run.py, without Envoy or gRPC.

    python bench/pipeline_bench.py                          # every scenario, ~1 min
    python bench/pipeline_bench.py --scenario jwt --scenario hmac --checks 20000
    python bench/pipeline_bench.py --scenario hmac-http --profile /tmp/hmac-http.prof   # + cProfile

For each scenario it runs the scenario's setup (keys, a local redis-server, an OTLP sink), starts a
Sidecar exactly as ``extauthz serve`` would with that scenario's options and environment, builds the
scenario's request as a CheckRequest (``extauthz.samples``: the pseudo-headers and fields Envoy
sends), and calls ``Sidecar._check`` on its bytes from 16 concurrent callers: parse, decide, build
and serialize the response, metrics and decision log included. It reports the CPU time this process
spends per Check (median of the rounds) and that of its child processes (redis-server, the span
exporter). Through Envoy the sidecar spends more per Check than this (gRPC, and sharing the cores);
this is the part our code decides, measured with little noise. It runs on uvloop when installed,
as ``extauthz serve`` does. Each scenario runs in its own
process, so one scenario's environment (OTEL_* variables) never leaks into another's.

A ``NAME-http`` scenario (Envoy's HTTP ext_authz mode) measures the HTTP listener's path instead: the
request as Envoy sends it (the client's headers plus the ``v1:`` x-extauthz-* headers), fed to one
listener connection per caller (extauthz.wire.http_authz) through an in-memory transport: httptools
parsing, the request view, the decision, the answer bytes. ``--profile FILE`` writes cProfile stats
of the measured rounds (read them with ``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests" / "e2e")]

import _procs  # noqa: E402
import run  # noqa: E402

CONCURRENCY = 16


def _sample(request: run.RequestSpec) -> dict:
    """The scenario's request as extauthz.samples reads it, with what Envoy adds."""
    sample: dict = {
        "method": request.method, "path": request.path, "host": request.host,
        "headers": {**{k.lower(): v for k, v in request.headers.items()},
                    "x-request-id": "3f1c6a2e-7d4b-4e0f-9a51-2b8c5d6e7f80", "x-forwarded-proto": "http"},
        "source": {"address": "127.0.0.1", "port": 40000},
    }  # fmt: skip
    if request.body:
        sample["body"] = request.body.decode("utf-8")
    return sample


def _http_request_bytes(request: run.RequestSpec) -> bytes:
    """The authorization request Envoy's HTTP mode sends for ``request`` (deploy/envoy/envoy-http.yaml)."""
    from extauthz.request import ENVOY_HEADERS, ENVOY_OPTIONAL_HEADERS, ENVOY_VALUE_PREFIX

    envoy = {"%REQ(:AUTHORITY)%": request.host, "%REQ(:SCHEME)%": "http", "%PROTOCOL%": "HTTP/1.1",
             "%STREAM_ID%": "1234567890123456789", "%DOWNSTREAM_REMOTE_ADDRESS%": "127.0.0.1:40000",
             "%DOWNSTREAM_LOCAL_ADDRESS%": "127.0.0.1:8080", "%REQ(CONTENT-LENGTH)%": str(len(request.body))
             if request.body else ""}  # fmt: skip
    lines = [f"{request.method} {request.path} HTTP/1.1", "host: ext_authz"]
    lines += [f"{k.lower()}: {v}" for k, v in request.headers.items()]
    lines += ["x-request-id: 3f1c6a2e-7d4b-4e0f-9a51-2b8c5d6e7f80", "x-forwarded-proto: http",
              "x-forwarded-for: 127.0.0.1", "x-envoy-external-address: 127.0.0.1",
              f"content-length: {len(request.body)}"]  # fmt: skip
    if request.body:
        lines.append("x-envoy-auth-partial-body: false")
    every = {**ENVOY_HEADERS, **ENVOY_OPTIONAL_HEADERS}  # as deploy/envoy/envoy-http.yaml sends them
    lines += [f"{name}: {ENVOY_VALUE_PREFIX}{envoy.get(formatter, '')}" for name, formatter in every.items()]
    lines += ["x-envoy-internal: true", "x-envoy-expected-rq-timeout-ms: 500"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body


class _MemoryTransport:
    """What a listener connection needs of its transport; answers are kept for the caller."""

    def __init__(self) -> None:
        self.answer = asyncio.get_running_loop().create_future()

    def write(self, data: bytes) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    abort = close


def _child_cpu() -> float:
    return run._cpu_seconds(os.getpid(), with_children=True) - run._cpu_seconds(os.getpid(), with_children=False)


def measure(name: str, checks: int, rounds: int, profile: str | None = None) -> dict:
    """One scenario, in this process: {"scenario", "status", "cpu_us", "child_us"}."""
    from extauthz import cli
    from extauthz.api.envoy.service.auth.v3 import external_auth_pb2
    from extauthz.samples import check_request_from_sample
    from extauthz.server import GC_THRESHOLDS, Settings, Sidecar
    from extauthz.telemetry.decision_log import DecisionLogConfig
    from extauthz.telemetry.logs import configure_logging
    from extauthz.telemetry.tracing import tracing_from_env

    scenario = run.SIDECAR_SCENARIOS[name]
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"pipeline-{name}-")))
        extra = dict(stack.enter_context(scenario.setup(work)) or {}) if scenario.setup else {}
        os.environ.update({**scenario.env, **extra.get("env", {})})
        http_mode = scenario.transport == "http"
        argv = _procs.extauthz_command(_procs.DEFAULT_POLICIES, _procs.free_port(), _procs.free_port(),
                                       [*scenario.extra_args, *extra.get("extra_args", ())],
                                       _procs.free_port() if http_mode else None)  # fmt: skip
        ns = cli._parser().parse_args(argv[argv.index("serve"):])
        configure_logging("warning", "json")
        settings = Settings(
            policies=ns.policies, listen=ns.listen, http_port=ns.http_port, max_message_bytes=ns.max_message_bytes,
            check_timeout=ns.check_timeout, reload_interval=ns.reload_interval, redis_url=ns.redis_url,
            redis_password_file=ns.redis_password_file, xff_trusted_hops=ns.xff_trusted_hops,
            decision_log=DecisionLogConfig(destination=os.devnull, allow_sample=ns.decision_log_allow_sample),
            tracing=tracing_from_env(version="bench"),
            http_authz_listen=ns.http_authz_listen,
        )  # fmt: skip
        fields = {k: getattr(scenario, k) for k in ("method", "path", "host", "body") if getattr(scenario, k)}
        fields["headers"] = {**scenario.headers, **extra.get("headers", {})}
        fields.update({k: extra[k] for k in ("method", "path", "host", "body") if k in extra})
        request = run._request_for(run.parse_args([]), fields)
        data = check_request_from_sample(_sample(request)).SerializeToString()
        raw_http = _http_request_bytes(request)
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()

        async def main() -> dict:
            gc.set_threshold(*GC_THRESHOLDS)  # as `extauthz serve` sets it
            sidecar = Sidecar(settings)
            sidecar.load_initial()
            await sidecar.start()
            try:
                if http_mode:
                    from extauthz.wire.http_authz import _Connection

                    assert sidecar.http_authz is not None

                    async def one_http(connection: _Connection) -> bytes:
                        transport = _MemoryTransport()
                        connection.transport = transport  # type: ignore[assignment]
                        connection.data_received(raw_http)
                        return await transport.answer

                    first = await one_http(_Connection(sidecar.http_authz))
                    status = "allow" if first.startswith(b"HTTP/1.1 200") else f"DENY {first[9:12].decode()}"

                    async def caller(count: int) -> None:
                        connection = _Connection(sidecar.http_authz)  # one keep-alive connection per caller
                        connection.connection_made(_MemoryTransport())  # type: ignore[arg-type]
                        for _ in range(count):
                            await one_http(connection)
                else:
                    response = external_auth_pb2.CheckResponse.FromString(await sidecar._check(data, None))
                    status = "allow" if response.HasField("ok_response") else f"DENY {response.status.code}"

                    async def caller(count: int) -> None:
                        for _ in range(count):
                            await sidecar._check(data, None)

                await asyncio.gather(*(caller(200) for _ in range(CONCURRENCY)))  # warm caches
                own, children = [], []
                for _ in range(rounds):
                    child0, cpu0 = _child_cpu(), time.process_time()
                    if profiler is not None:
                        profiler.enable()
                    await asyncio.gather(*(caller(checks // CONCURRENCY) for _ in range(CONCURRENCY)))
                    if profiler is not None:
                        profiler.disable()
                    own.append((time.process_time() - cpu0) / checks * 1e6)
                    await asyncio.sleep(0.3)  # let the children finish this round's work
                    children.append((_child_cpu() - child0) / checks * 1e6)
            finally:
                await sidecar.stop()
            if profiler is not None and profile:
                profiler.dump_stats(profile)
            return {"scenario": name, "status": status, "cpu_us": statistics.median(own),
                    "child_us": statistics.median(children)}  # fmt: skip

        try:  # the event loop `extauthz serve` uses by default
            import uvloop
        except ImportError:
            return asyncio.run(main())
        return uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", action="append", choices=sorted(run.SIDECAR_SCENARIOS), metavar="NAME",
                   help="repeatable; default: all of bench/run.py's scenarios")  # fmt: skip
    p.add_argument("--checks", type=int, default=16000, help="Checks per round (default 16000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; the median is reported (default 5)")
    p.add_argument("--profile", metavar="FILE", help="cProfile the measured rounds into FILE (one scenario)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one scenario, print JSON
    args = p.parse_args(argv)
    if not (CONCURRENCY <= args.checks <= 1_000_000 and 1 <= args.rounds <= 20):
        p.error(f"bounds: {CONCURRENCY} <= --checks <= 1000000, 1 <= --rounds <= 20")
    if args.profile and not args.one and len(args.scenario or ()) != 1:
        p.error("--profile needs exactly one --scenario")
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args.checks, args.rounds, args.profile)), flush=True)
        return 0
    print(f"{'scenario':<15} {'first answer':<13} {'CPU us/Check':>13} {'children us':>12}")
    for name in args.scenario or list(run.SIDECAR_SCENARIOS):
        out = subprocess.run([sys.executable, __file__, "--one", name, "--checks", str(args.checks),
                              "--rounds", str(args.rounds), *(["--profile", args.profile] if args.profile else [])],
                             capture_output=True, text=True, timeout=900)  # fmt: skip
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name:<15} failed (rc={out.returncode}): {(out.stderr or out.stdout).strip()[-300:]}")
            continue
        r = json.loads(line[len("RESULT "):])
        print(f"{name:<15} {r['status']:<13} {r['cpu_us']:>13.1f} {r['child_us']:>12.1f}", flush=True)
    print(f"median of {args.rounds} rounds of {args.checks} Checks from {CONCURRENCY} concurrent callers; children: "
          "redis-server, the span exporter process")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
