"""The ``hmac`` sidecar scenario of bench/run.py: every request carries an RFC 9421 hmac-sha256 signature.

The setup writes a policy folder and a shared secret, signs the benchmark request once (POST with a
1 KiB JSON body, covering @method, @authority, @path, @query and content-digest) and points the
sidecar at that folder. bench/run.py measures allow-all with this very request too, (b:hmac), so the
(d)/(b:hmac) ratio leaves out what Envoy's body buffering and the bigger CheckRequest cost anyway. The policy requires no nonce (the load generator repeats one request) and accepts
signatures for an hour, so the run measures verification, not rejection.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from extauthz.signatures.base import Message
from extauthz.signatures.digest import content_digest
from extauthz.signatures.signer import sign_message

HOST, PATH = "signed.example.com", "/api/orders?page=1"
_ORDER = {"order": {"sku": "sku-42", "qty": 3}, "note": ""}
#: A 1 KiB JSON body (the size bench/signature_bench.py verifies in process).
BODY = json.dumps({**_ORDER, "note": "n" * (1024 - len(json.dumps(_ORDER)))}).encode()
assert len(BODY) == 1024
POLICY = f"""apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {{name: bench-hmac}}
spec:
  match: {{hosts: ["{HOST}"]}}
  signature:
    keys: {{folder: ../keys}}
    algorithms: [hmac-sha256]
    components: ["@method", "@authority", "@path", "@query"]
    requireNonce: false
    maxAge: 1h
  rules: [{{name: signed, decision: allow}}]
"""


@contextlib.contextmanager
def hmac_setup(workdir: Path) -> Iterator[dict]:
    # Text, not raw random bytes: a .secret file loses one trailing newline (as `echo` writes), so a
    # random secret ending in b"\n" (1 run in 256) would not be the one the sidecar loads.
    secret = os.urandom(32).hex().encode()
    (workdir / "keys").mkdir(parents=True, exist_ok=True)
    (workdir / "keys" / "bench-client.secret").write_bytes(secret)
    (workdir / "policies").mkdir(exist_ok=True)
    (workdir / "policies" / "bench.yaml").write_text(POLICY)
    fields = {"content-type": "application/json", "content-digest": content_digest(BODY)}
    message = Message(method="POST", scheme="http", authority=HOST, target=PATH, fields=fields)
    signed = sign_message(message, ("@method", "@authority", "@path", "@query", "content-digest"),
                          key_id="bench-client", algorithm="hmac-sha256", private_key=secret,
                          created=int(time.time()))
    yield {
        "extra_args": ["--policies", str(workdir / "policies")],  # the last --policies wins
        "method": "POST", "host": HOST, "path": PATH, "body": BODY,
        "headers": {**fields, "signature-input": signed.signature_input, "signature": signed.signature},
    }
