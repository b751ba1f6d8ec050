"""The host's own resolvers: what /etc/resolv.conf says, and the anyio client that asks them.

Names outside the tailnet go to the resolvers the host itself uses, read from resolv.conf (the path
is a parameter, so tests hand in their own file) and re-read when the file changes, as glibc does.
The client sends each query from a fresh connected UDP socket (a random source port per query, and
the kernel drops datagrams from anyone but the upstream), and over TCP (RFC 7766 framing) when the
resolver core asks for it after a truncated answer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

logger = logging.getLogger("embedmesh.dns")

RESOLV_CONF = "/etc/resolv.conf"
#: glibc reads at most three nameservers (MAXNS) and six search domains (MAXDNSRCH).
MAX_NAMESERVERS = 3
MAX_SEARCH_DOMAINS = 6
#: How often the file's status is checked for a change.
RESOLV_CONF_CHECK_INTERVAL = 2.0


@dataclass(frozen=True, slots=True)
class Upstream:
    """A resolver on the underlay or the overlay, by address and port."""

    host: str
    port: int = 53

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_upstream(text: str) -> Upstream:
    """``"1.2.3.4"``, ``"1.2.3.4:5353"``, ``"::1"``, ``"[::1]:5353"`` (scope ids allowed)."""
    text = text.strip()
    port = 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad resolver address {text!r}: expected [IPv6]:port")
        if rest:
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text, text)
    else:
        host = text
    ip_address(host.split("%")[0])  # a resolver is an address, never a name
    return Upstream(host, port)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in resolver address {whole!r}")
    return int(text)


@dataclass(frozen=True, slots=True)
class HostDnsConfig:
    """The parts of resolv.conf(5) a stub resolver uses."""

    nameservers: tuple[Upstream, ...] = ()
    search: tuple[str, ...] = ()
    ndots: int = 1
    #: Seconds per try (``options timeout:``); None leaves the resolver's own default.
    timeout: float | None = None
    attempts: int = 2
    rotate: bool = False


def parse_resolv_conf(text: str) -> HostDnsConfig:
    """Parse resolv.conf(5) text the way glibc does: unknown lines are ignored, the last
    ``search``/``domain`` line wins, at most three nameservers count."""
    nameservers: list[Upstream] = []
    search: tuple[str, ...] = ()
    ndots, attempts, rotate = 1, 2, False
    timeout: float | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, *values = line.split()
        if key == "nameserver" and values:
            try:
                server = Upstream(values[0], 53)
                ip_address(values[0].split("%")[0])
            except ValueError:
                continue
            if len(nameservers) < MAX_NAMESERVERS:
                nameservers.append(server)
        elif key == "search":
            search = tuple(v.strip(".").lower() for v in values if v.strip("."))[:MAX_SEARCH_DOMAINS]
        elif key == "domain" and values:
            search = (values[0].strip(".").lower(),) if values[0].strip(".") else ()
        elif key == "options":
            for option in values:
                name, _, value = option.partition(":")
                if name == "ndots" and value.isdigit():
                    ndots = min(int(value), 15)
                elif name == "timeout" and value.isdigit():
                    timeout = float(min(max(int(value), 1), 30))
                elif name == "attempts" and value.isdigit():
                    attempts = min(max(int(value), 1), 5)
                elif name == "rotate":
                    rotate = True
    return HostDnsConfig(tuple(nameservers), search, ndots, timeout, attempts, rotate)


class ResolvConf:
    """resolv.conf at ``path``, re-read when its status changes (checked every couple of seconds).

    A missing or unreadable file means no host resolvers: forwarded names then get SERVFAIL.
    """

    def __init__(self, path: str | os.PathLike[str] = RESOLV_CONF) -> None:
        self.path = Path(path)
        self._config = HostDnsConfig()
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")

    def current(self, now: float) -> HostDnsConfig:
        if now - self._checked_at >= RESOLV_CONF_CHECK_INTERVAL:
            self._checked_at = now
            self._reload()
        return self._config

    def _reload(self) -> None:
        try:
            status = self.path.stat()
            stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
            if stamp == self._stamp:
                return
            text = self.path.read_text(errors="replace")
        except OSError as exc:
            if self._stamp is not None or self._checked_at == float("-inf"):
                logger.info("cannot read %s (%s): no host resolvers", self.path, exc)
            self._stamp = None
            self._config = HostDnsConfig()
            return
        self._stamp = stamp
        self._config = parse_resolv_conf(text)
        logger.debug("host resolvers from %s: %s", self.path, self._config)


# ---------------------------------------------------------------------------------------- client


async def exchange_udp(upstream: Upstream, data: bytes, accept: Callable[[bytes], bool]) -> None:
    """Send ``data`` to ``upstream`` from a fresh connected UDP socket and hand every datagram
    that comes back to ``accept`` until it returns True. The caller bounds the wait."""
    async with await anyio.create_connected_udp_socket(upstream.host, upstream.port) as sock:
        await sock.send(data)
        while True:
            if accept(await sock.receive()):
                return


async def exchange_tcp(upstream: Upstream, data: bytes) -> bytes:
    """One query over a new TCP connection (RFC 7766 two-byte length framing)."""
    async with await anyio.connect_tcp(upstream.host, upstream.port) as stream:
        return await exchange_on_stream(stream, data)


async def exchange_on_stream(stream: anyio.abc.ByteStream, data: bytes) -> bytes:
    await stream.send(len(data).to_bytes(2, "big") + data)
    reader = BufferedByteReceiveStream(stream)
    length = int.from_bytes(await reader.receive_exactly(2), "big")
    return await reader.receive_exactly(length)
