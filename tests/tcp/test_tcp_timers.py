"""Timers and sending policy: delayed ACK, RTO (RFC 6298), Karn, backoff, persist, keepalive, Nagle."""

from __future__ import annotations

import pytest
from tcp_harness import REMOTE_ISS, Harness

from embedmesh.netstack.tcp import TcpState
from embedmesh.wire.tcp import ACK, PSH, RST

R1 = REMOTE_ISS + 1


def _plain(**kw: object) -> Harness:
    return Harness(timestamps=False, sack=False, window_scaling=False, **kw)  # type: ignore[arg-type]


def test_delayed_ack_timer() -> None:
    h = _plain()
    _conn, synack = h.accept()
    una = synack.seq + 1
    h.send(1.0, ACK | PSH, R1, una, payload=b"x" * 100)
    h.recv_none()
    assert h.layer.next_deadline() == pytest.approx(1.04)
    h.tick(1.039)
    h.recv_none()
    h.tick(1.04)
    ack = h.recv_one()
    assert ack.flags == ACK and ack.ack == R1 + 100


def test_ack_every_second_full_segment() -> None:
    h = _plain()
    _conn, synack = h.accept()
    una = synack.seq + 1
    h.send(1.0, ACK, R1, una, payload=b"x" * 1240)
    h.recv_none()
    h.send(1.001, ACK, R1 + 1240, una, payload=b"x" * 1240)
    assert h.recv_one().ack == R1 + 2480
    h.send(1.002, ACK, R1 + 2480, una, payload=b"x" * 1240)
    h.recv_none()


def test_out_of_order_data_is_acked_at_once() -> None:
    h = _plain()
    conn, synack = h.accept()
    h.send(1.0, ACK, R1 + 1000, synack.seq + 1, payload=b"x" * 100)
    ack = h.recv_one()
    assert ack.ack == R1 and not ack.sack_blocks  # SACK not negotiated
    h.send(1.0, ACK, R1, synack.seq + 1, payload=b"y" * 1000)
    assert h.recv_one().ack == R1 + 1100  # hole filled: ACK at once
    assert conn.receive(5000) == b"y" * 1000 + b"x" * 100


def test_delayed_ack_piggybacks_on_data() -> None:
    h = _plain(nodelay=True)
    conn, synack = h.accept()
    h.send(1.0, ACK | PSH, R1, synack.seq + 1, payload=b"ping")
    conn.send(b"pong", now=1.001)
    seg = h.recv_one()
    assert bytes(seg.payload) == b"pong" and seg.ack == R1 + 4
    h.tick(1.1)
    h.recv_none()


def _one_segment_in_flight(h: Harness, t: float = 1.0) -> tuple[object, int]:
    conn, synack = h.accept()
    una = synack.seq + 1
    conn.send(b"d" * 100, now=t)
    assert bytes(h.recv_one().payload) == b"d" * 100
    return conn, una


def test_rto_after_samples_and_restart_on_ack() -> None:
    h = _plain(nodelay=True)
    conn, synack = h.accept()
    una = synack.seq + 1
    rtt = conn.rtt  # type: ignore[attr-defined]
    rtt.srtt = None  # forget the handshake sample (taken at zero delay)
    conn.send(b"a" * 100, now=1.0)  # type: ignore[attr-defined]
    h.recv_one()
    h.send(1.3, ACK, R1, una + 100)
    # RFC 6298 §2.2: SRTT = R, RTTVAR = R/2, RTO = SRTT + 4*RTTVAR = 0.9
    assert (
        rtt.srtt == pytest.approx(0.3) and rtt.rttvar == pytest.approx(0.15) and rtt.rto == pytest.approx(0.9)
    )
    conn.send(b"b" * 100, now=2.0)  # type: ignore[attr-defined]
    h.recv_one()
    h.send(2.1, ACK, R1, una + 200)
    # §2.3: RTTVAR = 3/4*0.15 + 1/4*|0.3-0.1|, SRTT = 7/8*0.3 + 1/8*0.1
    assert rtt.rttvar == pytest.approx(0.1625) and rtt.srtt == pytest.approx(0.275)
    assert rtt.rto == pytest.approx(0.275 + 4 * 0.1625)
    # Two segments out; an ACK for the first restarts the timer (§5.3, smoltcp #949).
    conn.send(b"c" * 100, now=3.0)  # type: ignore[attr-defined]
    conn.send(b"d" * 100, now=3.0)  # type: ignore[attr-defined]
    assert len(h.recv()) == 2
    rto = rtt.rto
    h.send(3.0 + rto - 0.01, ACK, R1, una + 300)
    h.tick(3.0 + rto + 0.001)
    h.recv_none()
    h.tick(3.0 + rto - 0.01 + rtt.rto)
    seg = h.recv_one()
    assert seg.seq == una + 300 and bytes(seg.payload) == b"d" * 100


