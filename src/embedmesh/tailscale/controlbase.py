"""The ts2021 base transport (Tailscale's ``control/controlbase``), sans-IO.

Noise_IK_25519_ChaChaPoly_BLAKE2s between a client (the initiator, whose static key is its machine
key) and the control server, whose static key the client learnt from ``GET /key``. The prologue is
``"Tailscale Control Protocol v<version>"`` with the client's capability version, which also travels
in clear in the initiation header: the server builds its prologue from that header, so a tampered
version breaks the handshake. Both handshake payloads are empty.

Frames (all lengths big-endian)::

    initiation  c->s  version u16 | 0x01 | len=96 u16 | e (32) | enc(s) (48) | tag (16)    101 bytes
    response    s->c  0x02 | len=48 u16 | e (32) | tag (16)                                51 bytes
    error       s->c  0x03 | len u16 | text (unauthenticated, a hint only)
    record      both  0x04 | len u16 | ChaCha20-Poly1305 ciphertext, empty AD            <= 4096 bytes

A record carries at most 4077 bytes of plaintext; writers split larger data, and empty records are
valid and carry nothing. The record nonce is four zero bytes and a **big-endian** 64-bit counter
per direction (standard Noise uses little-endian, so a stock library agrees only on the first
record); counter 2**64-1 is never used. There is no rekey: the client reconnects. One record that
fails to decrypt, or any other malformed input, breaks the receiving side for good.

On top of the stream, a server may send an *early payload* before HTTP/2 starts
(``control/ts2021``): ``ff ff ff 'T' 'S'``, a u32 length, and the JSON ``tailcfg.EarlyNoise``.
:func:`encode_early_payload` writes it, :class:`EarlyPayloadReader` finds it.

The classes here take bytes and return bytes; randomness (the ephemeral keys) is an argument.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from embedmesh.errors import EmbedmeshError
from embedmesh.tailscale import gojson
from embedmesh.tailscale.errors import KeyFormatError, TailscaleProtocolError
from embedmesh.tailscale.keys import ChallengePublic, MachinePrivate, MachinePublic
from embedmesh.wireguard import crypto

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE_PREFIX = b"Tailscale Control Protocol v"

MSG_INITIATION = 0x01
MSG_RESPONSE = 0x02
MSG_ERROR = 0x03
MSG_RECORD = 0x04

HEADER_SIZE = 3
INITIATION_HEADER_SIZE = 5
INITIATION_SIZE = 101
RESPONSE_SIZE = 51
TAG_SIZE = 16
MAX_FRAME_SIZE = 4096
MAX_CIPHERTEXT_SIZE = MAX_FRAME_SIZE - HEADER_SIZE
MAX_PLAINTEXT_SIZE = MAX_CIPHERTEXT_SIZE - TAG_SIZE
#: The one counter value that is never used (Go's ``invalidNonce``).
INVALID_COUNTER = 2**64 - 1

EARLY_PAYLOAD_MAGIC = b"\xff\xff\xffTS"
EARLY_PAYLOAD_HEADER_SIZE = 9
MAX_EARLY_PAYLOAD_SIZE = 10 << 20

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_INITIAL_HASH = crypto.hash_(PROTOCOL_NAME)
_NONCE_PREFIX = bytes(4)


class ControlbaseError(TailscaleProtocolError):
    """The peer's bytes broke the ts2021 transport; the connection cannot continue."""


