"""The path core (embedmesh.paths): disco pings and pongs decide each peer's path, as magicsock does."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from embedmesh.paths import (
    DISCO_PING_INTERVAL,
    HEARTBEAT_INTERVAL,
    NO_PATH,
    PING_BACK_INTERVAL,
    PING_TIMEOUT,
    SESSION_ACTIVE_TIMEOUT,
    TRUST_UDP_ADDR_DURATION,
    Endpoint,
    Path,
    PathChanged,
    PathCore,
    PathEvent,
    PathKind,
    PingPurpose,
    PingReceived,
    better_addr,
)
from embedmesh.tailscale import disco
from embedmesh.tailscale.keys import DiscoPrivate, NodePublic

PEER_KEY = b"\x01" * 32
A: Endpoint = ("203.0.113.7", 41641)
B: Endpoint = ("198.51.100.9", 41641)
C: Endpoint = ("192.0.2.5", 41641)


class FakePeer:
    """The other side's disco: answers our pings from wherever it is, pings us."""

    def __init__(self, rng: random.Random, ours: DiscoPrivate) -> None:
        self.private = DiscoPrivate(rng.randbytes(32))
        self.box = disco.DiscoBox(self.private, ours.public())
        self.rng = rng

    @property
    def disco_key(self) -> bytes:
        return self.private.public().raw

    def answer(self, datagram: bytes, seen_source: Endpoint) -> bytes:
        message = self.box.open(datagram)
        assert isinstance(message, disco.Ping)
        observed = (ipaddress.ip_address(seen_source[0]), seen_source[1])
        return self.box.seal(disco.Pong(message.tx_id, observed), self.rng.randbytes(24))

    def ping(self, tx_id: bytes) -> bytes:
        return self.box.seal(disco.Ping(tx_id, NodePublic(PEER_KEY)), self.rng.randbytes(24))

    def call_me_maybe(self, *endpoints: Endpoint) -> bytes:
        message = disco.CallMeMaybe(tuple((ipaddress.ip_address(h), p) for h, p in endpoints))
        return self.box.seal(message, self.rng.randbytes(24))


def setup(seed: int = 1, endpoints: tuple[Endpoint, ...] = (A, B)) -> tuple[PathCore, FakePeer]:
    rng = random.Random(seed)
    ours = DiscoPrivate(rng.randbytes(32))
    core = PathCore(ours, random_bytes=rng.randbytes)
    peer = FakePeer(rng, ours)
    core.set_peer(PEER_KEY, peer.disco_key, endpoints, 0.0)
    return core, peer


def events(core: PathCore) -> list[PathEvent]:
    out = []
    while (event := core.next_event()) is not None:
        out.append(event)
    return out


def pings_to(out: list[tuple[bytes, Endpoint]], endpoint: Endpoint) -> list[bytes]:
    return [data for data, to in out if to == endpoint]


def test_no_path_until_a_pong_proves_one() -> None:
    core, peer = setup()
    assert core.send_path(PEER_KEY, 0.0) is None
    assert core.path(PEER_KEY, 0.0) == NO_PATH
    out = core.note_send(PEER_KEY, 0.0)
    assert {to for _, to in out} == {A, B}
    assert all(disco.classify(data) is disco.PacketKind.DISCO for data, _ in out)
    assert core.send_path(PEER_KEY, 0.01) is None  # pings alone prove nothing
    (ping_b,) = pings_to(out, B)
    assert core.receive_disco(peer.answer(ping_b, ("192.0.2.1", 41641)), B, 0.02) == []
    assert core.send_path(PEER_KEY, 0.02) == B
    assert core.path(PEER_KEY, 0.02) == Path(PathKind.DIRECT, B, 0.02)
    assert str(core.path(PEER_KEY, 0.02)) == "direct 198.51.100.9:41641"
    assert events(core) == [PathChanged(PEER_KEY, Path(PathKind.DIRECT, B, 0.02))]
    assert core.trusted(PEER_KEY, 0.02 + TRUST_UDP_ADDR_DURATION)
    assert not core.trusted(PEER_KEY, 0.03 + TRUST_UDP_ADDR_DURATION)


