"""The CheckResponse the server sends: the wire encoder says exactly what the protobuf message says."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.api.envoy.service.auth.v3 import external_auth_pb2
from extauthz.decision import Decision
from extauthz.responses import DYNAMIC_METADATA_MODES, check_response_bytes, to_check_response

HEADERS = (("x-user", "alice"), ("x-tenant", "acme"))
CASES = [
    Decision(True, 200, "allowed", "allowed", "rid-1", policy="orders-api", rule="read"),
    Decision(True, 200, "allowed", "allowed", "rid-2", upstream_headers=HEADERS, remove_headers=("authorization",),
             client_headers=(("ratelimit-policy", '"per-key";q=100;w=60'), ("ratelimit", '"per-key";r=99;t=1'))),
    Decision(True, 200, "", "", ""),  # every string empty: the metadata entries are still there
    Decision(True, 200, "denied_by_rule", "would deny", "rid-3", policy="p", rule="r", dry_run=True,
             would_deny=True),
    Decision(True, 200, "allowed", "allowed", "rid-4", policy="p", dry_run=True, would_deny=False),
    Decision(False, 401, "token_expired", "the token has expired", "rid-5", policy="accounts-api",
             client_headers=(("www-authenticate", 'Bearer error="invalid_token"'),)),
    Decision(False, 403, "denied_by_rule", "no rule allows this request", "rid-6", policy="p", rule="deny-all"),
    Decision(False, 429, "quota_exceeded", "quota exceeded: per-key", "rid-7",
             client_headers=(("retry-after", "3"), ("ratelimit", '"per-key";r=0;t=3'))),
    Decision(False, 503, "internal_error", "authorization failed", "rid-8"),
    Decision(False, 400, "malformed_request", "CheckRequest could not be parsed", "malformed-1"),
    Decision(True, 200, "allowed", "allowed", "ид-😀", policy="politique-é", rule="règle",
             upstream_headers=(("x-name", "Zoë ✓"), ("x-empty", ""))),
    Decision(False, 403, "denied_by_rule", "x" * 5000, "r" * 300, policy="p" * 300),  # long: not kept
]  # fmt: skip


def _parsed(decision: Decision, metadata: str = "deny") -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse.FromString(check_response_bytes(decision, metadata))


@pytest.mark.parametrize("metadata", DYNAMIC_METADATA_MODES)
@pytest.mark.parametrize("decision", CASES, ids=lambda d: f"{d.status}-{d.reason or 'empty'}")
def test_wire_bytes_parse_into_the_message(decision: Decision, metadata: str) -> None:
    assert _parsed(decision, metadata) == to_check_response(decision, metadata)
    assert _parsed(decision, metadata) == to_check_response(decision, metadata)  # now from kept encodings


@pytest.mark.parametrize("decision", CASES, ids=lambda d: f"{d.status}-{d.reason or 'empty'}")
def test_which_decisions_carry_dynamic_metadata(decision: Decision) -> None:
    """deny (the default): denials and dry-run decisions, whose reason an operator looks for in
    Envoy's access log; all: every decision; off: none."""
    carries = {mode: _parsed(decision, mode).HasField("dynamic_metadata") for mode in DYNAMIC_METADATA_MODES}
    assert carries == {"deny": not decision.allowed or decision.dry_run, "all": True, "off": False}
    assert _parsed(decision) == _parsed(decision, "deny")
    if carries["deny"]:
        fields = _parsed(decision).dynamic_metadata.fields
        assert fields["decision_id"].string_value == decision.decision_id
        assert fields["reason"].string_value == decision.reason


_text = st.text(max_size=40)
_header = st.tuples(st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20), _text)


@settings(max_examples=300, deadline=None)
@given(
    allowed=st.booleans(), status=st.sampled_from([200, 400, 401, 403, 429, 500, 503]), reason=_text,
    message=_text, decision_id=_text, policy=_text, rule=_text, dry_run=st.booleans(), would_deny=st.booleans(),
    upstream=st.lists(_header, max_size=4), remove=st.lists(_text, max_size=3), client=st.lists(_header, max_size=4),
    metadata=st.sampled_from(DYNAMIC_METADATA_MODES),
)  # fmt: skip
def test_any_decision(allowed: bool, status: int, reason: str, message: str, decision_id: str, policy: str,
                      rule: str, dry_run: bool, would_deny: bool, upstream: list, remove: list,
                      client: list, metadata: str) -> None:  # fmt: skip
    decision = Decision(allowed, status, reason, message, decision_id, policy=policy, rule=rule, dry_run=dry_run,
                        would_deny=would_deny, upstream_headers=tuple(upstream), remove_headers=tuple(remove),
                        client_headers=tuple(client))  # fmt: skip
    try:
        expected = to_check_response(decision, metadata)
    except (ValueError, UnicodeError):  # text protobuf refuses (lone surrogates): so must we
        with pytest.raises((ValueError, UnicodeError)):
            check_response_bytes(decision, metadata)
        return
    assert _parsed(decision, metadata) == expected


def test_text_protobuf_refuses_is_refused_alike_and_the_server_denies() -> None:
    from extauthz.server import response_bytes

    decision = Decision(True, 200, "allowed", "allowed", "rid-9", policy="p",
                        upstream_headers=(("x-name", "bad \udc80 text"),))  # fmt: skip
    with pytest.raises(UnicodeError):
        to_check_response(decision)
    with pytest.raises(UnicodeError):
        check_response_bytes(decision)
    sent = external_auth_pb2.CheckResponse.FromString(response_bytes(decision))
    assert sent.WhichOneof("http_response") == "denied_response"
    assert (sent.status.code, sent.denied_response.status.code) == (14, 503)
    assert sent.dynamic_metadata.fields["decision_id"].string_value == "rid-9"
