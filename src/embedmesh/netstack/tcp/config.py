"""Per-layer TCP settings and the connection states."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TcpState(enum.IntEnum):
    """RFC 9293 §3.3.2 connection states (an IntEnum: state checks sit on the per-segment path)."""

    CLOSED = 0
    LISTEN = 1
    SYN_SENT = 2
    SYN_RECEIVED = 3
    ESTABLISHED = 4
    FIN_WAIT_1 = 5
    FIN_WAIT_2 = 6
    CLOSE_WAIT = 7
    CLOSING = 8
    LAST_ACK = 9
    TIME_WAIT = 10


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """Settings shared by every connection of a :class:`~embedmesh.netstack.tcp.layer.TcpLayer`.

    The MSS we advertise is derived from ``mtu`` (MTU-40 over IPv4, MTU-60 over IPv6); 1280 is the
    WireGuard overlay MTU Tailscale uses, which keeps every segment clear of the underlay's limits.
    """

    mtu: int = 1280
    verify_checksum: bool = True
    recv_buffer: int = 4 * 1024 * 1024
    send_buffer: int = 4 * 1024 * 1024
    congestion: str = "cubic"
    nodelay: bool = False
    delayed_ack: float = 0.04
    #: In batch mode (``TcpLayer.begin_batch``), at least one ACK per this many full-sized segments
    #: even inside one batch (Linux's GRO merges at most 64 KiB, about 50 of ours, per ACK).
    max_ack_stretch: int = 64
    window_scaling: bool = True
    timestamps: bool = True
    sack: bool = True
    initial_rto: float = 1.0
    min_rto: float = 0.2
    max_rto: float = 60.0
    syn_retries: int = 6
    max_retransmissions: int = 15
    time_wait: float = 60.0
    max_time_wait: int = 4096
    fin_wait2_timeout: float = 60.0
    syn_backlog: int = 256
    syn_cookies: bool = True
    keepalive: bool = False
    keepalive_idle: float = 7200.0
    keepalive_interval: float = 75.0
    keepalive_count: int = 9
    challenge_ack_limit: int = 100
    invalid_ack_interval: float = 0.5
    max_ooo_blocks: int = 256
    max_reordering: int = 300
    max_connections: int = 100_000
    ephemeral_ports: tuple[int, int] = (49152, 65535)

    def mss_for(self, address_length: int) -> int:
        """The MSS to advertise on a connection whose addresses have ``address_length`` bytes."""
        return self.mtu - (40 if address_length == 4 else 60)
