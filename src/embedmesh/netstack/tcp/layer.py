"""TcpLayer: every TCP connection and listener of one node, demultiplexing, timers and resets.

Sans-IO. Input: :meth:`TcpLayer.segment_received` (the IP payload of one TCP packet with its raw
source and destination addresses) and :meth:`TcpLayer.handle_timeout`. Output: the ``transmit(src,
dst, segment)`` callback given at construction, called with raw addresses and the complete TCP
segment (checksum included); the IP layer wraps it in a header. The owner learns which connections and
listeners changed from :meth:`TcpLayer.pop_changed` (or their ``on_change`` hooks), without scanning.

Timers: one heap for all connections. A connection keeps its timers as plain deadlines and the heap
holds at most one live entry per connection (its earliest deadline when scheduled); pushing later
deadlines is skipped, and an entry that fires early just reschedules. So restarting the RTO on every
ACK costs a float store, :meth:`next_deadline` is O(1) amortized and :meth:`handle_timeout` only
touches connections that are due.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import math
import random
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import replace

from embedmesh.errors import ParseError
from embedmesh.netstack.tcp.config import TcpConfig, TcpState
from embedmesh.netstack.tcp.connection import TcpConnection
from embedmesh.netstack.tcp.isn import (
    check_cookie,
    cookie_options,
    cookie_tsval,
    initial_sequence_number,
    make_cookie,
    timestamp_offset,
)
from embedmesh.netstack.tcp.listener import TcpListener
from embedmesh.netstack.tcp.sequence import seq_diff
from embedmesh.wire.checksum import ones_sum
from embedmesh.wire.tcp import (
    ACK,
    FIN,
    RST,
    SYN,
    TS_HEADER,
    TS_PREFIX,
    URG,
    TcpSegment,
    build_tcp,
    parse_tcp,
    pseudo_base,
)

__all__ = ["ConnKey", "TcpLayer", "Transmit"]

ConnKey = tuple[bytes, int, bytes, int]
Transmit = Callable[[bytes, bytes, bytes], None]

_M = 0xFFFFFFFF
_INF = math.inf
_TIME_WAIT = TcpState.TIME_WAIT
_CLOSED = TcpState.CLOSED
_ESTABLISHED = TcpState.ESTABLISHED
_unpack_ts_header = TS_HEADER.unpack_from
# Flags that send a segment down the general path (PSH, ECE and CWR do not).
_NOT_PREDICTED = SYN | FIN | RST | URG


class TcpLayer:
    """The TCP of one node.

    ``transmit(src, dst, segment)`` receives every outgoing segment. ``rng`` supplies all randomness
    (the ISN, timestamp and SYN-cookie keys, ephemeral ports): by default the operating system's
    CSPRNG (:class:`random.SystemRandom`); a simulation hands in a seeded ``random.Random`` to be
    reproducible. ``config`` (or just ``mtu``) sets the defaults of every connection.
    """

    def __init__(
        self,
        transmit: Transmit,
        *,
        rng: random.Random | None = None,
        config: TcpConfig | None = None,
        mtu: int | None = None,
        isn_key: bytes | None = None,
    ) -> None:
        config = config or TcpConfig()
        if mtu is not None:
            config = replace(config, mtu=mtu)
        self.config = config
        self._transmit_cb = transmit
        rng = rng if rng is not None else random.SystemRandom()
        self._rng = rng
        # Drawn once; after that, connection setup hashes with them and the per-packet path never
        # touches the random source.
        self._isn_key = isn_key if isn_key is not None else rng.randbytes(16)
        self._ts_key = rng.randbytes(16)
        self._cookie_key = rng.randbytes(16)
        self._conns: dict[ConnKey, TcpConnection] = {}
        self._listeners: dict[tuple[bytes | None, int], TcpListener] = {}
        self._time_wait: OrderedDict[ConnKey, TcpConnection] = OrderedDict()
        self._heap: list[tuple[float, int, TcpConnection]] = []
        self._tick = itertools.count()
        self._dirty: dict[TcpConnection, None] = {}
        self._changed_set: set[TcpConnection | TcpListener] = set()
        self._pseudo_cache: dict[tuple[bytes, bytes], int] = {}
        self._challenge_tokens = float(config.challenge_ack_limit)
        self._challenge_time = 0.0
        self.counters: Counter[str] = Counter()
        self._verify = config.verify_checksum
        self.now = 0.0
        #: Inside :meth:`begin_batch` … :meth:`end_batch`: ACKs that in-order data makes due wait for
        #: the end of the batch (one per connection, like GRO), instead of one per two segments.
        self._batching = False
        self._stretch_limit = config.max_ack_stretch
        self._ack_due: dict[TcpConnection, None] = {}

    # ---------------------------------------------------------------------------------------------
    # Owner API
    # ---------------------------------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        """Connections in the demultiplexing table (TIME-WAIT and half-open included)."""
        return len(self._conns)

    @property
    def time_wait_count(self) -> int:
        return len(self._time_wait)

    def connections(self) -> list[TcpConnection]:
        return list(self._conns.values())

    def listen(self, local_addr: bytes | None, port: int, backlog: int = 128) -> TcpListener:
        """Listen on ``port`` of ``local_addr`` (None: every address). Port 0 picks a free port."""
        if local_addr is not None and len(local_addr) not in (4, 16):
            raise ValueError("local_addr must be a raw 4- or 16-byte address or None")
        if port == 0:
            port = self._free_listen_port(local_addr)
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is outside 1..65535")
        if (local_addr, port) in self._listeners:
            raise OSError(errno.EADDRINUSE, f"port {port} is already listening")
        listener = TcpListener(self, local_addr, port, backlog)
        self._listeners[(local_addr, port)] = listener
        return listener

    def connect(
        self,
        local_addr: bytes,
        remote_addr: bytes,
        remote_port: int,
        now: float,
        *,
        local_port: int | None = None,
    ) -> TcpConnection:
        """Open a connection (send SYN now); the owner sees it change once established or failed."""
        if len(local_addr) not in (4, 16) or len(remote_addr) != len(local_addr):
            raise ValueError("local and remote addresses must both be raw IPv4 (4 bytes) or IPv6 (16 bytes)")
        if not 0 < remote_port < 65536:
            raise ValueError(f"remote port {remote_port} is outside 1..65535")
        self.now = now
        if local_port is None:
            local_port = self._ephemeral_port(local_addr, remote_addr, remote_port)
        key = (local_addr, local_port, remote_addr, remote_port)
        old = self._conns.get(key)
        if old is not None:
            if old.state is not _TIME_WAIT:
                raise OSError(errno.EADDRINUSE, "that 4-tuple is in use")
            old._set_closed(None)
        iss = initial_sequence_number(self._isn_key, local_addr, remote_addr, local_port, remote_port, now)
        if old is not None:
            iss = (old.snd_max + 0x10000) & _M  # new incarnation above the old one (RFC 9293 §3.4.1)
        conn = self._new_connection(local_addr, local_port, remote_addr, remote_port, iss)
        self._conns[key] = conn
        conn._open_active(now)
        self._reschedule(conn)
        return conn

    def segment_received(
        self,
        src: bytes,
        dst: bytes,
        segment: bytes | bytearray | memoryview,
        now: float,
        segment_sum: int | None = None,
    ) -> None:
        """Process one TCP segment (the IP payload) from ``src`` to ``dst``. Never raises on bad input.

        ``segment_sum``, when the IP layer already summed the segment (it is congruent, modulo
        0xFFFF, to its one's-complement sum), saves reading it again to verify the checksum.
        """
        self.now = now
        verify = self._verify
        length = len(segment)
        if length >= 32:
            # Header prediction straight from the wire: a segment of an established connection with
            # only the timestamp option and no SYN/FIN/RST/URG skips TcpSegment and the general path.
            (sport, dport, seq, ack, offset, flags, window, _, _, prefix, tsval, tsecr) = _unpack_ts_header(
                segment
            )
            if offset == 0x80 and prefix == TS_PREFIX and flags & ACK and not flags & _NOT_PREDICTED:
                conn = self._conns.get((dst, dport, src, sport))
                if conn is not None and conn.state is _ESTABLISHED:
                    if verify:
                        if segment_sum is None:
                            segment_sum = ones_sum(segment)
                        # The connection's pseudo-header sum (addition does not care which address
                        # is the source).
                        if (segment_sum + conn._pseudo + length) % 0xFFFF:
                            self.counters["rx_malformed"] += 1
                            return
                        verify = False
                    view = segment if segment.__class__ is memoryview else memoryview(segment)
                    if conn._fast_receive(seq, ack, window, tsval, tsecr, view[32:], now):
                        return
        pair = (src, dst)
        pseudo = self._pseudo_cache.get(pair)
        if pseudo is None:
            if len(src) not in (4, 16) or len(dst) != len(src):
                self.counters["rx_bad_address"] += 1
                return
            if len(self._pseudo_cache) >= 4096:
                self._pseudo_cache.clear()
            pseudo = self._pseudo_cache[pair] = pseudo_base(src, dst)
        try:
            seg = parse_tcp(
                segment, src, dst, verify_checksum=verify, pseudo_sum=pseudo, segment_sum=segment_sum
            )
        except ParseError:
            self.counters["rx_malformed"] += 1
            return
        conn = self._conns.get((dst, seg.dst_port, src, seg.src_port))
        if conn is not None:
            if conn.state is _TIME_WAIT and seg.flags & (SYN | ACK | RST) == SYN:
                if not self._time_wait_reusable(conn, seg):
                    conn._receive(seg, now)
                    self._reschedule(conn)
                    return
                self.counters["time_wait_reused"] += 1
                conn._set_closed(None)
            else:
                conn._receive(seg, now)
                if conn.state is not _CLOSED:
                    self._reschedule(conn)
                return
        if seg.dst_port == 0 or seg.src_port == 0:
            self.counters["rx_port_zero"] += 1
            return
        listener = self._listeners.get((dst, seg.dst_port)) or self._listeners.get((None, seg.dst_port))
        if listener is not None:
            self._listener_input(listener, seg, src, dst, now)
            return
        self.counters["rx_closed_port"] += 1
        self._reset_for(seg, src, dst)

    def begin_batch(self) -> None:
        """Start a batch of input (the packets of one read from the link); see :meth:`end_batch`.

        Until :meth:`end_batch`, in-order data that would make an ACK due (every second full-sized
        segment, RFC 5681 §4.2) only marks the connection; :meth:`end_batch` then sends one ACK for
        all of it, as Linux does for a GRO batch. Everything else is unchanged: out-of-order data, a
        hole being filled, a FIN, a duplicate (D-SACK) and anything unacceptable are ACKed at once,
        an ACK still goes out whenever ``config.max_ack_stretch`` full segments wait for one, and the
        delayed-ACK timer runs as usual, so an owner that never ends the batch only delays ACKs.
        """
        self._batching = True

    def end_batch(self, now: float) -> None:
        """End the batch: send one ACK for each connection whose ACK the batch deferred."""
        self._batching = False
        due = self._ack_due
        if not due:
            return
        self._ack_due = {}
        self.now = now
        for conn in due:
            # An ACK that left in the meantime (with data, or forced) cleared _ack_pending.
            if conn._ack_pending and conn.state is not _CLOSED:
                conn._ack_now = True
                conn._output(now)
                self._reschedule(conn)

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timeout` should next run (the past if application calls left output)."""
        if self._dirty:
            return self.now
        heap = self._heap
        while heap:
            t, _, conn = heap[0]
            if conn._sched != t or conn.state is _CLOSED:
                heapq.heappop(heap)
                continue
            actual = conn._deadline()
            if actual > t:
                # The timer behind this entry was pushed back (an RTO restarted by an ACK, a delayed
                # ACK that went out with data): move the entry instead of waking up for nothing.
                heapq.heappop(heap)
                conn._sched = _INF
                if actual != _INF:
                    self._reschedule(conn)
                continue
            return t
        return None

    def handle_timeout(self, now: float) -> None:
        """Flush output left by application calls and fire every timer due at ``now``."""
        self.now = now
        if self._dirty:
            dirty = list(self._dirty)
            self._dirty.clear()
            for conn in dirty:
                if conn.state is not _CLOSED:
                    conn._output(now)
                    self._reschedule(conn)
        heap = self._heap
        while heap and heap[0][0] <= now:
            t, _, conn = heapq.heappop(heap)
            if conn._sched != t or conn.state is _CLOSED:
                continue
            conn._sched = _INF
            conn._on_timer(now)
            if conn.state is not _CLOSED:
                self._reschedule(conn)

    def pop_changed(self) -> set[TcpConnection | TcpListener]:
        """Connections and listeners whose application-visible state changed since the last call.

        Changes: established, new data readable or EOF, send space freed, state change (closing,
        closed), error (reset, refused, timeout); for a listener, a connection ready to accept.
        """
        changed = self._changed_set
        self._changed_set = set()
        return changed

    # ---------------------------------------------------------------------------------------------
    # Services for connections and listeners
    # ---------------------------------------------------------------------------------------------

    def _transmit(self, src: bytes, dst: bytes, segment: bytes) -> None:
        self._transmit_cb(src, dst, segment)

    def _reschedule(self, conn: TcpConnection) -> None:
        d = conn._deadline()
        if d < conn._sched:
            conn._sched = d
            heapq.heappush(self._heap, (d, next(self._tick), conn))

    def _mark_dirty(self, conn: TcpConnection) -> None:
        conn._dirty = True
        self._dirty[conn] = None

    def _changed(self, obj: TcpConnection | TcpListener) -> None:
        self._changed_set.add(obj)
        callback = obj.on_change
        if callback is not None:
            callback(obj)  # type: ignore[arg-type]

    def _challenge_ok(self, now: float) -> bool:
        """Layer-wide token bucket for challenge ACKs (RFC 5961 §7)."""
        limit = self.config.challenge_ack_limit
        tokens = self._challenge_tokens + (now - self._challenge_time) * limit
        self._challenge_time = now
        if tokens > limit:
            tokens = float(limit)
        if tokens < 1.0:
            self._challenge_tokens = tokens
            return False
        self._challenge_tokens = tokens - 1.0
        return True

    def _send_reset(
        self,
        local: bytes,
        remote: bytes,
        local_port: int,
        remote_port: int,
        seq: int,
        ack: int,
        with_ack: bool,
    ) -> None:
        flags = RST | ACK if with_ack else RST
        segment = build_tcp(local, remote, local_port, remote_port, seq, ack, flags, 0)
        self.counters["rst_sent"] += 1
        self._transmit_cb(local, remote, segment)

    def _reset_for(self, seg: TcpSegment, src: bytes, dst: bytes) -> None:
        """RFC 9293 §3.10.7.1: the reply to a segment for no connection."""
        flags = seg.flags
        if flags & RST:
            return
        if flags & ACK:
            self._send_reset(dst, src, seg.dst_port, seg.src_port, seg.ack, 0, False)
        else:
            seg_len = len(seg.payload) + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self._send_reset(dst, src, seg.dst_port, seg.src_port, 0, seg.seq + seg_len, True)

    def _on_passive_established(self, conn: TcpConnection) -> None:
        listener = conn.listener
        if not isinstance(listener, TcpListener):
            return
        listener._pending.pop((conn.local_addr, conn.local_port, conn.remote_addr, conn.remote_port), None)
        listener._queue.append(conn)
        self._changed(listener)

    def _can_accept(self, conn: TcpConnection) -> bool:
        listener = conn.listener
        if not isinstance(listener, TcpListener):
            return True
        return not listener.closed and len(listener._queue) < listener.backlog

    def _on_time_wait(self, conn: TcpConnection) -> None:
        key = (conn.local_addr, conn.local_port, conn.remote_addr, conn.remote_port)
        tw = self._time_wait
        tw[key] = conn
        if len(tw) > self.config.max_time_wait:
            _, oldest = tw.popitem(last=False)
            self.counters["time_wait_evicted"] += 1
            oldest._set_closed(None)

    def _on_closed(self, conn: TcpConnection) -> None:
        key = (conn.local_addr, conn.local_port, conn.remote_addr, conn.remote_port)
        if self._conns.get(key) is conn:
            del self._conns[key]
        if self._time_wait.get(key) is conn:
            del self._time_wait[key]
        self._dirty.pop(conn, None)
        self._ack_due.pop(conn, None)
        conn._sched = _INF
        listener = conn.listener
        if isinstance(listener, TcpListener):
            listener._pending.pop(key, None)

    def _remove_listener(self, listener: TcpListener) -> None:
        key = (listener.local_addr, listener.port)
        if self._listeners.get(key) is listener:
            del self._listeners[key]

    # ---------------------------------------------------------------------------------------------
    # Internals
    # ---------------------------------------------------------------------------------------------

    def _new_connection(
        self, local_addr: bytes, local_port: int, remote_addr: bytes, remote_port: int, iss: int
    ) -> TcpConnection:
        return TcpConnection(
            self,
            local_addr,
            local_port,
            remote_addr,
            remote_port,
            iss,
            timestamp_offset(self._ts_key, local_addr, remote_addr, local_port, remote_port),
            self.config,
            pseudo_base(local_addr, remote_addr),
        )

    def _ephemeral_port(self, local: bytes, remote: bytes, remote_port: int) -> int:
        lo, hi = self.config.ephemeral_ports
        span = hi - lo + 1
        start = self._rng.randrange(span)
        conns = self._conns
        for i in range(span):
            port = lo + (start + i) % span
            if (local, port, remote, remote_port) not in conns:
                return port
        raise OSError(errno.EADDRNOTAVAIL, "no free ephemeral port for this destination")

    def _free_listen_port(self, local: bytes | None) -> int:
        lo, hi = self.config.ephemeral_ports
        span = hi - lo + 1
        start = self._rng.randrange(span)
        for i in range(span):
            port = lo + (start + i) % span
            if (local, port) not in self._listeners and (None, port) not in self._listeners:
                return port
        raise OSError(errno.EADDRNOTAVAIL, "no free port to listen on")

    def _time_wait_reusable(self, conn: TcpConnection, syn: TcpSegment) -> bool:
        """RFC 6191: a new SYN may end TIME-WAIT if its timestamp (or else its ISN) is newer."""
        if conn._ts_ok and syn.timestamp is not None:
            return seq_diff(syn.timestamp[0], conn._ts_recent) > 0
        return seq_diff(syn.seq, conn.rcv_nxt) > 0

    def _listener_input(
        self, listener: TcpListener, seg: TcpSegment, src: bytes, dst: bytes, now: float
    ) -> None:
        flags = seg.flags
        if flags & RST:
            return
        if flags & ACK:
            if (
                not flags & SYN
                and self.config.syn_cookies
                and self._cookie_connection(listener, seg, src, dst, now)
            ):
                return
            # RFC 9293 §3.10.7.2: any ACK in LISTEN gets <SEQ=SEG.ACK><CTL=RST>.
            self._send_reset(dst, src, seg.dst_port, seg.src_port, seg.ack, 0, False)
            return
        if not flags & SYN:
            return
        if len(listener._queue) >= listener.backlog:
            self.counters["listen_queue_full"] += 1
            return
        cfg = self.config
        if len(listener._pending) >= cfg.syn_backlog:
            if cfg.syn_cookies:
                self._send_cookie(seg, src, dst, now)
                return
            _, oldest = listener._pending.popitem(last=False)
            self.counters["syn_backlog_evicted"] += 1
            oldest._set_closed(None)
        if len(self._conns) >= cfg.max_connections:
            self.counters["connection_limit"] += 1
            return
        iss = initial_sequence_number(self._isn_key, dst, src, seg.dst_port, seg.src_port, now)
        conn = self._new_connection(dst, seg.dst_port, src, seg.src_port, iss)
        conn.listener = listener
        key = (dst, seg.dst_port, src, seg.src_port)
        self._conns[key] = conn
        listener._pending[key] = conn
        conn._open_passive(seg, now)
        self._reschedule(conn)

    def _send_cookie(self, syn: TcpSegment, src: bytes, dst: bytes, now: float) -> None:
        cfg = self.config
        peer_mss = syn.mss if syn.mss is not None else (536 if len(src) == 4 else 1220)
        iss = make_cookie(self._cookie_key, dst, src, syn.dst_port, syn.src_port, syn.seq, peer_mss, now)
        ts = None
        wscale = None
        sack = False
        if syn.timestamp is not None and cfg.timestamps:
            # Options survive only inside the timestamp (as Linux): without TSopt, no scaling, no SACK.
            sack = syn.sack_permitted and cfg.sack
            peer_ws = min(syn.wscale, 14) if cfg.window_scaling and syn.wscale is not None else None
            # The offset the connection that the cookie's ACK creates will have: same 4-tuple, same hash.
            offset = timestamp_offset(self._ts_key, dst, src, syn.dst_port, syn.src_port)
            ts_now = (int(now * 1000) + offset) & _M
            ts = (cookie_tsval(ts_now, peer_ws, sack), syn.timestamp[0])
            if peer_ws is not None:
                wscale = TcpConnection.wscale_for(cfg.recv_buffer)
        segment = build_tcp(
            dst,
            src,
            syn.dst_port,
            syn.src_port,
            iss,
            syn.seq + 1,
            SYN | ACK,
            min(cfg.recv_buffer, 0xFFFF),
            mss=cfg.mss_for(len(dst)),
            wscale=wscale,
            sack_permitted=sack,
            timestamp=ts,
        )
        self.counters["syn_cookies_sent"] += 1
        self._transmit_cb(dst, src, segment)

    def _cookie_connection(
        self, listener: TcpListener, seg: TcpSegment, src: bytes, dst: bytes, now: float
    ) -> bool:
        peer_isn = (seg.seq - 1) & _M
        cookie = (seg.ack - 1) & _M
        mss = check_cookie(self._cookie_key, dst, src, seg.dst_port, seg.src_port, peer_isn, cookie, now)
        if mss is None:
            return False
        if len(listener._queue) >= listener.backlog or len(self._conns) >= self.config.max_connections:
            self.counters["listen_queue_full"] += 1
            return True
        wscale: int | None = None
        sack = False
        ts_ok = seg.timestamp is not None
        if seg.timestamp is not None:
            wscale, sack = cookie_options(seg.timestamp[1])
        self.counters["syn_cookies_accepted"] += 1
        conn = self._new_connection(dst, seg.dst_port, src, seg.src_port, cookie)
        conn.listener = listener
        self._conns[(dst, seg.dst_port, src, seg.src_port)] = conn
        conn._open_from_cookie(seg, mss, wscale, sack, ts_ok, now)
        listener._queue.append(conn)
        self._changed(listener)
        # The ACK may carry data already.
        if len(seg.payload) or seg.flags & FIN:
            conn._receive(seg, now)
        self._reschedule(conn)
        return True
