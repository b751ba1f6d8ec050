"""``Node``: the front door. It assembles the WireGuard device, the overlay interface and the
runtime that drives them, and offers the operations an application needs.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, ip_address
from types import TracebackType
from typing import Self

import anyio
import anyio.abc

from embedmesh.asgi import ASGIApp, serve_asgi
from embedmesh.config import WireGuardConfig, parse_wireguard_config
from embedmesh.errors import ConfigError, NodeError
from embedmesh.netstack.interface import EchoReply
from embedmesh.netstack.stack import Netstack
from embedmesh.runtime.dataplane import DataPlane
from embedmesh.runtime.links import WireGuardLink
from embedmesh.runtime.underlay import UdpUnderlay
from embedmesh.sockets import SocketLayer, TcpListener, TcpStream, UdpSocket
from embedmesh.wireguard.device import WireGuardDevice

logger = logging.getLogger("embedmesh")

IPAddress = IPv4Address | IPv6Address
#: wg-quick's default MTU: 1500 minus the 80 bytes of WireGuard over IPv6.
DEFAULT_MTU = 1420


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One peer as :meth:`Node.status` reports it."""

    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: tuple[str, int] | None
    #: Seconds since the last completed handshake, or None if there was none.
    last_handshake_ago: float | None
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A snapshot of a running node."""

    public_key: str
    addresses: tuple[str, ...]
    listen_port: int
    peers: tuple[PeerStatus, ...]
    counters: dict[str, int] = field(default_factory=dict)


class Node:
    """A node of a WireGuard network, living entirely inside this process.

    Static mode joins an existing WireGuard network described by a wg-quick configuration::

        async with Node(wireguard_config=text) as node:
            await node.up()
            rtt = await node.ping("10.0.0.2")

    ``listen_host`` restricts the underlay UDP socket to one local address (default: all).
    """

    def __init__(
        self,
        *,
        wireguard_config: str | WireGuardConfig | None = None,
        listen_host: str | None = None,
    ) -> None:
        if wireguard_config is None:
            raise ConfigError("Node needs a configuration: pass wireguard_config=<wg-quick text>")
        config = (
            parse_wireguard_config(wireguard_config)
            if isinstance(wireguard_config, str)
            else wireguard_config
        )
        for line, key in config.ignored:
            logger.warning(
                "wg-quick key %s (line %d) has no meaning for an in-process node; ignored", key, line
            )
        self._config = config
        self._listen_host = listen_host
        self.mtu = config.interface.mtu or DEFAULT_MTU
        self._device = WireGuardDevice(
            config.interface.private_key,
            mtu=self.mtu,
            wall_clock_offset=time.time() - time.monotonic(),
        )
        self._underlay = UdpUnderlay()
        self._link = WireGuardLink(self._device, self._underlay)
        self._stack = Netstack(
            [a.ip.packed for a in config.interface.addresses], self._link.send, mtu=self.mtu
        )
        self._interface = self._stack.interface
        self._interface.on_echo_reply = self._on_echo_reply
        self._dataplane = DataPlane(self._stack, self._link)
        self._sockets = SocketLayer(self._stack, self._dataplane.kick)
        self._dataplane.after_activity.append(self._sockets.dispatch)
        self._task_group: anyio.abc.TaskGroup | None = None
        self._started = anyio.Event()
        self._closed = False
        self._ping_ident = int.from_bytes(os.urandom(2), "big")
        self._ping_sequence = 0
        self._ping_waiters: dict[tuple[bytes, int, int], list[object]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the underlay socket and start the runtime tasks (``async with`` calls this)."""
        if self._task_group is not None:
            return
        if self._closed:
            raise NodeError("this node was closed; create a new Node")
        await self._add_configured_peers()
        self._underlay.open(self._config.interface.listen_port or 0, self._listen_host)
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        try:
            await self._task_group.start(self._dataplane.run)
        except BaseException:
            await self.close()
            raise
        self._started.set()
        logger.info(
            "node %s listening on UDP port %d with %s",
            self.public_key[:10],
            self._underlay.port,
            ", ".join(str(ip) for ip in self.ips),
        )

    async def up(self) -> None:
        """Return once the node is listening (and, in static mode, ready to reach its peers)."""
        if self._closed:
            raise NodeError("this node was closed")
        await self._started.wait()

    async def close(self) -> None:
        """Stop the runtime and close the socket. Safe to call twice."""
        self._closed = True
        task_group, self._task_group = self._task_group, None
        if task_group is not None:
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)
        self._underlay.close()

    async def _add_configured_peers(self) -> None:
        for peer in self._config.peers:
            endpoint = None
            if peer.endpoint is not None:
                endpoint = await _resolve_endpoint(*peer.endpoint)
            self._device.add_peer(
                peer.public_key,
                preshared_key=peer.preshared_key,
                allowed_ips=peer.allowed_ips,
                endpoint=endpoint,
                persistent_keepalive=peer.persistent_keepalive,
            )

    # ------------------------------------------------------------------ identity and status

    @property
    def public_key(self) -> str:
        """This node's WireGuard public key, base64 as ``wg`` shows it."""
        return base64.b64encode(self._device.public_key).decode()

    @property
    def ips(self) -> list[IPAddress]:
        """This node's overlay addresses."""
        return [ip_address(a) for a in self._interface.addresses]

    @property
    def interfaces(self) -> list[IPv4Interface | IPv6Interface]:
        """This node's overlay addresses with their prefixes, as configured."""
        return list(self._config.interface.addresses)

    @property
    def listen_port(self) -> int:
        """The underlay UDP port (chosen by the OS when the configuration names none)."""
        return self._underlay.port

    def status(self) -> NodeStatus:
        """A snapshot of this node and its peers."""
        now = time.monotonic()
        peers = []
        for peer in self._device.peers.values():
            last = peer.stats.last_handshake
            peers.append(
                PeerStatus(
                    public_key=base64.b64encode(peer.public_key).decode(),
                    allowed_ips=tuple(str(n) for n in self._device.allowed_ips.networks_of(peer)),
                    endpoint=peer.endpoint,
                    last_handshake_ago=None if last is None else now - last,
                    rx_bytes=peer.stats.rx_bytes,
                    tx_bytes=peer.stats.tx_bytes,
                )
            )
        counters = dict(self._device.counters)
        counters.update({f"ip_{k}": v for k, v in self._interface.counters.items()})
        counters.update({f"tcp_{k}": v for k, v in self._stack.tcp.counters.items()})
        counters.update({f"udp_{k}": v for k, v in self._stack.udp.counters.items()})
        counters.update({f"underlay_{k}": v for k, v in self._underlay.counters.items()})
        return NodeStatus(
            self.public_key, tuple(str(ip) for ip in self.ips), self.listen_port, tuple(peers), counters
        )

    # ------------------------------------------------------------------ operations

    async def ping(self, address: str | IPAddress, *, timeout: float = 5.0, payload_size: int = 56) -> float:
        """Send an ICMP echo request over the mesh; return the round-trip time in seconds.

        Raises :class:`TimeoutError` when no reply arrives within ``timeout`` seconds (the first
        ping to a peer includes the WireGuard handshake).
        """
        self._require_running()
        destination = ip_address(address).packed
        self._ping_sequence = (self._ping_sequence + 1) & 0xFFFF
        key = (destination, self._ping_ident, self._ping_sequence)
        done = anyio.Event()
        waiter: list[object] = [done, None]
        self._ping_waiters[key] = waiter
        started = time.monotonic()
        try:
            self._interface.send_echo_request(
                destination, self._ping_ident, self._ping_sequence, os.urandom(payload_size)
            )
            self._dataplane.kick()
            try:
                with anyio.fail_after(timeout):
                    await done.wait()
            except TimeoutError:
                raise TimeoutError(f"no echo reply from {address} within {timeout:g} s") from None
        finally:
            self._ping_waiters.pop(key, None)
        received_at = waiter[1]
        assert isinstance(received_at, float)
        return max(received_at - started, 0.0)

    async def listen(self, network: str, address: str, *, backlog: int = 128) -> TcpListener:
        """Listen for TCP connections on the mesh: ``await node.listen("tcp", ":8080")``.

        ``address`` is ``":PORT"`` (every address of this node), ``"IP:PORT"`` or ``"[IPv6]:PORT"``;
        port 0 picks a free port (see the listener's ``port``). Returns an anyio ``Listener``.
        """
        self._require_running()
        if network not in ("tcp", "tcp4", "tcp6"):
            raise ValueError(f"listen() supports network 'tcp', not {network!r}; use listen_packet() for UDP")
        local, port = self._local_endpoint(address)
        return self._sockets.listen_tcp(local, port, backlog)

    async def dial(self, network: str, address: str, *, timeout: float | None = 30.0) -> TcpStream:
        """Open a TCP connection over the mesh: ``await node.dial("tcp", "100.64.0.2:9000")``.

        Returns an anyio ``ByteStream``. Raises ``ConnectionRefusedError`` when the port is closed
        and ``TimeoutError`` when the peer does not answer within ``timeout`` seconds.
        """
        self._require_running()
        if network not in ("tcp", "tcp4", "tcp6"):
            raise ValueError(f"dial() supports network 'tcp', not {network!r}")
        host, port = split_host_port(address)
        if not host:
            raise ValueError(f"dial() needs a host in {address!r}")
        try:
            remote = ip_address(host).packed
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address (name resolution comes with MagicDNS)") from None
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is outside 1..65535")
        return await self._sockets.dial_tcp(remote, port, timeout)

    async def listen_packet(self, network: str, address: str) -> UdpSocket:
        """Bind a UDP socket on the mesh: ``await node.listen_packet("udp", ":5353")``.

        Returns an anyio ``UDPSocket`` (``sendto(data, host, port)``, ``receive()``).
        """
        self._require_running()
        if network not in ("udp", "udp4", "udp6"):
            raise ValueError(f"listen_packet() supports network 'udp', not {network!r}")
        local, port = self._local_endpoint(address)
        return self._sockets.bind_udp(local, port)

    async def serve_asgi(self, app: ASGIApp, address: str = ":80", *, root_path: str = "") -> TcpListener:
        """Serve an ASGI application (Starlette, FastAPI, Django, ...) on the mesh over HTTP/1.1.

        Starts in the background (with the app's lifespan startup done before this returns) and
        serves until the node closes or the returned listener is closed.
        """
        self._require_running()
        assert self._task_group is not None
        listener = await self.listen("tcp", address)
        await self._task_group.start(partial(serve_asgi, app, listener, root_path=root_path))
        return listener

    def _local_endpoint(self, address: str) -> tuple[bytes | None, int]:
        host, port = split_host_port(address)
        if not 0 <= port < 65536:
            raise ValueError(f"port {port} is outside 0..65535")
        if not host:
            return None, port
        local = ip_address(host).packed
        if not self._interface.is_local(local):
            raise OSError(99, f"{host} is not an address of this node ({', '.join(map(str, self.ips))})")
        return local, port

    # ------------------------------------------------------------------ plumbing

    def _require_running(self) -> None:
        if self._task_group is None:
            raise NodeError("the node is not running: use 'async with node:' or 'await node.start()'")

    def _on_echo_reply(self, reply: EchoReply) -> None:
        waiter = self._ping_waiters.get((reply.source, reply.ident, reply.sequence))
        if waiter is not None:
            waiter[1] = reply.received_at
            event = waiter[0]
            assert isinstance(event, anyio.Event)
            event.set()


async def _resolve_endpoint(host: str, port: int) -> tuple[str, int]:
    try:
        return (str(ip_address(host)), port)
    except ValueError:
        pass
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ConfigError(f"cannot resolve peer endpoint {host!r}: {exc}") from exc
    # Prefer IPv4 like wg(8) does when a name has both.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    address = infos[0][4]
    return (str(address[0]), int(address[1]))


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``"host:port"``, ``"[v6]:port"`` or ``":port"`` (Go's net.SplitHostPort rules)."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or address[end + 1 : end + 2] != ":":
            raise ValueError(f"bad address {address!r}: expected [IPv6]:port")
        host, port_text = address[1:end], address[end + 2 :]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise ValueError(f"bad address {address!r}: expected host:port or :port")
        if ":" in host:
            raise ValueError(f"bad address {address!r}: put an IPv6 address in brackets, [addr]:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port in {address!r}") from None
    return host, port
