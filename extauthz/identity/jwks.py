"""Verification keys for JWTs: JSON Web Key Sets from a mounted file, a URL or OIDC discovery.

Keys are parsed once into ready-to-use public keys (PyJWT's JWK support on top of
``cryptography``). Only asymmetric signing keys are taken from a key set: a symmetric (``oct``)
key there could turn a public document into an HMAC secret, so such keys are skipped, as are
encryption keys, keys of unknown types and RSA keys under 2048 bits. Every skipped key is
reported, the usable ones serve.

Remote key sets are fetched in the background, off the request path: at start, then every
``interval``, and on a token with an unknown ``kid`` at most once per ``min_interval`` (a request
may wait briefly for that fetch). A failed fetch keeps the last good keys serving; before the
first success there are no keys and tokens are denied with 503 ``keys_unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from extauthz.identity.http import FetchError, HttpClient
from extauthz.telemetry.metrics import jwks_fetch
from extauthz.watched import WatchedPath

__all__ = ["ASYMMETRIC_ALGORITHMS", "FileKeys", "KeySet", "RemoteKeys", "VerificationKey", "parse_jwks"]

log = logging.getLogger("extauthz.identity.jwks")

#: Algorithm -> (key type, curve) it needs.
_FAMILY: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
ASYMMETRIC_ALGORITHMS: tuple[str, ...] = tuple(_FAMILY)
_MAX_KEYS = 100
_MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str | None
    kty: str
    crv: str | None
    #: The JWK's own ``alg``, when it names one: then only that algorithm may use the key.
    alg: str | None
    key: Any

    def accepts(self, alg: str) -> bool:
        family = _FAMILY.get(alg)
        if family is None or family[0] != self.kty:
            return False
        if family[1] is not None and family[1] != self.crv:
            return False
        return self.alg is None or self.alg == alg


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: tuple[VerificationKey, ...]
    #: What changes when the keys change (a refresh returning the same keys is not a change).
    fingerprint: str
    #: Why keys were skipped, for logs and ``extauthz validate``.
    skipped: tuple[str, ...] = ()
    by_kid: dict[str, tuple[VerificationKey, ...]] = field(default_factory=dict)

    def candidates(self, kid: str | None, alg: str) -> tuple[VerificationKey, ...]:
        """Keys that may verify a token with this ``kid`` and ``alg`` (all of them when no kid)."""
        pool = self.by_kid.get(kid, ()) if kid is not None else self.keys
        return tuple(k for k in pool if k.accepts(alg))


def _public(key: Any) -> Any:
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
                  | ed448.Ed448PrivateKey):
        return key.public_key()
    return key


def _parse_key(jwk_data: Any, index: int) -> VerificationKey | str:
    """A usable key, or the reason it is skipped."""
    if not isinstance(jwk_data, dict):
        return f"key {index}: not a JSON object"
    kid = jwk_data.get("kid")
    label = f"key {index}" + (f" (kid {kid!r:.80})" if isinstance(kid, str) else "")
    if kid is not None and not isinstance(kid, str):
        return f"{label}: kid is not a string"
    kty = jwk_data.get("kty")
    if kty == "oct":
        return f"{label}: symmetric (oct) keys are never taken from a key set"
    if kty not in ("RSA", "EC", "OKP"):
        return f"{label}: unsupported key type {str(kty)[:20]!r}"
    use = jwk_data.get("use")
    if use is not None and use != "sig":
        return f"{label}: not a signing key (use={str(use)[:20]!r})"
    ops = jwk_data.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return f"{label}: key_ops does not include verify"
    alg = jwk_data.get("alg")
    if alg is not None and alg not in _FAMILY:
        return f"{label}: algorithm {str(alg)[:20]!r} is not an accepted signing algorithm"
    crv = jwk_data.get("crv")
    if kty == "OKP" and crv != "Ed25519":
        return f"{label}: unsupported OKP curve {str(crv)[:20]!r}"
    try:
        parsed = jwt.PyJWK(jwk_data, algorithm=alg or {"RSA": "RS256", "OKP": "EdDSA"}.get(kty))
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        return f"{label}: cannot be used: {type(exc).__name__}"
    key = _public(parsed.key)
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
        return f"{label}: RSA key of {key.key_size} bits is too small (minimum {_MIN_RSA_BITS})"
    if kty == "EC" and crv not in ("P-256", "P-384", "P-521"):
        return f"{label}: unsupported EC curve {str(crv)[:20]!r}"
    return VerificationKey(kid, kty, crv if isinstance(crv, str) else None, alg, key)


def parse_jwks(document: Any) -> KeySet:
    """The usable keys of a JWKS document; raise ValueError when there are none."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JSON Web Key Set (expected an object with a "keys" list)')
    keys: list[VerificationKey] = []
    skipped: list[str] = []
    for index, data in enumerate(document["keys"]):
        if len(keys) >= _MAX_KEYS:
            skipped.append(f"keys after the first {_MAX_KEYS} usable ones are ignored")
            break
        result = _parse_key(data, index)
        if isinstance(result, str):
            skipped.append(result)
        else:
            keys.append(result)
    if not keys:
        raise ValueError("no usable signing key" + (f" ({'; '.join(skipped[:5])})" if skipped else ""))
    by_kid: dict[str, list[VerificationKey]] = {}
    for key in keys:
        if key.kid is not None:
            by_kid.setdefault(key.kid, []).append(key)
    canonical = json.dumps(
        [d for d in document["keys"] if isinstance(d, dict)], sort_keys=True, separators=(",", ":"), default=str
    )
    fingerprint = hashlib.sha256(canonical.encode()).hexdigest()
    return KeySet(tuple(keys), fingerprint, tuple(skipped), {k: tuple(v) for k, v in by_kid.items()})


