"""PcapWriter and PcapLink: the files parse with a tiny reader written here from the format's
definition, and with tshark when it is installed."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedmesh.pcap import LINKTYPE_RAW, PcapLink, PcapWriter
from embedmesh.runtime.links import Deliver
from embedmesh.wire.ip import PROTO_UDP, build_ip
from embedmesh.wire.udp import build_udp

V4_A, V4_B = socket.inet_aton("100.64.0.1"), socket.inet_aton("100.64.0.2")
V6_A = socket.inet_pton(socket.AF_INET6, "fd7a:115c:a1e0::1")
V6_B = socket.inet_pton(socket.AF_INET6, "fd7a:115c:a1e0::2")


def udp_packet(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    return build_ip(src, dst, PROTO_UDP, build_udp(src, dst, sport, dport, payload))


def read_pcap(path: Path) -> tuple[dict[str, int], list[tuple[float, int, bytes]]]:
    """A minimal classic-pcap reader: (header fields, [(timestamp, original length, data)])."""
    data = path.read_bytes()
    magic = data[:4]
    if magic == b"\xd4\xc3\xb2\xa1":
        order = "<"
    elif magic == b"\xa1\xb2\xc3\xd4":
        order = ">"
    else:
        raise AssertionError(f"not a microsecond pcap: magic {magic.hex()}")
    major, minor, zone, _sigfigs, snaplen, linktype = struct.unpack_from(order + "HHiIII", data, 4)
    header = {"major": major, "minor": minor, "zone": zone, "snaplen": snaplen, "linktype": linktype}
    records = []
    offset = 24
    while offset < len(data):
        sec, usec, stored, original = struct.unpack_from(order + "IIII", data, offset)
        assert usec < 1_000_000
        offset += 16
        records.append((sec + usec / 1e6, original, data[offset : offset + stored]))
        assert len(records[-1][2]) == stored, "truncated record"
        offset += stored
    return header, records


def test_writer_header_and_records(tmp_path: Path) -> None:
    path = tmp_path / "a.pcap"
    v4 = udp_packet(V4_A, V4_B, 1000, 53, b"hello")
    v6 = udp_packet(V6_A, V6_B, 2000, 5353, b"world" * 10)
    with PcapWriter(path) as writer:
        writer.write(v4, timestamp=1_700_000_000.25)
        writer.write(memoryview(v6), timestamp=1_700_000_001.5)
        assert writer.packets == 2
    assert writer.closed
    writer.write(v4)  # ignored after close
    header, records = read_pcap(path)
    assert header == {"major": 2, "minor": 4, "zone": 0, "snaplen": 65535, "linktype": LINKTYPE_RAW}
    assert records == [(1_700_000_000.25, len(v4), v4), (1_700_000_001.5, len(v6), v6)]


def test_wall_clock_timestamps_and_snaplen(tmp_path: Path) -> None:
    path = tmp_path / "b.pcap"
    ticks = iter([100.000001, 100.5])
    big = udp_packet(V4_A, V4_B, 1, 2, bytes(1200))
    with PcapWriter(path, snaplen=64, clock=lambda: next(ticks)) as writer:
        writer.write(big)
        writer.write(big[:40])
    header, records = read_pcap(path)
    assert header["snaplen"] == 64
    (t1, len1, data1), (t2, len2, data2) = records
    assert (t1, t2) == (pytest.approx(100.000001), 100.5)
    assert (len1, data1) == (len(big), big[:64])  # truncated, original length kept
    assert (len2, data2) == (40, big[:40])
    with pytest.raises(ValueError):
        PcapWriter(tmp_path / "c.pcap", snaplen=0)


class FakeLink:
    """A Link whose reads deliver queued packets and whose sends are collected."""

    def __init__(self, incoming: list[bytes]) -> None:
        self.incoming = incoming
        self.sent: list[bytes] = []
        self.calls: list[str] = []

    def readables(self) -> list[socket.socket | int]:
        return [7]

    def read(self, readable: socket.socket | int, deliver: Deliver, now: float) -> None:
        for packet in self.incoming:
            deliver(packet, now)
        self.incoming = []

    def send(self, packet: bytes) -> None:
        self.sent.append(packet)

    def flush(self) -> None:
        self.calls.append("flush")

    def next_deadline(self) -> float | None:
        return 42.0

    def handle_timeout(self, now: float) -> None:
        self.calls.append(f"timeout {now}")

    def close(self) -> None:
        self.calls.append("close")


def test_pcap_link_records_both_directions(tmp_path: Path) -> None:
    path = tmp_path / "link.pcap"
    inbound = [udp_packet(V4_B, V4_A, 53, 1000, b"answer"), udp_packet(V6_B, V6_A, 5353, 2000, b"mdns")]
    outbound = udp_packet(V4_A, V4_B, 1000, 53, b"question")
    inner = FakeLink(list(inbound))
    link = PcapLink(inner, PcapWriter(path))
    assert link.readables() == [7] and link.next_deadline() == 42.0
    link.send(outbound)
    got: list[tuple[bytes | memoryview, float]] = []
    link.read(7, lambda packet, now: got.append((packet, now)), 3.5)
    link.flush()
    _, records = read_pcap(path)  # flush() made the batch readable while the link runs
    assert len(records) == 3
    link.handle_timeout(4.0)
    link.close()
    assert inner.sent == [outbound]
    assert got == [(inbound[0], 3.5), (inbound[1], 3.5)]
    assert inner.calls == ["flush", "timeout 4.0", "close"]
    assert link.writer.closed
    _, records = read_pcap(path)
    assert [data for _, _, data in records] == [outbound, *inbound]
    stamps = [t for t, _, _ in records]
    assert stamps == sorted(stamps)


def tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    argv = ["tshark", "-r", str(path), "-o", "udp.check_checksum:TRUE", "-T", "fields"]
    for field in fields:
        argv += ["-e", field]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return [line.split("\t") for line in proc.stdout.splitlines()]


@pytest.fixture
def tshark() -> Iterator[None]:
    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed: apt-get install tshark")
    yield


def test_tshark_reads_the_file(tmp_path: Path, tshark: None) -> None:
    path = tmp_path / "t.pcap"
    with PcapWriter(path) as writer:
        writer.write(udp_packet(V4_A, V4_B, 1000, 53, b"x" * 12))
        writer.write(udp_packet(V6_A, V6_B, 2000, 9999, b"y" * 3))
    fields = ("frame.protocols", "ip.src", "ipv6.dst", "udp.srcport", "udp.length", "udp.checksum.status")
    rows = tshark_fields(path, *fields)
    # udp.checksum.status 1: tshark verified the checksum and found it good.
    assert rows[0][0].startswith("raw:ip:udp") and rows[0][1:] == ["100.64.0.1", "", "1000", "20", "1"]
    assert rows[1][0].startswith("raw:ipv6:udp") and rows[1][2:] == ["fd7a:115c:a1e0::2", "2000", "11", "1"]
