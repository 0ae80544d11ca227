"""A tiny HTTP/1.1 upstream: answers every request with 200 and a JSON description of what it
received, so what Envoy forwarded (headers the policy set or removed, the body) can be seen. The
upstream of ``extauthz dev`` and of the e2e tests.

    python -m extauthz.dev.echo --listen 127.0.0.1:PORT

Response body (application/json):
    {"method": "POST", "path": "/raw/path?with=query",
     "headers": {"lowercased-name": ["value", ...], ...},     # every value, in arrival order
     "body_b64": "...", "body": "..." | null,                  # body as base64, and as UTF-8 if it is
     "count": N}                                               # this request's number (1-based)

`GET /__echo/count` returns {"count": N} — the number of requests served so far (not counting these
queries), so a test can prove that Envoy did NOT forward a request. Each served request is also
logged to stderr. Standard library only; request bodies are bounded (16 MiB).
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 16 * 1024 * 1024


class _Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def next(self) -> int:
        with self._lock:
            self.value += 1
            return self.value


COUNTER = _Counter()


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream connection pool expects
    server_version = "echo-upstream"

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(8)  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, sort_keys=True).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _handle(self) -> None:
        try:
            body = self._read_body()
        except ValueError as exc:
            self.close_connection = True
            self._send_json(400, {"error": str(exc)})
            return
        if self.path == "/__echo/count":
            self._send_json(200, {"count": COUNTER.value})
            return
        n = COUNTER.next()
        headers: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        try:
            text: str | None = body.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        self._send_json(
            200,
            {
                "method": self.command,
                "path": self.path,
                "headers": headers,
                "body_b64": base64.b64encode(body).decode("ascii"),
                "body": text,
                "count": n,
            },
        )

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _handle

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"echo-upstream: {self.address_string()} {format % args}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (default 127.0.0.1:0)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), EchoHandler)
    bound_host, bound_port = server.server_address[:2]
    print(f"echo-upstream listening on {bound_host!s}:{bound_port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # leave serve_forever() and close the socket


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.exit(main())