def test_pong_to_someone_elses_ping_or_forged_proves_nothing() -> None:
    core, peer = setup()
    core.note_send(PEER_KEY, 0.0)
    # A pong whose TxID we never sent.
    forged = peer.box.seal(disco.Pong(b"\x07" * 12, (ipaddress.ip_address("192.0.2.1"), 1)), b"\x00" * 24)
    core.receive_disco(forged, A, 0.01)
    assert core.send_path(PEER_KEY, 0.01) is None
    assert core.counters["drop_unknown_pong"] == 1
    # A pong sealed by a stranger's disco key.
    stranger = FakePeer(random.Random(9), DiscoPrivate(bytes(range(32))))
    core.receive_disco(stranger.box.seal(disco.Pong(b"\x07" * 12, (ipaddress.ip_address("192.0.2.1"), 1)), b"\x01" * 24), A, 0.01)
    assert core.counters["drop_unknown_sender"] == 1
    # Garbage after the magic.
    core.receive_disco(disco.MAGIC + peer.disco_key + bytes(40), A, 0.01)
    assert core.counters["drop_bad_box"] == 1
    assert core.send_path(PEER_KEY, 0.02) is None


def test_a_ping_is_answered_with_the_observed_source_and_pinged_back() -> None:
    core, peer = setup(endpoints=(A,))
    source = ("192.0.2.77", 5555)
    out = core.receive_disco(peer.ping(b"\x05" * 12), source, 1.0)
    pongs = [d for d, to in out if to == source and isinstance(peer.box.open(d), disco.Pong)]
    (pong,) = pongs
    message = peer.box.open(pong)
    assert isinstance(message, disco.Pong) and message.tx_id == b"\x05" * 12
    assert message.src == (ipaddress.ip_address("192.0.2.77"), 5555)
    # No trusted path: the source is pinged back at once (a peer-reflexive candidate).
    back = [d for d, to in out if to == source and isinstance(peer.box.open(d), disco.Ping)]
    assert len(back) == 1
    assert PingReceived(PEER_KEY, source) in events(core)
    # The same ping again (seen twice): no second pong.
    assert core.receive_disco(peer.ping(b"\x05" * 12), source, 1.1) == []
    # Its pong proves the peer-reflexive path.
    core.receive_disco(peer.answer(back[0], ("192.0.2.1", 1)), source, 1.2)
    assert core.send_path(PEER_KEY, 1.2) == source


def test_a_ping_from_an_address_we_pinged_unanswered_is_pinged_back_at_once() -> None:
    """Our ping to the peer's endpoint was dropped by its address-and-port-dependent NAT; then
    the peer's ping arrives from that endpoint (its NAT now has a mapping for us): we ping back
    now, not 5 s later, unless ours went out within PING_BACK_INTERVAL."""
    core, peer = setup(endpoints=(A,))
    assert pings_to(core.note_send(PEER_KEY, 1.0), A)  # our discovery ping, dropped by its NAT
    out = core.receive_disco(peer.ping(b"\x06" * 12), A, 1.0 + PING_BACK_INTERVAL / 2)
    assert not [d for d, to in out if to == A and isinstance(peer.box.open(d), disco.Ping)]
    out = core.receive_disco(peer.ping(b"\x07" * 12), A, 1.5)
    back = [d for d, to in out if to == A and isinstance(peer.box.open(d), disco.Ping)]
    assert len(back) == 1
    core.receive_disco(peer.answer(back[0], ("192.0.2.1", 1)), A, 1.52)
    assert core.send_path(PEER_KEY, 1.52) == A


