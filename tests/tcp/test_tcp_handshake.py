"""Opening handshakes, one crafted segment at a time (RFC 9293 §3.5)."""

from __future__ import annotations

import pytest
from tcp_harness import LOCAL, LOCAL_PORT, REMOTE, REMOTE_ISS, REMOTE_PORT, Harness, M

from embedmesh.netstack.tcp import TcpState
from embedmesh.wire.tcp import ACK, RST, SYN


def test_passive_three_way_handshake() -> None:
    h = Harness()
    listener = h.layer.listen(None, LOCAL_PORT, 4)
    h.send(0.0, SYN, REMOTE_ISS, mss=1460)
    synack = h.recv_one()
    assert synack.flags == SYN | ACK
    assert synack.ack == REMOTE_ISS + 1
    assert synack.mss == 1240  # MTU 1280 - 40
    assert synack.wscale is None and not synack.sack_permitted and synack.timestamp is None
    assert synack.window == 65535
    assert listener.pending == 1 and listener.accept() is None
    h.send(0.01, ACK, REMOTE_ISS + 1, synack.seq + 1)
    h.recv_none()
    assert listener in h.layer.pop_changed()
    conn = listener.accept()
    assert conn is not None and conn.state is TcpState.ESTABLISHED and conn.established
    assert (conn.local_addr, conn.local_port, conn.remote_addr, conn.remote_port) == (
        LOCAL,
        80,
        REMOTE,
        REMOTE_PORT,
    )
    assert conn.mss == 1240 and listener.pending == 0


def test_active_three_way_handshake() -> None:
    h = Harness()
    conn = h.layer.connect(LOCAL, REMOTE, REMOTE_PORT, 0.0, local_port=LOCAL_PORT)
    assert conn.state is TcpState.SYN_SENT
    syn = h.recv_one()
    assert syn.flags == SYN and syn.mss == 1240 and syn.wscale == 7 and syn.sack_permitted
    assert syn.timestamp is not None and syn.timestamp[1] == 0
    h.send(0.02, SYN | ACK, REMOTE_ISS, syn.seq + 1, mss=1400)
    ack = h.recv_one()
    assert ack.flags == ACK and ack.seq == (syn.seq + 1) & M and ack.ack == REMOTE_ISS + 1
    assert ack.timestamp is None  # the peer did not agree to timestamps
    assert conn.state is TcpState.ESTABLISHED
    assert conn in h.layer.pop_changed()
    assert conn.rtt.srtt == pytest.approx(0.02)


def test_simultaneous_open() -> None:
    h = Harness(timestamps=False, sack=False, window_scaling=False)
    conn = h.layer.connect(LOCAL, REMOTE, REMOTE_PORT, 0.0, local_port=LOCAL_PORT)
    syn = h.recv_one()
    # The peer's SYN crosses ours.
    h.send(0.01, SYN, REMOTE_ISS, mss=1400)
    synack = h.recv_one()
    assert synack.flags == SYN | ACK and synack.seq == syn.seq and synack.ack == REMOTE_ISS + 1
    assert conn.state is TcpState.SYN_RECEIVED
    # The peer's SYN-ACK (its answer to our SYN) completes the open on our side.
    h.send(0.02, SYN | ACK, REMOTE_ISS, syn.seq + 1, mss=1400)
    assert conn.state is TcpState.ESTABLISHED
    h.recv_none()
    conn.send(b"hi", now=0.03)
    data = h.recv_one()
    assert bytes(data.payload) == b"hi" and data.seq == (syn.seq + 1) & M


def test_simultaneous_open_completed_by_plain_ack() -> None:
    h = Harness(timestamps=False, sack=False, window_scaling=False)
    conn = h.layer.connect(LOCAL, REMOTE, REMOTE_PORT, 0.0, local_port=LOCAL_PORT)
    syn = h.recv_one()
    h.send(0.01, SYN, REMOTE_ISS)
    h.recv_one()
    h.send(0.02, ACK, REMOTE_ISS + 1, syn.seq + 1)
    assert conn.state is TcpState.ESTABLISHED


