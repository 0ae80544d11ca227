"""PolicyTest documents read and checked, every field, with the line of every problem.

``extauthz validate``, ``explain`` and ``test`` check the PolicyTest documents of a folder as fully as
its policies (the compiler calls :func:`check_tests`): an unknown field (``decison``, ``methd``), a
wrong type, a key file that cannot be read or a token a request names but the document does not
define is an error naming the file, the line and the field. The sidecar itself never reads them
beyond their kind: their key files are test material and stay out of deployments.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extauthz.policy.build import BuildContext, Services, Spec, parse_duration
from extauthz.policy.compiler import read_metadata
from extauthz.policy.model import API_VERSION, DOCUMENT_FIELDS, Document, PolicyError
from extauthz.policytest.tokens import (
    DEFAULT_LIFETIME,
    SIGNING_ALGORITHMS,
    Issuer,
    TokenError,
    TokenSpec,
    certificate_thumbprint,
    read_signing_key,
)
from extauthz.samples import PEER_FIELDS, REQUEST_FIELDS, SampleError, check_request_from_sample

__all__ = [
    "TEST_KIND",
    "Expectation",
    "HeaderExpectation",
    "TestCase",
    "TestSuite",
    "check_tests",
    "compile_suites",
    "substitute",
]

TEST_KIND = "PolicyTest"

_SPEC_FIELDS = ("cases", "clock", "issuers", "tokens")
_ISSUER_FIELDS = ("algorithm", "claims", "expires_in", "key", "key_id", "type")
_TOKEN_FIELDS = ("bound_to", "claims", "expires_in", "issuer")
_CASE_FIELDS = ("advance", "expect", "name", "request")
_EXPECT_FIELDS = ("decision", "headers", "message", "policy", "reason", "removed_headers", "response_headers", "rule",
                  "status")  # fmt: skip
_MATCHERS = ("contains", "equals", "matches")
#: Extra fields of ``source``/``destination`` in a PolicyTest request (not in request files).
_PEER_EXTRA = ("certificate_file",)
#: Extra fields of a PolicyTest request (not in request files): HTTP Basic credentials, written as
#: user and password rather than base64.
_REQUEST_EXTRA = ("basic_auth",)
_STRING_FIELDS = ("method", "host", "path", "body", "body_base64", "sni", "id", "scheme", "protocol")

_SHORT_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,62}[A-Za-z0-9])?")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: ``${tokens.NAME}`` in any string of a request: the signed token NAME.
PLACEHOLDER = re.compile(r"\$\{tokens\.([^}]*)\}")


@dataclass(frozen=True, slots=True)
class HeaderExpectation:
    """What one header must be: a value, text it contains, a pattern it matches, or absent."""

    name: str
    equals: str | None = None
    contains: str | None = None
    matches: re.Pattern[str] | None = None
    #: True: the header must not be there.
    absent: bool = False

    def problem(self, values: Sequence[str]) -> str | None:
        """None when ``values`` (the header's values, in order) satisfy this, else what is wrong."""
        got = values[0] if len(values) == 1 else (list(values) if values else None)
        if self.absent:
            return None if not values else f"expected no value, got {got!r}"
        if not values:
            return f"expected {self._wanted()}, got none"
        if any(self._fits(value) for value in values):
            return None
        return f"expected {self._wanted()}, got {got!r}"

    def _fits(self, value: str) -> bool:
        if self.equals is not None:
            return value == self.equals
        if self.contains is not None:
            return self.contains in value
        return self.matches is not None and self.matches.fullmatch(value) is not None

    def _wanted(self) -> str:
        if self.equals is not None:
            return repr(self.equals)
        if self.contains is not None:
            return f"a value containing {self.contains!r}"
        return f"a value matching {self.matches.pattern!r}" if self.matches is not None else "a value"


@dataclass(frozen=True, slots=True)
class Expectation:
    """What a case expects; None fields are not checked."""

    #: "allow" or "deny" (for a dry-run policy: what enforcing would decide).
    decision: str
    status: int | None = None
    reason: str | None = None
    policy: str | None = None
    rule: str | None = None
    message: str | None = None
    #: Headers set on (or, ``absent``, kept off) the request sent upstream.
    upstream: tuple[HeaderExpectation, ...] = ()
    #: Headers removed from the request sent upstream.
    removed: tuple[str, ...] = ()
    #: Headers of the response to the client (Retry-After, RateLimit, WWW-Authenticate, ...).
    response: tuple[HeaderExpectation, ...] = ()


@dataclass(frozen=True, slots=True)
class TestCase:
    name: str
    line: int
    #: The request as written, ``certificate_file`` read; ``${tokens.NAME}`` is filled in when run.
    request: Mapping[str, Any]
    expect: Expectation
    #: Seconds the fixed clock moves on before this case.
    advance: float = 0.0


@dataclass(frozen=True, slots=True)
class TestSuite:
    """One PolicyTest document: its cases share a clock and the sidecar's state, in order."""

    name: str
    file: str
    line: int
    #: The fixed time (seconds since the epoch) the first case runs at; None: the real clock.
    clock: float | None
    tokens: tuple[TokenSpec, ...]
    cases: tuple[TestCase, ...]


def check_tests(documents: Sequence[Document], folder: Path) -> list[PolicyError]:
    """Every problem of the PolicyTest documents of a folder (what the policy compiler reports)."""
    return compile_suites(documents, folder)[1]


def compile_suites(documents: Sequence[Document], folder: Path) -> tuple[list[TestSuite], list[PolicyError]]:
    """The suites of ``documents`` (PolicyTest documents), and every problem found in them."""
    errors: list[PolicyError] = []
    suites: list[TestSuite] = []
    names: dict[str, Document] = {}
    services = Services(settings={"offline": True})
    for doc in documents:
        build = BuildContext(doc, folder, services, errors)
        if doc.name in names:
            first = names[doc.name]
            build.error(("metadata", "name"), f"duplicate PolicyTest name (also in {first.file}:{first.line_of(())})")
            continue
        names[doc.name] = doc
        suite = _suite(build)
        if suite is not None:
            suites.append(suite)
    return suites, errors


def _suite(build: BuildContext) -> TestSuite | None:
    doc = build.document
    before = len(build.errors)
    root = Spec(build, (), doc.body)
    root.is_mapping(allowed=DOCUMENT_FIELDS)
    root.str("apiVersion", required=True, choices=(API_VERSION,))
    root.str("kind", required=True, choices=(TEST_KIND,))
    read_metadata(root)
    spec = root.child("spec")
    if not spec.present:
        root.error("is required and must be a mapping", "spec")
        return None
    if not spec.is_mapping(allowed=_SPEC_FIELDS):
        return None
    clock = _clock(spec, "clock")
    issuers = {name: issuer for name, node in spec.child("issuers").entries()
               if (issuer := _issuer(name, node)) is not None}  # fmt: skip
    declared = set(spec.child("issuers").value) if isinstance(spec.child("issuers").value, Mapping) else set()
    tokens: dict[str, TokenSpec] = {}
    for name, node in spec.child("tokens").entries():
        token = _token(name, node, issuers, declared)
        if token is not None:
            tokens[name] = token
    cases_node = spec.child("cases")
    items = cases_node.items()
    if cases_node.present and isinstance(cases_node.value, list) and not items:
        cases_node.error("must list at least one case")
    elif not cases_node.present:
        spec.error("is required: a list of cases", "cases")
    cases: list[TestCase] = []
    seen: set[str] = set()
    for i, node in enumerate(items):
        case = _case(i, node, tokens, clock is not None)
        if case is None:
            continue
        if case.name in seen:
            node.error(f"duplicate case name {case.name!r}", "name")
            continue
        seen.add(case.name)
        cases.append(case)
    if len(build.errors) != before:
        return None
    return TestSuite(doc.name, doc.file, doc.line_of(()), clock, tuple(tokens.values()), tuple(cases))


def _clock(spec: Spec, key: str) -> float | None:
    """``spec.clock``: an RFC 3339 time (``2025-06-01T12:00:00Z``) or seconds since the epoch."""
    node = spec.child(key)
    value = node.value
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        spec.number(key)
        if math.isfinite(value) and value >= 0:
            return float(value)
    if isinstance(value, str):
        spec.str(key)
        with contextlib.suppress(ValueError):
            value = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    # YAML reads an unquoted timestamp as a datetime, a bare date as a date; without a zone, UTC
    # (as YAML says).
    if isinstance(value, datetime.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=datetime.UTC)).timestamp()
    if isinstance(value, datetime.date):
        return datetime.datetime(value.year, value.month, value.day, tzinfo=datetime.UTC).timestamp()
    node.error("must be a time such as 2025-06-01T12:00:00Z, or seconds since the epoch")
    return None


