"""Key material and servers for the identity tests, made fresh by the tests themselves.

Shared by tests/unit/identity, tests/unit/checks/test_identity.py, tests/e2e/test_identity_e2e.py
and bench/identity_bench.py (import it after putting this folder on sys.path).

- ``Pki``: a CA and client/server certificates (SPIFFE and DNS SANs, expired, not yet valid).
- ``rsa_key()``, ``ec_key()``, ``public_jwk(key, kid)``, ``mint(key, claims, kid=..., alg=...)``.
- ``JsonServer``: a real HTTP server on 127.0.0.1 serving programmable JSON routes (JWKS, OIDC
  discovery, token introspection), counting the calls and able to go away.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ISSUER = "https://idp.test"
AUDIENCE = "orders-api"

_RSA_CACHE: list[rsa.RSAPrivateKey] = []


def rsa_key(fresh: bool = False) -> rsa.RSAPrivateKey:
    """A 2048-bit RSA key (one per process unless ``fresh``: generating them is slow)."""
    if fresh or not _RSA_CACHE:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if not _RSA_CACHE:
            _RSA_CACHE.append(key)
        return key
    return _RSA_CACHE[0]


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
    else:
        data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    if kid is not None:
        data["kid"] = kid
    data.update(extra)
    return data


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600,
                            "jti": f"jti-{time.monotonic_ns()}", "scope": "orders:read orders:write"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(key: Any, payload: dict[str, Any] | None = None, *, kid: str | None = "k1", alg: str = "RS256",
         headers: dict[str, Any] | None = None) -> str:
    extra = dict(headers or {})
    if kid is not None:
        extra["kid"] = kid
    return jwt.encode(payload if payload is not None else claims(), key, algorithm=alg, headers=extra)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token assembled by hand (for alg none, crit, odd headers)."""
    return ".".join([b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()), b64url(signature)])


# --- certificates ---------------------------------------------------------------------------------
@dataclass
class Issued:
    cert: x509.Certificate
    key: Any

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @property
    def thumbprint(self) -> str:
        return b64url(hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).digest())

    def write(self, folder: Path, name: str) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert_path.write_text(self.pem)
        key_path.write_bytes(self.key_pem)
        return cert_path, key_path


class Pki:
    """A test CA issuing client and server certificates."""

    def __init__(self, name: str = "test-ca") -> None:
        self.ca = self._issue(name, None, ca=True)

    def _issue(self, cn: str, issuer: Issued | None, *, ca: bool = False, uris: tuple[str, ...] = (),
               dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), server: bool = False,
               not_before: datetime.datetime | None = None,
               not_after: datetime.datetime | None = None) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.cert.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
            .not_valid_after(not_after or now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False), critical=True)
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                            critical=False)
        else:
            names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
            names += [x509.DNSName(d) for d in dns]
            names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            if names:
                builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            if issuer is not None:
                builder = builder.add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
        cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
        return Issued(cert, key)

    def client(self, cn: str = "client", *, uris: tuple[str, ...] = (), dns: tuple[str, ...] = (),
               not_before: datetime.datetime | None = None, not_after: datetime.datetime | None = None) -> Issued:
        return self._issue(cn, self.ca, uris=uris, dns=dns, not_before=not_before, not_after=not_after)

    def server(self, cn: str = "127.0.0.1") -> Issued:
        return self._issue(cn, self.ca, ips=("127.0.0.1",), dns=("localhost",), server=True)


# --- a real HTTP server ---------------------------------------------------------------------------
Route = Callable[[dict[str, Any]], tuple[int, Any]]


class JsonServer:
    """ThreadingHTTPServer on 127.0.0.1:<free port>; ``routes[path]`` answers (status, JSON-able body).

    A route function gets {"method", "path", "headers", "form"} and may sleep to simulate a slow
    endpoint. ``calls[path]`` counts requests; ``stop()`` makes the server go away.
    """

    def __init__(self) -> None:
        self.routes: dict[str, Route | tuple[int, Any]] = {}
        self.calls: dict[str, int] = {}
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                request = {"method": self.command, "path": path, "headers": dict(self.headers),
                           "form": dict(parse_qsl(body.decode())) if body else {}}
                with server._lock:
                    server.calls[path] = server.calls.get(path, 0) + 1
                    server.requests.append(request)
                route = server.routes.get(path)
                if route is None:
                    status, payload = 404, {"error": "not found"}
                elif callable(route):
                    status, payload = route(request)
                else:
                    status, payload = route
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _serve
            do_POST = _serve

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="json-server",
                                        daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self._thread.join(5)


# --- running policies -----------------------------------------------------------------------------
POLICY_HEAD = "apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata:\n  name: {name}\nspec:\n"


def write_policy(folder: Path, spec: str, *, name: str = "p", rules: str | None = None) -> Path:
    """Write one policy ``<name>.yaml`` whose spec is ``spec`` (YAML, unindented) plus an allow rule."""
    import textwrap

    folder.mkdir(parents=True, exist_ok=True)
    body = textwrap.dedent(spec).strip("\n")
    body += "\n" + (textwrap.dedent(rules).strip("\n") if rules else "rules:\n  - name: all\n    decision: allow")
    (folder / f"{name}.yaml").write_text(POLICY_HEAD.format(name=name) + textwrap.indent(body, "  ") + "\n")
    return folder


def authorizer(folder: Path, services: Any = None) -> Any:
    from extauthz.decision import Authorizer
    from extauthz.policy import load_folder

    return Authorizer(load_folder(folder, services))


async def decide(auth: Any, sample: dict[str, Any]) -> Any:
    from extauthz.samples import check_request_from_sample

    sample = {"path": "/", **sample}
    return await auth.check(check_request_from_sample(sample), explain=True)


def decide_now(auth: Any, sample: dict[str, Any]) -> Any:
    import asyncio

    return asyncio.run(decide(auth, sample))


def bearer(token: str) -> dict[str, Any]:
    return {"headers": {"authorization": f"Bearer {token}"}}


def www_authenticate(decision: Any) -> list[str]:
    return [v for k, v in decision.client_headers if k == "www-authenticate"]


def exposed(decision: Any) -> str:
    """Everything of a decision that reaches the client, the logs or traces (not the request itself)."""
    return repr((decision.message, decision.reason, decision.rule, decision.client_headers, decision.upstream_headers,
                 decision.steps, decision.attributes, {k: v for k, v in (decision.identity or {}).items()
                                                      if k != "claims"}))
