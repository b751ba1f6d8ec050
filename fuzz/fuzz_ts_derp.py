"""Fuzz target: DERP frames and connections (``embedmesh.tailscale.derp``).

The first byte picks the mode, the second the piece size the stream is fed in:

* 0: the rest is what a client sends to a fresh server connection (before login);
* 1: the rest follows a real login on a server connection (frames of an authenticated client),
  and every SendPacket is routed through a relay core with a second client;
* 2: the rest is what a server sends to a fresh client connection;
* 3: the rest is what a logged-in client receives;
* 4: the rest is ClientInfo JSON.

Only ParseError may escape; an unauthenticated connection never gets a client key unless its box
opened; parsed frames re-encode to frames that parse to themselves.
"""

from __future__ import annotations

import sys

from embedmesh.errors import ParseError
from embedmesh.tailscale import derp
from embedmesh.tailscale.keys import NodePrivate

SERVER = NodePrivate.generate(bytes(range(32)))
CLIENT = NodePrivate.generate(bytes(range(1, 33)))
OTHER = NodePrivate.generate(bytes(range(2, 34)))
NONCE = bytes(range(24))


def _login() -> tuple[derp.ServerConnection, derp.ClientConnection]:
    server = derp.ServerConnection(SERVER, NONCE)
    client = derp.ClientConnection(CLIENT, NONCE)
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return server, client


def _feed(side: derp.ServerConnection | derp.ClientConnection, body: bytes, piece: int) -> list[object]:
    events: list[object] = []
    for i in range(0, len(body), piece):
        events += side.receive_data(body[i : i + piece])
    return events


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, piece, body = data[0] % 5, data[1] % 64 + 1, data[2:]
    try:
        if mode == 0:
            server = derp.ServerConnection(SERVER, NONCE)
            events = _feed(server, body, piece)
            if server.client_key is not None:
                assert isinstance(events[0], derp.ClientAuthenticated)
        elif mode == 1:
            server, _ = _login()
            core = derp.RelayCore(queue_depth=4)
            assert server.client_key is not None
            me = core.register(server.client_key, derp.ClientInfo())
            peer = core.register(OTHER.public(), derp.ClientInfo())
            for event in _feed(server, body, piece):
                core.note_activity(me)
                if isinstance(event, derp.SendPacket):
                    core.route(me, event.dst, event.packet, now=0.0)
                    reparsed = derp.parse_client_frame(derp.FrameType.SEND_PACKET, derp.encode_frame(event)[5:])
                    assert reparsed == event
            assert len(peer.packets) <= 4 and len(peer.disco) <= 4
            core.unregister(me)
        elif mode == 2:
            _feed(derp.ClientConnection(CLIENT, NONCE), body, piece)
        elif mode == 3:
            _, client = _login()
            for event in _feed(client, body, piece):
                if isinstance(event, derp.PeerGone | derp.Health | derp.Restarting | derp.Pong):
                    (item,) = derp.FrameReader(derp.MAX_CLIENT_FRAME).feed(derp.encode_frame(event))
                    assert derp.parse_server_frame(*item) == event
        else:
            info = derp.ClientInfo.from_json(body)
            assert derp.ClientInfo.from_json(info.to_json()) == info
    except ParseError:
        pass


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)
