"""Tailscale's disco (path discovery) packets and the one-socket demultiplexer, sans-IO.

A disco packet travels in a UDP datagram (or inside DERP)::

    magic "TS💬" (6) | sender disco public key (32) | nonce (24) | NaCl box (XSalsa20-Poly1305)

The box is sealed with the X25519 shared key of the sender's disco key and the receiver's, and holds
``type (1) | version (1) | body``:

=================  =====  ==========================================================================
message            type   body
=================  =====  ==========================================================================
:class:`Ping`      0x01   TxID (12) · sender node key (32, optional) · zero padding (path-MTU probes)
:class:`Pong`      0x02   TxID (12) · the ping's source IP (16, IPv4 as v4-mapped) · port (2, BE)
:class:`CallMeMaybe` 0x03 N × (IP (16) · port (2, BE)); only honoured when it came via DERP
peer relay         0x04–0x09  Bind…/CallMeMaybeVia/Allocate…: :class:`UnsupportedMessage` here
=================  =====  ==========================================================================

Parsing follows Go's ``disco.Parse``: Ping and Pong ignore the version byte and trailing bytes; a
CallMeMaybe whose body is empty, not a multiple of 18 bytes or of a version other than 0 is an empty
list, not an error. The caller drops any packet that raises :class:`DiscoError` without answering
(Go does the same), and also drops packets from disco keys that are not in its network map.

:func:`classify` is magicsock's ``packetLooksLike``: it tells STUN, Geneve-wrapped relay traffic,
disco and WireGuard apart by their first bytes, so one UDP socket carries all of them.

Nonces are arguments (24 random bytes per packet, drawn by the caller); nothing here reads a clock.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import TypeAlias

import nacl.bindings
import nacl.exceptions

from embedmesh.tailscale.errors import TailscaleProtocolError
from embedmesh.tailscale.keys import DiscoPrivate, DiscoPublic, NodePublic

MAGIC = "TS💬".encode()
assert MAGIC == b"TS\xf0\x9f\x92\xac"
KEY_SIZE = 32
NONCE_SIZE = 24
#: Magic and sender key: what magicsock checks before it treats a datagram as disco.
HEADER_SIZE = len(MAGIC) + KEY_SIZE
#: Magic, sender key and nonce (Go's ``LooksLikeDiscoWrapper`` length).
WRAPPER_SIZE = HEADER_SIZE + NONCE_SIZE
BOX_OVERHEAD = 16
MESSAGE_HEADER_SIZE = 2

TYPE_PING = 0x01
TYPE_PONG = 0x02
TYPE_CALL_ME_MAYBE = 0x03
#: Peer-relay messages (BindUDPRelayEndpoint… to AllocateUDPRelayEndpointResponse).
RELAY_TYPES = frozenset(range(0x04, 0x0A))

TX_ID_SIZE = 12
ENDPOINT_SIZE = 18
_PONG_BODY = TX_ID_SIZE + 16 + 2

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
#: An underlay UDP endpoint: (IP, port).
Endpoint: TypeAlias = tuple[IPAddress, int]

_PORT = struct.Struct("!H")
_NO_NODE_KEY = NodePublic.zero()  # immutable, so one shared default is safe


class DiscoError(TailscaleProtocolError):
    """Not a disco packet, a box that does not open, or a message that does not parse: drop it."""


class UnsupportedMessage(DiscoError):
    """A well-formed type that embedmesh does not handle (the peer-relay messages 0x04–0x09)."""

    def __init__(self, kind: int) -> None:
        super().__init__(f"disco message type 0x{kind:02x} (peer relay) is not supported")
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Ping:
    """A ping: its TxID comes back in the Pong. ``node_key`` is the sender's (zero: not sent);
    ``padding`` zero bytes make the packet bigger, to probe the path MTU."""

    tx_id: bytes
    node_key: NodePublic = _NO_NODE_KEY
    padding: int = 0

    def __post_init__(self) -> None:
        if len(self.tx_id) != TX_ID_SIZE:
            raise ValueError(f"a TxID is {TX_ID_SIZE} bytes")
        if self.padding < 0:
            raise ValueError("padding is a byte count")


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to a Ping: its TxID and the source address the ping came from (a STUN answer)."""

    tx_id: bytes
    src: Endpoint

    def __post_init__(self) -> None:
        if len(self.tx_id) != TX_ID_SIZE:
            raise ValueError(f"a TxID is {TX_ID_SIZE} bytes")
        _check_endpoint(self.src)


