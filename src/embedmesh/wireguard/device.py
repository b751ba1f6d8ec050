"""The WireGuard device: a sans-IO state machine for one interface and all its peers.

Inputs are UDP payloads from the underlay (:meth:`WireGuardDevice.receive_datagram`), IP packets
from the overlay (:meth:`WireGuardDevice.send_packet`) and the passage of time
(:meth:`WireGuardDevice.handle_timeout`), each with ``now`` on a monotonic clock in seconds. Outputs
are pulled: :meth:`WireGuardDevice.datagrams_to_send` for the underlay, the return value of
``receive_datagram`` for the overlay, and :meth:`WireGuardDevice.next_deadline` for the runtime's
timer. Nothing here opens a socket, reads a clock or draws randomness it was not handed.

Hostile input never raises: every malformed, unauthenticated, stale or replayed datagram is
dropped and counted in :attr:`WireGuardDevice.counters`, and nothing is allocated for a sender
before it has proved who it is.
"""

from __future__ import annotations

import logging
import os
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from ipaddress import IPv4Network, IPv6Network, ip_network

from embedmesh.errors import ParseError
from embedmesh.wireguard import crypto, messages
from embedmesh.wireguard.allowedips import AllowedIPs
from embedmesh.wireguard.cookie import CookieChecker, Endpoint
from embedmesh.wireguard.crypto import CryptoError, InvalidTag
from embedmesh.wireguard.keypair import Keypair
from embedmesh.wireguard.messages import (
    INITIATION_MAC1_OFFSET,
    INITIATION_MAC2_OFFSET,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_MAC1_OFFSET,
    RESPONSE_MAC2_OFFSET,
    TRANSPORT_HEADER,
    TRANSPORT_MIN_SIZE,
)
from embedmesh.wireguard.noise import InitiatorState, PeerKeys, StaticIdentity
from embedmesh.wireguard.peer import Peer
from embedmesh.wireguard.timers import (
    HURRY_MIN_INTERVAL,
    INITIATION_MIN_INTERVAL,
    KEEPALIVE_TIMEOUT,
    MAX_HANDSHAKE_ATTEMPTS,
    MAX_STAGED_PACKETS,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER,
)

logger = logging.getLogger("embedmesh.wireguard")

_unpack_transport = TRANSPORT_HEADER.unpack_from
_pack_transport = TRANSPORT_HEADER.pack
_pack_nonce = struct.Struct("<4xQ").pack
_unpack_u16 = struct.Struct("!H").unpack_from
_PADDING = bytes(16)
#: The initiator rekeys this long into a session even if it only receives (§6.2).
_LAST_MINUTE_REKEY = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT

Network = IPv4Network | IPv6Network

#: How often the device tells its path layer that a peer has traffic (see ``on_send``).
NOTE_SEND_INTERVAL = 1.0
#: Handshake messages per second above which the device counts as under load and demands mac2.
DEFAULT_UNDER_LOAD_THRESHOLD = 64
#: How long the device stays under load after the rate last exceeded the threshold (wireguard-go).
UNDER_LOAD_DURATION = 1.0
#: Per-source handshake rate once under load (wireguard-go's rate limiter: 20/s, burst 5).
RATE_LIMIT_PER_SECOND = 20.0
RATE_LIMIT_BURST = 5.0
RATE_LIMIT_MAX_SOURCES = 4096


