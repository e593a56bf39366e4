"""LZW codec against real Go output (spec §13) and round-trip properties."""

from __future__ import annotations

import itertools
import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip import lzw

# Real captures from serf 0.9.4 (spec §13): the compress wrappers of an ack and a push/pull.
COMPRESSED_ACK = bytes.fromhex(
    "0982a4416c676f00a3427566da00620005083a05254c1e366fc290d10640500042aa82905153670e9d3665dcd0"
    "5906a0a3c78ea58ac891f346ceb21ff83e763485a44c9a336836fa2087af16a27168e28db252660c268e2a3b02"
    "0d3a5465d18f473d26151a9469d35253cac471f2264040"
)
COMPRESSED_PUSH_PULL = bytes.fromhex(
    "0982a4416c676f00a3427566da00cd000d0c22a5e44d1a37c34a397943a6cc9c00acaacc2923670a9d3074ca30"
    "29e3a69980248748052143460ea93f0000045895c4cd983072dc604cf3c64d00524dca5c54f52f1029396fd894"
    "1145460c292761da94096514ca1b39749a7d5850ca22c63200465999e3c6548002020414006b4855113b1ce930"
    "a1924669005367d3cee1260000b0bb78f3eaddcbb7afdfbf80030b1e4cb8b0e1c388132b5eccb8b1e3c790234b"
    "9e4cb970a9b56dcbacdc68864ece366228ce81a42a4a1d8a7930bb6565954e9d39aa1d06620a2020"
)


def go_buf(wrapper: bytes) -> bytes:
    body = msgpack.unpackb(wrapper[1:], raw=True)
    assert body[b"Algo"] == 0
    buf: bytes = body[b"Buf"]
    return buf


def read_codes(data: bytes) -> list[int]:
    """Independent, simple code reader (Go's width schedule) for structural checks."""
    codes: list[int] = []
    acc = nacc = pos = 0
    width, hi = 9, 257
    while True:
        while nacc < width and pos < len(data):
            acc |= data[pos] << nacc
            pos += 1
            nacc += 8
        if nacc < width:
            return codes
        code = acc & ((1 << width) - 1)
        acc >>= width
        nacc -= width
        codes.append(code)
        if code == 256:
            width, hi = 9, 257
            continue
        if code == 257:
            return codes
        hi += 1
        if hi >= 1 << width:
            if width == 12:
                hi -= 1
            else:
                width += 1


def test_real_ack_vector() -> None:
    plain = lzw.decompress(go_buf(COMPRESSED_ACK))
    assert len(plain) == 150
    assert plain[0] == 2  # ackResp
    body = msgpack.unpackb(plain[1:], raw=True)
    assert body[b"SeqNo"] > 0
    assert body[b"Payload"][0] == 1  # serf coordinate, version 1


def test_real_push_pull_vector() -> None:
    plain = lzw.decompress(go_buf(COMPRESSED_PUSH_PULL))
    assert len(plain) == 689
    assert plain.startswith(
        bytes.fromhex("0683a44a6f696ec3a54e6f64657301ac5573657253746174654c656ecd0249")
    )
    assert plain[-585] == 0x02  # the Serf user state


@pytest.mark.parametrize("vector", [COMPRESSED_ACK, COMPRESSED_PUSH_PULL])
def test_writer_is_byte_identical_to_go(vector: bytes) -> None:
    buf = go_buf(vector)
    assert lzw.compress(lzw.decompress(buf)) == buf


def test_empty_input() -> None:
    out = lzw.compress(b"")
    assert read_codes(out) == [256, 257]
    assert lzw.decompress(out) == b""


def test_stream_starts_with_clear_and_ends_with_eof() -> None:
    codes = read_codes(lzw.compress(b"hello hello hello"))
    assert codes[0] == 256
    assert codes[1] == ord("h")
    assert codes[-1] == 257


