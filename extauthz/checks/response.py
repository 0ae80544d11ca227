"""Response: headers set on the upstream request when a request is allowed (values are CEL).

Each configured header is always controlled by us: it is set when its expression yields a value,
and removed from the request otherwise, so a client can never supply it itself.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import ClassVar

from extauthz.cel import HEADER_VALUE, CelError, Expression
from extauthz.checks import Phase, register
from extauthz.context import CheckContext, Denial
from extauthz.policy.build import BuildContext, Spec

log = logging.getLogger("extauthz.response")

_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_FORBIDDEN = frozenset({"host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "keep-alive"})
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class HeaderValue:
    name: str
    value: Expression


@register("response", Phase.RESPONSE)
class ResponseCheck:
    may_wait: ClassVar[bool] = False

    def __init__(self, headers: tuple[HeaderValue, ...]) -> None:
        self.headers = headers
        self.owned_headers = tuple(header.name for header in headers)

    @classmethod
    def from_spec(cls, spec: Spec, build: BuildContext) -> ResponseCheck | None:
        if not spec.is_mapping(allowed={"headers"}):
            return None
        headers: list[HeaderValue] = []
        if not spec.child("headers").present:
            spec.error("is required", "headers")
        for name, node in spec.child("headers").entries(nonempty="header"):
            if _HEADER_NAME.fullmatch(name) is None or name in _FORBIDDEN:
                node.error("must be a lower-case header name that is not a pseudo, hop-by-hop or framing header")
                continue
            # required: a header left without a value would be neither set nor removed
            expression = node.cel(expect=HEADER_VALUE, required=True)
            if expression is not None:
                headers.append(HeaderValue(name, expression))
        return cls(tuple(headers)) if headers else None

    async def check(self, ctx: CheckContext) -> Denial | None:
        for header in self.headers:
            try:
                value = header.value.evaluate(ctx)
            except CelError as exc:
                ctx.note(f"header {header.name}: not set ({exc.detail}); removed from the request")
                ctx.remove_headers.append(header.name)
                continue
            if value is None:
                ctx.remove_headers.append(header.name)
                continue
            text = value if isinstance(value, str) else _to_text(value)
            if _BAD_VALUE.search(text):
                log.warning("header %s: value has control characters; removed", header.name)
                ctx.remove_headers.append(header.name)
                continue
            ctx.upstream_headers.append((header.name, text))
            if ctx.steps is not None:  # explain only: no formatting on the serving path
                ctx.note(f"header {header.name}: set")
        return None


def _to_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_to_text(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
