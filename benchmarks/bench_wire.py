"""Microbenchmark of the wire formats on a 1,280-byte IPv4+UDP packet (and its IPv6 twin).

Prints microseconds per call, best of several repeats, so the per-packet cost of parsing and building
stays visible as the code changes. Run: ``python benchmarks/bench_wire.py``.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

from embedmesh.wire.icmp import build_icmpv4_echo, parse_icmpv4
from embedmesh.wire.ip import PROTO_ICMP, PROTO_UDP, build_ip, destination_of, parse_ip
from embedmesh.wire.ipv4 import build_ipv4, parse_ipv4
from embedmesh.wire.udp import build_udp, parse_udp

PACKET_SIZE = 1280
SRC4, DST4 = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])
SRC6 = bytes.fromhex("fd7a115ca1e0ab12480000000000000a")
DST6 = bytes.fromhex("fd7a115ca1e0ab12480000000000000b")


def measure(label: str, function: Callable[[], object], number: int = 20_000) -> float:
    """Print and return the best time per call in microseconds."""
    best = min(timeit.repeat(function, number=number, repeat=5)) / number * 1e6
    print(f"{label:<44} {best:6.2f} µs")
    return best


def parse_udp_packet(packet: bytes) -> memoryview:
    """What the receive path does: IP header, then UDP with checksum verification."""
    ip = parse_ip(packet)
    return parse_udp(ip.payload, ip.src, ip.dst).payload


def main() -> None:
    payload4 = bytes(range(256)) * 5
    payload4 = payload4[: PACKET_SIZE - 20 - 8]
    packet4 = build_ip(SRC4, DST4, PROTO_UDP, build_udp(SRC4, DST4, 40000, 53, payload4))
    payload6 = payload4[: PACKET_SIZE - 40 - 8]
    packet6 = build_ip(SRC6, DST6, PROTO_UDP, build_udp(SRC6, DST6, 40000, 53, payload6))
    assert len(packet4) == len(packet6) == PACKET_SIZE
    _, udp4 = parse_ipv4(packet4)
    icmp = build_ip(SRC4, DST4, PROTO_ICMP, build_icmpv4_echo(8, 1, 1, payload4))

    print(f"{PACKET_SIZE}-byte packets, best of 5 x 20,000 calls")
    measure("destination_of (routing fast path)", lambda: destination_of(packet4))
    measure("parse_ipv4 (header checksum)", lambda: parse_ipv4(packet4))
    measure("parse_ip, IPv4", lambda: parse_ip(packet4))
    measure("parse_udp, IPv4 (checksum over 1,260 B)", lambda: parse_udp(udp4, SRC4, DST4))
    measure("parse_ip + parse_udp, IPv4", lambda: parse_udp_packet(packet4))
    measure("parse_ip + parse_udp, IPv6", lambda: parse_udp_packet(packet6))
    measure("parse_ip + parse_icmpv4 (echo)", lambda: parse_icmpv4(parse_ip(icmp).payload))
    measure("build_udp, IPv4", lambda: build_udp(SRC4, DST4, 40000, 53, payload4))
    measure("build_ipv4 (header only, payload ready)", lambda: build_ipv4(SRC4, DST4, PROTO_UDP, udp4))
    measure(
        "build_ip + build_udp, IPv4",
        lambda: build_ip(SRC4, DST4, PROTO_UDP, build_udp(SRC4, DST4, 40000, 53, payload4)),
    )
    measure(
        "build_ip + build_udp, IPv6",
        lambda: build_ip(SRC6, DST6, PROTO_UDP, build_udp(SRC6, DST6, 40000, 53, payload6)),
    )


if __name__ == "__main__":
    main()
