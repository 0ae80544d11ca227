"""The client's IP address, as Envoy's ``xff_num_trusted_hops`` defines it.

By default the client is the peer Envoy reports (``source.address``) and ``x-forwarded-for`` is
ignored: any client can write that header. Only when the operator says how many proxies in front
of Envoy are trusted (``extauthz serve --xff-trusted-hops N``) is the header read, and then only
the entry those proxies wrote.

The rule is Envoy's, for the deployed configuration (``use_remote_address: true``, so Envoy has
appended the address of its peer to ``x-forwarded-for`` before the sidecar sees it): with N trusted
hops the client is the (N+1)th address from the right end of the header, that is the Nth from the
right of the header as Envoy received it. When the header has fewer entries, or that entry is not an
IP address, the peer address is used, as Envoy does. An address taken from the header is normalized
(``ipaddress``), so one client has one spelling; the peer address is used as Envoy formats it.

The hop count describes the network in front of this process, like Envoy's own setting on its HTTP
connection manager, so it is one value per process (:func:`configure`), not per policy.
"""

from __future__ import annotations

import ipaddress

__all__ = ["MAX_TRUSTED_HOPS", "client_ip", "configure", "trusted_hops"]

#: More trusted proxies than this is a configuration mistake, not a network.
MAX_TRUSTED_HOPS = 16

_trusted_hops = 0


def configure(hops: int) -> None:
    """Set the number of trusted proxies in front of Envoy for this process (0: ignore XFF)."""
    global _trusted_hops
    if isinstance(hops, bool) or not isinstance(hops, int) or not 0 <= hops <= MAX_TRUSTED_HOPS:
        raise ValueError(f"trusted hops must be an integer between 0 and {MAX_TRUSTED_HOPS}")
    _trusted_hops = hops


def trusted_hops() -> int:
    return _trusted_hops


def client_ip(peer: str, forwarded_for: str | None, hops: int | None = None) -> str:
    """The client address for a request from ``peer`` carrying ``x-forwarded-for: forwarded_for``.

    ``hops`` defaults to the process setting. Never raises: anything unusable yields the peer.
    """
    if hops is None:
        hops = _trusted_hops
    if hops <= 0 or not forwarded_for:
        return peer
    entries = forwarded_for.split(",")
    if len(entries) < hops + 1:
        return peer
    try:
        return str(ipaddress.ip_address(entries[-(hops + 1)].strip()))
    except ValueError:
        return peer
