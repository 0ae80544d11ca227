"""SSRF: URLs in parameters and fields that point inside the network, in every spelling.

A server that fetches a URL it was given resolves ``http://2130706433/``, ``http://0x7f.1/``,
``http://017700000001/``, ``http://127.1/``, ``http://[::ffff:127.0.0.1]/`` and ``http://0/`` to
the loopback interface, just as it does ``http://localhost/`` (inet_aton rules, which curl, glibc
and most HTTP clients follow). So every host is parsed the way such a client would, then classified;
names that resolve inside by design (localhost, metadata names, wildcard-DNS services that embed an
address) are classified by name. A host on the policy's allow-list is never reported.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import re2

__all__ = ["AddressAllowList", "UrlFinding", "classify_host", "parse_ipv4_loose", "ssrf_findings"]

#: URLs looked at per request (a value full of URLs is not a fetch target).
MAX_URLS = 32

# //authority (ends at / ? # \ whitespace or quotes); the scheme, if any, is read just before it.
# RE2: a run of slashes makes a backtracking engine try (and fail) at every one.

_METADATA_NAMES = frozenset({
    "metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal",
    "metadata.azure.com", "metadata.packet.net", "metadata.platformequinix.com", "metadata.tencentyun.com",
    "kubernetes.default.svc", "kubernetes.default",
})  # fmt: skip
_METADATA_ADDRESSES = frozenset({
    ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("169.254.170.2"),
    ipaddress.ip_address("100.100.100.200"), ipaddress.ip_address("fd00:ec2::254"),
    ipaddress.ip_address("192.0.0.192"), ipaddress.ip_address("169.254.169.123"),
})  # fmt: skip
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", "loopback")
#: Wildcard DNS services that answer with the address written in the name.
_EMBEDDING_SUFFIXES = (".nip.io", ".sslip.io", ".xip.io", ".nip.direct", ".traefik.me", ".localtest.me",
                       ".lvh.me", ".vcap.me", ".lacolhost.com", ".localhost")  # fmt: skip
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")


@dataclass(frozen=True, slots=True)
class UrlFinding:
    rule: str


class AddressAllowList:
    """Hosts never reported: exact names, ``*.suffix`` names, and CIDR ranges."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in entries:
            entry = entry.strip().lower()
            if entry.startswith("*."):
                self.suffixes.append(entry[1:])
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.names.add(entry.rstrip("."))

    @staticmethod
    def check(entry: str) -> str | None:
        """Why ``entry`` is not a valid allow-list entry (None when it is)."""
        text = entry.strip().lower()
        if not text:
            return "must not be empty"
        if text.startswith("*."):
            text = text[2:]
        try:
            ipaddress.ip_network(text, strict=False)
            return None
        except ValueError:
            pass
        if re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?", text) is None:
            return "must be a host name, '*.suffix' or an address range such as 10.0.0.0/8"
        return None

    def allows(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        if host in self.names or any(host.endswith(s) for s in self.suffixes):
            return True
        return address is not None and any(address in network for network in self.networks)


def parse_ipv4_loose(host: str) -> ipaddress.IPv4Address | None:
    """An IPv4 address as inet_aton reads it: 1 to 4 parts, each decimal, 0x-hex or 0-octal, the
    last filling the remaining bytes (``127.1``, ``2130706433``, ``0x7f.0.0.1``, ``0177.1``)."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or any(not p for p in parts):
        return None
    values: list[int] = []
    for part in parts:
        try:
            if part.startswith(("0x", "0X")):
                value = int(part[2:] or "0", 16)
            elif len(part) > 1 and part.startswith("0"):
                value = int(part, 8)
            else:
                value = int(part, 10) if part.isdigit() else -1
        except ValueError:
            return None
        if value < 0:
            return None
        values.append(value)
    last_bytes = 5 - len(values)
    if any(v > 255 for v in values[:-1]) or values[-1] >= 256**last_bytes:
        return None
    number = 0
    for value in values[:-1]:
        number = number * 256 + value
    number = (number << (8 * last_bytes)) | values[-1]
    return ipaddress.IPv4Address(number)


def _address(host: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | None, bool]:
    """The address a host literal means, and whether it was spelt in a non-canonical way."""
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1].split("%", 1)[0]  # zone id
        try:
            return ipaddress.IPv6Address(inner), False
        except ValueError:
            return None, False
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0]), False
        except ValueError:
            return None, False
    address = parse_ipv4_loose(host)
    if address is None:
        return None, False
    return address, str(address) != host


def _inner_v4(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None and address in _SIXTOFOUR:
        return address.sixtofour
    if int(address) >> 32 == 0 and int(address) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(address))
    return None


def classify_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The SSRF rule an address falls under, or None for a public address."""
    if address in _METADATA_ADDRESSES:
        return "ssrf-metadata"
    inner = _inner_v4(address)
    if inner is not None and inner is not address:
        return classify_address(inner) or ("ssrf-private" if not address.is_global else None)
    if address.is_loopback:
        return "ssrf-loopback"
    if address.is_unspecified:  # 0.0.0.0 and :: reach the local host
        return "ssrf-loopback"
    if not address.is_global or address.is_multicast or address.is_reserved:
        return "ssrf-private"
    return None


def classify_host(host: str, allow: AddressAllowList | None = None) -> list[str]:
    """The SSRF rules a URL host falls under (empty for an ordinary public host)."""
    host = host.strip().lower().rstrip(".")
    if not host:
        return []
    found = _classify(host)
    if found and allow is not None and allow.allows(host, _address(host)[0]):
        return []
    return list(found)


@functools.lru_cache(maxsize=4096)
def _classify(host: str) -> tuple[str, ...]:
    """classify_host without the allow-list, remembered: the same few hosts come back request after
    request, and a crafted body repeats one (bounded: least recently used hosts are dropped)."""
    return tuple(_classify_uncached(host))


def _classify_uncached(host: str) -> list[str]:
    address, unusual = _address(host)
    found: list[str] = []
    if address is not None:
        rule = classify_address(address)
        if rule is not None:
            found.append(rule)
        if unusual:
            found.append("ssrf-obfuscated-ip")
        return found
    if host in _METADATA_NAMES:
        return ["ssrf-metadata"]
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return ["ssrf-loopback"]
    if host.endswith(_EMBEDDING_SUFFIXES):
        embedded = _embedded_address(host)
        if embedded is not None:
            rule = classify_address(embedded)
            return [rule] if rule is not None else []
    if host.endswith((".internal", ".local", ".localdomain", ".intranet", ".corp", ".home.arpa", ".cluster.local")):
        return ["ssrf-private"]
    return []


_EMBEDDED_DOTTED = re.compile(r"(?:^|[.-])(\d{1,3}[.-]\d{1,3}[.-]\d{1,3}[.-]\d{1,3})(?:[.-]|$)")
_EMBEDDED_HEX = re.compile(r"(?:^|[.-])([0-9a-f]{8})(?:[.-]|$)")


def _embedded_address(host: str) -> ipaddress.IPv4Address | None:
    match = _EMBEDDED_DOTTED.search(host)
    if match is not None:
        try:
            return ipaddress.IPv4Address(match.group(1).replace("-", "."))
        except ValueError:
            return None
    match = _EMBEDDED_HEX.search(host)
    if match is not None:
        return ipaddress.IPv4Address(int(match.group(1), 16))
    return None


def _host_of(authority: str) -> str:
    authority = authority.rsplit("@", 1)[-1]  # userinfo: http://trusted@169.254.169.254/
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1] if end > 0 else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


