"""MagicDNS on sockets: the anyio driver of the :class:`~embedmesh.dns.resolver.Resolver` core.

:class:`DnsService` moves bytes and keeps time, nothing more. It serves DNS over UDP and TCP on any
number of sockets: the node's overlay sockets at 100.100.100.100:53 and [fd7a:115c:a1e0::53]:53 (so
every peer, a plain WireGuard client included, can use MagicDNS), and host sockets such as
127.0.0.1:5353 for programs on the same machine. It runs the upstream exchanges the core asks for,
on the host network or, for a resolver inside the tailnet, over the overlay. And it is the node's
own stub resolver (:meth:`DnsService.resolve`), with search domains as resolv.conf would apply them.
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import time
from collections.abc import Callable
from functools import partial
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Protocol

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream

from embedmesh.dns.message import (
    CLASS_IN,
    FLAG_RD,
    HEADER,
    QUESTION_TAIL,
    RCODE_NXDOMAIN,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    encode_name,
    parse_message,
    text_to_name,
)
from embedmesh.dns.records import MagicZone
from embedmesh.dns.resolver import Client, Exchange, Pending, Recursion, Resolver
from embedmesh.dns.upstream import HostDnsConfig, ResolvConf, Upstream, exchange_on_stream, exchange_udp
from embedmesh.errors import ConfigError, NameResolutionError, ParseError

logger = logging.getLogger("embedmesh.dns")

IPAddress = IPv4Address | IPv6Address

#: The MagicDNS service addresses, as Tailscale uses them.
SERVICE_V4 = IPv4Address("100.100.100.100")
SERVICE_V6 = IPv6Address("fd7a:115c:a1e0::53")
DNS_PORT = 53
#: A TCP client that sends nothing for this long is disconnected (RFC 7766 §6.2.3 suggests seconds).
TCP_IDLE_TIMEOUT = 10.0
MAX_TCP_CONNECTIONS = 128
#: Answers a TCP connection may have outstanding (RFC 7766 pipelining) before we stop reading.
MAX_TCP_PIPELINE = 32
OUTBOX_SIZE = 1024

Delivery = Callable[[bytes], None]


class OverlayNetwork(Protocol):
    """The node's overlay, for upstream resolvers that live inside the tailnet."""

    def routes(self, host: str) -> bool:
        """Whether the overlay has a peer for ``host``."""

    async def bind_udp(self) -> Any:
        """A UDP socket with ``sendto(data, host, port)`` and ``receive()``."""

    async def dial_tcp(self, host: str, port: int) -> anyio.abc.ByteStream: ...


