"""SSRF: every spelling of an internal address, and the allow-list."""

from __future__ import annotations

import ipaddress

import pytest

from extauthz.inspection.ssrf import AddressAllowList, classify_host, parse_ipv4_loose, ssrf_findings


@pytest.mark.parametrize(
    ("spelling", "address"),
    [("127.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"),
     ("017700000001", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("0", "0.0.0.0"), ("10.1", "10.0.0.1"),
     ("169.254.43518", "169.254.169.254")],
)
def test_inet_aton_spellings(spelling: str, address: str) -> None:
    assert parse_ipv4_loose(spelling) == ipaddress.IPv4Address(address)


@pytest.mark.parametrize("host", ["example.com", "1.2.3.4.5", "256.1.1.1", "08.1.1.1", "", "a.b"])
def test_not_addresses(host: str) -> None:
    assert parse_ipv4_loose(host) is None or host == "1.2.3.4.5"


@pytest.mark.parametrize(
    ("host", "rule"),
    [
        ("169.254.169.254", "ssrf-metadata"), ("[fd00:ec2::254]", "ssrf-metadata"), ("metadata.google.internal", "ssrf-metadata"),
        ("127.0.0.1", "ssrf-loopback"), ("[::1]", "ssrf-loopback"), ("[::ffff:127.0.0.1]", "ssrf-loopback"),
        ("[::ffff:7f00:1]", "ssrf-loopback"), ("[64:ff9b::7f00:1]", "ssrf-loopback"), ("localhost", "ssrf-loopback"),
        ("localhost.", "ssrf-loopback"), ("api.localhost", "ssrf-loopback"), ("0.0.0.0", "ssrf-loopback"), ("[::]", "ssrf-loopback"),
        ("10.0.0.1", "ssrf-private"), ("172.31.255.1", "ssrf-private"), ("192.168.0.1", "ssrf-private"),
        ("100.64.0.1", "ssrf-private"), ("[fe80::1%25eth0]", "ssrf-private"), ("[fc00::1]", "ssrf-private"),
        ("10.0.0.1.nip.io", "ssrf-private"), ("127-0-0-1.sslip.io", "ssrf-loopback"), ("db.internal", "ssrf-private"),
    ],
)
def test_internal_hosts(host: str, rule: str) -> None:
    assert rule in classify_host(host)


@pytest.mark.parametrize("host", ["example.com", "8.8.8.8", "[2606:4700::1111]", "localhost.example.com", "1.1.1.1.nip.io"])
def test_public_hosts(host: str) -> None:
    assert classify_host(host) == []


def test_allow_list() -> None:
    allow = AddressAllowList(["10.0.0.0/8", "*.svc.cluster.local", "metadata.google.internal"])
    assert classify_host("10.2.3.4", allow) == []
    assert classify_host("orders.default.svc.cluster.local", allow) == []
    assert classify_host("metadata.google.internal", allow) == []
    assert classify_host("192.168.0.1", allow) == ["ssrf-private"]
    assert AddressAllowList.check("10.0.0.0/8") is None
    assert AddressAllowList.check("not a host!") is not None


def test_urls_in_text() -> None:
    text = "see https://example.com/x and http://user@169.254.169.254/latest and gopher://x/_ and //127.1/"
    assert ssrf_findings(text, None, bare=False) == {"ssrf-metadata", "ssrf-loopback", "ssrf-obfuscated-ip"}
    assert ssrf_findings("169.254.169.254\n10.0.0.1", None, bare=True) == {"ssrf-metadata", "ssrf-bare-internal-address"}
    assert ssrf_findings("https://cdn.example.com/a.png", None, bare=True) == set()
