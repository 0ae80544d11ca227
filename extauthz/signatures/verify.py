"""RFC 9421 section 3.2 verification of a request's ``Signature-Input``/``Signature``, with policy
requirements (section 3.2.1): covered components, freshness, expires/nonce/tag, allowed algorithms,
and the RFC 9530 body digest when ``content-digest`` is covered.

Everything here is synchronous and side-effect free; nonce memory (the only I/O) is the caller's
last step, taken only for a signature that passed every other test.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, cast

from extauthz.signatures.algorithms import VerificationKey
from extauthz.signatures.base import ComponentError, Message, covered_components, signature_base
from extauthz.signatures.digest import DigestResult, verify_content_digest
from extauthz.signatures.keys import KeySet
from extauthz.signatures.sf import (
    InnerList,
    Item,
    Limits,
    StructuredFieldError,
    parse_dictionary,
    parse_item,
    serialize_dictionary,
    serialize_item,
)

__all__ = [
    "Requirements",
    "SignatureFailure",
    "Verified",
    "accept_signature",
    "component_identifier",
    "encode_signature",
    "verify_request_signature",
]

#: Bounds on what a request may carry: a handful of labelled signatures, short parameter lists.
HEADER_LIMITS = Limits(max_length=16384, max_members=16, max_inner_items=48, max_params=16)
#: At most this many labelled signatures are tried per request (each try may cost a public-key op).
MAX_CANDIDATES = 4


class SignatureFailure(Exception):
    """Verification failed; ``reason`` is the stable, documented code."""

    def __init__(self, reason: str, message: str, stage: int, status: int = 401) -> None:
        super().__init__(message)
        self.reason = reason
        self.stage = stage
        self.status = status


_CONTENT_DIGEST: tuple[str, frozenset[str]] = ("content-digest", frozenset())

# Stages: how far a candidate got, to report the most informative failure when several fail.
_PARSE, _SELECT, _PARAMS, _COVERAGE, _KEY, _BASE, _CRYPTO, _DIGEST = range(8)


@dataclass(frozen=True, slots=True)
class Requirements:
    """What a policy demands of a signature (compiled once, at policy load)."""

    #: Components every signature must cover.
    components: tuple[Item, ...] = ()
    #: Components required only when the request has content (by default content-digest).
    body_components: tuple[Item, ...] = ()
    max_age: float = 300.0
    clock_skew: float = 30.0
    require_expires: bool = False
    require_nonce: bool = True
    tag: str | None = None
    label: str | None = None
    #: Algorithms this policy accepts (the algorithm itself comes from the key).
    algorithms: frozenset[str] = frozenset()
    digest_algorithms: tuple[str, ...] = ("sha-256", "sha-512")
    #: Key ids this policy trusts (empty: every key of the folder).
    key_ids: frozenset[str] = frozenset()
    #: Identities of ``components`` and of ``components`` + ``body_components``, worked out here, at
    #: policy load, for the per-request coverage test (also after dataclasses.replace).
    required_keys: frozenset[tuple[str, frozenset[tuple[str, object]]]] = field(
        init=False, repr=False, compare=False)
    required_keys_with_body: frozenset[tuple[str, frozenset[tuple[str, object]]]] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "required_keys", frozenset(_key(c) for c in self.components))
        object.__setattr__(self, "required_keys_with_body",
                           self.required_keys | frozenset(_key(c) for c in self.body_components))


class Verified(NamedTuple):
    """A signature that verified (one per signed request: a NamedTuple, cheap to build)."""

    label: str
    key: VerificationKey
    created: int
    expires: int | None
    nonce: str | None
    tag: str | None
    inner: InnerList

    @property
    def covered(self) -> tuple[str, ...]:
        """Serialized covered component identifiers, for logs and explain."""
        identifiers = covered_components(self.inner.items).identifiers
        return identifiers if identifiers is not None else tuple(serialize_item(i) for i in self.inner.items)


def component_identifier(text: str) -> Item:
    """A component identifier from a policy: ``@method``, ``x-tenant`` or ``"@query-param";name="id"``."""
    text = text.strip()
    if text.startswith('"'):
        item = parse_item(text)
    else:
        item = Item(text)
    if type(item.value) is not str or not item.value or item.value != item.value.lower():
        raise ValueError("a component name must be a non-empty lower-case string")
    return item


def _key(item: Item) -> tuple[str, frozenset[tuple[str, object]]]:
    return str(item.value), frozenset(item.params)


def accept_signature(requirements: Requirements, *, with_body: bool) -> str:
    """The Accept-Signature value (RFC 9421 section 5.1) telling a client what to sign and how."""
    components = list(requirements.components)
    if with_body:
        components += [c for c in requirements.body_components if _key(c) not in {_key(x) for x in components}]
    params: list[tuple[str, object]] = [("created", True)]
    if requirements.require_expires:
        params.append(("expires", True))
    if len(requirements.algorithms) == 1:
        params.append(("alg", next(iter(requirements.algorithms))))
    if requirements.tag is not None:
        params.append(("tag", requirements.tag))
    inner = InnerList(tuple(components), tuple(params))  # type: ignore[arg-type]
    return serialize_dictionary([(requirements.label or "sig1", inner)])


def _dictionary(headers: Mapping[str, str], name: str) -> dict[str, InnerList | Item]:
    value = headers.get(name)
    if value is None:
        raise SignatureFailure("signature_malformed", f"{name} header is missing", _PARSE)
    try:
        members = parse_dictionary(value, HEADER_LIMITS)
    except StructuredFieldError as exc:
        # Duplicate labels land here too: labels must be unique across all field values.
        raise SignatureFailure("signature_malformed", f"{name} is not a valid Dictionary: {exc}", _PARSE) from None
    return dict(members)


def _signature_params(inner: InnerList) -> dict[str, object]:
    """The signature's parameters by name, once the known ones are checked for their types."""
    # The first of a repeated name counts, as with InnerList.param.
    params: dict[str, object] = dict(reversed(inner.params))
    for name in ("created", "expires"):
        value = params.get(name)
        if value is not None and (type(value) is not int or cast(int, value) < 0):
            raise SignatureFailure("signature_params_invalid", f"{name} must be a non-negative integer", _PARAMS)
    for name in ("nonce", "alg", "keyid", "tag"):
        value = params.get(name)
        if value is not None and type(value) is not str:
            raise SignatureFailure("signature_params_invalid", f"{name} must be a string", _PARAMS)
    return params


