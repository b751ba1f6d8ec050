"""TcpLayer: demultiplexing, listeners, ports, change notification, timer heap, bad input."""

from __future__ import annotations

import errno
import random

import pytest
from tcp_harness import LOCAL, LOCAL_PORT, REMOTE, REMOTE_ISS, Harness

from embedmesh.netstack.tcp import TcpConfig, TcpConnection, TcpLayer, TcpState
from embedmesh.wire.tcp import ACK, PSH, SYN, build_tcp

R1 = REMOTE_ISS + 1


def test_listen_errors_and_port_zero() -> None:
    h = Harness()
    h.layer.listen(None, 80)
    with pytest.raises(OSError) as err:
        h.layer.listen(None, 80)
    assert err.value.errno == errno.EADDRINUSE
    listener = h.layer.listen(LOCAL, 0)
    assert 49152 <= listener.port <= 65535
    with pytest.raises(ValueError):
        h.layer.listen(b"\x01", 81)


def test_specific_address_listener_wins_over_wildcard() -> None:
    h = Harness()
    wildcard = h.layer.listen(None, 80)
    specific = h.layer.listen(LOCAL, 80)
    h.send(0.0, SYN, REMOTE_ISS)
    assert specific.pending == 1 and wildcard.pending == 0


def test_connect_picks_distinct_ephemeral_ports() -> None:
    layer = TcpLayer(
        lambda s, d, seg: None, rng=random.Random(3), config=TcpConfig(ephemeral_ports=(50000, 50003))
    )
    ports = {layer.connect(LOCAL, REMOTE, 80, 0.0).local_port for _ in range(4)}
    assert ports == {50000, 50001, 50002, 50003}
    with pytest.raises(OSError) as err:
        layer.connect(LOCAL, REMOTE, 80, 0.0)
    assert err.value.errno == errno.EADDRNOTAVAIL
    layer.connect(LOCAL, REMOTE, 81, 0.0)  # another destination: the ports are free again
    with pytest.raises(ValueError):
        layer.connect(LOCAL, bytes(16), 80, 0.0)


def test_changes_are_reported_without_scanning() -> None:
    h = Harness(timestamps=False, sack=False, window_scaling=False)
    seen: list[object] = []
    conn, synack = h.accept()
    conn.on_change = seen.append
    h.layer.pop_changed()
    h.send(1.0, ACK | PSH, R1, synack.seq + 1, payload=b"data")
    assert h.layer.pop_changed() == {conn} and seen == [conn]
    assert h.layer.pop_changed() == set()
    h.send(1.1, ACK, R1 + 4, synack.seq + 1)  # nothing new for the application
    assert h.layer.pop_changed() == set()


def test_bad_input_is_counted_never_raised() -> None:
    h = Harness()
    h.layer.listen(None, LOCAL_PORT)
    h.layer.segment_received(REMOTE, LOCAL, b"\x00" * 5, 0.0)
    h.layer.segment_received(b"\x01\x02", LOCAL, b"\x00" * 40, 0.0)
    bad = bytearray(build_tcp(REMOTE, LOCAL, 1, LOCAL_PORT, 1, 0, SYN, 100))
    bad[-1] ^= 1
    h.layer.segment_received(REMOTE, LOCAL, bytes(bad), 0.0)
    h.layer.segment_received(REMOTE, LOCAL, build_tcp(REMOTE, LOCAL, 0, LOCAL_PORT, 1, 0, SYN, 100), 0.0)
    assert h.layer.counters["rx_malformed"] == 2
    assert h.layer.counters["rx_bad_address"] == 1 and h.layer.counters["rx_port_zero"] == 1
    h.recv_none()


