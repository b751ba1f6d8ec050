"""TCP segment format (RFC 9293 §3.1) with the options of RFC 9293, RFC 7323 and RFC 2018.

``parse_tcp`` turns the IP payload into a :class:`TcpSegment` (the payload stays a ``memoryview`` into
the caller's buffer); ``build_tcp`` emits a segment with its checksum. The checksum runs once over the
whole buffer in C (:mod:`embedmesh.wire.checksum`); the pseudo-header sum is linear in the length, so a
caller that sends many segments between the same two addresses can pass ``pseudo_sum`` (the pseudo
header summed with length 0, see :func:`pseudo_base`) and skip recomputing it.

Only :class:`~embedmesh.errors.ParseError` escapes ``parse_tcp``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from embedmesh.errors import ParseError
from embedmesh.wire.checksum import checksum, ones_sum, pseudo_header_sum

__all__ = [
    "ACK",
    "CWR",
    "ECE",
    "FIN",
    "HEADER_LEN",
    "PROTOCOL_TCP",
    "PSH",
    "RST",
    "SYN",
    "TS_HEADER",
    "TS_PREFIX",
    "URG",
    "TcpSegment",
    "build_tcp",
    "build_tcp_burst",
    "build_tcp_fast",
    "burst_sum",
    "flags_repr",
    "parse_tcp",
    "pseudo_base",
]

PROTOCOL_TCP = 6
HEADER_LEN = 20

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

_FLAG_NAMES = ((FIN, "F"), (SYN, "S"), (RST, "R"), (PSH, "P"), (ACK, "A"), (URG, "U"), (ECE, "E"), (CWR, "C"))

OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERMITTED = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8

_HEADER = struct.Struct("!HHIIBBHHH")
# The header plus the option block every segment of a timestamped connection carries:
# NOP, NOP, kind 8, length 10, TSval, TSecr (RFC 7323 Appendix A layout).
_HEADER_TS = struct.Struct("!HHIIBBHHHBBBBII")
_TS_BLOCK = struct.Struct("!BBBBII")
_TS_PREFIX = 0x0101080A
#: The whole 32-byte header of a segment that carries only the timestamp option, as every segment of a
#: bulk transfer does: ports, seq, ack, data offset byte (0x80), flags, window, checksum, urgent
#: pointer, the NOP-NOP-kind-length word (:data:`TS_PREFIX`), TSval, TSecr. One unpack reads it all.
TS_HEADER = struct.Struct("!HHIIBBHHHIII")
TS_PREFIX = _TS_PREFIX
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U32X2 = struct.Struct("!II")
_MSS_OPT = struct.Struct("!BBH")
_WS_OPT = struct.Struct("!BBB")
_TS_OPT = struct.Struct("!BBII")
_from_bytes = int.from_bytes


@dataclass(slots=True)
class TcpSegment:
    """One TCP segment: the header fields, the decoded options and the payload.

    ``seq``/``ack`` are the raw 32-bit values; ``window`` is the raw (unscaled) 16-bit field.
    Options absent from the segment are ``None`` (``sack_permitted`` is ``False``, ``sack_blocks`` empty).
    """

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    urgent: int = 0
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    timestamp: tuple[int, int] | None = None
    payload: memoryview = field(default_factory=lambda: memoryview(b""))

    def __repr__(self) -> str:
        opts = []
        if self.mss is not None:
            opts.append(f"mss={self.mss}")
        if self.wscale is not None:
            opts.append(f"ws={self.wscale}")
        if self.sack_permitted:
            opts.append("sackOK")
        if self.sack_blocks:
            opts.append(f"sack={list(self.sack_blocks)}")
        if self.timestamp is not None:
            opts.append(f"ts={self.timestamp[0]}/{self.timestamp[1]}")
        return (
            f"TcpSegment({self.src_port}->{self.dst_port} [{flags_repr(self.flags)}] seq={self.seq} "
            f"ack={self.ack} win={self.window} len={len(self.payload)}"
            + (f" urg={self.urgent}" if self.urgent else "")
            + (" " + " ".join(opts) if opts else "")
            + ")"
        )


def flags_repr(flags: int) -> str:
    """Flags as tcpdump-like letters (``"SA"`` for SYN+ACK, ``"."`` for none)."""
    return "".join(name for bit, name in _FLAG_NAMES if flags & bit) or "."


def pseudo_base(src: bytes, dst: bytes) -> int:
    """The TCP pseudo-header sum for ``src``→``dst`` with length 0; add the segment length to use it."""
    return pseudo_header_sum(src, dst, PROTOCOL_TCP, 0)


def parse_tcp(
    segment: bytes | bytearray | memoryview,
    src: bytes,
    dst: bytes,
    *,
    verify_checksum: bool = True,
    pseudo_sum: int | None = None,
    segment_sum: int | None = None,
) -> TcpSegment:
    """Parse ``segment`` (the IP payload) sent from ``src`` to ``dst``.

    Raises :class:`ParseError` on a short segment, a bad data offset, an option whose length is illegal
    (RFC 9293 MUST-7: a malformed option makes the segment invalid) or a bad checksum.
    ``pseudo_sum`` may carry :func:`pseudo_base` of the two addresses to skip recomputing it;
    ``segment_sum`` a value congruent (mod 0xFFFF) to :func:`ones_sum` of ``segment``, computed by the
    IP layer (see ``NetworkInterface``), to skip reading the segment again.
    """
    length = len(segment)
    if length < HEADER_LEN:
        raise ParseError(f"TCP segment of {length} bytes is shorter than the 20-byte header")
    src_port, dst_port, seq, ack, offset_byte, flags, window, _csum, urgent = _HEADER.unpack_from(segment, 0)
    header_len = (offset_byte >> 4) << 2
    if header_len < HEADER_LEN or header_len > length:
        raise ParseError(f"TCP data offset {header_len} is outside 20..{length}")
    if verify_checksum:
        if pseudo_sum is None:
            if len(src) not in (4, 16) or len(dst) != len(src):
                raise ParseError("TCP pseudo-header needs two IPv4 or two IPv6 addresses")
            pseudo_sum = pseudo_header_sum(src, dst, PROTOCOL_TCP, 0)
        if segment_sum is None:
            segment_sum = ones_sum(segment)
        # The pseudo-header is nonzero, so the sum is all ones exactly when it is 0 modulo 0xFFFF.
        if (segment_sum + pseudo_sum + length) % 0xFFFF:
            raise ParseError("TCP checksum mismatch")
    view = segment if segment.__class__ is memoryview else memoryview(segment)
    seg = TcpSegment(
        src_port, dst_port, seq, ack, flags, window, urgent, None, None, False, (), None, view[header_len:]
    )
    if header_len > HEADER_LEN:
        if header_len == 32 and _U32.unpack_from(view, 20)[0] == _TS_PREFIX:
            seg.timestamp = _U32X2.unpack_from(view, 24)
        else:
            _parse_options(view[HEADER_LEN:header_len], seg)
    return seg


def _parse_options(opts: memoryview, seg: TcpSegment) -> None:
    i = 0
    end = len(opts)
    while i < end:
        kind = opts[i]
        if kind == OPT_EOL:
            return
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise ParseError(f"TCP option {kind} has no length byte")
        olen = opts[i + 1]
        if olen < 2 or i + olen > end:
            raise ParseError(f"TCP option {kind} has illegal length {olen}")
        if kind == OPT_MSS:
            if olen != 4:
                raise ParseError(f"TCP MSS option has length {olen}, not 4")
            seg.mss = _U16.unpack_from(opts, i + 2)[0]
        elif kind == OPT_WSCALE:
            if olen != 3:
                raise ParseError(f"TCP window-scale option has length {olen}, not 3")
            seg.wscale = opts[i + 2]
        elif kind == OPT_SACK_PERMITTED:
            if olen != 2:
                raise ParseError(f"TCP SACK-permitted option has length {olen}, not 2")
            seg.sack_permitted = True
        elif kind == OPT_SACK:
            if (olen - 2) % 8 or olen < 10:
                raise ParseError(f"TCP SACK option has illegal length {olen}")
            seg.sack_blocks = tuple(_U32X2.iter_unpack(opts[i + 2 : i + olen]))
        elif kind == OPT_TIMESTAMP:
            if olen != 10:
                raise ParseError(f"TCP timestamp option has length {olen}, not 10")
            seg.timestamp = _U32X2.unpack_from(opts, i + 2)
        # Unknown options are skipped by their length (RFC 9293 MUST-6).
        i += olen


def _encode_options(
    mss: int | None,
    wscale: int | None,
    sack_permitted: bool,
    sack_blocks: tuple[tuple[int, int], ...] | list[tuple[int, int]],
    timestamp: tuple[int, int] | None,
) -> bytes:
    parts: list[bytes] = []
    if mss is not None:
        parts.append(_MSS_OPT.pack(OPT_MSS, 4, mss))
    if sack_permitted and timestamp is not None:
        # SACK-permitted and timestamps share 12 bytes, as Linux lays them out.
        parts.append(b"\x04\x02" + _TS_OPT.pack(OPT_TIMESTAMP, 10, timestamp[0], timestamp[1]))
    else:
        if timestamp is not None:
            parts.append(b"\x01\x01" + _TS_OPT.pack(OPT_TIMESTAMP, 10, timestamp[0], timestamp[1]))
        if sack_permitted:
            parts.append(b"\x01\x01\x04\x02")
    if wscale is not None:
        parts.append(b"\x01" + _WS_OPT.pack(OPT_WSCALE, 3, wscale))
    if sack_blocks:
        room = 40 - sum(len(p) for p in parts) - 4
        blocks = list(sack_blocks)[: max(0, room // 8)]
        if blocks:
            parts.append(
                b"\x01\x01"
                + bytes((OPT_SACK, 2 + 8 * len(blocks)))
                + b"".join(_U32X2.pack(left, right) for left, right in blocks)
            )
    out = b"".join(parts)
    pad = -len(out) & 3
    return out + b"\x00" * pad if pad else out


def build_tcp_fast(
    pseudo_sum: int,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    tsval: int,
    tsecr: int,
    payload: bytes | bytearray | memoryview,
) -> bytes:
    """The per-segment path of a connection: positional, timestamps or nothing (``tsval < 0``).

    ``seq``/``ack`` must already be 32-bit; ``pseudo_sum`` comes from :func:`pseudo_base`.
    """
    # The checksum is the complement of the one's-complement sum: -(sum) modulo 0xFFFF, which is 0
    # (never 0xFFFF) for a sum that is a multiple of 0xFFFF, as complementing 0xFFFF gives. The sum
    # here is never 0 (the pseudo-header is not), so this equals checksum().
    if tsval >= 0:
        header0 = _HEADER_TS.pack(
            src_port, dst_port, seq, ack, 0x80, flags, window, 0, 0, 1, 1, 8, 10, tsval, tsecr
        )
        csum = -(ones_sum(payload) + pseudo_sum + 32 + len(payload) + _from_bytes(header0, "big")) % 0xFFFF
        return (
            _HEADER_TS.pack(
                src_port, dst_port, seq, ack, 0x80, flags, window, csum, 0, 1, 1, 8, 10, tsval, tsecr
            )
            + payload
        )
    header0 = _HEADER.pack(src_port, dst_port, seq, ack, 0x50, flags, window, 0, 0)
    csum = -(ones_sum(payload) + pseudo_sum + 20 + len(payload) + _from_bytes(header0, "big")) % 0xFFFF
    return _HEADER.pack(src_port, dst_port, seq, ack, 0x50, flags, window, csum, 0) + payload


def burst_sum(
    pseudo_sum: int, src_port: int, dst_port: int, ack: int, flags: int, window: int, tsval: int, tsecr: int
) -> int:
    """What the checksums of a burst of segments share: the pseudo-header (length 0) and every header
    field but the sequence number, for :func:`build_tcp_burst`. Arguments as :func:`build_tcp_fast`."""
    if tsval >= 0:
        header0 = _HEADER_TS.pack(
            src_port, dst_port, 0, ack, 0x80, flags, window, 0, 0, 1, 1, 8, 10, tsval, tsecr
        )
        return (pseudo_sum + 32 + _from_bytes(header0, "big")) % 0xFFFF
    header0 = _HEADER.pack(src_port, dst_port, 0, ack, 0x50, flags, window, 0, 0)
    return (pseudo_sum + 20 + _from_bytes(header0, "big")) % 0xFFFF


def build_tcp_burst(
    shared_sum: int,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    tsval: int,
    tsecr: int,
    payload: bytes | bytearray | memoryview,
) -> bytes:
    """:func:`build_tcp_fast` for one segment of a burst, given ``shared_sum = burst_sum(...)`` of the
    same fields: the sequence number adds to the sum as itself (2**16 is 1 modulo 0xFFFF), so each
    segment costs one header pack and the payload's sum."""
    csum = -(ones_sum(payload) + shared_sum + len(payload) + seq) % 0xFFFF
    if tsval >= 0:
        return (
            _HEADER_TS.pack(
                src_port, dst_port, seq, ack, 0x80, flags, window, csum, 0, 1, 1, 8, 10, tsval, tsecr
            )
            + payload
        )
    return _HEADER.pack(src_port, dst_port, seq, ack, 0x50, flags, window, csum, 0) + payload


