"""Proof that the e2e harness works: real Envoy + bench/allow_all_server.py + echo upstream."""

from __future__ import annotations

import datetime
import json
import ssl
import subprocess
import sys
from pathlib import Path

import _procs
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.authz_modes]


_request = _procs.http_request


@pytest.fixture(scope="module")
def allow_all(authz_mode, request):
    """The allow-all server of this module's mode (gRPC or HTTP ext_authz)."""
    return request.getfixturevalue("allow_all_http_authz" if authz_mode == "http" else "allow_all_authz")


@pytest.mark.parametrize("mode", list(_procs.AUTHZ_MODES))
def test_deployed_config_validates(mode: str) -> None:
    res = subprocess.run(
        [_procs.envoy_binary(), "--mode", "validate", "-c", str(_procs.AUTHZ_MODES[mode])],
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout.decode()[-2000:] + res.stderr.decode()[-2000:]


def test_allowed_request_reaches_upstream_with_echo_body(envoy_factory, allow_all, echo_upstream):
    envoy = envoy_factory(ext_authz=allow_all.target, upstream_port=echo_upstream.port)
    before = echo_upstream.request_count()

    status, _, raw = _request(
        envoy.port,
        "POST",
        "/api/orders?page=2&page=3",
        body=b'{"item": 42}',
        headers={"Host": "orders.example.com", "X-Test": "harness", "Content-Type": "application/json"},
    )

    assert status == 200, raw
    echo = json.loads(raw)
    assert echo["method"] == "POST"
    assert echo["path"] == "/api/orders?page=2&page=3"
    assert echo["headers"]["host"] == ["orders.example.com"]
    assert echo["headers"]["x-test"] == ["harness"]
    assert echo["body"] == '{"item": 42}'
    assert echo_upstream.request_count() == before + 1
    assert envoy.stats(r"ext_authz\.ok$")["http.ingress_http.ext_authz.ok"] == 1


def test_unreachable_authz_fails_closed_with_503(envoy_factory, echo_upstream):
    closed = f"127.0.0.1:{_procs.free_port()}"  # nothing listens there
    envoy = envoy_factory(ext_authz=closed, upstream_port=echo_upstream.port)
    before = echo_upstream.request_count()

    for path in ("/api/orders", "/"):
        status, _, body = _request(envoy.port, "GET", path, headers={"Host": "orders.example.com"})
        assert status == 503, body

    assert echo_upstream.request_count() == before, "Envoy forwarded a request it could not authorise"
    stats = envoy.stats(r"ingress_http\.ext_authz\.")
    assert stats["http.ingress_http.ext_authz.error"] == 2
    assert stats.get("http.ingress_http.ext_authz.ok", 0) == 0


def test_direct_response_without_authz(envoy_factory):
    envoy = envoy_factory(ext_authz=None, upstream_port=None, access_log=False)
    status, _, body = _request(envoy.port, "GET", "/anything")
    assert (status, body) == (200, b"ok\n")
    assert not any("ext_authz" in name for name in envoy.stats(r"ext_authz"))


def test_authz_timeout_knob_fails_closed(envoy_factory, echo_upstream):
    """A server that accepts TCP but never speaks HTTP/2 -> the Check times out -> 503."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        envoy = envoy_factory(
            ext_authz=f"127.0.0.1:{silent.getsockname()[1]}",
            upstream_port=echo_upstream.port,
            ext_authz_timeout=0.2,
        )
        before = echo_upstream.request_count()
        status, _, _ = _request(envoy.port, "GET", "/api/orders")
    assert status == 503
    assert echo_upstream.request_count() == before


def _write_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def make(cn, issuer_cert, issuer_key, *, ca=False, san=None, eku=None):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_cert.subject if issuer_cert else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return cert, key

    import ipaddress

    ca_cert, ca_key = make("harness-ca", None, None, ca=True)
    srv_cert, srv_key = make(
        "127.0.0.1", ca_cert, ca_key,
        san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], eku=[ExtendedKeyUsageOID.SERVER_AUTH],
    )  # fmt: skip
    cli_cert, cli_key = make(
        "client-1", ca_cert, ca_key,
        san=[x509.UniformResourceIdentifier("spiffe://example.org/ns/default/sa/client-1")],
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )  # fmt: skip
    files = {}
    for label, obj in {"ca": ca_cert, "server": srv_cert, "client": cli_cert}.items():
        files[label] = directory / f"{label}.crt"
        files[label].write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    for label, key in {"server_key": srv_key, "client_key": cli_key}.items():
        files[label] = directory / f"{label}.pem"
        files[label].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return files


def test_downstream_mtls_knob(envoy_factory, allow_all, echo_upstream, tmp_path):
    pki = _write_pki(tmp_path)
    envoy = envoy_factory(
        ext_authz=allow_all.target,
        upstream_port=echo_upstream.port,
        tls=_procs.DownstreamTls(pki["server"], pki["server_key"], pki["ca"]),
        include_peer_certificate=True,
    )
    assert envoy.url.startswith("https://")

    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ctx.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
    status, _, body = _request(envoy.port, "GET", "/api/orders", tls=ctx)
    assert status == 200, body
    assert json.loads(body)["path"] == "/api/orders"

    no_cert = ssl.create_default_context(cafile=str(pki["ca"]))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _request(envoy.port, "GET", "/api/orders", tls=no_cert)


def test_startup_failure_reports_log_tail(tmp_path):
    proc = _procs.ManagedProcess(
        "doomed",
        [sys.executable, "-c", "import sys; print('policy file is broken', flush=True); sys.exit(3)"],
        tmp_path / "doomed.log",
    )
    try:
        with pytest.raises(_procs.StartupError, match="policy file is broken") as excinfo:
            _procs.wait_for_http(f"http://127.0.0.1:{_procs.free_port()}/readyz", timeout=10, proc=proc)
        assert "exited with code 3" in str(excinfo.value)
    finally:
        proc.stop()


def test_extauthz_factory_starts_the_sidecar(extauthz_factory):
    available, why = _procs.extauthz_available()
    if not available:
        pytest.skip(f"sidecar not available yet: {why}")
    if not _procs.DEFAULT_POLICIES.is_dir():
        pytest.skip(f"no example policies at {_procs.DEFAULT_POLICIES}")
    sidecar = extauthz_factory(_procs.DEFAULT_POLICIES)
    status, _ = _procs.http_get("127.0.0.1", sidecar.http_port, "/readyz")
    assert status == 200
    _procs.wait_for_tcp("127.0.0.1", sidecar.grpc_port, timeout=5, proc=sidecar.proc)
    rc = sidecar.stop()
    assert rc != -9, "sidecar ignored SIGTERM and had to be killed\n" + sidecar.proc.log_tail()
