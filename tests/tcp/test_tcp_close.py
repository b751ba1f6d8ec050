"""Closing: active, passive, simultaneous, TIME-WAIT; resets (RFC 9293 §3.6, §3.10.7, RFC 5961)."""

from __future__ import annotations

import pytest
from tcp_harness import LOCAL_PORT, REMOTE_ISS, Harness, M

from embedmesh.netstack.tcp import TcpState
from embedmesh.wire.tcp import ACK, FIN, PSH, RST, SYN

R1 = REMOTE_ISS + 1


def _plain() -> Harness:
    return Harness(timestamps=False, sack=False, window_scaling=False)


def test_active_close_through_time_wait() -> None:
    h = _plain()
    conn, synack = h.accept()
    una = synack.seq + 1
    conn.close(now=1.0)
    fin = h.recv_one()
    assert fin.flags == FIN | ACK and fin.seq == una and fin.ack == R1
    assert conn.state is TcpState.FIN_WAIT_1
    h.send(1.1, ACK, R1, una + 1)
    assert conn.state is TcpState.FIN_WAIT_2
    h.recv_none()
    h.send(1.2, FIN | ACK, R1, una + 1)
    ack = h.recv_one()
    assert ack.flags == ACK and ack.ack == R1 + 1 and ack.seq == una + 1
    assert conn.state is TcpState.TIME_WAIT and h.layer.time_wait_count == 1
    # A retransmitted FIN is ACKed again and restarts the 2*MSL timer.
    h.send(5.0, FIN | ACK, R1, una + 1)
    assert h.recv_one().ack == R1 + 1
    h.tick(64.9)
    assert conn.state is TcpState.TIME_WAIT
    assert h.layer.next_deadline() == pytest.approx(65.0)
    h.tick(65.0)
    assert conn.state is TcpState.CLOSED and conn.error is None
    assert h.layer.connection_count == 0 and h.layer.time_wait_count == 0


def test_passive_close() -> None:
    h = _plain()
    conn, synack = h.accept()
    una = synack.seq + 1
    h.send(1.0, FIN | ACK | PSH, R1, una, payload=b"bye")
    ack = h.recv_one()  # FIN is ACKed at once
    assert ack.ack == R1 + 4
    assert conn.state is TcpState.CLOSE_WAIT and conn.readable == 3 and not conn.at_eof
    assert conn.receive() == b"bye" and conn.at_eof
    conn.send(b"last", now=1.1)
    assert bytes(h.recv_one().payload) == b"last"
    conn.close(now=1.2)
    fin = h.recv_one()
    assert fin.flags & FIN and fin.seq == una + 4
    assert conn.state is TcpState.LAST_ACK
    h.send(1.3, ACK, R1 + 4, una + 5)
    assert conn.state is TcpState.CLOSED and conn.error is None
    assert h.layer.connection_count == 0


def test_simultaneous_close() -> None:
    h = _plain()
    conn, synack = h.accept()
    una = synack.seq + 1
    conn.shutdown(now=1.0)
    assert h.recv_one().flags == FIN | ACK
    # The peer's FIN crosses ours: it does not acknowledge our FIN yet.
    h.send(1.1, FIN | ACK, R1, una)
    ack = h.recv_one()
    assert ack.ack == R1 + 1 and ack.seq == una + 1
    assert conn.state is TcpState.CLOSING
    h.send(1.2, ACK, R1 + 1, una + 1)
    assert conn.state is TcpState.TIME_WAIT


def test_fin_with_ack_of_our_fin_goes_straight_to_time_wait() -> None:
    h = _plain()
    conn, synack = h.accept()
    una = synack.seq + 1
    conn.shutdown(now=1.0)
    h.recv_one()
    h.send(1.1, FIN | ACK, R1, una + 1)
    assert conn.state is TcpState.TIME_WAIT
    assert h.recv_one().ack == R1 + 1


def test_half_close_keeps_receiving() -> None:
    h = _plain()
    conn, synack = h.accept()
    una = synack.seq + 1
    conn.shutdown(now=1.0)
    h.recv_one()
    with pytest.raises(BrokenPipeError):
        conn.send(b"x")
    assert conn.writable == 0
    h.send(1.1, ACK | PSH, R1, una + 1, payload=b"still here")
    assert conn.receive() == b"still here"
    assert conn.state is TcpState.FIN_WAIT_2


