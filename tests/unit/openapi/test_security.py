"""Security requirements: OR across requirements, AND inside one, scopes exact, public operations."""

from __future__ import annotations

from extauthz.openapi.security import DEFAULT_KINDS, Requirement, Scheme, judge

OAUTH = Scheme("oauth", "oauth2", DEFAULT_KINDS["oauth2"], frozenset(), "Bearer")
KEY = Scheme("key", "apiKey", DEFAULT_KINDS["apiKey"], frozenset(), "")
BASIC = Scheme("basic", "http basic", frozenset(), frozenset({"legacy"}), "Basic")


def _who(kind="jwt", scopes=(), source="users"):
    return {"kind": kind, "source": source, "subject": "s", "claims": {}, "scopes": list(scopes)}


def test_public_operations():
    assert judge((), _who("anonymous")) is None
    assert judge((Requirement(()),), _who("anonymous")) is None
    assert judge((Requirement(((OAUTH, ("a",)),)), Requirement(())), _who("anonymous")) is None


def test_missing_identity_is_401_with_every_challenge():
    outcome = judge((Requirement(((OAUTH, ()),)), Requirement(((BASIC, ()),))), _who("anonymous"))
    assert (outcome.status, outcome.reason, outcome.challenges) == (401, "credentials_missing", ("Bearer", "Basic"))


def test_scopes_are_exact_and_all_required():
    req = (Requirement(((OAUTH, ("orders:read", "orders:write")),)),)
    assert judge(req, _who(scopes=["orders:read", "orders:write", "x"])) is None
    outcome = judge(req, _who(scopes=["orders:read", "orders:write:all"]))
    assert (outcome.status, outcome.reason, outcome.scope) == (403, "insufficient_scope", "orders:read orders:write")


def test_or_across_requirements():
    req = (Requirement(((OAUTH, ("admin",)),)), Requirement(((KEY, ()),)))
    assert judge(req, _who("apiKey")) is None
    assert judge(req, _who(scopes=["admin"])) is None
    assert judge(req, _who(scopes=[])).reason == "insufficient_scope"


def test_and_inside_a_requirement():
    both = (Requirement(((OAUTH, ()), (KEY, ()))),)
    outcome = judge(both, _who("jwt"))  # one identity cannot be a JWT and an API key at once
    assert (outcome.status, outcome.reason) == (401, "openapi_credentials_not_accepted")


def test_the_wrong_kind_of_credentials():
    outcome = judge((Requirement(((OAUTH, ()),)),), _who("apiKey"))
    assert (outcome.status, outcome.reason, outcome.challenges) == (401, "openapi_credentials_not_accepted", ("Bearer",))


def test_schemes_mapped_to_identity_sources():
    req = (Requirement(((BASIC, ()),)),)
    assert judge(req, _who("apiKey", source="legacy")) is None
    assert judge(req, _who("apiKey", source="partners")).status == 401