def _signed_duration(node: Spec, key: str, default: float | None) -> float | None:
    """A duration that may be negative (a token that expired an hour ago: ``expires_in: -1h``)."""
    child = node.child(key)
    if child.value is None:
        return default
    if isinstance(child.value, str):
        node.str(key)
    elif isinstance(child.value, int | float) and not isinstance(child.value, bool):
        node.number(key)
    text = child.value.strip() if isinstance(child.value, str) else child.value
    negative = isinstance(text, str) and text.startswith("-")
    seconds = parse_duration(text[1:] if negative else text)
    if seconds is None or not math.isfinite(seconds) or (seconds < 0 and not negative):
        child.error("must be a duration such as 1h, 30m or -1h")
        return default
    return -seconds if negative else seconds


def _claims(node: Spec) -> dict[str, Any]:
    if not node.present:
        return {}
    if not node.is_mapping():
        return {}
    return {str(name): _plain(value) for name, value in node.value.items()}


def _plain(value: Any) -> Any:
    """A claim value as JSON has it (YAML timestamps become seconds since the epoch)."""
    if isinstance(value, datetime.datetime):
        return int((value if value.tzinfo else value.replace(tzinfo=datetime.UTC)).timestamp())
    if isinstance(value, datetime.date):
        return int(datetime.datetime(value.year, value.month, value.day, tzinfo=datetime.UTC).timestamp())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _issuer(name: str, node: Spec) -> Issuer | None:
    if not _SHORT_NAME.fullmatch(name):
        node.error("an issuer name is letters, digits, '_', '-' and '.'")
        return None
    if not node.is_mapping(allowed=_ISSUER_FIELDS):
        return None
    before = len(node.build.errors)
    algorithm = node.str("algorithm", choices=SIGNING_ALGORITHMS)
    # ``algorithm: none`` makes unsigned tokens (the "alg none" attack): no key then.
    unsigned = algorithm == "none"
    key_file = node.str("key", required=not unsigned)
    if unsigned and key_file is not None:
        node.error("an unsigned issuer (algorithm: none) has no key", "key")
    key_id = node.str("key_id")
    token_type = node.str("type")
    claims = _claims(node.child("claims"))
    expires_in = _signed_duration(node, "expires_in", DEFAULT_LIFETIME)
    if len(node.build.errors) != before:
        return None
    key: Any = None
    if key_file is not None:
        try:
            key, algorithm = read_signing_key(node.build.resolve_path(key_file), algorithm)
        except TokenError as exc:
            node.error(str(exc), "key")
            return None
    lifetime = DEFAULT_LIFETIME if expires_in is None else expires_in
    return Issuer(name, key, algorithm or "none", key_id, token_type, claims, lifetime)


