"""Noise_IK_25519_ChaChaPoly_BLAKE2s for the control channel, sans-IO.

The node is the initiator and its static key is its *machine key*; the server's static key is
known in advance (fetched from ``GET /key`` and pinned), which is what IK needs::

    <- s
    ...
    -> e, es, s, ss     + payload: the node's 8-byte timestamp (ns since the Unix epoch)
    <- e, ee, se        + payload

After the handshake each side has one :class:`CipherState` per direction. A transport message's
nonce is the implicit 64-bit counter of messages sent so far on that stream: the WebSocket below is
reliable and ordered, so any replayed, reordered, dropped or modified message fails authentication.

Frames (one per WebSocket binary message) start with a type byte:

====  =====================================================================
0x01  handshake initiation: version (1 byte), e (32), enc(s) (48), enc(payload)
0x02  handshake response: e (32), enc(payload)
0x03  transport: ciphertext (plaintext + 16-byte tag)
====  =====================================================================

Primitives are WireGuard's (``embedmesh.wireguard.crypto``); the protocol name and prologue are
ours, so a control handshake can never be confused with a WireGuard one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from embedmesh.control.errors import ControlProtocolError
from embedmesh.errors import ParseError
from embedmesh.wireguard import crypto

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE = b"embedmesh control v1"
PROTOCOL_VERSION = 1

FRAME_INITIATION = 0x01
FRAME_RESPONSE = 0x02
FRAME_TRANSPORT = 0x03

KEY_SIZE = 32
TAG_SIZE = 16
TIMESTAMP_SIZE = 8
INITIATION_SIZE = 2 + KEY_SIZE + (KEY_SIZE + TAG_SIZE) + (TIMESTAMP_SIZE + TAG_SIZE)
#: Largest control frame either side accepts (a full map of ~30,000 peers fits).
MAX_FRAME_SIZE = 16 * 1024 * 1024
_MAX_COUNTER = 2**64 - 1
_TIMESTAMP = struct.Struct("!Q")
_INITIAL_HASH = crypto.hash_(PROTOCOL_NAME)


class CipherState:
    """One direction of the transport: a key and the implicit 64-bit message counter."""

    __slots__ = ("_aead", "counter", "failed")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.counter = 0
        self.failed = False

    def __repr__(self) -> str:
        return f"CipherState(counter={self.counter})"

    def encrypt(self, plaintext: bytes) -> bytes:
        if self.counter >= _MAX_COUNTER:
            raise ControlProtocolError("control session used up its nonces: reconnect")
        ciphertext = self._aead.encrypt(crypto.nonce(self.counter), plaintext, None)
        self.counter += 1
        return ciphertext

    def decrypt(self, ciphertext: bytes | memoryview) -> bytes:
        if self.failed:
            raise ControlProtocolError("control session already failed authentication")
        if self.counter >= _MAX_COUNTER:
            raise ControlProtocolError("control session used up its nonces: reconnect")
        try:
            plaintext = self._aead.decrypt(crypto.nonce(self.counter), bytes(ciphertext), None)
        except InvalidTag as exc:
            # A gap is never recoverable: the next message would have the wrong nonce too.
            self.failed = True
            raise ControlProtocolError(
                f"control message {self.counter} failed authentication (tampered, replayed, "
                "reordered or dropped)"
            ) from exc
        self.counter += 1
        return plaintext


@dataclass(frozen=True, slots=True)
class TransportKeys:
    """The two directions after a handshake, from one side's point of view."""

    send: CipherState
    receive: CipherState
    handshake_hash: bytes

    def __repr__(self) -> str:
        return "TransportKeys(...)"


class _SymmetricState:
    __slots__ = ("ck", "h", "k", "n")

    def __init__(self, responder_static: bytes) -> None:
        self.ck = _INITIAL_HASH
        self.h = _INITIAL_HASH
        self.k: bytes | None = None
        self.n = 0
        self.mix_hash(PROLOGUE)
        self.mix_hash(responder_static)

    def mix_hash(self, data: bytes) -> None:
        self.h = crypto.hash_(self.h, data)

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, self.k = crypto.kdf2(self.ck, input_key_material)
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        assert self.k is not None
        ciphertext = crypto.aead_encrypt(self.k, self.n, plaintext, self.h)
        self.n += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        assert self.k is not None
        try:
            plaintext = crypto.aead_decrypt(self.k, self.n, ciphertext, self.h)
        except ParseError as exc:
            raise ControlProtocolError("control handshake failed authentication") from exc
        self.n += 1
        self.mix_hash(ciphertext)
        return plaintext

    def split(self, initiator: bool) -> TransportKeys:
        first, second = crypto.kdf2(self.ck, b"")
        if initiator:
            return TransportKeys(CipherState(first), CipherState(second), self.h)
        return TransportKeys(CipherState(second), CipherState(first), self.h)


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        return crypto.dh(private, public)
    except ParseError as exc:
        raise ControlProtocolError("control handshake used a low-order key") from exc


