"""LZW as Go's `compress/lzw` does it with LSB bit order and 8-bit literals (GIF style).

memberlist wraps every TCP stream from serf (and large UDP packets) in this format, and Python
ships no LZW codec. The decoder mirrors Go's reader state machine exactly, including how the
12-bit cap is held; the encoder mirrors Go's writer, which resets with a clear code before the
table fills, so its output is byte-identical to Go's for the same input.
"""

from __future__ import annotations

__all__ = ["DEFAULT_LIMIT", "LZWError", "compress", "decompress"]

DEFAULT_LIMIT = 40 * 1024 * 1024

_LIT_WIDTH = 8
_CLEAR = 1 << _LIT_WIDTH  # 256
_EOF = _CLEAR + 1  # 257
_MAX_WIDTH = 12
_MAX_CODE = (1 << _MAX_WIDTH) - 1  # 4095

_LITERALS: tuple[bytes, ...] = tuple(bytes((i,)) for i in range(256))


class LZWError(ValueError):
    """Invalid, truncated or oversized LZW data."""


def decompress(data: bytes, limit: int = DEFAULT_LIMIT) -> bytes:
    """Inflate one LZW stream; the limit guards against decompression bombs.

    Like Go's reader, a stream must end with the EOF code (anything after it is ignored), and a
    code beyond the next table slot is an error.
    """
    # Each table slot holds its whole expansion as bytes: building an entry is one C-level
    # concatenation, and emitting a code is one append, which keeps the per-code Python work
    # tiny. Slots >= hi are stale leftovers from before a clear code and are never read.
    table: list[bytes] = [*_LITERALS, b"", b""]
    table.extend(b"" for _ in range(_MAX_CODE + 1 - len(table)))
    out: list[bytes] = []
    olen = 0
    width = _LIT_WIDTH + 1
    mask = (1 << width) - 1
    hi = _EOF
    overflow = 1 << width
    last: bytes | None = None
    bits = 0
    nbits = 0
    pos = 0
    n = len(data)
    while True:
        while nbits < width:
            if pos >= n:
                raise LZWError("lzw: stream truncated before the EOF code")
            bits |= data[pos] << nbits
            pos += 1
            nbits += 8
        code = bits & mask
        bits >>= width
        nbits -= width

        if code < _CLEAR:
            cur = _LITERALS[code]
        elif code == _CLEAR:
            width = _LIT_WIDTH + 1
            mask = (1 << width) - 1
            hi = _EOF
            overflow = 1 << width
            last = None
            continue
        elif code == _EOF:
            break
        elif code < hi:
            cur = table[code]
        elif code == hi:
            # Either the KwKwK case (the entry being defined right now), or, at the 12-bit
            # cap where the previous code is forgotten, the last entry that was recorded.
            cur = last + last[:1] if last is not None else table[code]
        else:
            raise LZWError(f"lzw: invalid code {code} (next slot is {hi})")

        out.append(cur)
        olen += len(cur)
        if olen > limit:
            raise LZWError(f"lzw: output exceeds the {limit}-byte limit")
        if last is not None:
            table[hi] = last + cur[:1]
        last = cur
        hi += 1
        if hi >= overflow:
            if width == _MAX_WIDTH:
                # Table full: Go keeps decoding with a frozen table until a clear code.
                last = None
                hi -= 1
            else:
                width += 1
                mask = (1 << width) - 1
                overflow <<= 1
    return b"".join(out)


def compress(data: bytes) -> bytes:
    """Deflate like Go's `lzw.NewWriter(w, lzw.LSB, 8)` followed by Close."""
    out = bytearray()
    bits = _CLEAR  # the stream starts with a clear code
    nbits = _LIT_WIDTH + 1
    width = _LIT_WIDTH + 1
    hi = _EOF
    overflow = 1 << width
    table: dict[int, int] = {}

    if data:
        view = memoryview(data)
        code = view[0]
        for x in view[1:]:
            key = code << 8 | x
            nxt = table.get(key)
            if nxt is not None:
                code = nxt
                continue
            bits |= code << nbits
            nbits += width
            while nbits >= 8:
                out.append(bits & 0xFF)
                bits >>= 8
                nbits -= 8
            code = x
            hi += 1
            if hi == overflow:
                width += 1
                overflow <<= 1
            if hi == _MAX_CODE:
                # Out of codes: Go's writer emits a clear and starts a fresh table rather than
                # letting the table fill, so the reader never reaches its frozen state.
                bits |= _CLEAR << nbits
                nbits += width
                width = _LIT_WIDTH + 1
                hi = _EOF
                overflow = 1 << width
                table.clear()
                continue
            table[key] = hi
        bits |= code << nbits
        nbits += width
        hi += 1
        if hi == overflow:
            width += 1
            overflow <<= 1
        if hi == _MAX_CODE:
            bits |= _CLEAR << nbits
            nbits += width
            width = _LIT_WIDTH + 1
    bits |= _EOF << nbits
    nbits += width
    while nbits > 0:
        out.append(bits & 0xFF)
        bits >>= 8
        nbits -= 8
    return bytes(out)