def _token(name: str, node: Spec, issuers: Mapping[str, Issuer], declared: set[str]) -> TokenSpec | None:
    if not _SHORT_NAME.fullmatch(name):
        node.error("a token name is letters, digits, '_', '-' and '.' (it is used as ${tokens.NAME})")
        return None
    if not node.is_mapping(allowed=_TOKEN_FIELDS):
        return None
    before = len(node.build.errors)
    issuer_name = node.str("issuer", required=True)
    claims = _claims(node.child("claims"))
    bound_to = node.str("bound_to")
    lifetime = _signed_duration(node, "expires_in", None)
    if len(node.build.errors) != before or issuer_name is None:
        return None
    issuer = issuers.get(issuer_name)
    if issuer is None:
        if issuer_name not in declared:  # one that is declared but failed has its own error
            node.error(f"no issuer {issuer_name!r} in spec.issuers", "issuer")
        return None
    expires_in = issuer.expires_in if lifetime is None else lifetime
    thumbprint = None
    if bound_to is not None:
        try:
            thumbprint = certificate_thumbprint(node.build.resolve_path(bound_to))
        except TokenError as exc:
            node.error(str(exc), "bound_to")
            return None
    return TokenSpec(name, issuer, claims, expires_in, thumbprint)


def _case(index: int, node: Spec, tokens: Mapping[str, TokenSpec], fixed_clock: bool) -> TestCase | None:
    if not node.is_mapping(allowed=_CASE_FIELDS):
        return None
    before = len(node.build.errors)
    name = node.str("name") or f"case {index + 1}"
    advance = node.duration("advance", 0.0)
    if advance and not fixed_clock:
        node.error("moves a fixed clock: give spec.clock", "advance")
    request = _request(node.child("request"), tokens)
    expect = _expect(node.child("expect"))
    if len(node.build.errors) != before or request is None or expect is None:
        return None
    return TestCase(name, node.build.document.line_of(node.path), request, expect, advance or 0.0)


