"""CPU per request of the sidecar's HTTP ext_authz path (issue 20), without Envoy.

Two loops, both sending the request Envoy's http_service sends for bench/run.py's default scenario
(GET /api/orders, Host orders.example.com, through deploy/envoy/envoy-http.yaml: its headers_to_add,
x-request-id, x-forwarded-*, x-envoy-*):

    python bench/http_authz_bench.py inproc [-n 20000] [--profile]
        The sidecar's parts in this process (Sidecar: metrics, decision log to /dev/null at the
        default allow sample, inventory), the request fed to one connection object whose transport
        only counts bytes: parse + view + decide + encode + observers, no sockets, no event loop.
        --profile prints the top of a cProfile run.

    python bench/http_authz_bench.py proc [-n 20000] [-c 16]
        ``extauthz serve`` as bench/run.py starts it (tests/e2e/_procs.py), a client in this process
        keeping -c connections busy, one request at a time each (as Envoy does); the sidecar's CPU
        per request from /proc/<pid>/stat. The figure to compare with bench/run.py's "authz us".
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO))


def envoy_request(host: str = "orders.example.com", path: str = "/api/orders", method: str = "GET") -> bytes:
    """What Envoy 1.40 sends on its http_service for a plain-text request without a body."""
    lines = [
        f"{method} {path} HTTP/1.1",
        f"host: {host}",
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-proto: http",
        "x-envoy-internal: true",
        f"x-request-id: {uuid.uuid4()}",
        "x-envoy-expected-rq-timeout-ms: 400",
        "user-agent: wrk",
        f"x-extauthz-authority: v1:{host}",
        "x-extauthz-scheme: v1:http",
        "x-extauthz-protocol: v1:HTTP/1.1",
        "x-extauthz-stream-id: v1:13816414466932290186",
        "x-extauthz-peer-address: v1:127.0.0.1:48512",
        "x-extauthz-local-address: v1:127.0.0.1:10000",
        "x-extauthz-peer-uri-san: v1:",
        "x-extauthz-peer-subject: v1:",
        "x-extauthz-peer-cert: v1:",
        "x-extauthz-sni: v1:",
        "x-extauthz-tls-version: v1:",
        "content-length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class _Transport:
    """Counts what is written; never closes."""

    def __init__(self) -> None:
        self.written = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        self.written += 1
        self.last = data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("connection closed: " + self.last.decode("latin-1"))

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        pass


def inproc(args: argparse.Namespace) -> None:
    from extauthz.server import Settings, Sidecar
    from extauthz.telemetry.decision_log import DecisionLogConfig
    from extauthz.wire.http_authz import HttpAuthzServer, _Connection

    async def run() -> None:
        settings = Settings(Path(args.policies), listen="", http_authz_listen="127.0.0.1:0",
                            decision_log=DecisionLogConfig(destination=os.devnull), access_logs=False)
        sidecar = Sidecar(settings)
        sidecar.load_initial()
        server = HttpAuthzServer(sidecar.authorizer, metrics=sidecar.metrics)
        transports = [_Transport() for _ in range(args.c)]
        feeds = []
        for transport in transports:
            connection = _Connection(server)
            connection.connection_made(transport)  # type: ignore[arg-type]
            feeds.append(connection.data_received)
        data = envoy_request()

        async def rounds(count: int) -> None:
            # Each connection one request at a time, as Envoy sends them; the loop runs between rounds
            # (a decision made in a Task is answered there).
            for _ in range(count):
                for feed in feeds:
                    feed(data)
                await asyncio.sleep(0)
                await asyncio.sleep(0)

        await rounds(2000 // args.c)
        last = transports[0].last
        assert last.startswith(b"HTTP/1.1 200 "), last
        done = sum(t.written for t in transports)
        count = args.n // args.c // args.repeat
        n = count * args.c * args.repeat
        profiler = cProfile.Profile() if args.profile else None
        if profiler is not None:
            profiler.enable()
        segments = []
        for _ in range(args.repeat):
            cpu = time.process_time()
            await rounds(count)
            segments.append((time.process_time() - cpu) / (count * args.c))
        if profiler is not None:
            profiler.disable()
        segments.sort()
        assert sum(t.written for t in transports) == done + n, "not every request was answered"
        print(f"inproc: {n} requests in {args.repeat} segments, us CPU per request (parse+view+decide+encode+"
              f"observers): min {segments[0] * 1e6:.1f}, median {segments[len(segments) // 2] * 1e6:.1f}")
        print(transports[0].last.decode("latin-1"))
        if profiler is not None:
            pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.top)

    import uvloop  # as `extauthz serve` runs (--event-loop auto)

    uvloop.run(run())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc(args: argparse.Namespace) -> None:
    import _procs

    with tempfile.TemporaryDirectory() as workdir:
        sidecar = _procs.start_extauthz(args.policies, workdir, mode="http", name="extauthz-http-bench",
                                        extra_args=args.sidecar_arg)
        try:
            host, port = sidecar.target.rsplit(":", 1)
            data = envoy_request()

            async def client(count: int) -> None:
                reader, writer = await asyncio.open_connection(host, int(port))
                for _ in range(count):
                    writer.write(data)
                    head = await reader.readuntil(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 200 "):
                        raise SystemExit(head.decode("latin-1"))
                writer.close()

            async def load(total: int) -> float:
                per = total // args.c
                started = time.perf_counter()
                await asyncio.gather(*(client(per) for _ in range(args.c)))
                return time.perf_counter() - started

            asyncio.run(load(2000))
            pid = sidecar.proc.pid
            before = _cpu_seconds(pid)
            wall = asyncio.run(load(args.n))
            cpu = _cpu_seconds(pid) - before
            n = args.n // args.c * args.c
            print(f"proc: {n} requests over {args.c} connections in {wall:.2f} s; sidecar {cpu / n * 1e6:.1f} us "
                  f"CPU per request")
        finally:
            sidecar.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["inproc", "proc"])
    p.add_argument("-n", type=int, default=20000, help="requests measured")
    p.add_argument("-c", type=int, default=16, help="connections (proc)")
    p.add_argument("--repeat", type=int, default=10, help="inproc: segments measured (min and median shown)")
    p.add_argument("--policies", default=str(REPO / "policies"))
    p.add_argument("--profile", action="store_true", help="inproc: cProfile the measured loop")
    p.add_argument("--sort", default="tottime")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--sidecar-arg", action="append", default=[], help="proc: extra `extauthz serve` argument")
    args = p.parse_args()
    if args.n < 1 or args.n > 1_000_000:
        p.error("-n must be within 1..1000000")
    (inproc if args.mode == "inproc" else proc)(args)


if __name__ == "__main__":
    main()
