"""Keyring: AES-GCM framing against a real serf capture, key rotation, and the keyring file."""

from __future__ import annotations

import base64
import json
import os
import stat
import zlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.keyring import (
    ENCRYPTION_OVERHEAD,
    DecryptError,
    Keyring,
    KeyringError,
    encrypted_length,
    generate_key,
    parse_key,
)

# Spec §13: a UDP datagram captured between two `serf agent -encrypt` agents.
SPEC_KEY = "sp8tcdgFQ4Ast2YF5wpEsgvPPYidXYfAEaYkJwXSea4="
SPEC_UDP = bytes.fromhex(
    "01189ace2134265039ae0f8c280839d085131aabe5fb45e06e6b3b175d6612ac2b643746dd32c36b024940133e"
    "b764d97bb39d20534119a0bac9315bf248993b509e979d9e2d9de3bab7d68e7e533e4139e4102b42ac482ebda1"
    "e95a464ac9c5f21eacaac0768de2fb74345411608d256c35f678e83e7a9818cd643524a639e9626ad1507b8caa"
    "0e9f0ee97abe93d04d04b8c3486af917c96bcd278fb62f1eaa85b69a7d556398e271879a17365b4aa1ce561685"
    "50"
)

K1 = bytes(range(32))
K2 = bytes(range(1, 17))
K3 = bytes(range(2, 26))


def test_decrypts_real_serf_packet() -> None:
    ring = Keyring([parse_key(SPEC_KEY)])
    plain = ring.decrypt(SPEC_UDP)
    assert len(plain) == 152
    assert len(SPEC_UDP) == len(plain) + ENCRYPTION_OVERHEAD
    assert plain[0] == 0x0C  # hasCrc
    assert zlib.crc32(plain[5:]) == int.from_bytes(plain[1:5], "big")
    assert plain[5] == 0x07  # compound inside


def test_real_packet_with_key_rotation_in_progress() -> None:
    ring = Keyring([K1, parse_key(SPEC_KEY)])
    assert ring.primary_key == K1
    assert ring.decrypt(SPEC_UDP)[0] == 0x0C


def test_wrong_key_and_wrong_aad_fail() -> None:
    with pytest.raises(DecryptError, match="no installed key"):
        Keyring([K1]).decrypt(SPEC_UDP)
    with pytest.raises(DecryptError):
        Keyring([parse_key(SPEC_KEY)]).decrypt(SPEC_UDP, b"label")
    with pytest.raises(DecryptError):
        Keyring([parse_key(SPEC_KEY)]).decrypt(SPEC_UDP[:-1] + bytes((SPEC_UDP[-1] ^ 1,)))


def test_encrypt_layout_and_round_trip() -> None:
    ring = Keyring([K1])
    for n in (0, 1, 15, 16, 17, 1400):
        pt = os.urandom(n)
        blob = ring.encrypt(pt, b"aad")
        assert blob[0] == 1
        assert len(blob) == n + 29 == encrypted_length(n)
        assert ring.decrypt(blob, b"aad") == pt
        # An independent AES-GCM open of the same blob: version | nonce | ciphertext+tag.
        assert AESGCM(K1).decrypt(blob[1:13], blob[13:], b"aad") == pt
    a, b = ring.encrypt(b"same"), ring.encrypt(b"same")
    assert a[1:13] != b[1:13]  # fresh nonce every time


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 31, 32, 100])
def test_version_0_padding_round_trip(n: int) -> None:
    ring = Keyring([K2])
    pt = os.urandom(n)
    blob = ring.encrypt(pt, version=0)
    assert blob[0] == 0
    assert len(blob) == encrypted_length(n, 0)
    assert (len(blob) - ENCRYPTION_OVERHEAD) % 16 == 0
    assert len(blob) - ENCRYPTION_OVERHEAD - n in range(1, 17)
    assert ring.decrypt(blob) == pt


@pytest.mark.parametrize(
    "padded",
    [b"x" * 15 + b"\x00", b"x" * 15 + b"\x11", b"x" * 14 + b"\x01\x02", b"x" * 17, b""],
)
def test_version_0_bad_padding(padded: bytes) -> None:
    nonce = b"\x00" * 12
    blob = b"\x00" + nonce + AESGCM(K2).encrypt(nonce, padded, None)
    with pytest.raises(DecryptError):
        Keyring([K2]).decrypt(blob)


def test_short_or_unknown_version() -> None:
    ring = Keyring([K1])
    with pytest.raises(DecryptError, match="empty"):
        ring.decrypt(b"")
    with pytest.raises(DecryptError, match="version"):
        ring.decrypt(b"\x02" + bytes(40))
    with pytest.raises(DecryptError, match="too small"):
        ring.decrypt(b"\x01" + bytes(27))
    with pytest.raises(DecryptError, match="too small"):
        ring.decrypt(b"\x00" + bytes(40))  # v0 needs at least one padded block


