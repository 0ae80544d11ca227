"""Our hand-written varint is protobuf's, at every length boundary (lengths of spans and headers
take the two-byte fast path)."""

from __future__ import annotations

from google.protobuf.internal.encoder import _VarintBytes
from hypothesis import given
from hypothesis import strategies as st

from extauthz._wire import varint


@given(st.one_of(st.integers(0, 0x4000 + 10), st.integers(0, 2**64 - 1),
                 st.sampled_from([0x7F, 0x80, 0x3FFF, 0x4000, 2**21 - 1, 2**21, 2**63 - 1, 2**64 - 1])))  # fmt: skip
def test_unsigned_values_encode_as_protobuf_does(value: int) -> None:
    assert varint(value) == _VarintBytes(value)


@given(st.integers(-(2**63), -1))
def test_negative_values_are_ten_byte_int64s(value: int) -> None:
    assert varint(value) == _VarintBytes(value + (1 << 64))
    assert len(varint(value)) == 10