def test_ping_timeout_drops_an_untrusted_best_path() -> None:
    core, peer = setup(endpoints=(A,))
    (ping,) = pings_to(core.note_send(PEER_KEY, 0.0), A)
    core.receive_disco(peer.answer(ping, A), A, 0.01)
    assert core.send_path(PEER_KEY, 0.01) == A
    events(core)
    # Traffic goes on; the peer stops answering. Heartbeats every 3 s ping A.
    now = 0.01
    while now < 20.0:
        deadline = core.next_deadline()
        assert deadline is not None
        now = deadline
        core.note_send(PEER_KEY, now)
        core.handle_timeout(now)
        if core.send_path(PEER_KEY, now) is None:
            break
    # Trust ran out at 6.51; the path went once a ping sent while it was untrusted timed out.
    assert TRUST_UDP_ADDR_DURATION < now <= TRUST_UDP_ADDR_DURATION + PING_TIMEOUT + HEARTBEAT_INTERVAL + 0.02
    assert events(core) == [PathChanged(PEER_KEY, NO_PATH)]


def test_heartbeats_keep_a_path_trusted_and_stop_when_idle() -> None:
    core, peer = setup(endpoints=(A,))
    (ping,) = pings_to(core.note_send(PEER_KEY, 0.0), A)
    core.receive_disco(peer.answer(ping, A), A, 0.001)
    now, sent_pings = 0.001, 0
    while now < 30.0:
        deadline = core.next_deadline()
        assert deadline is not None
        now = deadline
        core.note_send(PEER_KEY, now)
        for data, to in core.handle_timeout(now):
            sent_pings += 1
            core.receive_disco(peer.answer(data, to), to, now + 0.001)
        assert core.trusted(PEER_KEY, now)
    assert 8 <= sent_pings <= 11  # one heartbeat per 3 s (a 1 ms path is not worth upgrading)
    # No more traffic: heartbeats stop after 45 s of idleness.
    last_send = now
    while (deadline := core.next_deadline()) is not None:
        now = deadline
        for data, to in core.handle_timeout(now):
            core.receive_disco(peer.answer(data, to), to, now + 0.001)
    assert last_send + SESSION_ACTIVE_TIMEOUT <= now <= last_send + SESSION_ACTIVE_TIMEOUT + HEARTBEAT_INTERVAL + 0.1
    assert core.next_deadline() is None


def test_latency_hysteresis() -> None:
    # Within 1 % (a lone point), the current path stays.
    assert not better_addr(A, 0.0995, B, 0.100)
    assert better_addr(A, 0.090, B, 0.100)
    assert not better_addr(A, 0.100, B, 0.100)
    assert better_addr(A, 0.1, None, 0.0)
    # Address bonuses: private beats public at equal latency; loopback beats private.
    assert better_addr(("10.0.0.2", 1), 0.01, A, 0.01)
    assert better_addr(("127.0.0.1", 1), 0.01, ("10.0.0.2", 1), 0.01)
    assert better_addr(("2001:db8::1", 1), 0.01, A, 0.01)  # IPv6 gets 10


def test_a_better_pong_moves_the_path_a_slightly_better_one_does_not() -> None:
    core, peer = setup(endpoints=(A, B, C))
    out = core.note_send(PEER_KEY, 0.0)
    core.receive_disco(peer.answer(pings_to(out, A)[0], A), A, 0.100)
    core.receive_disco(peer.answer(pings_to(out, B)[0], B), B, 0.0995)  # 0.5 % faster: stays on A
    assert core.send_path(PEER_KEY, 0.1) == A
    core.receive_disco(peer.answer(pings_to(out, C)[0], C), C, 0.050)  # twice as fast: moves
    assert core.send_path(PEER_KEY, 0.1) == C
    assert [e.path.address for e in events(core) if isinstance(e, PathChanged)] == [A, C]


def test_endpoint_dropped_from_the_map_is_no_longer_the_path() -> None:
    core, peer = setup(endpoints=(A, B))
    out = core.note_send(PEER_KEY, 0.0)
    core.receive_disco(peer.answer(pings_to(out, A)[0], A), A, 0.01)
    assert core.send_path(PEER_KEY, 0.01) == A
    core.set_peer(PEER_KEY, peer.disco_key, (B,), 0.02)
    assert core.send_path(PEER_KEY, 0.02) is None
    # A late pong for a ping to A (no longer a candidate) proves nothing.
    assert core.path(PEER_KEY, 0.02).kind is PathKind.NONE