def test_close_with_unread_data_resets() -> None:
    h = _plain()
    conn, synack = h.accept()
    h.send(1.0, ACK | PSH, R1, synack.seq + 1, payload=b"unread")
    h.recv()
    conn.close(now=2.0)
    rst = h.recv_one()
    assert rst.flags & RST and rst.seq == synack.seq + 1
    assert conn.state is TcpState.CLOSED


def test_abort_sends_rst() -> None:
    h = _plain()
    conn, synack = h.accept()
    conn.abort(now=1.0)
    rst = h.recv_one()
    assert rst.flags & RST and rst.seq == synack.seq + 1
    assert h.layer.connection_count == 0


def test_reset_on_closed_port() -> None:
    h = _plain()
    # SYN without ACK: <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>
    h.send(0.0, SYN, 5000, dport=81)
    rst = h.recv_one()
    assert rst.flags == RST | ACK and rst.seq == 0 and rst.ack == 5001 and rst.dst_port == 40000
    # Data+FIN without ACK: SEG.LEN counts both.
    h.send(0.0, FIN, 5000, payload=b"abc", dport=81)
    assert h.recv_one().ack == 5004
    # With ACK: <SEQ=SEG.ACK><CTL=RST>
    h.send(0.0, ACK, 5000, 777, dport=81)
    rst = h.recv_one()
    assert rst.flags == RST and rst.seq == 777
    # A RST is never answered.
    h.send(0.0, RST | ACK, 5000, 777, dport=81)
    h.recv_none()
    assert h.layer.counters["rst_sent"] == 3


def test_ack_to_listener_gets_reset() -> None:
    h = Harness(syn_cookies=False)
    h.layer.listen(None, LOCAL_PORT, 4)
    h.send(0.0, ACK, 5000, 4242)
    rst = h.recv_one()
    assert rst.flags == RST and rst.seq == 4242


def test_rst_exact_sequence_resets() -> None:
    h = _plain()
    conn, _ = h.accept()
    h.send(1.0, RST, R1)
    h.recv_none()
    assert conn.state is TcpState.CLOSED and conn.error == "reset"
    with pytest.raises(ConnectionResetError):
        conn.send(b"x")


def test_rst_in_window_gets_challenge_ack_and_out_of_window_is_dropped() -> None:
    h = _plain()
    conn, synack = h.accept()
    h.send(1.0, RST, R1 + 100)
    ack = h.recv_one()
    assert ack.flags == ACK and ack.seq == synack.seq + 1 and ack.ack == R1
    assert conn.state is TcpState.ESTABLISHED
    h.send(3.0, RST, R1 + 70000)  # beyond the 65535 window
    h.recv_none()
    h.send(3.0, RST, R1 - 1)
    h.recv_none()
    assert conn.state is TcpState.ESTABLISHED
    assert h.layer.counters["rst_out_of_window"] == 2


def test_syn_on_established_gets_challenge_ack() -> None:
    h = _plain()
    conn, synack = h.accept()
    h.send(1.0, SYN, R1 + 5000)
    ack = h.recv_one()
    assert ack.flags == ACK and ack.ack == R1 and ack.seq == synack.seq + 1
    assert conn.state is TcpState.ESTABLISHED
    # Rate limited: a second one within 0.5 s gets nothing.
    h.send(1.1, SYN, R1 + 6000)
    h.recv_none()
    h.send(1.7, SYN, R1 + 6000)
    assert h.recv_one().flags == ACK


def test_ack_of_unsent_data_is_answered_and_dropped() -> None:
    h = _plain()
    conn, synack = h.accept()
    h.send(1.0, ACK | PSH, R1, synack.seq + 1000, payload=b"data")
    ack = h.recv_one()
    assert ack.ack == R1  # the data was not taken
    assert conn.readable == 0


def test_old_ack_gets_challenge_ack() -> None:
    h = _plain()
    _conn, synack = h.accept()
    h.send(1.0, ACK, R1, (synack.seq + 1 - 200_000) & M)
    ack = h.recv_one()
    assert ack.ack == R1
    assert h.layer.counters["challenge_acks"] == 1
