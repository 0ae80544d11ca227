"""The network check: client addresses refused by CIDR denylists and allowlists."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from extauthz import client_ip
from extauthz.checks.network import AddressRanges
from extauthz.decision import Authorizer, Decision
from extauthz.policy import PolicySetError, load_folder
from extauthz.samples import check_request_from_sample


def _set(policy_dir, policy_yaml, network: str):
    spec = f"network:\n{network}\nrules:\n  - {{name: all, decision: allow}}"
    return load_folder(policy_dir(**{"p.yaml": policy_yaml("p", spec)}))


def decide(policy_set, address: str | None, **sample) -> Decision:
    sample["source"] = {"address": address} if address is not None else {}
    return asyncio.run(Authorizer(policy_set).check(check_request_from_sample({"host": "h", **sample})))


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("203.0.113.9", False),
        ("203.0.113.0", False),
        ("203.0.114.1", True),
        ("10.1.2.3", False),
        ("10.255.255.255", False),
        ("11.0.0.0", True),
        ("2001:db8::1", False),
        ("2001:db9::1", True),
        ("::ffff:203.0.113.9", False),  # IPv4-mapped IPv6 is the IPv4 address
        ("::ffff:8.8.8.8", True),
        ("not-an-ip", False),  # unreadable: refused, never waved through
    ],
)
def test_denylist(policy_dir, policy_yaml, address: str, allowed: bool) -> None:
    policy_set = _set(policy_dir, policy_yaml, '  deny: ["203.0.113.0/24", "10.0.0.0/8", "2001:db8::/32"]')
    d = decide(policy_set, address)
    assert d.allowed is allowed
    if not allowed:
        assert (d.status, d.reason, d.rule) == (403, "denied_by_network", "network")


def test_no_address_is_refused(policy_dir, policy_yaml) -> None:
    policy_set = _set(policy_dir, policy_yaml, '  deny: ["203.0.113.0/24"]')
    d = decide(policy_set, None)
    assert (d.allowed, d.reason, d.message) == (False, "denied_by_network", "the client address is unknown")


def test_allowlist_and_denylist_together(policy_dir, policy_yaml) -> None:
    policy_set = _set(policy_dir, policy_yaml, '  allow: ["10.0.0.0/8"]\n  deny: ["10.9.0.0/16"]')
    assert decide(policy_set, "10.1.1.1").allowed
    assert not decide(policy_set, "10.9.1.1").allowed  # deny wins inside an allowed range
    assert not decide(policy_set, "192.0.2.1").allowed


def test_client_ip_from_trusted_forwarded_for(policy_dir, policy_yaml) -> None:
    policy_set = _set(policy_dir, policy_yaml, '  deny: ["203.0.113.0/24"]')
    client_ip.configure(1)
    try:
        d = decide(policy_set, "10.0.0.1", headers={"x-forwarded-for": "203.0.113.7, 10.0.0.1"})
        assert not d.allowed
        assert decide(policy_set, "10.0.0.1", headers={"x-forwarded-for": "198.51.100.1, 10.0.0.1"}).allowed
    finally:
        client_ip.configure(0)
    # Without trusted hops the header is the client's own word: ignored.
    assert decide(policy_set, "10.0.0.1", headers={"x-forwarded-for": "203.0.113.7"}).allowed


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ("  deny: []", "spec.network.deny: must not be empty"),
        ("  allow: []", "spec.network.allow: must not be empty"),
        ("  deny: [10.0.0.1/8]", "has host bits set"),
        ("  deny: [banana]", "must be an IP address or CIDR range"),
        ("  {}", "spec.network: give deny, allow or both"),
        ("  denied: [10.0.0.0/8]", "unknown field"),
    ],
)
def test_bad_lists_are_load_errors(policy_dir, policy_yaml, network: str, message: str) -> None:
    with pytest.raises(PolicySetError) as info:
        _set(policy_dir, policy_yaml, network)
    assert message in str(info.value)


def test_ranges_merge_and_search() -> None:
    nets = [ipaddress.ip_network(n) for n in ("10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "192.0.2.0/24")]
    ranges = AddressRanges.merge(nets)  # type: ignore[arg-type]
    assert len(ranges.starts) == 2
    for text, inside in [("10.0.0.0", True), ("10.0.1.255", True), ("10.0.2.0", False), ("9.255.255.255", False),
                         ("192.0.2.77", True), ("192.0.3.0", False)]:
        assert (int(ipaddress.ip_address(text)) in ranges) is inside
