"""An editor with the schema: the real yaml-language-server (what VS Code's YAML extension and LSP
editors run) opens policy files that name the schema on their first line, as a person would.

Skipped where yaml-language-server is not installed (``npm install -g yaml-language-server``; CI
installs it when npm is there).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
SERVER = shutil.which("yaml-language-server")

pytestmark = pytest.mark.skipif(SERVER is None, reason="yaml-language-server is not installed (npm install -g "
                                                       "yaml-language-server)")


class LanguageServer:
    """Just enough of an LSP client: open documents, read their diagnostics, ask for completions."""

    def __init__(self, root: Path) -> None:
        assert SERVER is not None
        self.proc = subprocess.Popen([SERVER, "--stdio"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.diagnostics: dict[str, list[dict[str, Any]]] = {}
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.request("initialize", {"processId": os.getpid(), "rootUri": root.as_uri(), "capabilities": {
            "workspace": {"configuration": True}, "textDocument": {"completion": {}}}})
        self.notify("initialized", {})
        self.notify("workspace/didChangeConfiguration", {"settings": {"yaml": self._settings()}})

    @staticmethod
    def _settings() -> dict[str, Any]:
        return {"validate": True, "completion": True, "hover": True, "schemaStore": {"enable": False}}

    def _read(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        while True:
            header = b""
            while not header.endswith(b"\r\n\r\n"):
                byte = stream.read(1)
                if not byte:
                    return
                header += byte
            length = int(header.split(b"Content-Length:")[1].split(b"\r\n")[0])
            self.messages.put(json.loads(stream.read(length)))

    def _send(self, message: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.proc.stdin.flush()

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self._send({"method": method, "params": params})

    def request(self, method: str, params: dict[str, Any]) -> Any:
        self.next_id += 1
        self._send({"id": self.next_id, "method": method, "params": params})
        return self._wait(lambda m: m.get("id") == self.next_id and "method" not in m, 30)["result"]

    def _wait(self, match: Any, seconds: float) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            message = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if message.get("method") == "textDocument/publishDiagnostics":
                self.diagnostics[message["params"]["uri"]] = message["params"]["diagnostics"]
            elif "method" in message and "id" in message:  # the server asks: configuration and the like
                items = message.get("params", {}).get("items", [])
                self._send({"id": message["id"], "result": [self._settings() for _ in items] if items else None})
            if match(message):
                return message

    def open(self, path: Path) -> list[dict[str, Any]]:
        """The diagnostics of ``path`` once the server has checked it against its schema."""
        uri = path.as_uri()
        self.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "yaml", "version": 1,
                                                              "text": path.read_text()}})
        self._wait(lambda m: m.get("method") == "textDocument/publishDiagnostics" and m["params"]["uri"] == uri, 30)
        time.sleep(0.5)  # a second round follows once the schema is loaded: keep the last
        while not self.messages.empty():
            self._wait(lambda m: True, 1)
        return self.diagnostics[uri]

    def complete(self, path: Path, line: int, character: int) -> list[str]:
        result = self.request("textDocument/completion", {"textDocument": {"uri": path.as_uri()},
                                                          "position": {"line": line, "character": character}})
        return [item["label"] for item in (result.get("items", []) if isinstance(result, dict) else result or [])]

    def close(self) -> None:
        self.request("shutdown", {})
        self.notify("exit", {})
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server() -> Any:
    client = LanguageServer(ROOT)
    yield client
    client.close()


def test_every_bundled_file_is_clean_in_the_editor(server: LanguageServer) -> None:
    files = sorted((ROOT / "policies").glob("*.yaml"))
    assert files
    for path in files:
        assert server.open(path) == [], path.name


def test_the_editor_flags_mistakes_and_completes_fields(server: LanguageServer, tmp_path: Path) -> None:
    (tmp_path / "schema").mkdir()
    shutil.copy(ROOT / "schema" / "extauthz.schema.json", tmp_path / "schema")
    (tmp_path / "policies").mkdir()
    path = tmp_path / "policies" / "demo.yaml"
    path.write_text(
        "# yaml-language-server: $schema=../schema/extauthz.schema.json\n"
        "apiVersion: extauthz.dev/v1\n"
        "kind: AuthPolicy\n"
        "metadata: {name: demo}\n"
        "spec:\n"
        "  quotas:\n"
        "    - name: per-client\n"
        "      limit: 0\n"
        "      window: 1 minute\n"
        "      onStoreError: crash\n"
        "      windwo: 1m\n"
        "  rules:\n"
        "    - name: all\n"
        "      decision: allow\n"
        "  \n"
    )
    messages = {d["range"]["start"]["line"] + 1: d["message"] for d in server.open(path)}
    assert "minimum of 1" in messages[8]
    assert messages[9] == "must be a duration such as 500ms, 30s, 5m or 1h"
    assert '"deny", "allow", "local"' in messages[10]
    assert "windwo is not allowed" in messages[11]
    assert {"identity", "signature", "network", "match", "response"} <= set(server.complete(path, 14, 2))
