"""The memberlist/Serf keyring: AES-GCM sealing with a primary key and any number of old keys.

Sending always uses the primary key; receiving tries every installed key, which is what lets a
cluster rotate keys (install everywhere, switch the primary, then remove the old one) without a
flag day. The on-disk format is serf's `-keyring-file`: a JSON array of base64 keys, primary first.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "ENCRYPTION_OVERHEAD",
    "KEY_SIZES",
    "DecryptError",
    "Keyring",
    "KeyringError",
    "encrypted_length",
    "generate_key",
    "parse_key",
]

KEY_SIZES = (16, 24, 32)
VERSION_PADDED = 0
VERSION_PLAIN = 1
_NONCE_SIZE = 12
_TAG_SIZE = 16
_BLOCK_SIZE = 16
# version byte + nonce + GCM tag: what version 1 adds to every sealed message.
ENCRYPTION_OVERHEAD = 1 + _NONCE_SIZE + _TAG_SIZE


class KeyringError(ValueError):
    """A bad key, a bad keyring operation or an unreadable keyring file."""


class DecryptError(ValueError):
    """A sealed message that no installed key opens, or that is malformed."""


def encrypted_length(plain_len: int, version: int = VERSION_PLAIN) -> int:
    """Sealed size, needed up front because the TCP header (and so the AAD) carries it."""
    if version == VERSION_PADDED:
        plain_len += _BLOCK_SIZE - plain_len % _BLOCK_SIZE
    return ENCRYPTION_OVERHEAD + plain_len


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray | memoryview):
        raise KeyringError("encryption key must be bytes")
    key = bytes(key)
    if len(key) not in KEY_SIZES:
        raise KeyringError(f"encryption key must be 16, 24 or 32 bytes, got {len(key)}")
    return key


def parse_key(b64: str) -> bytes:
    """Decode a key as given to `serf agent -encrypt` (standard base64)."""
    try:
        key = base64.b64decode(b64.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise KeyringError(f"encryption key is not valid base64: {e}") from e
    if len(key) not in KEY_SIZES:
        raise KeyringError(
            f"encryption key must be 16, 24 or 32 bytes after base64 decoding, got {len(key)}"
        )
    return key


def generate_key() -> str:
    """A fresh AES-256 key in base64, like `serf keygen`."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _pkcs7_unpad(buf: bytes) -> bytes:
    if not buf or len(buf) % _BLOCK_SIZE:
        raise DecryptError("padded plaintext is not a whole number of blocks")
    pad = buf[-1]
    if not 1 <= pad <= _BLOCK_SIZE or buf[-pad:] != bytes((pad,)) * pad:
        raise DecryptError("bad PKCS#7 padding")
    return buf[:-pad]


class Keyring:
    """Installed keys, primary first. Not thread-safe; use it from one event loop."""

    def __init__(self, keys: Sequence[bytes], primary: bytes | None = None) -> None:
        self._keys: list[bytes] = []
        self._ciphers: dict[bytes, AESGCM] = {}
        for k in keys:
            self.install(k)
        if primary is not None:
            self.install(primary)
            self.use(primary)
        if not self._keys:
            raise KeyringError("a keyring needs at least one key")

    @property
    def primary_key(self) -> bytes:
        return self._keys[0]

    @property
    def keys(self) -> list[bytes]:
        return list(self._keys)

    def install(self, key: bytes) -> None:
        """Add a key for decryption; installing a key twice is a no-op, as in memberlist."""
        key = _check_key(key)
        if key not in self._ciphers:
            self._ciphers[key] = AESGCM(key)
            self._keys.append(key)

    def use(self, key: bytes) -> None:
        """Make an installed key the one used for sending."""
        key = _check_key(key)
        if key not in self._ciphers:
            raise KeyringError("requested key is not in the keyring")
        self._keys.remove(key)
        self._keys.insert(0, key)

    def remove(self, key: bytes) -> None:
        """Forget a key; removing one that is not installed is a no-op, as in memberlist."""
        key = _check_key(key)
        if key == self._keys[0]:
            raise KeyringError("cannot remove the primary key")
        if key in self._ciphers:
            del self._ciphers[key]
            self._keys.remove(key)

    def encrypt(self, plaintext: bytes, aad: bytes = b"", *, version: int = VERSION_PLAIN) -> bytes:
        """Seal with the primary key: version byte, random nonce, ciphertext and tag.

        Version 1 is what memberlist sends at protocol >= 2 (always with serf); version 0
        (PKCS#7-padded) exists for tests and very old peers.
        """
        if version == VERSION_PADDED:
            pad = _BLOCK_SIZE - len(plaintext) % _BLOCK_SIZE
            plaintext = bytes(plaintext) + bytes((pad,)) * pad
        elif version != VERSION_PLAIN:
            raise ValueError(f"unknown encryption version {version}")
        nonce = secrets.token_bytes(_NONCE_SIZE)
        sealed = self._ciphers[self._keys[0]].encrypt(nonce, bytes(plaintext), aad or None)
        return bytes((version,)) + nonce + sealed

    def decrypt(self, blob: bytes, aad: bytes = b"") -> bytes:
        """Open a sealed message with whichever installed key works."""
        try:
            blob = bytes(blob)
            aad_b = bytes(aad) if aad else None
        except (TypeError, ValueError) as e:
            raise DecryptError(f"cannot read sealed message: {e}") from e
        if not blob:
            raise DecryptError("cannot decrypt an empty payload")
        version = blob[0]
        if version > VERSION_PLAIN:
            raise DecryptError(f"unsupported encryption version {version}")
        if len(blob) < encrypted_length(0, version):
            raise DecryptError(f"payload is too small to decrypt: {len(blob)}")
        nonce = blob[1 : 1 + _NONCE_SIZE]
        sealed = blob[1 + _NONCE_SIZE :]
        for key in self._keys:
            try:
                plain = self._ciphers[key].decrypt(nonce, sealed, aad_b)
            except (InvalidTag, ValueError, OverflowError):
                continue
            return _pkcs7_unpad(plain) if version == VERSION_PADDED else plain
        raise DecryptError("no installed key could decrypt the message")

    # -- persistence -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read a serf keyring file (JSON array of base64 keys; the first is the primary)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KeyringError(f"cannot read keyring file {path}: {e}") from e
        try:
            data = json.loads(text)
        except ValueError as e:
            raise KeyringError(f"keyring file {path} is not valid JSON: {e}") from e
        if not isinstance(data, list) or not all(isinstance(k, str) for k in data):
            raise KeyringError(f"keyring file {path} must hold a JSON array of base64 strings")
        if not data:
            raise KeyringError(f"no keys present in keyring file {path}")
        keys: list[bytes] = []
        for i, k in enumerate(data):
            try:
                keys.append(parse_key(k))
            except KeyringError as e:
                raise KeyringError(f"keyring file {path}, key #{i}: {e}") from e
        return cls(keys, keys[0])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the keyring file atomically with mode 0600, as serf does (keys are secrets)."""
        target = Path(path)
        body = json.dumps([base64.b64encode(k).decode("ascii") for k in self._keys], indent=2)
        directory = target.parent
        # mkstemp creates the file 0600 from the start, so the keys are never world-readable.
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
