"""The primitives of WireGuard's Noise_IKpsk2 instantiation (whitepaper §5.4).

X25519 and XChaCha20-Poly1305 come from libsodium (pynacl); the transport cipher ChaCha20-Poly1305
comes from OpenSSL (``cryptography``), measured here 2.4x faster than libsodium per 1,280-byte packet
with byte-identical output (see ``benchmarks/bench_wireguard.py``). BLAKE2s, its keyed MAC form and
HMAC-BLAKE2s come from hashlib.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import nacl.bindings as sodium
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from embedmesh.errors import ParseError

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

KEY_SIZE = 32
TAG_SIZE = 16
ZERO_KEY = bytes(32)

_blake2s = hashlib.blake2s
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_pack_counter = struct.Struct("<Q").pack


class CryptoError(ParseError):
    """Authentication failed: the bytes were not produced by the key holder."""


def hash_(*parts: bytes) -> bytes:
    """HASH(parts...): BLAKE2s-256 over the concatenation."""
    h = _blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes | memoryview) -> bytes:
    """MAC(key, data): keyed BLAKE2s with a 16-byte output."""
    return _blake2s(data, digest_size=16, key=key).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 (RFC 2104 over BLAKE2s)."""
    return hmac.new(key, data, _blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    """KDF1: the first output of WireGuard's HKDF construction."""
    t0 = hmac_(key, data)
    return hmac_(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """KDF2: two chained outputs."""
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    return t1, hmac_(t0, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """KDF3: three chained outputs."""
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    t2 = hmac_(t0, t1 + b"\x02")
    return t1, t2, hmac_(t0, t2 + b"\x03")


def generate_private_key(random_bytes: bytes) -> bytes:
    """Turn 32 random bytes into a clamped Curve25519 private key (as ``wg genkey`` does)."""
    if len(random_bytes) != KEY_SIZE:
        raise ValueError("a private key needs exactly 32 random bytes")
    key = bytearray(random_bytes)
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


def public_key(private_key: bytes) -> bytes:
    """The X25519 public key of ``private_key``."""
    return bytes(sodium.crypto_scalarmult_base(private_key))


def dh(private_key: bytes, public: bytes) -> bytes:
    """X25519; a low-order peer point (an all-zero result) is an authentication failure."""
    try:
        shared = bytes(sodium.crypto_scalarmult(private_key, public))
    except (nacl.exceptions.CryptoError, nacl.exceptions.RuntimeError, RuntimeError) as exc:
        raise CryptoError("X25519 produced an all-zero shared secret") from exc
    if shared == ZERO_KEY:
        raise CryptoError("X25519 produced an all-zero shared secret")
    return shared


def nonce(counter: int) -> bytes:
    """The 96-bit ChaCha20-Poly1305 nonce: 32 zero bits, then the 64-bit little-endian counter."""
    return _NONCE_PREFIX + _pack_counter(counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, associated: bytes) -> bytes:
    """AEAD(key, counter, plaintext, associated) for the handshake (one-off keys)."""
    return ChaCha20Poly1305(key).encrypt(nonce(counter), plaintext, associated)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, associated: bytes) -> bytes:
    """The inverse of :func:`aead_encrypt`; raises :class:`CryptoError` when the tag is wrong."""
    try:
        return ChaCha20Poly1305(key).decrypt(nonce(counter), ciphertext, associated)
    except InvalidTag as exc:
        raise CryptoError("AEAD authentication failed") from exc


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """XAEAD: XChaCha20-Poly1305 with a 24-byte random nonce, used for cookie replies."""
    return bytes(sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, associated, nonce24, key))


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """The inverse of :func:`xaead_encrypt`; raises :class:`CryptoError` when the tag is wrong."""
    try:
        return bytes(sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, associated, nonce24, key))
    except nacl.exceptions.CryptoError as exc:
        raise CryptoError("XAEAD authentication failed") from exc


# TAI64N (https://cr.yp.to/libtai/tai64.html): 2**62 + 10 seconds is the TAI64 label of the Unix
# epoch (TAI was 10 s ahead of UTC in 1970).
_TAI64_EPOCH = 0x400000000000000A
_TAI64N = struct.Struct("!QI")
# Like wireguard-go, drop the low bits of the nanoseconds (about 16.8 ms of resolution) so the
# timestamp cannot be used to fingerprint the sender's clock; the receiver only compares order.
_WHITENER_MASK = 0xFFFFFF


def tai64n(unix_time: float) -> bytes:
    """The 12-byte TAI64N label of a Unix time, whitened to ~16 ms resolution."""
    seconds = int(unix_time)
    nanos = int((unix_time - seconds) * 1e9) & ~_WHITENER_MASK
    return _TAI64N.pack(seconds + _TAI64_EPOCH, nanos)


__all__ = [
    "CONSTRUCTION",
    "IDENTIFIER",
    "LABEL_COOKIE",
    "LABEL_MAC1",
    "ChaCha20Poly1305",
    "CryptoError",
    "InvalidTag",
    "aead_decrypt",
    "aead_encrypt",
    "dh",
    "generate_private_key",
    "hash_",
    "hmac_",
    "kdf1",
    "kdf2",
    "kdf3",
    "mac",
    "nonce",
    "public_key",
    "tai64n",
    "xaead_decrypt",
    "xaead_encrypt",
]
