"""mTLS source: principals, SPIFFE IDs, forwarded certificates and allow-lists."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from material import Pki, decide_now, write_policy, www_authenticate
from material import authorizer as make_authorizer

from extauthz.identity.mtls import compile_principal_globs, parse_spiffe_id
from extauthz.policy.model import PolicySetError

NOW = datetime.datetime.now(datetime.UTC)


def _auth(tmp_path: Path, options: str = "{}"):
    return make_authorizer(write_policy(tmp_path / "policies", f"identity:\n  - name: mesh\n    mtls: {options}\n"))


def _peer(principal: str = "", certificate: str = "") -> dict:
    source: dict = {"address": "10.0.0.7", "port": 40000}
    if principal:
        source["principal"] = principal
    if certificate:
        source["certificate"] = certificate
    return {"source": source}


def test_spiffe_ids_are_parsed_with_istio_names():
    sid = parse_spiffe_id("spiffe://cluster.local/ns/orders/sa/api")
    assert sid.as_dict() == {"trust_domain": "cluster.local", "path": "/ns/orders/sa/api",
                             "namespace": "orders", "service_account": "api"}
    plain = parse_spiffe_id("spiffe://example.org/billing/worker")
    assert (plain.trust_domain, plain.path, plain.namespace) == ("example.org", "/billing/worker", "")
    assert parse_spiffe_id("spiffe://example.org").path == ""


@pytest.mark.parametrize("bad", [
    "spiffe://Example.org/x", "spiffe://example.org/a//b", "spiffe://example.org/a/../b", "spiffe://example.org/./a",
    "spiffe://example.org/a/", "spiffe://example.org:8080/a", "spiffe://user@example.org/a", "spiffe:///a",
    "spiffe://example.org/a?b", "spiffe://example.org/a#b", "spiffe://example.org/a%20b", "SPIFFE://example.org/a",
    "spiffe://" + "a" * 3000,
])
def test_invalid_spiffe_ids(bad):
    with pytest.raises(ValueError):
        parse_spiffe_id(bad)


def test_principal_globs():
    glob = compile_principal_globs(["spiffe://cluster.local/ns/*/sa/orders", "spiffe://corp.example/**",
                                    "*.partners.example.com"])
    assert glob is not None
    assert glob.fullmatch("spiffe://cluster.local/ns/prod/sa/orders")
    assert not glob.fullmatch("spiffe://cluster.local/ns/prod/x/sa/orders")
    assert not glob.fullmatch("spiffe://cluster.local/ns/prod/sa/orders-admin")
    assert glob.fullmatch("spiffe://corp.example/a/b/c")
    assert glob.fullmatch("API.Partners.Example.com")
    assert not glob.fullmatch("a.b.partners.example.com")
    assert not glob.fullmatch("spiffe://cluster.local/ns/prod/sa/orders.evil")
    assert compile_principal_globs([]) is None


def test_principal_only_gives_an_mtls_identity(tmp_path):
    d = decide_now(_auth(tmp_path), _peer("spiffe://cluster.local/ns/orders/sa/api"))
    assert d.allowed
    assert d.identity["kind"] == "mtls" and d.identity["source"] == "mesh"
    assert d.identity["subject"] == d.identity["principal"] == "spiffe://cluster.local/ns/orders/sa/api"
    assert d.identity["spiffe"]["namespace"] == "orders" and d.identity["spiffe"]["service_account"] == "api"


def test_non_spiffe_principal_has_empty_spiffe_fields(tmp_path):
    d = decide_now(_auth(tmp_path), _peer("client.partners.example.com"))
    assert d.allowed
    assert d.identity["spiffe"] == {"trust_domain": "", "path": "", "namespace": "", "service_account": ""}


def test_no_mtls_means_no_credentials(tmp_path):
    d = decide_now(_auth(tmp_path), {"source": {"address": "10.0.0.7"}})
    assert (d.status, d.reason) == (401, "credentials_missing")
    assert www_authenticate(d) == ["mTLS"]


def test_forwarded_certificate(tmp_path, pki: Pki):
    client = pki.client("orders", uris=("spiffe://cluster.local/ns/orders/sa/api",), dns=("orders.local",))
    d = decide_now(_auth(tmp_path), _peer("spiffe://cluster.local/ns/orders/sa/api", client.pem))
    assert d.allowed, d.steps
    assert d.identity["claims"]["x5t#S256"] == client.thumbprint
    assert d.identity["claims"]["dns_names"] == ["orders.local"]
    # No principal reported (older proxies): derived from the certificate (URI SAN first).
    d = decide_now(_auth(tmp_path), _peer("", client.pem))
    assert d.identity["principal"] == "spiffe://cluster.local/ns/orders/sa/api"


def test_dns_san_certificate(tmp_path, pki: Pki):
    client = pki.client("partner", dns=("api.partners.example.com",))
    d = decide_now(_auth(tmp_path, "{principals: ['*.partners.example.com']}"), _peer("", client.pem))
    assert d.allowed and d.identity["principal"] == "api.partners.example.com"


@pytest.mark.parametrize(("window", "reason"), [
    ((NOW - datetime.timedelta(days=3), NOW - datetime.timedelta(days=1)), "certificate_expired"),
    ((NOW + datetime.timedelta(days=1), NOW + datetime.timedelta(days=3)), "certificate_not_yet_valid"),
])
def test_certificate_outside_its_validity(tmp_path, pki: Pki, window, reason):
    client = pki.client(uris=("spiffe://cluster.local/ns/a/sa/b",), not_before=window[0], not_after=window[1])
    d = decide_now(_auth(tmp_path), _peer("spiffe://cluster.local/ns/a/sa/b", client.pem))
    assert (d.status, d.reason) == (401, reason)
    assert www_authenticate(d)[0].startswith('mTLS error="invalid_token"')


@pytest.mark.parametrize("pem", [
    "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    "garbage",
    "-----BEGIN CERTIFICATE-----\n" + "A" * 5000 + "\n-----END CERTIFICATE-----\n",
])
def test_certificate_that_does_not_parse(tmp_path, pem):
    d = decide_now(_auth(tmp_path), _peer("spiffe://cluster.local/ns/a/sa/b", pem))
    assert (d.status, d.reason) == (401, "certificate_unparseable")


def test_reported_principal_must_be_in_the_certificate(tmp_path, pki: Pki):
    client = pki.client(uris=("spiffe://cluster.local/ns/a/sa/b",))
    d = decide_now(_auth(tmp_path), _peer("spiffe://cluster.local/ns/admin/sa/root", client.pem))
    assert d.reason == "principal_mismatch"


def test_ca_bundle_verification(tmp_path, pki: Pki):
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "ca.pem").write_text(pki.ca.pem)
    auth = _auth(tmp_path, "{certificate: {caFile: ca.pem}}")
    good = pki.client(uris=("spiffe://cluster.local/ns/a/sa/b",))
    assert decide_now(auth, _peer("spiffe://cluster.local/ns/a/sa/b", good.pem)).allowed
    rogue = Pki("rogue-ca").client(uris=("spiffe://cluster.local/ns/a/sa/b",))
    d = decide_now(auth, _peer("spiffe://cluster.local/ns/a/sa/b", rogue.pem))
    assert d.reason == "certificate_untrusted"
    # With a CA configured the certificate itself is required: a bare principal is not enough.
    assert decide_now(auth, _peer("spiffe://cluster.local/ns/a/sa/b")).reason == "certificate_required"


def test_allow_lists(tmp_path):
    options = "{principals: ['spiffe://cluster.local/ns/orders/sa/*'], trustDomains: [cluster.local]}"
    auth = _auth(tmp_path, options)
    assert decide_now(auth, _peer("spiffe://cluster.local/ns/orders/sa/api")).allowed
    d = decide_now(auth, _peer("spiffe://cluster.local/ns/billing/sa/api"))
    assert (d.status, d.reason) == (403, "principal_not_allowed")
    assert www_authenticate(d) == []
    d = decide_now(auth, _peer("spiffe://other.domain/ns/orders/sa/api"))
    assert (d.status, d.reason) == (403, "trust_domain_not_allowed")
    d = decide_now(auth, _peer("api.example.com"))
    assert (d.status, d.reason) == (401, "spiffe_id_required")
    d = decide_now(auth, _peer("spiffe://cluster.local/ns/orders/sa/../sa/api"))
    assert d.reason == "invalid_spiffe_id"


def test_configuration_errors(tmp_path):
    with pytest.raises(PolicySetError) as excinfo:
        _auth(tmp_path, "{trustDomains: ['Bad Domain'], principals: ['a b'], certificate: {caFile: none.pem}, x: 1}")
    text = str(excinfo.value)
    for fragment in ("trust domain", "without spaces", "none.pem", "unknown field"):
        assert fragment in text
