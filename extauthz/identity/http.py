"""Outgoing HTTP for key sets, OIDC discovery and token introspection: one shared client.

Bounded in every direction: connect/read timeouts, no redirects (a redirect could point key
fetching somewhere else), a maximum response size read as a stream, and JSON objects only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from extauthz.policy.build import Services, Spec

__all__ = ["FetchError", "HttpClient", "http_client", "url_from_spec"]

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class FetchError(Exception):
    """An HTTP call failed (network, status, size, not JSON). The message never holds a secret."""


class HttpClient:
    """An ``httpx.AsyncClient`` created on first use inside the running event loop."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                follow_redirects=False,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                headers={"user-agent": "extauthz", "accept": "application/json"},
            )
        return self._client

    async def request_json(self, method: str, url: str, *, max_bytes: int, timeout: float | None = None,
                           data: Mapping[str, str] | None = None, auth: tuple[str, str] | None = None,
                           ok_statuses: tuple[int, ...] = (200,)) -> dict[str, Any]:
        """Make a request and return the JSON object it answered; raise FetchError otherwise."""
        kwargs: dict[str, Any] = {}
        if data is not None:
            kwargs["data"] = dict(data)
        if auth is not None:
            kwargs["auth"] = httpx.BasicAuth(*auth)
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout)
        try:
            async with self.client.stream(method, url, **kwargs) as response:
                if response.status_code not in ok_statuses:
                    raise FetchError(f"HTTP {response.status_code}")
                length = response.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > max_bytes:
                    raise FetchError(f"response larger than {max_bytes} bytes")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise FetchError(f"response larger than {max_bytes} bytes")
        except httpx.HTTPError as exc:
            raise FetchError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
        try:
            document = json.loads(bytes(body))
        except ValueError as exc:
            raise FetchError(f"response is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise FetchError("response is not a JSON object")
        return document

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def http_client(services: Services) -> HttpClient:
    """The sidecar's one HTTP client (connection pooling across key sets and introspection)."""
    return services.shared(("identity", "http-client"), HttpClient)


def url_from_spec(spec: Spec, key: str, *, required: bool = False, allow_insecure: bool = False) -> str | None:
    """An https URL (http only for loopback, or when the policy explicitly allows it)."""
    value = spec.str(key, required=required)
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        spec.error("must be an http(s) URL", key)
        return None
    if parts.username or parts.password:
        spec.error("must not contain credentials (use the secret file options)", key)
        return None
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK and not allow_insecure:
        spec.error("must use https (set allowInsecureHttp: true to accept plain http inside a trusted network)", key)
        return None
    return value