class HandshakeError(ControlbaseError):
    """The handshake failed. ``reply`` is an error frame to send the client first (may be empty)."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


class ServerRefusedError(HandshakeError):
    """The server answered the initiation with an error frame; ``server_message`` is its text."""

    def __init__(self, server_message: str) -> None:
        super().__init__(f"control server refused the handshake: {server_message!r}")
        self.server_message = server_message


class CipherExhaustedError(ControlbaseError):
    """A direction used up its 2**64-1 nonces; reconnect."""


class TransportStateError(EmbedmeshError):
    """The connection was used in a state that does not allow it (sending before the handshake)."""


def prologue(version: int) -> bytes:
    """The Noise prologue for a protocol (capability) version."""
    return PROLOGUE_PREFIX + str(version).encode("ascii")


def error_frame(message: str) -> bytes:
    """An error frame (0x03) carrying ``message``; like Go, at most 65535 bytes of text."""
    text = message.encode("utf-8")[:0xFFFF]
    return bytes([MSG_ERROR]) + _U16.pack(len(text)) + text


class _SymmetricState:
    """Noise's SymmetricState: the handshake hash ``h`` and chaining key ``ck``."""

    __slots__ = ("ck", "h")

    def __init__(self) -> None:
        self.h = _INITIAL_HASH
        self.ck = _INITIAL_HASH

    def mix_hash(self, data: bytes) -> None:
        self.h = crypto.hash_(self.h, data)

    def mix_dh(self, private: bytes, public: bytes) -> bytes:
        """MixKey(DH(private, public)): HKDF-BLAKE2s with salt ck; returns the one-use key."""
        try:
            shared = crypto.dh(private, public)
        except crypto.CryptoError as exc:
            raise HandshakeError("X25519 with a low-order key") from exc
        self.ck, key = crypto.kdf2(self.ck, shared)
        return key

    def encrypt_and_hash(self, key: bytes, plaintext: bytes) -> bytes:
        # Each handshake key is used once, so the nonce is always zero (LE and BE agree on zero).
        ciphertext = crypto.aead_encrypt(key, 0, plaintext, self.h)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, key: bytes, ciphertext: bytes) -> bytes:
        try:
            plaintext = crypto.aead_decrypt(key, 0, ciphertext, self.h)
        except crypto.CryptoError as exc:
            raise HandshakeError("handshake authentication failed") from exc
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        return crypto.kdf2(self.ck, b"")


class RecordCipher:
    """One direction of the transport: ChaCha20-Poly1305 with a big-endian 64-bit counter nonce."""

    __slots__ = ("_aead", "counter")

    def __init__(self, key: bytes, counter: int = 0) -> None:
        self._aead = ChaCha20Poly1305(key)
        #: The nonce of the next record; INVALID_COUNTER means exhausted.
        self.counter = counter

    def _nonce(self) -> bytes:
        if self.counter >= INVALID_COUNTER:
            raise CipherExhaustedError("cipher exhausted, no more nonces available for this key")
        return _NONCE_PREFIX + self.counter.to_bytes(8, "big")

    def seal(self, plaintext: bytes | memoryview) -> bytes:
        nonce = self._nonce()
        self.counter += 1
        return self._aead.encrypt(nonce, bytes(plaintext), None)

    def open(self, ciphertext: bytes | memoryview) -> bytes:
        nonce = self._nonce()
        # The counter advances even on failure, as in Go; the caller stops reading anyway.
        self.counter += 1
        try:
            return self._aead.decrypt(nonce, bytes(ciphertext), None)
        except InvalidTag as exc:
            raise ControlbaseError("record failed to decrypt") from exc


@dataclass(frozen=True, slots=True)
class Session:
    """What both sides know once the handshake is complete."""

    #: The other side's static key (the server's for a client, the client's machine key for a server).
    peer: MachinePublic
    #: The protocol (capability) version the client sent in the initiation header.
    version: int
    #: The final Noise handshake hash, which binds other messages to this connection.
    handshake_hash: bytes = field(repr=False)