class WireGuardDevice:
    """One WireGuard interface: a static key, a UDP port's worth of peers, cryptokey routing.

    ``random_bytes`` supplies ephemeral keys, indices and cookie secrets (``os.urandom`` by
    default; the simulator hands in a seeded source). ``rng`` supplies timer jitter
    (:class:`random.SystemRandom` by default). The TAI64N
    timestamp of an initiation must grow across restarts, so it is taken from
    ``now + wall_clock_offset`` (the runtime passes ``time.time() - time.monotonic()``).
    """

    def __init__(
        self,
        private_key: bytes,
        *,
        mtu: int = 1420,
        random_bytes: Callable[[int], bytes] = os.urandom,
        rng: random.Random | None = None,
        wall_clock_offset: float = 0.0,
        under_load_threshold: int = DEFAULT_UNDER_LOAD_THRESHOLD,
    ) -> None:
        if len(private_key) != 32:
            raise ValueError("a WireGuard private key is 32 bytes")
        self.identity = StaticIdentity(private_key)
        self.mtu = mtu
        self.peers: dict[bytes, Peer] = {}
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        self._counts: Counter[str] = Counter()
        # The per-packet counters are plain ints (a Counter increment costs several dict
        # operations); :attr:`counters` reports them with the rest.
        self._rx_packets = 0
        self._tx_packets = 0
        self._random_bytes = random_bytes
        self._rng = rng if rng is not None else random.SystemRandom()
        self._wall_clock_offset = wall_clock_offset
        self._cookie_checker = CookieChecker(self.identity.mac1_key, self.identity.cookie_key, random_bytes)
        # Local index -> what it names: a Keypair, or (peer, initiator state) while a handshake
        # we started is in flight.
        self._indices: dict[int, Keypair | tuple[Peer, InitiatorState]] = {}
        self._outbox: list[tuple[bytes, Endpoint]] = []
        self._under_load_threshold = under_load_threshold
        self._load_window_start = float("-inf")
        self._load_count = 0
        self._under_load_until = float("-inf")
        self._rate_buckets: dict[str, tuple[float, float]] = {}
        #: The path layer, when one decides where each peer's packets go (a tailnet node's
        #: :class:`~embedmesh.paths.PathCore`): ``on_source(peer, source, now)`` hears of every
        #: authenticated packet from a source other than the peer's endpoint, instead of the device
        #: moving the endpoint itself (WireGuard's roaming, the default when None), and
        #: ``on_send(peer, now)`` of traffic to a peer, at most once per :data:`NOTE_SEND_INTERVAL`.
        self.on_source: Callable[[Peer, Endpoint, float], None] | None = None
        self.on_send: Callable[[Peer, float], None] | None = None

    @property
    def counters(self) -> Counter[str]:
        """Every counter (drops by reason, handshakes, packets): a snapshot."""
        counts = Counter(self._counts)
        if self._rx_packets:
            counts["rx_packets"] = self._rx_packets
        if self._tx_packets:
            counts["tx_packets"] = self._tx_packets
        return counts

    # ------------------------------------------------------------------ configuration

    @property
    def public_key(self) -> bytes:
        return self.identity.public_key

    def add_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        allowed_ips: Iterable[Network | str] = (),
        endpoint: Endpoint | None = None,
        persistent_keepalive: float | None = None,
    ) -> Peer:
        """Add a peer (or update one with the same key) and route ``allowed_ips`` to it."""
        if len(public_key) != 32:
            raise ValueError("a WireGuard public key is 32 bytes")
        if public_key == self.public_key:
            raise ValueError("a device cannot have itself as a peer")
        peer = self.peers.get(public_key)
        if peer is None:
            keys = PeerKeys.derive(self.identity, public_key, preshared_key)
            peer = Peer(
                keys,
                endpoint=endpoint,
                persistent_keepalive=persistent_keepalive,
                max_staged=MAX_STAGED_PACKETS,
            )
            self.peers[public_key] = peer
        else:
            if endpoint is not None:
                peer.endpoint = endpoint
            peer.persistent_keepalive = persistent_keepalive or None
            if preshared_key is not None:
                peer.keys = PeerKeys.derive(self.identity, public_key, preshared_key)
        for network in allowed_ips:
            self.allowed_ips.insert(network, peer)
        return peer

    def set_allowed_ips(self, peer: Peer, allowed_ips: Iterable[Network | str]) -> None:
        """Replace the prefixes routed to ``peer``."""
        self.allowed_ips.remove_value(peer)
        for network in allowed_ips:
            self.allowed_ips.insert(
                ip_network(network, strict=False) if isinstance(network, str) else network, peer
            )

    def remove_peer(self, public_key: bytes) -> None:
        """Forget a peer, its routes, sessions and staged packets."""
        peer = self.peers.pop(public_key, None)
        if peer is None:
            return
        self.allowed_ips.remove_value(peer)
        self._zero_keys(peer)

    # ------------------------------------------------------------------ outputs

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]:
        """Take every datagram waiting to go out: (UDP payload, destination endpoint)."""
        out = self._outbox
        self._outbox = []
        return out

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`handle_timeout` has work, or None."""
        deadline: float | None = None
        for peer in self.peers.values():
            at = peer.next_deadline()
            if at is not None and (deadline is None or at < deadline):
                deadline = at
        return deadline

    # ------------------------------------------------------------------ underlay input

    def receive_datagram(self, data: bytes | memoryview, source: Endpoint, now: float) -> bytes | None:
        """Process one UDP payload (``bytes``, or a view of the underlay's receive buffer); return the IP
        packet it carried, if any.

        Never raises for anything ``data`` contains.
        """
        try:
            if len(data) >= TRANSPORT_MIN_SIZE:
                kind, receiver, counter = _unpack_transport(data)
                if kind == MESSAGE_TRANSPORT:
                    return self._receive_transport(data, receiver, counter, source, now)
            if data.__class__ is not bytes:
                data = bytes(data)  # handshake messages are parsed and kept as bytes
            assert isinstance(data, bytes)
            kind = messages.message_type(data)
            if kind == MESSAGE_INITIATION:
                self._receive_initiation(data, source, now)
            elif kind == MESSAGE_RESPONSE:
                self._receive_response(data, source, now)
            elif kind == MESSAGE_COOKIE_REPLY:
                self._receive_cookie_reply(data, now)
            elif kind == MESSAGE_TRANSPORT:
                self._counts["drop_malformed"] += 1  # shorter than a keepalive
            else:
                self._counts["drop_unknown_type"] += 1
        except CryptoError:
            self._counts["drop_authentication"] += 1
        except ParseError:
            self._counts["drop_malformed"] += 1
        return None

    def _receive_transport(
        self, data: bytes | memoryview, receiver: int, counter: int, source: Endpoint, now: float
    ) -> bytes | None:
        # The per-packet path of every data packet: helpers are inlined on purpose.
        keypair = self._indices.get(receiver)
        if keypair.__class__ is not Keypair:
            self._counts["drop_unknown_index"] += 1
            return None
        if now - keypair.created >= REJECT_AFTER_TIME:
            self._counts["drop_expired_keypair"] += 1
            return None
        replay = keypair.replay
        # Newer than anything seen is the common case; the window decides the rest before any
        # cipher work is spent on a replay.
        if not replay.greatest < counter < REJECT_AFTER_MESSAGES and not replay.would_accept(counter):
            self._counts["drop_replay"] += 1
            return None
        try:
            ciphertext = data[16:] if data.__class__ is memoryview else memoryview(data)[16:]
            plaintext = keypair.receiver.decrypt(_pack_nonce(counter), ciphertext, None)
        except InvalidTag:
            self._counts["drop_authentication"] += 1
            return None
        if not replay.accept(counter):
            self._counts["drop_replay"] += 1
            return None
        peer = keypair.peer
        if peer.endpoint != source:
            self._roam(peer, source, now)
        peer.stats.rx_bytes += len(data)
        if keypair is peer.next:
            self._confirm_next_keypair(peer, now)
        current = peer.current
        if (
            current is not None
            and current.is_initiator
            and not peer.sent_last_minute_handshake
            and now - current.created >= _LAST_MINUTE_REKEY
        ):
            self._keep_key_fresh_receiving(peer, now)
        # Any authenticated packet: the peer is alive, so the "new handshake" timer stops.
        peer.new_handshake_at = None
        if peer.persistent_keepalive:
            peer.persistent_keepalive_at = now + peer.persistent_keepalive
        if not plaintext:
            self._counts["rx_keepalive"] += 1
            return None
        if peer.send_keepalive_at is None:
            peer.send_keepalive_at = now + KEEPALIVE_TIMEOUT
        else:
            peer.need_another_keepalive = True
        # Strip the padding and enforce cryptokey routing on the source address (whitepaper §2).
        size = len(plaintext)
        version = plaintext[0] >> 4
        if version == 4 and size >= 20:
            length = _unpack_u16(plaintext, 2)[0]
            inner_source = plaintext[12:16]
        elif version == 6 and size >= 40:
            length = _unpack_u16(plaintext, 4)[0] + 40
            inner_source = plaintext[8:24]
        else:
            self._counts["drop_inner_malformed"] += 1
            return None
        if length > size or length < 20:
            self._counts["drop_inner_malformed"] += 1
            return None
        if self.allowed_ips.lookup(inner_source) is not peer:
            self._counts["drop_source_not_allowed"] += 1
            return None
        self._rx_packets += 1
        if length == size:
            return plaintext
        # Without the padding: a copy, but the IP layer's fast path wants a bytes object (and the
        # padded packets are the short ones).
        return plaintext[:length]

    def _handshake_allowed(
        self, data: bytes, mac1_offset: int, mac2_offset: int, sender_index: int, source: Endpoint, now: float
    ) -> bool:
        """mac1 always; under load also mac2 (else a cookie reply) and a per-source rate limit."""
        if not self._cookie_checker.check_mac1(data, mac1_offset):
            self._counts["drop_bad_mac1"] += 1
            return False
        if not self._under_load(now):
            return True
        if not self._cookie_checker.check_mac2(data, mac2_offset, source, now):
            reply = self._cookie_checker.create_reply(data, mac1_offset, sender_index, source, now)
            self._outbox.append((reply.to_bytes(), source))
            self._counts["tx_cookie_reply"] += 1
            return False
        if not self._rate_limit_allows(source[0], now):
            self._counts["drop_rate_limited"] += 1
            return False
        return True

    def _under_load(self, now: float) -> bool:
        if now - self._load_window_start >= 1.0:
            self._load_window_start = now
            self._load_count = 0
        self._load_count += 1
        if self._load_count > self._under_load_threshold:
            self._under_load_until = now + UNDER_LOAD_DURATION
        return now < self._under_load_until

    def _rate_limit_allows(self, host: str, now: float) -> bool:
        tokens, last = self._rate_buckets.get(host, (RATE_LIMIT_BURST, now))
        tokens = min(RATE_LIMIT_BURST, tokens + (now - last) * RATE_LIMIT_PER_SECOND)
        if len(self._rate_buckets) >= RATE_LIMIT_MAX_SOURCES and host not in self._rate_buckets:
            # Bounded memory under a spoofed-source flood: start over rather than grow.
            self._rate_buckets.clear()
        if tokens < 1.0:
            self._rate_buckets[host] = (tokens, now)
            return False
        self._rate_buckets[host] = (tokens - 1.0, now)
        return True

    def _receive_initiation(self, data: bytes, source: Endpoint, now: float) -> None:
        message = messages.parse_initiation(data)
        if not self._handshake_allowed(
            data, INITIATION_MAC1_OFFSET, INITIATION_MAC2_OFFSET, message.sender_index, source, now
        ):
            return
        from embedmesh.wireguard import noise

        peer_public, ck, h = noise.open_initiation_static(self.identity, message)
        peer = self.peers.get(peer_public)
        if peer is None:
            self._counts["drop_unknown_peer"] += 1
            return
        consumed = noise.finish_initiation(peer.keys, message, ck, h)
        # TAI64N labels are big-endian, so byte order is time order (whitepaper §5.1).
        if consumed.timestamp <= peer.last_timestamp:
            self._counts["drop_replayed_initiation"] += 1
            return
        if now - peer.last_initiation_consumed < INITIATION_MIN_INTERVAL:
            self._counts["drop_initiation_flood"] += 1
            return
        peer.last_timestamp = consumed.timestamp
        peer.last_initiation_consumed = now
        # wireguard-go and Linux discard a handshake of their own that is in flight when the
        # peer's initiation arrives; when both sides start at once (common: both have data
        # waiting) that leaves both with an unconfirmed responder session and only retransmit
        # jitter to break the tie, which fails when the RTT exceeds the jitter. Keeping ours
        # lets its response complete it: each side then sends on the session it initiated and
        # receives on the other, which its peer keeps in `previous`.
        local_index = self._new_index()
        ephemeral = crypto.generate_private_key(self._random_bytes(32))
        response, keys = noise.create_response(consumed, peer.keys, local_index, ephemeral)
        keypair = Keypair(
            peer,
            keys.send_key,
            keys.receive_key,
            is_initiator=False,
            local_index=local_index,
            remote_index=consumed.sender_index,
            created=now,
        )
        # The responder may not send with the new keypair until the initiator's first packet
        # proves it derived the same keys, so it waits in `next`.
        self._release(peer.next)
        self._release(peer.previous)
        peer.previous = None
        peer.next = keypair
        self._indices[local_index] = keypair
        if peer.endpoint != source:
            self._roam(peer, source, now)
        self._session_derived(peer, now)
        # The answer goes where the peer's packets go; with no path chosen yet (the path layer
        # has not proven one), back to where the initiation came from.
        self._send_handshake_message(
            peer, response.to_bytes(), RESPONSE_MAC1_OFFSET, now, to=peer.endpoint or source
        )
        self._counts["rx_initiation"] += 1

    def _receive_response(self, data: bytes, source: Endpoint, now: float) -> None:
        message = messages.parse_response(data)
        if not self._handshake_allowed(
            data, RESPONSE_MAC1_OFFSET, RESPONSE_MAC2_OFFSET, message.sender_index, source, now
        ):
            return
        entry = self._indices.get(message.receiver_index)
        if not isinstance(entry, tuple):
            self._counts["drop_unknown_index"] += 1
            return
        peer, state = entry
        if peer.handshake is not state:
            self._counts["drop_stale_response"] += 1
            return
        from embedmesh.wireguard import noise

        keys = noise.consume_response(self.identity, peer.keys, state, message)
        keypair = Keypair(
            peer,
            keys.send_key,
            keys.receive_key,
            is_initiator=True,
            local_index=state.local_index,
            remote_index=message.sender_index,
            created=now,
        )
        peer.handshake = None
        self._indices[state.local_index] = keypair
        # Initiator: the new keypair is usable at once. A pending `next` (we were also responder)
        # becomes `previous` so packets sent with it are still accepted.
        if peer.next is not None:
            self._release(peer.previous)
            self._release(peer.current)
            peer.previous = peer.next
            peer.next = None
        else:
            self._release(peer.previous)
            peer.previous = peer.current
        peer.current = keypair
        if peer.endpoint != source:
            self._roam(peer, source, now)
        self._session_derived(peer, now)
        self._handshake_complete(peer, now)
        self._touch_persistent_keepalive(peer, now)
        self._counts["rx_response"] += 1
        # Confirm the session to the responder right away, with data if any is waiting.
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now)

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        reply = messages.parse_cookie_reply(data)
        entry = self._indices.get(reply.receiver_index)
        if entry is None:
            self._counts["drop_unknown_index"] += 1
            return
        peer = entry.peer if isinstance(entry, Keypair) else entry[0]
        peer.cookies.consume_reply(reply, now)
        self._counts["rx_cookie_reply"] += 1

    # ------------------------------------------------------------------ overlay input

    def send_packet(self, packet: bytes | memoryview, now: float) -> bool:
        """Route an IP packet by its destination (cryptokey routing) and send it.

        Returns False when no peer's allowed IPs contain the destination; the packet is dropped.
        Without a valid session the packet waits while a handshake runs.
        """
        size = len(packet)
        if not size:
            return False
        version = packet[0] >> 4
        if version == 4 and size >= 20:
            destination = packet[16:20]
        elif version == 6 and size >= 40:
            destination = packet[24:40]
        else:
            self._counts["drop_outbound_malformed"] += 1
            return False
        if destination.__class__ is not bytes:
            destination = bytes(destination)
        peer = self.allowed_ips.lookup(destination)
        if peer is None:
            self._counts["drop_no_route"] += 1
            return False
        self.send_to_peer(peer, packet, now)
        return True

    def send_to_peer(self, peer: Peer, packet: bytes | memoryview, now: float) -> None:
        """Send ``packet`` to ``peer`` (an empty packet is a keepalive)."""
        if now >= peer.note_send_at and self.on_send is not None:
            peer.note_send_at = now + NOTE_SEND_INTERVAL
            self.on_send(peer, now)
        keypair = peer.current
        if (
            keypair is not None
            and not peer.staged
            and peer.endpoint is not None
            and now - keypair.created < REJECT_AFTER_TIME
            and keypair.send_counter < REJECT_AFTER_MESSAGES
        ):
            # The common case, inlined: a live session and nothing queued before this packet.
            self._encrypt(peer, keypair, packet, now)
            if keypair.is_initiator and (
                keypair.send_counter > REKEY_AFTER_MESSAGES or now - keypair.created >= REKEY_AFTER_TIME
            ):
                self._keep_key_fresh_sending(peer, keypair, now)
            return
        if len(peer.staged) == peer.staged.maxlen:
            self._counts["drop_staged_overflow"] += 1
        peer.staged.append(packet)
        self._send_staged(peer, now)

    def set_endpoint(self, peer: Peer, endpoint: Endpoint | None, now: float) -> None:
        """Send the peer's packets to ``endpoint`` from now on (the path layer's decision).

        Packets that waited for a path go out at once, and a handshake that had nowhere to go is
        sent now rather than at its retransmit timer.
        """
        had_none = peer.endpoint is None
        peer.endpoint = endpoint
        if endpoint is None:
            return
        if peer.handshake is not None or (had_none and peer.retransmit_handshake_at is not None):
            # The initiation in flight went elsewhere (or nowhere): send one the new way.
            self.hurry_handshake(peer, now)
        elif peer.staged:
            self._send_staged(peer, now)

    def _roam(self, peer: Peer, source: Endpoint, now: float) -> None:
        """An authenticated packet of ``peer`` came from ``source``, not its endpoint."""
        on_source = self.on_source
        if on_source is None:
            peer.endpoint = source  # WireGuard's roaming
        else:
            on_source(peer, source, now)

    def send_keepalive(self, peer: Peer, now: float) -> None:
        """Send an empty transport message (only if nothing else is waiting to carry the same news)."""
        if not peer.staged:
            self.send_to_peer(peer, b"", now)

    def initiate_handshake(self, peer: Peer, now: float) -> None:
        """Start a handshake with ``peer`` now (normally the device decides when)."""
        self._initiate(peer, now, retry=False)

    def hurry_handshake(self, peer: Peer, now: float) -> None:
        """Resend a handshake in flight now instead of at its retransmit timer.

        For a peer that just proved it can reach us (a Tailscale client's disco ping): its answer
        to our last initiation was likely lost for want of a path, and now it has one.
        """
        if peer.handshake_attempts >= MAX_HANDSHAKE_ATTEMPTS:
            return
        if peer.handshake is None and peer.retransmit_handshake_at is None:
            return
        if now - peer.last_initiation_sent < HURRY_MIN_INTERVAL:
            # Not at once after the last initiation: the peer's flood guard (one per 20 ms, and
            # timestamps whitened to 16 ms) would drop a second one that close, with any jitter,
            # and a new initiation discards the last one's state, so the answer to it that may
            # still be on its way would be refused. Send it from the retransmit timer instead.
            at = peer.last_initiation_sent + HURRY_MIN_INTERVAL
            if peer.retransmit_handshake_at is None or peer.retransmit_handshake_at > at:
                peer.retransmit_handshake_at = at
            return
        peer.handshake_attempts += 1
        self._counts["handshake_hurried"] += 1
        self._initiate(peer, now, retry=True)

    # ------------------------------------------------------------------ time

    def handle_timeout(self, now: float) -> None:
        """Fire every peer timer that is due at ``now``."""
        for peer in list(self.peers.values()):
            at = peer.retransmit_handshake_at
            if at is not None and at <= now:
                peer.retransmit_handshake_at = None
                self._retransmit_handshake(peer, now)
            at = peer.send_keepalive_at
            if at is not None and at <= now:
                peer.send_keepalive_at = None
                self.send_keepalive(peer, now)
                if peer.need_another_keepalive:
                    peer.need_another_keepalive = False
                    peer.send_keepalive_at = now + KEEPALIVE_TIMEOUT
            at = peer.new_handshake_at
            if at is not None and at <= now:
                # We sent data and heard nothing for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (§6.5).
                peer.new_handshake_at = None
                self._counts["handshake_for_silence"] += 1
                self._initiate(peer, now, retry=False)
            at = peer.zero_keys_at
            if at is not None and at <= now:
                peer.zero_keys_at = None
                self._zero_keys(peer)
            at = peer.persistent_keepalive_at
            if at is not None and at <= now:
                peer.persistent_keepalive_at = None
                self.send_keepalive(peer, now)

    # ------------------------------------------------------------------ internals

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._random_bytes(4), "little")
            if index not in self._indices:
                return index

    def _release(self, keypair: Keypair | None) -> None:
        if keypair is not None and self._indices.get(keypair.local_index) is keypair:
            del self._indices[keypair.local_index]

    def _drop_handshake(self, peer: Peer) -> None:
        state = peer.handshake
        if state is not None:
            entry = self._indices.get(state.local_index)
            if isinstance(entry, tuple) and entry[1] is state:
                del self._indices[state.local_index]
            peer.handshake = None

    def _zero_keys(self, peer: Peer) -> None:
        for keypair in peer.keypairs():
            self._release(keypair)
        peer.current = peer.previous = peer.next = None
        self._drop_handshake(peer)

    def _confirm_next_keypair(self, peer: Peer, now: float) -> None:
        """The initiator used the session we answered: promote it (wireguard-go's ReceivedWithKeypair)."""
        self._release(peer.previous)
        peer.previous = peer.current
        peer.current = peer.next
        peer.next = None
        self._handshake_complete(peer, now)
        if peer.staged:
            self._send_staged(peer, now)

    def _session_derived(self, peer: Peer, now: float) -> None:
        peer.zero_keys_at = now + REJECT_AFTER_TIME * 3
        peer.sent_last_minute_handshake = False

    def _handshake_complete(self, peer: Peer, now: float) -> None:
        peer.retransmit_handshake_at = None
        peer.handshake_attempts = 0
        peer.stats.last_handshake = now
        peer.stats.handshakes_completed += 1

    def _touch_persistent_keepalive(self, peer: Peer, now: float) -> None:
        if peer.persistent_keepalive:
            peer.persistent_keepalive_at = now + peer.persistent_keepalive

    def _keep_key_fresh_sending(self, peer: Peer, keypair: Keypair, now: float) -> None:
        if keypair.is_initiator and (
            keypair.send_counter > REKEY_AFTER_MESSAGES or now - keypair.created >= REKEY_AFTER_TIME
        ):
            self._initiate(peer, now, retry=False)

    def _keep_key_fresh_receiving(self, peer: Peer, now: float) -> None:
        # The initiator rekeys shortly before the session would be rejected even if it only
        # receives (§6.2), once per session.
        keypair = peer.current
        if (
            keypair is not None
            and keypair.is_initiator
            and not peer.sent_last_minute_handshake
            and now - keypair.created >= REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
        ):
            peer.sent_last_minute_handshake = True
            self._initiate(peer, now, retry=False)

    def _send_staged(self, peer: Peer, now: float) -> None:
        keypair = peer.current
        if (
            keypair is None
            or peer.endpoint is None
            or now - keypair.created >= REJECT_AFTER_TIME
            or keypair.send_counter >= REJECT_AFTER_MESSAGES
        ):
            self._initiate(peer, now, retry=False)
            return
        staged = peer.staged
        while staged:
            self._encrypt(peer, keypair, staged.popleft(), now)
        self._keep_key_fresh_sending(peer, keypair, now)

    def _encrypt(self, peer: Peer, keypair: Keypair, packet: bytes | memoryview, now: float) -> None:
        counter = keypair.send_counter
        keypair.send_counter = counter + 1
        length = len(packet)
        if length & 15:
            # Pad to a multiple of 16 without exceeding the MTU (whitepaper §5.4.6).
            padded = min(length + 16 - (length & 15), max(self.mtu, length))
            plaintext = bytes(packet) + _PADDING[: padded - length] if padded != length else packet
        else:
            plaintext = packet
        datagram = _pack_transport(MESSAGE_TRANSPORT, keypair.remote_index, counter) + keypair.sender.encrypt(
            _pack_nonce(counter), plaintext, None
        )
        self._outbox.append((datagram, peer.endpoint))  # type: ignore[arg-type]
        peer.stats.tx_bytes += len(datagram)
        # Timers (wireguard-go's timersAnyAuthenticatedPacketSent/Traversal, timersDataSent).
        peer.send_keepalive_at = None
        if length:
            self._tx_packets += 1
            if peer.new_handshake_at is None:
                peer.new_handshake_at = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
        else:
            self._counts["tx_keepalive"] += 1
        if peer.persistent_keepalive:
            peer.persistent_keepalive_at = now + peer.persistent_keepalive

    def _jitter(self) -> float:
        return self._rng.uniform(0.0, REKEY_TIMEOUT_JITTER)

    def _initiate(self, peer: Peer, now: float, *, retry: bool) -> None:
        if not retry:
            if peer.handshake is not None and now - peer.last_initiation_sent < REKEY_TIMEOUT:
                return  # one handshake in flight is enough; its retransmit timer is armed
            if now - peer.last_initiation_sent < REKEY_TIMEOUT:
                return
            peer.handshake_attempts = 0
        if peer.endpoint is None:
            self._counts["handshake_no_endpoint"] += 1
            # Keep the retransmit timer running so the handshake starts once an endpoint is known.
            peer.retransmit_handshake_at = now + REKEY_TIMEOUT + self._jitter()
            return
        from embedmesh.wireguard import noise

        self._drop_handshake(peer)
        local_index = self._new_index()
        ephemeral = crypto.generate_private_key(self._random_bytes(32))
        timestamp = crypto.tai64n(now + self._wall_clock_offset)
        message, state = noise.create_initiation(
            self.identity, peer.keys, local_index, ephemeral, timestamp, now
        )
        peer.handshake = state
        self._indices[local_index] = (peer, state)
        peer.last_initiation_sent = now
        self._send_handshake_message(peer, message.to_bytes(), INITIATION_MAC1_OFFSET, now)
        peer.retransmit_handshake_at = now + REKEY_TIMEOUT + self._jitter()
        self._counts["tx_initiation"] += 1

    def _send_handshake_message(
        self, peer: Peer, message: bytes, mac1_offset: int, now: float, *, to: Endpoint | None = None
    ) -> None:
        sealed = peer.cookies.seal(message[: mac1_offset + 32], mac1_offset, now)
        self._outbox.append((sealed, to or peer.endpoint))  # type: ignore[arg-type]
        peer.stats.tx_bytes += len(sealed)
        peer.send_keepalive_at = None
        if peer.persistent_keepalive:
            peer.persistent_keepalive_at = now + peer.persistent_keepalive

    def _retransmit_handshake(self, peer: Peer, now: float) -> None:
        if peer.handshake_attempts >= MAX_HANDSHAKE_ATTEMPTS:
            # REKEY_ATTEMPT_TIME has passed: give up and drop what waited for this handshake.
            self._counts["handshake_gave_up"] += 1
            peer.staged.clear()
            peer.send_keepalive_at = None
            self._drop_handshake(peer)
            if peer.zero_keys_at is None:
                peer.zero_keys_at = now + REJECT_AFTER_TIME * 3
            return
        peer.handshake_attempts += 1
        self._counts["handshake_retransmit"] += 1
        self._initiate(peer, now, retry=True)