def test_writer_resets_before_the_table_fills() -> None:
    data = random.Random(7).randbytes(40_000)  # ~1 code per byte: several table cycles
    out = lzw.compress(data)
    codes = read_codes(out)
    clears = [i for i, c in enumerate(codes) if c == 256]
    assert len(clears) >= 9
    # 4095 - 257 codes between clears, exactly as Go's writer does it.
    assert all(b - a == 4095 - 257 + 1 for a, b in itertools.pairwise(clears))
    assert max(codes) <= 4094
    assert lzw.decompress(out) == data


def _encode_without_reset(data: bytes, clear_after: int | None = None) -> bytes:
    """An LZW writer that lets the table fill (deferred clear, as some GIF encoders do).

    Go's reader must keep decoding with the frozen table; this exercises that path, which
    Go's own writer never reaches.
    """
    bits, nbits, width, hi = 256, 9, 9, 257
    out = bytearray()
    table: dict[bytes, int] = {bytes((i,)): i for i in range(256)}
    emitted = 0

    def emit(code: int) -> None:
        nonlocal bits, nbits
        bits |= code << nbits
        nbits += width
        while nbits >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8

    w = data[:1]
    for x in data[1:]:
        wc = w + bytes((x,))
        if wc in table:
            w = wc
            continue
        emit(table[w])
        emitted += 1
        hi += 1
        if hi == 1 << width and width < 12:
            width += 1
        if hi <= 4095:
            table[wc] = hi
        w = bytes((x,))
        if clear_after is not None and emitted == clear_after:
            emit(256)
            table = {bytes((i,)): i for i in range(256)}
            width, hi = 9, 257
            emitted = 0
    if w:
        emit(table[w])
    emit(257)
    if nbits:
        out.append(bits & 0xFF)
    return bytes(out)


@pytest.mark.parametrize("clear_after", [None, 5000])
def test_reader_handles_a_frozen_full_table(clear_after: int | None) -> None:
    rnd = random.Random(3)
    data = bytes(rnd.choice(b"abcdefgh") for _ in range(60_000))
    stream = _encode_without_reset(data, clear_after)
    codes = read_codes(stream)
    assert len(codes) > 4095 - 257 + 2000  # well past the point where the table is full
    clears = codes.count(256)
    assert clears == 1 if clear_after is None else clears >= 2
    assert lzw.decompress(stream) == data


def test_invalid_code_is_rejected() -> None:
    # clear, then code 300 (beyond the next slot) at 9 bits
    bits = 256 | (300 << 9) | (257 << 18)
    with pytest.raises(lzw.LZWError, match="invalid code"):
        lzw.decompress(bits.to_bytes(4, "little"))


def test_missing_eof_is_rejected() -> None:
    out = lzw.compress(b"some data that compresses some data")
    with pytest.raises(lzw.LZWError, match="truncated"):
        lzw.decompress(out[:-3])
    with pytest.raises(lzw.LZWError):
        lzw.decompress(b"")


def test_trailing_bytes_after_eof_are_ignored() -> None:
    out = lzw.compress(b"payload")
    assert lzw.decompress(out + b"\xff\xff\xff") == b"payload"


def test_output_limit() -> None:
    bomb = lzw.compress(bytes(1_000_000))
    assert len(bomb) < 10_000
    with pytest.raises(lzw.LZWError, match="limit"):
        lzw.decompress(bomb, limit=100_000)
    assert len(lzw.decompress(bomb, limit=1_000_000)) == 1_000_000


@st.composite
def big_inputs(draw: st.DrawFn) -> bytes:
    """Large inputs from a seed: cheap to generate, and they cross every width and reset."""
    seed = draw(st.integers(0, 2**32))
    size = draw(st.integers(10_000, 60_000))
    alphabet = draw(st.sampled_from([b"\x00", b"ab", b"abcdefgh", bytes(range(256))]))
    rnd = random.Random(seed)
    return bytes(rnd.choices(alphabet, k=size))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_round_trip_small(data: bytes) -> None:
    assert lzw.decompress(lzw.compress(data)) == data


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(big_inputs())
def test_round_trip_large(data: bytes) -> None:
    assert lzw.decompress(lzw.compress(data)) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_raises_only_lzw_error(data: bytes) -> None:
    try:
        out = lzw.decompress(data, limit=1 << 16)
    except lzw.LZWError:
        return
    assert len(out) <= 1 << 16
