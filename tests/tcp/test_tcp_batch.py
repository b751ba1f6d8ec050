"""Batch mode (``TcpLayer.begin_batch`` / ``end_batch``): one ACK per batch of in-order data, as Linux
ACKs a GRO batch, while everything the RFCs want ACKed at once still is."""

from __future__ import annotations

import pytest
from tcp_harness import REMOTE_ISS, Harness

from embedmesh.wire.tcp import ACK, FIN, PSH

R1 = REMOTE_ISS + 1
MSS = 1240


def _plain(**kw: object) -> Harness:
    return Harness(timestamps=False, window_scaling=False, **kw)  # type: ignore[arg-type]


def _batch(h: Harness, una: int, t: float, start: int, count: int, size: int = MSS) -> None:
    for i in range(count):
        h.send(t, ACK, start + i * size, una, payload=bytes([i % 256]) * size)


def test_a_batch_of_in_order_segments_gets_exactly_one_ack_at_its_end() -> None:
    h = _plain()
    conn, synack = h.accept()
    una = synack.seq + 1
    h.layer.begin_batch()
    _batch(h, una, 1.0, R1, 10)
    h.recv_none()  # nothing while the batch runs
    h.layer.end_batch(1.0)
    ack = h.recv_one()
    assert ack.flags == ACK and ack.ack == R1 + 10 * MSS
    assert conn.readable == 10 * MSS
    h.layer.end_batch(1.0)  # a second end sends nothing more
    h.recv_none()
    assert h.layer.next_deadline() is None  # no delayed ACK left armed either


def test_without_batch_mode_every_second_segment_is_acked() -> None:
    h = _plain()
    _conn, synack = h.accept()
    _batch(h, synack.seq + 1, 1.0, R1, 10)
    acks = h.recv()
    assert [a.ack for a in acks] == [R1 + k * MSS for k in (2, 4, 6, 8, 10)]


def test_out_of_order_data_is_acked_at_once_inside_a_batch() -> None:
    h = _plain()
    _conn, synack = h.accept(sack_permitted=True)
    una = synack.seq + 1
    h.layer.begin_batch()
    _batch(h, una, 1.0, R1, 4)
    h.recv_none()
    h.send(1.0, ACK, R1 + 5 * MSS, una, payload=b"z" * MSS)  # segment 5 lost
    ooo = h.recv_one()
    assert ooo.ack == R1 + 4 * MSS and ooo.sack_blocks == ((R1 + 5 * MSS, R1 + 6 * MSS),)
    h.send(1.0, ACK, R1 + 4 * MSS, una, payload=b"y" * MSS)  # the hole filled: at once too
    assert h.recv_one().ack == R1 + 6 * MSS
    h.layer.end_batch(1.0)
    h.recv_none()  # everything was acknowledged already


def test_fin_and_duplicates_are_acked_at_once_inside_a_batch() -> None:
    h = _plain()
    _conn, synack = h.accept(sack_permitted=True)
    una = synack.seq + 1
    h.layer.begin_batch()
    _batch(h, una, 1.0, R1, 2)
    h.send(1.0, ACK, R1, una, payload=bytes(MSS))  # a duplicate: D-SACK now
    dup = h.recv_one()
    assert dup.ack == R1 + 2 * MSS and dup.sack_blocks == ((R1, R1 + MSS),)
    h.send(1.0, ACK | FIN | PSH, R1 + 2 * MSS, una, payload=b"end")
    fin_ack = h.recv_one()
    assert fin_ack.ack == R1 + 2 * MSS + 4
    h.layer.end_batch(1.0)
    h.recv_none()


def test_a_long_batch_still_acks_every_max_ack_stretch_segments() -> None:
    h = _plain(max_ack_stretch=8)
    _conn, synack = h.accept()
    h.layer.begin_batch()
    _batch(h, synack.seq + 1, 1.0, R1, 20)
    assert [a.ack for a in h.recv()] == [R1 + 8 * MSS, R1 + 16 * MSS]
    h.layer.end_batch(1.0)
    assert h.recv_one().ack == R1 + 20 * MSS


def test_delayed_ack_timer_still_bounds_a_batch() -> None:
    h = _plain()
    _conn, synack = h.accept()
    una = synack.seq + 1
    # One small segment: not enough for an ACK at the end of the batch; the timer sends it.
    h.layer.begin_batch()
    h.send(1.0, ACK | PSH, R1, una, payload=b"x" * 100)
    h.layer.end_batch(1.0)
    h.recv_none()
    assert h.layer.next_deadline() == pytest.approx(1.04)
    h.tick(1.04)
    assert h.recv_one().ack == R1 + 100
    # An owner that never ends its batch only delays the ACK to the same deadline.
    h.layer.begin_batch()
    _batch(h, una, 2.0, R1 + 100, 4)
    h.recv_none()
    assert h.layer.next_deadline() == pytest.approx(2.04)
    h.tick(2.04)
    assert h.recv_one().ack == R1 + 100 + 4 * MSS


def test_window_update_after_a_read_is_not_deferred() -> None:
    h = _plain(recv_buffer=8 * MSS)
    conn, synack = h.accept()
    una = synack.seq + 1
    h.layer.begin_batch()
    _batch(h, una, 1.0, R1, 8)
    h.layer.end_batch(1.0)
    full = h.recv_one()
    assert full.ack == R1 + 8 * MSS and full.window == 0
    assert len(conn.receive(8 * MSS, now=1.1)) == 8 * MSS  # outside any batch: the update goes now
    update = h.recv_one()
    assert update.ack == R1 + 8 * MSS and update.window == 8 * MSS


def test_batches_over_a_lossy_link_deliver_everything() -> None:
    """Whole transfers with batch mode on at the receiver, through loss and reordering."""
    from simlink import Impairment, SimLink, Transfer

    for seed in range(4):
        link = SimLink(seed, impairment=Impairment(delay=0.005, loss=0.02, reorder=0.02, reorder_delay=0.002))
        link.batch_receive = True
        tr = Transfer(link, bytes(range(256)) * 2000)
        tr.run()
        tr.check()
