"""A STUN server host for :class:`~embedmesh.sim.network.SimNetwork`: the real sans-IO responder
(:class:`embedmesh.tailscale.stunserver.StunResponder`, what the DERP servers run beside the relay)
answering every Binding request with the source it saw, so a node behind NATs learns its
outermost mapping."""

from __future__ import annotations

from collections import Counter

from embedmesh.tailscale.stunserver import StunResponder

Endpoint = tuple[str, int]


class SimStunServer:
    """STUN on one simulated endpoint; :attr:`counters` are the responder's."""

    def __init__(self, responder: StunResponder | None = None) -> None:
        self.responder = responder if responder is not None else StunResponder()
        self._out: list[tuple[bytes, Endpoint]] = []

    @property
    def counters(self) -> Counter[str]:
        return self.responder.counters

    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> None:
        answer = self.responder.answer(data, source)
        if answer is not None:
            self._out.append((answer, source))

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]:
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        return None

    def handle_timeout(self, now: float) -> None:
        return None


__all__ = ["SimStunServer"]
