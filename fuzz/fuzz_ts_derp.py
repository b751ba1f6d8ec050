"""Fuzz target: DERP frames and connections (``embedmesh.tailscale.derp``).

The first byte picks the mode, the second the piece size the stream is fed in:

* 0: the rest is what a client sends to a fresh server connection (before login);
* 1: the rest follows a real login on a server connection (frames of an authenticated client),
  and every SendPacket is routed through a relay core with a second client; the server's fused
  per-packet path (``relay_data``) must queue the same and refuse the same;
* 2: the rest is what a server sends to a fresh client connection;
* 3: the rest is what a logged-in client receives;
* 4: the rest is ClientInfo JSON;
* 5: like 1, from a mesh peer (the login carries the mesh key): ForwardPacket, WatchConns and
  ClosePeer go through the core too, with a forwarder for a third key;
* 6: the rest is a mesh key file and a ``--mesh-with`` list (configuration: ValueError allowed).

Only ParseError may escape; an unauthenticated connection never gets a client key unless its box
opened; parsed frames re-encode to frames that parse to themselves.
"""

from __future__ import annotations

import sys

from embedmesh.errors import ParseError
from embedmesh.tailscale import derp
from embedmesh.tailscale.derpmesh import parse_mesh_with
from embedmesh.tailscale.keys import NodePrivate

SERVER = NodePrivate.generate(bytes(range(32)))
CLIENT = NodePrivate.generate(bytes(range(1, 33)))
OTHER = NodePrivate.generate(bytes(range(2, 34)))
THIRD = NodePrivate.generate(bytes(range(3, 35)))
NONCE = bytes(range(24))
MESH_KEY = bytes(range(64, 96))


def _login(info: derp.ClientInfo | None = None) -> tuple[derp.ServerConnection, derp.ClientConnection]:
    server = derp.ServerConnection(SERVER, NONCE)
    client = derp.ClientConnection(CLIENT, NONCE, info=info)
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
    mode, piece, body = data[0] % 7, data[1] % 64 + 1, data[2:]
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
            _relay_matches(body, piece)
        elif mode == 2:
            _feed(derp.ClientConnection(CLIENT, NONCE), body, piece)
        elif mode == 3:
            _, client = _login()
            for event in _feed(client, body, piece):
                if isinstance(event, derp.PeerGone | derp.Health | derp.Restarting | derp.Pong):
                    (item,) = derp.FrameReader(derp.MAX_CLIENT_FRAME).feed(derp.encode_frame(event))
                    assert derp.parse_server_frame(*item) == event
        elif mode == 4:
            info = derp.ClientInfo.from_json(body)
            assert derp.ClientInfo.from_json(info.to_json()) == info
        elif mode == 5:
            _mesh_peer(body, piece)
        else:
            _config(body)
    except ParseError:
        pass


def _relay_matches(body: bytes, piece: int) -> None:
    """The server's per-packet path (relay_data) queues what receive_data + route queue, and
    refuses the same streams."""
    cores = []
    for fast in (True, False):
        server, _ = _login()
        core = derp.RelayCore(queue_depth=4)
        assert server.client_key is not None
        me = core.register(server.client_key, derp.ClientInfo())
        peer = core.register(OTHER.public(), derp.ClientInfo())
        failed = False
        try:
            for i in range(0, len(body), piece):
                chunk = body[i : i + piece]
                if fast:
                    server.relay_data(chunk, core, me, now=0.0)
                    continue
                for event in server.receive_data(chunk):
                    if isinstance(event, derp.SendPacket):
                        core.route(me, event.dst, event.packet, now=0.0)
        except ParseError:
            failed = True
        cores.append((failed, list(peer.packets), list(peer.disco), list(me.control), core.drops))
    assert cores[0][0] == cores[1][0]
    # After a refusal the two differ by design: relay_data has routed the packets of the read
    # before the bad frame, receive_data returned nothing of it.
    assert cores[0][0] or cores[0] == cores[1]


def _mesh_peer(body: bytes, piece: int) -> None:
    server, _ = _login(derp.ClientInfo(mesh_key=MESH_KEY))
    core = derp.RelayCore(queue_depth=4, mesh_key=MESH_KEY, server_key=SERVER.public(), forward_queue_depth=4)
    assert server.client_key is not None and server.client_info is not None
    me = core.register(server.client_key, server.client_info)
    assert me.can_mesh
    peer = core.register(OTHER.public(), derp.ClientInfo())
    fwd = derp.MeshForwarder("fuzz")
    core.add_forwarder(THIRD.public(), fwd)
    for event in _feed(server, body, piece):
        core.note_activity(me)
        if isinstance(event, derp.SendPacket):
            core.route(me, event.dst, event.packet, now=0.0)
        elif isinstance(event, derp.ForwardPacket):
            target = core.forward(me, event.src, event.dst, event.packet, now=0.0)
            assert target is None or target is core.lookup(event.dst) or target is me
        elif isinstance(event, derp.WatchConns):
            core.add_watcher(me)
        elif isinstance(event, derp.ClosePeer):
            for conn in core.close_peer(me, event.key):
                assert conn.key == event.key
    assert len(peer.packets) <= 4 and len(peer.disco) <= 4 and len(fwd.queue) <= 4
    for frame in derp.FrameReader(derp.MAX_SERVER_FRAME).feed(fwd.take_data()):
        assert isinstance(derp.parse_client_frame(*frame), derp.ForwardPacket)
    core.unregister(me)
    core.drop_forwarder(fwd)
    assert not core.watchers and not core.in_region(THIRD.public())


def _config(body: bytes) -> None:
    key_text, _, mesh_with = body.partition(b"\n")
    try:
        key = derp.parse_mesh_key(key_text)
        assert len(key) == derp.MESH_KEY_LEN and any(key)
    except ValueError:
        pass
    try:
        for peer in parse_mesh_with(mesh_with.decode("utf-8", errors="replace"), tls=bool(body[:1] == b"s")):
            assert peer.url.startswith(("http://", "https://")), peer
    except ValueError:
        pass


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)
