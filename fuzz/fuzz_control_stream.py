"""Fuzz target: the coordinator's stream messages (``parse_server_message``) and delta application.

The control server's map fan-out queues these JSON messages per node stream and
:mod:`embedmesh.control.tsapi` parses them back to render Tailscale's MapResponses. Only
ParseError subclasses may escape; a message that parses must survive re-encoding unchanged, and a
delta applied to a small map either applies or raises NetmapDesyncError (a ParseError).
"""

from __future__ import annotations

import sys

from embedmesh.control.messages import DeltaMessage, encode_server_message, parse_server_message
from embedmesh.control.netmap import NetworkMap, PeerInfo
from embedmesh.errors import ParseError

BASE_MAP = NetworkMap(
    PeerInfo(1, bytes(32), bytes(32), "self", "self", "self.mesh.internal", (), ()),
    {2: PeerInfo(2, bytes([2]) * 32, bytes(32), "peer", "peer", "peer.mesh.internal", (), ())},
)


def TestOneInput(data: bytes) -> None:
    try:
        message = parse_server_message(data)
        assert parse_server_message(encode_server_message(message)) == message
        if isinstance(message, DeltaMessage):
            BASE_MAP.apply(message.delta)
    except ParseError:
        pass


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)