class _Transport:
    """Record framing shared by both sides once keys are split."""

    __slots__ = ("_broken", "_buffer", "_rx", "_tx", "session")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._rx: RecordCipher | None = None
        self._tx: RecordCipher | None = None
        self._broken: str | None = None
        self.session: Session | None = None

    @property
    def established(self) -> bool:
        """True once the handshake is complete (records can be sent and received)."""
        return self.session is not None

    @property
    def tx(self) -> RecordCipher:
        """The sending cipher (its ``counter`` is the next record's nonce)."""
        if self._tx is None:
            raise TransportStateError("the handshake is not complete")
        return self._tx

    @property
    def rx(self) -> RecordCipher:
        """The receiving cipher."""
        if self._rx is None:
            raise TransportStateError("the handshake is not complete")
        return self._rx

    def _fail(self, message: str, kind: type[ControlbaseError] = ControlbaseError) -> ControlbaseError:
        """Break the connection for good; returns the error to raise."""
        self._broken = message
        self._buffer.clear()
        return kind(message)

    def _check_readable(self) -> None:
        if self._broken is not None:
            raise ControlbaseError(f"connection is broken: {self._broken}")

    def _read_records(self) -> bytes:
        """Decrypt every complete record in the buffer; keep a partial one for later."""
        rx = self.rx
        buffer = self._buffer
        out = bytearray()
        offset = 0
        problem: str | None = None
        kind: type[ControlbaseError] = ControlbaseError
        while len(buffer) - offset >= HEADER_SIZE:
            (length,) = _U16.unpack_from(buffer, offset + 1)
            if HEADER_SIZE + length > MAX_FRAME_SIZE:
                problem = f"record of {HEADER_SIZE + length} bytes exceeds {MAX_FRAME_SIZE}"
                break
            end = offset + HEADER_SIZE + length
            if len(buffer) < end:
                break
            if buffer[offset] != MSG_RECORD:
                problem = f"received message type {buffer[offset]}, want {MSG_RECORD}"
                break
            try:
                with memoryview(buffer) as view:
                    out += rx.open(view[offset + HEADER_SIZE : end])
            except ControlbaseError as exc:
                problem, kind = str(exc), type(exc)
                break
            offset = end
        if problem is not None:
            error = self._fail(problem, kind)
            if not out:
                raise error
            # Hand over what was authentic before the bad record (as Go's Read would); the
            # next call reports the failure.
            return bytes(out)
        del buffer[:offset]
        return bytes(out)

    def send(self, data: bytes | bytearray | memoryview) -> bytes:
        """Encrypt ``data`` into records of at most 4077 plaintext bytes; returns the wire bytes."""
        tx = self.tx
        view = memoryview(data)
        out = bytearray()
        for start in range(0, len(view), MAX_PLAINTEXT_SIZE):
            chunk = view[start : start + MAX_PLAINTEXT_SIZE]
            out += bytes([MSG_RECORD]) + _U16.pack(len(chunk) + TAG_SIZE) + tx.seal(chunk)
        return bytes(out)

    def send_record(self, chunk: bytes) -> bytes:
        """Exactly one record for ``chunk`` (which may be empty, up to 4077 bytes)."""
        if len(chunk) > MAX_PLAINTEXT_SIZE:
            raise ValueError(f"a record carries at most {MAX_PLAINTEXT_SIZE} bytes")
        return bytes([MSG_RECORD]) + _U16.pack(len(chunk) + TAG_SIZE) + self.tx.seal(chunk)


