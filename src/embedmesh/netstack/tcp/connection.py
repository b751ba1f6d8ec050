"""One TCP connection: the RFC 9293 state machine, its send/receive paths, timers and loss recovery.

A connection never runs by itself: its :class:`~embedmesh.netstack.tcp.layer.TcpLayer` feeds it parsed
segments and timer expiries, and hands its output to the layer's ``transmit`` callback. Sequence
numbers inside are *absolute* (see :mod:`.sequence`): they start at the ISN and only grow.

What is implemented, by RFC:
- RFC 9293: all states, simultaneous open and close, TIME-WAIT, RST generation, urgent data in-line;
- RFC 5961: RST/SYN challenge ACKs and ACK validation, with a rate limit that only ever applies to
  challenge ACKs and to replies to invalid *pure* ACKs, never to ACKs for data (smoltcp PR #1162);
- RFC 7323: window scale (kept per connection), timestamps with PAWS, lenient about a peer that omits
  TSopt on a segment (gVisor #11536);
- RFC 2018/2883/6675: SACK both ways, D-SACK, scoreboard-based loss recovery;
- RFC 5681/6582: fast retransmit and NewReno recovery when SACK is off;
- RFC 6298: RTO restarted on every ACK that advances (smoltcp #949), Karn, backoff;
- reordering: the duplicate threshold adapts to the reordering measured (a hole filled without a
  retransmission, or a D-SACK), and spurious reductions are undone (D-SACK, RFC 4015 Eifel with
  timestamps);
- delayed ACKs, Nagle, persist timer (zero-window probes), keepalive.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from embedmesh.netstack.tcp.buffers import ReceiveBuffer, SendBuffer
from embedmesh.netstack.tcp.config import TcpConfig, TcpState
from embedmesh.netstack.tcp.congestion import make_controller
from embedmesh.netstack.tcp.rtt import RttEstimator
from embedmesh.netstack.tcp.sack import SackScoreboard, receiver_blocks
from embedmesh.netstack.tcp.sequence import seq_lt, unwrap
from embedmesh.wire.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    URG,
    TcpSegment,
    build_tcp,
    build_tcp_burst,
    build_tcp_fast,
    burst_sum,
)

if TYPE_CHECKING:
    from embedmesh.netstack.tcp.layer import TcpLayer

__all__ = ["ConnectionStats", "TcpConnection"]

# The per-segment paths (_receive, _fast_path, _receive_ack, _receive_sack) inline
# sequence.unwrap (``ref + (((wire - ref + _HALF) & _M) - _HALF)``) and the modular comparisons:
# the calls cost 1,100 instructions per data segment in bench_dataplane.py (0.7 %). Everything
# else calls sequence.py.
_M = 0xFFFFFFFF
_HALF = 0x80000000
_INF = math.inf
_MIN_PEER_MSS = 64
_PREDICT_MASK = SYN | FIN | RST | URG | ACK
_PAWS_TOLERANCE = 1000  # peer timestamp ticks (1 s at the usual 1 ms tick)
_MAX_WSCALE = 14

CLOSED = TcpState.CLOSED
SYN_SENT = TcpState.SYN_SENT
SYN_RECEIVED = TcpState.SYN_RECEIVED
ESTABLISHED = TcpState.ESTABLISHED
FIN_WAIT_1 = TcpState.FIN_WAIT_1
FIN_WAIT_2 = TcpState.FIN_WAIT_2
CLOSE_WAIT = TcpState.CLOSE_WAIT
CLOSING = TcpState.CLOSING
LAST_ACK = TcpState.LAST_ACK
TIME_WAIT = TcpState.TIME_WAIT

# States in which our side may still (re)transmit data or FIN.
_SEND_STATES = frozenset({ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING, LAST_ACK})
# States in which the peer may still send us data.
_RECV_STATES = frozenset({ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2})
_SYNCHRONIZED = frozenset({ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT, CLOSING, LAST_ACK, TIME_WAIT})


class ConnectionStats:
    """Counters of one connection, for tests, benchmarks and debugging."""

    __slots__ = (
        "dsacks_received",
        "dup_segments_received",
        "fast_recoveries",
        "retransmits",
        "rto_timeouts",
        "segments_received",
        "segments_sent",
        "spurious_undos",
    )

    def __init__(self) -> None:
        self.segments_sent = 0
        self.segments_received = 0
        self.retransmits = 0
        self.fast_recoveries = 0
        self.rto_timeouts = 0
        self.dsacks_received = 0
        self.dup_segments_received = 0
        self.spurious_undos = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def _wscale_for(buffer: int) -> int:
    shift = 0
    while shift < _MAX_WSCALE and (0xFFFF << shift) < buffer:
        shift += 1
    return shift


class TcpConnection:
    """A TCP connection as the application sees it, and its protocol state.

    Application side (sans-IO): :meth:`send`, :meth:`receive`, :meth:`shutdown`, :meth:`close`,
    :meth:`abort`, and the properties :attr:`state`, :attr:`readable`, :attr:`writable`,
    :attr:`at_eof`, :attr:`error`, :attr:`established`. The methods take an optional ``now``; without
    it, the output they cause goes out on the layer's next ``handle_timeout`` (``next_deadline``
    reports it as due at once). Whenever something the application cares about changes, the
    connection lands in the layer's :meth:`~TcpLayer.pop_changed` set and ``on_change`` (if set) is
    called with it.
    """

    __slots__ = (
        "_ack_now",
        "_ack_pending",
        "_adv_mss",
        "_app_closed",
        "_cc",
        "_close_at",
        "_delack_at",
        "_dirty",
        "_dsack",
        "_dupacks",
        "_dupthresh",
        "_episode_rxt",
        "_fin_queued",
        "_high_rxt",
        "_in_recovery",
        "_invalid_reply_at",
        "_keepalive",
        "_keepalive_at",
        "_keepalive_count",
        "_keepalive_idle",
        "_keepalive_interval",
        "_keepalive_probes",
        "_last_ack_sent",
        "_last_rx",
        "_layer",
        "_nodelay",
        "_ooo_fin",
        "_passive",
        "_persist_at",
        "_persist_backoff",
        "_pseudo",
        "_rbuf",
        "_rcv_fin",
        "_rcv_mss",
        "_rcv_wscale",
        "_recent_sacks",
        "_recover",
        "_retries",
        "_rto_at",
        "_rtt_seq",
        "_rtt_time",
        "_rxt_degree",
        "_rxt_high",
        "_rxt_tsval",
        "_sack_ok",
        "_sbuf",
        "_sbuf_seq",
        "_sched",
        "_snd_mss",
        "_snd_wl1",
        "_snd_wl2",
        "_snd_wscale",
        "_ts_offset",
        "_ts_ok",
        "_ts_recent",
        "_undo_retrans",
        "_undo_state",
        "_ws_ok",
        "config",
        "error",
        "irs",
        "iss",
        "listener",
        "local_addr",
        "local_port",
        "max_snd_wnd",
        "on_change",
        "rcv_adv",
        "rcv_nxt",
        "remote_addr",
        "remote_port",
        "rtt",
        "scoreboard",
        "snd_max",
        "snd_nxt",
        "snd_una",
        "snd_wnd",
        "state",
        "stats",
        "user_data",
    )

    def __init__(
        self,
        layer: TcpLayer,
        local_addr: bytes,
        local_port: int,
        remote_addr: bytes,
        remote_port: int,
        iss: int,
        ts_offset: int,
        config: TcpConfig,
        pseudo: int,
    ) -> None:
        self._layer = layer
        self.config = config
        self.local_addr = local_addr
        self.local_port = local_port
        self.remote_addr = remote_addr
        self.remote_port = remote_port
        self._pseudo = pseudo
        self.state = CLOSED
        self.error: str | None = None
        self.on_change: Callable[[TcpConnection], None] | None = None
        self.user_data: object = None
        self.listener: object = None
        self.stats = ConnectionStats()
        self._passive = False
        self._app_closed = False
        self._dirty = False
        self._sched = _INF
        # send side
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_max = iss
        self.snd_wnd = 0
        self.max_snd_wnd = 0
        self._snd_wl1 = 0
        self._snd_wl2 = 0
        self._snd_wscale = 0
        self._sbuf = SendBuffer(config.send_buffer)
        self._sbuf_seq = iss + 1
        self._fin_queued = False
        self._adv_mss = config.mss_for(len(local_addr))
        self._snd_mss = self._adv_mss
        # receive side
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_adv = 0
        self._rcv_wscale = _wscale_for(config.recv_buffer) if config.window_scaling else 0
        self._rbuf = ReceiveBuffer(config.recv_buffer, config.max_ooo_blocks)
        self._rcv_fin = False
        self._ooo_fin: int | None = None
        self._rcv_mss = 536
        self._recent_sacks: list[int] = []
        self._dsack: tuple[int, int] | None = None
        # acknowledgments
        self._ack_now = False
        self._ack_pending = 0
        self._last_ack_sent = 0
        self._invalid_reply_at = -_INF
        # options
        self._ts_ok = config.timestamps
        self._ts_offset = ts_offset
        self._ts_recent = 0
        self._sack_ok = config.sack
        self._ws_ok = config.window_scaling
        self._nodelay = config.nodelay
        # timers
        self.rtt = RttEstimator(config.initial_rto, config.min_rto, config.max_rto)
        self._rto_at = _INF
        self._delack_at = _INF
        self._persist_at = _INF
        self._keepalive_at = _INF
        self._close_at = _INF
        self._persist_backoff = 0
        self._retries = 0
        self._rtt_seq: int | None = None
        self._rtt_time = 0.0
        self._keepalive = config.keepalive
        self._keepalive_idle = config.keepalive_idle
        self._keepalive_interval = config.keepalive_interval
        self._keepalive_count = config.keepalive_count
        self._keepalive_probes = 0
        self._last_rx = 0.0
        # loss recovery and congestion control
        self._cc = make_controller(config.congestion, self._adv_mss)
        self.scoreboard = SackScoreboard()
        self._in_recovery = False
        self._recover = iss
        self._high_rxt = iss
        self._dupacks = 0
        self._dupthresh = 3
        self._undo_state: dict[str, object] | None = None
        self._undo_retrans = 0
        self._rxt_tsval: int | None = None
        self._rxt_high = iss  # end of the highest byte ever retransmitted
        self._rxt_degree = 0  # reordering (segments) that the last fast retransmit assumed was loss
        self._episode_rxt: set[int] = set()  # start of every segment retransmitted in this fast recovery

    wscale_for = staticmethod(_wscale_for)

    def __repr__(self) -> str:
        return (
            f"<TcpConnection {_fmt(self.local_addr)}:{self.local_port} -> "
            f"{_fmt(self.remote_addr)}:{self.remote_port} {self.state.name}>"
        )

    # ---------------------------------------------------------------------------------------------
    # Application side
    # ---------------------------------------------------------------------------------------------

    @property
    def established(self) -> bool:
        """The handshake completed (true from ESTABLISHED on, until CLOSED)."""
        return self.state in _SYNCHRONIZED

    @property
    def readable(self) -> int:
        """Bytes :meth:`receive` can return right now."""
        return len(self._rbuf)

    @property
    def writable(self) -> int:
        """Bytes :meth:`send` would accept right now (0 once shut down or closed)."""
        if self._fin_queued or self.error is not None or self.state not in _WRITABLE_STATES:
            return 0
        return self._sbuf.free

    @property
    def at_eof(self) -> bool:
        """The peer sent FIN and every byte before it was received."""
        return self._rcv_fin and not self._rbuf

    @property
    def send_queued(self) -> int:
        """Bytes written but not yet acknowledged by the peer."""
        return len(self._sbuf)

    @property
    def cwnd(self) -> int:
        return self._cc.cwnd

    @property
    def congestion_control(self) -> str:
        return self._cc.name

    @property
    def mss(self) -> int:
        """Payload bytes per segment we send (peer's MSS clamped to ours, less the timestamp option)."""
        return self._snd_mss

    @property
    def nodelay(self) -> bool:
        return self._nodelay

    def set_nodelay(self, enabled: bool, now: float | None = None) -> None:
        """Turn Nagle's algorithm off (``True``) or on; turning it off flushes what Nagle held back."""
        self._nodelay = enabled
        if enabled:
            self._kick(now)

    def set_keepalive(
        self,
        enabled: bool,
        idle: float | None = None,
        interval: float | None = None,
        count: int | None = None,
    ) -> None:
        """Keepalive probes after ``idle`` s of silence, every ``interval`` s, giving up after ``count``."""
        self._keepalive = enabled
        if idle is not None:
            self._keepalive_idle = idle
        if interval is not None:
            self._keepalive_interval = interval
        if count is not None:
            self._keepalive_count = count
        self._keepalive_probes = 0
        if enabled and self.state in _SYNCHRONIZED and self.state is not TIME_WAIT:
            self._keepalive_at = self._last_rx + self._keepalive_idle
        else:
            self._keepalive_at = _INF
        self._layer._reschedule(self)

    def send(self, data: bytes | bytearray | memoryview, now: float | None = None) -> int:
        """Queue up to :attr:`writable` bytes of ``data``; return how many were taken.

        Raises ``ConnectionResetError``/``TimeoutError``/``ConnectionRefusedError`` if the connection
        failed, ``BrokenPipeError`` after :meth:`shutdown`/:meth:`close` or once it is closed.
        """
        self._raise_if_failed()
        if self._fin_queued or self.state not in _WRITABLE_STATES:
            raise BrokenPipeError("the connection is shut down for writing")
        n = self._sbuf.write(data)
        if n:
            self._kick(now)
        return n

    def receive(self, max_bytes: int = 65536, now: float | None = None) -> bytes:
        """Return up to ``max_bytes`` received bytes; ``b""`` when none (see :attr:`at_eof`)."""
        rbuf = self._rbuf
        if not rbuf:
            return b""
        data = rbuf.read(max_bytes)
        if self.state in _RECV_STATES:
            # Window update once the window has at least doubled from a half-closed one (as Linux).
            adv = self.rcv_adv - self.rcv_nxt
            avail = rbuf.capacity - len(rbuf)
            if 2 * adv <= rbuf.capacity and avail >= 2 * adv + self._adv_mss:
                self._ack_now = True
                self._kick(now)
        return data

    def shutdown(self, now: float | None = None) -> None:
        """Half-close: send FIN after everything queued; receiving continues."""
        if self._fin_queued:
            return
        st = self.state
        if st is SYN_SENT and not self._sbuf:
            self._set_closed(None)
            return
        if st in (SYN_SENT, SYN_RECEIVED, ESTABLISHED, CLOSE_WAIT):
            self._fin_queued = True
            if st is ESTABLISHED:
                self._set_state(FIN_WAIT_1)
            elif st is CLOSE_WAIT:
                self._set_state(LAST_ACK)
            self._kick(now)

    def close(self, now: float | None = None) -> None:
        """Close both directions. Unread received data turns this into :meth:`abort` (RFC 2525 §2.17)."""
        self._app_closed = True
        if self.state in (CLOSED, TIME_WAIT):
            return
        if self._rbuf or self.state is SYN_SENT:
            self.abort(now)
            return
        self.shutdown(now)
        if self.state is FIN_WAIT_2:
            self._close_at = min(self._close_at, self._layer.now + self.config.fin_wait2_timeout)
            self._layer._reschedule(self)

    def abort(self, now: float | None = None) -> None:
        """Reset the connection: send RST (if synchronized) and forget it."""
        self._app_closed = True
        if self.state in (CLOSED, TIME_WAIT):
            if self.state is TIME_WAIT:
                self._set_closed(None)
            return
        if self.state is not SYN_SENT:
            t = self._layer.now if now is None else now
            self._emit(RST | ACK, self.snd_max, b"", t)
        self._set_closed(None)

    def _raise_if_failed(self) -> None:
        err = self.error
        if err is None:
            return
        if err == "reset":
            raise ConnectionResetError("the peer reset the connection")
        if err == "refused":
            raise ConnectionRefusedError("the peer refused the connection")
        raise TimeoutError("the connection timed out")

    def _kick(self, now: float | None) -> None:
        if now is None:
            self._layer._mark_dirty(self)
        else:
            self._layer.now = now
            self._output(now)
            self._layer._reschedule(self)

    # ---------------------------------------------------------------------------------------------
    # Handshake
    # ---------------------------------------------------------------------------------------------

    def _open_active(self, now: float) -> None:
        self.state = SYN_SENT
        self._last_rx = now
        self.snd_nxt = self.iss + 1
        self.snd_max = self.iss + 1
        self._rtt_seq = self.iss + 1
        self._rtt_time = now
        self._send_syn(now)
        self._rto_at = now + self.rtt.rto

    def _open_passive(self, syn: TcpSegment, now: float) -> None:
        """Answer a listener's SYN with SYN-ACK (state SYN-RECEIVED)."""
        self._passive = True
        self.state = SYN_RECEIVED
        self._last_rx = now
        self._accept_syn_options(syn)
        self.snd_nxt = self.iss + 1
        self.snd_max = self.iss + 1
        self._rtt_seq = self.iss + 1
        self._rtt_time = now
        self._send_syn(now)
        self._rto_at = now + self.rtt.rto

    def _open_from_cookie(
        self, ack: TcpSegment, mss: int, wscale: int | None, sack: bool, ts_ok: bool, now: float
    ) -> None:
        """Create the connection straight in ESTABLISHED from a valid SYN-cookie ACK."""
        self._passive = True
        self._last_rx = now
        self.irs = (ack.seq - 1) & _M
        self.rcv_nxt = self.irs + 1
        self._last_ack_sent = self.rcv_nxt
        self.snd_nxt = self.snd_max = self.snd_una = self.iss + 1
        self._ts_ok = self._ts_ok and ts_ok and ack.timestamp is not None
        if wscale is not None and self._ws_ok:
            self._snd_wscale = min(wscale, _MAX_WSCALE)
        else:
            self._ws_ok = False
            self._snd_wscale = 0
            self._rcv_wscale = 0
        self._sack_ok = self._sack_ok and sack
        if self._ts_ok and ack.timestamp is not None:
            self._ts_recent = ack.timestamp[0]
        self._set_mss(max(mss, _MIN_PEER_MSS))
        # The window we advertised in the cookie SYN-ACK was unscaled and at most 65535.
        self.rcv_adv = self.rcv_nxt + min(self._rbuf.capacity, 0xFFFF)
        self.snd_wnd = ack.window << self._snd_wscale
        self.max_snd_wnd = self.snd_wnd
        self._snd_wl1 = self.rcv_nxt
        self._snd_wl2 = self.snd_una
        self.state = ESTABLISHED
        if self._keepalive:
            self._keepalive_at = now + self._keepalive_idle

    def _accept_syn_options(self, syn: TcpSegment) -> None:
        """Record the peer's ISN and negotiate options from its SYN (or SYN-ACK)."""
        self.irs = syn.seq
        self.rcv_nxt = syn.seq + 1
        self._last_ack_sent = self.rcv_nxt
        if syn.wscale is not None and self._ws_ok:
            # RFC 7323 §2.3: a shift above 14 is treated as 14.
            self._snd_wscale = min(syn.wscale, _MAX_WSCALE)
        else:
            self._ws_ok = False
            self._snd_wscale = 0
            self._rcv_wscale = 0
        self._sack_ok = self._sack_ok and syn.sack_permitted
        self._ts_ok = self._ts_ok and syn.timestamp is not None
        if self._ts_ok and syn.timestamp is not None:
            self._ts_recent = syn.timestamp[0]
        # Without the option: RFC 9293 §3.7.1 (IPv4) and RFC 8200 §8.3 (IPv6) defaults.
        default_mss = 536 if len(self.local_addr) == 4 else 1220
        peer_mss = syn.mss if syn.mss is not None else default_mss
        self._set_mss(max(peer_mss, _MIN_PEER_MSS))
        # The window in a SYN is never scaled (RFC 7323 §2.2).
        self.snd_wnd = syn.window
        self.max_snd_wnd = syn.window
        self._snd_wl1 = self.irs
        self._snd_wl2 = self.iss

    def _set_mss(self, peer_mss: int) -> None:
        mss = min(peer_mss, self._adv_mss)
        if self._ts_ok:
            mss -= 12
        self._snd_mss = mss
        self._rcv_mss = min(536, mss)
        self._cc.set_mss(mss)

    def _send_syn(self, now: float) -> None:
        """(Re)send our SYN or SYN-ACK with the options for this side of the negotiation."""
        synack = self.state is SYN_RECEIVED
        window = min(self._rbuf.capacity, 0xFFFF)
        ts = None
        if self._ts_ok:
            ts = ((int(now * 1000) + self._ts_offset) & _M, self._ts_recent if synack else 0)
        wscale = self._rcv_wscale if self._ws_ok else None
        if synack:
            self.rcv_adv = self.rcv_nxt + window
            self._last_ack_sent = self.rcv_nxt
        seg = build_tcp(
            self.local_addr,
            self.remote_addr,
            self.local_port,
            self.remote_port,
            self.iss,
            self.rcv_nxt if synack else 0,
            (SYN | ACK) if synack else SYN,
            window,
            mss=self._adv_mss,
            wscale=wscale,
            sack_permitted=self._sack_ok,
            timestamp=ts,
            pseudo_sum=self._pseudo,
        )
        self.stats.segments_sent += 1
        self._layer._transmit(self.local_addr, self.remote_addr, seg)

    def _handshake_timeout(self, now: float) -> None:
        self._retries += 1
        if self._retries > self.config.syn_retries:
            self._set_closed("timeout")
            return
        self.rtt.backoff()
        self._rtt_seq = None
        self.stats.retransmits += 1
        self._send_syn(now)
        self._rto_at = now + self.rtt.rto

    def _become_established(self, now: float) -> None:
        self._set_state(ESTABLISHED)
        if self._keepalive:
            self._keepalive_at = now + self._keepalive_idle
        if self._fin_queued:
            self._set_state(FIN_WAIT_1)
        if self._passive:
            self._layer._on_passive_established(self)

    # ---------------------------------------------------------------------------------------------
    # Segment arrival
    # ---------------------------------------------------------------------------------------------

    def _receive(self, seg: TcpSegment, now: float) -> None:
        """Process one segment addressed to this connection (RFC 9293 §3.10.7)."""
        self.stats.segments_received += 1
        st = self.state
        if st is SYN_SENT:
            self._receive_syn_sent(seg, now)
            return
        if st is CLOSED:
            return
        self._last_rx = now
        self._keepalive_probes = 0
        flags = seg.flags
        payload = seg.payload
        plen = len(payload)
        rcv_nxt = self.rcv_nxt
        seq = rcv_nxt + (((seg.seq - rcv_nxt + _HALF) & _M) - _HALF)
        if (
            st is ESTABLISHED
            and seq == rcv_nxt
            and flags & _PREDICT_MASK == ACK
            and not seg.sack_blocks
            and not self._in_recovery
        ):
            tsopt = seg.timestamp
            tsval, tsecr = tsopt if tsopt is not None else (-1, 0)
            if self._fast_path(seq, seg.ack, seg.window, tsval, tsecr, payload, now):
                return
        if flags & RST:
            self._receive_rst(seq, now)
            return
        ts = seg.timestamp if self._ts_ok else None
        # PAWS (RFC 7323 §5.3); a segment without TSopt is let through (gVisor #11536). Segments less
        # than _PAWS_TOLERANCE ticks older than TS.Recent pass: they are reordered, not from an earlier
        # wrap of the sequence space (which takes 2**31 bytes: seconds at any rate this stack reaches).
        # Strict PAWS drops every segment overtaken by a retransmission of the hole before it.
        if ts is not None and _PAWS_TOLERANCE < ((self._ts_recent - ts[0]) & _M) < _HALF:
            self._layer.counters["paws_dropped"] += 1
            self._reply_unacceptable(seq, plen + (flags & (SYN | FIN) != 0), now)
            return
        seg_len = plen
        if flags & SYN:
            seg_len += 1
        if flags & FIN:
            seg_len += 1
        wnd = self.rcv_adv - rcv_nxt
        if wnd < 0:
            wnd = 0
        if seg_len == 0:
            ok = seq == rcv_nxt if wnd == 0 else rcv_nxt <= seq < rcv_nxt + wnd
        else:
            end = seq + seg_len
            ok = wnd > 0 and (rcv_nxt <= seq < rcv_nxt + wnd or rcv_nxt < end <= rcv_nxt + wnd)
        if not ok:
            self._receive_unacceptable(seg, seq, seg_len, wnd, now)
            return
        if flags & SYN:
            # RFC 5961 §4: a SYN in a synchronized state (or in window in SYN-RECEIVED) gets a
            # challenge ACK, whatever its sequence number.
            self._challenge_ack(now)
            return
        if not flags & ACK:
            return
        if ts is not None and seq <= self._last_ack_sent and ((ts[0] - self._ts_recent) & _M) < _HALF:
            self._ts_recent = ts[0]
        if st is SYN_RECEIVED:
            ack = unwrap(seg.ack, self.snd_una)
            if not self.snd_una < ack <= self.snd_max:
                self._send_rst(seg.ack, 0, False, now)
                return
            if not self._layer._can_accept(self):
                # The accept queue is full: ignore the ACK; the peer retransmits (as Linux).
                self._layer.counters["accept_queue_overflow"] += 1
                return
            self.snd_wnd = seg.window << self._snd_wscale
            self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
            self._snd_wl1 = seq
            self._snd_wl2 = ack
            self._become_established(now)
            st = self.state
        if not self._receive_ack(seg, seq, plen, ts, now):
            return
        if seg_len and self.state is not CLOSED:
            self._receive_text(seq, payload, flags & FIN, now)
        if self.state is not CLOSED:
            self._output(now)

    def _fast_receive(
        self, seq_w: int, ack_w: int, window: int, tsval: int, tsecr: int, payload: memoryview, now: float
    ) -> bool:
        """The layer's entry for an ESTABLISHED segment with only ACK (and PSH/ECE/CWR) set and the
        usual timestamp option, straight from the header fields: :meth:`_fast_path` without a
        :class:`TcpSegment`. False, having changed nothing, when it needs the general path; when
        True, the connection's timers are already rescheduled."""
        rcv_nxt = self.rcv_nxt
        if seq_w != rcv_nxt & _M or self._in_recovery:
            return False
        if not self._fast_path(rcv_nxt, ack_w, window, tsval, tsecr, payload, now):
            return False
        self.stats.segments_received += 1
        self._last_rx = now
        self._keepalive_probes = 0
        return True

    def _fast_path(
        self, seq: int, ack_w: int, window: int, tsval: int, tsecr: int, payload: memoryview, now: float
    ) -> bool:
        """Header prediction: the two segments of a bulk transfer, handled in one pass.

        A pure ACK that acknowledges new data (sender side), or in-order data that acknowledges nothing
        new (receiver side), with an unchanged window, no SACK, no recovery and in-order arrival
        (``seq`` is RCV.NXT). ``tsval`` is -1 without a timestamp option. Returns False, having changed
        nothing, when the segment needs the general path.
        """
        if tsval >= 0 and self._ts_ok:
            if _PAWS_TOLERANCE < ((self._ts_recent - tsval) & _M) < _HALF:
                return False
        else:
            tsval = -1
        if window << self._snd_wscale != self.snd_wnd:
            return False
        una = self.snd_una
        ack = una + (((ack_w - una + _HALF) & _M) - _HALF)
        plen = len(payload)
        if plen == 0:
            if not una < ack <= self.snd_max or self.scoreboard:
                return False
            if tsval >= 0 and seq <= self._last_ack_sent and ((tsval - self._ts_recent) & _M) < _HALF:
                self._ts_recent = tsval
            self._snd_wl1 = seq
            self._snd_wl2 = ack
            self._ack_advance(ack, (tsval, tsecr) if tsval >= 0 else None, 0, now)
            if self.state is not CLOSED:
                self._output(now)
                self._layer._reschedule(self)
            return True
        rbuf = self._rbuf
        if ack != una or rbuf._ooo_starts or self._app_closed or plen > self.rcv_adv - seq:
            return False
        if tsval >= 0 and seq <= self._last_ack_sent and ((tsval - self._ts_recent) & _M) < _HALF:
            self._ts_recent = tsval
        self._snd_wl1 = seq
        self._snd_wl2 = ack
        if payload.obj.__class__ is bytes:
            # ReceiveBuffer.append, inlined: a view of an immutable packet is queued as it is.
            rbuf._chunks.append(payload)
            rbuf._size += plen
        else:
            rbuf.append(payload)
        self.rcv_nxt = seq + plen
        if plen > self._rcv_mss:
            self._rcv_mss = plen if plen <= self._adv_mss else self._adv_mss
        pending = self._ack_pending + plen
        self._ack_pending = pending
        if pending >= 2 * self._rcv_mss:
            self._data_ack_due(pending, now)
        elif self._delack_at == _INF:
            delay = self.config.delayed_ack
            if delay > 0:
                self._delack_at = now + delay
            else:
                self._ack_now = True
        layer = self._layer
        layer._changed(self)
        # A pure receiver has nothing to send but a due ACK: skip the output machinery then. The
        # only timer this path can bring forward is the delayed ACK (the layer's heap holds the
        # earliest deadline; see TcpLayer._reschedule).
        if self._ack_now or self._fin_queued or self.snd_nxt < self.snd_max or self._sbuf._size:
            self._output(now)
            layer._reschedule(self)
        elif self._delack_at < self._sched:
            layer._reschedule(self)
        return True

    def _data_ack_due(self, pending: int, now: float) -> None:
        """In-order data made an ACK due (every second full-sized segment, RFC 5681 §4.2).

        In the layer's batch mode the ACK waits for the end of the batch (one per batch, as with
        GRO), unless ``max_ack_stretch`` segments already wait or a D-SACK must be reported.
        """
        layer = self._layer
        if layer._batching and self._dsack is None and pending < layer._stretch_limit * self._rcv_mss:
            layer._ack_due[self] = None
            if self._delack_at == _INF and self.config.delayed_ack > 0:
                self._delack_at = now + self.config.delayed_ack
        else:
            self._ack_now = True

    def _receive_syn_sent(self, seg: TcpSegment, now: float) -> None:
        flags = seg.flags
        ack_ok = False
        if flags & ACK:
            ack = unwrap(seg.ack, self.snd_una)
            if ack <= self.iss or ack > self.snd_max:
                if not flags & RST:
                    self._send_rst(seg.ack, 0, False, now)
                return
            ack_ok = True
        if flags & RST:
            if ack_ok:
                self._set_closed("refused")
            return
        if not flags & SYN:
            return
        self._last_rx = now
        self._accept_syn_options(seg)
        if ack_ok:
            self.snd_una = self.iss + 1
            self._snd_wl2 = self.snd_una
            if self._ts_ok and seg.timestamp is not None and seg.timestamp[1]:
                self._rtt_from_tsecr(seg.timestamp[1], now)
            elif self._rtt_seq is not None:
                self.rtt.sample(now - self._rtt_time)
            self._rtt_seq = None
            self._retries = 0
            self.rtt.reset_backoff()
            self._rto_at = _INF
            self.rcv_adv = self.rcv_nxt
            self._become_established(now)
            self._ack_now = True
            self._output(now)
        else:
            # Simultaneous open (RFC 9293 §3.5, figure 8): answer with SYN-ACK, same ISN.
            self._set_state(SYN_RECEIVED)
            self._send_syn(now)
            self._rto_at = now + self.rtt.rto

    def _receive_rst(self, seq: int, now: float) -> None:
        st = self.state
        if st is TIME_WAIT:
            # RFC 1337: ignore RST in TIME-WAIT rather than be assassinated.
            return
        rcv_nxt = self.rcv_nxt
        if seq == rcv_nxt:
            if st is SYN_RECEIVED and self._passive:
                self._set_closed(None)
            else:
                self._set_closed("reset" if st is not SYN_RECEIVED else "refused")
            return
        wnd = max(self.rcv_adv - rcv_nxt, 1)
        if rcv_nxt < seq < rcv_nxt + wnd:
            self._challenge_ack(now)  # RFC 5961 §3.2
        else:
            self._layer.counters["rst_out_of_window"] += 1

    def _receive_unacceptable(self, seg: TcpSegment, seq: int, seg_len: int, wnd: int, now: float) -> None:
        flags = seg.flags
        st = self.state
        plen = len(seg.payload)
        rcv_nxt = self.rcv_nxt
        if st is SYN_RECEIVED and flags & SYN:
            if seq == self.irs and not flags & ACK:
                self._send_syn(now)  # the peer retransmitted its SYN: our SYN-ACK was lost
                return
            if flags & ACK and seq + 1 == rcv_nxt:
                # Simultaneous open: the peer's SYN-ACK acknowledges our SYN.
                ack = unwrap(seg.ack, self.snd_una)
                if ack == self.snd_max:
                    self.snd_una = ack
                    self._snd_wl2 = ack
                    self._rto_at = _INF
                    self._retries = 0
                    self._rtt_seq = None
                    self._become_established(now)
                    self._output(now)
                return
        if st is TIME_WAIT and flags & FIN:
            # A retransmitted FIN: our last ACK was lost. ACK again, restart 2*MSL (RFC 9293).
            self._close_at = now + self.config.time_wait
            self._send_ack(now)
            return
        if wnd == 0 and seq == rcv_nxt and flags & ACK and st is not SYN_RECEIVED:
            # RFC 9293 §3.10.7.4: with a zero window, still take the ACK and window of a probe.
            self._receive_ack(seg, seq, len(seg.payload) or 1, None, now)
            if self.state is not CLOSED:
                self._ack_now = True
                self._output(now)
            return
        if plen and seq < rcv_nxt:
            self.stats.dup_segments_received += 1
            self._dsack = (seq, min(seq + plen, rcv_nxt))
        self._reply_unacceptable(seq, seg_len, now)

    def _reply_unacceptable(self, seq: int, seg_len: int, now: float) -> None:
        """RFC 9293: an unacceptable segment is answered with an ACK.

        Only replies to *pure* ACKs are rate limited (these are what two confused stacks bounce off
        each other, smoltcp #29); a keepalive or zero-window probe (seq = RCV.NXT-1) and any segment
        carrying data or SYN/FIN is always answered, so a lossy link keeps its ACKs (smoltcp PR #1162).
        """
        if seg_len == 0 and seq != self.rcv_nxt - 1:
            if now - self._invalid_reply_at < self.config.invalid_ack_interval:
                self._layer.counters["invalid_ack_rate_limited"] += 1
                return
            self._invalid_reply_at = now
        self._send_ack(now)

    def _challenge_ack(self, now: float) -> None:
        """RFC 5961 challenge ACK, limited per connection and per layer (§7)."""
        if now - self._invalid_reply_at < self.config.invalid_ack_interval or not self._layer._challenge_ok(
            now
        ):
            self._layer.counters["challenge_ack_rate_limited"] += 1
            return
        self._invalid_reply_at = now
        self._layer.counters["challenge_acks"] += 1
        self._send_ack(now)

    def _receive_ack(
        self, seg: TcpSegment, seq: int, plen: int, ts: tuple[int, int] | None, now: float
    ) -> bool:
        """ACK processing (RFC 9293 §3.10.7.4 fifth step); False if the segment must be dropped."""
        una = self.snd_una
        ack = una + (((seg.ack - una + _HALF) & _M) - _HALF)
        if ack > self.snd_max:
            # Acknowledges something never sent: reply with an ACK (rate limited), drop.
            self._layer.counters["ack_unsent_data"] += 1
            self._reply_unacceptable(seq, plen, now)
            return False
        if ack < una - self.max_snd_wnd - 1:
            # RFC 5961 §5.2: too old to be legitimate.
            self._challenge_ack(now)
            return False
        wnd = seg.window << self._snd_wscale
        window_changed = False
        wl1 = self._snd_wl1
        if wl1 < seq or (wl1 == seq and self._snd_wl2 <= ack):
            if wnd != self.snd_wnd:
                window_changed = True
                self.snd_wnd = wnd
                if wnd > self.max_snd_wnd:
                    self.max_snd_wnd = wnd
            self._snd_wl1 = seq
            self._snd_wl2 = ack
        if self._persist_at != _INF and wnd:
            self._persist_at = _INF
            self._persist_backoff = 0
        newly_sacked = 0
        fack = self.scoreboard.highest
        if seg.sack_blocks and self._sack_ok:
            newly_sacked = self._receive_sack(seg.sack_blocks, ack, ts, now)
        if ack > una:
            self._ack_advance(ack, ts, fack, now)
            if self.state is CLOSED:
                return False
        elif (
            ack == una
            and plen == 0
            and not seg.flags & (SYN | FIN)
            and self.snd_max > una
            and (not window_changed or newly_sacked)
        ):
            self._dupacks += 1
            if self._in_recovery:
                if not self._sack_ok:
                    self._cc.cwnd += self._snd_mss  # RFC 6582 step 3: inflate per dupack
            elif una >= self._recover and (
                self._dupacks >= self._dupthresh
                or (self._sack_ok and self.scoreboard.sacked_bytes > (self._dupthresh - 1) * self._snd_mss)
            ):
                self._enter_recovery(now)
        return True

    def _receive_sack(
        self, blocks: tuple[tuple[int, int], ...], ack: int, ts: tuple[int, int] | None, now: float
    ) -> int:
        una = self.snd_una
        snd_max = self.snd_max
        sb = self.scoreboard
        new = 0
        first = True
        for left_w, right_w in blocks:
            left = una + (((left_w - una + _HALF) & _M) - _HALF)
            right = left + ((right_w - left_w) & _M)
            if first:
                first = False
                # RFC 2883: a first block below the cumulative ACK, or inside the second block, is a D-SACK.
                if right <= ack or (len(blocks) > 1 and self._inside_second(left, right, blocks, una)):
                    self._on_dsack(left, right, now)
                    continue
            if left >= right or left < una or right > snd_max:
                continue
            new += sb.add(left, right)
        return new

    @staticmethod
    def _inside_second(left: int, right: int, blocks: tuple[tuple[int, int], ...], una: int) -> bool:
        l2w, r2w = blocks[1]
        l2 = una + (((l2w - una + _HALF) & _M) - _HALF)
        r2 = l2 + ((r2w - l2w) & _M)
        return l2 <= left and right <= r2

    def _on_dsack(self, left: int, right: int, now: float) -> None:
        self.stats.dsacks_received += 1
        if left not in self._episode_rxt:
            return  # a duplicate from an earlier episode (or a timeout's go-back-N) proves nothing now
        self._episode_rxt.discard(left)
        if self._undo_state is None or not self._rxt_degree:
            # Only a fast retransmit is undone on D-SACK evidence; after a timeout the go-back-N
            # resends data whose SACK blocks did not fit in an option, and their D-SACKs prove nothing.
            return
        self._undo_retrans -= 1
        if self._undo_retrans <= 0:
            # Every retransmission of the episode came back as a duplicate: it was reordering. The
            # original travelled behind at most everything SACKed since; grow the threshold towards
            # that, at most doubling per episode (a D-SACK for data whose SACK block never fitted in
            # an option must not inflate it at once).
            seen = (max(self.scoreboard.highest, self.snd_una) - left) // max(self._snd_mss, 1)
            self._rxt_degree = max(self._rxt_degree, min(seen, 2 * self._dupthresh + 2))
            self._undo(now)

    def _raise_dupthresh(self, degree: int) -> None:
        if degree + 1 > self._dupthresh:
            self._dupthresh = min(degree + 1, self.config.max_reordering)

    def _undo(self, now: float) -> None:
        """The last window reduction was spurious (RFC 2883 §5 / RFC 4015): restore the window.

        After a spurious fast retransmit, the data SACKed beyond the hole when we declared it lost is
        the reordering we must tolerate from now on (as Linux's adaptive reordering metric).
        """
        state = self._undo_state
        self._undo_state = None
        self._rxt_tsval = None
        if state is None:
            return
        if self._rxt_degree:
            self._raise_dupthresh(self._rxt_degree)
            self._rxt_degree = 0
        cc = self._cc
        cwnd = cc.cwnd
        ssthresh = cc.ssthresh
        cc.restore(state)
        cc.cwnd = max(cc.cwnd, cwnd)
        cc.ssthresh = max(cc.ssthresh, ssthresh)
        self.stats.spurious_undos += 1
        self._in_recovery = False
        # The episode is over, so is its guard against a second fast retransmit (RFC 6582 "recover",
        # set by a timeout too): data lost after the spurious one is found by SACKs at once.
        self._recover = self.snd_una
        if self.snd_nxt < self.snd_max:
            # Eifel response (RFC 4015): stop the go-back-N, the data is not lost.
            self.snd_nxt = self.snd_max

    def _rtt_from_tsecr(self, tsecr: int, now: float) -> None:
        elapsed = ((int(now * 1000) + self._ts_offset) - tsecr) & _M
        if elapsed < 0x7FFFFFFF:
            self.rtt.sample(elapsed / 1000.0)

    def _ack_advance(self, ack: int, ts: tuple[int, int] | None, fack: int, now: float) -> None:
        """Process an ACK that acknowledges new data; ``fack`` is the highest SACKed byte before it."""
        una = self.snd_una
        sbuf_seq = self._sbuf_seq
        data_end = sbuf_seq + len(self._sbuf)
        hi = ack if ack < data_end else data_end
        lo = una if una > sbuf_seq else sbuf_seq
        acked_data = hi - lo
        if acked_data > 0:
            self._sbuf.consume(acked_data)
            self._sbuf_seq = hi
        sb = self.scoreboard
        self.snd_una = ack
        if self.snd_nxt < ack:
            self.snd_nxt = ack
        # RTT: a timestamp echo is unambiguous; otherwise the timed segment, if not retransmitted (Karn).
        if ts is not None and ts[1]:
            if self._rxt_tsval is not None:
                if seq_lt(ts[1], self._rxt_tsval):
                    # The ACK echoes a timestamp older than our retransmission: the original made it
                    # (RFC 4015 Eifel detection).
                    self._undo(now)
                else:
                    self._rxt_tsval = None
            self._rtt_from_tsecr(ts[1], now)
        elif self._rtt_seq is not None and ack >= self._rtt_seq:
            self.rtt.sample(now - self._rtt_time)
            self._rtt_seq = None
        self.rtt.reset_backoff()
        self._retries = 0
        if sb:
            if fack > una and una >= self._rxt_high:
                # A hole filled without a retransmission: reordering, by this many segments.
                self._raise_dupthresh((fack - una) // max(self._snd_mss, 1))
            sb.advance(ack)
        cc = self._cc
        if self._in_recovery:
            if ack >= self._recover:
                self._in_recovery = False
                cc.on_recovery_end(now)
                if not self._sack_ok:
                    # RFC 6582 step 3 option 1: cwnd = min(ssthresh, FlightSize + SMSS).
                    cc.cwnd = min(cc.ssthresh, max(self.snd_max - ack, 0) + self._snd_mss)
            else:
                if self._high_rxt < ack:
                    self._high_rxt = ack
                if not self._sack_ok:
                    # Partial ACK (RFC 6582 step 4): retransmit the next hole, deflate the window.
                    newly = ack - una
                    cc.cwnd = max(cc.cwnd - newly + self._snd_mss, self._snd_mss)
                    self._retransmit_head(now)
        else:
            if acked_data > 0:
                srtt = self.rtt.srtt
                cc.on_ack(acked_data, now, srtt if srtt is not None else 0.0)
            if (
                self._sack_ok
                and sb
                and ack >= self._recover
                and sb.sacked_bytes > (self._dupthresh - 1) * self._snd_mss
            ):
                self._enter_recovery(now)
        self._dupacks = 0
        self._rto_at = now + self.rtt.rto if ack < self.snd_max else _INF
        fin_seq = data_end if self._fin_queued else -1
        if fin_seq >= 0 and ack > fin_seq:
            st = self.state
            if st is FIN_WAIT_1:
                self._set_state(FIN_WAIT_2)
                if self._app_closed:
                    self._close_at = now + self.config.fin_wait2_timeout
            elif st is CLOSING:
                self._enter_time_wait(now)
            elif st is LAST_ACK:
                self._set_closed(None)
                return
        if acked_data > 0:
            self._notify()

    def _enter_recovery(self, now: float) -> None:
        """Fast retransmit and the start of fast recovery (RFC 6675 §5 / RFC 6582 §3.2)."""
        una = self.snd_una
        self._in_recovery = True
        self._recover = self.snd_max
        # Holes the previous episode already retransmitted (HighRxt above SND.UNA) are in flight:
        # sending them again would only earn a D-SACK (RFC 6675 keeps HighRxt across the cut too).
        head_done = self._high_rxt > una
        if not head_done:
            self._high_rxt = una
        self.stats.fast_recoveries += 1
        cc = self._cc
        self._undo_state = cc.snapshot()
        self._undo_retrans = 0
        self._episode_rxt.clear()
        self._rxt_degree = (max(self.scoreboard.highest, una) - una) // max(self._snd_mss, 1) + 1
        cc.on_congestion(now, self.snd_max - una)
        if not self._sack_ok:
            cc.cwnd = cc.ssthresh + 3 * self._snd_mss
        # Fast recovery is undone on D-SACK evidence only: with several holes in flight, the first ACK
        # that advances may echo the timestamp of an earlier episode's retransmission.
        self._rxt_tsval = None
        if not head_done:
            self._retransmit_head(now)

    def _note_retransmit(self, seq: int) -> None:
        if self._rxt_degree and self._undo_state is not None and len(self._episode_rxt) < 1024:
            self._episode_rxt.add(seq)

    def _retransmit_head(self, now: float) -> None:
        """Retransmit one segment at SND.UNA (skipping what the peer SACKed)."""
        una = self.snd_una
        seq = self.scoreboard.sacked_end(una) if self.scoreboard else una
        data_end = self._sbuf_seq + len(self._sbuf)
        if seq >= self.snd_max:
            return
        if seq >= data_end:
            if self._fin_queued and seq == data_end:
                self._emit(ACK | FIN, seq, b"", now)
                self.stats.retransmits += 1
            return
        n = min(self._payload_room(), data_end - seq, self.snd_max - seq)
        nxt = self.scoreboard.next_sacked(seq) if self.scoreboard else None
        if nxt is not None and nxt - seq < n:
            n = nxt - seq
        self._emit_data(seq, n, now)
        self.stats.retransmits += 1
        self._undo_retrans += 1
        self._note_retransmit(seq)
        if self._rxt_high < seq + n:
            self._rxt_high = seq + n
        if self._high_rxt < seq + n:
            self._high_rxt = seq + n
        if self._rtt_seq is not None and seq < self._rtt_seq:
            self._rtt_seq = None
        if self._rto_at == _INF:
            self._rto_at = now + self.rtt.rto

    def _receive_text(self, seq: int, payload: memoryview, fin: int, now: float) -> None:
        """Queue segment text and FIN (RFC 9293 §3.10.7.4 seventh and eighth steps)."""
        st = self.state
        rcv_nxt = self.rcv_nxt
        plen = len(payload)
        if st not in _RECV_STATES:
            # Data or FIN after the peer's FIN: nothing more to take (a FIN retransmission is ACKed).
            if fin or plen:
                self._ack_now = True
            return
        if self._app_closed and plen:
            # Data for a connection the application closed: nobody will read it (RFC 9293 §3.10.7.4,
            # as Linux): reset.
            self._emit(RST | ACK, self.snd_max, b"", now)
            self._set_closed(None)
            return
        if seq < rcv_nxt:
            cut = rcv_nxt - seq
            if cut >= plen:
                if plen:
                    self.stats.dup_segments_received += 1
                    self._dsack = (seq, seq + plen)
                payload = payload[plen:]
                plen = 0
            else:
                self._dsack = (seq, rcv_nxt)
                payload = payload[cut:]
                plen -= cut
            seq = rcv_nxt
        right = self.rcv_adv
        if seq + plen > right:
            keep = right - seq
            if keep < 0:
                keep = 0
            payload = payload[:keep]
            plen = keep
            fin = 0
        if plen > self._rcv_mss:
            self._rcv_mss = plen if plen <= self._adv_mss else self._adv_mss
        rbuf = self._rbuf
        if seq == rcv_nxt:
            if plen:
                rbuf.append(payload)
                rcv_nxt += plen
                if rbuf._ooo_starts:
                    rcv_nxt = rbuf.pull(rcv_nxt)
                    # The hole is (partly) filled: ACK at once (RFC 5681 §4.2).
                    self._ack_now = True
                self.rcv_nxt = rcv_nxt
                self._ack_pending += plen
                if self._ack_pending >= 2 * self._rcv_mss:
                    self._data_ack_due(self._ack_pending, now)
                elif self._delack_at == _INF:
                    if self.config.delayed_ack > 0:
                        self._delack_at = now + self.config.delayed_ack
                    else:
                        self._ack_now = True
                self._notify()
            if fin:
                self._ooo_fin = seq + plen
            if self._ooo_fin is not None and self._ooo_fin == self.rcv_nxt:
                self._ooo_fin = None
                self._receive_fin(now)
        else:
            # Out of order: queue, and ACK at once with SACK so the sender learns quickly.
            if plen:
                dup = rbuf.insert(seq, payload)
                if dup is not None:
                    self.stats.dup_segments_received += 1
                    self._dsack = dup
                else:
                    recent = self._recent_sacks
                    if not recent or recent[0] != seq:
                        recent.insert(0, seq)
                        del recent[4:]
            if fin:
                self._ooo_fin = seq + plen
            self._ack_now = True

    def _receive_fin(self, now: float) -> None:
        self.rcv_nxt += 1
        self._rcv_fin = True
        self._ack_now = True
        st = self.state
        if st is ESTABLISHED:
            self._set_state(CLOSE_WAIT)
        elif st is FIN_WAIT_1:
            if self.snd_una > self._sbuf_seq + len(self._sbuf):
                self._enter_time_wait(now)
            else:
                self._set_state(CLOSING)
        elif st is FIN_WAIT_2:
            self._enter_time_wait(now)
        self._notify()

    # ---------------------------------------------------------------------------------------------
    # Output
    # ---------------------------------------------------------------------------------------------

    def _output(self, now: float) -> None:
        """Send whatever the windows, Nagle and the state allow, then any ACK that is due."""
        self._dirty = False
        st = self.state
        if st in _SEND_STATES:
            # Something to (re)send: new data, a FIN, or the tail after a go-back (snd_nxt < snd_max).
            if (
                self.snd_nxt < self._sbuf_seq + len(self._sbuf)
                or self._fin_queued
                or self._in_recovery
                or self.snd_nxt < self.snd_max
            ):
                self._send_data(now)
            if self.snd_wnd == 0 and self.snd_una == self.snd_max and self._has_unsent():
                if self._persist_at == _INF:
                    self._persist_at = now + self._persist_interval()
            elif self._persist_at != _INF and (self.snd_wnd or not self._has_unsent()):
                self._persist_at = _INF
                self._persist_backoff = 0
        if self._ack_now:
            self._send_ack(now)

    def _has_unsent(self) -> bool:
        end = self._sbuf_seq + len(self._sbuf)
        return self.snd_nxt < end or (self._fin_queued and self.snd_nxt <= end)

    def _persist_interval(self) -> float:
        value = self.rtt.base_rto * (1 << self._persist_backoff)
        return value if value < self.config.max_rto else self.config.max_rto

    def _send_data(self, now: float) -> None:
        mss = self._payload_room()
        cc = self._cc
        sbuf_seq = self._sbuf_seq
        data_end = sbuf_seq + len(self._sbuf)
        una = self.snd_una
        sack_recovery = self._in_recovery and self._sack_ok
        if sack_recovery:
            budget = self._send_recovery(now)
            limit = self.snd_nxt + budget
        else:
            limit = una + cc.cwnd
        wnd_end = una + self.snd_wnd
        if wnd_end < limit:
            limit = wnd_end
        sb = self.scoreboard
        fin_queued = self._fin_queued
        # Segments without SACK blocks are built here rather than through _emit: within one burst
        # the ACK, window and timestamp they carry are the same, so they are computed once (at the
        # first segment, as _window_field moves RCV.ADV).
        plain = not (self._sack_ok and (self._dsack is not None or self._rbuf._ooo_starts))
        peek = self._sbuf.peek
        window = -1
        ack_w = tsval = tsecr = 0
        emitted = 0
        seq = self.snd_nxt
        if plain and seq == self.snd_max:
            # The steady state of a bulk sender, in a tight loop: new data in full segments, none of
            # them the last of the queue (that one may carry PSH or FIN: the loop below sends it).
            last = data_end - 1 if data_end - 1 < limit else limit
            count = (last - seq) // mss if last > seq else 0
            if count > 0:
                window = self._window_field()
                rcv_nxt = self.rcv_nxt
                ack_w = rcv_nxt & _M
                if self._ts_ok:
                    tsval = (int(now * 1000) + self._ts_offset) & _M
                    tsecr = self._ts_recent
                else:
                    tsval = -1
                    if self._rtt_seq is None:
                        self._rtt_seq = seq + mss
                        self._rtt_time = now
                self._last_ack_sent = rcv_nxt
                self._ack_now = False
                self._ack_pending = 0
                self._delack_at = _INF
                transmit = self._layer._transmit_cb
                local_addr = self.local_addr
                remote_addr = self.remote_addr
                local_port = self.local_port
                remote_port = self.remote_port
                shared = burst_sum(self._pseudo, local_port, remote_port, ack_w, ACK, window, tsval, tsecr)
                for _ in range(count):
                    transmit(
                        local_addr,
                        remote_addr,
                        build_tcp_burst(
                            shared,
                            local_port,
                            remote_port,
                            seq & _M,
                            ack_w,
                            ACK,
                            window,
                            tsval,
                            tsecr,
                            peek(seq - sbuf_seq, mss),
                        ),
                    )
                    seq += mss
                emitted = count
                self.snd_nxt = self.snd_max = seq
                if self._rto_at == _INF:
                    self._rto_at = now + self.rtt.rto
        while True:
            seq = self.snd_nxt
            snd_max = self.snd_max
            retransmit = seq < snd_max
            n = mss
            if retransmit and sb:
                skip = sb.sacked_end(seq)
                if skip != seq:
                    seq = self.snd_nxt = skip
                    retransmit = seq < snd_max
                if retransmit:
                    nxt = sb.next_sacked(seq)
                    if nxt is not None and nxt - seq < n:
                        n = nxt - seq
            avail = data_end - seq
            if avail <= 0:
                if fin_queued and seq == data_end:
                    self._emit(ACK | FIN, seq, b"", now)
                    if retransmit:
                        self.stats.retransmits += 1
                    self.snd_nxt = seq + 1
                    if seq + 1 > snd_max:
                        self.snd_max = seq + 1
                    if self._rto_at == _INF:
                        self._rto_at = now + self.rtt.rto
                break
            if avail < n:
                n = avail
            room = limit - seq
            if room < n:
                n = room
                if n <= 0:
                    break
            if retransmit and snd_max - seq < n:
                n = snd_max - seq
            if n < mss and not retransmit:
                if n < avail:
                    # Window-limited runt: sender-side silly window avoidance (RFC 9293 §3.8.6.2.1).
                    if self.snd_nxt > una and n < self.max_snd_wnd // 2:
                        break
                elif not self._nodelay and snd_max > una and not fin_queued:
                    break  # Nagle: one runt in flight at most
            flags = ACK
            if seq + n == data_end:
                flags = ACK | PSH
                if fin_queued and seq + n < limit:
                    flags = ACK | PSH | FIN
            if plain:
                if window < 0:
                    window = self._window_field()
                    rcv_nxt = self.rcv_nxt
                    ack_w = rcv_nxt & _M
                    if self._ts_ok:
                        tsval = (int(now * 1000) + self._ts_offset) & _M
                        tsecr = self._ts_recent
                    else:
                        tsval = -1
                    # What _emit records for every segment: this one carries the ACK.
                    self._last_ack_sent = rcv_nxt
                    self._ack_now = False
                    self._ack_pending = 0
                    self._delack_at = _INF
                segment = build_tcp_fast(
                    self._pseudo,
                    self.local_port,
                    self.remote_port,
                    seq & _M,
                    ack_w,
                    flags,
                    window,
                    tsval,
                    tsecr,
                    peek(seq - sbuf_seq, n),
                )
                emitted += 1
                self._layer._transmit_cb(self.local_addr, self.remote_addr, segment)
            else:
                self._emit_data(seq, n, now, flags)
            end = seq + n
            if flags & FIN:
                end += 1
            if retransmit:
                self.stats.retransmits += 1
                self._undo_retrans += 1
                self._note_retransmit(seq)
                if end > self._rxt_high:
                    self._rxt_high = end
                if self._rtt_seq is not None and seq < self._rtt_seq:
                    self._rtt_seq = None
            elif self._rtt_seq is None and not self._ts_ok:
                self._rtt_seq = end
                self._rtt_time = now
            self.snd_nxt = end
            if end > snd_max:
                self.snd_max = end
            if self._rto_at == _INF:
                self._rto_at = now + self.rtt.rto
            if flags & FIN:
                break
        if emitted:
            self.stats.segments_sent += emitted

    def _payload_room(self) -> int:
        """Payload bytes that fit in the next segment: SACK blocks eat into the MSS (RFC 6691)."""
        mss = self._snd_mss
        if self._sack_ok and (self._dsack is not None or self._rbuf._ooo_starts):
            blocks = self._rbuf.ooo_count + (1 if self._dsack is not None else 0)
            cap = 3 if self._ts_ok else 4
            mss -= 4 + 8 * (blocks if blocks < cap else cap)
        return mss

    def _lost_edge(self) -> int:
        """RFC 6675 IsLost, cut short: holes below the returned sequence number count as lost."""
        need = (self._dupthresh - 1) * self._snd_mss
        acc = 0
        ranges = self.scoreboard.ranges()
        for left, right in reversed(ranges):
            acc += right - left
            if acc > need:
                return left
        return self.snd_una

    def _send_recovery(self, now: float) -> int:
        """Retransmit lost holes while the pipe allows (RFC 6675 §5); return the room left for new data."""
        sb = self.scoreboard
        una = self.snd_una
        mss = self._payload_room()
        lost_edge = self._lost_edge()
        lo = self._high_rxt if self._high_rxt > una else una
        lost = 0
        if lost_edge > lo:
            lost = (lost_edge - lo) - sb.sacked_between(lo, lost_edge)
        pipe = (self.snd_max - una - sb.sacked_bytes) - lost
        cwnd = self._cc.cwnd
        data_end = self._sbuf_seq + len(self._sbuf)
        while pipe < cwnd:
            start = self._high_rxt if self._high_rxt > una else una
            hole = sb.next_hole(start, lost_edge)
            if hole is None:
                break
            left, right = hole
            if left >= data_end:
                break
            n = right - left
            if n > mss:
                n = mss
            if left + n > data_end:
                n = data_end - left
            self._emit_data(left, n, now)
            self.stats.retransmits += 1
            self._undo_retrans += 1
            self._note_retransmit(left)
            if self._rtt_seq is not None and left < self._rtt_seq:
                self._rtt_seq = None
            self._high_rxt = left + n
            if left + n > self._rxt_high:
                self._rxt_high = left + n
            pipe += n
            if self._rto_at == _INF:
                self._rto_at = now + self.rtt.rto
        return cwnd - pipe if cwnd > pipe else 0

    def _window_field(self) -> int:
        """The 16-bit window to advertise, with receiver SWS avoidance; never shrinks the right edge."""
        rbuf = self._rbuf
        rcv_nxt = self.rcv_nxt
        cap = rbuf.capacity
        avail = cap - len(rbuf)
        cur = self.rcv_adv - rcv_nxt
        if cur < 0:
            cur = 0
        new = cur
        if avail > cur:
            grow = avail - cur
            half = cap >> 1
            if grow >= (half if half < self._adv_mss else self._adv_mss) or (cur == 0 and avail >= cap):
                new = avail
        ws = self._rcv_wscale
        field = new >> ws
        if field > 0xFFFF:
            field = 0xFFFF
        edge = rcv_nxt + (field << ws)
        if edge < self.rcv_adv:
            field = (cur + (1 << ws) - 1) >> ws
            if field > 0xFFFF:
                field = 0xFFFF
            edge = rcv_nxt + (field << ws)
        self.rcv_adv = edge
        return field

    def _sack_option(self) -> list[tuple[int, int]] | tuple[()]:
        dsack = self._dsack
        if not self._sack_ok or (dsack is None and not self._rbuf._ooo_starts):
            self._dsack = None
            return ()
        self._dsack = None
        blocks = receiver_blocks(self._rbuf, self._recent_sacks, dsack)
        return [(left & _M, right & _M) for left, right in blocks]

    def _emit_data(self, seq: int, n: int, now: float, flags: int = ACK) -> None:
        payload = self._sbuf.peek(seq - self._sbuf_seq, n)
        self._emit(flags, seq, payload, now)

    def _emit(self, flags: int, seq: int, payload: bytes | bytearray, now: float) -> None:
        """Build and transmit one segment; every one carries the current ACK and window."""
        window = self._window_field()
        rcv_nxt = self.rcv_nxt
        if self._ts_ok:
            tsval = (int(now * 1000) + self._ts_offset) & _M
            tsecr = self._ts_recent
        else:
            tsval = tsecr = -1
        if self._sack_ok and (self._dsack is not None or self._rbuf._ooo_starts):
            seg = build_tcp(
                self.local_addr,
                self.remote_addr,
                self.local_port,
                self.remote_port,
                seq,
                rcv_nxt,
                flags,
                window,
                timestamp=(tsval, tsecr) if tsval >= 0 else None,
                sack_blocks=self._sack_option(),
                payload=payload,
                pseudo_sum=self._pseudo,
            )
        else:
            seg = build_tcp_fast(
                self._pseudo,
                self.local_port,
                self.remote_port,
                seq & _M,
                rcv_nxt & _M,
                flags,
                window,
                tsval,
                tsecr,
                payload,
            )
        self._last_ack_sent = rcv_nxt
        self._ack_now = False
        self._ack_pending = 0
        self._delack_at = _INF
        self.stats.segments_sent += 1
        self._layer._transmit_cb(self.local_addr, self.remote_addr, seg)

    def _send_ack(self, now: float) -> None:
        # SND.MAX, not SND.NXT: while retransmitting after a timeout SND.NXT is rewound, and an ACK
        # carrying it would look old to the peer, which would drop it unread (as BSD does).
        self._emit(ACK, self.snd_max, b"", now)

    def _send_rst(self, seq: int, ack: int, with_ack: bool, now: float) -> None:
        """A reset whose fields come from the offending segment (RFC 9293 §3.10.7)."""
        self._layer._send_reset(
            self.local_addr, self.remote_addr, self.local_port, self.remote_port, seq, ack, with_ack
        )

    # ---------------------------------------------------------------------------------------------
    # Timers
    # ---------------------------------------------------------------------------------------------

    def _deadline(self) -> float:
        d = self._rto_at
        if self._delack_at < d:
            d = self._delack_at
        if self._persist_at < d:
            d = self._persist_at
        if self._keepalive_at < d:
            d = self._keepalive_at
        if self._close_at < d:
            d = self._close_at
        return d

    def _on_timer(self, now: float) -> None:
        """Fire whatever is due at ``now``."""
        if now >= self._close_at:
            self._set_closed(None if self.state in (TIME_WAIT, FIN_WAIT_2) else "timeout")
            return
        st = self.state
        if now >= self._rto_at:
            self._rto_at = _INF
            if st is SYN_SENT or st is SYN_RECEIVED:
                self._handshake_timeout(now)
            else:
                self._retransmission_timeout(now)
            if self.state is CLOSED:
                return
        if now >= self._persist_at:
            self._persist_at = _INF
            self._zero_window_probe(now)
            if self.state is CLOSED:
                return
        if now >= self._keepalive_at:
            self._keepalive_timer(now)
            if self.state is CLOSED:
                return
        if now >= self._delack_at:
            self._delack_at = _INF
            self._ack_now = True
        if self._ack_now or self._dirty:
            self._output(now)

    def _retransmission_timeout(self, now: float) -> None:
        una = self.snd_una
        if una >= self.snd_max:
            return
        self._retries += 1
        if self._retries > self.config.max_retransmissions:
            self._emit(RST | ACK, self.snd_max, b"", now)
            self._set_closed("timeout")
            return
        self.stats.rto_timeouts += 1
        cc = self._cc
        if self._retries == 1:
            self._rxt_degree = 0
            self._episode_rxt.clear()
            self._undo_state = cc.snapshot()
            self._undo_retrans = 0
            self._rxt_tsval = ((int(now * 1000) + self._ts_offset) & _M) if self._ts_ok else None
        cc.on_timeout(now, self.snd_max - una)
        self.rtt.backoff()
        self._in_recovery = False
        self._dupacks = 0
        self._recover = self.snd_max
        self._high_rxt = una
        self.snd_nxt = una
        self._rtt_seq = None
        self._send_data(now)
        self._rto_at = now + self.rtt.rto

    def _zero_window_probe(self, now: float) -> None:
        if self.snd_wnd or not self._has_unsent() or self.state not in _SEND_STATES:
            self._persist_backoff = 0
            return
        # Like Linux: an ACK one below SND.UNA, outside the window, which the receiver must answer
        # with its current window; it uses no sequence space, so it never needs retransmitting.
        self._emit(ACK, self.snd_una - 1, b"", now)
        if self._persist_backoff < 16:
            self._persist_backoff += 1
        self._persist_at = now + self._persist_interval()

    def _keepalive_timer(self, now: float) -> None:
        self._keepalive_at = _INF
        if not self._keepalive or self.state not in _KEEPALIVE_STATES:
            return
        if self._keepalive_probes:
            due = self._last_rx + self._keepalive_idle + self._keepalive_probes * self._keepalive_interval
        else:
            due = self._last_rx + self._keepalive_idle
        if now < due:
            self._keepalive_at = due
            return
        if self.snd_max > self.snd_una:
            # Data in flight: the retransmission timer is watching the peer already.
            self._keepalive_at = now + self._keepalive_interval
            return
        if self._keepalive_probes >= self._keepalive_count:
            self._emit(RST | ACK, self.snd_max, b"", now)
            self._set_closed("timeout")
            return
        self._keepalive_probes += 1
        self._emit(ACK, self.snd_una - 1, b"", now)
        self._keepalive_at = now + self._keepalive_interval

    # ---------------------------------------------------------------------------------------------
    # State changes
    # ---------------------------------------------------------------------------------------------

    def _set_state(self, state: TcpState) -> None:
        self.state = state
        self._notify()

    def _notify(self) -> None:
        self._layer._changed(self)

    def _enter_time_wait(self, now: float) -> None:
        self._set_state(TIME_WAIT)
        self._rto_at = _INF
        self._persist_at = _INF
        self._keepalive_at = _INF
        self._close_at = now + self.config.time_wait
        self._sbuf.release()
        self.scoreboard.clear()
        self._ack_now = True
        self._layer._on_time_wait(self)

    def _set_closed(self, error: str | None) -> None:
        if self.state is CLOSED:
            return
        if error is not None and self.error is None:
            self.error = error
        self.state = CLOSED
        self._rto_at = self._delack_at = self._persist_at = self._keepalive_at = self._close_at = _INF
        self._ack_now = False
        self._sbuf.release()
        self.scoreboard.clear()
        if error is not None:
            self._rbuf.release()
        self._layer._on_closed(self)
        self._notify()


_WRITABLE_STATES = frozenset({SYN_SENT, SYN_RECEIVED, ESTABLISHED, CLOSE_WAIT})
_KEEPALIVE_STATES = frozenset({ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, FIN_WAIT_2})


def _fmt(addr: bytes) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        return addr.hex()
