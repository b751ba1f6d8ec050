"""``run_netcheck``: one netcheck (:class:`embedmesh.netcheck.NetcheckCore`) on sockets of its own.

What ``embedmesh netcheck`` (and Tailscale's ``tailscale netcheck``, netcheck's ``Standalone``
mode) runs: an IPv4 and, where the host has it, an IPv6 UDP socket on free ports; the core's STUN
requests go out on them and every STUN datagram that comes back goes into the core. When no STUN
answer comes at all (UDP is blocked), each region's latency is measured over HTTPS instead, as Go
does: a TLS connection to the region's first DERP server, then the time one ``GET
/derp/latency-check`` takes on it (connection and TLS set-up are not counted), each within
:data:`HTTPS_TIMEOUT`.

A node does not use this: it drives the core from its WireGuard socket (see :mod:`embedmesh.netcheck`).
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSStream

from embedmesh.netcheck import (
    ENOUGH_REGIONS,
    Datagram,
    Endpoint,
    NetcheckCore,
    NetcheckReport,
    hostnames_to_resolve,
    stun_target,
)
from embedmesh.tailscale import stun
from embedmesh.tailscale.derpclient import derp_tls_context, has_pinned_certificate
from embedmesh.tailscale.derpmap import DerpMap, DerpNode, DerpRegion

logger = logging.getLogger(__name__)

#: Seconds one region's HTTPS latency check may take (connection, TLS and the request).
HTTPS_TIMEOUT = 2.0
#: Seconds the DNS lookup of DERP host names may take.
RESOLVE_TIMEOUT = 2.0
_MAX_RESPONSE = 8 << 10


async def resolve_derp_hosts(names: list[str]) -> dict[str, list[str]]:
    """Addresses of DERP/STUN host names (:func:`~embedmesh.netcheck.hostnames_to_resolve`), looked
    up at once with a short timeout each; names that fail are left out."""
    resolved: dict[str, list[str]] = {}

    async def one(name: str) -> None:
        try:
            with anyio.fail_after(RESOLVE_TIMEOUT):
                infos = await anyio.getaddrinfo(name, None, type=socket.SOCK_DGRAM)
        except (OSError, TimeoutError) as exc:
            logger.info("netcheck: cannot resolve the DERP host %s: %s", name, exc)
            return
        resolved[name] = list(dict.fromkeys(str(info[4][0]) for info in infos))

    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(one, name)
    return resolved


def _reachable(targets: list[tuple[str, int]]) -> bool:
    """Whether the host has a route to any of these UDP targets (nothing is sent: connecting a
    UDP socket only looks the route up)."""
    for host, port in targets:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((host, port))
        except OSError:
            continue
        return True
    return False


def _binds_ipv6_loopback() -> bool:
    # Go's OSHasIPv6: the kernel has IPv6 when a UDP socket binds to ::1.
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def _open(version: int, host: str, port: int) -> anyio.abc.UDPSocket | None:
    try:
        if version == 6:
            return await anyio.create_udp_socket(family=socket.AF_INET6, local_host=host, local_port=port)
        return await anyio.create_udp_socket(family=socket.AF_INET, local_host=host, local_port=port)
    except OSError as exc:
        logger.info("netcheck: no IPv%d UDP socket on port %d: %s", version, port, exc)
        return None


async def measure_https_latency(
    node: DerpNode, *, timeout: float = HTTPS_TIMEOUT, ssl_context: ssl.SSLContext | None = None
) -> tuple[float, str]:
    """The time one ``GET /derp/latency-check`` takes on an established connection to a DERP
    server, and the IP address the connection reached. Plain HTTP when the node's DERP URL says
    so (``TS_DEBUG_USE_DERP_HTTP``). Raises OSError or TimeoutError when it cannot be measured
    within ``timeout`` seconds (or the server does not answer with a 2xx status)."""
    parts = urlsplit(node.derp_url())
    host = parts.hostname or node.host_name
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with anyio.fail_after(timeout):
        tcp = await anyio.connect_tcp(node.dial_host() or host, port)
        stream: anyio.abc.ByteStream = tcp
        try:
            address = str(tcp.extra(anyio.abc.SocketAttribute.remote_address)[0])
            if parts.scheme == "https":
                context = derp_tls_context(
                    ssl_context, insecure=node.insecure_for_tests, pinned_cert_sha256=node.pinned_cert_sha256
                )
                tls = await TLSStream.wrap(tcp, hostname=host, ssl_context=context, standard_compatible=False)
                stream = tls
                if not has_pinned_certificate(tls, node.pinned_cert_sha256):
                    raise OSError(f"{host} presented a certificate the DERP map does not pin")
            client = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_RESPONSE)
            request = client.send(
                h11.Request(
                    method="GET",
                    target="/derp/latency-check",
                    headers=[
                        ("Host", parts.netloc),
                        ("User-Agent", "embedmesh-netcheck"),
                        ("Connection", "close"),
                    ],
                )
            )
            assert request is not None
            started = time.monotonic()
            await stream.send(request)
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    try:
                        client.receive_data(await stream.receive())
                    except anyio.EndOfStream:
                        client.receive_data(b"")
                    continue
                if isinstance(event, h11.Response):
                    elapsed = time.monotonic() - started
                    if not 200 <= event.status_code <= 299:
                        raise OSError(f"{host} answered the latency check with HTTP {event.status_code}")
                    return elapsed, address
                raise OSError(f"{host} closed the connection before answering")
        except (h11.ProtocolError, ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            raise OSError(f"{host}: {exc or type(exc).__name__}") from None
        finally:
            await stream.aclose()


async def _measure_region(
    core: NetcheckCore, region: DerpRegion, clock: Callable[[], float], timeout: float
) -> None:
    for node in region.nodes:
        if node.stun_only:
            continue
        try:
            latency, address = await measure_https_latency(node, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            logger.info(
                "netcheck: HTTPS latency of region %d (%s): %s",
                region.region_id,
                node.name,
                exc or "timed out",
            )
            continue
        core.add_https_latency(region.region_id, latency, address)
        return


async def run_netcheck(
    derp_map: DerpMap,
    *,
    previous_report: NetcheckReport | None = None,
    bind_host: str | None = None,
    port: int = 0,
    enough_regions: int = ENOUGH_REGIONS,
    https_fallback: bool = True,
    https_timeout: float = HTTPS_TIMEOUT,
    clock: Callable[[], float] = time.monotonic,
) -> NetcheckReport:
    """Run one netcheck against ``derp_map``'s regions and return its report.

    ``bind_host``/``port`` choose the local address of the UDP sockets (default: any address, a
    free port, IPv4 and, when the host has it, IPv6). ``enough_regions`` ends the check once that
    many regions answered (pass a large number to measure every region). ``previous_report``
    keeps the preferred region from flapping between two runs.
    """
    names = hostnames_to_resolve(derp_map)
    resolved = await resolve_derp_hosts(names) if names else {}
    sockets: dict[int, anyio.abc.UDPSocket] = {}
    hosts = [(4, "0.0.0.0"), (6, "::")]
    if bind_host is not None:
        hosts = [(6 if ":" in bind_host else 4, bind_host)]
    for version, host in hosts:
        targets = [
            target
            for region in derp_map.regions.values()
            for node in region.nodes
            if (target := stun_target(node, version, resolved)) is not None
        ]
        # Go probes a family only when an interface has it: a request that cannot leave would keep
        # its region waiting for the whole STUN timeout.
        if not _reachable(targets):
            continue
        sock = await _open(version, host, port)
        if sock is not None:
            sockets[version] = sock
    # Without any socket (no STUN server, or no route to one) the check goes straight to HTTPS.
    core = NetcheckCore(
        derp_map,
        ipv4=4 in sockets,
        ipv6=6 in sockets,
        https_fallback=https_fallback,
        enough_regions=enough_regions,
        os_has_ipv6=_binds_ipv6_loopback(),
    )

    async def send(datagrams: list[Datagram]) -> None:
        for data, (host, dst_port) in datagrams:
            sock = sockets.get(6 if ":" in host else 4)
            if sock is None:
                continue
            try:
                await sock.sendto(data, host, dst_port)
            except OSError as exc:  # no route for that family: the probe is lost, as UDP may be
                core.counters["send_error"] += 1
                logger.debug("netcheck: sending to %s: %s", host, exc)

    driver = NetcheckDriver(core, send, clock=clock, https_timeout=https_timeout)

    async def reader(sock: anyio.abc.UDPSocket) -> None:
        while True:
            try:
                data, (host, source_port) = await sock.receive()
            except OSError:
                continue  # an ICMP error for an earlier request: nothing to read from it
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            if stun.is_stun(data):
                driver.on_stun(data, (str(host), int(source_port)), clock())

    try:
        async with anyio.create_task_group() as tg:
            for sock in sockets.values():
                tg.start_soon(reader, sock)
            report = await driver.check(previous_report, resolved=resolved)
            tg.cancel_scope.cancel()
    finally:
        for sock in sockets.values():
            await sock.aclose()
    return report


class NetcheckDriver:
    """Runs checks of a :class:`NetcheckCore` whose STUN traffic goes through someone else's
    socket: ``send`` sends the core's requests (``[(bytes, ("ip", port))]``), and the socket's
    owner hands STUN answers to :meth:`on_stun`. The node drives its checks this way from its
    WireGuard socket, so the endpoints STUN sees are the ones peers must use."""

    def __init__(
        self,
        core: NetcheckCore,
        send: Callable[[list[Datagram]], Awaitable[None]],
        *,
        clock: Callable[[], float] = time.monotonic,
        https_timeout: float = HTTPS_TIMEOUT,
    ) -> None:
        self.core = core
        self._send = send
        self._clock = clock
        self._https_timeout = https_timeout
        self._wake = anyio.Event()

    def on_stun(self, data: bytes | bytearray | memoryview, source: Endpoint, now: float) -> bool:
        """A STUN message from the socket; True when it answered one of the core's requests."""
        if self.core.receive(data, source, now):
            self._wake.set()
            return True
        return False

    async def check(
        self,
        previous_report: NetcheckReport | None = None,
        *,
        resolved: Mapping[str, Sequence[str]] | None = None,
        derp_activity: Mapping[int, float] | None = None,
    ) -> NetcheckReport:
        """One check, start to report (STUN, then HTTPS latencies when UDP got no answer and the
        core has ``https_fallback``)."""
        core, clock = self.core, self._clock

        async def https_phase(regions: list[DerpRegion]) -> None:
            async with anyio.create_task_group() as tg:
                for region in regions:
                    tg.start_soon(_measure_region, core, region, clock, self._https_timeout)
            core.finish(clock())
            self._wake.set()

        async with anyio.create_task_group() as tg:
            core.start(clock(), previous_report, resolved=resolved, derp_activity=derp_activity)
            https_started = False
            while core.running:
                # A new event before the first await of the round: an answer read from here on
                # wakes the wait below, and one read before is already in the core.
                self._wake = anyio.Event()
                await self._send(core.datagrams_to_send())
                regions = core.https_regions
                if regions and not https_started:
                    https_started = True
                    tg.start_soon(https_phase, regions)
                deadline = core.next_deadline()
                if deadline is None:
                    break
                with anyio.move_on_after(max(deadline - clock(), 0.0)):
                    await self._wake.wait()
                core.handle_timeout(clock())
            tg.cancel_scope.cancel()
        assert core.report is not None
        return core.report


__all__ = ["HTTPS_TIMEOUT", "NetcheckDriver", "measure_https_latency", "resolve_derp_hosts", "run_netcheck"]
