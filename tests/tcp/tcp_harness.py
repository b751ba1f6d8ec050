"""smoltcp-style harness: push one crafted segment into a TcpLayer at an explicit time, see what comes out.

The layer under test lives at ``LOCAL`` (10.0.0.1); the test plays the remote end ``REMOTE``
(10.0.0.2) by building segments with :func:`embedmesh.wire.tcp.build_tcp`.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from embedmesh.netstack.tcp import TcpConfig, TcpConnection, TcpLayer, TcpState
from embedmesh.wire.tcp import ACK, SYN, TcpSegment, build_tcp, parse_tcp

LOCAL = bytes([10, 0, 0, 1])
REMOTE = bytes([10, 0, 0, 2])
LOCAL_PORT = 80
REMOTE_PORT = 40000
REMOTE_ISS = 1_000_000
M = 0xFFFFFFFF


class Harness:
    def __init__(self, config: TcpConfig | None = None, seed: int = 7, **overrides: Any) -> None:
        config = config or TcpConfig()
        if overrides:
            config = replace(config, **overrides)
        self.config = config
        self.out: list[TcpSegment] = []
        self.raw: list[bytes] = []
        self.layer = TcpLayer(self._tx, rng=random.Random(seed), config=config)

    def _tx(self, src: bytes, dst: bytes, segment: bytes) -> None:
        assert src == LOCAL and dst == REMOTE
        self.raw.append(segment)
        self.out.append(parse_tcp(segment, src, dst))

    # -- input -------------------------------------------------------------------------------------

    def send(
        self,
        t: float,
        flags: int,
        seq: int,
        ack: int = 0,
        *,
        window: int = 65535,
        payload: bytes = b"",
        sport: int = REMOTE_PORT,
        dport: int = LOCAL_PORT,
        **options: Any,
    ) -> None:
        raw = build_tcp(
            REMOTE, LOCAL, sport, dport, seq & M, ack & M, flags, window, payload=payload, **options
        )
        self.layer.segment_received(REMOTE, LOCAL, raw, t)

    def tick(self, t: float) -> None:
        self.layer.handle_timeout(t)

    # -- output ------------------------------------------------------------------------------------

    def recv(self) -> list[TcpSegment]:
        out, self.out = self.out, []
        self.raw = []
        return out

    def recv_one(self) -> TcpSegment:
        out = self.recv()
        assert len(out) == 1, f"expected one segment, got {out}"
        return out[0]

    def recv_none(self) -> None:
        out = self.recv()
        assert not out, f"expected no segment, got {out}"

    # -- canned handshakes ---------------------------------------------------------------------------

    def accept(
        self, t: float = 0.0, *, window: int = 65535, backlog: int = 8, **syn_options: Any
    ) -> tuple[TcpConnection, TcpSegment]:
        """Passive open: listener on LOCAL_PORT, remote SYN, our SYN-ACK, remote ACK. Returns (conn, synack)."""
        syn_options.setdefault("mss", 1460)
        listener = self.layer.listen(None, LOCAL_PORT, backlog)
        self.send(t, SYN, REMOTE_ISS, window=window, **syn_options)
        synack = self.recv_one()
        assert synack.flags == SYN | ACK
        ts = None
        if synack.timestamp is not None and "timestamp" in syn_options:
            ts = (syn_options["timestamp"][0] + 1, synack.timestamp[0])
        extra = {"timestamp": ts} if ts else {}
        self.send(t, ACK, REMOTE_ISS + 1, synack.seq + 1, window=window, **extra)
        conn = listener.accept()
        assert conn is not None and conn.state is TcpState.ESTABLISHED
        self.recv_none()
        return conn, synack

    def connect(
        self, t: float = 0.0, *, window: int = 65535, **synack_options: Any
    ) -> tuple[TcpConnection, TcpSegment]:
        """Active open to REMOTE:REMOTE_PORT, remote answers SYN-ACK. Returns (conn, our SYN)."""
        synack_options.setdefault("mss", 1460)
        conn = self.layer.connect(LOCAL, REMOTE, REMOTE_PORT, t, local_port=LOCAL_PORT)
        syn = self.recv_one()
        assert syn.flags == SYN
        if "timestamp" in synack_options and synack_options["timestamp"] is not None and syn.timestamp:
            synack_options["timestamp"] = (synack_options["timestamp"][0], syn.timestamp[0])
        self.send(
            t,
            SYN | ACK,
            REMOTE_ISS,
            syn.seq + 1,
            window=window,
            sport=REMOTE_PORT,
            dport=LOCAL_PORT,
            **synack_options,
        )
        ack = self.recv_one()
        assert ack.flags == ACK and ack.ack == (REMOTE_ISS + 1) & M
        assert conn.state is TcpState.ESTABLISHED
        return conn, syn
