"""Client certificates as Envoy forwards them (``include_peer_certificate``), parsed once.

Envoy sends the same PEM for every request of a connection, so parsed certificates are kept in a
small cache keyed by the PEM text: the per-request cost is a dict lookup and two comparisons of
the validity window. The SHA-256 thumbprint computed here is also what RFC 8705
certificate-bound tokens are checked against (``cnf["x5t#S256"]``).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from extauthz import clock
from extauthz.context import CheckContext
from extauthz.identity import Rejected

__all__ = ["CertificateError", "PeerCertificate", "TrustBundle", "check_binding", "load_bundle", "peer_certificate"]

_CACHE_LIMIT = 4096
_cache: dict[str, PeerCertificate | CertificateError] = {}


class CertificateError(ValueError):
    """The forwarded certificate does not parse."""


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    certificate: x509.Certificate
    #: base64url (no padding) SHA-256 of the DER encoding: RFC 8705 ``x5t#S256``.
    thumbprint: str
    not_before: float
    not_after: float
    uris: tuple[str, ...]
    dns_names: tuple[str, ...]
    subject: str
    serial: str

    @property
    def principal(self) -> str:
        """What Envoy reports as the principal: the URI SAN, else the DNS SAN, else the subject."""
        if self.uris:
            return self.uris[0]
        if self.dns_names:
            return self.dns_names[0]
        return self.subject

    def summary(self) -> dict[str, object]:
        """Plain, non-secret facts for ``identity.claims``."""
        return {
            "subject": self.subject,
            "uris": list(self.uris),
            "dns_names": list(self.dns_names),
            "serial": self.serial,
            "not_before": int(self.not_before),
            "not_after": int(self.not_after),
            "x5t#S256": self.thumbprint,
        }


def _parse(pem: str) -> PeerCertificate:
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("utf-8", "replace"))
        der = cert.public_bytes(serialization.Encoding.DER)
        uris: tuple[str, ...] = ()
        dns: tuple[str, ...] = ()
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
            dns = tuple(san.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            pass
        subject = cert.subject.rfc4514_string()
        not_before = cert.not_valid_before_utc.timestamp()
        not_after = cert.not_valid_after_utc.timestamp()
        serial = format(cert.serial_number, "x")
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"certificate does not parse: {type(exc).__name__}") from None
    thumbprint = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    return PeerCertificate(cert, thumbprint, not_before, not_after, uris, dns, subject, serial)


def peer_certificate(pem: str) -> PeerCertificate:
    """The parsed certificate (cached), or raise CertificateError."""
    hit = _cache.get(pem)
    if hit is None:
        try:
            hit = _parse(pem)
        except CertificateError as exc:
            hit = exc
        if len(_cache) >= _CACHE_LIMIT:
            _cache.clear()
        _cache[pem] = hit
    if isinstance(hit, CertificateError):
        raise hit
    return hit


class TrustBundle:
    """CA certificates a client certificate must chain to (defence in depth behind Envoy).

    Envoy forwards only the leaf, so the bundle must hold the issuing CA (intermediates included,
    if any). Results are cached per certificate; the validity window is checked by the caller on
    every request.
    """

    def __init__(self, certificates: list[x509.Certificate]) -> None:
        if not certificates:
            raise ValueError("no certificates in the CA bundle")
        self._store = verification.Store(certificates)
        self._verified: dict[str, str | None] = {}

    def problem(self, peer: PeerCertificate) -> str | None:
        """None when ``peer`` chains to the bundle, else why not."""
        key = peer.thumbprint
        if key in self._verified:
            return self._verified[key]
        # Verify at a moment inside the certificate's window: expiry is the caller's separate check.
        moment = datetime.datetime.fromtimestamp(
            min(max(peer.not_before + 1, clock.wall()), peer.not_after - 1),
            datetime.UTC,
        )
        verifier = (
            verification.PolicyBuilder()
            .store(self._store)
            .time(moment)
            .extension_policies(ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                                ee_policy=verification.ExtensionPolicy.permit_all())
            .build_client_verifier()
        )
        try:
            verifier.verify(peer.certificate, [])
            result = None
        except verification.VerificationError as exc:
            result = f"certificate does not chain to the configured CA: {exc}"
        if len(self._verified) >= _CACHE_LIMIT:
            self._verified.clear()
        self._verified[key] = result
        return result


def load_bundle(path: Path) -> TrustBundle:
    """Read a PEM bundle; raise ValueError (or OSError) when it holds no certificate."""
    data = path.read_bytes()
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"not a PEM certificate bundle: {exc}") from None
    return TrustBundle(certificates)


def check_binding(ctx: CheckContext, thumbprint: str) -> None:
    """RFC 8705: a token bound to a certificate is accepted only with that client certificate."""
    pem = ctx.request.source.certificate
    if not pem:
        raise Rejected("bound_certificate_missing", "token is bound to a client certificate and none was presented")
    try:
        peer = peer_certificate(pem)
    except CertificateError:
        raise Rejected("certificate_unparseable", "client certificate cannot be parsed") from None
    if not hmac.compare_digest(peer.thumbprint.encode(), thumbprint.encode()):
        raise Rejected("bound_certificate_mismatch", "token is bound to another client certificate")
    ctx.note("certificate binding: the client certificate matches cnf x5t#S256")
