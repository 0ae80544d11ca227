"""source.client_ip: Envoy's xff_num_trusted_hops, as seen from behind an Envoy that appended its peer."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extauthz.client_ip import MAX_TRUSTED_HOPS, client_ip, configure, trusted_hops


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    configure(0)


# Envoy's documented examples (HTTP connection manager, "x-forwarded-for"), with use_remote_address:
# true. XFF as Envoy received it is "203.0.113.128, 203.0.113.10, 203.0.113.1"; the downstream peer is
# 192.0.2.5, which Envoy appends before the sidecar sees the header.
SEEN = "203.0.113.128, 203.0.113.10, 203.0.113.1,192.0.2.5"


@pytest.mark.parametrize(
    ("hops", "expected"),
    [
        (0, "192.0.2.5"),  # Envoy example 1: XFF ignored, the peer is the client
        (1, "203.0.113.1"),  # example 2: one trusted proxy in front of Envoy
        (2, "203.0.113.10"),  # example 3: two trusted proxies
        (3, "203.0.113.128"),
        (4, "192.0.2.5"),  # fewer entries than trusted hops: Envoy falls back to the peer
    ],
)
def test_envoy_examples(hops: int, expected: str) -> None:
    assert client_ip("192.0.2.5", SEEN, hops) == expected


def test_the_process_setting_is_the_default() -> None:
    assert trusted_hops() == 0
    assert client_ip("192.0.2.5", SEEN) == "192.0.2.5"
    configure(2)
    assert client_ip("192.0.2.5", SEEN) == "203.0.113.10"


@pytest.mark.parametrize("header", ["", None, "not-an-ip, 192.0.2.5", "203.0.113.1:8080, 192.0.2.5", " , 192.0.2.5"])
def test_anything_unusable_yields_the_peer(header: str | None) -> None:
    assert client_ip("192.0.2.5", header, 1) == "192.0.2.5"


def test_addresses_from_the_header_are_normalized() -> None:
    assert client_ip("10.0.0.1", "2001:DB8:0:0::1 , 10.0.0.1", 1) == "2001:db8::1"


@pytest.mark.parametrize("bad", [-1, MAX_TRUSTED_HOPS + 1, True, "1"])
def test_configure_refuses_nonsense(bad: object) -> None:
    with pytest.raises(ValueError, match="trusted hops"):
        configure(bad)  # type: ignore[arg-type]


@given(
    peer=st.ip_addresses().map(str),
    entries=st.lists(st.one_of(st.ip_addresses().map(str), st.text(max_size=12)), max_size=6),
    hops=st.integers(0, 8),
)
def test_the_result_is_the_peer_or_an_address_at_the_trusted_position(peer: str, entries: list[str], hops: int) -> None:
    header = ",".join(entries)
    result = client_ip(peer, header, hops)
    if hops == 0:
        assert result == peer
        return
    parts = header.split(",")
    if len(parts) >= hops + 1:
        try:
            assert result == str(ipaddress.ip_address(parts[-(hops + 1)].strip()))
            return
        except ValueError:
            pass
    assert result == peer
