"""Disco on the node's UDP socket, the part Tailscale's clients need before they send WireGuard.

A Tailscale client sends WireGuard to a peer's UDP endpoint only once a disco ping to it came back
as a pong (magicsock's "best address"); until then it sends through DERP. So a node that answers
disco pings from the peers in its map, with the source address it saw, is reachable directly by
tailscaled and tsnet on a flat network. This is that answering core, sans-IO: datagrams in,
replies out, randomness (the box nonces) from the caller. Pings from disco keys that are not in
the map are dropped without state, as are boxes that do not open and messages that do not parse.

Path choice (pinging peers, trust times, DERP fallback) is issue 10's path layer; it takes over
the peer table kept here.
"""

from __future__ import annotations

import ipaddress
import os
from collections import Counter
from collections.abc import Callable, Iterable

from embedmesh.tailscale import disco
from embedmesh.tailscale.keys import DiscoPrivate, DiscoPublic

Datagram = tuple[bytes, tuple[str, int]]


class DiscoResponder:
    """Answers disco pings from known peers; counts everything it drops."""

    def __init__(
        self,
        private: DiscoPrivate,
        random_bytes: Callable[[int], bytes] = os.urandom,
        on_ping: Callable[[bytes, tuple[str, int], float], None] | None = None,
    ) -> None:
        self._private = private
        self._random = random_bytes
        #: Called with (the peer's disco key, the ping's source, now) for every authentic ping.
        self.on_ping = on_ping
        self._boxes: dict[bytes, disco.DiscoBox] = {}
        self.counters: Counter[str] = Counter()

    def set_peers(self, disco_keys: Iterable[bytes]) -> None:
        """The disco keys of the peers in the map (a zero key means a peer without disco)."""
        wanted = {key for key in disco_keys if any(key)}
        for key in list(self._boxes):
            if key not in wanted:
                del self._boxes[key]
        for key in wanted - set(self._boxes):
            self._boxes[key] = disco.DiscoBox(self._private, DiscoPublic(key))

    def receive(self, datagram: bytes | memoryview, source: tuple[str, int], now: float) -> list[Datagram]:
        """One datagram that starts like disco; returns the replies to send."""
        if not disco.looks_like_disco(datagram):
            self.counters["drop_not_disco"] += 1
            return []
        box = self._boxes.get(disco.sender_of(datagram).raw)
        if box is None:
            self.counters["drop_unknown_sender"] += 1
            return []
        try:
            message = box.open(datagram)
        except disco.DiscoError:
            self.counters["drop_bad_box"] += 1
            return []
        if isinstance(message, disco.Ping):
            self.counters["pings"] += 1
            host, port = source
            observed = (ipaddress.ip_address(host.split("%", 1)[0]), port)
            pong = box.seal(disco.Pong(message.tx_id, observed), nonce=self._random(disco.NONCE_SIZE))
            if self.on_ping is not None:
                self.on_ping(disco.sender_of(datagram).raw, source, now)
            return [(pong, source)]
        self.counters["ignored_" + type(message).__name__.lower()] += 1
        return []