def test_syn_sent_bad_ack_gets_reset() -> None:
    h = Harness()
    conn = h.layer.connect(LOCAL, REMOTE, REMOTE_PORT, 0.0, local_port=LOCAL_PORT)
    syn = h.recv_one()
    h.send(0.01, SYN | ACK, REMOTE_ISS, syn.seq + 5)
    rst = h.recv_one()
    assert rst.flags == RST and rst.seq == (syn.seq + 5) & M
    assert conn.state is TcpState.SYN_SENT


def test_connection_refused() -> None:
    h = Harness()
    conn = h.layer.connect(LOCAL, REMOTE, REMOTE_PORT, 0.0, local_port=LOCAL_PORT)
    syn = h.recv_one()
    h.send(0.01, RST, REMOTE_ISS, syn.seq + 2)  # unacceptable ACK: ignored
    assert conn.state is TcpState.SYN_SENT
    h.send(0.01, RST | ACK, 0, syn.seq + 1)
    assert conn.state is TcpState.CLOSED and conn.error == "refused"
    with pytest.raises(ConnectionRefusedError):
        conn.send(b"x")
    assert h.layer.connection_count == 0


def test_syn_retransmission_backoff_and_timeout() -> None:
    h = Harness(syn_retries=3)
    conn = h.layer.connect(LOCAL, REMOTE, REMOTE_PORT, 0.0, local_port=LOCAL_PORT)
    h.recv_one()
    times = []
    t = 0.0
    while conn.state is TcpState.SYN_SENT:
        deadline = h.layer.next_deadline()
        assert deadline is not None
        t = deadline
        h.tick(t)
        if h.out:
            seg = h.recv_one()
            assert seg.flags == SYN
            times.append(t)
    assert times == [1.0, 3.0, 7.0]  # initial RTO 1 s, doubling (RFC 6298 §5.5)
    assert t == 15.0 and conn.error == "timeout"
    with pytest.raises(TimeoutError):
        conn.send(b"x")


def test_lost_synack_is_resent_on_syn_retransmission() -> None:
    h = Harness()
    h.layer.listen(None, LOCAL_PORT, 4)
    h.send(0.0, SYN, REMOTE_ISS)
    first = h.recv_one()
    h.send(1.0, SYN, REMOTE_ISS)
    again = h.recv_one()
    assert again.flags == SYN | ACK and again.seq == first.seq and again.ack == REMOTE_ISS + 1


def test_synack_retransmitted_by_timer_then_given_up() -> None:
    h = Harness(syn_retries=2)
    listener = h.layer.listen(None, LOCAL_PORT, 4)
    h.send(0.0, SYN, REMOTE_ISS)
    h.recv_one()
    h.tick(1.0)
    assert h.recv_one().flags == SYN | ACK
    h.tick(3.0)
    assert h.recv_one().flags == SYN | ACK
    h.tick(7.0)
    h.recv_none()
    assert listener.pending == 0 and h.layer.connection_count == 0


def test_data_queued_before_established_goes_after_handshake() -> None:
    h = Harness(timestamps=False)
    conn = h.layer.connect(LOCAL, REMOTE, REMOTE_PORT, 0.0, local_port=LOCAL_PORT)
    syn = h.recv_one()
    assert conn.send(b"early") == 5
    h.tick(0.0)
    h.recv_none()
    h.send(0.01, SYN | ACK, REMOTE_ISS, syn.seq + 1, mss=1400)
    seg = h.recv_one()
    assert bytes(seg.payload) == b"early" and seg.ack == REMOTE_ISS + 1


def test_ipv6_mss_and_handshake() -> None:
    import random

    from embedmesh.netstack.tcp import TcpLayer
    from embedmesh.wire.tcp import build_tcp, parse_tcp

    a6 = bytes(15) + b"\x01"
    b6 = bytes(15) + b"\x02"
    out = []
    layer = TcpLayer(lambda s, d, seg: out.append(parse_tcp(seg, s, d)), rng=random.Random(1))
    layer.listen(a6, 443, 4)
    layer.segment_received(b6, a6, build_tcp(b6, a6, 5000, 443, 1, 0, SYN, 1000), 0.0)
    assert out[0].mss == 1220 and out[0].flags == SYN | ACK
