"""WireGuard's four message formats (whitepaper §5.4.2–§5.4.6): parse and build, nothing else.

The first four bytes are read as one little-endian integer, as wireguard-go does, so a message with
non-zero reserved bytes has no known type and is rejected.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from embedmesh.errors import ParseError

MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + 16  # a keepalive: header plus an empty AEAD tag

# Offsets at which mac1 and mac2 start (everything before them is what they cover).
INITIATION_MAC1_OFFSET = 116
INITIATION_MAC2_OFFSET = 132
RESPONSE_MAC1_OFFSET = 60
RESPONSE_MAC2_OFFSET = 76

_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")
TRANSPORT_HEADER = struct.Struct("<IIQ")
_TYPE = struct.Struct("<I")


@dataclass(slots=True)
class Initiation:
    """Handshake initiation: the initiator's index, ephemeral key, sealed static key and timestamp."""

    sender_index: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes

    def to_bytes(self) -> bytes:
        return _INITIATION.pack(
            MESSAGE_INITIATION,
            self.sender_index,
            self.ephemeral,
            self.encrypted_static,
            self.encrypted_timestamp,
            self.mac1,
            self.mac2,
        )


@dataclass(slots=True)
class Response:
    """Handshake response: both indices, the responder's ephemeral key and a sealed empty payload."""

    sender_index: int
    receiver_index: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes
    mac2: bytes

    def to_bytes(self) -> bytes:
        return _RESPONSE.pack(
            MESSAGE_RESPONSE,
            self.sender_index,
            self.receiver_index,
            self.ephemeral,
            self.encrypted_nothing,
            self.mac1,
            self.mac2,
        )


@dataclass(slots=True)
class CookieReply:
    """Cookie reply sent under load: a sealed cookie bound to the mac1 of the message it answers."""

    receiver_index: int
    nonce: bytes
    encrypted_cookie: bytes

    def to_bytes(self) -> bytes:
        return _COOKIE_REPLY.pack(
            MESSAGE_COOKIE_REPLY, self.receiver_index, self.nonce, self.encrypted_cookie
        )


def message_type(data: bytes | memoryview) -> int:
    """The message type, or 0 when the buffer is too short or the reserved bytes are not zero."""
    if len(data) < 4:
        return 0
    kind: int = _TYPE.unpack_from(data)[0]
    return kind if 1 <= kind <= 4 else 0


def parse_initiation(data: bytes | memoryview) -> Initiation:
    """Parse a 148-byte handshake initiation."""
    if len(data) != INITIATION_SIZE:
        raise ParseError(f"handshake initiation must be {INITIATION_SIZE} bytes, got {len(data)}")
    kind, sender, eph, static, ts, mac1, mac2 = _INITIATION.unpack(data)
    if kind != MESSAGE_INITIATION:
        raise ParseError("not a handshake initiation")
    return Initiation(sender, eph, static, ts, mac1, mac2)


def parse_response(data: bytes | memoryview) -> Response:
    """Parse a 92-byte handshake response."""
    if len(data) != RESPONSE_SIZE:
        raise ParseError(f"handshake response must be {RESPONSE_SIZE} bytes, got {len(data)}")
    kind, sender, receiver, eph, empty, mac1, mac2 = _RESPONSE.unpack(data)
    if kind != MESSAGE_RESPONSE:
        raise ParseError("not a handshake response")
    return Response(sender, receiver, eph, empty, mac1, mac2)


def parse_cookie_reply(data: bytes | memoryview) -> CookieReply:
    """Parse a 64-byte cookie reply."""
    if len(data) != COOKIE_REPLY_SIZE:
        raise ParseError(f"cookie reply must be {COOKIE_REPLY_SIZE} bytes, got {len(data)}")
    kind, receiver, nonce, cookie = _COOKIE_REPLY.unpack(data)
    if kind != MESSAGE_COOKIE_REPLY:
        raise ParseError("not a cookie reply")
    return CookieReply(receiver, nonce, cookie)


def parse_transport_header(data: bytes | memoryview) -> tuple[int, int]:
    """Return (receiver index, counter) of a transport data message."""
    if len(data) < TRANSPORT_MIN_SIZE:
        raise ParseError(f"transport message shorter than {TRANSPORT_MIN_SIZE} bytes")
    kind, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
    if kind != MESSAGE_TRANSPORT:
        raise ParseError("not a transport message")
    return receiver, counter
