"""The small pieces: sequence arithmetic, RTT estimator, buffers, SACK scoreboard, controllers."""

from __future__ import annotations

import random

import pytest

from embedmesh.netstack.tcp.buffers import ReceiveBuffer, SendBuffer
from embedmesh.netstack.tcp.congestion import Cubic, NewReno, make_controller
from embedmesh.netstack.tcp.congestion.base import MAX_CWND
from embedmesh.netstack.tcp.rtt import RttEstimator
from embedmesh.netstack.tcp.sack import SackScoreboard, receiver_blocks
from embedmesh.netstack.tcp.sequence import seq_diff, seq_lt, unwrap


def test_sequence_comparisons_wrap() -> None:
    assert seq_lt(0xFFFFFFF0, 5) and not seq_lt(5, 0xFFFFFFF0) and not seq_lt(7, 7)
    assert seq_diff(5, 0xFFFFFFF0) == 21 and seq_diff(0xFFFFFFF0, 5) == -21
    assert unwrap(5, 0xFFFFFFF0) == 0x100000005
    assert unwrap(0xFFFFFFF0, 0x100000005) == 0xFFFFFFF0
    assert unwrap(100, 2**40 + 50) == 2**40 + 100


def test_rtt_estimator_rfc6298() -> None:
    rtt = RttEstimator(initial_rto=1.0, min_rto=0.2, max_rto=60.0)
    assert rtt.rto == 1.0
    rtt.sample(0.5)
    assert rtt.srtt == 0.5 and rtt.rttvar == 0.25 and rtt.rto == pytest.approx(1.5)
    rtt.sample(0.5)
    assert rtt.rttvar == pytest.approx(0.1875) and rtt.rto == pytest.approx(0.5 + 0.75)
    for _ in range(10):
        rtt.backoff()
    assert rtt.rto == 60.0
    rtt.sample(0.01)
    assert rtt.backoffs == 0 and rtt.rto >= 0.2


def test_send_buffer_bounded_fifo() -> None:
    buf = SendBuffer(10)
    assert buf.write(b"abcdefgh") == 8 and buf.write(b"ijkl") == 2 and buf.free == 0
    assert bytes(buf.peek(2, 3)) == b"cde"
    buf.consume(4)
    assert bytes(buf.peek(0, 10)) == b"efghij" and buf.free == 4
    buf.consume(100)
    assert len(buf) == 0


def test_receive_buffer_reassembly_against_a_model() -> None:
    rng = random.Random(5)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(400))
        buf = ReceiveBuffer(10_000, max_blocks=1000)
        rcv_nxt = 0
        for _ in range(80):
            start = rng.randrange(0, 400)
            end = min(400, start + rng.randrange(1, 60))
            if start < rcv_nxt:
                continue
            if start == rcv_nxt:
                buf.append(data[start:end])
                rcv_nxt = buf.pull(end)
            else:
                dup = buf.insert(start, data[start:end])
                if dup is not None:
                    assert dup == (start, end)
            for (left, right), block in zip(buf.ooo_blocks(), buf._ooo_data, strict=True):
                assert bytes(block) == data[left:right]
            assert buf.ooo_bytes == sum(r - left for left, r in buf.ooo_blocks())
        assert buf.read(1000) == data[:rcv_nxt]


def test_receive_buffer_block_cap() -> None:
    buf = ReceiveBuffer(10_000, max_blocks=3)
    for i in range(5):
        buf.insert(100 + 10 * i, b"x")
    assert len(buf.ooo_blocks()) == 3


def test_receiver_blocks_most_recent_first_with_dsack() -> None:
    buf = ReceiveBuffer(10_000)
    recent: list[int] = []
    for start in (100, 300, 500):
        buf.insert(start, b"y" * 50)
        recent.insert(0, start)
    assert receiver_blocks(buf, recent, None) == [(500, 550), (300, 350), (100, 150)]
    assert receiver_blocks(buf, recent, (10, 20))[0] == (10, 20)


def test_scoreboard() -> None:
    sb = SackScoreboard()
    assert sb.add(100, 200) == 100 and sb.add(300, 400) == 100 and sb.add(150, 250) == 50
    assert sb.ranges() == [(100, 250), (300, 400)] and sb.sacked_bytes == 250 and sb.highest == 400
    assert sb.add(250, 300) == 50 and sb.ranges() == [(100, 400)]
    sb.add(500, 600)
    assert sb.next_hole(0, 1000) == (0, 100) and sb.next_hole(100, 1000) == (400, 500)
    assert sb.next_hole(600, 600) is None and sb.sacked_end(150) == 400 and sb.next_sacked(450) == 500
    assert sb.sacked_between(350, 550) == 100
    sb.advance(350)
    assert sb.ranges() == [(350, 400), (500, 600)] and sb.sacked_bytes == 150
    sb.advance(1000)
    assert not sb and sb.sacked_bytes == 0


