"""The Noise_IKpsk2 handshake computations (whitepaper §5.4.2–§5.4.4), free of any device state.

Each function is a pure transformation of keys and message fields; the device decides when to call
them, which indices to use and what to do with failures. Authentication failures raise
:class:`~embedmesh.wireguard.crypto.CryptoError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from embedmesh.wireguard import crypto
from embedmesh.wireguard.crypto import hash_, kdf1, kdf2, kdf3
from embedmesh.wireguard.messages import Initiation, Response

INITIAL_CHAINING_KEY = hash_(crypto.CONSTRUCTION)
INITIAL_HASH = hash_(INITIAL_CHAINING_KEY, crypto.IDENTIFIER)
EMPTY_KEY = bytes(32)


@dataclass(slots=True)
class StaticIdentity:
    """This node's static key pair plus the values derived from it once, for receiving."""

    private_key: bytes = field(repr=False)
    public_key: bytes = field(init=False)
    #: HASH(H0 || our public key): where a handshake addressed to us starts.
    initial_hash: bytes = field(init=False, repr=False)
    #: HASH(LABEL_MAC1 || our public key): checks mac1 of messages sent to us.
    mac1_key: bytes = field(init=False, repr=False)
    #: HASH(LABEL_COOKIE || our public key): seals the cookies we hand out.
    cookie_key: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.public_key = crypto.public_key(self.private_key)
        self.initial_hash = hash_(INITIAL_HASH, self.public_key)
        self.mac1_key = hash_(crypto.LABEL_MAC1, self.public_key)
        self.cookie_key = hash_(crypto.LABEL_COOKIE, self.public_key)


@dataclass(slots=True)
class PeerKeys:
    """Values derived once per (our key, peer key) pair; the static-static DH is the costly one."""

    public_key: bytes
    preshared_key: bytes = field(repr=False)
    static_static: bytes = field(repr=False)
    #: HASH(H0 || peer public key): where a handshake we send to this peer starts.
    initial_hash: bytes = field(repr=False)
    #: HASH(LABEL_MAC1 || peer public key): computes mac1 of messages we send to this peer.
    mac1_key: bytes = field(repr=False)
    #: HASH(LABEL_COOKIE || peer public key): opens the cookies this peer hands us.
    cookie_key: bytes = field(repr=False)

    @classmethod
    def derive(cls, identity: StaticIdentity, public_key: bytes, preshared_key: bytes | None) -> PeerKeys:
        try:
            static_static = crypto.dh(identity.private_key, public_key)
        except crypto.CryptoError:
            # A low-order peer key can never complete a handshake; keep the peer but make every
            # handshake with it fail authentication, as wireguard-go does.
            static_static = EMPTY_KEY
        return cls(
            public_key=public_key,
            preshared_key=preshared_key or EMPTY_KEY,
            static_static=static_static,
            initial_hash=hash_(INITIAL_HASH, public_key),
            mac1_key=hash_(crypto.LABEL_MAC1, public_key),
            cookie_key=hash_(crypto.LABEL_COOKIE, public_key),
        )


@dataclass(slots=True)
class InitiatorState:
    """What the initiator keeps between sending an initiation and receiving the response."""

    local_index: int
    ephemeral_private: bytes = field(repr=False)
    chaining_key: bytes = field(repr=False)
    hash: bytes = field(repr=False)
    sent_at: float


@dataclass(slots=True)
class ConsumedInitiation:
    """A verified initiation, as the responder sees it."""

    peer_public_key: bytes
    timestamp: bytes
    sender_index: int
    remote_ephemeral: bytes
    chaining_key: bytes = field(repr=False)
    hash: bytes = field(repr=False)


@dataclass(slots=True)
class SessionKeys:
    """Transport keys that came out of a completed handshake."""

    send_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)


