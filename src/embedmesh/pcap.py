"""Packet captures of the overlay: a classic pcap writer and a :class:`Link` middleware that records
every IP packet a link carries, in both directions.

A failing interop test that leaves ``overlay.pcap`` behind is explained by
``tshark -r overlay.pcap -q -z expert`` (retransmissions, zero windows, resets, out-of-order
segments) or opened in Wireshark. Wrapped around a WireGuard link, the capture shows the overlay in
clear, as the application sees it, which a capture of the underlay (encrypted) cannot.

The format is the classic libpcap file (version 2.4, microsecond timestamps) with
``LINKTYPE_RAW`` (101): each record is a bare IPv4 or IPv6 packet, the version nibble telling
which. See docs/pcap.md.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from embedmesh.runtime.links import Deliver, Link

#: Microsecond-resolution pcap, written in our byte order (readers detect it from the magic).
PCAP_MAGIC = 0xA1B2C3D4
PCAP_VERSION = (2, 4)
#: LINKTYPE_RAW: the packet begins with an IPv4 or IPv6 header.
LINKTYPE_RAW = 101
DEFAULT_SNAPLEN = 65535

_FILE_HEADER = struct.Struct("=IHHiIII")
_RECORD_HEADER = struct.Struct("=IIII")


class PcapWriter:
    """Writes IP packets to a classic pcap file.

    ``write(packet)`` stamps it with the wall clock (``clock``, default :func:`time.time`); pass
    ``timestamp=`` (seconds since the epoch) to stamp it yourself. ``snaplen`` truncates what is
    stored (the record keeps the original length, so tshark still knows the packet's size): 128
    keeps every header of a TCP/IP packet and makes bulk-transfer captures small.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if snaplen <= 0:
            raise ValueError("snaplen must be positive")
        self.path = Path(path)
        self.snaplen = snaplen
        self.clock = clock
        self.packets = 0
        self._file: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(_FILE_HEADER.pack(PCAP_MAGIC, *PCAP_VERSION, 0, 0, snaplen, LINKTYPE_RAW))

    @property
    def closed(self) -> bool:
        return self._file is None

    def write(self, packet: bytes | bytearray | memoryview, timestamp: float | None = None) -> None:
        """Append one IP packet (ignored once the writer is closed)."""
        file = self._file
        if file is None:
            return
        when = self.clock() if timestamp is None else timestamp
        seconds = int(when)
        micros = int((when - seconds) * 1_000_000)
        length = len(packet)
        stored = min(length, self.snaplen)
        file.write(_RECORD_HEADER.pack(seconds, micros, stored, length))
        file.write(packet if stored == length else memoryview(packet)[:stored])
        self.packets += 1

    def flush(self) -> None:
        """Push buffered records to the file, so a reader sees them now."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class PcapLink:
    """A :class:`~embedmesh.runtime.links.Link` that records every packet of ``inner`` to ``writer``.

    Received packets are recorded as the inner link delivers them (after decryption, for a
    WireGuard link), sent packets before the inner link takes them. Closing the link closes the
    inner link and then the writer.
    """

    def __init__(self, inner: Link, writer: PcapWriter) -> None:
        self.inner = inner
        self.writer = writer

    def readables(self) -> list[socket.socket | int]:
        return self.inner.readables()

    def read(self, readable: socket.socket | int, deliver: Deliver, now: float) -> None:
        write = self.writer.write

        def record(packet: bytes | memoryview, at: float) -> None:
            write(packet)
            deliver(packet, at)

        self.inner.read(readable, record, now)

    def send(self, packet: bytes) -> None:
        self.writer.write(packet)
        self.inner.send(packet)

    def flush(self) -> None:
        self.inner.flush()
        # Once per batch, not per packet: the file stays readable while the test runs
        # (tshark -r during a breakpoint) and complete up to the last batch if it dies.
        self.writer.flush()

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()

    def handle_timeout(self, now: float) -> None:
        self.inner.handle_timeout(now)

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.writer.close()
