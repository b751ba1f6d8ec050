"""mac1, mac2 and cookie replies: WireGuard's DoS mitigation (whitepaper §5.3, §5.4.4, §5.4.7).

mac1 proves the sender knows our public key and is always checked, before any DH. Under load, a
handshake message must also carry a valid mac2, computed with a cookie that only a sender who can
receive at its claimed source address obtains; without it the answer is a cookie reply and no
state at all.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable

from embedmesh.wireguard import crypto
from embedmesh.wireguard.messages import CookieReply

#: Cookie secrets change, and received cookies expire, after two minutes (whitepaper §6.1).
COOKIE_REFRESH_TIME = 120.0

Endpoint = tuple[str, int]


def endpoint_bytes(endpoint: Endpoint) -> bytes:
    """The source IP and UDP port as bytes (the 'A_m' of the whitepaper)."""
    host, port = endpoint[0], endpoint[1]
    try:
        packed = ipaddress.ip_address(host.split("%", 1)[0]).packed
    except ValueError:
        packed = host.encode()
    return packed + port.to_bytes(2, "big")


class CookieChecker:
    """The receiving side: checks mac1/mac2 of messages sent to us and hands out cookies."""

    __slots__ = ("_cookie_key", "_mac1_key", "_random_bytes", "_secret", "_secret_born")

    def __init__(self, mac1_key: bytes, cookie_key: bytes, random_bytes: Callable[[int], bytes]) -> None:
        self._mac1_key = mac1_key
        self._cookie_key = cookie_key
        self._random_bytes = random_bytes
        self._secret = b""
        self._secret_born = float("-inf")

    def check_mac1(self, message: bytes | memoryview, mac1_offset: int) -> bool:
        expected = crypto.mac(self._mac1_key, message[:mac1_offset])
        return hmac.compare_digest(expected, bytes(message[mac1_offset : mac1_offset + 16]))

    def _cookie(self, source: Endpoint, now: float) -> bytes:
        if now - self._secret_born >= COOKIE_REFRESH_TIME:
            self._secret = self._random_bytes(32)
            self._secret_born = now
        return crypto.mac(self._secret, endpoint_bytes(source))

    def check_mac2(self, message: bytes | memoryview, mac2_offset: int, source: Endpoint, now: float) -> bool:
        cookie = self._cookie(source, now)
        expected = crypto.mac(cookie, message[:mac2_offset])
        return hmac.compare_digest(expected, bytes(message[mac2_offset : mac2_offset + 16]))

    def create_reply(
        self, message: bytes | memoryview, mac1_offset: int, sender_index: int, source: Endpoint, now: float
    ) -> CookieReply:
        """A cookie reply for ``message`` (whose mac1 is the associated data, binding the two)."""
        cookie = self._cookie(source, now)
        nonce = self._random_bytes(24)
        mac1 = bytes(message[mac1_offset : mac1_offset + 16])
        sealed = crypto.xaead_encrypt(self._cookie_key, nonce, cookie, mac1)
        return CookieReply(sender_index, nonce, sealed)


class CookieGenerator:
    """The sending side, one per peer: fills in mac1 and, with a fresh cookie, mac2."""

    __slots__ = ("_cookie", "_cookie_born", "_cookie_key", "_last_mac1", "_mac1_key")

    def __init__(self, mac1_key: bytes, cookie_key: bytes) -> None:
        self._mac1_key = mac1_key
        self._cookie_key = cookie_key
        self._cookie = b""
        self._cookie_born = float("-inf")
        self._last_mac1 = b""

    def seal(self, message: bytes, mac1_offset: int, now: float) -> bytes:
        """Return ``message`` with its mac1 and mac2 fields filled in."""
        mac1 = crypto.mac(self._mac1_key, message[:mac1_offset])
        self._last_mac1 = mac1
        head = message[:mac1_offset] + mac1
        if self._cookie and now - self._cookie_born < COOKIE_REFRESH_TIME:
            return head + crypto.mac(self._cookie, head)
        return head + bytes(16)

    def consume_reply(self, reply: CookieReply, now: float) -> None:
        """Store the cookie in ``reply``; raises CryptoError unless it answers our last message."""
        if not self._last_mac1:
            raise crypto.CryptoError("cookie reply without a message of ours to answer")
        self._cookie = crypto.xaead_decrypt(
            self._cookie_key, reply.nonce, reply.encrypted_cookie, self._last_mac1
        )
        self._cookie_born = now
