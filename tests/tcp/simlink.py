"""A tiny deterministic network for TCP tests: two TcpLayers, a link between them, virtual time.

Every impairment draws from one ``random.Random`` seeded by the test, so a seed reproduces a run
exactly. Per direction the link models: serialization at ``bandwidth`` bytes/s behind a drop-tail
queue of ``queue_limit`` bytes, one-way ``delay`` plus uniform ``jitter``, random ``loss``,
``duplicate`` copies, ``reorder`` (a packet held back ``reorder_delay`` extra), and an ``mtu`` beyond
which packets vanish without an ICMP error (a black hole, as over WireGuard).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from embedmesh.netstack.tcp import TcpConfig, TcpConnection, TcpLayer, TcpListener, TcpState

ADDR_A4 = bytes([100, 64, 0, 1])
ADDR_B4 = bytes([100, 64, 0, 2])
ADDR_A6 = bytes.fromhex("fd7a115ca1e0000000000000000000a1")
ADDR_B6 = bytes.fromhex("fd7a115ca1e0000000000000000000b2")


@dataclass
class Impairment:
    delay: float = 0.005
    jitter: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.002
    bandwidth: float | None = None  # bytes per second
    queue_limit: int | None = None  # bytes waiting for serialization


@dataclass
class LinkStats:
    packets: int = 0
    bytes: int = 0
    lost: int = 0
    mtu_dropped: int = 0
    queue_dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    max_ip_size: int = 0
    filtered: int = 0


@dataclass
class _Direction:
    impairment: Impairment
    stats: LinkStats = field(default_factory=LinkStats)
    busy_until: float = 0.0


class SimLink:
    """Layers ``a`` and ``b`` joined by one impaired link; ``run`` advances virtual time."""

    def __init__(
        self,
        seed: int = 0,
        *,
        impairment: Impairment | None = None,
        reverse: Impairment | None = None,
        mtu: int = 1280,
        config_a: TcpConfig | None = None,
        config_b: TcpConfig | None = None,
        ipv6: bool = False,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.mtu = mtu
        self.now = 0.0
        self.ipv6 = ipv6
        self.addr_a = ADDR_A6 if ipv6 else ADDR_A4
        self.addr_b = ADDR_B6 if ipv6 else ADDR_B4
        self.ip_overhead = 40 if ipv6 else 20
        forward = impairment or Impairment()
        self.forward = _Direction(forward)
        self.backward = _Direction(reverse or forward)
        self.a = TcpLayer(self._from_a, rng=random.Random(seed * 2 + 1), config=config_a)
        self.b = TcpLayer(self._from_b, rng=random.Random(seed * 2 + 2), config=config_b)
        self._events: list[tuple[float, int, TcpLayer, bytes, bytes, bytes]] = []
        self._n = 0
        # Optional hooks: see every packet put on the wire; drop the ones a filter picks.
        self.tap: Callable[[str, bytes], None] | None = None
        self.drop: Callable[[str, bytes], bool] | None = None
        #: Deliver the packets that arrive at one instant as one batch (TcpLayer.begin_batch /
        #: end_batch), as the runtime does with the datagrams of one read.
        self.batch_receive = False

    # -- the link ----------------------------------------------------------------------------------

    def _from_a(self, src: bytes, dst: bytes, segment: bytes) -> None:
        self._put("a->b", self.forward, self.b, src, dst, segment)

    def _from_b(self, src: bytes, dst: bytes, segment: bytes) -> None:
        self._put("b->a", self.backward, self.a, src, dst, segment)

    def _put(self, name: str, d: _Direction, to: TcpLayer, src: bytes, dst: bytes, segment: bytes) -> None:
        imp = d.impairment
        st = d.stats
        size = len(segment) + self.ip_overhead
        st.packets += 1
        st.bytes += size
        if size > st.max_ip_size:
            st.max_ip_size = size
        if self.tap is not None:
            self.tap(name, segment)
        if size > self.mtu:
            st.mtu_dropped += 1
            return
        if self.drop is not None and self.drop(name, segment):
            st.filtered += 1
            return
        rng = self.rng
        now = self.now
        depart = now
        if imp.bandwidth:
            start = d.busy_until if d.busy_until > now else now
            if imp.queue_limit is not None and (start - now) * imp.bandwidth > imp.queue_limit:
                st.queue_dropped += 1
                return
            depart = start + size / imp.bandwidth
            d.busy_until = depart
        if imp.loss and rng.random() < imp.loss:
            st.lost += 1
            return
        copies = 1
        if imp.duplicate and rng.random() < imp.duplicate:
            copies = 2
            st.duplicated += 1
        for _ in range(copies):
            arrive = depart + imp.delay
            if imp.jitter:
                arrive += rng.random() * imp.jitter
            if imp.reorder and rng.random() < imp.reorder:
                arrive += imp.reorder_delay
                st.reordered += 1
            self._n += 1
            heapq.heappush(self._events, (arrive, self._n, to, src, dst, segment))

    # -- the clock ---------------------------------------------------------------------------------

    def next_time(self) -> float | None:
        times = [t for t in (self.a.next_deadline(), self.b.next_deadline()) if t is not None]
        if self._events:
            times.append(self._events[0][0])
        return min(times) if times else None

    def step(self) -> bool:
        """Advance to the next event or deadline and process it; False when nothing is left."""
        t = self.next_time()
        if t is None:
            return False
        if t > self.now:
            self.now = t
        now = self.now
        events = self._events
        batch = self.batch_receive and events and events[0][0] <= now
        if batch:
            self.a.begin_batch()
            self.b.begin_batch()
        while events and events[0][0] <= now:
            _, _, to, src, dst, segment = heapq.heappop(events)
            to.segment_received(src, dst, segment, now)
        if batch:
            self.a.end_batch(now)
            self.b.end_batch(now)
        for layer in (self.a, self.b):
            deadline = layer.next_deadline()
            if deadline is not None and deadline <= now:
                layer.handle_timeout(now)
        return True

    def run(
        self,
        until: float | None = None,
        *,
        stop: Callable[[], bool] | None = None,
        on_step: Callable[[], None] | None = None,
        max_steps: int = 10_000_000,
    ) -> None:
        """Step until ``stop()`` holds, virtual time passes ``until``, or nothing is left to do."""
        for _ in range(max_steps):
            if stop is not None and stop():
                return
            t = self.next_time()
            if t is None or (until is not None and t > until):
                if until is not None and until > self.now:
                    self.now = until
                return
            self.step()
            if on_step is not None:
                on_step()
        raise AssertionError(f"simulation did not settle in {max_steps} steps (seed {self.seed})")

    @property
    def stats(self) -> tuple[LinkStats, LinkStats]:
        return self.forward.stats, self.backward.stats


class _App:
    """One side's application: writes its data, half-closes, reads until EOF, then closes."""

    def __init__(self, data: bytes, read_chunk: int) -> None:
        self.data = memoryview(data)
        self.sent = 0
        self.received = bytearray()
        self.read_chunk = read_chunk
        self.conn: TcpConnection | None = None
        self.done_at: float | None = None

    def service(self, now: float) -> None:
        conn = self.conn
        if conn is None or conn.state is TcpState.CLOSED:
            return
        if conn.established and self.sent < len(self.data) and conn.writable:
            self.sent += conn.send(self.data[self.sent :], now=now)
            if self.sent == len(self.data):
                conn.shutdown(now=now)
        while conn.readable:
            self.received += conn.receive(self.read_chunk, now=now)
        if conn.at_eof and self.done_at is None:
            self.done_at = now
        if conn.at_eof and self.sent == len(self.data) and conn.state is TcpState.CLOSE_WAIT:
            conn.close(now=now)