def build_tcp(
    src: bytes,
    dst: bytes,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    *,
    urgent: int = 0,
    mss: int | None = None,
    wscale: int | None = None,
    sack_permitted: bool = False,
    sack_blocks: tuple[tuple[int, int], ...] | list[tuple[int, int]] = (),
    timestamp: tuple[int, int] | None = None,
    payload: bytes | bytearray | memoryview = b"",
    pseudo_sum: int | None = None,
) -> bytes:
    """Emit a TCP segment from ``src`` to ``dst`` with a correct checksum.

    ``seq``/``ack`` are reduced modulo 2**32; ``window`` must already be scaled down to 16 bits.
    SACK blocks that do not fit in the 40-byte option space are left out.
    """
    if pseudo_sum is None:
        pseudo_sum = pseudo_header_sum(src, dst, PROTOCOL_TCP, 0)
    seq &= 0xFFFFFFFF
    ack &= 0xFFFFFFFF
    if mss is None and wscale is None and not sack_permitted and not sack_blocks:
        if timestamp is not None:
            args = (src_port, dst_port, seq, ack, 0x80, flags, window)
            tail = (urgent, 1, 1, 8, 10, timestamp[0], timestamp[1])
            header0 = _HEADER_TS.pack(*args, 0, *tail)
            total = 32 + len(payload)
            csum = checksum(payload, pseudo_sum + total + _from_bytes(header0, "big"))
            return _HEADER_TS.pack(*args, csum, *tail) + payload
        header0 = _HEADER.pack(src_port, dst_port, seq, ack, 0x50, flags, window, 0, urgent)
        total = 20 + len(payload)
        csum = checksum(payload, pseudo_sum + total + _from_bytes(header0, "big"))
        return _HEADER.pack(src_port, dst_port, seq, ack, 0x50, flags, window, csum, urgent) + payload
    options = _encode_options(mss, wscale, sack_permitted, sack_blocks, timestamp)
    header_len = 20 + len(options)
    head0 = _HEADER.pack(src_port, dst_port, seq, ack, header_len << 2, flags, window, 0, urgent) + options
    total = header_len + len(payload)
    csum = checksum(payload, pseudo_sum + total + _from_bytes(head0, "big"))
    return (
        _HEADER.pack(src_port, dst_port, seq, ack, header_len << 2, flags, window, csum, urgent)
        + options
        + payload
    )
