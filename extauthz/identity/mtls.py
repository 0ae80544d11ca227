"""mTLS peer identity: the client certificate Envoy verified during the TLS handshake.

Envoy reports the peer's principal (``source.principal``: the URI SAN, else the DNS SAN, else the
subject) and, with ``include_peer_certificate``, the certificate itself. A request without either
is not mTLS and has no credentials for this source.

When the certificate is forwarded it is parsed (``cryptography``), refused when it is expired or
not yet valid, optionally verified against a CA bundle (defence in depth should the proxy be
misconfigured), and the principal Envoy reports must be one of its SANs. SPIFFE IDs are parsed
strictly (trust domain and path), with Istio's ``/ns/<namespace>/sa/<service-account>`` exposed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from extauthz import clock
from extauthz.context import CheckContext
from extauthz.identity import Identity, Rejected, make_identity, source_kind
from extauthz.identity.certs import CertificateError, TrustBundle, load_bundle, peer_certificate
from extauthz.policy.build import BuildContext, Spec
from extauthz.watched import WatchedPath, watch_interval

__all__ = ["MtlsSource", "SpiffeId", "compile_principal_globs", "parse_spiffe_id"]

_FIELDS = {"principals", "trustDomains", "requireSpiffe", "certificate"}
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_MAX_SPIFFE = 2048
_IDENTITY_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str
    namespace: str = ""
    service_account: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"trust_domain": self.trust_domain, "path": self.path, "namespace": self.namespace,
                "service_account": self.service_account}


_NOT_SPIFFE = {"trust_domain": "", "path": "", "namespace": "", "service_account": ""}


def parse_spiffe_id(value: str) -> SpiffeId:
    """Parse ``spiffe://trust-domain/path`` per the SPIFFE ID specification; raise ValueError."""
    if len(value) > _MAX_SPIFFE:
        raise ValueError("SPIFFE ID is too long")
    if not value.startswith("spiffe://"):
        raise ValueError("not a spiffe:// URI")
    rest = value[len("spiffe://"):]
    trust_domain, slash, path = rest.partition("/")
    if _TRUST_DOMAIN.fullmatch(trust_domain) is None:
        raise ValueError("invalid trust domain")
    path = slash + path
    if path:
        segments = path[1:].split("/")
        for segment in segments:
            if _SEGMENT.fullmatch(segment) is None or segment in (".", ".."):
                raise ValueError("invalid path segment")
    namespace = service_account = ""
    parts = path.split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
        namespace, service_account = parts[2], parts[4]
    return SpiffeId(trust_domain, path, namespace, service_account)


def compile_principal_globs(patterns: list[str]) -> re.Pattern[str] | None:
    """One regex for a list of principal globs.

    In URI patterns (with ``://``) ``*`` matches within one path segment and ``**`` across
    segments; in DNS-name patterns ``*`` matches within one label (case-insensitive).
    """
    if not patterns:
        return None
    alternatives = []
    for pattern in patterns:
        uri = "://" in pattern
        one = "[^/]*" if uri else "[^./]*"
        out = []
        for i, part in enumerate(pattern.split("**")):
            if i:
                out.append(".*")
            out.append(one.join(re.escape(piece) for piece in part.split("*")))
        regex = "".join(out)
        alternatives.append(regex if uri else f"(?i:{regex})")
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


