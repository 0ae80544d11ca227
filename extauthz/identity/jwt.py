"""JWT bearer tokens (RFC 7519, access tokens per RFC 9068), verified with PyJWT.

What is checked, in this order, each failure with its own reason code: size and shape; the
header (``alg`` from the allowed list, never ``none``; no ``crit`` extension, which we do not
implement; optional ``typ``); the key (by ``kid``; ``jku``/``x5u``/``jwk``/``x5c`` headers are
ignored, keys come only from the configured set); the signature; then the claims (``exp``,
``nbf``, ``iat`` with clock skew, issuer, audience, required claims), the certificate binding
(RFC 8705 ``cnf["x5t#S256"]``) and revocation.

HMAC algorithms are accepted only with a configured shared secret, and the secret is the only
HMAC key there is: a public key can never be used as one (RS256-to-HS256 confusion), and key sets
never provide symmetric keys.

A verified token is cached until it expires (keyed by its SHA-256), so a repeat costs a hash and a
dict lookup; the binding and the revocation list are still checked on every request, and a change
of keys invalidates the cached verifications.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import jwt as pyjwt

from extauthz import clock
from extauthz.context import CheckContext
from extauthz.identity import Identity, Rejected, make_identity, source_kind, unavailable
from extauthz.identity.cache import ExpiringCache, credential_digest
from extauthz.identity.certs import check_binding
from extauthz.identity.credentials import CredentialLocation, extract_first, locations_from_spec
from extauthz.identity.http import http_client, url_from_spec
from extauthz.identity.jwks import ASYMMETRIC_ALGORITHMS, FileKeys, KeySet, RemoteKeys, read_jwks_file
from extauthz.identity.revocation import RevocationList, revocation_from_spec
from extauthz.policy.build import BuildContext, Spec
from extauthz.watched import WatchedPath

__all__ = ["JwtSource"]

log = logging.getLogger("extauthz.identity.jwt")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
_MIN_SECRET = {"HS256": 32, "HS384": 48, "HS512": 64}
_FIELDS = {
    "issuer", "audiences", "algorithms", "jwksFile", "jwksUrl", "discovery", "secretFile", "allowInsecureHttp",
    "jwksRefresh", "clockSkew", "maxAge", "requireExpiry", "requiredClaims", "tokenTypes", "subjectClaim",
    "scopes", "token", "certificateBound", "revocation", "cacheSize", "maxTokenBytes",
}
_JWS = re.compile(r"[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]*={0,2}")
DEFAULT_LOCATION = CredentialLocation("header", "authorization", "Bearer")
_BINDING = "x5t#S256"


def _rejected(reason: str, description: str) -> Rejected:
    return Rejected(reason, description)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _time_claim(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim (exp, nbf, iat), None when absent; anything else is a malformed token."""
    value = claims.get(name)
    if value is not None and not _number(value):
        raise _rejected("malformed_token", f"token {name} claim is not a number")
    return value


@dataclass(frozen=True, slots=True)
class Verified:
    """A verified token as cached: its identity and what must still be checked per request."""

    identity: Identity
    token_id: str
    #: ``cnf["x5t#S256"]`` when the token is certificate-bound.
    thumbprint: str | None
    #: The key generation it was verified under; a different one means verify again.
    generation: tuple[int, int]


def _header(token: str) -> dict[str, Any]:
    """The JOSE header, decoded strictly (the token already matched the compact-JWS shape)."""
    segment = token.split(".", 1)[0].rstrip("=")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise _rejected("malformed_token", "token header cannot be decoded") from None
    if not isinstance(header, dict):
        raise _rejected("malformed_token", "token header is not a JSON object")
    return header


def _read_secret(path: Path) -> bytes:
    data = path.read_bytes().strip()
    if not data:
        raise ValueError("the secret file is empty")
    return data


