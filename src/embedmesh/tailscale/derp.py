"""DERP, Tailscale's relay protocol (version 2), sans-IO: frames, a client and a server connection,
and the relay core that routes packets between connections by node key.

Wire-compatible with ``tailscale.com/derp`` v1.102.5. After the HTTP upgrade (``GET /derp`` with
``Upgrade: DERP``) both sides exchange frames::

    type (1) | length (4, big-endian) | payload (length bytes)

=====================  =====  ============================================================================
frame                  type   payload
=====================  =====  ============================================================================
:class:`ServerKey`     0x01   magic "DERP🔑" (8) · server public key (32) · (ignored future bytes)
:class:`ClientInfo`    0x02   client public key (32) · nonce (24) · NaCl box of the JSON ClientInfo
:class:`ServerInfo`    0x03   nonce (24) · NaCl box of the JSON ServerInfo
:class:`SendPacket`    0x04   destination key (32) · packet (≤ 64 KiB)
:class:`RecvPacket`    0x05   source key (32) · packet
:class:`KeepAlive`     0x06   (empty)
:class:`NotePreferred` 0x07   1 byte: 1 when this server is the client's home
:class:`PeerGone`      0x08   key (32) · reason (1, optional: 0 disconnected, 1 not here)
:class:`PeerPresent`   0x09   key (32) · IP (16) · port (2) · flags (1); the last two parts optional
:class:`ForwardPacket` 0x0a   source key (32) · destination key (32) · packet (mesh peers only)
:class:`WatchConns`    0x10   (empty; mesh peers only)
:class:`ClosePeer`     0x11   key (32; mesh peers only)
:class:`Ping`          0x12   8 bytes, echoed in a Pong (the server allows up to 1000 bytes)
:class:`Pong`          0x13   8 bytes
:class:`Health`        0x14   a problem description (UTF-8); empty means healthy again
:class:`Restarting`    0x15   reconnect-in ms (4) · try-for ms (4)
=====================  =====  ============================================================================

The boxes are ``crypto_box`` (X25519 + XSalsa20-Poly1305) between the node keys, with the nonce in
front, as Go's ``key.NodePrivate.SealTo``. Unknown frame types are skipped, as Go does.

:class:`ClientConnection` and :class:`ServerConnection` take bytes in and give events and bytes out;
:class:`RelayCore` holds the routing state of a server (which connection holds which key, duplicate
connections, per-client send queues with head drop, PeerGone notifications) and of a meshed region
(mesh peers that watch the connections, keys on other servers and the :class:`MeshForwarder` that
carries packets there). Randomness (nonces,
keepalive jitter) and the time (``now``, seconds) are arguments; nothing here reads a clock.
Parsers raise only :class:`DerpError`, a :class:`~embedmesh.errors.ParseError`.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import json
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeAlias

import nacl.bindings
import nacl.exceptions

from embedmesh.tailscale import gojson
from embedmesh.tailscale.errors import TailscaleProtocolError
from embedmesh.tailscale.keys import NodePrivate, NodePublic

MAGIC = "DERP🔑".encode()
assert MAGIC == b"DERP\xf0\x9f\x94\x91"
PROTOCOL_VERSION = 2
KEY_LEN = 32
NONCE_LEN = 24
FRAME_HEADER_LEN = 5
#: The largest packet a SendPacket, RecvPacket or ForwardPacket carries (Go's ``MaxPacketSize``).
MAX_PACKET_SIZE = 64 << 10
#: The largest ServerInfo box a client accepts (Go's ``MaxInfoLen``), plus its nonce.
MAX_INFO_LEN = 1 << 20
#: The largest frame a client reads (Go's ``Client.recvTimeout``).
MAX_CLIENT_FRAME = 1 << 20
#: The largest ClientInfo frame a server reads (an untrusted peer's JSON, Go's ``recvClientKey``).
MAX_CLIENT_INFO_FRAME = 256 << 10
#: The largest frame a server reads from an authenticated client: a ForwardPacket of the largest
#: packet. Go skips longer unknown frames byte by byte; here they end the connection instead
#: (no honest client sends one).
MAX_SERVER_FRAME = 2 * KEY_LEN + MAX_PACKET_SIZE
#: A Ping body longer than this ends the connection (Go's ``handleFramePing``).
MAX_PING_LEN = 1000
#: How often a server sends KeepAlive (plus up to 5 s of jitter); a client hears one at least this often.
KEEPALIVE_INTERVAL = 60.0
#: Packets buffered per client and per class (disco, other) before head drop (Go's default).
PER_CLIENT_SEND_QUEUE_DEPTH = 32
#: ForwardPacket frames buffered per mesh peer before head drop (Go writes them synchronously; a
#: bounded queue keeps one slow mesh link from stalling the readers of every client).
MESH_FORWARD_QUEUE_DEPTH = 512
#: The length of a DERP mesh key (derper's ``--mesh-psk-file``: 64 hex digits).
MESH_KEY_LEN = 32
#: The HTTP header a client sends to skip the server's 101 response.
FAST_START_HEADER = "Derp-Fast-Start"
BOX_OVERHEAD = 16

_DISCO_MAGIC = "TS💬".encode()
_DISCO_WRAPPER_LEN = len(_DISCO_MAGIC) + KEY_LEN + NONCE_LEN
# Plain ints for the per-packet path (an IntEnum member costs an attribute lookup and a slower ==).
_SEND_PACKET = 0x04
_FORWARD_PACKET = 0x0A
_RECV_PACKET_TYPE = b"\x05"
_MAX_SEND_LEN = KEY_LEN + MAX_PACKET_SIZE
_DISCO_SEND_LEN = KEY_LEN + _DISCO_WRAPPER_LEN


class DerpError(TailscaleProtocolError):
    """Bytes from a DERP peer do not form a valid frame, or the handshake failed: close the connection."""


class FrameType(enum.IntEnum):
    """DERP frame types (``derp.FrameType``)."""

    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(enum.IntEnum):
    """Why a PeerGone frame was sent."""

    DISCONNECTED = 0x00
    NOT_HERE = 0x01


class PeerPresentFlags(enum.IntFlag):
    """The flags byte of PeerPresent."""

    REGULAR = 1 << 0
    MESH_PEER = 1 << 1
    PROBER = 1 << 2
    NOT_IDEAL = 1 << 3


def looks_like_disco(packet: bytes | bytearray | memoryview) -> bool:
    """Go's ``disco.LooksLikeDiscoWrapper``: the server queues and counts disco apart from WireGuard."""
    return len(packet) >= _DISCO_WRAPPER_LEN and bytes(packet[: len(_DISCO_MAGIC)]) == _DISCO_MAGIC


def _key(data: bytes) -> NodePublic:
    return NodePublic(data[:KEY_LEN])


# --- frames ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerKey:
    """The server's greeting: its public key."""

    key: NodePublic


@dataclass(frozen=True, slots=True)
class ClientInfoFrame:
    """A client's login: its key and a box (nonce in front) of its JSON :class:`ClientInfo`."""

    key: NodePublic
    sealed: bytes


@dataclass(frozen=True, slots=True)
class ServerInfoFrame:
    """The server's answer to the login: a box (nonce in front) of its JSON :class:`ServerInfo`."""

    sealed: bytes


@dataclass(frozen=True, slots=True)
class SendPacket:
    """Client to server: relay ``packet`` to the node with key ``dst``."""

    dst: NodePublic
    packet: bytes