def _request(node: Spec, tokens: Mapping[str, TokenSpec]) -> dict[str, Any] | None:
    if not node.present:
        node.error("is required: the request to decide (method, host, path, headers, ...)")
        return None
    if not node.is_mapping(allowed=REQUEST_FIELDS | set(_REQUEST_EXTRA)):
        return None
    before = len(node.build.errors)
    request: dict[str, Any] = dict(node.value)
    _basic_auth(node, request)
    for name in _STRING_FIELDS:
        node.str(name)
    node.bool("partial_body")
    if "body" in request and "body_base64" in request:
        node.error("give body or body_base64, not both", "body_base64")
    for section in ("headers", "context"):
        child = node.child(section)
        for key, value in child.entries():
            if _text(child, key) is not None and section == "headers" and not _HEADER_NAME.fullmatch(key):
                value.error("is not a valid header name")
    for peer in ("source", "destination"):
        child = node.child(peer)
        if child.present:
            request[peer] = _peer(child)
    _check_placeholders(node, node.value, tokens)
    if len(node.build.errors) != before:
        return None
    try:  # what is left to check (base64, numbers) is what Envoy's message needs
        check_request_from_sample(substitute(request, {name: "token" for name in tokens}))
    except (SampleError, ValueError, TypeError) as exc:
        node.error(str(exc))
        return None
    return request


def _basic_auth(node: Spec, request: dict[str, Any]) -> None:
    """``basic_auth: {user, password}`` becomes ``Authorization: Basic <base64(user:password)>``."""
    basic = node.child("basic_auth")
    request.pop("basic_auth", None)
    if not basic.present or not basic.is_mapping(allowed={"user", "password"}):
        return
    user = basic.str("user", required=True)
    password = basic.str("password", required=True)
    if user is not None and ":" in user:
        basic.error("a Basic user name cannot contain ':'", "user")
        return
    headers = request.get("headers")
    if isinstance(headers, Mapping) and any(str(name).lower() == "authorization" for name in headers):
        node.error("give basic_auth or an authorization header, not both", "basic_auth")
        return
    if user is None or password is None:
        return
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    request["headers"] = {**(headers if isinstance(headers, Mapping) else {}), "authorization": f"Basic {token}"}