def test_call_me_maybe_counts_only_via_derp() -> None:
    core, peer = setup(endpoints=())
    cmm = peer.call_me_maybe(C)
    assert core.receive_disco(cmm, A, 0.0) == []
    assert core.counters["drop_call_me_maybe_not_via_derp"] == 1
    out = core.receive_disco(cmm, A, 0.0, via_derp=True)
    assert {to for _, to in out} == {C}


def test_wireguard_only_peer_follows_authenticated_sources() -> None:
    core = PathCore(None)
    core.set_peer(PEER_KEY, bytes(32), (A, B), 0.0)
    assert core.send_path(PEER_KEY, 0.0) == A  # the map's first endpoint
    assert core.note_send(PEER_KEY, 0.0) == []  # no disco
    core.note_wireguard(PEER_KEY, C, 1.0)
    assert core.send_path(PEER_KEY, 1.0) == C  # WireGuard's roaming
    assert [e.path.address for e in events(core) if isinstance(e, PathChanged)] == [A, C]


def test_wireguard_source_is_a_hint_for_a_disco_peer() -> None:
    core, peer = setup(endpoints=(A,))
    out = core.note_wireguard(PEER_KEY, C, 0.0)
    assert core.send_path(PEER_KEY, 0.0) is None  # not a rewrite
    (ping,) = pings_to(out, C)  # but pinged
    core.receive_disco(peer.answer(ping, C), C, 0.01)
    assert core.send_path(PEER_KEY, 0.01) == C


def test_new_disco_key_starts_over() -> None:
    core, peer = setup(endpoints=(A,))
    out = core.note_send(PEER_KEY, 0.0)
    core.receive_disco(peer.answer(pings_to(out, A)[0], A), A, 0.01)
    other = FakePeer(random.Random(5), DiscoPrivate(bytes(range(1, 33))))
    core.set_peer(PEER_KEY, other.disco_key, (A,), 1.0)
    assert core.send_path(PEER_KEY, 1.0) is None


def test_peer_reflexive_candidates_expire() -> None:
    core, peer = setup(endpoints=(A,))
    core.receive_disco(peer.ping(b"\x01" * 12), C, 0.0)
    out = core.note_send(PEER_KEY, 0.0)
    assert C in {to for _, to in out} or core.counters["tx_ping"] >= 2
    later = SESSION_ACTIVE_TIMEOUT + DISCO_PING_INTERVAL + 1
    out = core.note_send(PEER_KEY, later)
    assert {to for _, to in out} == {A}


# ---------------------------------------------------------------------- properties

ENDPOINTS = [A, B, C, ("10.0.0.2", 41641), ("127.0.0.1", 41641), ("2001:db8::1", 41641)]

step = st.one_of(
    st.tuples(st.just("send"), st.floats(0.0, 2.0)),
    st.tuples(st.just("deliver"), st.integers(0, 50), st.floats(0.0, 0.3), st.sampled_from(ENDPOINTS)),
    st.tuples(st.just("drop"), st.integers(0, 50)),
    st.tuples(st.just("forge"), st.binary(min_size=12, max_size=12), st.sampled_from(ENDPOINTS)),
    st.tuples(st.just("ping"), st.binary(min_size=12, max_size=12), st.sampled_from(ENDPOINTS)),
    st.tuples(st.just("map"), st.lists(st.sampled_from(ENDPOINTS), max_size=4)),
    st.tuples(st.just("wg"), st.sampled_from(ENDPOINTS)),
    st.tuples(st.just("timeout"), st.floats(0.0, 8.0)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=60), st.integers(0, 2**32))