def test_timer_heap_touches_only_due_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(timestamps=False, sack=False, window_scaling=False, nodelay=True)
    listener = h.layer.listen(None, LOCAL_PORT, 1000)
    conns = []
    for i in range(300):
        h.send(0.0, SYN, REMOTE_ISS, sport=20000 + i)
        synack = h.recv_one()
        h.send(0.0, ACK, R1, synack.seq + 1, sport=20000 + i)
        conn = listener.accept()
        assert conn is not None
        conns.append(conn)
    assert h.layer.next_deadline() is None
    conns[123].send(b"x", now=1.0)  # one connection has data in flight: its RTO is the only timer
    h.recv()
    assert h.layer.next_deadline() == pytest.approx(1.2)
    calls: list[TcpConnection] = []
    original = TcpConnection._on_timer

    def spy(self: TcpConnection, now: float) -> None:
        calls.append(self)
        original(self, now)

    monkeypatch.setattr(TcpConnection, "_on_timer", spy)
    h.tick(1.2)
    assert calls == [conns[123]]
    assert h.recv_one().seq == conns[123].snd_una


def test_time_wait_reuse_by_newer_syn() -> None:
    """RFC 6191: a SYN with a newer timestamp may take over a 4-tuple in TIME-WAIT."""
    h = Harness()
    conn, synack = h.accept(timestamp=(100, 0))
    una = synack.seq + 1
    h.send(1.0, ACK, R1, una, timestamp=(200, 0))
    h.recv()
    conn.close(now=1.0)
    fin = h.recv_one()
    assert fin.timestamp is not None
    h.send(1.1, ACK | 1, R1, una + 1, timestamp=(300, fin.timestamp[0]))  # FIN|ACK
    h.recv()
    assert conn.state is TcpState.TIME_WAIT
    h.send(2.0, SYN, R1 + 100_000, timestamp=(50, 0))  # older timestamp: not a new incarnation
    assert conn.state is TcpState.TIME_WAIT
    h.recv()
    h.send(2.0, SYN, R1 + 100_000, timestamp=(400, 0))
    synack2 = h.recv_one()
    assert synack2.flags == SYN | ACK and synack2.ack == (R1 + 100_001) & 0xFFFFFFFF
    assert conn.state is TcpState.CLOSED and h.layer.counters["time_wait_reused"] == 1


def test_listener_close_resets_pending_and_queued() -> None:
    h = Harness(syn_cookies=False)
    listener = h.layer.listen(None, LOCAL_PORT, 4)
    h.send(0.0, SYN, REMOTE_ISS, sport=1111)
    h.recv()
    listener.close(now=0.5)
    assert h.recv_one().flags & 0x04  # the half-open connection is reset
    assert h.layer.connection_count == 0
    h.send(1.0, SYN, REMOTE_ISS, sport=2222)
    assert h.recv_one().flags & 0x04  # RST: nobody listens any more


def test_syn_cookie_connection_carries_options() -> None:
    h = Harness(syn_backlog=1)
    listener = h.layer.listen(None, LOCAL_PORT, 8)
    h.send(0.0, SYN, REMOTE_ISS, sport=1000)  # fills the backlog
    h.recv()
    h.send(0.0, SYN, 5000, sport=1001, mss=1400, wscale=3, sack_permitted=True, timestamp=(77, 0))
    synack = h.recv_one()
    assert h.layer.counters["syn_cookies_sent"] == 1 and synack.timestamp is not None
    h.send(0.1, ACK, 5001, synack.seq + 1, sport=1001, window=100, timestamp=(78, synack.timestamp[0]))
    conn = listener.accept()
    assert conn is not None and conn.state is TcpState.ESTABLISHED
    assert conn.snd_wnd == 800 and conn._sack_ok and conn.mss == 1240 - 12
    h.send(0.2, ACK | PSH, 5001, synack.seq + 1, sport=1001, payload=b"hi", timestamp=(79, 0))
    assert conn.receive() == b"hi"
    # A forged cookie gets a reset.
    h.send(0.3, ACK, 9001, 12345, sport=1002)
    assert h.recv()[-1].flags & 0x04
