"""Fuzz target: the simulator's STUN binding messages (``embedmesh.sim.stun``) and its STUN server.

Only ParseError may escape ``parse``; a parsed response re-encodes and parses to the same mapped
address; the server never raises and answers only binding requests.
"""

from __future__ import annotations

import sys

from embedmesh.errors import ParseError
from embedmesh.sim import stun
from embedmesh.tailscale import disco

SERVER = stun.StunServer()


def TestOneInput(data: bytes) -> None:
    disco.classify(data)
    SERVER.receive_datagram(data, ("198.51.100.7", 4242), 0.0)
    for reply, _ in SERVER.datagrams_to_send():
        assert stun.parse(reply).mapped == ("198.51.100.7", 4242)
    try:
        message = stun.parse(data)
    except ParseError:
        return
    if message.type == stun.BINDING_SUCCESS:
        assert message.mapped is not None
        again = stun.parse(stun.binding_response(message.tx_id, message.mapped))
        assert again.mapped == message.mapped and again.tx_id == message.tx_id
    else:
        assert stun.parse(stun.binding_request(message.tx_id)) == message


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)
