"""Initial sequence numbers (RFC 6528), timestamp offsets and SYN cookies.

ISN = M + F(4-tuple, secret): a 4 µs clock plus a keyed hash of the connection's addresses and ports,
so sequence numbers of successive incarnations of one 4-tuple keep increasing while an off-path
attacker cannot predict them. The keys come from the layer's random source, which is the operating
system's CSPRNG unless a simulation hands in a seeded one: a Mersenne Twister would let a peer that
sees a few hundred of its outputs (ephemeral ports, say) compute the keys.

The TCP timestamp clock of a connection starts at a keyed hash of its 4-tuple too (as Linux does), so
TSval does not reveal the node's uptime or link its connections to each other, while successive
incarnations of one 4-tuple keep one clock (RFC 6191 relies on that to end TIME-WAIT early).

SYN cookies let a listener whose SYN backlog is full answer a SYN without keeping any state: our ISN
encodes a coarse time counter (5 bits, 64 s steps), the peer's MSS (3 bits, an index into a table) and
24 bits of a keyed hash over the 4-tuple, the peer's ISN and the counter. The peer's final ACK carries
ISN+1 back and lets the listener rebuild the connection. If the peer sent timestamps, our TSval in the
SYN-ACK carries its window-scale shift and SACK permission in its low 6 bits, echoed back in TSecr.
"""

from __future__ import annotations

import hashlib
import struct

from embedmesh.netstack.tcp.sequence import seq_diff

_M = 0xFFFFFFFF
_PORTS = struct.Struct("!HHI")
MSS_TABLE = (216, 536, 1000, 1200, 1220, 1360, 1400, 1440)
_COOKIE_PERIOD = 64  # seconds per counter step
TS_OPTION_BITS = 6
_TS_MASK = (1 << TS_OPTION_BITS) - 1
_NO_WSCALE = 0xF


def _keyed(key: bytes, src: bytes, dst: bytes, sport: int, dport: int, extra: int) -> int:
    h = hashlib.blake2s(src + dst + _PORTS.pack(sport, dport, extra & _M), digest_size=4, key=key)
    return int.from_bytes(h.digest(), "big")


def initial_sequence_number(
    key: bytes, local: bytes, remote: bytes, local_port: int, remote_port: int, now: float
) -> int:
    """RFC 6528 §3: M (4 µs ticks) + F(localip, localport, remoteip, remoteport, secretkey)."""
    return (int(now * 250_000) + _keyed(key, local, remote, local_port, remote_port, 0)) & _M


def timestamp_offset(key: bytes, local: bytes, remote: bytes, local_port: int, remote_port: int) -> int:
    """Where the TSval clock of this 4-tuple's connections starts: a keyed hash (RFC 7323 §7.1)."""
    return _keyed(key, local, remote, local_port, remote_port, 0)


def make_cookie(
    key: bytes,
    local: bytes,
    remote: bytes,
    local_port: int,
    remote_port: int,
    peer_isn: int,
    mss: int,
    now: float,
) -> int:
    """Our ISN for a stateless SYN-ACK; :func:`check_cookie` recovers the MSS from ``ISN``."""
    counter = (int(now) // _COOKIE_PERIOD) & 0x1F
    index = 0
    for i, value in enumerate(MSS_TABLE):
        if value <= mss:
            index = i
    h = _keyed(key, local, remote, local_port, remote_port, peer_isn ^ (counter << 27)) & 0xFFFFFF
    return (counter << 27) | (index << 24) | h


def check_cookie(
    key: bytes,
    local: bytes,
    remote: bytes,
    local_port: int,
    remote_port: int,
    peer_isn: int,
    cookie: int,
    now: float,
) -> int | None:
    """The MSS encoded in a valid cookie no older than two counter steps, else ``None``."""
    counter = cookie >> 27
    current = (int(now) // _COOKIE_PERIOD) & 0x1F
    if (current - counter) & 0x1F > 1:
        return None
    h = _keyed(key, local, remote, local_port, remote_port, peer_isn ^ (counter << 27)) & 0xFFFFFF
    if h != cookie & 0xFFFFFF:
        return None
    return MSS_TABLE[(cookie >> 24) & 7]


def cookie_tsval(now_ts: int, wscale: int | None, sack: bool) -> int:
    """A TSval no later than ``now_ts`` whose low bits carry the peer's options."""
    bits = (wscale if wscale is not None else _NO_WSCALE) | (0x10 if sack else 0)
    ts = (now_ts & ~_TS_MASK & _M) | bits
    if seq_diff(ts, now_ts) > 0:
        ts = (ts - (1 << TS_OPTION_BITS)) & _M
    return ts


def cookie_options(tsecr: int) -> tuple[int | None, bool]:
    """The (peer window-scale shift or None, SACK permitted) stored by :func:`cookie_tsval`."""
    ws = tsecr & 0xF
    return (None if ws == _NO_WSCALE else ws), bool(tsecr & 0x10)
