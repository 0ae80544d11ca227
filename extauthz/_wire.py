"""Protocol Buffers wire-format pieces for the messages encoded by hand on hot paths (the
CheckResponse in responses.py, OTLP spans in telemetry/otlp_encode.py).

https://protobuf.dev/programming-guides/encoding/
"""

from __future__ import annotations

__all__ = ["varint"]

_SMALL = tuple(bytes((i,)) for i in range(0x80))


def varint(value: int) -> bytes:
    """A base-128 varint; a negative value as an int64 (two's complement, ten bytes)."""
    if 0 <= value < 0x80:
        return _SMALL[value]  # lengths and tags: nearly always one byte
    if 0 < value < 0x4000:  # a span's or a header's length
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
