"""Where a credential is read from: a header (optionally with an Authorization scheme), a query
parameter or a cookie. Shared by the token and key sources, and the one place they read it.

A credential given twice (two Authorization headers that Envoy joined with ",", a repeated query
parameter, two cookies of the same name) is refused as ambiguous rather than guessed at: two
components that pick different copies are how authentication gets bypassed. For a header read
with a scheme that holds whatever the schemes: ``Basic x, Bearer <forged>`` is not "no Bearer
token" (which an ``anonymous`` fallback would let through, forged token and all) but two
credentials, refused before the scheme is even looked at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from extauthz.identity import Rejected
from extauthz.policy.build import Spec
from extauthz.request import Request

__all__ = ["CredentialLocation", "location_from_spec", "locations_from_spec"]

_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_SCHEME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_FIELDS = {"header", "scheme", "query", "cookie", "forward"}
#: One element of a comma-separated Authorization value that continues the credential before it: an
#: auth-param ``name=value`` or ``name="quoted"`` (RFC 9110 11.2). A token68 (``abc==``) has no value.
_AUTH_PARAM = re.compile(r'\s*[A-Za-z0-9!#$%&\'*+.^_`|~-]+\s*=\s*(?:[A-Za-z0-9!#$%&\'*+.^_`|~-]+|"(?:[^"\\]|\\.)*")\s*')


def _ambiguous(where: str) -> Rejected:
    return Rejected("ambiguous_credentials", f"credentials appear more than once in {where}",
                    status=400, error="invalid_request")


@dataclass(frozen=True, slots=True)
class CredentialLocation:
    """One place a credential may be. ``extract`` returns it, None when absent, or raises Rejected."""

    kind: str  # "header", "query" or "cookie"
    name: str
    #: For headers: the Authorization scheme (matched case-insensitively), "" for the whole value.
    scheme: str = ""
    #: False: remove the header from the upstream request once accepted (headers only).
    forward: bool = True

    def describe(self) -> str:
        if self.kind == "header":
            return f"header {self.name}" + (f" ({self.scheme} scheme)" if self.scheme else "")
        return f"{self.kind} {self.name}"

    def presented_in(self, request: Request) -> bool:
        """Whether ``request`` carries something at this location (for a header with a scheme: a
        value in that scheme, or several credentials, one of which may be), valid or not."""
        if self.kind != "header":
            try:
                return self.extract(request) is not None
            except Rejected:
                return True
        value = request.headers.get(self.name)
        if value is None:
            return False
        if not self.scheme or self.name in request.header_lines or ("," in value and _several_credentials(value)):
            return True
        return _split_scheme(value)[0].lower() == self.scheme.lower()

    def extract(self, request: Request) -> str | None:
        if self.kind == "header":
            value = request.headers.get(self.name)
            if value is None:
                return None
            if self.name in request.header_lines:  # sent twice (Envoy's raw header map keeps each line)
                raise _ambiguous(self.describe())
            if self.scheme:
                if "," in value and _several_credentials(value):
                    raise _ambiguous(self.describe())
                scheme, value = _split_scheme(value)
                if scheme.lower() != self.scheme.lower():
                    return None  # one credential in another scheme (e.g. Basic): not ours, absent
            value = value.strip()
            if "," in value:
                raise _ambiguous(self.describe())
            return value
        if self.kind == "query":
            values = request.query_all.get(self.name)
            if not values:
                return None
            if len(values) > 1:
                raise _ambiguous(self.describe())
            return values[0]
        cookies = request.headers.get("cookie")
        if not cookies:
            return None
        found: str | None = None
        # Cookie pairs are separated by ";" (RFC 6265); "," appears when Envoy joined two headers.
        for pair in re.split(r"[;,]", cookies):
            name, sep, value = pair.strip().partition("=")
            if sep and name == self.name:
                if found is not None:
                    raise _ambiguous(self.describe())
                found = value.strip()
                if len(found) >= 2 and found[0] == found[-1] == '"':
                    found = found[1:-1]
        return found


def location_from_spec(spec: Spec, default: CredentialLocation) -> CredentialLocation:
    """Read ``{header: NAME, scheme: S} | {query: NAME} | {cookie: NAME}`` (+ ``forward``)."""
    if not spec.present:
        return default
    if not spec.is_mapping(allowed=_FIELDS):
        return default
    given = [k for k in ("header", "query", "cookie") if spec.child(k).present]
    if len(given) != 1:
        spec.error("give exactly one of header, query or cookie")
        return default
    kind = given[0]
    name = spec.str(kind, required=True) or ""
    scheme = spec.str("scheme", "")
    forward = spec.bool("forward", True)
    if kind == "header":
        name = name.lower()
        if _HEADER_NAME.fullmatch(name) is None or name.startswith(":"):
            spec.error("must be a header name", "header")
        if scheme and _SCHEME.fullmatch(scheme) is None:
            spec.error("must be an authentication scheme name such as Bearer", "scheme")
        if name == "authorization" and not scheme and spec.child("scheme").value is None:
            spec.error("the authorization header needs a scheme (e.g. Bearer or ApiKey)", "scheme")
    else:
        if not name:
            spec.error("must not be empty", kind)
        if spec.child("scheme").present:
            spec.error("scheme applies to header locations only", "scheme")
        if spec.child("forward").present:
            spec.error("forward applies to header locations only", "forward")
    return CredentialLocation(kind, name, scheme if kind == "header" else "", forward)


def locations_from_spec(spec: Spec, default: CredentialLocation) -> tuple[CredentialLocation, ...]:
    """One location or a list of them (tried in order; the first present is used)."""
    if isinstance(spec.value, list):
        found = tuple(location_from_spec(item, default) for item in spec.items(nonempty="location"))
        return found or (default,)
    return (location_from_spec(spec, default),)


def _several_credentials(value: str) -> bool:
    """Whether an Authorization-style value holds more than one credential: Envoy joins repeated
    headers with ",", and RFC 9110 lets one credential be ``scheme name=value, name="a,b"``. Every
    comma-separated element (outside quoted strings) after the first must be such an auth-param;
    anything else (``Bearer x``, a bare token, nothing) starts another credential."""
    elements: list[str] = []
    start = 0
    quoted = escaped = False
    for i, char in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            elements.append(value[start:i])
            start = i + 1
    elements.append(value[start:])
    return any(_AUTH_PARAM.fullmatch(element) is None for element in elements[1:])


def _split_scheme(value: str) -> tuple[str, str]:
    """(scheme, credentials) of an Authorization-style value. Any whitespace ends the scheme (a tab
    passes through Envoy): "Bearer\t<token>" read as another scheme would make a bad token absent,
    and anonymous after it."""
    scheme, *rest = value.split(None, 1) or ("",)
    return scheme, rest[0] if rest else ""


def extract_first(locations: tuple[CredentialLocation, ...], request: Request) -> tuple[str, CredentialLocation] | None:
    """The credential from the first location that has one."""
    for location in locations:
        value = location.extract(request)
        if value is not None:
            return value, location
    return None
