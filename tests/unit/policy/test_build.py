"""Spec: the empty-list rule, applied by every section that reads a list.

Each case is a valid policy that loads, then the same policy with one list emptied: that must be
exactly one load error, at that field. A template that renders an empty list must never turn a
restriction off (audiences, trust domains, trusted key ids) or silently drop what was asked for
(quotas, headers).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from extauthz.policy.build import Services
from extauthz.policy.loader import load_folder
from extauthz.policy.model import PolicySetError

_API_KEY = "k-0123456789abcdef"

_JWT = "jwt: {issuer: https://idp.example.com, secretFile: ../files/hmac.key, audiences: [api]%s}"
_INTROSPECTION = ("oauth2Introspection: {endpoint: 'https://idp.example.com/introspect', clientId: api, "
                  "clientSecretFile: ../files/client-secret%s}")
_SIGNATURE = "signature: {keys: {folder: ../files/keys%s}%s}"


def _source(text: str) -> str:
    return f"identity: [{{name: a, {text}}}]"


#: (spec with LIST where the list goes, the list when it is not empty, field path, what the message names)
_CASES = [
    ("identity: LIST", "[{name: a, anonymous: {}}]", "spec.identity", "identity source"),
    (_source(_JWT.replace("[api]", "LIST") % ""), "[api]", "spec.identity[0].jwt.audiences", "audience"),
    (_source(_JWT % ", algorithms: LIST"), "[HS256]", "spec.identity[0].jwt.algorithms", "algorithm"),
    (_source(_JWT % ", tokenTypes: LIST"), "[at+jwt]", "spec.identity[0].jwt.tokenTypes", "token type"),
    (_source(_JWT % ", requiredClaims: LIST"), "[tenant]", "spec.identity[0].jwt.requiredClaims", "claim"),
    (_source(_JWT % ", scopes: {claims: LIST}"), "[scope]", "spec.identity[0].jwt.scopes.claims", "claim"),
    (_source(_JWT % ", scopes: {map: LIST}"), "{admin: [x]}", "spec.identity[0].jwt.scopes.map", "claim value"),
    (_source(_JWT % ", token: LIST"), "[{header: authorization, scheme: Bearer}]", "spec.identity[0].jwt.token",
     "location"),
    (_source(_JWT % "" + ", requiredScopes: LIST"), "[read]", "spec.identity[0].requiredScopes", "scope"),
    (_source("mtls: {principals: LIST}"), "['spiffe://cluster.local/**']", "spec.identity[0].mtls.principals",
     "principal"),
    (_source("mtls: {trustDomains: LIST}"), "[cluster.local]", "spec.identity[0].mtls.trustDomains",
     "trust domain"),
    (_source(_INTROSPECTION % ", audiences: LIST"), "[api]", "spec.identity[0].oauth2Introspection.audiences",
     "audience"),
    (_source(_INTROSPECTION % ", token: LIST"), "[{header: authorization, scheme: Bearer}]",
     "spec.identity[0].oauth2Introspection.token", "location"),
    (_source("apiKey: {keys: ../files/apikeys, in: LIST}"), "[{header: x-api-key}]", "spec.identity[0].apiKey.in",
     "location"),
    (_SIGNATURE % (", ids: LIST", ""), "[partner]", "spec.signature.keys.ids", "key id"),
    (_SIGNATURE % ("", ", algorithms: LIST"), "[hmac-sha256]", "spec.signature.algorithms", "algorithm"),
    (_SIGNATURE % ("", ", components: LIST"), "['@method']", "spec.signature.components", "component"),
    (_SIGNATURE % ("", ", digestAlgorithms: LIST"), "[sha-256]", "spec.signature.digestAlgorithms",
     "digest algorithm"),
    ("quotas: LIST", "[{name: q, limit: 1, window: 1m}]", "spec.quotas", "quota"),
    ("response: {headers: LIST}", "{x-user: identity.subject}", "spec.response.headers", "header"),
]  # fmt: skip


def _files(root: Path) -> None:
    files = root / "files"
    (files / "keys").mkdir(parents=True)
    (files / "keys" / "partner.secret").write_bytes(b"0123456789abcdef0123456789abcdef")
    (files / "hmac.key").write_bytes(b"0123456789abcdef0123456789abcdef")
    (files / "client-secret").write_text("s3cret\n")
    (files / "apikeys").mkdir()
    digest = hashlib.sha256(_API_KEY.encode()).hexdigest()
    (files / "apikeys" / "acme.yaml").write_text(f"- {{id: a1, owner: acme, sha256: {digest}}}\n")


def _errors(root: Path, spec: str) -> list[str]:
    folder = root / "policies"
    folder.mkdir(exist_ok=True)
    rules = "" if spec.startswith("rules:") else "  rules: [{name: r, decision: allow}]\n"
    (folder / "p.yaml").write_text(
        f"apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {{name: p}}\nspec:\n  {spec}\n{rules}"
    )
    try:
        load_folder(folder, Services(settings={"offline": True}))
    except PolicySetError as exc:
        return [str(error) for error in exc.errors]
    return []


@pytest.mark.parametrize(("template", "listed", "path", "noun"), _CASES, ids=[case[2] for case in _CASES])
def test_an_empty_list_is_a_load_error_at_its_field(tmp_path: Path, template: str, listed: str, path: str,
                                                    noun: str) -> None:
    _files(tmp_path)
    assert _errors(tmp_path, template.replace("LIST", listed)) == []
    errors = _errors(tmp_path, template.replace("LIST", "{}" if listed.startswith("{") else "[]"))
    assert len(errors) == 1, errors
    assert f"{path}: is empty: list at least one {noun}" in errors[0]


def test_required_list_says_so_without_suggesting_to_leave_it_out(tmp_path: Path) -> None:
    _files(tmp_path)
    [error] = _errors(tmp_path, _source(_JWT.replace("[api]", "[]") % ""))
    assert error.endswith("spec.identity[0].jwt.audiences: is empty: list at least one audience")


def test_body_components_need_an_explicit_none_to_cover_no_body(tmp_path: Path) -> None:
    _files(tmp_path)
    [error] = _errors(tmp_path, _SIGNATURE % ("", ", bodyComponents: []"))
    assert "spec.signature.bodyComponents: is empty" in error and "'none'" in error
    assert _errors(tmp_path, _SIGNATURE % ("", ", bodyComponents: none")) == []
    assert _errors(tmp_path, _SIGNATURE % ("", ", bodyComponents: [content-digest, content-type]")) == []


def test_a_scope_mapped_to_nothing_is_allowed(tmp_path: Path) -> None:
    """Narrower, not wider: the claim value grants no scope."""
    _files(tmp_path)
    assert _errors(tmp_path, _source(_JWT % ", scopes: {map: {legacy: []}}")) == []


def test_response_needs_headers_each_with_a_value(tmp_path: Path) -> None:
    """A header without a value would be neither set nor removed: a client could supply it."""
    _files(tmp_path)
    assert any("spec.response.headers: is required" in e for e in _errors(tmp_path, "response: {}"))
    [error] = _errors(tmp_path, "response: {headers: {x-user: }}")
    assert "spec.response.headers.x-user: is required" in error


@pytest.mark.parametrize(("spec", "path", "message"), [
    ("rules: [{name: r, decision: allow, when: \"request.headers['x']\"}]", "spec.rules[0].when",
     "has type string, expected bool"),
    ("response: {headers: {x-all: request.headers}}", "spec.response.headers.x-all",
     "has type map<string, string>, expected a string, number, bool, bytes, a list of them, or null"),
    ("response: {headers: {x-t: \"request.headers[?'x-t']\"}}", "spec.response.headers.x-t",
     "add .orValue(<default>)"),
    ("quotas: [{name: q, limit: 1, window: 1m, key: request.headers}]", "spec.quotas[0].key",
     "has type map<string, string>, expected a string, an integer or a bool"),
    ("quotas: [{name: q, limit: 1, window: 1m, when: request.size}]", "spec.quotas[0].when",
     "has type int, expected bool"),
    ("quotas: [{name: q, limit: 1, window: 1m, cost: request.method}]", "spec.quotas[0].cost",
     "has type string, expected an integer"),
    (_SIGNATURE % ("", ", when: request.path"), "spec.signature.when", "has type string, expected bool"),
    (_SIGNATURE % ("", ", keyOwner: source.port"), "spec.signature.keyOwner", "has type int, expected string"),
    ("rules: [{name: r, decision: allow, when: 'request.method + 1 == 2'}]", "spec.rules[0].when",
     "at 1:16: found no matching overload for '_+_' applied to '(string, int)'\n | request.method + 1 == 2\n"),
])  # fmt: skip
def test_every_cel_site_checks_the_static_type_it_needs(tmp_path: Path, spec: str, path: str, message: str) -> None:
    _files(tmp_path)
    errors = _errors(tmp_path, spec)
    assert len(errors) == 1, errors
    assert f"{path}: invalid CEL: " in errors[0] and message in errors[0]