@dataclass(frozen=True, slots=True)
class CallMeMaybe:
    """The sender's endpoints: "ping me at these" (accept it only via DERP, from the peer whose
    network-map disco key is the sender)."""

    endpoints: tuple[Endpoint, ...] = ()

    def __post_init__(self) -> None:
        for endpoint in self.endpoints:
            _check_endpoint(endpoint)


Message: TypeAlias = Ping | Pong | CallMeMaybe


def _check_endpoint(endpoint: Endpoint) -> None:
    ip, port = endpoint
    if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address) or not 0 <= port <= 0xFFFF:
        raise ValueError("an endpoint is (IPv4Address | IPv6Address, port 0-65535)")


def _ip16(ip: IPAddress) -> bytes:
    """The 16-byte form Go writes (``As16``): IPv4 as v4-mapped IPv6."""
    if isinstance(ip, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def _unmap(raw: bytes) -> IPAddress:
    """Go's ``AddrFrom16(...).Unmap()``: a v4-mapped address becomes IPv4."""
    address = ipaddress.IPv6Address(raw)
    mapped = address.ipv4_mapped
    return mapped if mapped is not None else address


def encode_message(message: Message) -> bytes:
    """The cleartext of a message (``type | version 0 | body``), as Go's ``AppendMarshal``."""
    if isinstance(message, Ping):
        key = b"" if message.node_key.is_zero else message.node_key.raw
        return bytes([TYPE_PING, 0]) + message.tx_id + key + bytes(message.padding)
    if isinstance(message, Pong):
        ip, port = message.src
        return bytes([TYPE_PONG, 0]) + message.tx_id + _ip16(ip) + _PORT.pack(port)
    body = b"".join(_ip16(ip) + _PORT.pack(port) for ip, port in message.endpoints)
    return bytes([TYPE_CALL_ME_MAYBE, 0]) + body


def parse_message(data: bytes | bytearray | memoryview) -> Message:
    """Parse a message's cleartext as Go's ``disco.Parse``. Raises :class:`DiscoError`."""
    data = bytes(data)
    if len(data) < MESSAGE_HEADER_SIZE:
        raise DiscoError("disco message is too short")
    kind, version, body = data[0], data[1], data[2:]
    if kind == TYPE_PING:
        if len(body) < TX_ID_SIZE:
            raise DiscoError("disco ping is too short")
        rest = body[TX_ID_SIZE:]
        if len(rest) >= KEY_SIZE:
            return Ping(body[:TX_ID_SIZE], NodePublic(rest[:KEY_SIZE]), len(rest) - KEY_SIZE)
        return Ping(body[:TX_ID_SIZE], NodePublic.zero(), len(rest))
    if kind == TYPE_PONG:
        if len(body) < _PONG_BODY:
            raise DiscoError("disco pong is too short")
        (port,) = _PORT.unpack_from(body, TX_ID_SIZE + 16)
        return Pong(body[:TX_ID_SIZE], (_unmap(body[TX_ID_SIZE : TX_ID_SIZE + 16]), port))
    if kind == TYPE_CALL_ME_MAYBE:
        if not body or len(body) % ENDPOINT_SIZE or version != 0:
            return CallMeMaybe(())
        endpoints = tuple(
            (_unmap(body[i : i + 16]), _PORT.unpack_from(body, i + 16)[0]) for i in range(0, len(body), ENDPOINT_SIZE)
        )
        return CallMeMaybe(endpoints)
    if kind in RELAY_TYPES:
        raise UnsupportedMessage(kind)
    raise DiscoError(f"unknown disco message type 0x{kind:02x}")


def looks_like_disco(datagram: bytes | bytearray | memoryview) -> bool:
    """The magic and room for the sender key (magicsock's test before it looks further)."""
    return len(datagram) >= HEADER_SIZE and bytes(datagram[: len(MAGIC)]) == MAGIC


def sender_of(packet: bytes | bytearray | memoryview) -> DiscoPublic:
    """The sender's disco key (to look up the peer before any cryptography). Raises DiscoError."""
    if len(packet) < WRAPPER_SIZE or bytes(packet[: len(MAGIC)]) != MAGIC:
        raise DiscoError("not a disco packet")
    return DiscoPublic(bytes(packet[len(MAGIC) : HEADER_SIZE]))


class DiscoBox:
    """The NaCl box between our disco key and one peer's: seal packets to it, open its packets.

    The shared key is computed once (keep one box per peer disco key). A low-order peer key has no
    usable shared key: the constructor raises :class:`DiscoError` (Go would compute a key anyway;
    no honest peer has such a key).
    """

    __slots__ = ("_shared", "ours", "peer")

    def __init__(self, private: DiscoPrivate, peer: DiscoPublic) -> None:
        self.ours = private.public()
        self.peer = peer
        try:
            self._shared = nacl.bindings.crypto_box_beforenm(peer.raw, private.raw)
        except (nacl.exceptions.CryptoError, nacl.exceptions.RuntimeError, RuntimeError) as exc:
            raise DiscoError("the peer's disco key is a low-order point") from exc

    def seal(self, message: Message | bytes, nonce: bytes) -> bytes:
        """A whole packet carrying ``message`` (or its cleartext bytes) to the peer.

        ``nonce`` is 24 random bytes the caller drew; never reuse one with the same peer.
        """
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a disco nonce is {NONCE_SIZE} bytes")
        cleartext = message if isinstance(message, bytes) else encode_message(message)
        box = nacl.bindings.crypto_box_easy_afternm(cleartext, nonce, self._shared)
        return MAGIC + self.ours.raw + nonce + box

    def open_cleartext(self, packet: bytes | bytearray | memoryview) -> bytes:
        """The cleartext of a packet from the peer; raises DiscoError if it is not from it."""
        sender = sender_of(packet)
        if sender != self.peer:
            raise DiscoError("disco packet is from another disco key")
        data = bytes(packet)
        if len(data) < WRAPPER_SIZE + BOX_OVERHEAD:
            raise DiscoError("disco box is too short")
        try:
            return bytes(
                nacl.bindings.crypto_box_open_easy_afternm(data[WRAPPER_SIZE:], data[HEADER_SIZE:WRAPPER_SIZE], self._shared)
            )
        except nacl.exceptions.CryptoError:
            raise DiscoError("disco box did not open") from None

    def open(self, packet: bytes | bytearray | memoryview) -> Message:
        """The message in a packet from the peer. Raises :class:`DiscoError` (drop the packet)."""
        return parse_message(self.open_cleartext(packet))


class PacketKind(enum.Enum):
    """What a datagram on the node's one UDP socket is."""

    STUN = "stun"
    DISCO = "disco"
    WIREGUARD = "wireguard"
    #: Geneve-wrapped (UDP peer relay): disco or WireGuard after the 8-byte header.
    GENEVE_DISCO = "geneve-disco"
    GENEVE_WIREGUARD = "geneve-wireguard"


STUN_MAGIC_COOKIE = b"\x21\x12\xa4\x42"
STUN_HEADER_SIZE = 20
GENEVE_HEADER_SIZE = 8
GENEVE_PROTOCOL_DISCO = 0x7A11
GENEVE_PROTOCOL_WIREGUARD = 0x7A12


def classify(datagram: bytes | bytearray | memoryview) -> PacketKind:
    """Demultiplex a datagram by its first bytes, in magicsock's order: a STUN binding message,
    then a Geneve header (disco or WireGuard inside), then disco, and anything else is WireGuard
    (which checks it further). Never raises."""
    b = datagram
    n = len(b)
    if n >= STUN_HEADER_SIZE and b[0] & 0xC0 == 0 and bytes(b[4:8]) == STUN_MAGIC_COOKIE and b[1] == 0x01:
        return PacketKind.STUN
    if n >= GENEVE_HEADER_SIZE and b[0] & 0xC0 == 0 and b[1] & 0x3F == 0 and b[7] == 0:
        protocol = b[2] << 8 | b[3]
        if protocol == GENEVE_PROTOCOL_DISCO:
            # A Geneve header that says disco around something that is not: as before Geneve,
            # Go hands it to WireGuard, which drops it.
            return PacketKind.GENEVE_DISCO if looks_like_disco(b[GENEVE_HEADER_SIZE:]) else PacketKind.WIREGUARD
        if protocol == GENEVE_PROTOCOL_WIREGUARD:
            return PacketKind.GENEVE_WIREGUARD
    if looks_like_disco(b):
        return PacketKind.DISCO
    return PacketKind.WIREGUARD


__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "NONCE_SIZE",
    "WRAPPER_SIZE",
    "CallMeMaybe",
    "DiscoBox",
    "DiscoError",
    "Endpoint",
    "Message",
    "PacketKind",
    "Ping",
    "Pong",
    "UnsupportedMessage",
    "classify",
    "encode_message",
    "looks_like_disco",
    "parse_message",
    "sender_of",
]
