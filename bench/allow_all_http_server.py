"""Baseline authorization server for benchmarks, HTTP flavour: Envoy's ext_authz ``http_service``
answered with 200 and no body, always.

    python bench/allow_all_http_server.py --listen 127.0.0.1:PORT

Envoy in HTTP ext_authz mode (deploy/envoy/envoy-http.yaml) sends the client's request line, its
headers and the buffered body prefix as a plain HTTP/1.1 request; a 200 means "allowed", anything
else is passed to the client as the denial. This server parses every request completely (httptools,
the parser the sidecar's HTTP listener uses, on uvloop) and answers ``200`` with ``content-length:
0`` — no header mutations, no policy, no I/O. It is the floor for any Python HTTP authorization
server, as bench/allow_all_server.py is for gRPC ones: the sidecar's HTTP mode is measured against it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import httptools
import uvloop

_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class AllowAll(asyncio.Protocol):
    """One connection: parse requests with httptools, answer each complete one with 200."""

    __slots__ = ("_parser", "_transport")

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.write(_BAD)
                self._transport.close()

    # httptools callbacks (only the one that matters is defined: the others cost a call each)
    def on_message_complete(self) -> None:
        if self._transport is not None:
            self._transport.write(_OK)
            if not self._parser.should_keep_alive():
                self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def serve(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(AllowAll, host, int(port), reuse_port=False, backlog=1024)
    print(f"allow-all HTTP authz server listening on {listen}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Envoy ext_authz HTTP server that allows everything")
    parser.add_argument("--listen", required=True, help="host:port, e.g. 127.0.0.1:9192")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