def test_no_interleaving_or_loss_selects_an_unproven_path(steps: list[tuple[object, ...]], seed: int) -> None:
    """Whatever is lost, reordered, duplicated or forged, a direct path is always an address that
    answered (with the right TxID) a ping this core sent to it, and is still a candidate."""
    core, peer = setup(seed, endpoints=(A, B))
    now = 0.0
    in_flight: list[tuple[bytes, Endpoint]] = []
    proven: set[Endpoint] = set()

    def take(out: list[tuple[bytes, Endpoint]]) -> None:
        for data, to in out:
            if isinstance(peer.box.open(data), disco.Ping):
                in_flight.append((data, to))

    for s in steps:
        kind = s[0]
        if kind == "send":
            now += float(s[1])  # type: ignore[arg-type]
            take(core.note_send(PEER_KEY, now))
        elif kind == "deliver" and in_flight:
            data, to = in_flight.pop(int(s[1]) % len(in_flight))  # type: ignore[call-overload]
            in_flight.append((data, to))  # duplicates stay possible
            delay = float(s[2])  # type: ignore[arg-type]
            # The pong may come back from anywhere (NAT rewrites); what it proves is ``to``.
            source = s[3]
            assert isinstance(source, tuple)
            pong = peer.answer(data, source)
            if to in core_candidates(core):
                proven.add(to)
            take(core.receive_disco(pong, source, now + delay))
        elif kind == "drop" and in_flight:
            in_flight.pop(int(s[1]) % len(in_flight))  # type: ignore[call-overload]
        elif kind == "forge":
            tx, source = s[1], s[2]
            assert isinstance(tx, bytes) and isinstance(source, tuple)
            forged = peer.box.seal(disco.Pong(tx, (ipaddress.ip_address("192.0.2.1"), 9)), bytes(24))
            take(core.receive_disco(forged, source, now))
        elif kind == "ping":
            tx, source = s[1], s[2]
            assert isinstance(tx, bytes) and isinstance(source, tuple)
            take(core.receive_disco(peer.ping(tx), source, now))
        elif kind == "map":
            listed = s[1]
            assert isinstance(listed, list)
            core.set_peer(PEER_KEY, peer.disco_key, listed, now)
        elif kind == "wg":
            source = s[1]
            assert isinstance(source, tuple)
            take(core.note_wireguard(PEER_KEY, source, now))
        elif kind == "timeout":
            now += float(s[1])  # type: ignore[arg-type]
            take(core.handle_timeout(now))
        path = core.path(PEER_KEY, now)
        chosen = core.send_path(PEER_KEY, now)
        if path.kind is PathKind.DIRECT:
            assert path.address == chosen
            assert chosen in proven, (chosen, proven)
            assert chosen in core_candidates(core)
        else:
            assert chosen is None
        # Every event matches the path at the moment it was announced; the last one is now's.
        changes = [e for e in events(core) if isinstance(e, PathChanged)]
        if changes:
            assert changes[-1].path.address == chosen


def core_candidates(core: PathCore) -> set[Endpoint]:
    return set(core._peers[PEER_KEY].candidates)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([A, B, C]), st.floats(0.001, 0.5)), min_size=1, max_size=40))
def test_best_path_moves_only_to_a_better_address(pongs: list[tuple[Endpoint, float]]) -> None:
    """Each pong moves the path only when betterAddr says so (while trusted): equal or near-equal
    latencies never make it flap."""
    core, peer = setup(endpoints=(A, B, C))
    now = 0.0
    for endpoint, latency in pongs:
        # Ping just this endpoint (as a heartbeat/discovery would) and answer after ``latency``.
        p = core._peers[PEER_KEY]
        p.candidates[endpoint].last_ping = None
        out: list[tuple[bytes, Endpoint]] = []
        core._send_ping(p, endpoint, p.candidates[endpoint], now, PingPurpose.DISCOVERY, out)
        before, before_latency = p.best, p.best_latency
        trusted = core.trusted(PEER_KEY, now + latency)
        core.receive_disco(peer.answer(out[0][0], endpoint), endpoint, now + latency)
        after = core.send_path(PEER_KEY, now + latency)
        if before is None or not trusted:
            assert after == endpoint
        elif after != before:
            assert after == endpoint and better_addr(endpoint, latency, before, before_latency)
        else:
            assert endpoint == before or not better_addr(endpoint, latency, before, before_latency)
        now += latency