# Dotted IPv4 or bracketed IPv6 anywhere (two patterns: an alternation would cost the engine its
# fast scan for the first character); a candidate counts only when it is a whole value.
_IPV4_TOKEN = re2.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_IPV6_TOKEN = re.compile(rb"\[[0-9a-fA-F:.]{2,45}\]")
_PORT_SUFFIX = re.compile(rb"(?::\d{1,5})?\s*$")


def _whole_values(data: bytes) -> Iterable[str]:
    patterns: tuple[Any, ...] = (_IPV4_TOKEN, _IPV6_TOKEN) if b"[" in data else (_IPV4_TOKEN,)
    for pattern in patterns:
        for index, match in enumerate(pattern.finditer(data)):
            if index >= MAX_URLS:
                break
            start, end = match.span()
            if start and not data[start - 1 : start].isspace():
                continue
            line_end = data.find(b"\n", end)
            if _PORT_SUFFIX.match(data[end : line_end if line_end >= 0 else len(data)]) is not None:
                yield match.group().decode("ascii")


#: An authority worth classifying: after userinfo, a bracketed or digit-led host, or a name with an
#: internal or address-embedding suffix. Ordinary public names (the bulk of URLs in API traffic) are
#: never parsed, so a body full of links costs one linear RE2 pass.
_SUSPICIOUS_AUTHORITY = re2.compile(
    r"(?i)//((?:[^\s/?#@\\\"'<>]{0,256}@)?(?:\[[0-9a-f:.%]{2,64}\]|[0-9][^\s/?#\\\"'<>@]{0,255}"
    r"|[^\s/?#\\\"'<>@]{0,255}(?:localhost|metadata|instance-data|kubernetes|internal|\.local|localdomain|intranet"
    r"|\.corp|home\.arpa|nip\.io|sslip\.io|xip\.io|traefik\.me|localtest\.me|lvh\.me|vcap\.me|lacolhost\.com"
    r"|nip\.direct)(?:[:.][^\s/?#\\\"'<>@]{0,64})?))"
)
#: What makes ssrf_findings worth calling at all (a rule of the inspector's matcher runs it).
CANDIDATE_PATTERN = (
    r"//(?:[^\s/?#@]*@)?(?:\[|\d|[^\s/?#]*(?:localhost|metadata|instance-data|kubernetes|internal|\.local|"
    r"localdomain|intranet|\.corp|home\.arpa|nip\.io|sslip\.io|xip\.io|traefik\.me|localtest\.me|lvh\.me|vcap\.me|"
    r"lacolhost\.com|nip\.direct))"
)
METADATA_CANDIDATE_PATTERN = r"169\.254\.1|100\.100\.100\.200|fd00:ec2:"
BARE_CANDIDATE_PATTERN = r"(?:^|\s)(?:\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[[0-9a-f:.]{2,45}\])(?::\d{1,5})?\s*$"
#: The marker ssrf_findings returns when a text holds more suspicious URLs than it classifies.
FLOOD = "flood"


def ssrf_findings(text: str | bytes, allow: AddressAllowList | None, *, bare: bool) -> set[str]:
    """SSRF rules matched by the URLs in a decoded text (or its UTF-8; ``bare``: also whole values
    that are an internal address with no scheme). At most MAX_URLS suspicious URLs are classified;
    past that the result holds FLOOD (the inspector scores it as an evasion).

    The patterns run over UTF-8 bytes: the RE2 wrapper would encode a str again for every iterator
    (a large text holding URLs would be encoded three times)."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
    found: set[str] = set()
    if b"//" in data:
        for count, match in enumerate(_SUSPICIOUS_AUTHORITY.finditer(data)):
            if count >= MAX_URLS:
                found.add(FLOOD)
                break
            found.update(classify_host(_host_of(match.group(1).decode("utf-8", "replace")), allow))
    if bare:
        for address in _whole_values(data):
            for rule in classify_host(address, allow):
                found.add("ssrf-metadata" if rule == "ssrf-metadata" else "ssrf-bare-internal-address")
    return found