def _peer(node: Spec) -> dict[str, Any]:
    if not node.is_mapping(allowed=PEER_FIELDS | set(_PEER_EXTRA)):
        return {}
    peer = dict(node.value)
    for name in ("address", "principal", "certificate", "service", "certificate_file"):
        node.str(name)
    node.int("port", min=0, max=65535)
    labels = node.child("labels")
    for key, _ in labels.entries():
        labels.str(key, required=True)
    path = peer.pop("certificate_file", None)
    if isinstance(path, str):
        if "certificate" in peer:
            node.error("give certificate or certificate_file, not both", "certificate_file")
            return peer
        try:
            peer["certificate"] = node.build.resolve_path(path).read_text("ascii")
        except (OSError, UnicodeDecodeError) as exc:
            node.error(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}", "certificate_file")
    return peer


def _check_placeholders(node: Spec, value: Any, tokens: Mapping[str, TokenSpec]) -> None:
    if isinstance(value, str):
        for name in PLACEHOLDER.findall(value):
            if name not in tokens:
                known = ", ".join(sorted(tokens)) or "none defined"
                node.error(f"${{tokens.{name}}}: no token {name!r} in spec.tokens ({known})")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_placeholders(node.child(key), item, tokens)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_placeholders(node.child(i), item, tokens)


def substitute(value: Any, tokens: Mapping[str, str]) -> Any:
    """``value`` with every ``${tokens.NAME}`` replaced by the signed token NAME."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: tokens[m.group(1)], value) if "${tokens." in value else value
    if isinstance(value, Mapping):
        return {key: substitute(item, tokens) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, tokens) for item in value]
    return value


def _expect(node: Spec) -> Expectation | None:
    if not node.present:
        node.error("is required: at least the decision (allow or deny)")
        return None
    if not node.is_mapping(allowed=_EXPECT_FIELDS):
        return None
    before = len(node.build.errors)
    decision = node.str("decision", required=True, choices=("allow", "deny"))
    status = node.int("status", min=100, max=599)
    texts = {name: node.str(name) for name in ("reason", "policy", "rule", "message")}
    upstream = _headers(node.child("headers"))
    response = _headers(node.child("response_headers"))
    removed = [name.lower() for name in node.str_list("removed_headers")]
    if len(node.build.errors) != before or decision is None:
        return None
    return Expectation(decision, status, upstream=upstream, removed=tuple(removed), response=response, **texts)


def _headers(node: Spec) -> tuple[HeaderExpectation, ...]:
    found: list[HeaderExpectation] = []
    for name, value in node.entries():
        if not _HEADER_NAME.fullmatch(name):
            value.error("is not a valid header name")
            continue
        expectation = _header(name.lower(), node, name)
        if expectation is not None:
            found.append(expectation)
    return tuple(found)


def _header(name: str, headers: Spec, key: str) -> HeaderExpectation | None:
    """A string or number (the value), null (absent), or one of ``{equals|contains|matches: ...}``."""
    if headers.null(key):
        return HeaderExpectation(name, absent=True)
    node = headers.child(key)
    if not isinstance(node.value, Mapping):
        text = _text(headers, key)
        return None if text is None else HeaderExpectation(name, equals=text)
    if not node.is_mapping(allowed=_MATCHERS):
        return None
    given = node.one_of(_MATCHERS)
    if given is None:
        return None
    text = node.str(given)
    if text is None:
        return None
    if given == "matches":
        try:
            return HeaderExpectation(name, matches=re.compile(text))
        except re.error as exc:
            node.error(f"not a regular expression: {exc}", "matches")
            return None
    return HeaderExpectation(name, **{given: text})


def _text(node: Spec, key: str) -> str | None:
    """A value written as a string or a number (``x-count: 5``), as text; None after an error."""
    value = node.child(key).value
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = node.number(key, required=True)
        return str(value) if number is not None else None
    return node.str(key, required=True)
