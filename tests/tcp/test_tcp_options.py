"""Option negotiation: MSS, window scale, SACK-permitted, timestamps (RFC 9293 §3.7.1, RFC 7323, RFC 2018)."""

from __future__ import annotations

from tcp_harness import LOCAL_PORT, REMOTE_ISS, Harness, M

from embedmesh.netstack.tcp import TcpState
from embedmesh.wire.tcp import ACK, FIN, PSH, SYN

R1 = REMOTE_ISS + 1


def test_all_options_negotiated_passively() -> None:
    h = Harness()
    listener = h.layer.listen(None, LOCAL_PORT, 4)
    h.send(0.0, SYN, REMOTE_ISS, mss=1460, wscale=2, sack_permitted=True, timestamp=(500, 0))
    synack = h.recv_one()
    assert synack.mss == 1240 and synack.wscale == 7 and synack.sack_permitted
    assert synack.timestamp is not None and synack.timestamp[1] == 500
    assert synack.window == 65535  # never scaled in a SYN
    h.send(0.01, ACK, R1, synack.seq + 1, window=1000, timestamp=(510, synack.timestamp[0]))
    conn = listener.accept()
    assert conn is not None
    assert conn.snd_wnd == 4000  # 1000 << 2
    assert conn.mss == 1240 - 12  # the timestamp option takes 12 bytes of every segment
    conn.set_nodelay(True)
    conn.send(b"x" * 3000, now=0.02)
    out = h.recv()
    assert [len(s.payload) for s in out] == [1228, 1228, 544]
    for seg in out:
        assert seg.timestamp is not None and seg.timestamp[1] == 510
        assert seg.window == (4 * 1024 * 1024) >> 7 or seg.window == 32767


def test_no_options_offered_means_none_used() -> None:
    h = Harness()
    conn, synack = h.accept()  # the harness's SYN carries only MSS 1460
    assert synack.wscale is None and not synack.sack_permitted and synack.timestamp is None
    assert conn.mss == 1240
    conn.set_nodelay(True)
    conn.send(b"y" * 100, now=1.0)
    seg = h.recv_one()
    assert seg.timestamp is None and seg.window == 65535 and not seg.sack_blocks


def test_default_mss_when_peer_sends_none() -> None:
    h = Harness()
    h.layer.listen(None, LOCAL_PORT, 4)
    h.send(0.0, SYN, REMOTE_ISS)
    synack = h.recv_one()
    h.send(0.0, ACK, R1, synack.seq + 1)
    conn = h.layer.connections()[0]
    assert conn.mss == 536  # RFC 9293 default for IPv4


def test_peer_mss_smaller_is_respected_and_tiny_is_floored() -> None:
    h = Harness()
    conn, _ = h.accept(mss=700)
    assert conn.mss == 700
    h2 = Harness()
    conn2, _ = h2.accept(mss=1)
    assert conn2.mss == 64


def test_wscale_above_14_is_clamped() -> None:
    h = Harness()
    conn, _ = h.accept(wscale=20)
    h.send(1.0, ACK, R1, conn.snd_una, window=1)
    assert conn.snd_wnd == 1 << 14


def test_timestamps_echo_and_paws() -> None:
    h = Harness()
    conn, synack = h.accept(timestamp=(1000, 0))
    una = synack.seq + 1
    h.send(1.0, ACK | PSH, R1, una, payload=b"a" * 10, timestamp=(2000, 0))
    h.tick(1.5)
    ack = h.recv_one()
    assert ack.timestamp is not None and ack.timestamp[1] == 2000 and ack.ack == R1 + 10
    # An old timestamp (wrapped sequence space, RFC 7323 §5) is dropped and answered with an ACK.
    h.send(2.0, ACK | PSH, R1 + 10, una, payload=b"b" * 10, timestamp=((2000 - 5000) & M, 0))
    ack = h.recv_one()
    assert ack.ack == R1 + 10 and conn.readable == 10
    assert h.layer.counters["paws_dropped"] == 1
    # A segment merely overtaken (reordered by less than a second of the peer's clock) is taken.
    h.send(2.1, ACK | PSH, R1 + 10, una, payload=b"c" * 10, timestamp=(1500, 0))
    assert conn.readable == 20 and h.layer.counters["paws_dropped"] == 1


def test_final_ack_without_timestamp_is_accepted() -> None:
    """gVisor #11536: an old Linux client's final ACK carried no TSopt; the connection stuck."""
    h = Harness()
    listener = h.layer.listen(None, LOCAL_PORT, 4)
    h.send(0.0, SYN, REMOTE_ISS, timestamp=(77, 0), sack_permitted=True, wscale=7)
    synack = h.recv_one()
    h.send(0.01, ACK, R1, synack.seq + 1)  # no TSopt
    conn = listener.accept()
    assert conn is not None and conn.state is TcpState.ESTABLISHED
    h.send(0.02, ACK | PSH, R1, synack.seq + 1, payload=b"data without TSopt")
    assert conn.receive() == b"data without TSopt"


def test_sack_blocks_sent_for_out_of_order_data() -> None:
    h = Harness()
    conn, synack = h.accept(sack_permitted=True)
    una = synack.seq + 1
    h.send(1.0, ACK, R1 + 100, una, payload=b"b" * 100)
    ack = h.recv_one()  # out of order: immediate ACK
    assert ack.ack == R1 and ack.sack_blocks == ((R1 + 100, R1 + 200),)
    h.send(1.0, ACK, R1 + 300, una, payload=b"d" * 100)
    ack = h.recv_one()
    assert ack.sack_blocks == ((R1 + 300, R1 + 400), (R1 + 100, R1 + 200))  # most recent first
    h.send(1.0, ACK, R1, una, payload=b"a" * 100)
    ack = h.recv_one()
    assert ack.ack == R1 + 200 and ack.sack_blocks == ((R1 + 300, R1 + 400),)
    # A duplicate is reported as D-SACK (RFC 2883).
    h.send(1.0, ACK, R1, una, payload=b"a" * 100)
    ack = h.recv_one()
    assert ack.sack_blocks[0] == (R1, R1 + 100)
    assert conn.receive() == b"a" * 100 + b"b" * 100


def test_window_scale_kept_per_connection() -> None:
    """smoltcp #518: one connection's window (in an unrelated FIN/RST) leaked into another."""
    h = Harness()
    listener = h.layer.listen(None, LOCAL_PORT, 4)
    conns = []
    for port, ws in ((40001, 0), (40002, 8)):
        h.send(0.0, SYN, REMOTE_ISS, sport=port, mss=1460, wscale=ws)
        synack = h.recv_one()
        h.send(0.0, ACK, R1, synack.seq + 1, sport=port, window=1000)
        c = listener.accept()
        assert c is not None
        conns.append(c)
    a, b = conns
    assert a.snd_wnd == 1000 and b.snd_wnd == 1000 << 8
    # A FIN with a tiny window on b, and a reset for a third, unrelated 4-tuple...
    h.send(1.0, FIN | ACK, R1, b.snd_una, sport=40002, window=1)
    h.send(1.0, ACK, R1, 5, sport=40003, window=1)
    h.recv()
    # ...leave a alone: it still sends full segments.
    a.set_nodelay(True)
    a.send(b"z" * 1000, now=1.1)
    segs = h.recv()
    assert [len(s.payload) for s in segs] == [1000]
    assert a.snd_wnd == 1000 and b.snd_wnd == 1 << 8
