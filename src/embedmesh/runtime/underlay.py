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
from collections import Counter
from collections.abc import Iterable

logger = logging.getLogger("embedmesh.runtime")

Endpoint = tuple[str, int]

#: Socket buffer size asked for, as wireguard-go and Tailscale do (7 MiB): a burst of a bulk TCP
#: transfer must not overflow the kernel's default ~200 KiB while the loop is busy.
SOCKET_BUFFER_BYTES = 7 << 20
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
MAX_DATAGRAM = 65535


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
            self.port = sock.getsockname()[1]
            self.sockets.append(sock)
            if family == socket.AF_INET:
                self._v4 = sock
            else:
                self._v6 = sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        self._v4 = self._v6 = None

    def drain(self, sock: socket.socket, limit: int = 512) -> list[tuple[bytes, Endpoint]]:
        """Read up to ``limit`` datagrams that are waiting, without blocking."""
        out: list[tuple[bytes, Endpoint]] = []
        recvfrom = sock.recvfrom
        append = out.append
        try:
            for _ in range(limit):
                data, address = recvfrom(MAX_DATAGRAM)
                append((data, (address[0], address[1])))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            # ICMP errors from earlier sends surface here (ECONNREFUSED); they say nothing about
            # the datagrams still queued, so note them and let the next wake-up read on.
            self.counters[f"recv_error_{exc.errno}"] += 1
        return out

    def send(self, datagrams: Iterable[tuple[bytes, Endpoint]]) -> None:
        """Send datagrams without blocking; a full socket buffer drops, as UDP may."""
        for data, endpoint in datagrams:
            sock = self._v6 if ":" in endpoint[0] else self._v4
            if sock is None:
                self.counters["send_no_socket"] += 1
                continue
            try:
                sock.sendto(data, endpoint)
            except (BlockingIOError, InterruptedError):
                self.counters["send_dropped_full"] += 1
            except OSError as exc:
                self.counters[f"send_error_{exc.errno}"] += 1
