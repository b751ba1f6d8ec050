"""Loss recovery: fast retransmit (RFC 5681), NewReno partial ACKs (RFC 6582), SACK holes (RFC 6675)."""

from __future__ import annotations

from tcp_harness import REMOTE_ISS, Harness

from embedmesh.wire.tcp import ACK

R1 = REMOTE_ISS + 1
MSS = 1240


def _flight(h: Harness, segments: int, **accept: object) -> tuple[object, int]:
    conn, synack = h.accept(**accept)  # type: ignore[arg-type]
    una = synack.seq + 1
    conn.set_nodelay(True)
    conn.send(bytes(range(256)) * (segments * MSS // 256) + b"\x00" * (segments * MSS % 256), now=1.0)
    out = h.recv()
    assert [s.seq for s in out] == [una + i * MSS for i in range(segments)]
    return conn, una


def test_fast_retransmit_on_third_duplicate_ack_and_newreno_partial_ack() -> None:
    h = Harness(timestamps=False, sack=False, window_scaling=False, congestion="newreno")
    conn, una = _flight(h, 6)
    h.send(1.05, ACK, R1, una + MSS)  # segment 1 arrived, 2 lost
    h.recv_none()
    for i in range(2):
        h.send(1.06 + i / 1000, ACK, R1, una + MSS)
        h.recv_none()
    h.send(1.063, ACK, R1, una + MSS)  # third duplicate
    rxt = h.recv_one()
    assert rxt.seq == una + MSS and len(rxt.payload) == MSS
    assert conn.stats.fast_recoveries == 1  # type: ignore[attr-defined]
    # RFC 6582: ssthresh = FlightSize/2 (5 segments out), cwnd = ssthresh + 3*SMSS.
    assert conn.cwnd == (5 * MSS) // 2 + 3 * MSS  # type: ignore[attr-defined]
    # Partial ACK: segments 2 and 3 arrived, 4 was lost too: retransmit it at once.
    h.send(1.11, ACK, R1, una + 3 * MSS)
    out = h.recv()
    assert out[0].seq == una + 3 * MSS
    # The full ACK ends recovery.
    h.send(1.16, ACK, R1, una + 6 * MSS)
    assert not conn._in_recovery  # type: ignore[attr-defined]
    assert conn.cwnd <= (5 * MSS) // 2  # type: ignore[attr-defined]


def test_two_duplicates_are_not_enough() -> None:
    h = Harness(timestamps=False, sack=False, window_scaling=False)
    conn, una = _flight(h, 6)
    h.send(1.05, ACK, R1, una + MSS)
    h.send(1.06, ACK, R1, una + MSS)
    h.send(1.07, ACK, R1, una + MSS)
    h.recv_none()
    assert conn.stats.retransmits == 0  # type: ignore[attr-defined]


def test_sack_recovery_retransmits_exactly_the_holes() -> None:
    h = Harness(timestamps=False, window_scaling=False)
    conn, una = _flight(h, 10, sack_permitted=True)

    def seg(i: int) -> int:
        return (una + i * MSS) & 0xFFFFFFFF

    # Segment 0 arrived; 1 and 5 are lost; 2-4 and 6-9 arrived.
    h.send(1.05, ACK, R1, seg(1), sack_blocks=[(seg(6), seg(10)), (seg(2), seg(5))])
    out = h.recv()
    assert [(s.seq, len(s.payload)) for s in out] == [(seg(1), MSS), (seg(5), MSS)]
    assert bytes(out[0].payload) == conn._sbuf.peek(0, MSS)  # type: ignore[attr-defined]
    # More SACKs for the same holes: nothing is sent twice.
    h.send(1.06, ACK, R1, seg(1), sack_blocks=[(seg(6), seg(10)), (seg(2), seg(5))])
    h.recv_none()
    h.send(1.1, ACK, R1, seg(5), sack_blocks=[(seg(6), seg(10))])
    h.recv_none()
    h.send(1.11, ACK, R1, seg(10))
    assert not conn._in_recovery  # type: ignore[attr-defined]
    assert conn.stats.retransmits == 2  # type: ignore[attr-defined]


def test_sack_below_threshold_waits() -> None:
    h = Harness(timestamps=False, window_scaling=False)
    _conn, una = _flight(h, 10, sack_permitted=True)
    # One segment SACKed above a hole: could be reordering (RFC 6675 IsLost needs > 2*SMSS).
    h.send(1.05, ACK, R1, una, sack_blocks=[(una + MSS, una + 2 * MSS)])
    h.recv_none()
    h.send(1.06, ACK, R1, una, sack_blocks=[(una + MSS, una + 3 * MSS)])
    h.recv_none()
    h.send(1.07, ACK, R1, una, sack_blocks=[(una + MSS, una + 4 * MSS)])
    assert h.recv_one().seq == una


def test_dsack_undoes_a_spurious_fast_retransmit() -> None:
    h = Harness(timestamps=False, window_scaling=False)
    conn, una = _flight(h, 10, sack_permitted=True)
    cwnd = conn.cwnd  # type: ignore[attr-defined]
    h.send(1.05, ACK, R1, una, sack_blocks=[(una + MSS, una + 5 * MSS)])
    assert h.recv_one().seq == una  # fast retransmit
    assert conn.cwnd < cwnd  # type: ignore[attr-defined]
    # The original was only late: the peer reports the retransmission as a duplicate (D-SACK).
    h.send(1.06, ACK, R1, una + 10 * MSS, sack_blocks=[(una, una + MSS)])
    assert conn.stats.spurious_undos == 1  # type: ignore[attr-defined]
    assert conn.cwnd >= cwnd  # type: ignore[attr-defined]
    assert conn._dupthresh > 3  # type: ignore[attr-defined]


def test_losses_after_a_spurious_timeout_are_fast_retransmitted() -> None:
    """A path change (the NAT in front of us rebooted, the simulator found it): the ACKs of what
    arrived were lost, and so was everything sent after them. The timeout's retransmission of
    the first segment draws an ACK whose timestamp echo is older than it (the original arrived),
    so the timeout is undone as spurious (RFC 4015) — but the data after the lost ACKs is still
    missing, and SACKs of new data beyond it must start fast recovery then, not wait for the next
    (backed-off) timeout: undoing the timeout ends its "recover" guard (RFC 6582) too."""
    h = Harness(window_scaling=False)
    conn, synack = h.accept(sack_permitted=True, timestamp=(1000, 0))
    una = synack.seq + 1
    conn.set_nodelay(True)  # type: ignore[attr-defined]
    mss = conn.mss  # type: ignore[attr-defined]

    def seg(i: int) -> int:
        return (una + i * mss) & 0xFFFFFFFF

    conn.send(b"\x01" * (8 * mss), now=1.0)  # type: ignore[attr-defined]
    first = h.recv()
    assert len(first) == 8 and first[0].timestamp is not None
    original_tsval = first[3].timestamp[0]  # type: ignore[index]
    # Segments 0-3 arrive (their ACKs are lost), 4-7 are lost. The timeout resends segment 0.
    h.tick(2.5)
    rxt = h.recv_one()
    assert rxt.seq == seg(0)
    # The peer already had it: its ACK covers 0-3 and echoes segment 3's (original) timestamp.
    h.send(2.6, ACK, R1, seg(4), timestamp=(2000, original_tsval))
    assert conn.stats.spurious_undos == 1  # type: ignore[attr-defined]
    h.recv()  # the Eifel response: new data, not the rest of the go-back-N
    conn.send(b"\x02" * (4 * mss), now=2.6)  # type: ignore[attr-defined]
    h.recv()
    # New data beyond the hole arrives: SACKs with the cumulative ACK stuck at segment 4.
    for i, t in enumerate((2.7, 2.71, 2.72)):
        h.send(t, ACK, R1, seg(4), timestamp=(2001 + i, original_tsval), sack_blocks=[(seg(8), seg(9 + i))])
    out = h.recv()
    assert seg(4) in [s.seq for s in out], "the hole waits for the next timeout"
