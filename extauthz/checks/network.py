"""Network: refuse clients by address (``spec.network``), before anything else is looked at.

The client address is ``source.client_ip``: the peer Envoy reports, or the ``x-forwarded-for``
entry that ``--xff-trusted-hops`` trusts. Ranges are merged into sorted integer intervals at load,
so a lookup is a binary search whatever the size of the list, and the verdict for an address is
remembered (bounded): a mesh sees the same clients over and over.

An address that cannot be read (none sent, not an IP) is refused whatever the lists say: a
denylist that an unreadable address slips past would be a denylist an attacker can step around.
"""

from __future__ import annotations

import bisect
import ipaddress
from dataclasses import dataclass
from typing import ClassVar

from extauthz.checks import Phase, register
from extauthz.client_ip import client_ip, trusted_hops
from extauthz.context import CheckContext, Denial
from extauthz.policy.build import BuildContext, Spec

__all__ = ["AddressRanges", "NetworkCheck"]

_VERDICT_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class AddressRanges:
    """Merged CIDR ranges of one address family as sorted, disjoint [start, end] integer pairs."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]

    @classmethod
    def merge(cls, networks: list[ipaddress.IPv4Network] | list[ipaddress.IPv6Network]) -> AddressRanges:
        spans = sorted((int(n.network_address), int(n.broadcast_address)) for n in networks)
        merged: list[list[int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return cls(tuple(s for s, _ in merged), tuple(e for _, e in merged))

    def __contains__(self, value: int) -> bool:
        i = bisect.bisect_right(self.starts, value) - 1
        return i >= 0 and value <= self.ends[i]


@dataclass(frozen=True, slots=True)
class AddressList:
    """One list of ranges (``deny`` or ``allow``), both families."""

    v4: AddressRanges
    v6: AddressRanges

    def __contains__(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if address.version == 6:
            mapped = address.ipv4_mapped  # type: ignore[union-attr]
            if mapped is not None:  # ::ffff:203.0.113.9 is 203.0.113.9
                return int(mapped) in self.v4
            return int(address) in self.v6
        return int(address) in self.v4


def _address_list(spec: Spec, key: str) -> AddressList | None:
    node = spec.child(key)
    if not node.present:
        return None
    items = spec.str_list(key)
    if not items:
        if isinstance(node.value, list):
            node.error("must not be empty (omit the field instead)")
        return None
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for i, text in enumerate(items):
        try:
            network = ipaddress.ip_network(text.strip(), strict=True)
        except ValueError as exc:
            node.error(f"must be an IP address or CIDR range with no host bits set ({exc})", i)
            continue
        (v4 if network.version == 4 else v6).append(network)  # type: ignore[arg-type]
    return AddressList(AddressRanges.merge(v4), AddressRanges.merge(v6))


@register("network", Phase.NETWORK)
class NetworkCheck:
    may_wait: ClassVar[bool] = False

    def __init__(self, deny: AddressList | None, allow: AddressList | None) -> None:
        self.deny = deny
        self.allow = allow
        self._verdicts: dict[str, Denial | None] = {}
        self.denied = Denial(403, "denied_by_network", "the client address is not allowed", rule="network")
        self.unknown = Denial(403, "denied_by_network", "the client address is unknown", rule="network")

    @classmethod
    def from_spec(cls, spec: Spec, build: BuildContext) -> NetworkCheck | None:
        if not spec.is_mapping(allowed={"deny", "allow"}):
            return None
        deny = _address_list(spec, "deny")
        allow = _address_list(spec, "allow")
        if deny is None and allow is None:
            spec.error("give deny, allow or both")
            return None
        return cls(deny, allow)

    def verdict(self, address: str) -> Denial | None:
        """The denial for a client address, or None to let it through."""
        known = self._verdicts.get(address, False)
        if known is not False:
            return known  # type: ignore[return-value]
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            verdict: Denial | None = self.unknown
        else:
            refused = (self.deny is not None and ip in self.deny) or (self.allow is not None and ip not in self.allow)
            verdict = self.denied if refused else None
        if len(self._verdicts) >= _VERDICT_CACHE_LIMIT:
            self._verdicts.clear()  # bounded: addresses come from clients
        self._verdicts[address] = verdict
        return verdict

    async def check(self, ctx: CheckContext) -> Denial | None:
        request = ctx.request
        address = request.source_address
        if trusted_hops():  # the forwarded-for entry the operator's proxies wrote
            address = client_ip(address, request.headers.get("x-forwarded-for"))
        denial = self.verdict(address)
        if ctx.steps is not None:
            outcome = "let through" if denial is None else f"refused ({denial.message})"
            ctx.note(f"network: client address {address or '(none)'} {outcome}")
        return denial
