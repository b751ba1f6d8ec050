"""Fuzz target: TCP segments through the parser and through a TcpLayer with a listener.

Input: records of ``dt_ms (1 byte) | length (2 bytes, big-endian) | segment``; a short tail is one
last segment. Each segment is parsed without checksum verification, then its checksum is fixed up and
it is fed to a layer (listener on port 80, plus one active connection from port 40000 to the remote's
port 5555) at a clock that advances by ``dt_ms``; timers are fired and an application accepts, reads
and writes in between. The layer is deterministic (fixed RNG), so seeds can complete handshakes.
Only ParseError may escape the parser; nothing at all may escape the layer.

    python fuzz/fuzz_tcp.py -runs=20000 fuzz/corpus/tcp
    python fuzz/fuzz_tcp.py --make-corpus     # rewrite the seed corpus
"""

from __future__ import annotations

import contextlib
import random
import struct
import sys
from pathlib import Path

from embedmesh.errors import ParseError
from embedmesh.netstack.tcp import TcpConfig, TcpLayer, TcpState
from embedmesh.wire.checksum import checksum, pseudo_header_sum
from embedmesh.wire.tcp import ACK, FIN, PSH, RST, SYN, build_tcp, parse_tcp

LOCAL = bytes([10, 0, 0, 1])
REMOTE = bytes([10, 0, 0, 2])
CONFIG = TcpConfig(recv_buffer=65536, send_buffer=65536, syn_backlog=8, max_time_wait=8, max_ooo_blocks=16)
_REC = struct.Struct("!BH")


def _layer(out: list[bytes]) -> tuple[TcpLayer, object, object]:
    layer = TcpLayer(
        lambda s, d, seg: out.append(seg), rng=random.Random(0), config=CONFIG, isn_key=b"k" * 16
    )
    listener = layer.listen(None, 80, 4)
    active = layer.connect(LOCAL, REMOTE, 5555, 0.0, local_port=40000)
    return layer, listener, active


def _records(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    i = 0
    while i < len(data):
        if i + 3 > len(data):
            out.append((0, data[i:]))
            break
        dt, length = _REC.unpack_from(data, i)
        i += 3
        out.append((dt, data[i : i + length]))
        i += length
    return out


def _fix_checksum(segment: bytes) -> bytes:
    if len(segment) < 20:
        return segment
    seg = bytearray(segment)
    seg[16:18] = b"\x00\x00"
    seg[16:18] = checksum(seg, pseudo_header_sum(REMOTE, LOCAL, 6, len(seg))).to_bytes(2, "big")
    return bytes(seg)


def TestOneInput(data: bytes) -> None:
    out: list[bytes] = []
    layer, listener, active = _layer(out)
    now = 0.0
    accepted = [active]
    for dt, segment in _records(data)[:64]:
        with contextlib.suppress(ParseError):
            parse_tcp(segment, REMOTE, LOCAL, verify_checksum=False)
        now += dt / 1000.0
        layer.segment_received(REMOTE, LOCAL, _fix_checksum(segment), now)
        deadline = layer.next_deadline()
        if deadline is not None and deadline <= now + 0.5:
            layer.handle_timeout(max(now, deadline))
        conn = listener.accept()  # type: ignore[attr-defined]
        if conn is not None:
            accepted.append(conn)
        for c in accepted:
            if c.state is TcpState.CLOSED:  # type: ignore[attr-defined]
                continue
            c.receive(4096)  # type: ignore[attr-defined]
            if c.writable and dt & 1:  # type: ignore[attr-defined]
                c.send(b"x" * (dt * 7))  # type: ignore[attr-defined]
            if dt == 255:
                c.close()  # type: ignore[attr-defined]
        out.clear()
    assert layer.connection_count <= CONFIG.syn_backlog + 16
    layer.handle_timeout(now + 1000.0)


def _seeds() -> dict[str, bytes]:
    """Handshakes that match the deterministic layer, so the fuzzer starts from deep states."""
    out: list[bytes] = []
    layer, _, _ = _layer(out)
    syn_seq = 7000
    layer.segment_received(
        REMOTE, LOCAL, build_tcp(REMOTE, LOCAL, 33333, 80, syn_seq, 0, SYN, 65535, mss=1400), 0.0
    )
    synack = parse_tcp(out[-1], LOCAL, REMOTE)
    active_syn = parse_tcp(out[0], LOCAL, REMOTE)

    def rec(dt: int, seg: bytes) -> bytes:
        return _REC.pack(dt, len(seg)) + seg

    def seg(
        flags: int,
        seq: int,
        ack: int,
        payload: bytes = b"",
        sport: int = 33333,
        dport: int = 80,
        **kw: object,
    ) -> bytes:
        return build_tcp(REMOTE, LOCAL, sport, dport, seq, ack, flags, 65535, payload=payload, **kw)  # type: ignore[arg-type]

    s1 = syn_seq + 1
    a1 = synack.seq + 1
    handshake = rec(0, seg(SYN, syn_seq, 0, mss=1400)) + rec(1, seg(ACK, s1, a1))
    opts = dict(mss=1400, wscale=7, sack_permitted=True, timestamp=(1, 0))
    return {
        "syn": rec(0, seg(SYN, syn_seq, 0, mss=1400)),
        "syn_all_options": rec(0, seg(SYN, syn_seq, 0, **opts)),
        "handshake_data_fin": handshake
        + rec(5, seg(ACK | PSH, s1, a1, b"hello"))
        + rec(1, seg(ACK, s1 + 100, a1, b"later"))
        + rec(1, seg(ACK | FIN, s1 + 5, a1, b"a" * 95)),
        "handshake_rst": handshake + rec(3, seg(RST, s1 + 10, 0)) + rec(3, seg(RST, s1, 0)),
        "active_synack": rec(
            2,
            seg(SYN | ACK, 9000, active_syn.seq + 1, sport=5555, dport=40000, mss=1200, sack_permitted=True),
        )
        + rec(
            2,
            seg(ACK | PSH, 9001, active_syn.seq + 1, b"data", sport=5555, dport=40000, sack_blocks=[(1, 2)]),
        ),
        "closed_port": rec(0, seg(SYN, 1, 0, dport=81)) + rec(0, seg(ACK, 1, 5, dport=81)),
        "bad_options": rec(
            0, seg(SYN, 5, 0)[:12] + b"\x70" + seg(SYN, 5, 0)[13:] + b"\x02\x03\x05\x00\x08\x0a" + bytes(8)
        ),
    }


if __name__ == "__main__":
    if "--make-corpus" in sys.argv:
        corpus = Path(__file__).resolve().parent / "corpus" / "tcp"
        corpus.mkdir(parents=True, exist_ok=True)
        for name, blob in _seeds().items():
            (corpus / name).write_bytes(blob)
        for blob in _seeds().values():
            TestOneInput(blob)
    else:
        from harness import run

        run(TestOneInput)
