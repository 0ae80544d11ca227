"""An application with a login form, for the outcome tests: it answers what real ones do.

    POST /login   form user=...&password=...: 200 for the password "right", 401 otherwise
    GET  /healthz 200
    anything else 404

Run: python tests/e2e/login_upstream.py --listen 127.0.0.1:PORT (127.0.0.1 only; standard library).
"""

from __future__ import annotations

import argparse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(200, b"ok\n") if self.path == "/healthz" else self._answer(404, b"not found\n")

    def do_POST(self) -> None:
        length = min(int(self.headers.get("Content-Length") or 0), 65536)
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        if self.path != "/login":
            self._answer(404, b"not found\n")
        elif form.get("password") == ["right"]:
            self._answer(200, b"welcome\n")
        else:
            self._answer(401, b"wrong user or password\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True, help="127.0.0.1:PORT")
    host, _, port = parser.parse_args().listen.rpartition(":")
    if host != "127.0.0.1":
        raise SystemExit("listen on 127.0.0.1 only")
    ThreadingHTTPServer((host, int(port)), Handler).serve_forever()


if __name__ == "__main__":
    main()
