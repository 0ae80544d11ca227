"""Opaque tokens checked with the authorization server (OAuth 2.0 Token Introspection, RFC 7662).

One introspection call per unknown token, made with the client credentials from a mounted Secret.
Active tokens are cached until their ``exp`` (capped by ``cacheDuration``), inactive ones briefly
(``inactiveCacheDuration``); concurrent requests with the same token share a single call. The
endpoint unreachable, slow or answering nonsense is a 503 ``introspection_unavailable``, never an
allow. A certificate-bound token (``cnf["x5t#S256"]`` in the response, RFC 8705) is accepted only
with the matching client certificate.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from typing import Any, TypeGuard
from urllib.parse import quote

from extauthz import clock
from extauthz.context import CheckContext
from extauthz.identity import Identity, Rejected, make_identity, source_kind, unavailable
from extauthz.identity.cache import ExpiringCache, credential_digest
from extauthz.identity.certs import check_binding
from extauthz.identity.credentials import CredentialLocation, extract_first, locations_from_spec
from extauthz.identity.http import FetchError, HttpClient, http_client, url_from_spec
from extauthz.policy.build import BuildContext, Spec
from extauthz.telemetry.metrics import introspection_request
from extauthz.watched import WatchedPath

__all__ = ["IntrospectionSource"]

log = logging.getLogger("extauthz.identity.introspection")

_FIELDS = {
    "endpoint", "clientId", "clientSecretFile", "authMethod", "token", "issuer", "audiences", "cacheDuration",
    "inactiveCacheDuration", "timeout", "subjectField", "allowInsecureHttp", "maxTokenBytes", "cacheSize",
}
#: RFC 6750 b64token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
DEFAULT_LOCATION = CredentialLocation("header", "authorization", "Bearer")
_MAX_RESPONSE = 64 * 1024


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _read_secret(path: Any) -> str:
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError("the client secret file is empty")
    return str(text)


#: What a lookup yields and is cached: the identity plus its certificate binding, or a rejection.
_Result = tuple[dict[str, Any], str | None] | Rejected


@source_kind("oauth2Introspection")
class IntrospectionSource:
    kind = "oauth2Introspection"
    challenge_scheme = "Bearer"
    may_wait = True

    def __init__(self, name: str, *, endpoint: str, client_id: str, secret: WatchedPath[str], http: HttpClient,
                 locations: tuple[CredentialLocation, ...], auth_method: str = "basic", issuer: str | None = None,
                 audiences: frozenset[str] = frozenset(), cache_duration: float = 300.0,
                 inactive_cache_duration: float = 10.0, timeout: float = 2.0, subject_field: str = "sub",
                 max_token_bytes: int = 4096, cache_size: int = 10_000) -> None:
        self.name = name
        self.endpoint = endpoint
        self.client_id = client_id
        self.secret = secret
        self.http = http
        self.locations = locations
        self.auth_method = auth_method
        self.issuer = issuer
        self.audiences = audiences
        self.cache_duration = cache_duration
        self.inactive_cache_duration = inactive_cache_duration
        self.timeout = timeout
        self.subject_field = subject_field
        self.max_token_bytes = max_token_bytes
        self.cache: ExpiringCache[_Result] = ExpiringCache(cache_size)
        self._inflight: dict[bytes, asyncio.Task[_Result]] = {}
        #: Calls made to the endpoint (tests and metrics read it).
        self.calls = 0

    async def authenticate(self, ctx: CheckContext) -> Identity | None:
        found = extract_first(self.locations, ctx.request)
        if found is None:
            return None
        token, location = found
        if len(token) > self.max_token_bytes:
            raise Rejected("token_too_large", "token is larger than allowed")
        if _B64TOKEN.fullmatch(token) is None:
            raise Rejected("malformed_token", "token has characters a bearer token cannot have")
        digest = credential_digest(token)
        result = self.cache.get(digest)
        if result is None:
            task = self._inflight.get(digest)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._lookup(token, digest))
                self._inflight[digest] = task
                task.add_done_callback(lambda done: self._finished(digest, done))
            elif ctx.steps is not None:  # explain only: no formatting on the serving path
                ctx.note(f"identity {self.name}: joining an introspection call in flight")
            result = await asyncio.shield(task)
        elif ctx.steps is not None:
            ctx.note(f"identity {self.name}: introspection result cached")
        if isinstance(result, Rejected):
            raise result.again()
        identity, thumbprint = result
        if clock.wall() > identity["claims"].get("exp", math.inf):
            raise Rejected("token_expired", "token has expired")
        if thumbprint is not None:
            check_binding(ctx, thumbprint)
        if not location.forward:
            ctx.remove_headers.append(location.name)
        return identity

    def _finished(self, digest: bytes, task: asyncio.Task[_Result]) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            task.exception()  # retrieved, so an unawaited failure is not reported as lost

    async def _lookup(self, token: str, digest: bytes) -> _Result:
        """One call to the endpoint; the outcome is cached unless the endpoint failed (503)."""
        secret = self.secret.value
        if secret is None:
            raise unavailable("introspection_unavailable", "token cannot be checked now")
        form = {"token": token, "token_type_hint": "access_token"}
        auth = None
        if self.auth_method == "basic":
            # RFC 6749 2.3.1: both parts are form-urlencoded before Basic encoding.
            auth = (quote(self.client_id, safe=""), quote(secret, safe=""))
        else:
            form.update(client_id=self.client_id, client_secret=secret)
        self.calls += 1
        started = clock.wall()
        began = time.monotonic()
        try:
            response = await self.http.request_json("POST", self.endpoint, max_bytes=_MAX_RESPONSE, data=form,
                                                    auth=auth, timeout=self.timeout)
        except FetchError as exc:
            introspection_request("error", time.monotonic() - began)
            log.warning("introspection %s: endpoint failed: %s", self.name, exc)
            raise unavailable("introspection_unavailable", "token cannot be checked now") from None
        introspection_request("active" if response.get("active") is True else "inactive", time.monotonic() - began)
        result = self._interpret(response, started)
        if isinstance(result, Rejected):
            self.cache.put(digest, result, clock.wall() + self.inactive_cache_duration)
        else:
            exp = result[0]["claims"].get("exp")
            until = clock.wall() + self.cache_duration
            if _number(exp):
                until = min(until, float(exp))
            self.cache.put(digest, result, until)
        return result

    def _interpret(self, response: dict[str, Any], now: float) -> _Result:
        if response.get("active") is not True:
            return Rejected("token_inactive", "token is not active")
        exp = response.get("exp")
        if exp is not None and (not _number(exp) or now > exp):
            return Rejected("token_expired", "token has expired")
        nbf = response.get("nbf")
        if _number(nbf) and nbf > now + 30:
            return Rejected("token_not_yet_valid", "token is not valid yet")
        if self.issuer is not None and response.get("iss") != self.issuer:
            return Rejected("wrong_issuer", "token issuer is not accepted")
        if self.audiences:
            aud = response.get("aud")
            token_audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not any(isinstance(a, str) and a in self.audiences for a in token_audiences):
                return Rejected("wrong_audience", "token audience is not accepted")
        subject = ""
        for field in (self.subject_field, "sub", "username", "client_id"):
            value = response.get(field)
            if isinstance(value, str) and value:
                subject = value
                break
        if not subject:
            return Rejected("missing_claim", "token has no subject")
        scope = response.get("scope")
        scopes = scope.split() if isinstance(scope, str) else []
        thumbprint = None
        cnf = response.get("cnf")
        if isinstance(cnf, dict) and cnf:
            thumbprint = cnf.get("x5t#S256")
            if not isinstance(thumbprint, str) or not thumbprint:
                return Rejected("unsupported_token_binding", "token is bound by a method this server does not verify")
        claims = {k: v for k, v in response.items() if k != "active"}
        if exp is not None:
            claims["exp"] = exp
        jti = response.get("jti")
        client_id = response.get("client_id")
        identity = make_identity(
            "oauth2Introspection", self.name, subject, claims, scopes,
            client_id=client_id if isinstance(client_id, str) else "",
            token_id=jti if isinstance(jti, str) else "", certificate_bound=thumbprint is not None,
        )
        return identity, thumbprint

    @classmethod
    def from_spec(cls, name: str, spec: Spec, build: BuildContext) -> IntrospectionSource | None:
        if not spec.is_mapping(allowed=_FIELDS):
            return None
        allow_insecure = spec.bool("allowInsecureHttp", False)
        endpoint = url_from_spec(spec, "endpoint", required=True, allow_insecure=allow_insecure)
        client_id = spec.str("clientId", required=True)
        secret_file = spec.str("clientSecretFile", required=True)
        auth_method = spec.str("authMethod", "basic", choices=("basic", "post"))
        audiences = frozenset(spec.str_list("audiences", nonempty="audience"))  # [] would skip the check
        cache_duration = spec.duration("cacheDuration", 300.0)
        inactive = spec.duration("inactiveCacheDuration", 10.0)
        timeout = spec.duration("timeout", 2.0)
        if not 0 < timeout <= 30:
            spec.error("must be between 1ms and 30s", "timeout")
        locations = locations_from_spec(spec.child("token"), DEFAULT_LOCATION)
        if endpoint is None or client_id is None or secret_file is None:
            return None
        services = build.services
        secret = build.watched(spec.child("clientSecretFile"), secret_file, _read_secret, what="client secret")
        return cls(
            name, endpoint=endpoint, client_id=client_id, secret=secret, http=http_client(services),
            locations=locations, auth_method=auth_method, issuer=spec.str("issuer"), audiences=audiences,
            cache_duration=cache_duration, inactive_cache_duration=inactive, timeout=timeout,
            subject_field=spec.str("subjectField", "sub"),
            max_token_bytes=spec.int("maxTokenBytes", 4096, min=64, max=64 * 1024),
            cache_size=spec.int("cacheSize", 10_000, min=1, max=10_000_000),
        )
