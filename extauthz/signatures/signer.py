"""Signing a request the way a client would: used by tests, the benchmark and documentation examples.

The sidecar itself never signs; this is the mirror image of :mod:`extauthz.signatures.verify`, kept
here so that examples and tests build signatures with one small, readable function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from extauthz.signatures.algorithms import sign
from extauthz.signatures.base import Message, signature_base
from extauthz.signatures.sf import BareItem, InnerList, serialize_inner_list
from extauthz.signatures.verify import component_identifier, encode_signature

__all__ = ["SignedHeaders", "sign_message"]


@dataclass(frozen=True, slots=True)
class SignedHeaders:
    signature_input: str
    signature: str
    #: The exact signature base that was signed (for debugging a mismatch).
    base: bytes


def sign_message(
    message: Message,
    components: Sequence[str],
    *,
    key_id: str,
    algorithm: str,
    private_key: Any,
    created: int,
    expires: int | None = None,
    nonce: str | None = None,
    tag: str | None = None,
    include_alg: bool = False,
    label: str = "sig1",
) -> SignedHeaders:
    """Sign ``message`` over ``components``; returns the Signature-Input and Signature values."""
    params: list[tuple[str, BareItem]] = [("created", created)]
    if expires is not None:
        params.append(("expires", expires))
    if nonce is not None:
        params.append(("nonce", nonce))
    params.append(("keyid", key_id))
    if include_alg:
        params.append(("alg", algorithm))
    if tag is not None:
        params.append(("tag", tag))
    inner = InnerList(tuple(component_identifier(c) for c in components), tuple(params))
    base = signature_base(message, inner)
    value = sign(algorithm, private_key, base)
    return SignedHeaders(f"{label}={serialize_inner_list(inner)}", f"{label}={encode_signature(value)}", base)