@source_kind("jwt")
class JwtSource:
    kind = "jwt"
    challenge_scheme = "Bearer"
    _jws: ClassVar[pyjwt.PyJWS] = pyjwt.PyJWS(options={"verify_signature": True, "enforce_minimum_key_length": False})

    def __init__(self, name: str, *, issuer: str, audiences: frozenset[str], algorithms: frozenset[str],
                 keys: FileKeys | RemoteKeys | None, secret: WatchedPath[bytes] | None,
                 locations: tuple[CredentialLocation, ...], clock_skew: float = 30.0, max_age: float | None = None,
                 require_expiry: bool = True, required_claims: tuple[str, ...] = (),
                 token_types: frozenset[str] = frozenset(), subject_claim: str = "sub",
                 scope_claims: tuple[tuple[str, ...], ...] = (("scope",), ("scp",)),
                 scope_map: dict[str, tuple[str, ...]] | None = None, binding_required: bool = False,
                 revocation: RevocationList | None = None, cache_size: int = 10_000,
                 max_token_bytes: int = 16 * 1024, refresh_wait: float = 0.5) -> None:
        self.name = name
        self.issuer = issuer
        self.audiences = audiences
        self.algorithms = algorithms
        self.keys = keys
        self.secret = secret
        self.locations = locations
        self.clock_skew = clock_skew
        self.max_age = max_age
        self.require_expiry = require_expiry
        self.required_claims = required_claims
        self.token_types = token_types
        self.subject_claim = subject_claim
        self.scope_claims = scope_claims
        self.scope_map = scope_map or {}
        self.binding_required = binding_required
        self.revocation = revocation
        self.cache: ExpiringCache[Verified] | None = ExpiringCache(cache_size) if cache_size > 0 else None
        self.max_token_bytes = max_token_bytes
        self.refresh_wait = refresh_wait
        self.may_wait = bool((keys is not None and keys.may_wait and refresh_wait > 0)
                             or (revocation is not None and revocation.may_wait))

    # --- per request -----------------------------------------------------------------------------
    async def authenticate(self, ctx: CheckContext) -> Identity | None:
        found = extract_first(self.locations, ctx.request)
        if found is None:
            return None
        token, location = found
        if len(token) > self.max_token_bytes:
            raise _rejected("token_too_large", "token is larger than allowed")
        now = clock.wall()
        digest = credential_digest(token)
        entry = self.cache.get(digest, now) if self.cache is not None else None
        if entry is None or entry.generation != self._generation():
            entry = await self._verify(token, now)
            if self.cache is not None:
                self.cache.put(digest, entry, self._cache_until(entry, now), now)
        elif ctx.steps is not None:  # explain only: no formatting on the serving path
            ctx.note(f"identity {self.name}: token verified earlier (cached)")
        if entry.thumbprint is not None:
            check_binding(ctx, entry.thumbprint)
        elif self.binding_required:
            raise _rejected("token_not_bound", "token must be bound to a client certificate")
        if self.revocation is not None and await self.revocation.is_revoked(entry.token_id):
            raise _rejected("token_revoked", "token has been revoked")
        if not location.forward:
            ctx.remove_headers.append(location.name)
        return entry.identity

    def _generation(self) -> tuple[int, int]:
        return (self.keys.generation if self.keys is not None else 0,
                self.secret.generation if self.secret is not None else 0)

    def _cache_until(self, entry: Verified, now: float) -> float:
        """Until the token stops being acceptable: its expiry, or its maxAge if that comes first
        (a cached token is not verified again, so its age must end the entry)."""
        claims = entry.identity["claims"]
        exp = claims.get("exp")
        until = exp + self.clock_skew if _number(exp) else now + 300.0
        if self.max_age is not None:
            iat = claims.get("iat")
            if _number(iat):
                until = min(until, iat + self.max_age + self.clock_skew)
        return until

    # --- verification ----------------------------------------------------------------------------
    async def _verify(self, token: str, now: float) -> Verified:
        if _JWS.fullmatch(token) is None:
            raise _rejected("malformed_token", "token is not a signed JWT")
        header = _header(token)
        if "crit" in header or "b64" in header:
            raise _rejected("unsupported_critical_header", "token uses an unsupported critical header")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise _rejected("algorithm_not_allowed", "token algorithm is not accepted")
        if self.token_types:
            typ = header.get("typ")
            kind = typ.lower().removeprefix("application/") if isinstance(typ, str) else ""
            if kind not in self.token_types:
                raise _rejected("wrong_token_type", "token type is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _rejected("malformed_token", "token kid is not a string")
        keys = await self._keys_for(kid, alg)
        payload = self._check_signature(token, alg, keys)
        return self._check_claims(payload, now)

    async def _keys_for(self, kid: Any, alg: str) -> tuple[Any, ...]:
        if alg in HMAC_ALGORITHMS:
            secret = self.secret.value if self.secret is not None else None
            if secret is None:
                raise unavailable("keys_unavailable", "token signing keys are not available")
            return (secret,)
        if self.keys is None:
            raise _rejected("algorithm_not_allowed", "token algorithm is not accepted")
        key_set = self.keys.keys
        found = self._lookup(key_set, kid, alg)
        if not found:
            pending = self.keys.refresh_for_unknown_kid()
            if pending is not None and self.refresh_wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pending, self.refresh_wait)
                key_set = self.keys.keys
                found = self._lookup(key_set, kid, alg)
            if key_set is None:
                raise unavailable("keys_unavailable", "token signing keys are not available")
            if not found:
                raise _rejected("unknown_key", "token is signed with an unknown key")
        return found

    @staticmethod
    def _lookup(key_set: KeySet | None, kid: Any, alg: str) -> tuple[Any, ...]:
        if key_set is None:
            return ()
        candidates = key_set.candidates(kid if isinstance(kid, str) else None, alg)
        if kid is None and len(candidates) > 1:
            return ()  # without a kid the key is ambiguous; trying every key is an amplifier
        return tuple(k.key for k in candidates)

    def _check_signature(self, token: str, alg: str, keys: tuple[Any, ...]) -> dict[str, Any]:
        for key in keys:
            try:
                decoded = self._jws.decode_complete(token, key=key, algorithms=[alg])
            except pyjwt.InvalidSignatureError:
                continue
            except (pyjwt.InvalidKeyError, pyjwt.InvalidAlgorithmError):
                continue
            except pyjwt.DecodeError:
                raise _rejected("malformed_token", "token cannot be decoded") from None
            except pyjwt.InvalidTokenError:
                raise _rejected("malformed_token", "token cannot be decoded") from None
            try:
                payload = json.loads(decoded["payload"])
            except (ValueError, RecursionError):
                raise _rejected("malformed_token", "token payload is not JSON") from None
            if not isinstance(payload, dict):
                raise _rejected("malformed_token", "token payload is not a JSON object")
            return payload
        raise _rejected("bad_signature", "token signature is not valid")

    def _check_claims(self, claims: dict[str, Any], now: float) -> Verified:
        skew = self.clock_skew
        exp = _time_claim(claims, "exp")
        if exp is None:
            if self.require_expiry:
                raise _rejected("missing_claim", "token has no exp claim")
        elif now > exp + skew:
            raise _rejected("token_expired", "token has expired")
        nbf = _time_claim(claims, "nbf")
        if nbf is not None and nbf > now + skew:
            raise _rejected("token_not_yet_valid", "token is not valid yet")
        iat = _time_claim(claims, "iat")
        if iat is not None and iat > now + skew:
            raise _rejected("token_issued_in_future", "token is issued in the future")
        if self.max_age is not None:
            if iat is None:
                raise _rejected("missing_claim", "token has no iat claim")
            if now - iat > self.max_age + skew:
                raise _rejected("token_too_old", "token was issued too long ago")
        if claims.get("iss") != self.issuer:
            raise _rejected("wrong_issuer", "token issuer is not accepted")
        aud = claims.get("aud")
        token_audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in self.audiences for a in token_audiences):
            raise _rejected("wrong_audience", "token audience is not accepted")
        for name in self.required_claims:
            if claims.get(name) is None:
                raise _rejected("missing_claim", f"token has no {name} claim")
        subject = claims.get(self.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise _rejected("missing_claim", f"token has no {self.subject_claim} claim")
        jti = claims.get("jti")
        if jti is not None and not isinstance(jti, str):
            raise _rejected("malformed_token", "token jti claim is not a string")
        thumbprint = None
        cnf = claims.get("cnf")
        if cnf is not None:
            if not isinstance(cnf, dict):
                raise _rejected("malformed_token", "token cnf claim is not an object")
            if _BINDING in cnf:
                thumbprint = cnf[_BINDING]
                if not isinstance(thumbprint, str) or not thumbprint:
                    raise _rejected("malformed_token", "token cnf x5t#S256 is not a string")
            elif cnf:
                raise _rejected("unsupported_token_binding", "token is bound by a method this server does not verify")
        identity = make_identity(
            "jwt", self.name, subject, claims, self._scopes(claims),
            issuer=self.issuer, token_id=jti or "", certificate_bound=thumbprint is not None,
        )
        return Verified(identity, jti or "", thumbprint, self._generation())

    def _scopes(self, claims: dict[str, Any]) -> list[str]:
        scopes: list[str] = []
        for path in self.scope_claims:
            value: Any = claims
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            items = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
            for item in items:
                if not isinstance(item, str):
                    continue
                for scope in self.scope_map.get(item, (item,)):
                    if scope not in scopes:
                        scopes.append(scope)
        return scopes

    # --- policy load -----------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, name: str, spec: Spec, build: BuildContext) -> JwtSource | None:
        if not spec.is_mapping(allowed=_FIELDS):
            return None
        issuer = spec.str("issuer", required=True) or ""
        audiences = spec.str_list("audiences", required=True, nonempty="audience")
        allow_insecure = spec.bool("allowInsecureHttp", False)
        sources = [k for k in ("jwksFile", "jwksUrl", "discovery") if spec.child(k).present]
        secret_file = spec.str("secretFile")
        if len(sources) > 1:
            spec.error("give at most one of jwksFile, jwksUrl and discovery")
        if not sources and secret_file is None:
            spec.error("needs keys: jwksFile, jwksUrl or discovery (and/or secretFile for HMAC)")
        algorithms = cls._algorithms(spec, has_keys=bool(sources), has_secret=secret_file is not None)
        refresh = spec.child("jwksRefresh")
        interval, min_interval, wait = 300.0, 30.0, 0.25
        if refresh.present and refresh.is_mapping(allowed={"interval", "minInterval", "wait"}):
            interval = refresh.duration("interval", 300.0)
            min_interval = refresh.duration("minInterval", 30.0)
            wait = refresh.duration("wait", 0.25)
            if interval < 1:
                refresh.error("must be at least 1s", "interval")
        keys = cls._keys(spec, build, sources[0] if len(sources) == 1 else None, issuer,
                         interval=interval, min_interval=min_interval, allow_insecure=allow_insecure)
        secret = None
        if secret_file is not None:
            secret = cls._secret(spec, build, secret_file, algorithms)
        skew = spec.duration("clockSkew", 30.0)
        if skew > 300:
            spec.error("must be at most 5m", "clockSkew")
        max_age = spec.duration("maxAge")
        token_types = frozenset(
            t.lower().removeprefix("application/") for t in spec.str_list("tokenTypes", nonempty="token type")
        )
        scope_claims: tuple[tuple[str, ...], ...] = (("scope",), ("scp",))
        scope_map: dict[str, tuple[str, ...]] = {}
        scopes = spec.child("scopes")
        if scopes.present and scopes.is_mapping(allowed={"claims", "map"}):
            if scopes.child("claims").present:
                scope_claims = tuple(tuple(c.split(".")) for c in scopes.str_list("claims", nonempty="claim"))
            # A value mapped to [] grants nothing (it drops that claim value): narrower, so allowed.
            for value, node in scopes.child("map").entries(nonempty="claim value"):
                if isinstance(node.value, str):
                    scope_map[value] = (node.value,)
                elif isinstance(node.value, list) and all(isinstance(v, str) for v in node.value):
                    scope_map[value] = tuple(node.value)
                else:
                    node.error("must be a scope or a list of scopes")
        bound = spec.str("certificateBound", "optional", choices=("optional", "required"))
        revocation = revocation_from_spec(spec.child("revocation"), build)
        cache_size = spec.int("cacheSize", 10_000, min=0, max=10_000_000)
        max_bytes = spec.int("maxTokenBytes", 16 * 1024, min=256, max=1024 * 1024)
        locations = locations_from_spec(spec.child("token"), DEFAULT_LOCATION)
        required_claims = tuple(spec.str_list("requiredClaims", nonempty="claim"))
        return cls(
            name, issuer=issuer, audiences=frozenset(audiences), algorithms=algorithms, keys=keys, secret=secret,
            locations=locations, clock_skew=skew, max_age=max_age,
            require_expiry=spec.bool("requireExpiry", True), required_claims=required_claims,
            token_types=token_types, subject_claim=spec.str("subjectClaim", "sub"), scope_claims=scope_claims,
            scope_map=scope_map, binding_required=bound == "required", revocation=revocation,
            cache_size=cache_size, max_token_bytes=max_bytes, refresh_wait=wait,
        )

    @staticmethod
    def _algorithms(spec: Spec, *, has_keys: bool, has_secret: bool) -> frozenset[str]:
        given = spec.str_list("algorithms", nonempty="algorithm")
        if not spec.child("algorithms").present:
            default = (ASYMMETRIC_ALGORITHMS if has_keys else ()) + (("HS256",) if has_secret else ())
            return frozenset(default)
        accepted: set[str] = set()
        for i, alg in enumerate(given):
            node = spec.child("algorithms")
            if alg.lower() == "none":
                node.error("'none' is never accepted: tokens must be signed", i)
            elif alg in HMAC_ALGORITHMS:
                if not has_secret:
                    node.error(f"{alg} needs secretFile (a public key is never used as an HMAC secret)", i)
                accepted.add(alg)
            elif alg in ASYMMETRIC_ALGORITHMS:
                if not has_keys:
                    node.error(f"{alg} needs jwksFile, jwksUrl or discovery", i)
                accepted.add(alg)
            else:
                node.error(f"unknown algorithm (known: {', '.join(ASYMMETRIC_ALGORITHMS + HMAC_ALGORITHMS)})", i)
        return frozenset(accepted)

    @staticmethod
    def _keys(spec: Spec, build: BuildContext, which: str | None, issuer: str, *, interval: float,
              min_interval: float, allow_insecure: bool) -> FileKeys | RemoteKeys | None:
        services = build.services
        if which == "jwksFile":
            watched = build.watched(spec.child("jwksFile"), spec.str("jwksFile") or "", read_jwks_file, what="key set")
            return FileKeys(watched)
        if which == "jwksUrl":
            url = url_from_spec(spec, "jwksUrl", allow_insecure=allow_insecure)
            if url is None:
                return None
            return services.shared(
                ("identity", "jwks-url", url, interval, min_interval),
                lambda: RemoteKeys(http_client(services), jwks_url=url, interval=interval, min_interval=min_interval,
                                   allow_insecure=allow_insecure),
            )
        if which == "discovery":
            node = spec.child("discovery")
            if node.value is True:
                if not issuer.startswith(("https://", "http://")):
                    spec.error("discovery: true needs an issuer URL (or give the discovery document URL)", "discovery")
                    return None
                url = issuer.rstrip("/") + "/.well-known/openid-configuration"
                probe = Spec(spec.build, spec.path, {"discovery": url})
                url = url_from_spec(probe, "discovery", allow_insecure=allow_insecure)
            elif isinstance(node.value, str):
                url = url_from_spec(spec, "discovery", allow_insecure=allow_insecure)
            else:
                node.error("must be true or the URL of an OpenID Connect discovery document")
                return None
            if url is None:
                return None
            return services.shared(
                ("identity", "oidc-discovery", url, issuer, interval, min_interval),
                lambda: RemoteKeys(http_client(services), discovery_url=url, issuer=issuer, interval=interval,
                                   min_interval=min_interval, allow_insecure=allow_insecure),
            )
        return None

    @staticmethod
    def _secret(spec: Spec, build: BuildContext, secret_file: str, algorithms: frozenset[str]) -> WatchedPath[bytes]:
        watched = build.watched(spec.child("secretFile"), secret_file, _read_secret, what="HMAC secret")
        if watched.value is not None:
            needed = max((_MIN_SECRET[a] for a in algorithms if a in _MIN_SECRET), default=32)
            if len(watched.value) < needed:
                spec.error(f"the secret must be at least {needed} bytes for the HMAC algorithms allowed", "secretFile")
        return watched