@pytest.mark.parametrize("name", ["newreno", "cubic"])
def test_controllers_slow_start_loss_and_timeout(name: str) -> None:
    cc = make_controller(name, 1000)
    assert cc.cwnd == 10_000 and cc.in_slow_start
    for _ in range(10):
        cc.on_ack(1000, 0.0, 0.02)
    assert cc.cwnd == 20_000
    cc.on_congestion(0.1, 20_000)
    assert cc.ssthresh < 20_000 and cc.cwnd == cc.ssthresh
    grow_from = cc.cwnd
    t = 0.1
    for _ in range(200):
        t += 0.001
        cc.on_ack(1000, t, 0.02)
    assert cc.cwnd > grow_from
    cc.on_timeout(t, cc.cwnd)
    assert cc.cwnd == 1000
    with pytest.raises(ValueError, match="unknown congestion controller"):
        make_controller("bbr9", 1000)


def test_newreno_halves_and_cubic_keeps_seventy_percent() -> None:
    reno = NewReno(1000)
    reno.cwnd = 40_000
    reno.on_congestion(0.0, 40_000)
    assert reno.cwnd == 20_000
    cubic = Cubic(1000)
    cubic.cwnd = 40_000
    cubic.on_congestion(0.0, 40_000)
    assert cubic.cwnd == 28_000 and cubic.w_max == 40


def test_cubic_window_bounded_on_absurd_input() -> None:
    cubic = Cubic(1000)
    cubic.ssthresh = 10_000
    cubic.cwnd = 10_000
    for i in range(2000):
        cubic.on_ack(10**9, float(i * 1000), 1000.0)
    assert cubic.cwnd <= MAX_CWND


def test_snapshot_restore() -> None:
    cubic = Cubic(1000)
    cubic.cwnd = 50_000
    state = cubic.snapshot()
    cubic.on_congestion(1.0, 50_000)
    cubic.restore(state)
    assert cubic.cwnd == 50_000 and cubic.epoch_start is None


def test_send_buffer_ring_against_a_model() -> None:
    """Writes, peeks and consumes in random sizes (the ring wraps and grows) match a bytes model."""
    rng = random.Random(11)
    for capacity in (10, 1000, 70_000):
        buf = SendBuffer(capacity)
        model = b""
        counter = 0
        for _ in range(400):
            action = rng.random()
            if action < 0.4:
                n = rng.randrange(0, capacity // 3 + 2)
                data = bytes((counter + i) % 251 for i in range(n))
                counter += n
                taken = buf.write(memoryview(data) if rng.random() < 0.5 else data)
                assert taken == min(n, capacity - len(model))
                model += data[:taken]
            elif action < 0.7:
                n = rng.randrange(0, len(model) + 2)
                buf.consume(n)
                model = model[n:]
            else:
                offset = rng.randrange(0, len(model) + 1)
                size = rng.randrange(0, capacity + 1)
                assert bytes(buf.peek(offset, size)) == model[offset : offset + size]
            assert len(buf) == len(model) and buf.free == capacity - len(model)
        if not model:
            assert len(buf._ring) == 0  # an empty buffer holds no memory


def test_receive_buffer_reads_across_chunks() -> None:
    rng = random.Random(12)
    owner = bytes(range(256)) * 40
    buf = ReceiveBuffer(1 << 20)
    model = bytearray()
    for _ in range(300):
        if rng.random() < 0.6:
            start = rng.randrange(len(owner))
            end = min(len(owner), start + rng.randrange(0, 1500))
            kind = rng.randrange(3)
            piece = (
                memoryview(owner)[start:end]
                if kind == 0
                else (owner[start:end] if kind == 1 else bytearray(owner[start:end]))
            )
            buf.append(piece)
            model += owner[start:end]
        else:
            n = rng.randrange(0, 5000)
            assert buf.read(n) == bytes(model[:n])
            del model[:n]
        assert len(buf) == len(model)
    mutable = bytearray(b"abc")
    buf.append(memoryview(mutable))
    mutable[0] = ord("z")  # a view of a mutable buffer was copied, not kept
    assert buf.read(1 << 20).endswith(b"abc")