def read_jwks_file(path: Path) -> KeySet:
    data = path.read_bytes()
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    keys = parse_jwks(document)
    for reason in keys.skipped:
        log.warning("key set %s: %s", path, reason)
    return keys


class FileKeys:
    """A JWKS file (a mounted Secret or ConfigMap), re-read in the background when it changes."""

    may_wait = False

    def __init__(self, watched: WatchedPath[KeySet]) -> None:
        self.watched = watched

    @property
    def keys(self) -> KeySet | None:
        return self.watched.value

    @property
    def generation(self) -> int:
        return self.watched.generation

    def refresh_for_unknown_kid(self) -> asyncio.Future[None] | None:
        return None  # the file watcher picks up new keys; nothing to fetch


class RemoteKeys:
    """A key set fetched over HTTP (a JWKS URL, or the ``jwks_uri`` of an OIDC discovery document).

    One instance per URL is shared by every policy and survives reloads (``Services.shared``).
    """

    may_wait = True

    def __init__(self, http: HttpClient, *, jwks_url: str | None = None, discovery_url: str | None = None,
                 issuer: str = "", interval: float = 300.0, min_interval: float = 30.0,
                 allow_insecure: bool = False, initial_wait: float = 3.0) -> None:
        if (jwks_url is None) == (discovery_url is None):
            raise ValueError("give exactly one of jwks_url and discovery_url")
        self.http = http
        self.jwks_url = jwks_url
        self.discovery_url = discovery_url
        self.issuer = issuer
        self.interval = interval
        self.min_interval = min_interval
        self.allow_insecure = allow_insecure
        self.initial_wait = initial_wait
        self.keys: KeySet | None = None
        self.generation = 0
        self.last_error: str | None = None
        self.last_success = 0.0
        self.started = False
        self._last_attempt = float("-inf")
        self._inflight: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()

    @property
    def source(self) -> str:
        return self.jwks_url or self.discovery_url or ""

    async def _jwks_uri(self) -> str:
        if self.jwks_url is not None:
            return self.jwks_url
        assert self.discovery_url is not None
        document = await self.http.request_json("GET", self.discovery_url, max_bytes=MAX_JWKS_BYTES)
        if document.get("issuer") != self.issuer:
            raise FetchError("discovery document names another issuer")
        uri = document.get("jwks_uri")
        if not isinstance(uri, str):
            raise FetchError("discovery document has no jwks_uri")
        parts = urlsplit(uri)
        loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
        if parts.scheme != "https" and not (parts.scheme == "http" and (loopback or self.allow_insecure)):
            raise FetchError("discovery document's jwks_uri is not https")
        return uri

    async def _fetch(self) -> None:
        self._last_attempt = started = time.monotonic()
        try:
            uri = await self._jwks_uri()
            document = await self.http.request_json("GET", uri, max_bytes=MAX_JWKS_BYTES)
            keys = parse_jwks(document)
        except (FetchError, ValueError) as exc:
            jwks_fetch("error", time.monotonic() - started)
            self.last_error = str(exc)
            state = "keeping the last good keys" if self.keys is not None else "no keys yet"
            log.warning("key set %s: fetch failed (%s); %s", self.source, exc, state)
            return
        finally:
            self._first_attempt.set()
        jwks_fetch("ok", time.monotonic() - started)
        self.last_error = None
        self.last_success = time.monotonic()
        if self.keys is None or keys.fingerprint != self.keys.fingerprint:
            for reason in keys.skipped:
                log.warning("key set %s: %s", self.source, reason)
            self.keys = keys
            self.generation += 1
            log.info("key set %s: %d keys (generation %d)", self.source, len(keys.keys), self.generation)

    def _refresh(self) -> asyncio.Task[None]:
        """Start a fetch unless one is running; every caller shares the running one."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.get_running_loop().create_task(self._fetch(), name=f"jwks {self.source}")
        return self._inflight

    def refresh_for_unknown_kid(self) -> asyncio.Future[None] | None:
        """Fetch now (at most once per ``min_interval``); the future completes when the fetch does."""
        if not self.started:
            return None
        if self._inflight is not None and not self._inflight.done():
            return asyncio.shield(self._inflight)
        if time.monotonic() - self._last_attempt < self.min_interval:
            return None
        return asyncio.shield(self._refresh())

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._refresh()
            if self.last_error is None:
                failures = 0
                delay = self.interval
            else:
                failures += 1
                delay = min(self.interval, 60.0, 2.0 ** min(failures - 1, 6))
            await asyncio.sleep(delay)

    async def start(self) -> None:
        """Begin fetching; wait up to ``initial_wait`` for the first attempt, then let it go on."""
        self.started = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"jwks refresh {self.source}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), self.initial_wait)

    async def aclose(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._inflight = None
        self.started = False