def test_keyring_operations() -> None:
    ring = Keyring([K1, K2])
    assert ring.primary_key == K1
    assert ring.keys == [K1, K2]
    ring.install(K3)
    ring.install(K2)  # no-op
    assert ring.keys == [K1, K2, K3]
    old = ring.encrypt(b"sealed with K1")
    ring.use(K3)
    assert ring.primary_key == K3
    assert ring.keys[0] == K3 and set(ring.keys) == {K1, K2, K3}
    assert ring.decrypt(old) == b"sealed with K1"
    assert Keyring([K3]).decrypt(ring.encrypt(b"new")) == b"new"
    with pytest.raises(KeyringError, match="cannot remove the primary key"):
        ring.remove(K3)
    ring.remove(K1)
    assert K1 not in ring.keys
    with pytest.raises(DecryptError):
        ring.decrypt(old)
    ring.remove(K1)  # not installed: no-op
    with pytest.raises(KeyringError, match="not in the keyring"):
        ring.use(K1)
    with pytest.raises(KeyringError, match="16, 24 or 32"):
        ring.install(b"short")
    keys = ring.keys
    keys.clear()  # a copy: the ring is unaffected
    assert ring.keys


def test_constructor() -> None:
    assert Keyring([K1, K2], primary=K2).keys == [K2, K1]
    assert Keyring([K1], primary=K3).keys == [K3, K1]  # as memberlist: primary gets installed
    assert Keyring([K1, K1]).keys == [K1]
    with pytest.raises(KeyringError):
        Keyring([])
    with pytest.raises(KeyringError):
        Keyring([b"x" * 20])


def test_parse_and_generate_key() -> None:
    assert parse_key(SPEC_KEY) == base64.b64decode(SPEC_KEY)
    assert parse_key(" " + base64.b64encode(K2).decode() + "\n") == K2
    with pytest.raises(
        KeyringError,
        match=r"^encryption key must be 16, 24 or 32 bytes after base64 decoding, got 7$",
    ):
        parse_key(base64.b64encode(b"1234567").decode())
    for bad in ("not base64!", "abc", "sp8tcdgFQ4Ast2YF5wpEsgvPPYidXYfAEaYkJwXSea4"):
        with pytest.raises(KeyringError, match="base64"):
            parse_key(bad)
    k1, k2 = generate_key(), generate_key()
    assert k1 != k2
    assert len(parse_key(k1)) == 32


def test_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ring = Keyring([K1, K2, K3], primary=K2)
    ring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == [base64.b64encode(k).decode() for k in (K2, K1, K3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keyring.json"]  # no temp leftovers
    loaded = Keyring.load(path)
    assert loaded.keys == [K2, K1, K3]
    # Overwrite in place after a rotation.
    loaded.use(K3)
    loaded.remove(K2)
    loaded.save(path)
    assert Keyring.load(str(path)).keys == [K3, K1]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_serf_written_file(tmp_path: Path) -> None:
    path = tmp_path / "serf.keyring"
    # As serf's writeKeyringFile produces it (json.MarshalIndent with two spaces).
    path.write_text('[\n  "' + SPEC_KEY + '",\n  "' + base64.b64encode(K2).decode() + '"\n]')
    ring = Keyring.load(path)
    assert ring.primary_key == parse_key(SPEC_KEY)
    assert ring.decrypt(SPEC_UDP)[0] == 0x0C


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"a": 1}', "JSON array"),
        ("[1, 2]", "JSON array"),
        ("[]", "no keys"),
        ('["!!!"]', "key #0.*base64"),
        (f'["{SPEC_KEY}", "{base64.b64encode(b"short").decode()}"]', "key #1.*got 5"),
    ],
)
def test_load_malformed(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "k.json"
    path.write_text(content)
    with pytest.raises(KeyringError, match=message):
        Keyring.load(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="cannot read"):
        Keyring.load(tmp_path / "absent.json")


_RING = Keyring([K1, K2])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=8))
def test_arbitrary_bytes_raise_only_decrypt_error(blob: bytes, aad: bytes) -> None:
    with pytest.raises(DecryptError):
        _RING.decrypt(blob, aad)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(SPEC_UDP) - 1), st.integers(1, 255))
def test_any_bit_flip_of_real_packet_is_rejected(pos: int, xor: int) -> None:
    ring = Keyring([parse_key(SPEC_KEY)])
    mutated = bytearray(SPEC_UDP)
    mutated[pos] ^= xor
    with pytest.raises(DecryptError):
        ring.decrypt(bytes(mutated))
