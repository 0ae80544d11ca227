"""Running PolicyTests: signed tokens, a fixed clock, header expectations, shared state, the output."""

from __future__ import annotations

import jwt
import pytest

from extauthz.cli import main
from extauthz.policytest import load_for_tests, run_suites

IDP = """
  clock: 2025-06-01T12:00:00Z
  issuers:
    idp:
      key: keys/signing.pem
      key_id: k1
      claims: {iss: "https://idp.test", aud: accounts}
  tokens:
    alice: {issuer: idp, claims: {sub: alice, scope: read}}
    old: {issuer: idp, claims: {sub: alice, scope: read}, expires_in: -1h}
    stranger: {issuer: idp, claims: {sub: eve, scope: read, aud: elsewhere}}
"""

QUOTA = """
match: {hosts: [api.test]}
rules: [{name: all, decision: allow}]
quotas:
  - {name: per-client, key: "request.headers[?'x-client'].orValue('none')", limit: 1, window: 1m, headers: true}
"""


def _request(token: str, host: str = "accounts.test") -> str:
    return f'{{method: GET, host: {host}, path: /, headers: {{authorization: "Bearer ${{tokens.{token}}}"}}}}'


def test_tokens_are_signed_at_the_fixed_clock(write_test, capsys) -> None:
    folder = write_test(IDP + f"""
  cases:
    - name: alice reads; her token does not go upstream, her name does
      request: {_request("alice")}
      expect: {{decision: allow, headers: {{x-user: alice}}, removed_headers: [authorization]}}
    - name: an expired token
      request: {_request("old")}
      expect: {{decision: deny, status: 401, reason: token_expired,
               response_headers: {{www-authenticate: {{contains: 'error="invalid_token"'}}}}}}
    - name: another audience
      request: {_request("stranger")}
      expect: {{decision: deny, reason: wrong_audience}}
    - name: two hours later alice's token has expired too
      advance: 2h
      request: {_request("alice")}
      expect: {{decision: deny, reason: token_expired}}
""")
    assert main(["test", str(folder)]) == 0, capsys.readouterr()
    assert "4 passed, 0 failed" in capsys.readouterr().out


def test_what_a_token_holds(write_test) -> None:
    """iat is the clock, exp an hour later, the issuer's claims under the token's, kid and typ set."""
    folder = write_test(IDP.replace("key_id: k1", "key_id: k1\n      type: at+jwt") + f"""
  cases:
    - {{name: a, request: {_request("alice")}, expect: {{decision: allow}}}}
""")
    policy_set, suites, store = load_for_tests(folder)
    [result] = run_suites(policy_set, suites, store)
    token = result.decision.request.headers["authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims == {"iat": 1748779200, "exp": 1748779200 + 3600, "iss": "https://idp.test", "aud": "accounts",
                      "sub": "alice", "scope": "read"}
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": "k1", "typ": "at+jwt"}


def test_a_failing_case_says_what_differs_and_shows_the_steps(write_test, capsys) -> None:
    folder = write_test(IDP + f"""
  cases:
    - name: wrong on purpose
      request: {_request("alice")}
      expect:
        decision: allow
        rule: writers
        headers: {{x-user: bob, x-tenant: {{matches: "ac.*"}}}}
        removed_headers: [cookie]
        response_headers: {{retry-after: null, ratelimit: {{contains: "r=1"}}}}
""")
    assert main(["test", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "FAIL accounts_test.yaml:17 accounts-tests: wrong on purpose" in out
    assert "rule: expected 'writers', got 'readers'" in out
    assert "upstream header x-user: expected 'bob', got 'alice'" in out
    assert "upstream header x-tenant: expected a value matching 'ac.*', got none" in out
    assert "upstream header cookie: expected to be removed" in out
    assert "response header ratelimit: expected a value containing 'r=1', got none" in out
    assert "clock:   2025-06-01T12:00:00Z" in out
    assert "- rule readers: when holds -> allow" in out
    assert "0 passed, 1 failed" in out


def test_verbose_shows_every_case_and_k_selects(write_test, capsys) -> None:
    folder = write_test(IDP + f"""
  cases:
    - {{name: alice reads, request: {_request("alice")}, expect: {{decision: allow}}}}
    - {{name: old token, request: {_request("old")}, expect: {{decision: deny}}}}
""")
    assert main(["test", str(folder), "-v", "-k", "ALICE"]) == 0
    out = capsys.readouterr().out
    assert "PASS accounts_test.yaml:17 accounts-tests: alice reads" in out
    assert "decided: allow 200 allowed, policy accounts, rule readers" in out
    assert "upstream header set: x-user: alice" in out
    assert "old token" not in out
    assert "1 passed, 0 failed" in out
    assert main(["test", str(folder), "-k", "nothing like it"]) == 1
    assert "no case matches -k 'nothing like it'" in capsys.readouterr().err


def test_state_is_shared_within_a_document_and_fresh_for_each(idp_folder, policy_yaml, write_test, capsys) -> None:
    (idp_folder / "api.yaml").write_text(policy_yaml("api", QUOTA))
    cases = """
  clock: 2025-06-01T12:00:00Z
  cases:
    - name: first call
      request: {host: api.test, headers: {x-client: a}}
      expect: {decision: allow, response_headers: {ratelimit: '"per-client";r=0;t=60'}}
    - name: second call is over the limit
      request: {host: api.test, headers: {x-client: a}}
      expect: {decision: deny, status: 429, response_headers: {retry-after: "60", ratelimit: '"per-client";r=0;t=60'}}
    - name: another client has its own counter
      request: {host: api.test, headers: {x-client: b}}
      expect: {decision: allow}
    - name: a minute later the first one may call again
      advance: 1m
      request: {host: api.test, headers: {x-client: a}}
      expect: {decision: allow}
"""
    write_test(cases, name="first")
    folder = write_test(cases, name="second", file="second_test.yaml")
    assert main(["test", str(folder)]) == 0, capsys.readouterr().out
    assert "8 passed, 0 failed" in capsys.readouterr().out


def test_the_real_clock_by_default(idp_folder, policy_yaml, write_test, capsys) -> None:
    """Without spec.clock the tokens are signed now and the cases run at the real time."""
    folder = write_test(IDP.replace("  clock: 2025-06-01T12:00:00Z\n", "") + f"""
  cases:
    - {{name: a, request: {_request("alice")}, expect: {{decision: allow}}}}
""")
    assert main(["test", str(folder), "-v"]) == 0
    assert "clock:" not in capsys.readouterr().out


@pytest.mark.parametrize("content", [None, "apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: p}\n"
                                           "spec: {rules: [{name: all, decision: allow}]}\n"])
def test_a_folder_without_tests_says_so_and_fails(policy_dir, capsys, content: str | None) -> None:
    """Nothing ran is not a pass: a CI job pointed at the wrong folder must not go green."""
    folder = policy_dir(**({"p.yaml": content} if content else {}))
    assert main(["test", str(folder)]) == 1
    assert f"no PolicyTest cases in {folder}" in capsys.readouterr().err
