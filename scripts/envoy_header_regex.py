"""The RE2 regexes of deploy/envoy/envoy-http.yaml that match "every header name except these".

Envoy's HTTP ext_authz mode copies the authorization server's response headers that a matcher lets
through (``allowed_upstream_headers``, ``allowed_client_headers``). The sidecar's policies may set any
header, so the matchers must match any name, except the ones that belong to the authorization hop
itself: a ``content-length: 0`` of the sidecar's 200 copied onto the upstream request would cut the
client's body off, a ``host`` would reroute it, and the ``x-extauthz-*`` headers that carry dynamic
metadata are for Envoy, not for the application or the client. Envoy's string matchers cannot say
"not", and RE2 has no look-ahead, so the complement is spelled out as a trie: below each excluded
name's characters, any other character leads to "anything goes".

    python scripts/envoy_header_regex.py          # print both regexes

tests/deploy/test_envoy_http.py checks that envoy-http.yaml carries exactly what this prints and
that the regexes accept and refuse what they should (with RE2, the engine Envoy uses).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

__all__ = ["CLIENT_EXCLUDED", "EXCLUDED_PREFIXES", "UPSTREAM_EXCLUDED", "all_but"]

#: Never copied anywhere: pseudo-headers, Envoy's own, and the sidecar's control/metadata headers.
EXCLUDED_PREFIXES = (":", "x-envoy-", "x-extauthz-")
#: Headers of the sidecar's HTTP response itself (framing, hop-by-hop, its own identity), which must
#: never be copied onto the upstream request; plus the client-only rate-limit headers of an allowed
#: request (allowed_client_headers_on_success sends those to the client).
UPSTREAM_EXCLUDED = (
    "connection", "content-length", "content-type", "date", "host", "keep-alive", "proxy-connection",
    "ratelimit", "ratelimit-policy", "server", "te", "trailer", "transfer-encoding", "upgrade",
)  # fmt: skip
#: Headers of a denial that Envoy sets itself for the client (framing, hop-by-hop).
CLIENT_EXCLUDED = (
    "connection", "content-length", "date", "keep-alive", "proxy-connection", "server", "te", "trailer",
    "transfer-encoding", "upgrade",
)  # fmt: skip


def all_but(exact: Iterable[str], prefixes: Iterable[str] = EXCLUDED_PREFIXES) -> str:
    """An RE2 regex (full match) for every non-empty name that is none of ``exact`` and starts with
    none of ``prefixes``."""
    trie: dict = {}
    end, dead = object(), object()
    for words, mark in ((exact, end), (prefixes, dead)):
        for word in words:
            node = trie
            for char in word:
                node = node.setdefault(char, {})
            node[mark] = True

    def below(node: dict, root: bool) -> str | None:
        """Regex of the suffixes allowed below ``node`` (None: nothing is)."""
        if dead in node:
            return None
        chars = sorted(k for k in node if isinstance(k, str))
        options = []
        if chars:
            options.append("[^" + "".join(re.escape(c) if c in "]\\^-" else c for c in chars) + "].*")
        else:
            options.append(".+")
        for char in chars:
            rest = below(node[char], False)
            if rest is not None:
                options.append(re.escape(char) + rest)
        regex = "(?:" + "|".join(options) + ")"
        if not root and end not in node:
            regex += "?"  # the name may stop here: it is not an excluded one
        return regex

    regex = below(trie, True)
    assert regex is not None
    return regex


def main() -> int:
    print("allowed_upstream_headers:", all_but(UPSTREAM_EXCLUDED))
    print("allowed_client_headers:  ", all_but(CLIENT_EXCLUDED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
