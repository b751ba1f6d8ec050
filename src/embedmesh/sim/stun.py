"""STUN binding messages (RFC 8489) as the simulator's STUN server and its nodes speak them.

Only what a node needs to learn its reflexive address: a Binding request (no attributes), and a
Binding success response carrying XOR-MAPPED-ADDRESS (MAPPED-ADDRESS is read too, as Tailscale's
``net/stun`` does). Both are real STUN on the wire, so :func:`embedmesh.tailscale.disco.classify`
calls them STUN, as it will the node's own client's.

:func:`parse` raises only :class:`StunError` (a :class:`~embedmesh.errors.ParseError`).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from embedmesh.errors import ParseError

Endpoint = tuple[str, int]

MAGIC_COOKIE = 0x2112A442
HEADER = struct.Struct("!HHI12s")
HEADER_SIZE = HEADER.size
TX_ID_SIZE = 12
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
#: Tailscale's servers send the XOR form under this older code point too.
ATTR_XOR_MAPPED_ADDRESS_OLD = 0x8020
_FAMILY_V4 = 0x01
_FAMILY_V6 = 0x02
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")


class StunError(ParseError):
    """Not a STUN binding message this module reads."""


@dataclass(frozen=True, slots=True)
class StunMessage:
    """A parsed binding message: its type, transaction ID and, for a response, the mapped address."""

    type: int
    tx_id: bytes
    mapped: Endpoint | None = None


def binding_request(tx_id: bytes) -> bytes:
    """A Binding request with transaction ID ``tx_id`` (12 bytes)."""
    if len(tx_id) != TX_ID_SIZE:
        raise ValueError("a STUN transaction ID is 12 bytes")
    return HEADER.pack(BINDING_REQUEST, 0, MAGIC_COOKIE, tx_id)


def binding_response(tx_id: bytes, mapped: Endpoint) -> bytes:
    """A Binding success response telling the requester it was seen from ``mapped``."""
    if len(tx_id) != TX_ID_SIZE:
        raise ValueError("a STUN transaction ID is 12 bytes")
    address = ipaddress.ip_address(mapped[0])
    if not 0 <= mapped[1] <= 0xFFFF:
        raise ValueError("port out of range")
    family = _FAMILY_V4 if address.version == 4 else _FAMILY_V6
    key = _COOKIE_BYTES if address.version == 4 else _COOKIE_BYTES + tx_id
    x_address = bytes(a ^ k for a, k in zip(address.packed, key, strict=True))
    value = struct.pack("!BBH", 0, family, mapped[1] ^ (MAGIC_COOKIE >> 16)) + x_address
    attribute = struct.pack("!HH", ATTR_XOR_MAPPED_ADDRESS, len(value)) + value
    return HEADER.pack(BINDING_SUCCESS, len(attribute), MAGIC_COOKIE, tx_id) + attribute


def _address(value: bytes, tx_id: bytes, xor: bool) -> Endpoint:
    if len(value) < 4:
        raise StunError("address attribute too short")
    family, port = value[1], int.from_bytes(value[2:4], "big")
    raw = value[4:]
    if family == _FAMILY_V4 and len(raw) == 4:
        key = _COOKIE_BYTES
    elif family == _FAMILY_V6 and len(raw) == 16:
        key = _COOKIE_BYTES + tx_id
    else:
        raise StunError("bad address family or length")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ k for a, k in zip(raw, key, strict=True))
    return (str(ipaddress.ip_address(raw)), port)


def parse(data: bytes | bytearray | memoryview) -> StunMessage:
    """A binding request or success response (other message types and bad framing raise)."""
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise StunError("shorter than a STUN header")
    kind, length, cookie, tx_id = HEADER.unpack_from(data)
    if kind & 0xC000 or cookie != MAGIC_COOKIE:
        raise StunError("not STUN")
    if kind not in (BINDING_REQUEST, BINDING_SUCCESS):
        raise StunError(f"not a binding request or success response (type {kind:#06x})")
    if length % 4 or HEADER_SIZE + length != len(data):
        raise StunError("length does not match the message")
    mapped: Endpoint | None = None
    xor_mapped: Endpoint | None = None
    offset = HEADER_SIZE
    while offset < len(data):
        if offset + 4 > len(data):
            raise StunError("truncated attribute header")
        attr, size = struct.unpack_from("!HH", data, offset)
        offset += 4
        end = offset + size
        if end > len(data):
            raise StunError("truncated attribute")
        value = data[offset:end]
        if attr in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_OLD) and xor_mapped is None:
            xor_mapped = _address(value, tx_id, xor=True)
        elif attr == ATTR_MAPPED_ADDRESS and mapped is None:
            mapped = _address(value, tx_id, xor=False)
        offset = end + (-size % 4)
    if offset != len(data):
        raise StunError("attribute padding runs past the message")
    if kind == BINDING_REQUEST:
        return StunMessage(kind, tx_id)
    found = xor_mapped if xor_mapped is not None else mapped
    if found is None:
        raise StunError("binding response without a mapped address")
    return StunMessage(kind, tx_id, found)


class StunServer:
    """A STUN server host for :class:`~embedmesh.sim.network.SimNetwork`: it answers every binding
    request with the source it saw (a node behind NATs learns its outermost mapping)."""

    def __init__(self) -> None:
        self._out: list[tuple[bytes, Endpoint]] = []
        self.answered = 0
        self.dropped = 0

    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> None:
        try:
            message = parse(data)
        except StunError:
            self.dropped += 1
            return
        if message.type != BINDING_REQUEST:
            self.dropped += 1
            return
        self.answered += 1
        self._out.append((binding_response(message.tx_id, source), source))

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]:
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        return None

    def handle_timeout(self, now: float) -> None:
        return None


__all__ = [
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "StunError",
    "StunMessage",
    "StunServer",
    "binding_request",
    "binding_response",
    "parse",
]
