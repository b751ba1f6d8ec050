"""Per-peer state: keys, keypair slots, staged packets, timers and counters."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from embedmesh.wireguard.cookie import CookieGenerator, Endpoint
from embedmesh.wireguard.keypair import Keypair
from embedmesh.wireguard.noise import InitiatorState, PeerKeys


@dataclass(slots=True)
class PeerStats:
    """Counters a status display wants; bytes are whole UDP payloads, as ``wg show`` counts them."""

    rx_bytes: int = 0
    tx_bytes: int = 0
    #: Monotonic time (the engine's clock) of the last completed handshake, or None.
    last_handshake: float | None = None
    handshakes_completed: int = 0


class Peer:
    """One WireGuard peer as the device sees it.

    Timer fields hold absolute deadlines on the engine's clock (None when not armed); the device
    fires them from :meth:`~embedmesh.wireguard.device.WireGuardDevice.handle_timeout`.
    """

    __slots__ = (
        "cookies",
        "current",
        "endpoint",
        "handshake",
        "handshake_attempts",
        "keys",
        "last_initiation_consumed",
        "last_initiation_sent",
        "last_timestamp",
        "need_another_keepalive",
        "new_handshake_at",
        "next",
        "note_send_at",
        "persistent_keepalive",
        "persistent_keepalive_at",
        "previous",
        "public_key",
        "retransmit_handshake_at",
        "send_keepalive_at",
        "sent_last_minute_handshake",
        "staged",
        "stats",
        "zero_keys_at",
    )

    def __init__(
        self,
        keys: PeerKeys,
        *,
        endpoint: Endpoint | None = None,
        persistent_keepalive: float | None = None,
        max_staged: int,
    ) -> None:
        self.public_key = keys.public_key
        self.keys = keys
        self.cookies = CookieGenerator(keys.mac1_key, keys.cookie_key)
        self.endpoint = endpoint
        self.persistent_keepalive = persistent_keepalive or None
        # Keypair slots (whitepaper §6.3 and wireguard-go): the responder holds a new session in
        # `next` until the initiator's first packet confirms it; `previous` keeps receiving packets
        # that were in flight across a rekey.
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        self.handshake: InitiatorState | None = None
        self.handshake_attempts = 0
        self.last_initiation_sent = float("-inf")
        self.last_initiation_consumed = float("-inf")
        self.last_timestamp = b""
        self.sent_last_minute_handshake = False
        #: When the device next tells its path layer that this peer has traffic (at most once a
        #: second, so the per-packet path pays one comparison).
        self.note_send_at = float("-inf")
        self.staged: deque[bytes | memoryview] = deque(maxlen=max_staged)
        self.retransmit_handshake_at: float | None = None
        self.send_keepalive_at: float | None = None
        self.need_another_keepalive = False
        self.new_handshake_at: float | None = None
        self.zero_keys_at: float | None = None
        self.persistent_keepalive_at: float | None = None
        self.stats = PeerStats()

    def next_deadline(self) -> float | None:
        deadline: float | None = None
        for at in (
            self.retransmit_handshake_at,
            self.send_keepalive_at,
            self.new_handshake_at,
            self.zero_keys_at,
            self.persistent_keepalive_at,
        ):
            if at is not None and (deadline is None or at < deadline):
                deadline = at
        return deadline

    def keypairs(self) -> list[Keypair]:
        return [kp for kp in (self.current, self.previous, self.next) if kp is not None]

    def __repr__(self) -> str:
        import base64

        return f"<Peer {base64.b64encode(self.public_key).decode()[:10]}… endpoint={self.endpoint}>"