class DnsService:
    """Drives one :class:`Resolver`: sockets in, exchanges out, timers, and the stub resolver."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        resolv_conf: ResolvConf | None = None,
        overlay: OverlayNetwork | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resolver = resolver
        self.resolv_conf = resolv_conf
        self.overlay = overlay
        self.clock = clock
        self._task_group: anyio.abc.TaskGroup | None = None
        self._ids = itertools.count(1)
        self._deliveries: dict[int, Delivery] = {}
        self._live: set[int] = set()
        self._scopes: dict[int, anyio.CancelScope] = {}
        self._wake: anyio.Event | None = None
        self._timer_at = math.inf
        self._tcp_connections = 0
        self._outbox_send, self._outbox_receive = anyio.create_memory_object_stream[
            tuple[Any, str, int, bytes]
        ](OUTBOX_SIZE)

    # -------------------------------------------------------------------------------- running

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the timers, the UDP outbox and the upstream exchanges until cancelled."""
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            tg.start_soon(self._timer_loop)
            tg.start_soon(self._outbox_loop)
            task_status.started()

    def set_zone(self, zone: MagicZone) -> None:
        self.resolver.set_zone(zone)

    @property
    def zone(self) -> MagicZone:
        return self.resolver.zone

    def _host_config(self) -> HostDnsConfig:
        if self.resolv_conf is not None:
            self.resolver.set_host_config(self.resolv_conf.current(self.clock()))
        return self.resolver.host_config

    def handle(self, data: bytes, client: Client, delivery: Delivery) -> bytes | None:
        """One query from ``client``: its answer now, or None (it comes later through
        ``delivery``, or never for a packet that deserves none)."""
        self._host_config()
        try:
            result = self.resolver.receive_query(data, client, self.clock())
        except Exception:  # the core never raises on input; if it ever does, drop, don't die
            logger.exception("DNS query from client %d crashed the resolver; dropped", client.id)
            self.resolver.counters["drop_internal_error"] += 1
            return None
        if isinstance(result, Pending):
            self._deliveries[client.id] = delivery
            self._pump()
            return None
        return result

    def _pump(self) -> None:
        resolver = self.resolver
        for exchange_id in resolver.pop_finished():
            self._live.discard(exchange_id)
            scope = self._scopes.pop(exchange_id, None)
            if scope is not None:
                scope.cancel()
        exchanges = resolver.pop_exchanges()
        if exchanges:
            if self._task_group is None:
                raise RuntimeError("DnsService.run() is not running")
            for exchange in exchanges:
                self._live.add(exchange.id)
                self._task_group.start_soon(self._exchange, exchange)
        for client, data in resolver.pop_replies():
            delivery = self._deliveries.pop(client.id, None)
            if delivery is not None:
                delivery(data)
        deadline = resolver.next_deadline()
        if deadline is not None and deadline < self._timer_at and self._wake is not None:
            self._wake.set()

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.resolver.next_deadline()
            self._timer_at = math.inf if deadline is None else deadline
            wake = self._wake = anyio.Event()
            delay = self._timer_at - self.clock()
            if delay > 0:
                with anyio.move_on_after(delay if delay != math.inf else None):
                    await wake.wait()
            self.resolver.handle_timeout(self.clock())
            self._pump()

    async def _outbox_loop(self) -> None:
        async for sock, host, port, data in self._outbox_receive:
            try:
                await sock.sendto(data, host, port)
            except (OSError, anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
                logger.debug("cannot answer %s:%d: %s", host, port, exc)

    # -------------------------------------------------------------------------------- upstreams

    async def _exchange(self, exchange: Exchange) -> None:
        if exchange.id not in self._live:
            return
        with anyio.CancelScope() as scope:
            self._scopes[exchange.id] = scope
            try:
                if exchange.transport == "udp":
                    await self._exchange_udp(exchange)
                else:
                    data = await self._exchange_tcp(exchange)
                    self.resolver.receive_upstream(exchange.id, data, self.clock())
            except (
                OSError,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                anyio.EndOfStream,
                anyio.IncompleteRead,
            ) as exc:
                logger.debug("upstream %s failed: %r", exchange.upstream, exc)
                self.resolver.exchange_failed(exchange.id, self.clock())
            finally:
                self._scopes.pop(exchange.id, None)
        self._pump()

    def _on_overlay(self, upstream: Upstream) -> bool:
        return self.overlay is not None and self.overlay.routes(upstream.host)

    async def _exchange_udp(self, exchange: Exchange) -> None:
        upstream = exchange.upstream

        def accept(data: bytes) -> bool:
            done = self.resolver.receive_upstream(exchange.id, data, self.clock())
            self._pump()
            return done

        if not self._on_overlay(upstream):
            await exchange_udp(upstream, exchange.data, accept)
            return
        assert self.overlay is not None
        sock = await self.overlay.bind_udp()
        async with sock:
            await sock.sendto(exchange.data, upstream.host, upstream.port)
            while True:
                data, (host, port) = await sock.receive()
                if port == upstream.port and ip_address(host) == ip_address(upstream.host) and accept(data):
                    return

    async def _exchange_tcp(self, exchange: Exchange) -> bytes:
        upstream = exchange.upstream
        if self._on_overlay(upstream):
            assert self.overlay is not None
            stream = await self.overlay.dial_tcp(upstream.host, upstream.port)
        else:
            stream = await anyio.connect_tcp(upstream.host, upstream.port)
        async with stream:
            return await exchange_on_stream(stream, exchange.data)

    # -------------------------------------------------------------------------------- serving

    async def serve_udp(self, sock: Any, recursion: Callable[[str], Recursion]) -> None:
        """Answer every datagram on ``sock`` (an anyio UDP socket or a mesh ``UdpSocket``);
        ``recursion(host)`` says how far a client at ``host`` may have names forwarded."""
        while True:
            try:
                data, (host, port) = await sock.receive()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            except OSError as exc:  # e.g. an ICMP error reported on the socket
                logger.debug("DNS UDP socket: %s", exc)
                continue
            client = Client(next(self._ids), "udp", recursion(host))

            def deliver(reply: bytes, host: str = host, port: int = port) -> None:
                try:
                    self._outbox_send.send_nowait((sock, host, port, reply))
                except anyio.WouldBlock:
                    self.resolver.counters["drop_outbox_full"] += 1

            reply = self.handle(data, client, deliver)
            if reply is not None:
                try:
                    await sock.sendto(reply, host, port)
                except OSError as exc:
                    logger.debug("cannot answer %s:%d: %s", host, port, exc)

    async def serve_tcp(self, listener: anyio.abc.Listener[Any], recursion: Callable[[str], Recursion]) -> None:
        """Answer DNS over TCP (RFC 7766: pipelined queries, answers in any order)."""

        async def handler(stream: anyio.abc.ByteStream) -> None:
            if self._tcp_connections >= MAX_TCP_CONNECTIONS:
                self.resolver.counters["drop_tcp_connections"] += 1
                await stream.aclose()
                return
            self._tcp_connections += 1
            try:
                await self._serve_connection(stream, recursion)
            except Exception:  # one connection's trouble must never stop the listener
                logger.exception("DNS over TCP connection failed")
            finally:
                self._tcp_connections -= 1

        try:
            await listener.serve(handler)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return

    async def _serve_connection(
        self, stream: anyio.abc.ByteStream, recursion: Callable[[str], Recursion]
    ) -> None:
        remote = stream.extra(SocketAttribute.remote_address, ("", 0))
        allowed = recursion(str(remote[0]))
        send, receive = anyio.create_memory_object_stream[bytes](MAX_TCP_PIPELINE)
        pipeline = _Pipeline()

        async def writer() -> None:
            async with receive:
                try:
                    async for reply in receive:
                        await stream.send(len(reply).to_bytes(2, "big") + reply)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    tg.cancel_scope.cancel()  # the client is gone: so is this connection

        def deliver(reply: bytes, client_id: int) -> None:
            pipeline.settle(client_id)
            try:
                send.send_nowait(reply)
            except (anyio.WouldBlock, anyio.ClosedResourceError):
                self.resolver.counters["drop_tcp_reply"] += 1

        try:
            async with stream, anyio.create_task_group() as tg:
                tg.start_soon(writer)
                reader = BufferedByteReceiveStream(stream)
                try:
                    while True:
                        with anyio.fail_after(TCP_IDLE_TIMEOUT):
                            length = int.from_bytes(await reader.receive_exactly(2), "big")
                            if length == 0:
                                break
                            data = await reader.receive_exactly(length)
                        client = Client(next(self._ids), "tcp", allowed)
                        pipeline.add(client.id)
                        reply = self.handle(data, client, partial(deliver, client_id=client.id))
                        if reply is not None:
                            deliver(reply, client.id)
                        elif client.id not in self._deliveries:
                            pipeline.settle(client.id)  # dropped: nothing will come
                        await pipeline.wait_below(MAX_TCP_PIPELINE)
                except (TimeoutError, anyio.IncompleteRead, anyio.EndOfStream):
                    pass
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    tg.cancel_scope.cancel()
                # The client stopped sending: finish what it asked for (bounded), then close.
                with anyio.move_on_after(TCP_IDLE_TIMEOUT):
                    await pipeline.wait_below(1)
                send.close()
        finally:
            send.close()
            for client_id in pipeline.outstanding:
                self._deliveries.pop(client_id, None)

    async def serve_local(
        self,
        host: str,
        port: int,
        *,
        task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on the host network at ``host:port`` over UDP and TCP (the same port), forwarding
        only for clients on loopback. Reports the bound ``(host, port)`` when ready."""
        udp, listener = await _bind_pair(host, port)
        bound = int(udp.extra(SocketAttribute.local_port))
        own = {Upstream(host, bound)}
        if ip_address(host).is_unspecified:
            own |= {Upstream("127.0.0.1", bound), Upstream("::1", bound)}
        self.resolver.excluded |= own
        logger.info("MagicDNS on %s:%d (UDP and TCP)", host, bound)
        try:
            async with udp, listener, anyio.create_task_group() as tg:
                tg.start_soon(self.serve_udp, udp, _loopback_only)
                tg.start_soon(self.serve_tcp, listener, _loopback_only)
                task_status.started((host, bound))
        finally:
            self.resolver.excluded -= own

    # -------------------------------------------------------------------------------- stub resolver

    async def query(self, data: bytes, *, timeout: float = 15.0, recursion: Recursion = Recursion.ALL) -> bytes:
        """Ask the resolver as the node itself (no size limit; tailnet names always known);
        ``recursion`` confines the question, as for a peer (e.g. the SOCKS5 proxy's lookups)."""
        client = Client(next(self._ids), "internal", recursion)
        answer: list[bytes] = []
        ready = anyio.Event()

        def deliver(reply: bytes) -> None:
            answer.append(reply)
            ready.set()

        reply = self.handle(data, client, deliver)
        if reply is not None:
            return reply
        try:
            with anyio.fail_after(timeout):
                await ready.wait()
        finally:
            self._deliveries.pop(client.id, None)
        if not answer:  # pragma: no cover - the core answers every pending query
            raise TimeoutError("no answer from the resolver")
        return answer[0]

    def search_list(self, name: str, *, host_search: bool = True) -> list[str]:
        """The names to try for ``name``, as a resolv.conf stub would: with the search domains
        first when it has fewer dots than ``ndots`` (and as given first otherwise); a name ending
        in a dot is absolute. ``host_search=False`` leaves out resolv.conf's search domains."""
        if name.endswith("."):
            return [name.rstrip(".")]
        config = self._host_config()
        domains: list[str] = []
        for domain in (*self.zone.search_domains, *(config.search if host_search else ())):
            if domain and domain not in domains:
                domains.append(domain)
        expanded = [f"{name}.{domain}" for domain in domains]
        if name.count(".") >= config.ndots:
            return [name, *expanded]
        return [*expanded, name]

    async def resolve(
        self, host: str, *, family: int | None = None, recursion: Recursion = Recursion.ALL
    ) -> list[IPAddress]:
        """The addresses of ``host``: an IP literal as it is, a tailnet name from the zone, any
        other name through search domains, split DNS and the host's resolvers. IPv4 first.
        ``recursion=Recursion.ROUTES`` keeps the lookup inside the tailnet (its names and split
        DNS, never the host's resolvers); the host's own search domains are then not applied.

        ``family`` picks one: 4 or ``socket.AF_INET``, 6 or ``socket.AF_INET6``; None (or
        ``socket.AF_UNSPEC``) means both.

        Raises :class:`~embedmesh.errors.NameResolutionError` (a ``LookupError``) when the name
        does not exist, has no address of the family asked for, or no resolver could answer.
        """
        version = ip_version(family)
        try:
            literal = ip_address(host.split("%")[0])
        except ValueError:
            pass
        else:
            if version in (None, literal.version):
                return [literal]
            raise NameResolutionError(f"{host!r} is an IPv{literal.version} address, not IPv{version}")
        in_zone = self.zone.addresses_of(host)
        found = [a for a in in_zone if version in (None, a.version)]
        if found:
            return sorted(found, key=lambda a: a.version)
        if in_zone:
            # A tailnet name (or extra record) of the other family only: the zone is the
            # authority for it, so no upstream could say otherwise.
            raise NameResolutionError(
                f"{host!r} has no IPv{version} address (only {', '.join(map(str, in_zone))})"
            )
        try:
            if not text_to_name(host):
                raise ValueError("empty")
        except ValueError:
            raise NameResolutionError(f"{host!r} is not a valid DNS name") from None
        failures: list[str] = []
        other_family: list[str] = []  # names that exist, but without an address (of ``version``)
        for candidate in self.search_list(host, host_search=recursion is Recursion.ALL):
            try:
                name = text_to_name(candidate)
            except ValueError:
                continue  # the name with a search domain appended is too long: skip that one
            if not name:
                continue
            addresses, rcode = await self._lookup_addresses(name, version, recursion)
            if addresses:
                return addresses
            if rcode == RCODE_SERVFAIL:
                failures.append(candidate)
            elif rcode == 0:
                other_family.append(candidate)
        if failures:
            raise NameResolutionError(
                f"cannot resolve {host!r}: no resolver answered for {', '.join(failures)} "
                "(check the upstream resolvers in /etc/resolv.conf or the tailnet's split DNS)"
            )
        if other_family:
            kind = f"IPv{version}" if version else "IPv4 or IPv6"
            raise NameResolutionError(
                f"{host!r} has no {kind} address (DNS knows {', '.join(other_family)}, but without one)"
            )
        raise NameResolutionError(f"cannot resolve {host!r}: no such name in the tailnet or in DNS")

    async def _lookup_addresses(
        self, name: tuple[bytes, ...], family: int | None, recursion: Recursion = Recursion.ALL
    ) -> tuple[list[IPAddress], int]:
        qtypes = [t for t, v in ((TYPE_A, 4), (TYPE_AAAA, 6)) if family in (None, v)]
        replies: dict[int, bytes] = {}

        async def ask(qtype: int) -> None:
            query = HEADER.pack(next(self._ids) & 0xFFFF, FLAG_RD, 1, 0, 0, 0) + encode_name(name)
            replies[qtype] = await self.query(query + QUESTION_TAIL.pack(qtype, CLASS_IN), recursion=recursion)

        async with anyio.create_task_group() as tg:
            for qtype in qtypes:
                tg.start_soon(ask, qtype)
        addresses: list[IPAddress] = []
        rcodes: set[int] = set()
        for qtype in qtypes:
            data = replies[qtype]
            try:
                message = parse_message(data)
            except ParseError:
                rcodes.add(RCODE_SERVFAIL)
                continue
            rcodes.add(message.rcode)
            for record in message.section(1):
                if record.rtype == qtype == TYPE_A and record.rdata_length == 4:
                    addresses.append(IPv4Address(data[record.rdata_offset : record.rdata_offset + 4]))
                elif record.rtype == qtype == TYPE_AAAA and record.rdata_length == 16:
                    addresses.append(IPv6Address(data[record.rdata_offset : record.rdata_offset + 16]))
        # A failure anywhere means "could not tell"; otherwise the name exists if any type does.
        if RCODE_SERVFAIL in rcodes or not rcodes:
            return addresses, RCODE_SERVFAIL
        return addresses, 0 if 0 in rcodes else RCODE_NXDOMAIN


def ip_version(family: int | None) -> int | None:
    """4 or 6 for ``family`` given as an IP version or a ``socket.AF_*`` constant; None for both."""
    if family is None or family == socket.AF_UNSPEC:
        return None
    if family in (4, socket.AF_INET):
        return 4
    if family in (6, socket.AF_INET6):
        return 6
    raise ConfigError(
        f"family must be 4, 6, socket.AF_INET or socket.AF_INET6 (None for both), not {family!r}"
    )


class _Pipeline:
    """The queries of one TCP connection whose answers are still to come."""

    def __init__(self) -> None:
        self.outstanding: set[int] = set()
        self._changed = anyio.Event()

    def add(self, client_id: int) -> None:
        self.outstanding.add(client_id)

    def settle(self, client_id: int) -> None:
        self.outstanding.discard(client_id)
        self._changed.set()

    async def wait_below(self, count: int) -> None:
        while len(self.outstanding) >= count:
            self._changed = anyio.Event()
            await self._changed.wait()


def _loopback_only(host: str) -> Recursion:
    """Clients of a host port: loopback ones are this host's programs; others get no recursion."""
    return Recursion.ALL if _is_loopback(host) else Recursion.NONE


def _is_loopback(host: str) -> bool:
    try:
        address = ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


async def _bind_pair(host: str, port: int) -> tuple[anyio.abc.UDPSocket, anyio.abc.Listener[Any]]:
    """A UDP socket and a TCP listener on the same port (a free one when ``port`` is 0)."""
    v6 = ip_address(host).version == 6
    for _ in range(20 if port == 0 else 1):
        if v6:
            udp = await anyio.create_udp_socket(family=socket.AF_INET6, local_host=host, local_port=port)
        else:
            udp = await anyio.create_udp_socket(family=socket.AF_INET, local_host=host, local_port=port)
        bound = int(udp.extra(SocketAttribute.local_port))
        try:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=bound, reuse_port=False)
        except OSError:
            await udp.aclose()
            if port:
                raise
            continue
        return udp, listener
    raise OSError(f"no port free for both UDP and TCP on {host}")
