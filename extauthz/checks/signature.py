"""Signature: the request must be signed by a known key over the parts that matter, recently, once.

Two schemes share this section:

- RFC 9421 HTTP Message Signatures (the default): ``Signature-Input``/``Signature`` headers,
  required covered components, freshness (``maxAge``, ``clockSkew``, ``expires``), single-use
  ``nonce`` (remembered in the sidecar's store: in memory, or Redis so every replica shares it),
  an expected ``tag``, an RFC 9530 ``Content-Digest`` checked against the forwarded body, and a
  binding between the key's owner and the caller's identity.
- ``webhook``: the ``sha256=<hex>`` and ``t=<unix>,v1=<hex>`` signed-body presets.

Keys come from a folder (a mounted Secret) that is watched and reloaded. On success the verified key
id joins ``identity`` (``identity.key_id``) so rules and quotas can use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from extauthz import clock
from extauthz.cel import BOOL, STRING, CelError, Expression
from extauthz.checks import Phase, register
from extauthz.context import CheckContext, Denial
from extauthz.policy.build import BuildContext, Spec
from extauthz.request import Request
from extauthz.signatures.algorithms import ALGORITHMS, VerificationKey
from extauthz.signatures.base import message_from_request
from extauthz.signatures.digest import DIGEST_ALGORITHMS, want_content_digest
from extauthz.signatures.keys import KeyFolder
from extauthz.signatures.sf import Item, StructuredFieldError
from extauthz.signatures.verify import (
    Requirements,
    SignatureFailure,
    accept_signature,
    component_identifier,
    verify_request_signature,
)
from extauthz.signatures.webhook import PRESETS, WebhookScheme
from extauthz.stores import Store, store_for
from extauthz.stores.memory import MemoryStore

log = logging.getLogger("extauthz.signature")

_FIELDS = {
    "required", "when", "keys", "components", "bodyComponents", "algorithms", "maxAge", "clockSkew",
    "requireExpires", "requireNonce", "tag", "label", "keyOwner", "digestAlgorithms", "webhook",
}
_RFC9421_ONLY = _FIELDS - {"required", "when", "keys", "keyOwner", "webhook"}
_KEYS_FIELDS = {"folder", "refresh", "ids"}
_WEBHOOK_FIELDS = {"preset", "header", "tolerance", "rejectReplays"}
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-.*")


def has_content(request: Request) -> bool:
    """Whether the request carries content, so that body components (content-digest) are required."""
    if request.body or request.partial_body:
        return True
    length = request.headers.get("content-length", "").strip()
    if length and length != "0":
        return True
    return "transfer-encoding" in request.headers


@dataclass(frozen=True, slots=True)
class _Keys:
    folder: KeyFolder
    ids: frozenset[str]

    def hmac_secrets(self) -> list[VerificationKey]:
        return [k for k in self.folder.keys
                if k.algorithm_name == "hmac-sha256" and (not self.ids or k.key_id in self.ids)]


@register("signature", Phase.SIGNATURE)
class SignatureCheck:
    #: Set per instance (see __init__): only a shared nonce store waits on I/O.
    may_wait: bool = True

    def __init__(
        self,
        *,
        policy: str,
        required: bool,
        when: Expression | None,
        keys: _Keys,
        store: Store,
        requirements: Requirements | None,
        webhook: WebhookScheme | None,
        reject_replays: bool,
        key_owner: Expression | None,
    ) -> None:
        self.policy = policy
        self.required = required
        self.when = when
        self.keys = keys
        self.store = store
        self.requirements = requirements
        self.webhook = webhook
        self.credential_locations = (("header", webhook.header),) if webhook is not None else ()
        self.reject_replays = reject_replays
        self.key_owner = key_owner
        # Only a shared (network) nonce store makes this check wait; the in-process one never does.
        self.may_wait = reject_replays and not isinstance(store, MemoryStore)
        self.clock: Callable[[], float] = clock.wall
        if requirements is not None:
            self._challenge = {body: self._challenge_headers(requirements, body) for body in (False, True)}

    # --- policy load ---------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: Spec, build: BuildContext) -> SignatureCheck | None:
        if not spec.is_mapping(allowed=_FIELDS):
            return None
        when = spec.cel("when", expect=BOOL)
        if spec.child("required").present and when is not None:
            spec.error("give either required or when, not both", "when")
        required = spec.bool("required", True) if when is None else False
        keys = _keys_from_spec(spec.child("keys"), build)
        webhook_spec = spec.child("webhook")
        requirements: Requirements | None = None
        webhook: WebhookScheme | None = None
        reject_replays = True
        if webhook_spec.present:
            for name in _RFC9421_ONLY:
                if spec.child(name).present:
                    spec.error("applies to RFC 9421 signatures, not to webhook presets", name)
            webhook, reject_replays = _webhook_from_spec(webhook_spec)
            if keys is not None and not keys.hmac_secrets():
                spec.child("keys").error("the folder has no usable HMAC secret (*.secret or kty oct) for the webhook")
        else:
            requirements = _requirements_from_spec(spec)
            if keys is not None:
                requirements = dataclasses.replace(requirements, key_ids=keys.ids)
        key_owner = spec.cel("keyOwner", expect=STRING)
        if keys is None or (webhook is None and requirements is None) or (webhook_spec.present and webhook is None):
            return None
        try:
            store = store_for(build.services)
        except ValueError as exc:  # StoreConfigError: the sidecar's Redis settings are unusable
            spec.error(f"the nonce store cannot be used: {exc}")
            return None
        return cls(policy=build.policy_name, required=required, when=when, keys=keys, store=store,
                   requirements=requirements, webhook=webhook, reject_replays=reject_replays, key_owner=key_owner)

    @staticmethod
    def _challenge_headers(requirements: Requirements, with_body: bool) -> tuple[tuple[str, str], ...]:
        value = accept_signature(requirements, with_body=with_body)
        headers = [("accept-signature", value)]
        if '"content-digest"' in value:
            headers.append(("want-content-digest", want_content_digest(requirements.digest_algorithms)))
        return tuple(headers)

    # --- per request ------------------------------------------------------------------------------------
    async def check(self, ctx: CheckContext) -> Denial | None:
        request = ctx.request
        required = self.required
        if self.when is not None:
            try:
                holds = self.when.evaluate(ctx)
            except CelError as exc:
                ctx.attributes["error"] = f"signature.when: {exc}"
                return Denial(503, "internal_error", "policy evaluation failed", rule="signature")
            if not isinstance(holds, bool):
                ctx.attributes["error"] = f"signature.when gave {type(holds).__name__}, not bool"
                return Denial(503, "internal_error", "policy evaluation failed", rule="signature")
            required = holds
        if self.webhook is not None:
            present = self.webhook.header in request.headers
        else:
            present = "signature-input" in request.headers or "signature" in request.headers
        if not present and not required:
            ctx.note("signature: none presented and none required")
            return None
        if self.webhook is not None:
            return await self._check_webhook(ctx, self.webhook)
        assert self.requirements is not None
        return await self._check_rfc9421(ctx, self.requirements, present)

    async def _check_rfc9421(self, ctx: CheckContext, requirements: Requirements, present: bool) -> Denial | None:
        request = ctx.request
        with_body = has_content(request)
        if not present:
            return self._deny(ctx, SignatureFailure("signature_missing", "the request must be signed", 0), with_body)
        try:
            verified = verify_request_signature(
                message_from_request(request), body=request.body, partial_body=request.partial_body,
                has_content=with_body, keys=self.keys.folder.keys, requirements=requirements, now=self.clock(),
            )
        except SignatureFailure as failure:
            return self._deny(ctx, failure, with_body)
        except (StructuredFieldError, ValueError) as exc:  # defensive: malformed input never becomes a 503
            return self._deny(ctx, SignatureFailure("signature_malformed", str(exc), 0), with_body)
        if ctx.steps is not None:  # explain / policy tests only: no formatting on the serving path
            ctx.note(f"signature {verified.label}: key {verified.key.key_id} ({verified.key.algorithm_name}) "
                     f"verified over {' '.join(verified.covered) or 'no components'}")
        denial = self._bind(ctx, verified.key)
        if denial is not None:
            return denial
        if verified.nonce:
            ttl = (verified.expires if verified.expires is not None else verified.created + requirements.max_age)
            ttl = ttl + requirements.clock_skew - self.clock()
            nonce_hash = hashlib.sha256(verified.nonce.encode()).hexdigest()
            denial = await self._remember(ctx, f"sig:nonce:{verified.key.key_id}:{nonce_hash}", ttl, with_body)
            if denial is not None:
                return denial
        self._accept(ctx, verified.key, label=verified.label)
        return None

    async def _check_webhook(self, ctx: CheckContext, webhook: WebhookScheme) -> Denial | None:
        request = ctx.request
        try:
            match = webhook.verify(request.headers, request.body, request.partial_body, self.keys.hmac_secrets(),
                                   self.clock())
        except SignatureFailure as failure:
            return self._deny(ctx, failure, False)
        ctx.note(f"webhook {webhook.preset}: MAC verified with secret {match.key.key_id}")
        denial = self._bind(ctx, match.key)
        if denial is not None:
            return denial
        if self.reject_replays and match.timestamp is not None:
            ttl = match.timestamp + webhook.tolerance - self.clock() + 1
            denial = await self._remember(ctx, f"sig:webhook:{self.policy}:{match.replay_key}", ttl, False)
            if denial is not None:
                return denial
        self._accept(ctx, match.key, label=webhook.preset)
        return None

    def _bind(self, ctx: CheckContext, key: VerificationKey) -> Denial | None:
        if self.key_owner is None:
            return None
        try:
            expected = self.key_owner.evaluate(ctx)
        except CelError as exc:
            ctx.note(f"signature keyOwner: {exc.detail}")
            expected = None
        if not key.owner or not isinstance(expected, str) or expected != key.owner:
            ctx.note(f"signature: key {key.key_id} belongs to {key.owner or 'nobody'}, not to {expected!r}")
            return self._deny(ctx, SignatureFailure("signature_key_binding_mismatch",
                                                    "the signing key does not belong to the caller", 9), None)
        return None

    async def _remember(self, ctx: CheckContext, key: str, ttl: float, with_body: bool) -> Denial | None:
        try:
            fresh = await self.store.remember_once(key, max(1.0, ttl))
        except Exception as exc:  # fail closed: without the store we cannot tell a replay
            log.warning("signature nonce store failed: %s", type(exc).__name__)
            ctx.attributes["error"] = f"nonce store: {type(exc).__name__}"
            return Denial(503, "nonce_store_unavailable", "replay protection is unavailable", rule="signature")
        if not fresh:
            return self._deny(ctx, SignatureFailure("signature_replayed", "this signature was already used", 10),
                              with_body)
        return None

    def _accept(self, ctx: CheckContext, key: VerificationKey, *, label: str) -> None:
        identity = dict(ctx.identity)
        if identity.get("kind", "anonymous") == "anonymous":
            identity.update(kind="signature", source="signature", subject=key.owner or key.key_id)
        identity["key_id"] = key.key_id
        if key.owner:
            identity["key_owner"] = key.owner
        ctx.identity = identity
        ctx.attributes["signature_key_id"] = key.key_id
        ctx.attributes["signature_alg"] = key.algorithm_name
        ctx.attributes["signature_label"] = label

    def _deny(self, ctx: CheckContext, failure: SignatureFailure, with_body: bool | None) -> Denial:
        ctx.note(f"signature: {failure.reason}: {failure}")
        ctx.attributes["signature_failure"] = failure.reason
        headers: tuple[tuple[str, str], ...] = ()
        if failure.status == 401 and self.requirements is not None and with_body is not None:
            headers = self._challenge[with_body]
        return Denial(failure.status, failure.reason, str(failure), headers=headers, rule="signature")


def _keys_from_spec(spec: Spec, build: BuildContext) -> _Keys | None:
    if not spec.present:
        spec.error("is required: keys.folder names the folder of verification keys")
        return None
    if not spec.is_mapping(allowed=_KEYS_FIELDS):
        return None
    folder_name = spec.str("folder", required=True)
    refresh = spec.duration("refresh", 2.0)
    ids = frozenset(spec.str_list("ids", nonempty="key id"))  # [] would trust every key in the folder
    if not folder_name:
        return None
    path = build.resolve_path(folder_name).resolve()
    folder = build.services.shared(("signature-keys", str(path)), lambda: KeyFolder(path, interval=refresh or 2.0))
    if not folder.keys.keys:
        problems = "; ".join(folder.keys.errors[:3]) or "it has no key files"
        spec.error(f"no usable key in {path}: {problems}", "folder")
        return None
    for key_id in sorted(ids - set(folder.keys.keys)):
        spec.child("ids").error(f"key {key_id!r} is not in {path}")
    return _Keys(folder, ids)


def _webhook_from_spec(spec: Spec) -> tuple[WebhookScheme | None, bool]:
    if not spec.is_mapping(allowed=_WEBHOOK_FIELDS):
        return None, True
    preset = spec.str("preset", required=True, choices=tuple(PRESETS))
    header = spec.str("header", PRESETS.get(preset or "", ""))
    tolerance = spec.duration("tolerance", 300.0)
    reject_replays = spec.bool("rejectReplays", True)
    if preset is None or not header:
        return None, reject_replays
    if header != header.lower():
        spec.error("must be a lower-case header name", "header")
        return None, reject_replays
    if preset == "sha256-hex" and spec.child("tolerance").present:
        spec.error("sha256-hex signatures carry no timestamp; use timestamp-v1 for a tolerance window", "tolerance")
    return WebhookScheme(preset, header, tolerance), reject_replays


#: Covered by every accepted signature when a policy names no ``components``: a signature over
#: nothing but its own parameters would verify on any request, so the default binds it to the
#: request's method and target (RFC 9421 7.2.1).
DEFAULT_COMPONENTS = ("@method", "@authority", "@path")


def _components(spec: Spec, key: str, default: list[str] | None = None) -> tuple[Item, ...]:
    node = spec.child(key)
    if key == "bodyComponents":
        if node.value == "none":
            return ()  # the explicit way to accept bodies that no signature covers
        if node.value == []:
            node.error("is empty: list at least one component, leave the field out (content-digest), or write "
                       "'none' to accept request bodies that no signature covers")
            return ()
    names = spec.str_list(key, nonempty="component") if node.present else (default or [])
    items: list[Item] = []
    for i, name in enumerate(names):
        try:
            item = component_identifier(name)
        except (StructuredFieldError, ValueError) as exc:
            node.error(f"not a component identifier: {exc}", i)
            continue
        value = str(item.value)
        if value == "@status" or value == "@signature-params":
            node.error(f"{value} cannot be required of a request", i)
            continue
        if value.startswith("@") and value not in _REQUEST_DERIVED:
            node.error(f"unknown derived component (known: {', '.join(sorted(_REQUEST_DERIVED))})", i)
            continue
        items.append(item)
    return tuple(items)


_REQUEST_DERIVED = frozenset({"@method", "@target-uri", "@authority", "@scheme", "@request-target", "@path", "@query",
                              "@query-param"})


def _requirements_from_spec(spec: Spec) -> Requirements:
    algorithms = spec.str_list("algorithms", nonempty="algorithm")  # [] would accept all six
    for i, name in enumerate(algorithms):
        if name not in ALGORITHMS:
            spec.child("algorithms").error(f"unknown algorithm (known: {', '.join(ALGORITHMS)})", i)
    digests = spec.str_list("digestAlgorithms", nonempty="digest algorithm") or ["sha-256", "sha-512"]
    for i, name in enumerate(digests):
        if name not in DIGEST_ALGORITHMS:
            spec.child("digestAlgorithms").error(f"unknown digest (known: {', '.join(DIGEST_ALGORITHMS)})", i)
    label = spec.str("label")
    if label is not None and (not label or label[0] not in "abcdefghijklmnopqrstuvwxyz*"
                              or any(c not in _LABEL_CHARS for c in label)):
        spec.error("must be a structured-field key (lower-case letters, digits, _ - . *)", "label")
        label = None
    tag = spec.str("tag")
    if tag is not None and any(not (" " <= c <= "~") for c in tag):
        spec.error("must be printable ASCII", "tag")
        tag = None
    max_age = spec.duration("maxAge", 300.0)
    skew = spec.duration("clockSkew", 30.0)
    return Requirements(
        components=_components(spec, "components", list(DEFAULT_COMPONENTS)),
        body_components=_components(spec, "bodyComponents", ["content-digest"]),
        max_age=max_age if max_age is not None else 300.0,
        clock_skew=skew if skew is not None else 30.0,
        require_expires=bool(spec.bool("requireExpires", False)),
        require_nonce=bool(spec.bool("requireNonce", True)),
        tag=tag,
        label=label,
        algorithms=frozenset(a for a in algorithms if a in ALGORITHMS),
        digest_algorithms=tuple(d for d in digests if d in DIGEST_ALGORITHMS) or ("sha-256",),
    )
