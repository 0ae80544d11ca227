"""Baseline authorization server for benchmarks: Envoy ext_authz Check that always says OK.

    python bench/allow_all_server.py --listen 127.0.0.1:PORT

It implements exactly one RPC, /envoy.service.auth.v3.Authorization/Check, and answers every call with
CheckResponse{status: {code: 0}, ok_response: {}} — no header mutations, no policy, no I/O. Nothing else
is registered (no health service, no reflection), so any other method gets UNIMPLEMENTED. The request
is still deserialised, as any real authorization server has to, so the baseline measures "Envoy +
gRPC hop + protobuf in Python", which is what the extauthz sidecar adds on top of.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import grpc

# Run from a checkout without installing: the generated code lives in extauthz/api/ at the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from extauthz.api.envoy.service.auth.v3 import (
    external_auth_pb2,
    external_auth_pb2_grpc,
)


def _ok_response() -> external_auth_pb2.CheckResponse:
    resp = external_auth_pb2.CheckResponse()
    resp.status.code = 0  # google.rpc.Code.OK
    resp.ok_response.SetInParent()  # empty OkHttpResponse: allow, change nothing
    return resp


class AllowAll(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self) -> None:
        self._ok = _ok_response()

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        return self._ok


async def serve(listen: str) -> None:
    server = grpc.aio.server(
        # Never share the port with a stale instance (SO_REUSEPORT would silently split traffic).
        options=[("grpc.so_reuseport", 0)],
    )
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AllowAll(), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise SystemExit(f"allow-all: cannot listen on {listen}")
    await server.start()
    print(f"allow-all authz server listening on {listen}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Envoy ext_authz gRPC server that allows everything")
    parser.add_argument("--listen", required=True, help="host:port, e.g. 127.0.0.1:9191")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
