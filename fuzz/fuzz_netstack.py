"""Fuzz target: the overlay stack's input path (IP → ICMP / UDP / TCP), with a TCP listener, an
established connection and a UDP socket in place.

The first byte picks a template (a real SYN, data segment, UDP datagram or echo request addressed
to the stack) that the rest of the input overwrites from the start, so mutations get past the IP
and transport checksums' neighbourhood often enough to reach deep state. Nothing may raise, and
state must stay bounded however many inputs arrive.
"""

from __future__ import annotations

import random
import sys

from embedmesh.netstack.stack import Netstack
from embedmesh.wire.checksum import checksum, pseudo_header_sum
from embedmesh.wire.icmp import ICMPV4_ECHO_REQUEST, build_icmpv4_echo
from embedmesh.wire.ip import PROTO_ICMP, PROTO_TCP, PROTO_UDP, build_ip
from embedmesh.wire.tcp import ACK, PSH, SYN, build_tcp
from embedmesh.wire.udp import build_udp

LOCAL = bytes([100, 64, 0, 1])
REMOTE = bytes([100, 64, 0, 2])
_sent: list[bytes] = []
_stack = Netstack([LOCAL], _sent.append, rng=random.Random(5))
_listener = _stack.tcp.listen(None, 80, backlog=16)
_udp = _stack.udp.bind(None, 53)
_now = [1.0]


def _segment(flags: int, seq: int, ack: int, payload: bytes = b"") -> bytes:
    return build_ip(
        REMOTE, LOCAL, PROTO_TCP, build_tcp(REMOTE, LOCAL, 40000, 80, seq, ack, flags, 65535, payload=payload)
    )


TEMPLATES = [
    _segment(SYN, 1000, 0),
    _segment(ACK | PSH, 1001, 1, b"GET / HTTP/1.1\r\n\r\n"),
    build_ip(REMOTE, LOCAL, PROTO_UDP, build_udp(REMOTE, LOCAL, 5000, 53, b"\x12\x34" + bytes(10))),
    build_ip(REMOTE, LOCAL, PROTO_ICMP, build_icmpv4_echo(ICMPV4_ECHO_REQUEST, 1, 1, b"ping")),
]


def _fix_checksums(packet: bytes) -> bytes:
    """Patch the IPv4 header and TCP/UDP/ICMP checksums so mutations reach the transports."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return packet
    buf = bytearray(packet)
    ihl = (buf[0] & 15) * 4
    if ihl < 20 or len(buf) < ihl:
        return packet
    buf[10:12] = b"\0\0"
    buf[10:12] = checksum(buf[:ihl]).to_bytes(2, "big")
    proto, body = buf[9], buf[ihl:]
    offset = {PROTO_TCP: 16, PROTO_UDP: 6, PROTO_ICMP: 2}.get(proto)
    if offset is None or len(body) < offset + 2:
        return bytes(buf)
    body[offset : offset + 2] = b"\0\0"
    initial = (
        0
        if proto == PROTO_ICMP
        else pseudo_header_sum(bytes(buf[12:16]), bytes(buf[16:20]), proto, len(body))
    )
    body[offset : offset + 2] = checksum(body, initial).to_bytes(2, "big")
    return bytes(buf[:ihl] + body)


def TestOneInput(data: bytes) -> None:
    if data:
        selector = data[0]
        template = TEMPLATES[selector % len(TEMPLATES)]
        body = data[1:]
        data = body + template[len(body) :] if len(body) < len(template) else body
        if selector & 0x80:
            data = _fix_checksums(data)
    _now[0] += 0.01
    _stack.receive(data, _now[0])
    _stack.handle_timeout(_now[0])
    while _udp.receive() is not None:
        pass
    while (conn := _listener.accept()) is not None:
        conn.abort(_now[0])
    _sent.clear()
    tcp = _stack.tcp
    assert tcp.connection_count <= tcp.config.syn_backlog + tcp.config.max_time_wait + 64
    assert len(_udp.queue) == 0


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)