@source_kind("mtls")
class MtlsSource:
    kind = "mtls"
    challenge_scheme = "mTLS"
    may_wait = False

    def __init__(self, name: str, *, principals: re.Pattern[str] | None = None,
                 trust_domains: frozenset[str] = frozenset(), require_spiffe: bool = False,
                 certificate_required: bool = False, bundle: WatchedPath[TrustBundle] | None = None) -> None:
        self.name = name
        self.principals = principals
        self.trust_domains = trust_domains
        self.require_spiffe = require_spiffe or bool(trust_domains)
        self.certificate_required = certificate_required or bundle is not None
        self.bundle = bundle
        self._identities: dict[tuple[str, str], dict[str, Any] | Rejected] = {}

    async def authenticate(self, ctx: CheckContext) -> Identity | None:
        peer = ctx.request.source
        if not peer.principal and not peer.certificate:
            return None
        thumbprint = ""
        if peer.certificate:
            try:
                cert = peer_certificate(peer.certificate)
            except CertificateError:
                raise Rejected("certificate_unparseable", "client certificate cannot be parsed") from None
            now = clock.wall()
            if now < cert.not_before:
                raise Rejected("certificate_not_yet_valid", "client certificate is not valid yet")
            if now > cert.not_after:
                raise Rejected("certificate_expired", "client certificate has expired")
            if self.bundle is not None:
                bundle = self.bundle.value
                problem = "no CA bundle" if bundle is None else bundle.problem(cert)
                if problem is not None:
                    ctx.note(f"identity {self.name}: {problem}")
                    raise Rejected("certificate_untrusted", "client certificate is not issued by a trusted CA")
            thumbprint = cert.thumbprint
        elif self.certificate_required:
            raise Rejected("certificate_required", "client certificate was not forwarded by the proxy")
        key = (peer.principal, thumbprint)
        result = self._identities.get(key)
        if result is None:
            result = self._identity(peer.principal, peer.certificate)
            if len(self._identities) >= _IDENTITY_CACHE_LIMIT:
                self._identities.clear()
            self._identities[key] = result
        if isinstance(result, Rejected):
            raise result.again()
        return result

    def _identity(self, reported: str, pem: str) -> dict[str, Any] | Rejected:
        """The identity for a principal and certificate, or the rejection (both cacheable)."""
        claims: dict[str, Any] = {}
        principal = reported
        if pem:
            cert = peer_certificate(pem)
            claims = cert.summary()
            sans = cert.uris + cert.dns_names
            if not principal:
                principal = cert.principal
            elif sans and principal not in sans:
                return Rejected("principal_mismatch", "reported principal is not in the client certificate")
        if not principal:
            return Rejected("principal_missing", "client certificate names no principal")
        spiffe = _NOT_SPIFFE
        if principal.startswith("spiffe://"):
            try:
                spiffe = parse_spiffe_id(principal).as_dict()
            except ValueError:
                return Rejected("invalid_spiffe_id", "client SPIFFE ID is malformed")
        elif self.require_spiffe:
            return Rejected("spiffe_id_required", "client certificate carries no SPIFFE ID")
        if self.trust_domains and spiffe["trust_domain"] not in self.trust_domains:
            return Rejected("trust_domain_not_allowed", "client trust domain is not allowed", status=403, error="")
        if self.principals is not None and self.principals.fullmatch(principal) is None:
            return Rejected("principal_not_allowed", "client principal is not allowed", status=403, error="")
        return make_identity("mtls", self.name, principal, claims, [], principal=principal, spiffe=dict(spiffe))

    @classmethod
    def from_spec(cls, name: str, spec: Spec, build: BuildContext) -> MtlsSource | None:
        if spec.value is None:
            spec.value = {}
        if not spec.is_mapping(allowed=_FIELDS):
            return None
        principals = spec.str_list("principals", nonempty="principal")  # [] would allow every principal
        for i, pattern in enumerate(principals):
            if not pattern or any(c.isspace() for c in pattern):
                spec.child("principals").error("must be a principal or glob without spaces", i)
        domains = spec.str_list("trustDomains", nonempty="trust domain")  # [] would allow every domain
        for i, domain in enumerate(domains):
            if _TRUST_DOMAIN.fullmatch(domain) is None:
                spec.child("trustDomains").error("must be a lower-case trust domain name such as cluster.local", i)
        certificate = spec.child("certificate")
        required = False
        bundle = None
        if certificate.present and certificate.is_mapping(allowed={"required", "caFile"}):
            required = certificate.bool("required", False)
            ca_file = certificate.str("caFile")
            if ca_file is not None:
                path = build.resolve_path(ca_file)
                services = build.services
                bundle = services.shared(
                    ("identity", "ca-bundle", str(path)),
                    lambda: WatchedPath(path, load_bundle, what="CA bundle",
                                        interval=watch_interval(services.settings)),
                )
                bundle.refresh()
                if bundle.value is None:
                    certificate.error(bundle.error or "cannot be read", "caFile")
        return cls(name, principals=compile_principal_globs(principals), trust_domains=frozenset(domains),
                   require_spiffe=spec.bool("requireSpiffe", False), certificate_required=required, bundle=bundle)