@dataclass(frozen=True, slots=True)
class RecvPacket:
    """Server to client: ``packet`` from the node with key ``src``."""

    src: NodePublic
    packet: bytes


@dataclass(frozen=True, slots=True)
class ForwardPacket:
    """Mesh peer to server: ``packet`` from ``src`` (on another server) to ``dst`` here."""

    src: NodePublic
    dst: NodePublic
    packet: bytes


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """A one-way no-op from the server that keeps the connection alive."""


@dataclass(frozen=True, slots=True)
class NotePreferred:
    """Client to server: whether this server is the client's home."""

    preferred: bool


@dataclass(frozen=True, slots=True)
class PeerGone:
    """Server to client: ``key`` is no longer reachable through this server."""

    key: NodePublic
    reason: int = PeerGoneReason.DISCONNECTED


@dataclass(frozen=True, slots=True)
class PeerPresent:
    """Server to a watcher: ``key`` connected (from ``ip``:``port``, when the server says)."""

    key: NodePublic
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    port: int = 0
    flags: int | None = None


@dataclass(frozen=True, slots=True)
class WatchConns:
    """Mesh peer to server: send PeerPresent/PeerGone for every client."""


@dataclass(frozen=True, slots=True)
class ClosePeer:
    """Mesh peer to server: close the connections of ``key``."""

    key: NodePublic


@dataclass(frozen=True, slots=True)
class Ping:
    """Either side: answer with a :class:`Pong` of the same 8 bytes."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to a :class:`Ping`."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Health:
    """Server to client: a problem with this connection; empty means healthy again."""

    problem: str


@dataclass(frozen=True, slots=True)
class Restarting:
    """Server to client: the server restarts; reconnect after ``reconnect_in_ms``, trying for ``try_for_ms``."""

    reconnect_in_ms: int
    try_for_ms: int


Frame: TypeAlias = (
    ServerKey
    | ClientInfoFrame
    | ServerInfoFrame
    | SendPacket
    | RecvPacket
    | ForwardPacket
    | KeepAlive
    | NotePreferred
    | PeerGone
    | PeerPresent
    | WatchConns
    | ClosePeer
    | Ping
    | Pong
    | Health
    | Restarting
)


_HEADER = struct.Struct(">BI")
_U32 = struct.Struct(">I")


def frame_header(frame_type: int, length: int) -> bytes:
    """The 5-byte header of a frame."""
    return _HEADER.pack(frame_type, length)


def _frame(frame_type: FrameType, payload: bytes) -> bytes:
    return frame_header(frame_type, len(payload)) + payload


def _eight(data: bytes, what: str) -> bytes:
    if len(data) != 8:
        raise ValueError(f"a {what} carries 8 bytes")
    return data


def encode_frame(frame: Frame) -> bytes:
    """The wire bytes (header and payload) of ``frame``. Raises ValueError for a packet over 64 KiB."""
    match frame:
        case ServerKey(key):
            return _frame(FrameType.SERVER_KEY, MAGIC + key.raw)
        case ClientInfoFrame(key, sealed):
            return _frame(FrameType.CLIENT_INFO, key.raw + sealed)
        case ServerInfoFrame(sealed):
            return _frame(FrameType.SERVER_INFO, sealed)
        case SendPacket(dst, packet):
            _check_packet(packet)
            return _frame(FrameType.SEND_PACKET, dst.raw + packet)
        case RecvPacket(src, packet):
            _check_packet(packet)
            return _frame(FrameType.RECV_PACKET, src.raw + packet)
        case ForwardPacket(src, dst, packet):
            _check_packet(packet)
            return _frame(FrameType.FORWARD_PACKET, src.raw + dst.raw + packet)
        case KeepAlive():
            return _frame(FrameType.KEEP_ALIVE, b"")
        case NotePreferred(preferred):
            return _frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")
        case PeerGone(key, reason):
            return _frame(FrameType.PEER_GONE, key.raw + bytes([reason]))
        case PeerPresent(key, ip, port, flags):
            payload = key.raw
            if ip is not None:
                addr = ip if ip.version == 6 else ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
                payload += addr.packed + struct.pack(">H", port)
                if flags is not None:
                    payload += bytes([flags])
            return _frame(FrameType.PEER_PRESENT, payload)
        case WatchConns():
            return _frame(FrameType.WATCH_CONNS, b"")
        case ClosePeer(key):
            return _frame(FrameType.CLOSE_PEER, key.raw)
        case Ping(data):
            return _frame(FrameType.PING, _eight(data, "Ping"))
        case Pong(data):
            return _frame(FrameType.PONG, _eight(data, "Pong"))
        case Health(problem):
            return _frame(FrameType.HEALTH, problem.encode())
        case Restarting(reconnect_in_ms, try_for_ms):
            return _frame(FrameType.RESTARTING, struct.pack(">II", reconnect_in_ms, try_for_ms))
    raise TypeError(f"not a DERP frame: {frame!r}")


def _check_packet(packet: bytes) -> None:
    if len(packet) > MAX_PACKET_SIZE:
        raise ValueError(f"a DERP packet is at most {MAX_PACKET_SIZE} bytes, not {len(packet)}")


def parse_server_frame(frame_type: int, payload: bytes) -> Frame | None:
    """A frame a client received from a server, read as Go's ``derp.Client.Recv`` reads it.

    Returns None for a frame Go skips (unknown types, and short PeerGone/PeerPresent/RecvPacket/
    Ping/Pong/Restarting frames, which Go logs and drops). Raises :class:`DerpError` for a bad
    ServerKey (Go fails the connection).
    """
    n = len(payload)
    if frame_type == FrameType.SERVER_KEY:
        if n < len(MAGIC) + KEY_LEN or payload[: len(MAGIC)] != MAGIC:
            raise DerpError("invalid DERP server greeting")
        return ServerKey(_key(payload[len(MAGIC) :]))
    if frame_type == FrameType.SERVER_INFO:
        if n < NONCE_LEN:
            raise DerpError("short DERP ServerInfo frame")
        if n > NONCE_LEN + MAX_INFO_LEN:
            raise DerpError("long DERP ServerInfo frame")
        return ServerInfoFrame(payload)
    if frame_type == FrameType.KEEP_ALIVE:
        return KeepAlive()
    if frame_type == FrameType.PEER_GONE:
        if n < KEY_LEN:
            return None
        # Old servers sent no reason byte: that meant "disconnected".
        return PeerGone(_key(payload), payload[KEY_LEN] if n > KEY_LEN else PeerGoneReason.DISCONNECTED)
    if frame_type == FrameType.PEER_PRESENT:
        if n < KEY_LEN:
            return None
        key = _key(payload)
        if n < KEY_LEN + 18:
            return PeerPresent(key)
        ip6 = ipaddress.IPv6Address(payload[KEY_LEN : KEY_LEN + 16])
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ip6.ipv4_mapped or ip6
        (port,) = struct.unpack_from(">H", payload, KEY_LEN + 16)
        flags = payload[KEY_LEN + 18] if n > KEY_LEN + 18 else None
        return PeerPresent(key, ip, port, flags)
    if frame_type == FrameType.RECV_PACKET:
        if n < KEY_LEN:
            return None
        return RecvPacket(_key(payload), payload[KEY_LEN:])
    if frame_type == FrameType.PING:
        return Ping(payload[:8]) if n >= 8 else None
    if frame_type == FrameType.PONG:
        return Pong(payload[:8]) if n >= 8 else None
    if frame_type == FrameType.HEALTH:
        return Health(payload.decode("utf-8", errors="replace"))
    if frame_type == FrameType.RESTARTING:
        if n < 8:
            return None
        reconnect_in, try_for = struct.unpack_from(">II", payload)
        return Restarting(reconnect_in, try_for)
    return None


def parse_client_frame(frame_type: int, payload: bytes) -> Frame | None:
    """A frame a server received from an authenticated client, checked as Go's server checks it.

    Returns None for an unknown frame type (skipped). Raises :class:`DerpError` where Go closes the
    connection: a wrong size, a packet over 64 KiB, a Ping over 1000 bytes.
    """
    n = len(payload)
    if frame_type == FrameType.SEND_PACKET:
        if n < KEY_LEN:
            raise DerpError("short DERP SendPacket frame")
        if n - KEY_LEN > MAX_PACKET_SIZE:
            raise DerpError("DERP packet longer than 64 KiB")
        return SendPacket(_key(payload), payload[KEY_LEN:])
    if frame_type == FrameType.FORWARD_PACKET:
        if n < 2 * KEY_LEN:
            raise DerpError("short DERP ForwardPacket frame")
        if n - 2 * KEY_LEN > MAX_PACKET_SIZE:
            raise DerpError("DERP packet longer than 64 KiB")
        return ForwardPacket(_key(payload), _key(payload[KEY_LEN:]), payload[2 * KEY_LEN :])
    if frame_type == FrameType.NOTE_PREFERRED:
        if n != 1:
            raise DerpError("DERP NotePreferred frame of the wrong size")
        return NotePreferred(payload[0] != 0)
    if frame_type == FrameType.WATCH_CONNS:
        if n != 0:
            raise DerpError("DERP WatchConns frame of the wrong size")
        return WatchConns()
    if frame_type == FrameType.CLOSE_PEER:
        if n != KEY_LEN:
            raise DerpError("DERP ClosePeer frame of the wrong size")
        return ClosePeer(_key(payload))
    if frame_type == FrameType.PING:
        if n < 8:
            raise DerpError("short DERP Ping frame")
        if n > MAX_PING_LEN:
            raise DerpError("DERP Ping body too large")
        return Ping(payload[:8])
    if frame_type == FrameType.PONG:
        # Go's server has no case for Pong: it is skipped like any unknown frame.
        return None
    return None


class FrameReader:
    """Splits a byte stream into ``(type, payload)`` frames; a frame longer than ``max_frame`` raises.

    Memory stays bounded: at most one frame of ``max_frame`` bytes (plus the header) is buffered.
    A read is split with offsets and the unfinished tail kept once per read (never a shift of the
    buffer per frame).
    """

    __slots__ = ("_buffer", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer = b""

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[tuple[int, bytes]]:
        """Add ``data``; yield every complete frame. Raises :class:`DerpError` for an oversized frame."""
        buf = self._buffer + data if self._buffer else bytes(data)
        self._buffer = b""
        pos, n = 0, len(buf)
        try:
            while n - pos >= FRAME_HEADER_LEN:
                frame_type = buf[pos]
                (length,) = _U32.unpack_from(buf, pos + 1)
                if length > self.max_frame:
                    raise DerpError(f"DERP frame of {length} bytes is over the {self.max_frame}-byte limit")
                end = pos + FRAME_HEADER_LEN + length
                if end > n:
                    break
                payload = buf[pos + FRAME_HEADER_LEN : end]
                pos = end
                yield frame_type, payload
        finally:
            self._buffer = buf[pos:] if pos < n else b""

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)


# --- the login boxes ------------------------------------------------------------------------


def seal(private: NodePrivate, peer: NodePublic, message: bytes, nonce: bytes) -> bytes:
    """Go's ``NodePrivate.SealTo``: ``nonce (24) | crypto_box(message)``. Raises DerpError for a low-order key."""
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"a DERP box nonce is {NONCE_LEN} bytes")
    try:
        return nonce + nacl.bindings.crypto_box(message, nonce, peer.raw, private.raw)
    except (nacl.exceptions.CryptoError, nacl.exceptions.RuntimeError, RuntimeError) as exc:
        raise DerpError("the peer's key is a low-order point") from exc


