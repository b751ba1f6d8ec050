"""STUN Binding messages (RFC 8489) as Tailscale's ``net/stun`` speaks them, sans-IO.

A STUN message is a 20-byte header and type-length-value attributes, each padded to 4 bytes::

    type (2) | length of the attributes (2) | magic cookie 2112A442 (4) | transaction ID (12)
    attribute: type (2) | length (2) | value | zero padding to a multiple of 4

The two top bits of the type are zero, which with the cookie tells STUN apart from WireGuard and
disco on one socket (:func:`embedmesh.tailscale.disco.classify`). Only the Binding method is used:

- a **request** (type 0x0001) as Tailscale sends it (:func:`binding_request`): SOFTWARE "tailnode"
  and a FINGERPRINT (CRC-32 of the message before it, XOR 0x5354554E). Tailscale's STUN server
  (derper) answers only requests that carry both, so every request built here does;
- a **success response** (0x0101) carries the address the request came from, XOR-ed with the
  cookie and transaction ID in XOR-MAPPED-ADDRESS (0x0020, or 0x8020, which some servers send), or
  in the clear in the older MAPPED-ADDRESS (0x0001). :func:`parse_binding_response` takes
  XOR-MAPPED-ADDRESS and falls back to MAPPED-ADDRESS, as Go does; IPv4-mapped IPv6 addresses are
  unmapped. :func:`binding_response` writes XOR-MAPPED-ADDRESS only, byte for byte what derper writes.

Parsing is stricter than Go's where RFC 8489 is: the length field must be a multiple of 4 and fit
the datagram (bytes after it are ignored, as Go does), every attribute must fit, and a FINGERPRINT,
when present, must be the last attribute and must match. Everything here raises only
:class:`StunError` (a :class:`~embedmesh.errors.ParseError`); its :attr:`StunError.reason` is a
short word for counters. Transaction IDs are arguments (12 random bytes drawn by the caller).
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from dataclasses import dataclass, field
from typing import TypeAlias

from embedmesh.tailscale.disco import STUN_HEADER_SIZE, STUN_MAGIC_COOKIE
from embedmesh.tailscale.errors import TailscaleProtocolError

HEADER_SIZE = STUN_HEADER_SIZE
MAGIC_COOKIE = STUN_MAGIC_COOKIE
TX_ID_SIZE = 12

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111
BINDING_INDICATION = 0x0011

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_XOR_MAPPED_ADDRESS = 0x0020
#: XOR-MAPPED-ADDRESS in the comprehension-optional range: not in the RFC, but servers send it
#: (Go's net/stun reads it too).
ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028

#: What Tailscale's clients put in SOFTWARE (8 bytes: no padding), and derper insists on.
TAILSCALE_SOFTWARE = "tailnode"
FINGERPRINT_XOR = 0x5354554E
_FINGERPRINT_SIZE = 8  # attribute header and CRC-32

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

#: The largest attribute area parsed (a UDP datagram cannot be larger anyway).
MAX_MESSAGE_SIZE = 65535

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
#: A transport address: (IP, port).
Endpoint: TypeAlias = tuple[IPAddress, int]

_HEADER = struct.Struct("!HH4s12s")
_ATTR = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_COOKIE_HIGH = 0x2112  # the port is XOR-ed with the cookie's first half


class StunError(TailscaleProtocolError):
    """Bytes that are not the STUN message expected: drop them. :attr:`reason` names why in one
    word (``not_stun``, ``malformed``, ``bad_fingerprint``, ``wrong_type``, ``no_address``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StunMessage:
    """One STUN message: its type, transaction ID and attributes (type, value) in order.

    A FINGERPRINT is not among :attr:`attributes`: :attr:`fingerprint` says whether the message
    carries one (it was checked when parsed; :func:`encode_message` computes it).
    """

    msg_type: int
    txid: bytes
    attributes: tuple[tuple[int, bytes], ...] = ()
    fingerprint: bool = False

    def get(self, attr_type: int) -> bytes | None:
        """The value of the first attribute of this type, or None."""
        for kind, value in self.attributes:
            if kind == attr_type:
                return value
        return None


@dataclass(frozen=True, slots=True)
class BindingRequest:
    """A Binding request: its transaction ID, its SOFTWARE (None without one, as text with
    undecodable bytes replaced) and whether it carried a FINGERPRINT."""

    txid: bytes
    software: str | None = None
    fingerprint: bool = False
    attributes: tuple[tuple[int, bytes], ...] = field(default=(), compare=False)

    @property
    def from_tailscale(self) -> bool:
        """Whether Tailscale's STUN server would answer it (SOFTWARE "tailnode" and a FINGERPRINT)."""
        return self.software == TAILSCALE_SOFTWARE and self.fingerprint


@dataclass(frozen=True, slots=True)
class BindingResponse:
    """A Binding success response: its transaction ID and the address the server saw."""

    txid: bytes
    address: Endpoint


def is_stun(data: bytes | bytearray | memoryview) -> bool:
    """Whether a datagram looks like STUN (Go's ``stun.Is``): 20 bytes or more, the two top bits
    zero and the magic cookie. Never raises."""
    return len(data) >= HEADER_SIZE and data[0] & 0xC0 == 0 and bytes(data[4:8]) == MAGIC_COOKIE


def fingerprint(data: bytes | bytearray | memoryview) -> int:
    """The FINGERPRINT value of a message whose bytes before the attribute are ``data``."""
    return (zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def _check_txid(txid: bytes) -> bytes:
    if not isinstance(txid, bytes | bytearray) or len(txid) != TX_ID_SIZE:
        raise ValueError(f"a STUN transaction ID is {TX_ID_SIZE} bytes")
    return bytes(txid)


def encode_message(message: StunMessage) -> bytes:
    """The bytes of a message (zero padding; a FINGERPRINT last when :attr:`StunMessage.fingerprint`).

    Raises ValueError for a message that cannot be encoded (a type above 0x3FFF, a transaction ID
    that is not 12 bytes, an attribute longer than 65535 bytes).
    """
    if not 0 <= message.msg_type <= 0x3FFF:
        raise ValueError("a STUN message type has its two top bits zero")
    txid = _check_txid(message.txid)
    body = bytearray()
    for kind, value in message.attributes:
        if not 0 <= kind <= 0xFFFF or len(value) > 0xFFFF:
            raise ValueError("a STUN attribute has a 16-bit type and length")
        body += _ATTR.pack(kind, len(value)) + value + bytes(-len(value) % 4)
    length = len(body) + (_FINGERPRINT_SIZE if message.fingerprint else 0)
    if length > MAX_MESSAGE_SIZE - HEADER_SIZE:
        raise ValueError("a STUN message this long does not fit a datagram")
    out = bytearray(_HEADER.pack(message.msg_type, length, MAGIC_COOKIE, txid)) + body
    if message.fingerprint:
        out += _ATTR.pack(ATTR_FINGERPRINT, 4) + _U32.pack(fingerprint(out))
    return bytes(out)


def parse_message(data: bytes | bytearray | memoryview) -> StunMessage:
    """Any STUN message: header and attributes, its FINGERPRINT (if any) checked. Raises
    :class:`StunError`."""
    b = bytes(data)
    if not is_stun(b):
        raise StunError("not_stun", "not a STUN message (no magic cookie)")
    msg_type, length, _cookie, txid = _HEADER.unpack_from(b)
    if length % 4:
        raise StunError("malformed", "STUN message length is not a multiple of 4")
    if HEADER_SIZE + length > len(b):
        raise StunError("malformed", "STUN message is shorter than its length field")
    end = HEADER_SIZE + length  # bytes after the message are ignored, as Go does
    attributes: list[tuple[int, bytes]] = []
    has_fingerprint = False
    offset = HEADER_SIZE
    while offset < end:
        if has_fingerprint:
            raise StunError("malformed", "STUN FINGERPRINT is not the last attribute")
        if end - offset < 4:
            raise StunError("malformed", "truncated STUN attribute header")
        kind, size = _ATTR.unpack_from(b, offset)
        start = offset + 4
        offset = start + size + (-size % 4)
        if offset > end:
            raise StunError("malformed", "STUN attribute longer than the message")
        value = b[start : start + size]
        if kind == ATTR_FINGERPRINT:
            if size != 4:
                raise StunError("malformed", "STUN FINGERPRINT is not 4 bytes")
            # The CRC covers the message before this attribute, with the header's length as sent
            # (which counts the FINGERPRINT itself).
            if _U32.unpack(value)[0] != fingerprint(b[: start - 4]):
                raise StunError("bad_fingerprint", "STUN FINGERPRINT does not match")
            has_fingerprint = True
            continue
        attributes.append((kind, value))
    return StunMessage(msg_type, txid, tuple(attributes), has_fingerprint)


def binding_request(
    txid: bytes, *, software: str | None = TAILSCALE_SOFTWARE, with_fingerprint: bool = True
) -> bytes:
    """A Binding request as Tailscale's clients send it (SOFTWARE "tailnode", FINGERPRINT); with
    that default it is 40 bytes, identical to Go's ``stun.Request``."""
    attributes = ((ATTR_SOFTWARE, software.encode()),) if software is not None else ()
    return encode_message(StunMessage(BINDING_REQUEST, _check_txid(txid), attributes, with_fingerprint))


def parse_binding_request(data: bytes | bytearray | memoryview) -> BindingRequest:
    """A Binding request (any RFC 8489 one; :attr:`BindingRequest.from_tailscale` says whether it is
    one derper would answer). Raises :class:`StunError`."""
    message = parse_message(data)
    if message.msg_type != BINDING_REQUEST:
        raise StunError("wrong_type", f"STUN message type {message.msg_type:#06x} is not a Binding request")
    raw = message.get(ATTR_SOFTWARE)
    software = raw.decode("utf-8", "replace") if raw is not None else None
    return BindingRequest(message.txid, software, message.fingerprint, message.attributes)


def _ip(value: int | str | IPAddress) -> IPAddress:
    address = (
        ipaddress.ip_address(value)
        if not isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address)
        else value
    )
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _xor_key(txid: bytes) -> bytes:
    return MAGIC_COOKIE + txid


def binding_response(txid: bytes, address: tuple[str | IPAddress, int]) -> bytes:
    """A Binding success response telling the client it came from ``address`` (IP, port), in
    XOR-MAPPED-ADDRESS only, as derper answers. An IPv4-mapped IPv6 address is sent as IPv4.
    Raises ValueError for a bad address or port."""
    ip, port = _ip(address[0]), address[1]
    if not 0 <= port <= 0xFFFF:
        raise ValueError("a port is 0-65535")
    family = FAMILY_IPV4 if ip.version == 4 else FAMILY_IPV6
    key = _xor_key(_check_txid(txid))
    xored = bytes(a ^ k for a, k in zip(ip.packed, key, strict=False))
    value = bytes((0, family)) + struct.pack("!H", port ^ _COOKIE_HIGH) + xored
    return encode_message(StunMessage(BINDING_SUCCESS, txid, ((ATTR_XOR_MAPPED_ADDRESS, value),)))


def _address(value: bytes, key: bytes | None) -> Endpoint:
    if len(value) < 4:
        raise StunError("malformed", "STUN address attribute too short")
    family = value[1]
    size = 4 if family == FAMILY_IPV4 else 16 if family == FAMILY_IPV6 else 0
    if not size:
        raise StunError("malformed", f"STUN address family {family} is neither IPv4 nor IPv6")
    if len(value) < 4 + size:
        raise StunError("malformed", "STUN address attribute too short for its family")
    port = value[2] << 8 | value[3]
    raw = value[4 : 4 + size]
    if key is not None:
        port ^= _COOKIE_HIGH
        raw = bytes(a ^ k for a, k in zip(raw, key, strict=False))
    return _ip(int.from_bytes(raw, "big") if size == 4 else ipaddress.IPv6Address(raw)), port


def parse_binding_response(data: bytes | bytearray | memoryview) -> BindingResponse:
    """A Binding success response and the address in it (XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS).
    Raises :class:`StunError`: ``wrong_type`` for any other message (an error response, a
    request), ``no_address`` when it names no address."""
    message = parse_message(data)
    if message.msg_type != BINDING_SUCCESS:
        raise StunError(
            "wrong_type", f"STUN message type {message.msg_type:#06x} is not a Binding success response"
        )
    xored: Endpoint | None = None
    plain: Endpoint | None = None
    key = _xor_key(message.txid)
    for kind, value in message.attributes:
        # Go takes the last of each kind; so do we, so both read the same address.
        if kind in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
            xored = _address(value, key)
        elif kind == ATTR_MAPPED_ADDRESS:
            plain = _address(value, None)
    address = xored or plain
    if address is None:
        raise StunError("no_address", "STUN Binding response names no address")
    return BindingResponse(message.txid, address)


__all__ = [
    "ATTR_FINGERPRINT",
    "ATTR_MAPPED_ADDRESS",
    "ATTR_SOFTWARE",
    "ATTR_XOR_MAPPED_ADDRESS",
    "ATTR_XOR_MAPPED_ADDRESS_ALT",
    "BINDING_ERROR",
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "HEADER_SIZE",
    "MAGIC_COOKIE",
    "TAILSCALE_SOFTWARE",
    "TX_ID_SIZE",
    "BindingRequest",
    "BindingResponse",
    "Endpoint",
    "StunError",
    "StunMessage",
    "binding_request",
    "binding_response",
    "encode_message",
    "fingerprint",
    "is_stun",
    "parse_binding_request",
    "parse_binding_response",
    "parse_message",
]
