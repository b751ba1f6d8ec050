"""Property: whatever the applications do and whatever the link does, the byte streams survive.

Both ends write chunks at random moments, read in random sizes, half-close, and close after EOF, over a
sim link with random loss, duplication, reordering and jitter. Every byte must arrive exactly once and
in order, and both ends must end in CLOSED or TIME-WAIT. The simulation seed is part of the example, so
a failure prints it and ``SimLink(seed, ...)`` replays it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simlink import Impairment, SimLink

from embedmesh.netstack.tcp import TcpConfig, TcpConnection, TcpState


@dataclass
class Side:
    writes: list[tuple[float, bytes]]
    read_size: int
    conn: TcpConnection | None = None
    pending: bytes = b""
    next_write: int = 0
    received: bytearray = field(default_factory=bytearray)
    shut: bool = False

    def service(self, now: float) -> None:
        conn = self.conn
        if conn is None or conn.state is TcpState.CLOSED:
            return
        while (
            self.next_write < len(self.writes) and self.writes[self.next_write][0] <= now and not self.pending
        ):
            self.pending = self.writes[self.next_write][1]
            self.next_write += 1
        if self.pending and conn.established and conn.writable:
            n = conn.send(self.pending, now=now)
            self.pending = self.pending[n:]
        if not self.pending and self.next_write == len(self.writes) and not self.shut and conn.established:
            self.shut = True
            conn.shutdown(now=now)
        while conn.readable:
            self.received += conn.receive(self.read_size, now=now)
        if conn.at_eof and self.shut and conn.state is TcpState.CLOSE_WAIT:
            conn.close(now=now)

    @property
    def sent(self) -> bytes:
        return b"".join(data for _, data in self.writes)


chunks = st.lists(
    st.tuples(st.floats(0, 0.5), st.integers(1, 6000)),
    max_size=6,
).map(lambda items: [(t, bytes([i % 251]) * n) for i, (t, n) in enumerate(sorted(items))])


@settings(
    max_examples=int(__import__("os").environ.get("TCP_PROP_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    loss=st.sampled_from([0.0, 0.02, 0.1]),
    duplicate=st.sampled_from([0.0, 0.05]),
    reorder=st.sampled_from([0.0, 0.1]),
    jitter=st.sampled_from([0.0, 0.004]),
    writes_a=chunks,
    writes_b=chunks,
    read_a=st.integers(1, 10_000),
    read_b=st.integers(1, 10_000),
    options=st.sampled_from(["all", "none", "nosack"]),
    congestion=st.sampled_from(["cubic", "newreno"]),
    small_buffers=st.booleans(),
    batch=st.booleans(),
)
def test_streams_survive_any_link(  # type: ignore[no-untyped-def]
    seed,
    loss,
    duplicate,
    reorder,
    jitter,
    writes_a,
    writes_b,
    read_a,
    read_b,
    options,
    congestion,
    small_buffers,
    batch,
) -> None:
    cfg = TcpConfig(
        congestion=congestion,
        sack=options == "all",
        timestamps=options != "none",
        window_scaling=options != "none",
        recv_buffer=4096 if small_buffers else 4 * 1024 * 1024,
        send_buffer=3000 if small_buffers else 4 * 1024 * 1024,
        # With 10 % loss the backed-off RTO can reach max_rto; once it exceeds TIME-WAIT, a lost final
        # ACK turns the peer's last retransmission into a reset (true of every TCP). Keep it below.
        max_rto=10.0,
    )
    imp = Impairment(
        delay=0.01, jitter=jitter, loss=loss, duplicate=duplicate, reorder=reorder, reorder_delay=0.003
    )
    link = SimLink(seed, impairment=imp, config_a=cfg, config_b=cfg)
    link.batch_receive = batch
    listener = link.b.listen(None, 80, 4)
    a = Side(writes_a, read_a)
    b = Side(writes_b, read_b)
    a.conn = link.a.connect(link.addr_a, link.addr_b, 80, 0.0)

    def on_step() -> None:
        if b.conn is None:
            b.conn = listener.accept()
        a.service(link.now)
        b.service(link.now)

    def done() -> bool:
        return (
            a.conn is not None
            and b.conn is not None
            and a.conn.state in (TcpState.CLOSED, TcpState.TIME_WAIT)
            and b.conn.state in (TcpState.CLOSED, TcpState.TIME_WAIT)
        )

    # Wake up at every scheduled write even when the link is idle.
    for t in sorted({t for t, _ in writes_a + writes_b}):
        link.run(until=t, stop=done, on_step=on_step)
        on_step()
    link.run(until=600.0, stop=done, on_step=on_step)
    msg = f"seed={seed} batch={batch} a={a.conn} b={b.conn}"
    assert a.conn is not None and b.conn is not None, msg
    assert a.conn.error is None and b.conn.error is None, msg + f" errors {a.conn.error} {b.conn.error}"
    assert bytes(b.received) == a.sent, msg
    assert bytes(a.received) == b.sent, msg
    assert done(), msg