def _check_one(
    label: str,
    inner: InnerList,
    signature: Item | InnerList | None,
    message: Message,
    body: bytes,
    partial_body: bool,
    has_content: bool,
    keys: KeySet,
    requirements: Requirements,
    now: float,
) -> Verified:
    params = _signature_params(inner)
    created: int | None = params.get("created")  # type: ignore[assignment]
    expires: int | None = params.get("expires")  # type: ignore[assignment]
    nonce: str | None = params.get("nonce")  # type: ignore[assignment]
    alg: str | None = params.get("alg")  # type: ignore[assignment]
    key_id: str | None = params.get("keyid")  # type: ignore[assignment]
    tag: str | None = params.get("tag")  # type: ignore[assignment]
    if created is None:
        raise SignatureFailure("signature_params_invalid", "created is required", _PARAMS)
    if key_id is None:
        raise SignatureFailure("signature_params_invalid", "keyid is required", _PARAMS)
    if expires is not None and expires < created:
        raise SignatureFailure("signature_params_invalid", "expires is before created", _PARAMS)
    if requirements.require_expires and expires is None:
        raise SignatureFailure("signature_expires_missing", "the signature must have an expires parameter", _PARAMS)
    if requirements.require_nonce and not nonce:
        raise SignatureFailure("signature_nonce_missing", "the signature must have a nonce parameter", _PARAMS)
    skew = requirements.clock_skew
    if created > now + skew:
        raise SignatureFailure("signature_not_yet_valid", "created is in the future", _PARAMS)
    if now - created > requirements.max_age + skew:
        raise SignatureFailure("signature_expired", f"the signature is older than {requirements.max_age:g}s", _PARAMS)
    if expires is not None and now > expires + skew:
        raise SignatureFailure("signature_expired", "the signature has expired", _PARAMS)

    components = covered_components(inner.items)
    covered = components.keys
    if not (requirements.required_keys_with_body if has_content else requirements.required_keys) <= covered:
        wanted = list(requirements.components)
        if has_content:
            wanted += requirements.body_components
        missing = [serialize_item(c) for c in wanted if _key(c) not in covered]
        raise SignatureFailure("signature_coverage_insufficient",
                               f"the signature must cover {', '.join(missing)}", _COVERAGE)

    key = keys.get(key_id)
    if key is None or (requirements.key_ids and key_id not in requirements.key_ids):
        raise SignatureFailure("signature_key_unknown", f"key {key_id!r} is not known", _KEY)
    if requirements.algorithms and key.algorithm_name not in requirements.algorithms:
        raise SignatureFailure("signature_algorithm_rejected",
                               f"key {key_id!r} uses {key.algorithm_name}, which this policy does not accept", _KEY)
    if alg is not None and alg != key.algorithm_name:
        raise SignatureFailure("signature_algorithm_rejected",
                               f"alg {alg!r} does not match the algorithm of key {key_id!r}", _KEY)
    if not isinstance(signature, Item) or not isinstance(signature.value, bytes):
        raise SignatureFailure("signature_malformed", f"Signature has no byte sequence for label {label!r}", _KEY)

    try:
        base = signature_base(message, inner, components)
    except ComponentError as exc:
        reason = "signature_component_missing" if exc.missing else "signature_component_invalid"
        raise SignatureFailure(reason, str(exc), _BASE) from None
    if not key.verify(base, signature.value):
        raise SignatureFailure("signature_invalid", "the signature does not verify", _CRYPTO)

    if _CONTENT_DIGEST in covered:
        if partial_body:
            raise SignatureFailure("body_truncated", "the body was cut at the proxy's buffer limit, so its digest "
                                   "cannot be checked", _DIGEST, status=413)
        result = verify_content_digest(message.fields.get("content-digest", ""), body, requirements.digest_algorithms)
        if result is DigestResult.MISMATCH:
            raise SignatureFailure("content_digest_mismatch", "the body does not match Content-Digest", _DIGEST)
        if result is not DigestResult.OK:
            allowed = ", ".join(requirements.digest_algorithms)
            raise SignatureFailure("content_digest_invalid",
                                   f"Content-Digest must be a Dictionary with a {allowed} digest", _DIGEST)
    return Verified(label, key, created, expires, nonce, tag, inner)