class Transfer:
    """A connects to B; each sends its bytes, half-closes, and reads the other's until EOF."""

    def __init__(
        self,
        link: SimLink,
        data_ab: bytes,
        data_ba: bytes = b"",
        *,
        read_chunk: int = 1 << 20,
        listener: TcpListener | None = None,
    ) -> None:
        self.link = link
        self.listener = listener if listener is not None else link.b.listen(None, 80, 16)
        self.client = _App(data_ab, read_chunk)
        self.server = _App(data_ba, read_chunk)
        self.client.conn = link.a.connect(link.addr_a, link.addr_b, 80, link.now)

    def _on_step(self) -> None:
        now = self.link.now
        changed_a = self.link.a.pop_changed()
        changed_b = self.link.b.pop_changed()
        if self.listener in changed_b or self.server.conn is None:
            conn = self.listener.accept()
            if conn is not None:
                self.server.conn = conn
        if changed_a:
            self.client.service(now)
        if changed_b and self.server.conn is not None:
            self.server.service(now)

    def finished(self) -> bool:
        c, s = self.client.conn, self.server.conn
        return (
            c is not None
            and s is not None
            and c.state in (TcpState.CLOSED, TcpState.TIME_WAIT)
            and s.state in (TcpState.CLOSED, TcpState.TIME_WAIT)
        )

    def run(self, until: float = 3600.0) -> None:
        self.link.run(until=until, stop=self.finished, on_step=self._on_step)

    def check(self) -> None:
        """Every byte delivered exactly once, in order, both ways."""
        seed = self.link.seed
        assert bytes(self.server.received) == bytes(self.client.data), f"a->b stream differs (seed {seed})"
        assert bytes(self.client.received) == bytes(self.server.data), f"b->a stream differs (seed {seed})"
        assert self.finished(), f"not closed: {self.client.conn} {self.server.conn} (seed {seed})"