def _direct_with_derp(seed: int = 1) -> tuple[PathCore, FakePeer, Endpoint, float]:
    """A peer with a home region, proven direct on A at t=0.02; returns (core, peer, its DERP
    address, when the trust runs out)."""
    core, peer = setup(seed, endpoints=(A,))
    core.set_derp_enabled(True, 0.0)
    core.set_peer(PEER_KEY, peer.disco_key, (A,), 0.0, home_derp=1)
    derp = core.derp_address(PEER_KEY)
    assert derp is not None
    out = core.note_send(PEER_KEY, 0.0)
    assert core.send_path(PEER_KEY, 0.0) == derp and core.derp_copies == {}
    (ping_a,) = pings_to(out, A)
    core.receive_disco(peer.answer(ping_a, ("192.0.2.1", 1)), A, 0.02)
    assert core.send_path(PEER_KEY, 0.02) == A and core.derp_copies == {}
    return core, peer, derp, 0.02 + TRUST_UDP_ADDR_DURATION


def run_timers(core: PathCore, until: float) -> list[tuple[bytes, Endpoint]]:
    """Fire the core's timers up to ``until`` (answering nothing); returns what they sent."""
    out: list[tuple[bytes, Endpoint]] = []
    while (at := core.next_deadline()) is not None and at <= until:
        out += core.handle_timeout(at)
    return out


def test_an_untrusted_best_path_is_copied_to_derp_until_a_pong_proves_it_again() -> None:
    """Go's addrForSendLocked: once the trust ran out, WireGuard goes to the old path and to DERP
    (the old path may have died with a NAT mapping: nothing is lost meanwhile). Found by the
    simulator: a stream whose retransmits, spaced out beyond a 5-s NAT timeout, each found the
    direct path dead again and never got through."""
    core, peer, derp, until = _direct_with_derp()
    # No pongs come back: the heartbeats go unanswered and the trust runs out on time.
    sent = run_timers(core, until - 0.001)
    assert core.derp_copies == {}
    assert core.next_deadline() == until
    sent += run_timers(core, until)
    assert core.derp_copies == {A: derp}
    assert core.send_path(PEER_KEY, until) == A  # still used meanwhile (and still the status)
    assert core.path(PEER_KEY, until).kind is PathKind.DIRECT
    # A pong to a ping sent to A (a heartbeat, or the rediscovery once the trust is gone) proves it again.
    sent += core.note_send(PEER_KEY, until + 0.1)
    ping = pings_to(sent, A)[-1]
    core.receive_disco(peer.answer(ping, ("192.0.2.1", 1)), A, until + 0.2)
    assert core.derp_copies == {}
    assert core.trusted(PEER_KEY, until + 0.2)


def test_copies_end_when_the_dead_path_is_dropped_or_the_peer_removed() -> None:
    core, _peer, derp, until = _direct_with_derp(2)
    core.note_send(PEER_KEY, until)
    run_timers(core, until + PING_TIMEOUT + HEARTBEAT_INTERVAL)
    # A ping to the untrusted path timed out: it is dropped, DERP is the path, nothing is copied.
    later = until + PING_TIMEOUT + HEARTBEAT_INTERVAL
    assert core.path(PEER_KEY, later).kind is PathKind.DERP
    assert core.send_path(PEER_KEY, later) == derp
    assert core.derp_copies == {}
    core, _peer, derp, until = _direct_with_derp(3)
    run_timers(core, until)
    assert core.derp_copies == {A: derp}
    core.remove_peer(PEER_KEY)
    assert core.derp_copies == {}


def test_no_copies_without_derp() -> None:
    core, peer = setup(endpoints=(A,))
    (ping_a,) = pings_to(core.note_send(PEER_KEY, 0.0), A)
    core.receive_disco(peer.answer(ping_a, ("192.0.2.1", 1)), A, 0.02)
    run_timers(core, 0.02 + TRUST_UDP_ADDR_DURATION + 1.0)
    assert core.send_path(PEER_KEY, 7.0) == A and core.derp_copies == {}
    # DERP appears (the node got a DERP map) while the path is untrusted: copies start at once.
    core.set_peer(PEER_KEY, peer.disco_key, (A,), 7.0, home_derp=5)
    core.set_derp_enabled(True, 7.0)
    assert core.derp_copies == {A: core.derp_address(PEER_KEY)}
    core.set_derp_enabled(False, 7.1)
    assert core.derp_copies == {}