def verify_request_signature(
    message: Message,
    *,
    body: bytes,
    partial_body: bool,
    has_content: bool,
    keys: KeySet,
    requirements: Requirements,
    now: float,
) -> Verified:
    """Verify the signature(s) of a request; return the one that satisfies the policy or raise."""
    inputs = _dictionary(message.fields, "signature-input")
    signatures = _dictionary(message.fields, "signature")
    labels: Iterable[str] = list(inputs)
    if requirements.label is not None:
        if requirements.label not in inputs:
            raise SignatureFailure("signature_not_found", f"no signature labelled {requirements.label!r}", _SELECT)
        labels = [requirements.label]
    candidates: list[tuple[str, InnerList]] = []
    for label in labels:
        inner = inputs[label]
        if not isinstance(inner, InnerList):
            raise SignatureFailure("signature_malformed", f"Signature-Input {label!r} is not an inner list", _PARSE)
        if requirements.tag is not None and inner.param("tag") != requirements.tag:
            continue
        candidates.append((label, inner))
    if not candidates:
        raise SignatureFailure("signature_tag_mismatch", f"no signature has tag {requirements.tag!r}", _SELECT)
    best: SignatureFailure | None = None
    for label, inner in candidates[:MAX_CANDIDATES]:
        try:
            return _check_one(label, inner, signatures.get(label), message, body, partial_body, has_content, keys,
                              requirements, now)
        except SignatureFailure as failure:
            if best is None or failure.stage > best.stage:
                best = failure
    assert best is not None
    raise best


def encode_signature(value: bytes) -> str:
    """A Signature member value (byte sequence) for ``value``; for clients and tests."""
    return ":" + base64.b64encode(value).decode("ascii") + ":"
