"""The underlay: the real UDP sockets WireGuard datagrams travel on.

This and the rest of ``runtime/`` are the only code with real sockets. A socket is read by draining
it completely each time it becomes readable (one wake-up, many datagrams), because waking the event
loop once per datagram costs ten times more than the datagram itself
(``shared/research/performance.md``).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections import Counter
from collections.abc import Sequence

logger = logging.getLogger("embedmesh.runtime")

Endpoint = tuple[str, int]

#: Socket buffer size asked for, as wireguard-go and Tailscale do (7 MiB): a burst of a bulk TCP
#: transfer must not overflow the kernel's default ~200 KiB while the loop is busy.
SOCKET_BUFFER_BYTES = 7 << 20
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
MAX_DATAGRAM = 65535
# Linux UDP segmentation offload (include/uapi/linux/udp.h): one sendmsg carries many equal-size
# datagrams (UDP_SEGMENT), one recvmsg returns several coalesced ones (UDP_GRO). Measured here at
# ~0.1 µs per datagram instead of 2–6 µs (shared/research/performance.md).
UDP_SEGMENT = 103
UDP_GRO = 104
#: Datagrams per GSO send; the kernel's limit is 64 (UDP_MAX_SEGMENTS) and 64 KiB in all.
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
_GSO_FALLBACK_ERRNOS = {errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE}
_unpack_int = struct.Struct("i").unpack_from
_pack_u16 = struct.Struct("H").pack


def _grow_buffers(sock: socket.socket, size: int) -> None:
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            # Only root may exceed net.core.rmem_max/wmem_max; everyone else gets the capped size.
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
            except OSError:
                logger.debug("could not set socket buffer option %s", plain)


class UdpUnderlay:
    """One UDP port, on IPv4 and (where the host has it) IPv6, sharing a port number."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self._v4: socket.socket | None = None
        self._v6: socket.socket | None = None
        self.port = 0
        self.counters: Counter[str] = Counter()
        self.gso = True
        self._gro: set[socket.socket] = set()
        self._ancillary_size = socket.CMSG_SPACE(4)

    def open(self, port: int = 0, host: str | None = None) -> None:
        """Bind the sockets. ``host`` limits them to one local address (IPv4 or IPv6)."""
        families: list[tuple[socket.AddressFamily, str]]
        if host is None:
            families = [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
        elif ":" in host:
            families = [(socket.AF_INET6, host)]
        else:
            families = [(socket.AF_INET, host)]
        for family, address in families:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address, port or self.port))
            except OSError as exc:
                sock.close()
                if (
                    family == socket.AF_INET6
                    and host is None
                    and exc.errno
                    in (
                        errno.EADDRNOTAVAIL,
                        errno.EAFNOSUPPORT,
                        errno.EADDRINUSE,
                    )
                ):
                    # A host without IPv6 (common in containers) still gets an IPv4 underlay.
                    logger.info("IPv6 underlay unavailable: %s", exc)
                    continue
                raise
            sock.setblocking(False)
            _grow_buffers(sock, SOCKET_BUFFER_BYTES)
            try:
                sock.setsockopt(socket.IPPROTO_UDP, UDP_GRO, 1)
                self._gro.add(sock)
            except OSError:
                logger.debug("UDP GRO unavailable on this kernel")
            self.port = sock.getsockname()[1]
            self.sockets.append(sock)
            if family == socket.AF_INET:
                self._v4 = sock
            else:
                self._v6 = sock

    @property
    def has_ipv4(self) -> bool:
        return self._v4 is not None

    @property
    def has_ipv6(self) -> bool:
        return self._v6 is not None

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        self._v4 = self._v6 = None

    def drain(
        self, sock: socket.socket, limit: int = 512, max_datagrams: int = 1 << 30
    ) -> list[tuple[bytes | memoryview, Endpoint]]:
        """Read what is waiting, up to ``limit`` receive calls, without blocking; stop early once
        ``max_datagrams`` datagrams are in (one GRO read may bring up to 64, so a few more may).

        With GRO one call may return several datagrams from one sender, back to back, each of the
        size the control message names (the last one may be shorter); they are returned as views
        into the buffer that call filled (slicing them out as copies cost ~1 µs per datagram).
        """
        out: list[tuple[bytes | memoryview, Endpoint]] = []
        append = out.append
        try:
            if sock not in self._gro:
                recvfrom = sock.recvfrom
                for _ in range(min(limit, max_datagrams)):
                    data, address = recvfrom(MAX_DATAGRAM)
                    append((data, (address[0], address[1])))
                return out
            recvmsg = sock.recvmsg
            ancillary_size = self._ancillary_size
            for _ in range(limit):
                data, ancillary, _flags, address = recvmsg(MAX_DATAGRAM, ancillary_size)
                endpoint = (address[0], address[1])
                size = len(data)
                segment = size
                for level, kind, value in ancillary:
                    if level == socket.IPPROTO_UDP and kind == UDP_GRO:
                        segment = _unpack_int(value)[0]
                if segment >= size:
                    append((data, endpoint))
                else:
                    view = memoryview(data)
                    for offset in range(0, size, segment):
                        append((view[offset : offset + segment], endpoint))
                if len(out) >= max_datagrams:
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            # ICMP errors from earlier sends surface here (ECONNREFUSED); they say nothing about
            # the datagrams still queued, so note them and let the next wake-up read on.
            self.counters[f"recv_error_{exc.errno}"] += 1
        return out

    def send(self, datagrams: Sequence[tuple[bytes, Endpoint]]) -> None:
        """Send datagrams without blocking; a full socket buffer drops, as UDP may.

        Runs of datagrams to one endpoint with one size (the last may be shorter) go out as one
        GSO send. Order is kept.
        """
        count = len(datagrams)
        i = 0
        while i < count:
            data, endpoint = datagrams[i]
            size = len(data)
            j = i + 1
            if self.gso:
                total = size
                while (
                    j < count
                    and j - i < GSO_MAX_SEGMENTS
                    and datagrams[j][1] == endpoint
                    and total + len(datagrams[j][0]) <= GSO_MAX_BYTES
                ):
                    next_size = len(datagrams[j][0])
                    if next_size > size:
                        break
                    total += next_size
                    j += 1
                    if next_size < size:
                        break  # a shorter datagram can only end a GSO batch
            if j - i == 1:
                self._send_one(data, endpoint)
            else:
                self._send_batch(datagrams, i, j, size, endpoint)
            i = j

    def _socket_for(self, endpoint: Endpoint) -> socket.socket | None:
        sock = self._v6 if ":" in endpoint[0] else self._v4
        if sock is None:
            self.counters["send_no_socket"] += 1
        return sock

    def _send_one(self, data: bytes, endpoint: Endpoint) -> None:
        sock = self._socket_for(endpoint)
        if sock is None:
            return
        try:
            sock.sendto(data, endpoint)
        except (BlockingIOError, InterruptedError):
            self.counters["send_dropped_full"] += 1
        except OSError as exc:
            self.counters[f"send_error_{exc.errno}"] += 1

    def _send_batch(
        self, datagrams: Sequence[tuple[bytes, Endpoint]], start: int, end: int, size: int, endpoint: Endpoint
    ) -> None:
        sock = self._socket_for(endpoint)
        if sock is None:
            return
        payload = b"".join([datagrams[k][0] for k in range(start, end)])
        try:
            sock.sendmsg([payload], [(socket.IPPROTO_UDP, UDP_SEGMENT, _pack_u16(size))], 0, endpoint)
            self.counters["gso_batches"] += 1
        except (BlockingIOError, InterruptedError):
            self.counters["send_dropped_full"] += end - start
        except OSError as exc:
            if exc.errno in _GSO_FALLBACK_ERRNOS:
                logger.info("UDP GSO refused (%s); sending one datagram per call from now on", exc)
                self.gso = False
                for k in range(start, end):
                    self._send_one(datagrams[k][0], endpoint)
            else:
                self.counters[f"send_error_{exc.errno}"] += end - start
