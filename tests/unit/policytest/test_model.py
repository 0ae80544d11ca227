"""PolicyTest documents are checked as fully as policies, by validate, explain and test."""

from __future__ import annotations

from pathlib import Path

import pytest

from extauthz.cli import main

ISSUER = """
  clock: 2025-06-01T12:00:00Z
  issuers:
    idp:
      key: keys/signing.pem
      key_id: k1
      claims: {iss: "https://idp.test", aud: accounts}
"""
CASE = """
  cases:
    - name: alice reads
      request: {method: GET, host: accounts.test, path: /, headers: {authorization: "Bearer ${tokens.alice}"}}
      expect: {decision: allow}
"""


def _errors(capsys: pytest.CaptureFixture[str], folder: Path) -> str:
    assert main(["validate", str(folder)]) == 1
    return capsys.readouterr().err


def test_typos_are_unknown_fields_with_their_line(policy_dir, policy_yaml, capsys) -> None:
    """Issue 15: `decison` and `methd` were reported by `test` with a misleading message, never by validate."""
    folder = policy_dir(**{"t_test.yaml": """\
        apiVersion: extauthz.dev/v1
        kind: PolicyTest
        metadata: {name: typos}
        spec:
          cases:
            - name: one
              request: {methd: GET, host: a.test, path: /}
              expect: {decison: allow}
        """, "p.yaml": policy_yaml("p", "rules: [{name: all, decision: allow}]")})
    err = _errors(capsys, folder)
    assert "t_test.yaml:7: document 1 (typos): spec.cases[0].request.methd: unknown field (allowed: basic_auth, body" in err
    assert "t_test.yaml:8: document 1 (typos): spec.cases[0].expect.decison: unknown field (allowed: decision" in err
    assert "t_test.yaml:8: document 1 (typos): spec.cases[0].expect.decision: is required" in err
    # test refuses to run the folder, with the same errors
    assert main(["test", str(folder)]) == 1
    assert "spec.cases[0].request.methd: unknown field" in capsys.readouterr().err


@pytest.mark.parametrize(("spec", "message"), [
    ("  cases: []", "spec.cases: must list at least one case"),
    ("  clock: yesterday\n" + CASE, "spec.clock: must be a time such as 2025-06-01T12:00:00Z"),
    ("  clock: -5\n" + CASE, "spec.clock: must be a time such as"),
    ("  tokns: {}\n" + CASE, "spec.tokns: unknown field (allowed: cases, clock, issuers, tokens)"),
    (CASE, "${tokens.alice}: no token 'alice' in spec.tokens (none defined)"),
    ("  tokens: {alice: {issuer: nobody}}\n" + CASE, "spec.tokens.alice.issuer: no issuer 'nobody' in spec.issuers"),
    ("  issuers: {idp: {key: keys/missing.pem}}\n" + CASE, "spec.issuers.idp.key: cannot read"),
    ("  issuers: {idp: {key: keys/jwks.json}}\n" + CASE, "is not an unencrypted PEM private key"),
    ("  issuers: {idp: {key: keys/signing.pem, algorithm: RS256}}\n" + CASE, "cannot sign RS256 (it can: ES256)"),
    ("  issuers: {idp: {key: keys/signing.pem, algorithm: none}}\n" + CASE, "an unsigned issuer (algorithm: none) has no key"),
    ("""
  cases:
    - {name: later, advance: 5m, request: {host: accounts.test}, expect: {decision: deny}}
""", "spec.cases[0].advance: moves a fixed clock: give spec.clock"),
    ("""
  cases:
    - {name: a, request: {host: accounts.test}, expect: {decision: deny}}
    - {name: a, request: {host: accounts.test}, expect: {decision: deny}}
""", "spec.cases[1].name: duplicate case name 'a'"),
    ("""
  cases:
    - {name: a, request: {host: accounts.test, source: {certificate_file: nope.crt}}, expect: {decision: deny}}
""", "spec.cases[0].request.source.certificate_file: cannot read nope.crt"),
    ("""
  cases:
    - {name: a, request: {host: accounts.test, body_base64: "%%%"}, expect: {decision: deny}}
""", "spec.cases[0].request: "),
    ("""
  cases:
    - {name: a, request: {host: accounts.test}, expect: {decision: deny, response_headers: {retry-after: {near: 3}}}}
""", "spec.cases[0].expect.response_headers.retry-after.near: unknown field (allowed: contains, equals, matches)"),
    ("""
  cases:
    - {name: a, request: {host: accounts.test}, expect: {decision: maybe}}
""", "spec.cases[0].expect.decision: must be one of: allow, deny"),
    ("""
  cases:
    - {name: a, request: {host: accounts.test, basic_auth: {user: "a:b", password: x}}, expect: {decision: deny}}
""", "spec.cases[0].request.basic_auth.user: a Basic user name cannot contain ':'"),
    ("""
  cases:
    - {name: a, request: {host: accounts.test, basic_auth: {user: a}}, expect: {decision: deny}}
""", "spec.cases[0].request.basic_auth.password: is required"),
    ("""
  cases:
    - name: a
      request: {host: accounts.test, basic_auth: {user: a, password: b}, headers: {Authorization: "Basic x"}}
      expect: {decision: deny}
""", "spec.cases[0].request.basic_auth: give basic_auth or an authorization header, not both"),
])
def test_every_problem_is_named_with_its_field(write_test, capsys, spec: str, message: str) -> None:
    err = _errors(capsys, write_test(spec))
    assert message in err, err


def test_a_folder_with_good_tests_validates(write_test, capsys) -> None:
    folder = write_test(ISSUER + "  tokens: {alice: {issuer: idp, claims: {sub: alice, scope: read}}}\n" + CASE)
    assert main(["validate", str(folder)]) == 0
    assert "ok: 1 policies, 1 test documents" in capsys.readouterr().out


def test_duplicate_document_names(write_test, capsys) -> None:
    folder = write_test("  cases: [{name: a, request: {host: accounts.test}, expect: {decision: deny}}]")
    write_test("  cases: [{name: a, request: {host: accounts.test}, expect: {decision: deny}}]", file="other_test.yaml")
    assert "duplicate PolicyTest name (also in accounts_test.yaml:1)" in _errors(capsys, folder)


def test_the_sidecar_itself_never_reads_test_documents(write_test) -> None:
    """Their key files are test material (left out of images and ConfigMaps): serving must not need them."""
    from extauthz.policy import Services, load_folder

    folder = write_test("  issuers: {idp: {key: keys/not-deployed.pem}}\n" + CASE)
    policy_set = load_folder(folder, Services())
    assert [doc.name for doc in policy_set.tests] == ["accounts-tests"]