def test_retransmission_backoff_and_karn() -> None:
    h = _plain(nodelay=True)
    conn, una = _one_segment_in_flight(h)
    rtt = conn.rtt  # type: ignore[attr-defined]
    base = rtt.rto
    assert base == pytest.approx(0.2)  # min RTO
    times = []
    t = 1.0
    for _ in range(4):
        deadline = h.layer.next_deadline()
        assert deadline is not None
        t = deadline
        h.tick(t)
        seg = h.recv_one()
        assert seg.seq == una and len(seg.payload) == 100
        times.append(round(t - 1.0, 6))
    assert times == [0.2, 0.6, 1.4, 3.0]  # 0.2, then doubling
    srtt_before = rtt.srtt
    h.send(t + 0.05, ACK, R1, una + 100)
    # Karn: the ACK of a retransmitted segment gives no sample; the backoff is cleared.
    assert rtt.srtt == srtt_before and rtt.backoffs == 0
    assert conn.stats.rto_timeouts == 4  # type: ignore[attr-defined]


def test_retransmissions_exhausted_times_out() -> None:
    h = _plain(nodelay=True, max_retransmissions=3)
    conn, _una = _one_segment_in_flight(h)
    while conn.state is TcpState.ESTABLISHED:  # type: ignore[attr-defined]
        deadline = h.layer.next_deadline()
        assert deadline is not None
        h.tick(deadline)
    assert conn.error == "timeout"  # type: ignore[attr-defined]
    assert h.recv()[-1].flags & RST


def test_zero_window_probe() -> None:
    h = _plain(nodelay=True)
    conn, synack = h.accept(window=0)
    una = synack.seq + 1
    conn.send(b"q" * 50, now=1.0)
    h.recv_none()
    probe_times = []
    for _ in range(3):
        deadline = h.layer.next_deadline()
        assert deadline is not None
        h.tick(deadline)
        probe = h.recv_one()
        assert probe.seq == una - 1 and not probe.payload and probe.flags == ACK
        probe_times.append(round(deadline - 1.0, 6))
        h.send(deadline + 0.01, ACK, R1, una, window=0)
        h.recv_none()
    assert probe_times == [0.2, 0.6, 1.4]
    assert conn.state is TcpState.ESTABLISHED
    h.send(3.0, ACK, R1, una, window=1000)  # the window opens
    seg = h.recv_one()
    assert bytes(seg.payload) == b"q" * 50 and seg.seq == una


def test_window_update_after_reading_a_full_buffer() -> None:
    h = _plain(recv_buffer=4000)
    conn, synack = h.accept()
    una = synack.seq + 1
    for i in range(4):
        h.send(1.0, ACK, R1 + 1000 * i, una, payload=b"w" * 1000)
    acks = h.recv()
    assert acks[-1].window == 0 and acks[-1].ack == R1 + 4000
    assert conn.receive(4000) == b"w" * 4000
    h.tick(1.0)
    update = h.recv_one()
    assert update.window == 4000 and update.ack == R1 + 4000


def test_keepalive_probes_and_timeout() -> None:
    h = _plain()
    conn, synack = h.accept()
    una = synack.seq + 1
    conn.set_keepalive(True, idle=10.0, interval=1.0, count=2)
    h.tick(9.9)
    h.recv_none()
    h.tick(10.0)
    probe = h.recv_one()
    assert probe.seq == una - 1 and not probe.payload
    h.send(10.1, ACK, R1, una)  # the peer is alive
    h.tick(11.0)
    h.recv_none()
    t = 20.1
    h.tick(t)
    assert h.recv_one().seq == una - 1
    h.tick(t + 1)
    assert h.recv_one().seq == una - 1
    h.tick(t + 2)
    assert h.recv_one().flags & RST
    assert conn.error == "timeout"


def test_keepalive_off_by_default() -> None:
    h = _plain()
    h.accept()
    assert h.layer.next_deadline() is None


def test_nagle_holds_runts_until_acked() -> None:
    h = _plain()
    conn, synack = h.accept()
    una = synack.seq + 1
    conn.send(b"a" * 10, now=1.0)
    assert len(h.recv_one().payload) == 10
    conn.send(b"b" * 10, now=1.001)
    conn.send(b"c" * 10, now=1.002)
    h.recv_none()
    h.send(1.05, ACK, R1, una + 10)
    seg = h.recv_one()
    assert bytes(seg.payload) == b"b" * 10 + b"c" * 10


def test_nodelay_sends_runts_at_once() -> None:
    h = _plain()
    conn, _ = h.accept()
    conn.set_nodelay(True)
    conn.send(b"a" * 10, now=1.0)
    conn.send(b"b" * 10, now=1.001)
    assert [len(s.payload) for s in h.recv()] == [10, 10]


def test_send_without_now_goes_out_on_handle_timeout() -> None:
    h = _plain(nodelay=True)
    conn, _ = h.accept()
    conn.send(b"later")
    h.recv_none()
    assert h.layer.next_deadline() == h.layer.now
    h.tick(2.0)
    assert bytes(h.recv_one().payload) == b"later"


def test_send_buffer_backpressure() -> None:
    h = _plain(send_buffer=5000, nodelay=True)
    conn, synack = h.accept(window=2000)
    una = synack.seq + 1
    assert conn.send(b"x" * 8000, now=1.0) == 5000
    assert conn.writable == 0
    assert [len(s.payload) for s in h.recv()] == [1240]  # the 760 left in the window wait (SWS avoidance)
    h.layer.pop_changed()
    h.send(1.1, ACK, R1, una + 1240, window=2000)
    assert conn.writable == 1240
    assert conn in h.layer.pop_changed()