def open_box(private: NodePrivate, peer: NodePublic, sealed: bytes) -> bytes:
    """Go's ``NodePrivate.OpenFrom``; raises :class:`DerpError` when the box does not open."""
    if len(sealed) < NONCE_LEN + BOX_OVERHEAD:
        raise DerpError("DERP box is too short")
    try:
        return bytes(nacl.bindings.crypto_box_open(sealed[NONCE_LEN:], sealed[:NONCE_LEN], peer.raw, private.raw))
    except (nacl.exceptions.CryptoError, nacl.exceptions.RuntimeError, RuntimeError):
        raise DerpError("DERP box did not open") from None


def parse_mesh_key(text: str | bytes) -> bytes:
    """A DERP mesh key as derper reads ``--mesh-psk-file``: 64 hex digits, whitespace around them
    trimmed. Raises ValueError (one line) for anything else, and for the all-zero key (Go's
    "no mesh key").
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    text = text.strip()
    if len(text) != 2 * MESH_KEY_LEN:
        raise ValueError(f"a DERP mesh key is {2 * MESH_KEY_LEN} hex digits, not {len(text)} characters")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"a DERP mesh key is {2 * MESH_KEY_LEN} hex digits") from None
    if not any(key):
        raise ValueError("the all-zero DERP mesh key means no mesh key: make one with `openssl rand -hex 32`")
    return key


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What a client says about itself at login (Go's ``derp.ClientInfo``)."""

    version: int = PROTOCOL_VERSION
    can_ack_pings: bool = True
    mesh_key: bytes | None = None
    is_prober: bool = False
    app_name: str = ""

    def to_json(self) -> bytes:
        """The JSON Go's client sends (field names and omissions as Go's struct tags)."""
        doc: dict[str, object] = {}
        if self.mesh_key is not None:
            doc["meshKey"] = self.mesh_key.hex()
        if self.version:
            doc["version"] = self.version
        doc["CanAckPings"] = self.can_ack_pings
        if self.is_prober:
            doc["IsProber"] = True
        if self.app_name:
            doc["AppName"] = self.app_name
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ClientInfo:
        """Parse as Go's ``json.Unmarshal`` into ``derp.ClientInfo``; raises :class:`DerpError`."""
        try:
            obj = gojson.load_object(data, "DERP ClientInfo")
        except TailscaleProtocolError as exc:
            raise DerpError(str(exc)) from None
        assert obj is not None
        version = _json_int(obj.get("version"), "version")
        can_ack = _json_bool(obj.get("CanAckPings"), "CanAckPings")
        prober = _json_bool(obj.get("IsProber"), "IsProber")
        app = obj.get("AppName")
        if app is not None and not isinstance(app, str):
            raise DerpError("DERP ClientInfo: AppName is not a string")
        mesh = obj.get("meshKey")
        mesh_key: bytes | None = None
        if mesh is not None:
            if not isinstance(mesh, str) or len(mesh) != 64:
                raise DerpError("DERP ClientInfo: meshKey is not 64 hex digits")
            try:
                mesh_key = bytes.fromhex(mesh)
            except ValueError:
                raise DerpError("DERP ClientInfo: meshKey is not 64 hex digits") from None
        return cls(version, can_ack, mesh_key, prober, app or "")


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the server says at login (Go's ``derp.ServerInfo``): version and an optional send rate limit."""

    version: int = PROTOCOL_VERSION
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0

    def to_json(self) -> bytes:
        doc: dict[str, int] = {}
        if self.version:
            doc["version"] = self.version
        if self.token_bucket_bytes_per_second:
            doc["TokenBucketBytesPerSecond"] = self.token_bucket_bytes_per_second
        if self.token_bucket_bytes_burst:
            doc["TokenBucketBytesBurst"] = self.token_bucket_bytes_burst
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ServerInfo:
        """Parse as Go's client does; raises :class:`DerpError`."""
        try:
            obj = gojson.load_object(data, "DERP ServerInfo")
        except TailscaleProtocolError as exc:
            raise DerpError(str(exc)) from None
        assert obj is not None
        return cls(
            _json_int(obj.get("version"), "version"),
            _json_int(obj.get("TokenBucketBytesPerSecond"), "TokenBucketBytesPerSecond"),
            _json_int(obj.get("TokenBucketBytesBurst"), "TokenBucketBytesBurst"),
        )


_GO_INT_MIN, _GO_INT_MAX = -(1 << 63), (1 << 63) - 1


def _json_int(value: object, name: str) -> int:
    if value is None:
        return 0
    # Go refuses a fraction, an exponent that leaves one, or a value beyond int64 for an int field.
    if isinstance(value, bool) or not isinstance(value, int) or not _GO_INT_MIN <= value <= _GO_INT_MAX:
        raise DerpError(f"DERP info: {name} is not an integer")
    return value


def _json_bool(value: object, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise DerpError(f"DERP info: {name} is not a boolean")
    return value


# --- the client -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """The server's key is known and our ClientInfo is on its way: packets may be sent now."""

    server_key: NodePublic


@dataclass(frozen=True, slots=True)
class ServerInfoReceived:
    """The server's login answer opened: the login succeeded."""

    info: ServerInfo


@dataclass(frozen=True, slots=True)
class PacketReceived:
    """A packet relayed from the node with key ``src``."""

    src: NodePublic
    packet: bytes


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The server pinged us; the Pong is already in :meth:`ClientConnection.data_to_send`."""

    data: bytes


ClientEvent: TypeAlias = (
    Connected | ServerInfoReceived | PacketReceived | PeerGone | PeerPresent | PingReceived | Pong | KeepAlive | Health | Restarting
)


class ClientConnection:
    """A DERP client's side of one connection (after the HTTP upgrade), sans-IO.

    Feed the server's bytes to :meth:`receive_data`, send :meth:`data_to_send` to the server.
    ``nonce`` is 24 random bytes for the login box. With ``server_key`` (known from the upgrade's
    ``Derp-Public-Key`` header, for fast start) the ClientInfo goes out at once and the server's
    ServerKey frame, when it comes, must match.
    """

    def __init__(
        self,
        private: NodePrivate,
        nonce: bytes,
        *,
        server_key: NodePublic | None = None,
        info: ClientInfo | None = None,
    ) -> None:
        if len(nonce) != NONCE_LEN:
            raise ValueError(f"the ClientInfo nonce is {NONCE_LEN} bytes")
        self.private = private
        self.public = private.public()
        self.info = info if info is not None else ClientInfo()
        self._nonce = nonce
        self._reader = FrameReader(MAX_CLIENT_FRAME)
        self._out = bytearray()
        self._pending: list[ClientEvent] = []
        self.server_key: NodePublic | None = None
        #: True once the server's ServerInfo box opened.
        self.logged_in = False
        self._expected_key = server_key
        if server_key is not None:
            self._login(server_key)

    def _login(self, server_key: NodePublic) -> None:
        self.server_key = server_key
        sealed = seal(self.private, server_key, self.info.to_json(), self._nonce)
        self._out += encode_frame(ClientInfoFrame(self.public, sealed))
        self._pending.append(Connected(server_key))

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ClientEvent]:
        """The events in ``data``. Raises :class:`DerpError` (close the connection) for a bad stream."""
        events, self._pending = self._pending, []
        for frame_type, payload in self._reader.feed(data):
            if self.server_key is None:
                if frame_type != FrameType.SERVER_KEY:
                    raise DerpError("the DERP server did not start with its key")
                frame = parse_server_frame(frame_type, payload)
                assert isinstance(frame, ServerKey)
                self._login(frame.key)
                events += self._pending
                self._pending = []
                continue
            frame = parse_server_frame(frame_type, payload)
            match frame:
                case None:
                    continue
                case ServerKey(key):
                    # Fast start: the greeting arrives after our login; Go skips it, we check it.
                    if key != self.server_key:
                        raise DerpError("the DERP server's key differs from the one its upgrade named")
                case ServerInfoFrame(sealed):
                    assert self.server_key is not None
                    info = ServerInfo.from_json(open_box(self.private, self.server_key, sealed))
                    self.logged_in = True
                    events.append(ServerInfoReceived(info))
                case RecvPacket(src, packet):
                    events.append(PacketReceived(src, packet))
                case Ping(ping):
                    self._out += encode_frame(Pong(ping))
                    events.append(PingReceived(ping))
                case PeerGone() | PeerPresent() | Pong() | KeepAlive() | Health() | Restarting():
                    events.append(frame)
                case _:
                    continue  # a client-to-server frame from the server: Go ignores it too
        return events

    def events(self) -> list[ClientEvent]:
        """Events raised by the constructor (``Connected`` with a fast-start key) not yet returned."""
        events, self._pending = self._pending, []
        return events

    def send_packet(self, dst: NodePublic, packet: bytes) -> None:
        """Queue ``packet`` to the node ``dst``. Raises ValueError over 64 KiB or before the server key is known."""
        self._require_key()
        self._out += encode_frame(SendPacket(dst, bytes(packet)))

    def forward_packet(self, src: NodePublic, dst: NodePublic, packet: bytes) -> None:
        """Queue a mesh ForwardPacket (the server honours it only with the mesh key)."""
        self._require_key()
        self._out += encode_frame(ForwardPacket(src, dst, bytes(packet)))

    def note_preferred(self, preferred: bool) -> None:
        """Tell the server whether it is our home."""
        self._require_key()
        self._out += encode_frame(NotePreferred(preferred))

    def send_ping(self, data: bytes) -> None:
        """Queue a Ping of 8 bytes; the server answers with a :class:`Pong` event."""
        self._require_key()
        self._out += encode_frame(Ping(bytes(data)))

    def watch_conns(self) -> None:
        """Ask for PeerPresent/PeerGone of every client (mesh peers only)."""
        self._require_key()
        self._out += encode_frame(WatchConns())

    def close_peer(self, key: NodePublic) -> None:
        """Ask the server to close ``key``'s connections (mesh peers only)."""
        self._require_key()
        self._out += encode_frame(ClosePeer(key))

    def send_encoded(self, frames: bytes) -> None:
        """Queue whole frames encoded elsewhere (a relay's batched ForwardPackets)."""
        self._require_key()
        self._out += frames

    def _require_key(self) -> None:
        if self.server_key is None:
            raise ValueError("the DERP server's key is not known yet")

    def data_to_send(self) -> bytes:
        """Bytes to write to the server (and forget)."""
        out = bytes(self._out)
        self._out.clear()
        return out


# --- the server's connection ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientAuthenticated:
    """The client proved its key: its ServerInfo is in :meth:`ServerConnection.data_to_send`."""

    key: NodePublic
    info: ClientInfo


ServerEvent: TypeAlias = ClientAuthenticated | SendPacket | ForwardPacket | NotePreferred | WatchConns | ClosePeer | Ping


class ServerConnection:
    """A DERP server's side of one connection, sans-IO: the login, then the client's frames.

    The ServerKey greeting is in :meth:`data_to_send` from the start. The first frame must be a
    ClientInfo whose box opens with the key it names (proof that the client holds that key); until
    then nothing but that frame is read, and the connection has no routing state. ``nonce`` is 24
    random bytes for the ServerInfo box.
    """

    def __init__(self, private: NodePrivate, nonce: bytes, *, server_info: ServerInfo | None = None) -> None:
        if len(nonce) != NONCE_LEN:
            raise ValueError(f"the ServerInfo nonce is {NONCE_LEN} bytes")
        self.private = private
        self.public = private.public()
        self._nonce = nonce
        self._server_info = server_info if server_info is not None else ServerInfo()
        self._reader = FrameReader(MAX_CLIENT_INFO_FRAME)
        self._out = bytearray(encode_frame(ServerKey(self.public)))
        #: The client's key once authenticated, else None.
        self.client_key: NodePublic | None = None
        self.client_info: ClientInfo | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ServerEvent]:
        """The events in ``data``. Raises :class:`DerpError` (close the connection) for a bad stream."""
        events: list[ServerEvent] = []
        for frame_type, payload in self._reader.feed(data):
            if self.client_key is None:
                events.append(self._authenticate(frame_type, payload))
                continue
            frame = parse_client_frame(frame_type, payload)
            if frame is not None:
                assert not isinstance(frame, ServerKey | ClientInfoFrame | ServerInfoFrame | RecvPacket)
                events.append(frame)  # type: ignore[arg-type]
        return events

    def _authenticate(self, frame_type: int, payload: bytes) -> ClientAuthenticated:
        if frame_type != FrameType.CLIENT_INFO:
            raise DerpError("a DERP client must log in first")
        if len(payload) < KEY_LEN + NONCE_LEN:
            raise DerpError("short DERP ClientInfo frame")
        key = _key(payload)
        info = ClientInfo.from_json(open_box(self.private, key, payload[KEY_LEN:]))
        self.client_key = key
        self.client_info = info
        # An authenticated client may send full-size packets (and mesh forwards).
        self._reader.max_frame = MAX_SERVER_FRAME
        self._out += encode_frame(ServerInfoFrame(seal(self.private, key, self._server_info.to_json(), self._nonce)))
        return ClientAuthenticated(key, info)

    def relay_data(
        self, data: bytes | bytearray | memoryview, core: RelayCore, client: RelayClient, now: float
    ) -> tuple[list[ServerEvent], list[RelayClient | MeshForwarder]]:
        """The per-packet path of a server: split ``data`` from the authenticated ``client`` into
        frames and route every SendPacket (and a mesh peer's ForwardPacket) through ``core`` on
        the spot. Returns the other frames as events, and the connections and mesh forwarders that
        got something queued (wake their writers; an entry may repeat).

        Same checks as :meth:`receive_data` (:class:`DerpError` closes the connection). A packet
        for a connection of this server costs a dict lookup by the raw key bytes and one join of
        slices of the read into its RecvPacket frame (a SendPacket's length field is the
        RecvPacket's: the source key takes the destination key's place); no frame or key objects.
        """
        if self.client_key is None:
            raise DerpError("a DERP client must log in first")
        reader = self._reader
        tail = reader._buffer
        buf = tail + data if tail else bytes(data)
        n = len(buf)
        pos = 0
        events: list[ServerEvent] = []
        woken: list[RelayClient | MeshForwarder] = []
        keys = core._keys
        depth = core.queue_depth
        max_frame = reader.max_frame
        src_raw = client.raw
        join = b"".join
        unpack = _HEADER.unpack_from
        relayed = 0
        last: RelayClient | None = None
        try:
            while pos + FRAME_HEADER_LEN <= n:
                frame_type, length = unpack(buf, pos)
                if length > max_frame:
                    raise DerpError(f"DERP frame of {length} bytes is over the {max_frame}-byte limit")
                end = pos + FRAME_HEADER_LEN + length
                if end > n:
                    break
                if frame_type == _SEND_PACKET and KEY_LEN <= length <= _MAX_SEND_LEN:
                    at = pos + FRAME_HEADER_LEN + KEY_LEN
                    current = keys.get(buf[pos + FRAME_HEADER_LEN : at])
                    target = current.active if current is not None else None
                    if target is not None and not target.closed:
                        # The common case, inline: a RecvPacket for a connection of this server.
                        if length >= _DISCO_SEND_LEN and buf.startswith(_DISCO_MAGIC, at):
                            queue = target.disco
                        else:
                            queue = target.packets
                        if not target.writable and len(queue) >= depth:
                            queue.popleft()
                            core.drops[DropReason.QUEUE_HEAD] += 1
                        queue.append(join((_RECV_PACKET_TYPE, buf[pos + 1 : pos + FRAME_HEADER_LEN], src_raw, buf[at:end])))
                        if src_raw not in target.saw_src:
                            core._saw(target, src_raw)
                        relayed += 1
                        if target is not last:
                            woken.append(target)
                            last = target
                    else:
                        woke = core._route(client, buf[pos + FRAME_HEADER_LEN : at], buf[at:end], now)
                        if woke is not None:
                            woken.append(woke)
                elif frame_type == _FORWARD_PACKET and client.can_mesh and length >= 2 * KEY_LEN:
                    at = pos + FRAME_HEADER_LEN + 2 * KEY_LEN
                    woke = core._forward_in(client, buf[pos + FRAME_HEADER_LEN : at - KEY_LEN], buf[at - KEY_LEN : at], buf[at:end], now)
                    if woke is not None:
                        woken.append(woke)
                else:
                    # Everything else, and every malformed packet frame (parse_client_frame says why).
                    frame = parse_client_frame(frame_type, buf[pos + FRAME_HEADER_LEN : end])
                    if frame is not None:
                        events.append(frame)  # type: ignore[arg-type]
                pos = end
        finally:
            reader._buffer = buf[pos:] if pos < n else b""
            core.packets_relayed += relayed
            keyset = client.keyset
            if pos and keyset is not None and len(keyset.conns) > 1:
                core.note_activity(client)
        return events, woken

    def data_to_send(self) -> bytes:
        """Bytes to write to the client (and forget)."""
        out = bytes(self._out)
        self._out.clear()
        return out


# --- rate limits ----------------------------------------------------------------------------

#: The smallest per-client receive burst: one full-size SendPacket frame (Go's
#: ``minRateLimitTokenBucketSize``), so a legal frame always fits in the bucket.
MIN_RATE_LIMIT_BURST = MAX_PACKET_SIZE + KEY_LEN


class TokenBucket:
    """A token bucket as Go's ``golang.org/x/time/rate.Limiter``, sans-IO (``now`` in seconds).

    It starts full (``burst`` tokens) and refills at ``rate`` tokens per second. :meth:`reserve`
    always takes its tokens, going into debt, and says how long to wait before acting (the reader
    of a rate-limited client sleeps that long, which pushes back on the client through TCP);
    :meth:`allow` takes them only when they are there (the listener closes a connection it may not
    accept). ``rate`` may be ``math.inf`` (never limits).
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        if not rate > 0 or not burst > 0:
            raise ValueError("a token bucket needs a positive rate and burst")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._stamp: float | None = None

    def _refill(self, now: float) -> None:
        if self._stamp is not None and now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        if self._stamp is None or now > self._stamp:
            self._stamp = now

    def reserve(self, n: float, now: float) -> float:
        """Take ``n`` tokens (at most ``burst`` are counted); returns the seconds to wait first (0: go on)."""
        if self.rate == float("inf"):
            return 0.0
        self._refill(now)
        self._tokens -= min(float(n), self.burst)
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate

    def allow(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if the bucket holds them; False (and nothing taken) otherwise."""
        if self.rate == float("inf"):
            return True
        self._refill(now)
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False


# --- the relay core -------------------------------------------------------------------------


class DropReason(enum.Enum):
    """Why the server dropped a packet (Go's ``dropReason``)."""

    UNKNOWN_DEST = "unknown_dest"
    UNKNOWN_DEST_ON_FWD = "unknown_dest_on_fwd"
    GONE_DISCONNECTED = "gone_disconnected"
    QUEUE_HEAD = "queue_head"
    QUEUE_TAIL = "queue_tail"
    WRITE_ERROR = "write_error"
    DUP_CLIENT = "dup_client"


@dataclass(eq=False)
class RelayClient:
    """One authenticated connection in a :class:`RelayCore` (identity is the object)."""

    key: NodePublic
    info: ClientInfo
    preferred: bool = False
    #: The client's address as the server saw it (sent to mesh watchers in PeerPresent).
    remote: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None = None
    #: Whether it logged in with the server's mesh key (may WatchConns, ForwardPacket, ClosePeer).
    can_mesh: bool = False
    #: Frames waiting for this connection's writer: RecvPacket frames as wire bytes (disco and
    #: other apart, each bounded), and control frames (PeerGone, Pong, PeerPresent, ...).
    packets: deque[bytes] = field(default_factory=deque)
    disco: deque[bytes] = field(default_factory=deque)
    control: deque[Frame] = field(default_factory=deque)
    #: Sources (raw keys) this client received from: it hears PeerGone when one leaves the region.
    saw_src: set[bytes] = field(default_factory=set)
    #: The PeerGone-NotHere token bucket (3 burst, 1 per second, as Go).
    gone_tokens: float = 3.0
    gone_refilled: float | None = None
    closed: bool = False
    #: Set by a runtime that writes this connection's queues at the end of every read and whose
    #: socket is keeping up: the per-class bound (protection against a client that does not
    #: read) then does not apply within a read, or a read of 33 packets for one client would drop
    #: one before anything could be written. It applies again while the writes are backed up.
    writable: bool = False
    #: ``key.raw``, the routing tables' key (a bytes hash is C; NodePublic's is Python).
    raw: bytes = field(init=False, repr=False)
    #: The connections of this key (several while the key is connected more than once).
    keyset: _KeySet | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.raw = self.key.raw

    def pending(self) -> bool:
        """Whether the writer has frames to send."""
        return bool(self.control or self.disco or self.packets)

    def take_frames(self) -> list[Frame]:
        """Every queued frame, decoded, control frames first (for tests and tools; the writer
        uses :meth:`take_data`)."""
        frames: list[Frame] = list(self.control)
        self.control.clear()
        for queue in (self.disco, self.packets):
            for wire in queue:
                frame = parse_server_frame(wire[0], wire[FRAME_HEADER_LEN:])
                assert frame is not None
                frames.append(frame)
            queue.clear()
        return frames

    def take_data(self) -> bytes:
        """Every queued frame as bytes to write to the client (and forget): control frames first
        (Go's send loop serves them as they come), then disco, then the other packets."""
        if not self.control and not self.disco:
            data = b"".join(self.packets)  # the common case; one packet is returned as it is
            self.packets.clear()
            return data
        parts = [encode_frame(frame) for frame in self.control]
        self.control.clear()
        if self.disco:
            parts += self.disco
            self.disco.clear()
        if not parts:
            data = b"".join(self.packets)
        else:
            parts += self.packets
            data = b"".join(parts)
        self.packets.clear()
        return data

    def present_flags(self) -> int:
        """The PeerPresent flags watchers hear for this connection (Go's ``presentFlags``)."""
        flags = 0
        if self.info.is_prober:
            flags |= PeerPresentFlags.PROBER
        if self.can_mesh:
            flags |= PeerPresentFlags.MESH_PEER
        return flags or PeerPresentFlags.REGULAR

    def present_frame(self) -> PeerPresent:
        """The PeerPresent frame announcing this connection to a watcher (always the full form)."""
        ip, port = self.remote if self.remote is not None else (ipaddress.IPv6Address(0), 0)
        return PeerPresent(self.key, ip, port, self.present_flags())


class MeshForwarder:
    """Another server of the region, as the core sees it: the ForwardPacket frames (wire bytes)
    waiting for the mesh link that carries them there. Identity is the object; one per live link.
    """

    __slots__ = ("closed", "name", "queue")

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: deque[bytes] = deque()
        self.closed = False

    def __repr__(self) -> str:
        return f"MeshForwarder({self.name!r})"

    def take_data(self) -> bytes:
        """Every queued ForwardPacket frame, as bytes to write to the other server (and forget)."""
        data = b"".join(self.queue)
        self.queue.clear()
        return data


@dataclass(eq=False)
class _KeySet:
    conns: list[RelayClient]
    active: RelayClient | None
    last: RelayClient | None = None
    history: list[RelayClient] = field(default_factory=list)


class RelayCore:
    """The routing state of a DERP server, sans-IO.

    Connections join with :meth:`register` after they authenticated and leave with
    :meth:`unregister`. :meth:`route` queues a packet on the destination's connection (and returns
    it, so the runtime wakes its writer); :meth:`ServerConnection.relay_data` does the same for a
    whole read of a client's stream at once (the per-packet path of a server). Duplicate
    connections for one key follow Go's default policy ("last writer is active"): the newest
    connection receives until another one of the set sends a frame (:meth:`note_activity`). Drops
    are counted in :attr:`drops` by reason.

    Meshed regions: with ``mesh_key`` (32 bytes) a client that logs in with the same key is a mesh
    peer (another server of the region, or a trusted client). It may watch the connections
    (:meth:`add_watcher`: a PeerPresent for every client now and later, a PeerGone when a key's
    last connection leaves), forward packets (:meth:`forward`) and close a key's connections
    (:meth:`close_peer`). Keys connected to other servers are learned from their watch
    connections: :meth:`add_forwarder` / :meth:`remove_forwarder` tie a key to a
    :class:`MeshForwarder`, and a packet for a key that is not here but has one is queued there as
    a ForwardPacket. A key is in the region while it is connected here or has a forwarder; when it
    leaves the region, whoever received from it hears PeerGone.

    The tables are keyed by the raw 32 key bytes: the per-packet lookups hash bytes, in C.
    """

    def __init__(
        self,
        *,
        queue_depth: int = PER_CLIENT_SEND_QUEUE_DEPTH,
        mesh_key: bytes | None = None,
        server_key: NodePublic | None = None,
        forward_queue_depth: int = MESH_FORWARD_QUEUE_DEPTH,
    ) -> None:
        if mesh_key is not None and len(mesh_key) != MESH_KEY_LEN:
            raise ValueError(f"a DERP mesh key is {MESH_KEY_LEN} bytes")
        self.queue_depth = queue_depth
        self.forward_queue_depth = forward_queue_depth
        # An all-zero key is Go's "no mesh key": nobody may mesh with it.
        self.mesh_key = mesh_key if mesh_key is not None and any(mesh_key) else None
        self.server_key = server_key
        self._keys: dict[bytes, _KeySet] = {}
        self._gone_watchers: dict[bytes, set[RelayClient]] = {}
        #: Mesh peers that sent WatchConns.
        self.watchers: set[RelayClient] = set()
        #: Keys on other servers: their forwarders, the first one preferred (Go's multiForwarder).
        self._forwarders: dict[bytes, list[MeshForwarder]] = {}
        self.drops: dict[DropReason, int] = {reason: 0 for reason in DropReason}
        self.packets_relayed = 0
        self.packets_forwarded_out = 0
        self.packets_forwarded_in = 0

    def __len__(self) -> int:
        return sum(len(s.conns) for s in self._keys.values())

    def is_connected(self, key: NodePublic) -> bool:
        """Whether ``key`` has at least one connection."""
        return key.raw in self._keys

    def is_mesh_key(self, mesh_key: bytes | None) -> bool:
        """Whether ``mesh_key`` (from a ClientInfo) is this server's mesh key (compared in constant time)."""
        if self.mesh_key is None or mesh_key is None or len(mesh_key) != MESH_KEY_LEN:
            return False
        return hmac.compare_digest(mesh_key, self.mesh_key)

    def register(
        self,
        key: NodePublic,
        info: ClientInfo,
        remote: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None = None,
    ) -> RelayClient:
        """Add an authenticated connection; a second one for the same key becomes the active one.

        Every watcher hears a PeerPresent for it (wake the writers of :attr:`watchers`).
        """
        client = RelayClient(key, info, remote=remote, can_mesh=self.is_mesh_key(info.mesh_key))
        current = self._keys.get(client.raw)
        if current is None:
            current = self._keys[client.raw] = _KeySet([client], client)
        else:
            if len(current.conns) == 1:
                current.history = [current.conns[0]]
            current.conns.append(client)
            current.last = client
            current.history.append(client)
            current.active = client
        client.keyset = current
        # Go announces every connection (duplicates too) and only the last disconnection.
        present = client.present_frame()
        for watcher in self.watchers:
            watcher.control.append(present)
        return client

    def unregister(self, client: RelayClient) -> list[RelayClient]:
        """Remove a connection. Returns the connections that got a PeerGone (wake their writers)."""
        client.closed = True
        self.watchers.discard(client)
        for src in client.saw_src:
            watchers = self._gone_watchers.get(src)
            if watchers is not None:
                watchers.discard(client)
                if not watchers:
                    del self._gone_watchers[src]
        current = self._keys.get(client.raw)
        if current is None or client not in current.conns:
            return []
        current.conns.remove(client)
        if not current.conns:
            del self._keys[client.raw]
            woken = []
            gone = PeerGone(client.key, PeerGoneReason.DISCONNECTED)
            for watcher in self.watchers:
                watcher.control.append(gone)
                woken.append(watcher)
            # The key left this server; unless another server of the region has it, it left the
            # region, and everyone who received from it hears so (Go's peerGone).
            if client.raw not in self._forwarders:
                woken += self._note_gone_from_region(client.raw)
            return woken
        if current.last is client:
            current.last = None
        trimmed: list[RelayClient] = []
        for conn in current.history:
            if conn in current.conns and (not trimmed or trimmed[-1] is not conn):
                trimmed.append(conn)
        current.history = trimmed
        if current.last is None and trimmed:
            current.last = trimmed[-1]
        current.active = current.conns[0] if len(current.conns) == 1 else current.last
        if len(current.conns) == 1:
            current.last, current.history = None, []
        return []

    def _note_gone_from_region(self, raw: bytes) -> list[RelayClient]:
        woken = []
        key = NodePublic(raw)
        for watcher in self._gone_watchers.pop(raw, set()):
            if not watcher.closed:
                watcher.saw_src.discard(raw)
                watcher.control.append(PeerGone(key, PeerGoneReason.DISCONNECTED))
                woken.append(watcher)
        return woken

    def note_activity(self, client: RelayClient) -> None:
        """``client`` sent a frame: among duplicates the last writer becomes the active one."""
        current = client.keyset
        if current is None or len(current.conns) < 2 or client not in current.conns:
            return
        current.last = client
        current.active = client
        if not current.history or current.history[-1] is not client:
            current.history.append(client)

    def route(self, src: RelayClient, dst: NodePublic, packet: bytes, now: float) -> RelayClient | MeshForwarder | None:
        """Queue ``packet`` from ``src`` to ``dst``; returns the connection (or the mesh forwarder)
        whose writer to wake.

        A key connected here gets a RecvPacket; a key connected only to another server of the
        region is forwarded there. An unknown destination is a drop; for a disco packet the sender
        also hears PeerGone (NotHere), at most 3 at once and 1 per second, as Go rate-limits it.
        """
        return self._route(src, dst.raw, packet, now)

    def _route(self, src: RelayClient, dst: bytes, packet: bytes, now: float) -> RelayClient | MeshForwarder | None:
        current = self._keys.get(dst)
        target = current.active if current is not None else None
        if target is None:
            if current is not None and len(current.conns) > 1:
                self._drop(DropReason.DUP_CLIENT)
                return None
            forwarders = self._forwarders.get(dst)
            if forwarders:
                return self._forward_out(forwarders[0], src.raw, dst, packet)
            self._drop(DropReason.UNKNOWN_DEST)
            return self._not_here(src, dst, packet, now)
        return self._deliver(target, src.raw, packet)

    def _not_here(self, src: RelayClient, dst: bytes, packet: bytes, now: float) -> RelayClient | None:
        if looks_like_disco(packet) and self._take_gone_token(src, now):
            src.control.append(PeerGone(NodePublic(dst), PeerGoneReason.NOT_HERE))
            return src
        return None

    def _forward_out(self, fwd: MeshForwarder, src: bytes, dst: bytes, packet: bytes | memoryview) -> MeshForwarder | None:
        if fwd.closed:
            self._drop(DropReason.GONE_DISCONNECTED)
            return None
        if len(packet) > MAX_PACKET_SIZE:
            raise ValueError(f"a DERP packet is at most {MAX_PACKET_SIZE} bytes, not {len(packet)}")
        if len(fwd.queue) >= self.forward_queue_depth:
            fwd.queue.popleft()
            self._drop(DropReason.QUEUE_HEAD)
        fwd.queue.append(b"".join((frame_header(FrameType.FORWARD_PACKET, 2 * KEY_LEN + len(packet)), src, dst, packet)))
        self.packets_forwarded_out += 1
        return fwd

    def forward(self, client: RelayClient, src: NodePublic, dst: NodePublic, packet: bytes, now: float) -> RelayClient | None:
        """A ForwardPacket from the mesh peer ``client``: deliver ``packet`` from ``src`` to ``dst``
        if it is connected here (never forwarded again). Returns the connection to wake.

        Raises :class:`DerpError` when ``client`` has no mesh key (Go ends that connection).
        """
        if not client.can_mesh:
            raise DerpError("a DERP ForwardPacket from a client without the mesh key")
        return self._forward_in(client, src.raw, dst.raw, packet, now)

    def _forward_in(self, client: RelayClient, src: bytes, dst: bytes, packet: bytes, now: float) -> RelayClient | None:
        self.packets_forwarded_in += 1
        current = self._keys.get(dst)
        target = current.active if current is not None else None
        if target is None:
            if current is not None and len(current.conns) > 1:
                self._drop(DropReason.DUP_CLIENT)
                return None
            self._drop(DropReason.UNKNOWN_DEST_ON_FWD)
            # Go answers the mesh peer (not the original sender) with PeerGone(not here).
            return self._not_here(client, dst, packet, now)
        return self._deliver(target, src, packet)

    def deliver(self, target: RelayClient, src: NodePublic, packet: bytes) -> RelayClient | None:
        """Queue ``packet`` from ``src`` on ``target``, dropping the oldest when its queue is full."""
        return self._deliver(target, src.raw, packet)

    def _deliver(self, target: RelayClient, src: bytes, packet: bytes | memoryview) -> RelayClient | None:
        if target.closed:
            self._drop(DropReason.GONE_DISCONNECTED)
            return None
        if len(packet) > MAX_PACKET_SIZE:
            raise ValueError(f"a DERP packet is at most {MAX_PACKET_SIZE} bytes, not {len(packet)}")
        queue = target.disco if looks_like_disco(packet) else target.packets
        if len(queue) >= self.queue_depth and not target.writable:
            # Go drops from the head to keep the freshest packets.
            queue.popleft()
            self._drop(DropReason.QUEUE_HEAD)
        queue.append(b"".join((frame_header(FrameType.RECV_PACKET, KEY_LEN + len(packet)), src, packet)))
        if src not in target.saw_src:
            self._saw(target, src)
        self.packets_relayed += 1
        return target

    def _saw(self, target: RelayClient, src: bytes) -> None:
        target.saw_src.add(src)
        watchers = self._gone_watchers.get(src)
        if watchers is None:
            watchers = self._gone_watchers[src] = set()
        watchers.add(target)

    def lookup(self, key: NodePublic) -> RelayClient | None:
        """The active connection of ``key``."""
        current = self._keys.get(key.raw)
        return current.active if current is not None else None

    def connections(self, key: NodePublic) -> list[RelayClient]:
        """Every connection of ``key``."""
        current = self._keys.get(key.raw)
        return list(current.conns) if current is not None else []

    def add_watcher(self, client: RelayClient) -> bool:
        """WatchConns from ``client``: queue a PeerPresent for every connected key now, and keep it
        informed. Returns whether anything was queued (wake its writer).

        A server that meshes with itself is ignored (Go's ``addWatcher``). Raises
        :class:`DerpError` when ``client`` has no mesh key.
        """
        if not client.can_mesh:
            raise DerpError("a DERP WatchConns from a client without the mesh key")
        if self.server_key is not None and client.key == self.server_key:
            return False
        if client in self.watchers:
            return False
        for current in self._keys.values():
            if current.active is not None:
                client.control.append(current.active.present_frame())
        self.watchers.add(client)
        return bool(client.control)

    def close_peer(self, client: RelayClient, key: NodePublic) -> list[RelayClient]:
        """ClosePeer from ``client``: the connections of ``key`` to close (the runtime closes them).

        Raises :class:`DerpError` when ``client`` has no mesh key.
        """
        if not client.can_mesh:
            raise DerpError("a DERP ClosePeer from a client without the mesh key")
        return self.connections(key)

    def add_forwarder(self, key: NodePublic, fwd: MeshForwarder) -> None:
        """Another server of the region says ``key`` is connected there (its PeerPresent)."""
        forwarders = self._forwarders.setdefault(key.raw, [])
        if fwd not in forwarders:
            forwarders.append(fwd)

    def remove_forwarder(self, key: NodePublic, fwd: MeshForwarder) -> list[RelayClient]:
        """``key`` left the server behind ``fwd`` (its PeerGone). Returns the connections that got a
        PeerGone because ``key`` is now gone from the region (wake their writers).
        """
        return self._remove_forwarder(key.raw, fwd)

    def _remove_forwarder(self, raw: bytes, fwd: MeshForwarder) -> list[RelayClient]:
        forwarders = self._forwarders.get(raw)
        if forwarders is None or fwd not in forwarders:
            return []  # a duplicate or stale PeerGone (a client moving between servers): harmless
        forwarders.remove(fwd)
        if forwarders:
            return []
        del self._forwarders[raw]
        if raw in self._keys:
            return []
        return self._note_gone_from_region(raw)

    def drop_forwarder(self, fwd: MeshForwarder) -> list[RelayClient]:
        """The mesh link behind ``fwd`` broke: forget every key it carried (Go's watch loop removes
        them all on a reconnect). Returns the connections that got a PeerGone.
        """
        fwd.closed = True
        fwd.queue.clear()
        woken: list[RelayClient] = []
        for raw in [k for k, fwds in self._forwarders.items() if fwd in fwds]:
            woken += self._remove_forwarder(raw, fwd)
        return woken

    def forwarders(self, key: NodePublic) -> list[MeshForwarder]:
        """The mesh forwarders that carry ``key`` (the first one is used)."""
        return list(self._forwarders.get(key.raw, ()))

    def in_region(self, key: NodePublic) -> bool:
        """Whether ``key`` is connected here or to another server of the region."""
        return key.raw in self._keys or key.raw in self._forwarders

    def _drop(self, reason: DropReason) -> None:
        self.drops[reason] += 1

    @staticmethod
    def _take_gone_token(client: RelayClient, now: float) -> bool:
        if client.gone_refilled is not None:
            client.gone_tokens = min(3.0, client.gone_tokens + max(0.0, now - client.gone_refilled))
        client.gone_refilled = now
        if client.gone_tokens >= 1.0:
            client.gone_tokens -= 1.0
            return True
        return False


__all__ = [
    "FAST_START_HEADER",
    "KEEPALIVE_INTERVAL",
    "MAGIC",
    "MAX_PACKET_SIZE",
    "MESH_FORWARD_QUEUE_DEPTH",
    "MESH_KEY_LEN",
    "MIN_RATE_LIMIT_BURST",
    "PROTOCOL_VERSION",
    "ClientAuthenticated",
    "ClientConnection",
    "ClientEvent",
    "ClientInfo",
    "ClientInfoFrame",
    "ClosePeer",
    "Connected",
    "DerpError",
    "DropReason",
    "ForwardPacket",
    "Frame",
    "FrameReader",
    "FrameType",
    "Health",
    "KeepAlive",
    "MeshForwarder",
    "NotePreferred",
    "PacketReceived",
    "PeerGone",
    "PeerGoneReason",
    "PeerPresent",
    "PeerPresentFlags",
    "Ping",
    "PingReceived",
    "Pong",
    "RecvPacket",
    "RelayClient",
    "RelayCore",
    "Restarting",
    "SendPacket",
    "ServerConnection",
    "ServerEvent",
    "ServerInfo",
    "ServerInfoFrame",
    "ServerInfoReceived",
    "ServerKey",
    "TokenBucket",
    "WatchConns",
    "encode_frame",
    "frame_header",
    "looks_like_disco",
    "open_box",
    "parse_client_frame",
    "parse_mesh_key",
    "parse_server_frame",
    "seal",
]