class ClientConnection(_Transport):
    """The client (initiator) side.

    Send :attr:`initiation` (in the ``X-Tailscale-Handshake`` header or as the first bytes of the
    stream), then feed everything the server sends to :meth:`receive_data`, which returns the
    plaintext. ``ephemeral`` is 32 random bytes drawn by the caller.
    """

    __slots__ = ("_control_key", "_ephemeral", "_machine_key", "_state", "initiation", "version")

    def __init__(
        self, machine_key: MachinePrivate, control_key: MachinePublic, version: int, ephemeral: bytes
    ) -> None:
        super().__init__()
        if not 0 <= version <= 0xFFFF:
            raise ValueError("the protocol version is a u16")
        if control_key.is_zero:
            raise ValueError("the control server has no Noise key (too old a server)")
        self.version = version
        self._machine_key = machine_key
        self._control_key = control_key
        self._ephemeral = crypto.generate_private_key(ephemeral)
        s = _SymmetricState()
        s.mix_hash(prologue(version))
        s.mix_hash(control_key.raw)
        ephemeral_public = crypto.public_key(self._ephemeral)
        s.mix_hash(ephemeral_public)
        key = s.mix_dh(self._ephemeral, control_key.raw)
        encrypted_machine = s.encrypt_and_hash(key, machine_key.public_raw())
        key = s.mix_dh(machine_key.raw, control_key.raw)
        tag = s.encrypt_and_hash(key, b"")
        self._state = s
        #: The 101-byte initiation frame.
        self.initiation = (
            _U16.pack(version)
            + bytes([MSG_INITIATION])
            + _U16.pack(INITIATION_SIZE - INITIATION_HEADER_SIZE)
            + ephemeral_public
            + encrypted_machine
            + tag
        )

    def receive_data(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed bytes from the server; returns the plaintext they complete (maybe b"").

        Raises :class:`ServerRefusedError` for an error frame, :class:`ControlbaseError` for
        anything malformed; after either, the connection stays broken.
        """
        self._check_readable()
        self._buffer += data
        if self.session is None and not self._read_response():
            return b""
        return self._read_records()

    def _read_response(self) -> bool:
        buffer = self._buffer
        if len(buffer) < HEADER_SIZE:
            return False
        kind = buffer[0]
        (length,) = _U16.unpack_from(buffer, 1)
        if kind == MSG_ERROR:
            if len(buffer) < HEADER_SIZE + length:
                return False
            text = bytes(buffer[HEADER_SIZE : HEADER_SIZE + length]).decode("utf-8", errors="replace")
            self._fail("server error")
            raise ServerRefusedError(text)
        if kind != MSG_RESPONSE:
            raise self._fail(f"unexpected response message type {kind}", HandshakeError)
        if length != RESPONSE_SIZE - HEADER_SIZE:
            raise self._fail(f"wrong length {length} received for handshake response", HandshakeError)
        if len(buffer) < RESPONSE_SIZE:
            return False
        response = bytes(buffer[:RESPONSE_SIZE])
        del buffer[:RESPONSE_SIZE]
        s = self._state
        server_ephemeral = response[3:35]
        s.mix_hash(server_ephemeral)
        try:
            s.mix_dh(self._ephemeral, server_ephemeral)
            key = s.mix_dh(self._machine_key.raw, server_ephemeral)
            s.decrypt_and_hash(key, response[35:51])
        except HandshakeError as exc:
            raise self._fail(str(exc), HandshakeError) from exc
        k1, k2 = s.split()
        self._tx = RecordCipher(k1)
        self._rx = RecordCipher(k2)
        self.session = Session(self._control_key, self.version, s.h)
        return True


class ServerConnection(_Transport):
    """The control server (responder) side.

    Hand the initiation from the ``X-Tailscale-Handshake`` header to :meth:`accept_initiation`
    (which returns the response frame), or feed the stream to :meth:`receive_data` and send what
    :meth:`data_to_send` returns. ``ephemeral`` is 32 random bytes drawn by the caller. The
    version the client asked for is in :attr:`session`; refusing it is the caller's decision.
    """

    __slots__ = ("_control_key", "_ephemeral", "_outgoing")

    def __init__(self, control_key: MachinePrivate, ephemeral: bytes) -> None:
        super().__init__()
        self._control_key = control_key
        self._ephemeral = crypto.generate_private_key(ephemeral)
        self._outgoing = bytearray()

    def accept_initiation(self, initiation: bytes) -> bytes:
        """Process a whole 101-byte initiation; returns the 51-byte response frame.

        Raises :class:`HandshakeError`; its ``reply`` is the error frame Go would send (for a bad
        size, type or length) or empty (authentication failures get no answer).
        """
        self._check_readable()
        if self.session is not None:
            raise TransportStateError("the handshake is already complete")
        if len(initiation) != INITIATION_SIZE:
            raise self._refuse("wrong handshake initiation size")
        return self._accept(bytes(initiation))

    def _refuse(self, message: str) -> HandshakeError:
        self._fail(message)
        return HandshakeError(message, error_frame(message))

    def _accept(self, init: bytes) -> bytes:
        if init[2] != MSG_INITIATION:
            raise self._refuse("unexpected handshake message type")
        (length,) = _U16.unpack_from(init, 3)
        if length != INITIATION_SIZE - INITIATION_HEADER_SIZE:
            raise self._refuse("wrong handshake initiation length")
        (version,) = _U16.unpack_from(init, 0)
        s = _SymmetricState()
        s.mix_hash(prologue(version))
        s.mix_hash(self._control_key.public_raw())
        client_ephemeral = init[5:37]
        try:
            s.mix_hash(client_ephemeral)
            key = s.mix_dh(self._control_key.raw, client_ephemeral)
            machine_raw = s.decrypt_and_hash(key, init[37:85])
            key = s.mix_dh(self._control_key.raw, machine_raw)
            s.decrypt_and_hash(key, init[85:101])
            ephemeral_public = crypto.public_key(self._ephemeral)
            s.mix_hash(ephemeral_public)
            s.mix_dh(self._ephemeral, client_ephemeral)
            key = s.mix_dh(self._ephemeral, machine_raw)
            tag = s.encrypt_and_hash(key, b"")
        except HandshakeError as exc:
            self._fail(str(exc))
            raise
        k1, k2 = s.split()
        self._rx = RecordCipher(k1)
        self._tx = RecordCipher(k2)
        self.session = Session(MachinePublic(machine_raw), version, s.h)
        return bytes([MSG_RESPONSE]) + _U16.pack(RESPONSE_SIZE - HEADER_SIZE) + ephemeral_public + tag

    def receive_data(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed bytes from the client; returns the plaintext they complete (maybe b"").

        Before the handshake the stream must start with the initiation; the response is then
        waiting in :meth:`data_to_send`. Raises :class:`HandshakeError` (send its ``reply``) or
        :class:`ControlbaseError`; after either, the connection stays broken.
        """
        self._check_readable()
        self._buffer += data
        if self.session is None:
            buffer = self._buffer
            if len(buffer) < INITIATION_HEADER_SIZE:
                return b""
            # Go checks the header before it waits for the rest of the initiation.
            if buffer[2] != MSG_INITIATION:
                raise self._refuse("unexpected handshake message type")
            if _U16.unpack_from(buffer, 3)[0] != INITIATION_SIZE - INITIATION_HEADER_SIZE:
                raise self._refuse("wrong handshake initiation length")
            if len(buffer) < INITIATION_SIZE:
                return b""
            init = bytes(buffer[:INITIATION_SIZE])
            del buffer[:INITIATION_SIZE]
            self._outgoing += self._accept(init)
        return self._read_records()

    def data_to_send(self) -> bytes:
        """The handshake response owed after :meth:`receive_data` took an in-stream initiation."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out


@dataclass(frozen=True, slots=True)
class EarlyNoise:
    """``tailcfg.EarlyNoise``: what a server may push before HTTP/2 starts."""

    node_key_challenge: ChallengePublic


def encode_early_payload(challenge: ChallengePublic) -> bytes:
    """The early payload a server writes first inside Noise (capability version >= 49)."""
    body = b'{"nodeKeyChallenge":"' + challenge.to_text().encode("ascii") + b'"}'
    return EARLY_PAYLOAD_MAGIC + _U32.pack(len(body)) + body


def parse_early_noise(body: bytes) -> EarlyNoise | None:
    """Decode the JSON of an early payload as Go's ``json.Unmarshal`` into ``*EarlyNoise`` does."""
    obj = gojson.load_object(body, "early payload", allow_null=True)
    if obj is None:
        return None
    value = obj.get("nodeKeyChallenge")
    if value is None:
        return EarlyNoise(ChallengePublic.zero())
    if not isinstance(value, str):
        raise TailscaleProtocolError("early payload: nodeKeyChallenge is not a string")
    try:
        return EarlyNoise(ChallengePublic.from_text(value))
    except KeyFormatError as exc:
        raise TailscaleProtocolError(f"early payload: {exc}") from exc


class EarlyPayloadReader:
    """The client's view of the first plaintext bytes: an early payload, or HTTP/2 at once.

    Feed plaintext to :meth:`receive`; it returns the bytes that follow the early payload (the
    HTTP/2 stream). Once :attr:`decided`, :attr:`early_payload` is the payload or None (the server
    sent none: the first 9 bytes did not start with the magic, and they are passed through).
    """

    __slots__ = ("_buffer", "_length", "decided", "early_payload")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._length: int | None = None
        self.decided = False
        self.early_payload: EarlyNoise | None = None

    def receive(self, data: bytes | bytearray | memoryview) -> bytes:
        if self.decided:
            return bytes(data)
        self._buffer += data
        buffer = self._buffer
        if self._length is None:
            if len(buffer) < EARLY_PAYLOAD_HEADER_SIZE:
                return b""
            if buffer[: len(EARLY_PAYLOAD_MAGIC)] != EARLY_PAYLOAD_MAGIC:
                # An HTTP/2 frame header can't look like the magic (length 0xffffff, type 'T').
                self.decided = True
                out = bytes(buffer)
                buffer.clear()
                return out
            (length,) = _U32.unpack_from(buffer, len(EARLY_PAYLOAD_MAGIC))
            if length > MAX_EARLY_PAYLOAD_SIZE:
                raise TailscaleProtocolError("invalid early payload length")
            self._length = length
            del buffer[:EARLY_PAYLOAD_HEADER_SIZE]
        if len(buffer) < self._length:
            return b""
        body = bytes(buffer[: self._length])
        rest = bytes(buffer[self._length :])
        buffer.clear()
        self.early_payload = parse_early_noise(body)
        self.decided = True
        return rest


__all__ = [
    "EARLY_PAYLOAD_MAGIC",
    "INITIATION_SIZE",
    "INVALID_COUNTER",
    "MAX_EARLY_PAYLOAD_SIZE",
    "MAX_FRAME_SIZE",
    "MAX_PLAINTEXT_SIZE",
    "PROLOGUE_PREFIX",
    "PROTOCOL_NAME",
    "RESPONSE_SIZE",
    "CipherExhaustedError",
    "ClientConnection",
    "ControlbaseError",
    "EarlyNoise",
    "EarlyPayloadReader",
    "HandshakeError",
    "RecordCipher",
    "ServerConnection",
    "ServerRefusedError",
    "Session",
    "TransportStateError",
    "encode_early_payload",
    "error_frame",
    "parse_early_noise",
    "prologue",
]
