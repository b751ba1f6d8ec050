"""DERP framing, the client and server connection state machines and the relay core (sans-IO)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedmesh.errors import ParseError
from embedmesh.tailscale import derp
from embedmesh.tailscale.keys import NodePrivate, NodePublic

SERVER = NodePrivate.generate(bytes(range(32)))
ALICE = NodePrivate.generate(bytes(range(1, 33)))
BOB = NodePrivate.generate(bytes(range(2, 34)))
NONCE = bytes(range(24))
DISCO = b"TS\xf0\x9f\x92\xac" + bytes(32 + 24) + b"box"


def _login(private: NodePrivate) -> tuple[derp.ServerConnection, derp.ClientConnection]:
    server = derp.ServerConnection(SERVER, bytes(24))
    client = derp.ClientConnection(private, NONCE)
    events = client.receive_data(server.data_to_send())
    assert events == [derp.Connected(SERVER.public())]
    (auth,) = server.receive_data(client.data_to_send())
    assert auth == derp.ClientAuthenticated(private.public(), derp.ClientInfo())
    assert client.receive_data(server.data_to_send()) == [derp.ServerInfoReceived(derp.ServerInfo())]
    assert client.logged_in
    return server, client


def test_frame_layout_matches_go() -> None:
    key = ALICE.public()
    assert bytes.fromhex("44455250f09f9491") == derp.MAGIC
    assert derp.encode_frame(derp.ServerKey(key)) == b"\x01\x00\x00\x00\x28" + derp.MAGIC + key.raw
    assert derp.encode_frame(derp.SendPacket(key, b"hi")) == b"\x04\x00\x00\x00\x22" + key.raw + b"hi"
    assert derp.encode_frame(derp.KeepAlive()) == b"\x06\x00\x00\x00\x00"
    assert derp.encode_frame(derp.PeerGone(key, derp.PeerGoneReason.NOT_HERE)) == b"\x08\x00\x00\x00\x21" + key.raw + b"\x01"
    present = derp.PeerPresent(key, ipaddress.ip_address("192.0.2.1"), 443, derp.PeerPresentFlags.REGULAR)
    payload = key.raw + b"\x00" * 10 + b"\xff\xff\xc0\x00\x02\x01" + b"\x01\xbb" + b"\x01"
    assert derp.encode_frame(present) == b"\x09\x00\x00\x00\x33" + payload
    assert derp.encode_frame(derp.Restarting(1000, 5000)) == b"\x15\x00\x00\x00\x08" + struct.pack(">II", 1000, 5000)


def test_client_info_json_is_gos() -> None:
    # Go marshals ClientInfo{Version: 2, CanAckPings: true} with these names and omissions.
    assert derp.ClientInfo().to_json() == b'{"version":2,"CanAckPings":true}'
    parsed = derp.ClientInfo.from_json(b'{"VERSION":2,"canackpings":false,"appname":"x","meshKey":"' + b"ab" * 32 + b'"}')
    assert parsed == derp.ClientInfo(2, False, b"\xab" * 32, False, "x")
    with pytest.raises(derp.DerpError):
        derp.ClientInfo.from_json(b'{"version":"2"}')
    with pytest.raises(derp.DerpError):
        derp.ClientInfo.from_json(b"[1]")


def test_login_and_relay_between_two_clients() -> None:
    core = derp.RelayCore()
    s_alice, alice = _login(ALICE)
    s_bob, bob = _login(BOB)
    assert s_alice.client_key is not None and s_bob.client_key is not None
    r_alice = core.register(s_alice.client_key, derp.ClientInfo())
    r_bob = core.register(s_bob.client_key, derp.ClientInfo())

    alice.send_packet(BOB.public(), b"wireguard bytes")
    (send,) = s_alice.receive_data(alice.data_to_send())
    assert send == derp.SendPacket(BOB.public(), b"wireguard bytes")
    assert core.route(r_alice, send.dst, send.packet, now=0.0) is r_bob
    wire = b"".join(derp.encode_frame(f) for f in r_bob.take_frames())
    assert bob.receive_data(wire) == [derp.PacketReceived(ALICE.public(), b"wireguard bytes")]

    # Alice leaves: Bob, who received from her, hears PeerGone(disconnected).
    assert core.unregister(r_alice) == [r_bob]
    wire = b"".join(derp.encode_frame(f) for f in r_bob.take_frames())
    assert bob.receive_data(wire) == [derp.PeerGone(ALICE.public(), derp.PeerGoneReason.DISCONNECTED)]
    # Sending to her now is a drop, and a disco packet earns Bob a PeerGone(not here).
    assert core.route(r_bob, ALICE.public(), b"wg", now=1.0) is None
    assert core.route(r_bob, ALICE.public(), DISCO, now=1.0) is r_bob
    assert r_bob.take_frames() == [derp.PeerGone(ALICE.public(), derp.PeerGoneReason.NOT_HERE)]
    assert core.drops[derp.DropReason.UNKNOWN_DEST] == 2


def test_ping_gets_pong_both_ways() -> None:
    server, client = _login(ALICE)
    client.send_ping(b"12345678")
    assert server.receive_data(client.data_to_send()) == [derp.Ping(b"12345678")]
    assert client.receive_data(derp.encode_frame(derp.Ping(b"abcdefgh"))) == [derp.PingReceived(b"abcdefgh")]
    assert client.data_to_send() == derp.encode_frame(derp.Pong(b"abcdefgh"))
    events = client.receive_data(
        derp.encode_frame(derp.Health("bad"))
        + derp.encode_frame(derp.Restarting(10, 20))
        + derp.frame_header(0x7F, 3)
        + b"???"  # an unknown frame is skipped
        + derp.encode_frame(derp.KeepAlive())
    )
    assert events == [derp.Health("bad"), derp.Restarting(10, 20), derp.KeepAlive()]


def test_client_info_sealed_to_another_key_is_refused() -> None:
    server = derp.ServerConnection(SERVER, bytes(24))
    # Mallory names Alice's key but can only seal with her own.
    mallory = NodePrivate.generate(bytes(range(9, 41)))
    sealed = derp.seal(mallory, SERVER.public(), derp.ClientInfo().to_json(), NONCE)
    with pytest.raises(derp.DerpError):
        server.receive_data(derp.encode_frame(derp.ClientInfoFrame(ALICE.public(), sealed)))
    assert server.client_key is None


def test_server_refuses_frames_before_login_and_oversized_frames() -> None:
    server = derp.ServerConnection(SERVER, bytes(24))
    with pytest.raises(derp.DerpError):
        server.receive_data(derp.encode_frame(derp.SendPacket(BOB.public(), b"x")))
    server = derp.ServerConnection(SERVER, bytes(24))
    with pytest.raises(derp.DerpError):
        server.receive_data(derp.frame_header(derp.FrameType.CLIENT_INFO, (256 << 10) + 1))
    server, _ = _login(ALICE)
    too_big = derp.frame_header(derp.FrameType.SEND_PACKET, 32 + derp.MAX_PACKET_SIZE + 1) + bytes(32 + derp.MAX_PACKET_SIZE + 1)
    with pytest.raises(derp.DerpError):
        server.receive_data(too_big)
    with pytest.raises(ValueError):
        derp.encode_frame(derp.SendPacket(BOB.public(), bytes(derp.MAX_PACKET_SIZE + 1)))


def test_fast_start_client_logs_in_without_the_greeting() -> None:
    server = derp.ServerConnection(SERVER, bytes(24))
    client = derp.ClientConnection(ALICE, NONCE, server_key=SERVER.public())
    assert client.events() == [derp.Connected(SERVER.public())]
    (auth,) = server.receive_data(client.data_to_send())
    assert isinstance(auth, derp.ClientAuthenticated)
    assert client.receive_data(server.data_to_send()) == [derp.ServerInfoReceived(derp.ServerInfo())]
    wrong = derp.ClientConnection(ALICE, NONCE, server_key=BOB.public())
    wrong.events()
    with pytest.raises(derp.DerpError):
        wrong.receive_data(derp.encode_frame(derp.ServerKey(SERVER.public())))


def test_send_queue_drops_from_the_head_and_counts() -> None:
    core = derp.RelayCore(queue_depth=4)
    a = core.register(ALICE.public(), derp.ClientInfo())
    b = core.register(BOB.public(), derp.ClientInfo())
    for i in range(6):
        core.route(a, BOB.public(), bytes([i]), now=0.0)
    core.route(a, BOB.public(), DISCO, now=0.0)  # disco has its own queue
    frames = b.take_frames()
    assert [f.packet for f in frames if isinstance(f, derp.RecvPacket)] == [DISCO, b"\x02", b"\x03", b"\x04", b"\x05"]
    assert core.drops[derp.DropReason.QUEUE_HEAD] == 2


def test_duplicate_connections_last_writer_is_active() -> None:
    core = derp.RelayCore()
    sender = core.register(BOB.public(), derp.ClientInfo())
    first = core.register(ALICE.public(), derp.ClientInfo())
    second = core.register(ALICE.public(), derp.ClientInfo())
    assert core.route(sender, ALICE.public(), b"1", now=0.0) is second
    core.note_activity(first)
    assert core.route(sender, ALICE.public(), b"2", now=0.0) is first
    assert core.unregister(first) == []  # a connection of Alice's remains: no PeerGone
    assert core.route(sender, ALICE.public(), b"3", now=0.0) is second
    # PeerGone goes to whoever received from the leaving key (Go's sawSrc), once its last connection goes.
    assert core.route(second, BOB.public(), b"4", now=0.0) is sender
    assert core.unregister(second) == [sender]
    assert not core.is_connected(ALICE.public())


def test_peer_gone_not_here_is_rate_limited() -> None:
    core = derp.RelayCore()
    a = core.register(ALICE.public(), derp.ClientInfo())
    answers = [core.route(a, BOB.public(), DISCO, now=0.0) for _ in range(5)]
    assert answers == [a, a, a, None, None]
    assert core.route(a, BOB.public(), DISCO, now=1.0) is a


frames = st.one_of(
    st.builds(derp.SendPacket, st.binary(min_size=32, max_size=32).map(NodePublic), st.binary(max_size=200)),
    st.builds(derp.ForwardPacket, st.binary(min_size=32, max_size=32).map(NodePublic), st.binary(min_size=32, max_size=32).map(NodePublic), st.binary(max_size=200)),
    st.builds(derp.NotePreferred, st.booleans()),
    st.builds(derp.ClosePeer, st.binary(min_size=32, max_size=32).map(NodePublic)),
    st.builds(derp.Ping, st.binary(min_size=8, max_size=8)),
    st.just(derp.WatchConns()),
)
server_frames = st.one_of(
    st.builds(derp.RecvPacket, st.binary(min_size=32, max_size=32).map(NodePublic), st.binary(max_size=200)),
    st.builds(derp.PeerGone, st.binary(min_size=32, max_size=32).map(NodePublic), st.integers(0, 255)),
    st.builds(
        derp.PeerPresent,
        st.binary(min_size=32, max_size=32).map(NodePublic),
        st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None)),
        st.integers(0, 65535),
        st.integers(0, 255),
    ),
    st.builds(derp.Ping, st.binary(min_size=8, max_size=8)),
    st.builds(derp.Pong, st.binary(min_size=8, max_size=8)),
    st.builds(derp.Health, st.text(max_size=40)),
    st.builds(derp.Restarting, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.just(derp.KeepAlive()),
    st.builds(derp.ServerKey, st.binary(min_size=32, max_size=32).map(NodePublic)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(frames, max_size=6), st.integers(1, 17))
def test_client_frames_round_trip_in_pieces(sent: list[derp.Frame], piece: int) -> None:
    wire = b"".join(derp.encode_frame(f) for f in sent)
    reader = derp.FrameReader(derp.MAX_SERVER_FRAME)
    got = [derp.parse_client_frame(t, p) for i in range(0, len(wire), piece) for t, p in reader.feed(wire[i : i + piece])]
    assert got == sent


@settings(max_examples=200, deadline=None)
@given(server_frames)
def test_server_frames_round_trip(frame: derp.Frame) -> None:
    (item,) = derp.FrameReader(derp.MAX_CLIENT_FRAME).feed(derp.encode_frame(frame))
    assert derp.parse_server_frame(*item) == frame


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_garbage_raises_only_parse_errors(data: bytes, logged_in: bool) -> None:
    server = _login(ALICE)[0] if logged_in else derp.ServerConnection(SERVER, bytes(24))
    client = derp.ClientConnection(ALICE, NONCE, server_key=SERVER.public() if logged_in else None)
    for side in (server, client):
        try:
            side.receive_data(data)
        except ParseError:
            pass
    try:
        derp.ClientInfo.from_json(data)
    except ParseError:
        pass
    if not logged_in:
        assert server.client_key is None or data.startswith(b"\x02")


CAROL = NodePrivate.generate(bytes(range(5, 37)))
MESH = bytes(range(7, 39))
relay_frames = st.one_of(
    st.builds(derp.SendPacket, st.sampled_from([BOB.public(), CAROL.public(), SERVER.public()]), st.binary(max_size=90)),
    st.builds(derp.SendPacket, st.sampled_from([BOB.public(), SERVER.public()]), st.just(DISCO)),
    st.builds(derp.ForwardPacket, st.sampled_from([ALICE.public(), CAROL.public()]), st.sampled_from([BOB.public(), CAROL.public()]), st.binary(max_size=90)),
    st.builds(derp.Ping, st.binary(min_size=8, max_size=8)),
    st.builds(derp.NotePreferred, st.booleans()),
    st.just(derp.WatchConns()),
)


def _relay_setup(mesh: bool) -> tuple[derp.ServerConnection, derp.RelayCore, derp.RelayClient, derp.RelayClient, derp.MeshForwarder]:
    server = derp.ServerConnection(SERVER, bytes(24))
    client = derp.ClientConnection(ALICE, NONCE, info=derp.ClientInfo(mesh_key=MESH if mesh else None))
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    core = derp.RelayCore(queue_depth=3, mesh_key=MESH, forward_queue_depth=3)
    assert server.client_info is not None
    me = core.register(ALICE.public(), server.client_info)
    bob = core.register(BOB.public(), derp.ClientInfo())
    fwd = derp.MeshForwarder("elsewhere")
    core.add_forwarder(CAROL.public(), fwd)
    return server, core, me, bob, fwd


@settings(max_examples=300, deadline=None)
@given(st.lists(relay_frames, max_size=12), st.integers(1, 40), st.booleans())
def test_relay_data_routes_as_receive_data_and_route_do(sent: list[derp.Frame], piece: int, mesh: bool) -> None:
    """The fused per-packet path gives the same queues, drops, forwards and leftover events as
    parsing frame by frame and routing each packet through the core."""
    wire = b"".join(derp.encode_frame(f) for f in sent)
    fast_conn, fast_core, fast_me, fast_bob, fast_fwd = _relay_setup(mesh)
    ref_conn, ref_core, ref_me, ref_bob, ref_fwd = _relay_setup(mesh)
    fast_events: list[derp.ServerEvent] = []
    ref_events: list[derp.ServerEvent] = []
    woken: set[object] = set()
    for i in range(0, len(wire), piece):
        chunk = wire[i : i + piece]
        events, targets = fast_conn.relay_data(chunk, fast_core, fast_me, now=0.0)
        fast_events += events
        woken.update(targets)
        for event in ref_conn.receive_data(chunk):
            if isinstance(event, derp.SendPacket):
                ref_core.route(ref_me, event.dst, event.packet, now=0.0)
            elif isinstance(event, derp.ForwardPacket) and ref_me.can_mesh:
                ref_core.forward(ref_me, event.src, event.dst, event.packet, now=0.0)
            else:
                ref_events.append(event)
    assert fast_events == ref_events
    for fast, ref in ((fast_me, ref_me), (fast_bob, ref_bob)):
        assert (list(fast.packets), list(fast.disco), list(fast.control)) == (list(ref.packets), list(ref.disco), list(ref.control))
        assert fast.saw_src == ref.saw_src
        assert (fast in woken) == fast.pending()
    assert list(fast_fwd.queue) == list(ref_fwd.queue) and (fast_fwd in woken) == bool(fast_fwd.queue)
    assert fast_core.drops == ref_core.drops
    assert (fast_core.packets_relayed, fast_core.packets_forwarded_in, fast_core.packets_forwarded_out) == (
        ref_core.packets_relayed,
        ref_core.packets_forwarded_in,
        ref_core.packets_forwarded_out,
    )


def test_relay_data_refuses_what_receive_data_refuses() -> None:
    for bad in (
        derp.frame_header(derp.FrameType.SEND_PACKET, 31) + bytes(31),
        derp.frame_header(derp.FrameType.SEND_PACKET, derp.MAX_SERVER_FRAME + 1),
        derp.frame_header(derp.FrameType.FORWARD_PACKET, 63) + bytes(63),
        derp.frame_header(derp.FrameType.PING, 7) + bytes(7),
    ):
        for mesh in (False, True):
            conn, core, me, _, _ = _relay_setup(mesh)
            with pytest.raises(derp.DerpError):
                conn.relay_data(bad, core, me, now=0.0)
    with pytest.raises(derp.DerpError):
        derp.ServerConnection(SERVER, bytes(24)).relay_data(b"", derp.RelayCore(), derp.RelayCore().register(BOB.public(), derp.ClientInfo()), 0.0)