class InitiatorHandshake:
    """The node's side. ``ephemeral_private`` comes from the caller (no randomness in here)."""

    def __init__(self, static_private: bytes, responder_public: bytes, ephemeral_private: bytes) -> None:
        self._static = static_private
        self._responder = responder_public
        self._ephemeral = ephemeral_private
        self._state = _SymmetricState(responder_public)
        self._sent = False

    def __repr__(self) -> str:
        return "InitiatorHandshake(...)"

    def create_initiation(self, timestamp_ns: int) -> bytes:
        if self._sent:
            raise ControlProtocolError("handshake initiation already sent")
        self._sent = True
        state = self._state
        ephemeral_public = crypto.public_key(self._ephemeral)
        state.mix_hash(ephemeral_public)
        state.mix_key(_dh(self._ephemeral, self._responder))
        encrypted_static = state.encrypt_and_hash(crypto.public_key(self._static))
        state.mix_key(_dh(self._static, self._responder))
        encrypted_payload = state.encrypt_and_hash(_TIMESTAMP.pack(timestamp_ns))
        return (
            bytes((FRAME_INITIATION, PROTOCOL_VERSION))
            + ephemeral_public
            + encrypted_static
            + encrypted_payload
        )

    def read_response(self, frame: bytes | memoryview) -> tuple[bytes, TransportKeys]:
        """The responder's payload and the transport keys."""
        frame = bytes(frame)
        if not self._sent:
            raise ControlProtocolError("handshake response before initiation")
        if len(frame) < 1 + KEY_SIZE + TAG_SIZE or frame[0] != FRAME_RESPONSE:
            raise ControlProtocolError("expected a control handshake response")
        state = self._state
        responder_ephemeral = frame[1 : 1 + KEY_SIZE]
        state.mix_hash(responder_ephemeral)
        state.mix_key(_dh(self._ephemeral, responder_ephemeral))
        state.mix_key(_dh(self._static, responder_ephemeral))
        payload = state.decrypt_and_hash(frame[1 + KEY_SIZE :])
        return payload, state.split(initiator=True)


@dataclass(frozen=True, slots=True)
class Initiation:
    """What a valid initiation proves: the sender holds ``machine_key``'s private key."""

    machine_key: bytes
    timestamp_ns: int


class ResponderHandshake:
    """The server's side."""

    def __init__(self, static_private: bytes) -> None:
        self._static = static_private
        self._state = _SymmetricState(crypto.public_key(static_private))
        self._initiator_ephemeral: bytes | None = None
        self._initiator_static: bytes | None = None

    def __repr__(self) -> str:
        return "ResponderHandshake(...)"

    def read_initiation(self, frame: bytes | memoryview) -> Initiation:
        frame = bytes(frame)
        if self._initiator_ephemeral is not None:
            raise ControlProtocolError("handshake initiation already received")
        if len(frame) != INITIATION_SIZE or frame[0] != FRAME_INITIATION:
            raise ControlProtocolError("expected a control handshake initiation")
        if frame[1] != PROTOCOL_VERSION:
            raise ControlProtocolError(
                f"control protocol version {frame[1]} is not supported (this server speaks "
                f"{PROTOCOL_VERSION}): upgrade embedmesh on the older side"
            )
        state = self._state
        ephemeral = frame[2 : 2 + KEY_SIZE]
        state.mix_hash(ephemeral)
        state.mix_key(_dh(self._static, ephemeral))
        offset = 2 + KEY_SIZE
        static = state.decrypt_and_hash(frame[offset : offset + KEY_SIZE + TAG_SIZE])
        state.mix_key(_dh(self._static, static))
        payload = state.decrypt_and_hash(frame[offset + KEY_SIZE + TAG_SIZE :])
        self._initiator_ephemeral = ephemeral
        self._initiator_static = static
        return Initiation(static, _TIMESTAMP.unpack(payload)[0])

    def create_response(self, ephemeral_private: bytes, payload: bytes = b"") -> tuple[bytes, TransportKeys]:
        if self._initiator_ephemeral is None or self._initiator_static is None:
            raise ControlProtocolError("handshake response before a valid initiation")
        state = self._state
        ephemeral_public = crypto.public_key(ephemeral_private)
        state.mix_hash(ephemeral_public)
        state.mix_key(_dh(ephemeral_private, self._initiator_ephemeral))
        state.mix_key(_dh(ephemeral_private, self._initiator_static))
        encrypted = state.encrypt_and_hash(payload)
        self._initiator_ephemeral = None
        return bytes((FRAME_RESPONSE,)) + ephemeral_public + encrypted, state.split(initiator=False)


def transport_frame(keys: TransportKeys, plaintext: bytes) -> bytes:
    return bytes((FRAME_TRANSPORT,)) + keys.send.encrypt(plaintext)


def read_transport_frame(keys: TransportKeys, frame: bytes | memoryview) -> bytes:
    view = memoryview(frame)
    if len(view) < 1 + TAG_SIZE or view[0] != FRAME_TRANSPORT:
        keys.receive.failed = True
        raise ControlProtocolError("expected a control transport frame")
    return keys.receive.decrypt(view[1:])