def create_initiation(
    identity: StaticIdentity,
    peer: PeerKeys,
    local_index: int,
    ephemeral_private: bytes,
    timestamp: bytes,
    now: float,
) -> tuple[Initiation, InitiatorState]:
    """Build an initiation (without MACs) and the state needed to consume its response."""
    ephemeral_public = crypto.public_key(ephemeral_private)
    ck = kdf1(INITIAL_CHAINING_KEY, ephemeral_public)
    h = hash_(peer.initial_hash, ephemeral_public)
    ck, key = kdf2(ck, crypto.dh(ephemeral_private, peer.public_key))
    encrypted_static = crypto.aead_encrypt(key, 0, identity.public_key, h)
    h = hash_(h, encrypted_static)
    ck, key = kdf2(ck, peer.static_static)
    encrypted_timestamp = crypto.aead_encrypt(key, 0, timestamp, h)
    h = hash_(h, encrypted_timestamp)
    message = Initiation(
        local_index, ephemeral_public, encrypted_static, encrypted_timestamp, bytes(16), bytes(16)
    )
    return message, InitiatorState(local_index, ephemeral_private, ck, h, now)


def open_initiation_static(identity: StaticIdentity, message: Initiation) -> tuple[bytes, bytes, bytes]:
    """First half of consuming an initiation: reveal the sender's static key.

    Returns (peer public key, chaining key, hash); the caller looks the key up among its peers
    before spending the second DH on :func:`finish_initiation`.
    """
    ck = kdf1(INITIAL_CHAINING_KEY, message.ephemeral)
    h = hash_(identity.initial_hash, message.ephemeral)
    ck, key = kdf2(ck, crypto.dh(identity.private_key, message.ephemeral))
    peer_public = crypto.aead_decrypt(key, 0, message.encrypted_static, h)
    h = hash_(h, message.encrypted_static)
    return peer_public, ck, h


def finish_initiation(
    peer: PeerKeys, message: Initiation, chaining_key: bytes, hash_value: bytes
) -> ConsumedInitiation:
    """Second half: authenticate the timestamp with the static-static secret."""
    ck, key = kdf2(chaining_key, peer.static_static)
    if peer.static_static == EMPTY_KEY:
        raise crypto.CryptoError("peer has a low-order public key")
    timestamp = crypto.aead_decrypt(key, 0, message.encrypted_timestamp, hash_value)
    h = hash_(hash_value, message.encrypted_timestamp)
    return ConsumedInitiation(peer.public_key, timestamp, message.sender_index, message.ephemeral, ck, h)


def create_response(
    consumed: ConsumedInitiation, peer: PeerKeys, local_index: int, ephemeral_private: bytes
) -> tuple[Response, SessionKeys]:
    """Build the response (without MACs) and derive the responder's transport keys."""
    ephemeral_public = crypto.public_key(ephemeral_private)
    ck = kdf1(consumed.chaining_key, ephemeral_public)
    h = hash_(consumed.hash, ephemeral_public)
    ck = kdf1(ck, crypto.dh(ephemeral_private, consumed.remote_ephemeral))
    ck = kdf1(ck, crypto.dh(ephemeral_private, peer.public_key))
    ck, tau, key = kdf3(ck, peer.preshared_key)
    h = hash_(h, tau)
    encrypted_nothing = crypto.aead_encrypt(key, 0, b"", h)
    initiator_send, responder_send = kdf2(ck, b"")
    message = Response(
        local_index, consumed.sender_index, ephemeral_public, encrypted_nothing, bytes(16), bytes(16)
    )
    return message, SessionKeys(send_key=responder_send, receive_key=initiator_send)


def consume_response(
    identity: StaticIdentity, peer: PeerKeys, state: InitiatorState, message: Response
) -> SessionKeys:
    """Authenticate a response to our initiation and derive the initiator's transport keys."""
    ck = kdf1(state.chaining_key, message.ephemeral)
    h = hash_(state.hash, message.ephemeral)
    ck = kdf1(ck, crypto.dh(state.ephemeral_private, message.ephemeral))
    ck = kdf1(ck, crypto.dh(identity.private_key, message.ephemeral))
    ck, tau, key = kdf3(ck, peer.preshared_key)
    h = hash_(h, tau)
    crypto.aead_decrypt(key, 0, message.encrypted_nothing, h)
    initiator_send, responder_send = kdf2(ck, b"")
    return SessionKeys(send_key=initiator_send, receive_key=responder_send)
