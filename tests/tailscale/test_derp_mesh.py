"""Meshed DERP regions in the sans-IO relay core: mesh keys, watchers, forwarders, ClosePeer, and
the ``--mesh-with`` / mesh-key formats (derper's)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedmesh.tailscale import derp
from embedmesh.tailscale.derpmesh import MeshPeer, parse_mesh_with
from embedmesh.tailscale.keys import NodePrivate, NodePublic

MESH_KEY = bytes(range(100, 132))
SERVER_A = NodePrivate.generate(bytes(range(32))).public()
SERVER_B = NodePrivate.generate(bytes(range(3, 35))).public()
ALICE = NodePrivate.generate(bytes(range(1, 33))).public()
BOB = NodePrivate.generate(bytes(range(2, 34))).public()
CAROL = NodePrivate.generate(bytes(range(4, 36))).public()
DISCO = b"TS\xf0\x9f\x92\xac" + bytes(32 + 24) + b"box"
MESH_INFO = derp.ClientInfo(mesh_key=MESH_KEY)
HERE = (ipaddress.ip_address("192.0.2.7"), 4242)


def _core(server: NodePublic = SERVER_A) -> derp.RelayCore:
    return derp.RelayCore(mesh_key=MESH_KEY, server_key=server)


def _parse(data: bytes) -> list[derp.Frame | None]:
    return [derp.parse_client_frame(t, p) for t, p in derp.FrameReader(derp.MAX_SERVER_FRAME).feed(data)]


def test_only_the_mesh_key_makes_a_mesh_peer() -> None:
    core = _core()
    assert core.register(SERVER_B, MESH_INFO).can_mesh
    assert not core.register(BOB, derp.ClientInfo()).can_mesh
    assert not core.register(CAROL, derp.ClientInfo(mesh_key=bytes(31) + b"\x01")).can_mesh
    # A server without a mesh key (or with the all-zero one, Go's "none") has no mesh peers.
    assert not derp.RelayCore().register(SERVER_B, MESH_INFO).can_mesh
    assert not derp.RelayCore(mesh_key=bytes(32)).register(SERVER_B, derp.ClientInfo(mesh_key=bytes(32))).can_mesh
    with pytest.raises(ValueError):
        derp.RelayCore(mesh_key=b"short")


def test_mesh_frames_from_a_regular_client_end_its_connection() -> None:
    core = _core()
    bob = core.register(BOB, derp.ClientInfo())
    with pytest.raises(derp.DerpError, match="mesh key"):
        core.add_watcher(bob)
    with pytest.raises(derp.DerpError, match="mesh key"):
        core.forward(bob, ALICE, CAROL, b"x", now=0.0)
    with pytest.raises(derp.DerpError, match="mesh key"):
        core.close_peer(bob, ALICE)
    assert core.watchers == set()


def test_a_watcher_hears_every_connection_and_the_last_disconnection() -> None:
    core = _core()
    alice = core.register(ALICE, derp.ClientInfo(), HERE)
    prober = core.register(CAROL, derp.ClientInfo(is_prober=True))
    peer = core.register(SERVER_B, MESH_INFO)
    assert core.add_watcher(peer)
    first = peer.take_frames()
    assert derp.PeerPresent(ALICE, HERE[0], HERE[1], derp.PeerPresentFlags.REGULAR) in first
    assert derp.PeerPresent(CAROL, ipaddress.IPv6Address(0), 0, derp.PeerPresentFlags.PROBER) in first
    assert derp.PeerPresent(SERVER_B, ipaddress.IPv6Address(0), 0, derp.PeerPresentFlags.MESH_PEER) in first
    assert len(first) == 3
    assert not core.add_watcher(peer)  # a second WatchConns changes nothing
    # A duplicate connection is announced too; only the key's last disconnection is a PeerGone.
    alice2 = core.register(ALICE, derp.ClientInfo())
    assert peer.take_frames() == [derp.PeerPresent(ALICE, ipaddress.IPv6Address(0), 0, derp.PeerPresentFlags.REGULAR)]
    assert core.unregister(alice) == []
    assert peer.take_frames() == []
    assert core.unregister(alice2) == [peer]
    assert peer.take_frames() == [derp.PeerGone(ALICE, derp.PeerGoneReason.DISCONNECTED)]
    # The wire form is Go's: key, IPv4-mapped IPv6 address, port, flags (51 bytes).
    wire = derp.encode_frame(alice.present_frame())
    assert wire[:5] == b"\x09\x00\x00\x00\x33" and wire[-3:] == b"\x10\x92\x01"
    core.unregister(prober)
    core.unregister(peer)
    assert core.watchers == set()


def test_a_server_watching_itself_is_ignored() -> None:
    core = _core()
    core.register(ALICE, derp.ClientInfo())
    me = core.register(SERVER_A, MESH_INFO)
    assert not core.add_watcher(me)
    assert core.watchers == set() and me.take_frames() == []


def test_packets_for_a_key_on_another_server_are_forwarded_and_delivered_there() -> None:
    a, b = _core(SERVER_A), _core(SERVER_B)
    alice = a.register(ALICE, derp.ClientInfo())
    bob = b.register(BOB, derp.ClientInfo())
    # A's link to B: B reports Bob; A's core learns that Bob is behind the forwarder.
    to_b = derp.MeshForwarder("b")
    a.add_forwarder(BOB, to_b)
    assert a.in_region(BOB) and not a.is_connected(BOB)
    assert a.route(alice, BOB, b"hello bob", now=0.0) is to_b
    assert a.route(alice, BOB, DISCO, now=0.0) is to_b
    wire = to_b.take_data()
    assert to_b.take_data() == b""
    frames = _parse(wire)
    assert frames == [derp.ForwardPacket(ALICE, BOB, b"hello bob"), derp.ForwardPacket(ALICE, BOB, DISCO)]
    # On B the ForwardPackets arrive over A's mesh connection and reach Bob from Alice.
    a_on_b = b.register(SERVER_A, MESH_INFO)
    for frame in frames:
        assert isinstance(frame, derp.ForwardPacket)
        assert b.forward(a_on_b, frame.src, frame.dst, frame.packet, now=0.0) is bob
    assert [f.packet for f in bob.take_frames() if isinstance(f, derp.RecvPacket)] == [DISCO, b"hello bob"]
    assert (a.packets_forwarded_out, b.packets_forwarded_in) == (2, 2)
    # Bob received from Alice (a key of another server): he hears when she leaves the region.
    b.add_forwarder(ALICE, derp.MeshForwarder("a"))
    assert b.unregister(a_on_b) == []
    (fwd_a,) = b.forwarders(ALICE)
    assert b.remove_forwarder(ALICE, fwd_a) == [bob]
    assert bob.take_frames() == [derp.PeerGone(ALICE, derp.PeerGoneReason.DISCONNECTED)]


def test_a_forwarded_packet_for_an_unknown_key_is_dropped_and_never_forwarded_again() -> None:
    core = _core()
    peer = core.register(SERVER_B, MESH_INFO)
    core.add_forwarder(CAROL, derp.MeshForwarder("c"))
    assert core.forward(peer, ALICE, CAROL, b"x", now=0.0) is None
    # A disco packet earns the mesh peer (Go's choice) a rate-limited PeerGone(not here).
    assert core.forward(peer, ALICE, BOB, DISCO, now=0.0) is peer
    assert peer.take_frames() == [derp.PeerGone(BOB, derp.PeerGoneReason.NOT_HERE)]
    assert core.drops[derp.DropReason.UNKNOWN_DEST_ON_FWD] == 2
    assert all(not fwd.queue for fwd in core.forwarders(CAROL))


def test_local_connections_win_and_the_first_forwarder_is_preferred() -> None:
    core = _core()
    sender = core.register(ALICE, derp.ClientInfo())
    first, second = derp.MeshForwarder("1"), derp.MeshForwarder("2")
    core.add_forwarder(BOB, first)
    core.add_forwarder(BOB, second)
    core.add_forwarder(BOB, first)  # a repeated PeerPresent (Go's add is called per connection)
    assert core.forwarders(BOB) == [first, second]
    assert core.route(sender, BOB, b"1", now=0.0) is first
    bob = core.register(BOB, derp.ClientInfo())
    assert core.route(sender, BOB, b"2", now=0.0) is bob
    # Bob leaves this server but is still on the others: no PeerGone for those who heard from him.
    assert core.route(bob, ALICE, b"hi", now=0.0) is sender
    assert core.unregister(bob) == []
    assert core.route(sender, BOB, b"3", now=0.0) is first
    assert core.remove_forwarder(BOB, first) == []
    assert core.route(sender, BOB, b"4", now=0.0) is second
    assert core.remove_forwarder(BOB, first) == []  # stale: harmless
    assert core.remove_forwarder(BOB, second) == [sender]
    assert sender.take_frames() == [
        derp.PeerGone(BOB, derp.PeerGoneReason.DISCONNECTED),
        derp.RecvPacket(BOB, b"hi"),
    ]
    assert core.route(sender, BOB, b"5", now=0.0) is None
    assert core.drops[derp.DropReason.UNKNOWN_DEST] == 1


def test_a_broken_link_forgets_its_keys_and_its_queue() -> None:
    core = _core()
    sender = core.register(ALICE, derp.ClientInfo())
    fwd = derp.MeshForwarder("b")
    for key in (BOB, CAROL):
        core.add_forwarder(key, fwd)
    # Alice received from Bob (forwarded in over B's connection to us).
    peer = core.register(SERVER_B, MESH_INFO)
    assert core.forward(peer, BOB, ALICE, b"from bob", now=0.0) is sender
    sender.take_frames()
    assert core.route(sender, CAROL, b"queued", now=0.0) is fwd
    assert core.drop_forwarder(fwd) == [sender]
    assert sender.take_frames() == [derp.PeerGone(BOB, derp.PeerGoneReason.DISCONNECTED)]
    assert not fwd.queue and fwd.closed and not core.in_region(BOB) and not core.in_region(CAROL)
    assert core.route(sender, CAROL, b"lost", now=0.0) is None


def test_the_forward_queue_drops_from_the_head() -> None:
    core = derp.RelayCore(mesh_key=MESH_KEY, forward_queue_depth=3)
    sender = core.register(ALICE, derp.ClientInfo())
    fwd = derp.MeshForwarder("b")
    core.add_forwarder(BOB, fwd)
    for i in range(5):
        core.route(sender, BOB, bytes([i]), now=0.0)
    assert [f.packet for f in _parse(fwd.take_data()) if isinstance(f, derp.ForwardPacket)] == [b"\x02", b"\x03", b"\x04"]
    assert core.drops[derp.DropReason.QUEUE_HEAD] == 2


def test_close_peer_names_every_connection_of_the_key() -> None:
    core = _core()
    peer = core.register(SERVER_B, MESH_INFO)
    one, two = core.register(ALICE, derp.ClientInfo()), core.register(ALICE, derp.ClientInfo())
    assert core.close_peer(peer, ALICE) == [one, two]
    assert core.close_peer(peer, BOB) == []


def test_mesh_key_format_is_derpers() -> None:
    key = derp.parse_mesh_key("  " + "ab" * 32 + "\n")
    assert key == b"\xab" * 32
    assert derp.parse_mesh_key(("CD" * 32).encode()) == b"\xcd" * 32  # Go's hex decoding takes upper case too
    for bad in ("ab" * 31, "zz" * 32, "ab" * 33, "00" * 32):
        with pytest.raises(ValueError):
            derp.parse_mesh_key(bad)
    # The ClientInfo JSON carries it as Go's key.DERPMesh: 64 hex digits.
    assert derp.ClientInfo.from_json(derp.ClientInfo(mesh_key=key).to_json()).mesh_key == key


def test_mesh_with_accepts_derpers_forms_and_urls() -> None:
    assert parse_mesh_with("derp1.example.com, derp2.example.com:8443/10.0.0.2,", tls=True) == [
        MeshPeer("https://derp1.example.com/derp"),
        MeshPeer("https://derp2.example.com:8443/derp", "10.0.0.2"),
    ]
    assert parse_mesh_with("127.0.0.1:3340,[::1]:3341", tls=False) == [
        MeshPeer("http://127.0.0.1:3340/derp"),
        MeshPeer("http://[::1]:3341/derp"),
    ]
    assert parse_mesh_with("https://a.example/derp,http://b.example:80", tls=False) == [
        MeshPeer("https://a.example/derp"),
        MeshPeer("http://b.example:80/derp"),
    ]
    assert parse_mesh_with("", tls=False) == []
    for bad in ("a:b", "::1:3340", "ftp://x", "a/b/c", "a:0", "host/", "http://a:99999/derp"):
        with pytest.raises(ValueError):
            parse_mesh_with(bad, tls=False)


KEYS = [ALICE, BOB, CAROL]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("connect"), st.sampled_from(KEYS)),
        st.tuples(st.just("disconnect"), st.integers(0, 7)),
        st.tuples(st.just("present"), st.sampled_from(KEYS), st.integers(0, 1)),
        st.tuples(st.just("gone"), st.sampled_from(KEYS), st.integers(0, 1)),
        st.tuples(st.just("broken"), st.integers(0, 1)),
        st.tuples(st.just("send"), st.integers(0, 7), st.sampled_from(KEYS)),
        st.tuples(st.just("forwarded"), st.sampled_from(KEYS), st.integers(0, 7)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_routing_follows_the_region(steps: list[tuple[Any, ...]]) -> None:
    """Whatever the order of connections, PeerPresent/PeerGone and broken links: a packet goes to
    the key's local connection, else to its first live forwarder, else nowhere; PeerGone reaches
    a receiver only for a key that left the region; watchers see every key's arrival and departure."""
    core = _core()
    watcher = core.register(SERVER_B, MESH_INFO)
    core.add_watcher(watcher)
    links = [derp.MeshForwarder("0"), derp.MeshForwarder("1")]
    conns: list[derp.RelayClient] = []
    for step in steps:
        kind = step[0]
        if kind == "connect":
            conns.append(core.register(step[1], derp.ClientInfo()))
        elif kind == "disconnect" and conns:
            leaving = conns.pop(int(step[1]) % len(conns))
            for woken in core.unregister(leaving):
                assert not woken.closed
        elif kind == "present":
            if not links[step[2]].closed:
                core.add_forwarder(step[1], links[step[2]])
        elif kind == "gone":
            core.remove_forwarder(step[1], links[step[2]])
        elif kind == "broken":
            index = int(step[1])
            core.drop_forwarder(links[index])
            links[index] = derp.MeshForwarder(str(index))
        elif kind == "send" and conns:
            src = conns[int(step[1]) % len(conns)]
            dst: NodePublic = step[2]
            target = core.route(src, dst, b"p", now=0.0)
            local = core.lookup(dst)
            if local is not None:
                assert target is local and not local.closed
            elif core.forwarders(dst):
                assert target is core.forwarders(dst)[0] and not core.forwarders(dst)[0].closed
            else:
                assert target is None and not core.in_region(dst)
        elif kind == "forwarded" and conns:
            # A packet from a key of another server, forwarded in over the watcher's connection.
            dst_conn = conns[int(step[2]) % len(conns)]
            assert core.forward(watcher, step[1], dst_conn.key, b"f", now=0.0) is core.lookup(dst_conn.key)
        for conn in conns:
            for frame in conn.control:
                if isinstance(frame, derp.PeerGone) and frame.reason == derp.PeerGoneReason.DISCONNECTED:
                    assert not core.in_region(frame.key)
            conn.control.clear()
    # The watcher's frames replay to exactly the keys connected now.
    present: dict[NodePublic, int] = {}
    for frame in watcher.take_frames():
        if isinstance(frame, derp.PeerPresent):
            present[frame.key] = present.get(frame.key, 0) + 1
        elif isinstance(frame, derp.PeerGone):
            present.pop(frame.key, None)
    assert set(present) - {SERVER_B} == {c.key for c in conns}
