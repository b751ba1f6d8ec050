"""``Node``: the front door. It assembles the WireGuard device, the overlay interface and the
runtime that drives them, and offers the operations an application needs.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, ip_address
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import anyio.abc

from embedmesh.asgi import ASGIApp, serve_asgi
from embedmesh.config import WireGuardConfig, parse_wireguard_config
from embedmesh.control.errors import ApprovalRefusedError
from embedmesh.control.netmap import NetworkMap, NodeState, PeerInfo
from embedmesh.control.url import split_url
from embedmesh.devicepaths import DevicePaths
from embedmesh.dns.records import MagicZone
from embedmesh.dns.resolver import Recursion, Resolver
from embedmesh.dns.server import DNS_PORT, SERVICE_V4, SERVICE_V6, DnsService
from embedmesh.dns.upstream import RESOLV_CONF, HostDnsConfig, ResolvConf, parse_upstream
from embedmesh.errors import (
    ConfigError,
    ListenError,
    NameResolutionError,
    NodeError,
    ParseError,
    UpTimeoutError,
)
from embedmesh.hostport import join_host_port, split_host_port
from embedmesh.netcheck import NetcheckCore, NetcheckReport, hostnames_to_resolve
from embedmesh.netstack.interface import EchoReply
from embedmesh.netstack.stack import Netstack
from embedmesh.paths import NO_PATH, Path, PathCore, PathKind
from embedmesh.peers import rank_endpoints
from embedmesh.runtime.dataplane import DataPlane
from embedmesh.runtime.derplinks import DerpLinks, DerpServerAddress
from embedmesh.runtime.links import Link, WireGuardLink
from embedmesh.runtime.netcheck import NetcheckDriver, resolve_derp_hosts
from embedmesh.runtime.underlay import UdpUnderlay
from embedmesh.sockets import SocketLayer, TcpListener, TcpStream, UdpSocket
from embedmesh.state import NodeKeys, load_or_create_keys, resolve_auth_key
from embedmesh.statelock import StateDirLock
from embedmesh.tailscale.client import TailscaleControlClient
from embedmesh.tailscale.derpclient import derp_tls_context
from embedmesh.tailscale.derpmap import DerpMap, parse_derp_map
from embedmesh.tailscale.keys import DiscoPrivate, NodePrivate, NodePublic
from embedmesh.wireguard.crypto import public_key as derive_public_key
from embedmesh.wireguard.device import WireGuardDevice

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger("embedmesh")

IPAddress = IPv4Address | IPv6Address
#: wg-quick's default MTU: 1500 minus the 80 bytes of WireGuard over IPv6.
DEFAULT_MTU = 1420
#: The overlay MTU of a tailnet, as Tailscale uses: it fits any underlay path without
#: fragmentation, IPv6 included.
TAILNET_MTU = 1280
#: How long a node keeps trying to reach its coordination server when it starts (a server and a
#: job started together: the server may need a few seconds).
DEFAULT_CONTROL_TIMEOUT = 60.0
#: Seconds between netchecks (plus up to 30 % jitter): magicsock re-STUNs every 20-26 s, which
#: also keeps the NAT mapping of the WireGuard socket alive.
NETCHECK_INTERVAL = 20.0


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One peer as :meth:`Node.status` reports it."""

    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: tuple[str, int] | None
    #: The peer's name and FQDN in the tailnet ("" in static mode).
    name: str = ""
    fqdn: str = ""
    online: bool | None = None
    #: In a tailnet: the peer's overlay addresses, and when control last saw it (Unix time).
    addresses: tuple[str, ...] = ()
    last_seen: float | None = None
    tags: tuple[str, ...] = ()
    #: Seconds since the last completed handshake, or None if there was none.
    last_handshake_ago: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    #: The handshake for people: ``"no handshake yet"`` (the peer never answered: wrong key or
    #: endpoint, or it is down) or how long ago the last one completed, e.g. ``"12 s ago"``.
    handshake: str = "no handshake yet"
    #: How packets to the peer travel: ``"direct"`` (UDP to :attr:`path_address`), ``"derp"``
    #: (through a DERP relay; :attr:`path_address` is the region's code) or ``"none"`` (no way
    #: yet: packets wait). A static-mode peer with an endpoint is ``"direct"``.
    path: str = "none"
    path_address: tuple[str, int] | str | None = None
    #: The last disco round trip on that path, in seconds (None: not measured).
    latency: float | None = None

    def __str__(self) -> str:
        who = self.name or self.public_key
        return f"{who} ({', '.join(self.allowed_ips) or 'no AllowedIPs'}): {self.handshake}"

    @property
    def path_text(self) -> str:
        """The path as ``tailscale status`` words it: ``direct 203.0.113.7:41641``,
        ``relay "nyc"`` or ``-``."""
        return describe_path(self.path, self.path_address)


def describe_path(path: str, address: Sequence[object] | str | None) -> str:
    """:attr:`PeerStatus.path_text` from its parts (also as they come back from JSON, where the
    address is a list)."""
    if path == "direct" and isinstance(address, list | tuple) and len(address) == 2:
        return f"direct {join_host_port(str(address[0]), int(str(address[1])))}"
    if path == "derp":
        return f'relay "{address}"'
    return "-"


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A snapshot of a running node."""

    public_key: str
    addresses: tuple[str, ...]
    listen_port: int
    peers: tuple[PeerStatus, ...]
    counters: dict[str, int] = field(default_factory=dict)
    #: In a tailnet: this node's name, FQDN, state ("authorized", "pending_approval",
    #: "key_expired") and whether the control stream is up.
    name: str = ""
    fqdn: str = ""
    state: str = ""
    control_connected: bool | None = None
    #: The URL to open to log the node in, while a Tailscale-protocol server waits for a login.
    auth_url: str = ""
    #: In a tailnet: the home DERP region's code ("" before there is one), the endpoints the node
    #: advertises ("ip:port": what STUN saw, then local addresses), and whether the last
    #: netcheck got UDP answers (None: none ran yet).
    home_derp: str = ""
    endpoints: tuple[str, ...] = ()
    udp: bool | None = None


@dataclass(frozen=True, slots=True)
class WhoIs:
    """Which node an overlay address belongs to: what :meth:`Node.whois` answers."""

    name: str
    fqdn: str
    #: The node's overlay addresses, as ``IPv4Address``/``IPv6Address`` objects like ``Node.ips``.
    addresses: tuple[IPAddress, ...]
    tags: tuple[str, ...]
    user: str
    node_key: str
    node_id: int


class Node:
    """A node of a WireGuard mesh, living entirely inside this process: no root, no TUN device.

    In a tailnet (the tsnet way), a coordination server hands out addresses and peers::

        async with Node(hostname="web", control_url="http://127.0.0.1:8080", auth_key=key,
                        state_dir="web-state") as node:
            await node.up()
            listener = await node.listen("tcp", ":80")

    In static mode it joins an existing WireGuard network from a wg-quick configuration::

        async with Node(wireguard_config=text) as node:
            await node.up()
            rtt = await node.ping("10.0.0.2")

    Tailnet options: ``hostname`` (default: this machine's short host name, also in static
    mode, where it is only :attr:`hostname`), ``auth_key`` (default: the
    ``EMBEDMESH_AUTH_KEY`` environment variable; not needed to rejoin from ``state_dir``),
    ``state_dir`` (keys persist there, 0600; without it the keys live in memory and the node is
    ephemeral by default), ``ephemeral`` and ``tags``. ``listen_host`` restricts the underlay UDP
    socket to one local address and advertises only that one; ``listen_port`` picks its port.
    ``pcap`` names a file that records every overlay packet in clear (for tshark/Wireshark).

    MagicDNS (docs/magicdns.md): the node resolves tailnet names in-process (:meth:`resolve`,
    and names in :meth:`dial`, :meth:`listen` and :meth:`ping`) and serves DNS to its peers at
    100.100.100.100:53 and [fd7a:115c:a1e0::53]:53 unless ``magic_dns=False``. Other names go to
    the host's resolvers from ``resolv_conf`` (default /etc/resolv.conf), or to ``dns_upstreams``
    (``"ip"`` / ``"ip:port"``) when given. Peers asking at 100.100.100.100 get the tailnet's names
    and its split-DNS routes only (REFUSED for other names), unless ``dns_forward_for_peers=True``
    lets them use this node's upstream resolvers too.
    """

    def __init__(
        self,
        *,
        hostname: str | None = None,
        control_url: str | None = None,
        auth_key: str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        ephemeral: bool | None = None,
        tags: tuple[str, ...] | list[str] = (),
        wireguard_config: str | WireGuardConfig | None = None,
        listen_host: str | None = None,
        listen_port: int = 0,
        mtu: int | None = None,
        pcap: str | os.PathLike[str] | None = None,
        magic_dns: bool = True,
        dns_upstreams: Sequence[str] | None = None,
        resolv_conf: str | os.PathLike[str] = RESOLV_CONF,
        control_timeout: float = DEFAULT_CONTROL_TIMEOUT,
        dns_forward_for_peers: bool = False,
    ) -> None:
        if (wireguard_config is None) == (control_url is None):
            raise ConfigError(
                "Node needs exactly one of control_url=... (join a tailnet) or "
                "wireguard_config=... (join a plain WireGuard network)"
            )
        if control_url is not None:
            split_url(control_url)  # a ConfigError that says what to write, before anything starts
        self._listen_host = listen_host
        self._listen_port = listen_port
        self._config: WireGuardConfig | None = None
        self._control: TailscaleControlClient | None = None
        self._netmap: NetworkMap | None = None
        #: The path layer (tailnet mode): which way each peer's packets go.
        self._paths: DevicePaths | None = None
        self._own_hosts: set[str] = set()
        #: DERP (tailnet mode): the node's relay connections and the map they follow.
        self._derp: DerpLinks | None = None
        self._derp_map: DerpMap | None = None
        self._derp_map_document: object | None = None
        self._derp_counters: Counter[str] = Counter()
        #: Netcheck (tailnet mode): STUN from the WireGuard socket, every 20-26 s.
        self._netcheck: NetcheckDriver | None = None
        self._netcheck_report: NetcheckReport | None = None
        self._netcheck_wake: anyio.Event | None = None
        self._state_dir = state_dir
        #: One running node per state folder (taken in start(), released in close()).
        self._lock = StateDirLock(state_dir) if state_dir is not None else None
        self._control_timeout = control_timeout
        #: The name this node asks for in a tailnet (default: this machine's short host name); in
        #: static mode, which has no names, the same default, for logs and an application's use.
        self.hostname = hostname or socket.gethostname().split(".")[0]
        addresses: list[bytes] = []
        if wireguard_config is not None:
            config = (
                parse_wireguard_config(wireguard_config)
                if isinstance(wireguard_config, str)
                else wireguard_config
            )
            for line, key in config.ignored:
                logger.warning(
                    "wg-quick key %s (line %d) has no meaning for an in-process node; ignored", key, line
                )
            if not config.interface.addresses:
                # Without one the node has no overlay address to send from (wg(8) files lack it:
                # wg-quick adds it).
                raise ConfigError(
                    "the [Interface] section has no Address; add this node's overlay address, "
                    "e.g. 'Address = 10.0.0.2/32', the one its peers list in their AllowedIPs",
                    config.interface.line,
                )
            self._config = config
            self._listen_port = listen_port or config.interface.listen_port or 0
            self.mtu = mtu or config.interface.mtu or DEFAULT_MTU
            private_key = config.interface.private_key
            addresses = [a.ip.packed for a in config.interface.addresses]
            self.ephemeral = False
        else:
            if state_dir is not None:
                keys, _ = load_or_create_keys(state_dir)
            else:
                keys = NodeKeys.generate()
            self._keys = keys
            private_key = keys.node_key
            self.mtu = mtu or TAILNET_MTU
            self.ephemeral = ephemeral if ephemeral is not None else state_dir is None
            self._control_url = control_url
            given = auth_key if auth_key is not None else os.environ.get("EMBEDMESH_AUTH_KEY")
            self._auth_key = resolve_auth_key(given) if given else None
            self._tags = tuple(tags)
        # The operating system's CSPRNG for everything a peer could learn from and predict: TCP's
        # ISN, timestamp and SYN-cookie keys, ephemeral ports, handshake timer jitter.
        rng = random.SystemRandom()
        self._device = WireGuardDevice(
            private_key,
            mtu=self.mtu,
            rng=rng,
            wall_clock_offset=time.time() - time.monotonic(),
        )
        self._underlay = UdpUnderlay()
        if wireguard_config is None:
            core = PathCore(DiscoPrivate(self._keys.disco_key))
            core.node_key = NodePublic(derive_public_key(private_key))
            self._paths = DevicePaths(self._device, core)
        self._wireguard_link = WireGuardLink(self._device, self._underlay, paths=self._paths)
        self._link: Link = self._wireguard_link
        if pcap is not None:
            from embedmesh.pcap import PcapLink, PcapWriter

            self._link = PcapLink(self._link, PcapWriter(pcap))
        self._stack = Netstack(addresses, self._link.send, mtu=self.mtu, rng=rng)
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
        #: Each serve_asgi task's cancel scope and the event it sets once its app has shut down.
        self._asgi_servers: list[tuple[anyio.CancelScope, anyio.Event]] = []
        self._magic_dns = magic_dns
        self._dns_forward_for_peers = dns_forward_for_peers
        self._zone_serial = 0
        resolv: ResolvConf | None = None
        host_dns: HostDnsConfig | None = None
        if dns_upstreams is not None:
            try:
                host_dns = HostDnsConfig(tuple(parse_upstream(u) for u in dns_upstreams))
            except ValueError as exc:
                raise ConfigError(f"dns_upstreams: {exc}") from None
        else:
            resolv = ResolvConf(resolv_conf)
        self._dns = DnsService(
            Resolver(rng=random.SystemRandom(), host_config=host_dns),
            resolv_conf=resolv,
            overlay=_Overlay(self),
        )

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
        """Open the underlay socket, join (in a tailnet: register with the coordination server and
        receive the first network map) and start the runtime tasks. ``async with`` calls this.

        Raises the control client's errors for a bad, used, expired or revoked auth key, an
        unreachable server or a changed server key.
        """
        if self._task_group is not None:
            return
        if self._closed:
            raise NodeError("this node was closed; create a new Node")
        if self._lock is not None:
            self._lock.acquire()
        try:
            if self._config is not None:
                await self._add_configured_peers()
            self._underlay.open(self._listen_port, self._listen_host)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        try:
            await self._task_group.start(self._dataplane.run)
            await self._task_group.start(self._dns.run)
            if self._magic_dns:
                self._serve_magic_dns()
            if self._control_url_set():
                await self._join_tailnet()
            else:
                self._greet_configured_peers()
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

    def _control_url_set(self) -> bool:
        return self._config is None

    async def up(self, timeout: float | None = None) -> None:
        """Return once the node is ready: listening, and in a tailnet authorized with its
        addresses and first network map. While an admin has yet to approve the node, this waits
        (and says so in the log).

        Raises :class:`~embedmesh.errors.UpTimeoutError` (a ``TimeoutError``) when ``timeout``
        seconds pass first, saying what the node was waiting for, and
        :class:`~embedmesh.control.errors.ApprovalRefusedError` when an admin refuses the node.
        """
        if self._closed:
            raise NodeError("this node was closed")
        if self._task_group is None:
            raise NodeError(
                "the node is not running: use 'async with node:' or 'await node.start()' before up()"
            )
        with anyio.move_on_after(timeout) as scope:
            await self._started.wait()
            if self._control is not None:
                try:
                    await self._control.wait_for_approval()
                except ApprovalRefusedError as exc:
                    raise ApprovalRefusedError(
                        f"the admin of {self._control_url} refused this node (deleted it while it "
                        "waited for approval): create the Node with an auth_key= (or "
                        "$EMBEDMESH_AUTH_KEY) that the admin issued; a key created with "
                        "--preapproved skips approval"
                    ) from exc
        if scope.cancelled_caught:
            # The same words as `embedmesh status --wait` and the local API (waiting_for()).
            raise UpTimeoutError(
                f"up() timed out after {timeout:g} s: {self.waiting_for() or 'the node is still starting'}",
                self._waiting_for_kind(),
            )

    def _waiting_for_kind(self) -> str:
        """:attr:`UpTimeoutError.waiting_for`: what :meth:`waiting_for` says, as a keyword."""
        netmap = self._netmap
        if netmap is None and self._control is not None and self._control.auth_url:
            return "login"
        if not self._started.is_set() or netmap is None:
            return "start"
        if self._control is not None and not self._control.connected:
            return "control"
        if netmap.state is NodeState.KEY_EXPIRED:
            return "reauthentication"
        return "approval"

    def waiting_for(self) -> str:
        """What the node still waits for before it is up, in words; ``""`` once it is up (in a
        tailnet: connected to the coordination server and authorized)."""
        if self._closed:
            return "the node was closed"
        if not self._started.is_set():
            if self._config is not None:
                return "the node is still starting"
            return f"waiting for the control server at {self._control_url}"
        control, netmap = self._control, self._netmap
        if control is None:
            return ""
        auth_url = control.auth_url
        if auth_url and (netmap is None or netmap.state is not NodeState.AUTHORIZED):
            return f"waiting for a login: open {auth_url}"
        if not control.connected:
            return f"reconnecting to the control server at {self._control_url}"
        if netmap is not None and netmap.state is NodeState.PENDING_APPROVAL:
            return (
                "waiting for approval by an admin "
                f"(embedmesh control nodes approve {netmap.self_node.id})"
            )
        if netmap is not None and netmap.state is NodeState.KEY_EXPIRED:
            return "the node key expired: it needs a new auth key"
        return ""

    async def close(self, *, logout: bool | None = None) -> None:
        """Leave and stop. Safe to call twice.

        ``logout=True`` logs out of the tailnet first (an ephemeral node is deleted at once, any
        other has its node key expired); the default logs out ephemeral nodes only
        (``ephemeral=True`` or an ephemeral auth key), so they leave ``nodes list`` at once
        instead of after the server's ephemeral timeout. The state folder's lock goes last.
        """
        if self._closed and self._task_group is None:
            if self._lock is not None:
                self._lock.release()
            return
        self._closed = True
        # Apps first, while the mesh still works: a lifespan shutdown may talk to peers.
        servers, self._asgi_servers = self._asgi_servers, []
        for scope, _ in servers:
            scope.cancel()
        for _, stopped in servers:
            await stopped.wait()
        control, self._control = self._control, None
        if logout is None:
            # The server's word counts: an ephemeral auth key makes the node ephemeral too.
            logout = self.ephemeral or (self._netmap is not None and self._netmap.self_node.ephemeral)
        if control is not None:
            if logout and control.connected:
                try:
                    # logout() bounds its own wait; a cancel scope around it would wrap the
                    # client's task group, which must be exited where it was entered.
                    await control.logout(timeout=5)
                except Exception as exc:
                    logger.info("logout failed (%s); the server removes ephemeral nodes on its own", exc)
            await control.close()
        task_group, self._task_group = self._task_group, None
        if task_group is not None:
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)
        self._link.close()
        if self._lock is not None:
            self._lock.release()

    async def _join_tailnet(self) -> None:
        assert self._control_url is not None and self._task_group is not None
        own_hosts = self._own_hosts = self._advertised_hosts()
        endpoints = [join_host_port(host, self._underlay.port) for host in own_hosts]
        assert self._paths is not None
        self._paths.paths.own_endpoints = tuple((host, self._underlay.port) for host in own_hosts)
        # Tailscale's control protocol, to embedmesh's server, headscale or Tailscale's alike.
        control = TailscaleControlClient(
            self._control_url,
            machine_key=self._keys.machine_key,
            node_key=self._keys.node_key,
            # The disco key pair is for path discovery; only its public half is ever sent.
            disco_key=derive_public_key(self._keys.disco_key),
            hostname=self.hostname,
            tags=self._tags,
            ephemeral=self.ephemeral,
            auth_key=self._auth_key,
            state_dir=self._state_dir,
            endpoints=endpoints,
            on_netmap=self._apply_netmap,
            start_timeout=self._control_timeout,
        )
        # DERP: the relays of the tailnet's DERP map, for peers without a direct path.
        derp_links = DerpLinks(NodePrivate(self._keys.node_key), self._on_derp_packet)
        self._derp = derp_links
        self._wireguard_link.derp_send = self._send_via_derp
        await self._task_group.start(derp_links.run)
        self._wireguard_link.on_stun = self._on_stun
        self._task_group.start_soon(self._netcheck_loop)
        await control.start()
        self._control = control
        if control.netmap is not None:
            self._apply_netmap(control.netmap)

    # ------------------------------------------------------------------ DERP

    def _apply_derp_map(self, document: object | None) -> None:
        """Follow the DERP map: its regions' servers, and a home region among them."""
        if document is None or document is self._derp_map_document:
            return
        self._derp_map_document = document
        try:
            derp_map = parse_derp_map(document)
        except ParseError as exc:
            logger.warning("ignoring the control server's DERP map: %s", exc)
            return
        self._derp_map = derp_map
        regions: dict[int, list[DerpServerAddress]] = {}
        for region_id, region in derp_map.regions.items():
            servers = [
                DerpServerAddress(
                    node.derp_url(),
                    derp_tls_context(insecure=True) if node.insecure_for_tests else None,
                    dial_host=node.dial_host(),
                    pinned_cert_sha256=node.pinned_cert_sha256,
                )
                for node in region.nodes
                if not node.stun_only
            ]
            if servers:
                regions[region_id] = servers
        derp = self._derp
        assert derp is not None and self._paths is not None
        derp.set_regions(regions)
        self._paths.set_derp_enabled(bool(regions), time.monotonic())
        if self._netcheck_wake is not None:
            self._netcheck_wake.set()  # a new map: measure its regions now
        if derp.home not in regions and regions:
            # Until netcheck measures the regions, the first one the map lists that may be a home.
            candidates = [r for r, reg in derp_map.regions.items() if r in regions and not reg.no_measure_no_home]
            self._set_home_derp(min(candidates or regions))
        self._dataplane.kick()

    async def _netcheck_loop(self) -> None:
        """Netcheck from the WireGuard socket, as magicsock re-STUNs: at start, when the DERP map
        changes, and every 20-26 s; the report gives the node's public endpoints and home region."""
        core: NetcheckCore | None = None
        while True:
            wake = self._netcheck_wake = anyio.Event()
            derp_map = self._derp_map
            if derp_map is not None and self._derp is not None:
                if core is None or core.derp_map is not derp_map:
                    core = NetcheckCore(
                        derp_map, ipv4=self._underlay.has_ipv4, ipv6=self._underlay.has_ipv6
                    )
                    core.report = self._netcheck_report  # the hysteresis builds on the last one

                async def send(datagrams: list[tuple[bytes, tuple[str, int]]]) -> None:
                    self._underlay.send(datagrams)

                driver = self._netcheck = NetcheckDriver(core, send)
                names = hostnames_to_resolve(derp_map)
                resolved = await resolve_derp_hosts(names) if names else {}
                try:
                    report = await driver.check(
                        self._netcheck_report, resolved=resolved, derp_activity=self._derp.activity()
                    )
                finally:
                    self._netcheck = None
                self._apply_netcheck(report)
            with anyio.move_on_after(NETCHECK_INTERVAL * (1 + 0.3 * random.random())):
                await wake.wait()

    def _on_stun(self, data: bytes, source: tuple[str, int], now: float) -> None:
        driver = self._netcheck
        if driver is None or not driver.on_stun(data, source, now):
            self._derp_counters["stun_unexpected"] += 1

    def _apply_netcheck(self, report: NetcheckReport) -> None:
        """Advertise what STUN saw (the public endpoints first, then the local ones, as Tailscale
        orders them) and move home to the preferred region."""
        self._netcheck_report = report
        port = self._underlay.port
        endpoints = list(dict.fromkeys([*report.endpoints(), *((h, port) for h in sorted(self._own_hosts))]))
        changed = self._paths is not None and tuple(endpoints) != self._paths.paths.own_endpoints
        if self._paths is not None:
            self._paths.paths.own_endpoints = tuple(endpoints)
        derp = self._derp
        preferred = report.preferred_derp
        if derp is not None and preferred and preferred != derp.home and preferred in derp.regions():
            self._set_home_derp(preferred)  # reports the endpoints too
            return
        if changed:
            self._report_endpoints()

    def _set_home_derp(self, region_id: int) -> None:
        derp = self._derp
        if derp is None or region_id == derp.home:
            return
        derp.set_home(region_id)
        logger.info("home DERP region: %s", self._derp_region_code(region_id))
        self._report_endpoints()

    def _report_endpoints(self) -> None:
        """Tell the control server this node's endpoints and home region (peers reach it there)."""
        control, derp = self._control, self._derp
        if control is None or derp is None or self._task_group is None:
            return
        endpoints = [join_host_port(h, p) for h, p in self._paths.paths.own_endpoints] if self._paths else []
        self._task_group.start_soon(partial(control.update_endpoints, endpoints, preferred_derp=derp.home))

    def _send_via_derp(self, datagrams: list[tuple[bytes, tuple[str, int]]]) -> None:
        """The data plane's datagrams for DERP addresses: into the peers' home regions."""
        derp, paths = self._derp, self._paths
        assert derp is not None and paths is not None
        for data, address in datagrams:
            route = paths.paths.derp_route(address)
            if route is None or not route[1]:
                self._derp_counters["drop_no_region"] += 1
                continue
            derp.send(route[1], route[0], data)

    def _on_derp_packet(self, src: bytes, payload: bytes, region: int) -> None:
        """A packet a DERP server relayed from the node ``src``: disco, or WireGuard."""
        paths = self._paths
        assert paths is not None
        now = time.monotonic()
        stack = self._stack
        stack.begin_batch()
        try:
            packet = paths.receive_relayed(payload, src, now)
            if packet is not None:
                stack.receive(packet, now)
        finally:
            stack.end_batch(now)
        self._dataplane.kick()

    def _advertised_hosts(self) -> set[str]:
        if self._listen_host is not None:
            return {self._listen_host}
        return set(_local_addresses())

    def _apply_netmap(self, netmap: NetworkMap) -> None:
        """Follow the coordination server: addresses, peers and their endpoints."""
        self._netmap = netmap
        me = netmap.self_node
        # (The control client warns once when the node key expires, saying what to do.)
        self._interface.set_addresses([a.packed for a in me.addresses])
        if self._control is not None:
            self._apply_derp_map(self._control.derp_map)
        self._sync_peers(netmap, time.monotonic())
        self._zone_serial += 1
        self._dns.set_zone(MagicZone.from_netmap(netmap, serial=self._zone_serial))
        self._dataplane.kick()

    def _sync_peers(self, netmap: NetworkMap, now: float) -> None:
        """Make the device's peers and the path layer's those of ``netmap``: its authorized peers
        with live keys (none while this node itself is not authorized)."""
        paths = self._paths
        assert paths is not None
        wanted: dict[bytes, PeerInfo] = {}
        if netmap.state is NodeState.AUTHORIZED:
            wanted = {p.node_key: p for p in netmap.peers.values() if p.authorized and not p.key_expired}
        for node_key in [k for k in self._device.peers if k not in wanted]:
            paths.remove_peer(node_key)
        for node_key, info in wanted.items():
            paths.set_peer(
                node_key,
                info.disco_key,
                rank_endpoints(info.endpoints, self._own_hosts),
                info.allowed_ips,
                now,
                home_derp=info.home_derp,
            )

    async def _add_configured_peers(self) -> None:
        assert self._config is not None
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

    def _greet_configured_peers(self) -> None:
        """Handshake at once with every peer that has an ``Endpoint``, as wg-quick's interface does.

        The first keepalive (and the persistent-keepalive cycle it starts) goes out after the
        handshake, so a peer that holds this node's old endpoint (it restarted on another port, or
        came back behind a NAT) learns the new one without this node sending traffic of its own. A
        ``PersistentKeepalive`` peer without an ``Endpoint`` has to make first contact: there is
        nowhere to send to yet.
        """
        assert self._config is not None
        now = time.monotonic()
        for configured in self._config.peers:
            peer = self._device.peers.get(configured.public_key)
            if peer is not None and peer.endpoint is not None:
                self._device.send_keepalive(peer, now)
        self._dataplane.kick()

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
        """This node's overlay addresses with their prefixes (as configured, or /32 and /128 in a
        tailnet)."""
        if self._config is not None:
            return list(self._config.interface.addresses)
        return [IPv4Interface(ip) if ip.version == 4 else IPv6Interface(ip) for ip in self.ips]

    @property
    def netmap(self) -> NetworkMap | None:
        """The latest network map from the coordination server (None in static mode)."""
        return self._netmap

    @property
    def name(self) -> str:
        """This node's name in the tailnet (unique; may differ from the hostname it asked for)."""
        return self._netmap.self_node.name if self._netmap else ""

    @property
    def fqdn(self) -> str:
        """This node's fully qualified MagicDNS name, e.g. ``web.mesh.internal``."""
        return self._netmap.self_node.fqdn if self._netmap else ""

    def whois(self, address: str | IPAddress) -> WhoIs | None:
        """Which tailnet node owns the overlay ``address`` (e.g. a connection's remote address),
        with its tags and user, so an application can authorize callers by mesh identity (a
        node carries only the tags its auth key grants, so only an admin hands them out).

        ``address`` is an IP (object or text) or, as tsnet's WhoIs takes it, ``"ip:port"`` or
        ``"[ipv6]:port"``. None for an address no node has; ``ValueError`` for text that is none
        of these."""
        wanted = _whois_address(address)
        netmap = self._netmap
        if netmap is None:
            return None
        for info in (netmap.self_node, *netmap.peers.values()):
            if wanted in info.addresses:
                return _whois(info)
        return None

    @property
    def listen_port(self) -> int:
        """The underlay UDP port (chosen by the OS when the configuration names none)."""
        return self._underlay.port

    def status(self) -> NodeStatus:
        """A snapshot of this node and its peers."""
        now = time.monotonic()
        infos: dict[bytes, PeerInfo] = {}
        if self._netmap is not None:
            infos = {p.node_key: p for p in self._netmap.peers.values()}
        peers = []
        for peer in self._device.peers.values():
            last = peer.stats.last_handshake
            info = infos.get(peer.public_key)
            path = self._path_of(peer.public_key, peer.endpoint, now)
            address: tuple[str, int] | str | None = path.address
            if path.kind is PathKind.DERP:
                address = self._derp_region_code(path.region)
            peers.append(
                PeerStatus(
                    public_key=base64.b64encode(peer.public_key).decode(),
                    allowed_ips=tuple(str(n) for n in self._device.allowed_ips.networks_of(peer)),
                    endpoint=peer.endpoint,
                    name=info.name if info else "",
                    fqdn=info.fqdn if info else "",
                    online=info.online if info else None,
                    addresses=tuple(str(a) for a in info.addresses) if info else (),
                    last_seen=info.last_seen if info else None,
                    tags=tuple(info.tags) if info else (),
                    last_handshake_ago=None if last is None else now - last,
                    rx_bytes=peer.stats.rx_bytes,
                    tx_bytes=peer.stats.tx_bytes,
                    handshake="no handshake yet" if last is None else f"{now - last:.0f} s ago",
                    path=path.kind.value,
                    path_address=address,
                    latency=path.latency,
                )
            )
        counters = dict(self._device.counters)
        counters.update({f"ip_{k}": v for k, v in self._interface.counters.items()})
        counters.update({f"tcp_{k}": v for k, v in self._stack.tcp.counters.items()})
        counters.update({f"udp_{k}": v for k, v in self._stack.udp.counters.items()})
        counters.update({f"underlay_{k}": v for k, v in self._underlay.counters.items()})
        if self._paths is not None:
            counters.update({f"path_{k}": v for k, v in self._paths.paths.counters.items()})
            counters.update({f"link_{k}": v for k, v in self._wireguard_link.counters.items()})
        if self._derp is not None:
            counters.update({f"derp_{k}": v for k, v in self._derp.counters.items()})
            counters.update({f"derp_{k}": v for k, v in self._derp_counters.items()})
        counters.update({f"dns_{k}": v for k, v in self._dns.resolver.counters.items()})
        control = self._control
        return NodeStatus(
            self.public_key,
            tuple(str(ip) for ip in self.ips),
            self.listen_port,
            tuple(peers),
            counters,
            name=self.name,
            fqdn=self.fqdn,
            state=self._netmap.state.value if self._netmap else "",
            control_connected=control.connected if control is not None else None,
            auth_url=control.auth_url if control is not None else "",
            home_derp=self._derp_region_code(self._derp.home) if self._derp is not None and self._derp.home else "",
            endpoints=tuple(join_host_port(h, p) for h, p in self._paths.paths.own_endpoints) if self._paths else (),
            udp=self._netcheck_report.udp if self._netcheck_report is not None else None,
        )

    def _path_of(self, node_key: bytes, endpoint: tuple[str, int] | None, now: float) -> Path:
        if self._paths is not None:
            return self._paths.paths.path(node_key, now)
        return NO_PATH if endpoint is None else Path(PathKind.DIRECT, endpoint)

    def _derp_region_code(self, region: int) -> str:
        """A DERP region's code for people (its number when the map has no code)."""
        known = self._derp_map.regions.get(region) if self._derp_map is not None else None
        return known.region_code if known is not None and known.region_code else str(region)

    # ------------------------------------------------------------------ names

    @property
    def dns(self) -> DnsService:
        """The MagicDNS service: its resolver core (``dns.resolver``, counters included) and zone
        (``dns.zone``); ``dns.set_zone(...)`` gives a static-mode node names of its own."""
        return self._dns

    async def resolve(self, host: str, *, family: int | None = None) -> list[IPAddress]:
        """The addresses of ``host`` through MagicDNS: a tailnet name (``db``, ``db.mesh.internal``),
        an extra record, or any other name via split DNS and the host's resolvers, with the search
        domains applied as resolv.conf would. IP literals come back as they are. IPv4 first.
        ``family`` limits the answer to one family: 4 or ``socket.AF_INET``, 6 or
        ``socket.AF_INET6`` (None, the default, or ``socket.AF_UNSPEC``: both).

        Raises :class:`~embedmesh.errors.NameResolutionError` (a ``LookupError``) whose message
        says whether the name does not exist, has no address of that family, or got no answer.
        """
        self._require_running()
        return await self._dns.resolve(host, family=family)

    async def serve_dns(self, address: str = "127.0.0.1:53") -> tuple[str, int]:
        """Serve MagicDNS on the host network too, over UDP and TCP, e.g. ``"127.0.0.1:5353"``
        (port 0 picks a free one), until the node closes. Names outside the tailnet are forwarded
        only for clients on loopback. Returns the bound ``(host, port)``.

        Raises :class:`~embedmesh.errors.AddressInUseError` when the port (UDP or TCP) is taken,
        :class:`~embedmesh.errors.ListenError` when it cannot be opened for another reason."""
        self._require_running()
        assert self._task_group is not None
        host, port = split_host_port(address)
        host = host or "127.0.0.1"
        try:
            bound: tuple[str, int] = await self._task_group.start(partial(self._dns.serve_local, host, port))
        except OSError as exc:  # raised before the server started: the node itself is unharmed
            raise ListenError.from_os_error(exc, host, port) from None
        return bound

    def http_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` whose connections go over the tailnet and whose names resolve
        through MagicDNS: ``await client.get("http://web/")``. Keyword arguments go to httpx
        (``timeout``, ``headers``, ``verify``, ...); environment proxies are ignored, since a
        proxy on the host network cannot reach the tailnet."""
        import httpx

        from embedmesh.httpclient import MeshTransport

        options = {k: kwargs.pop(k) for k in ("verify", "http1", "http2", "limits") if k in kwargs}
        kwargs.setdefault("trust_env", False)
        return httpx.AsyncClient(transport=MeshTransport(self, **options), **kwargs)

    def _serve_magic_dns(self) -> None:
        """DNS at 100.100.100.100:53 and [fd7a:115c:a1e0::53]:53 on the overlay, UDP and TCP.
        Whatever arrives there came through WireGuard from a peer: it gets the tailnet's names
        and split DNS, and the host's resolvers only if this node forwards for its peers."""
        assert self._task_group is not None
        recursion = Recursion.ALL if self._dns_forward_for_peers else Recursion.ROUTES

        def for_peers(host: str) -> Recursion:
            return recursion

        for service in (SERVICE_V4, SERVICE_V6):
            self._interface.add_service_address(service.packed)
            udp = self._sockets.bind_udp(service.packed, DNS_PORT)
            tcp = self._sockets.listen_tcp(service.packed, DNS_PORT, 64)
            self._task_group.start_soon(self._dns.serve_udp, udp, for_peers)
            self._task_group.start_soon(self._dns.serve_tcp, tcp, for_peers)

    async def _overlay_address(self, host: str, family: int | None = None) -> bytes:
        """An address of ``host`` that a peer of this node routes (for dial and ping)."""
        try:
            literal = ip_address(host.split("%")[0])
        except ValueError:
            pass
        else:
            # Nothing leaves the node but through a peer: an address no peer routes (loopback, the
            # LAN, the internet without an exit node) fails now, not after a dial's timeout.
            if self._device.allowed_ips.lookup(literal.packed) is None:
                raise OSError(errno.EHOSTUNREACH, f"no peer of this node routes {literal}")
            return literal.packed
        addresses = await self.resolve(host, family=family)
        for address in addresses:
            if self._device.allowed_ips.lookup(address.packed) is not None:
                return address.packed
        if not addresses:
            raise NameResolutionError(f"{host!r} has no IPv{family} address")
        raise OSError(
            errno.EHOSTUNREACH,
            f"{host} resolves to {', '.join(map(str, addresses))}, which no peer of this node routes "
            "(the mesh reaches overlay addresses only)",
        )

    # ------------------------------------------------------------------ operations

    async def ping(self, address: str | IPAddress, *, timeout: float = 5.0, payload_size: int = 56) -> float:
        """Send an ICMP echo request over the mesh; return the round-trip time in seconds.

        Raises :class:`TimeoutError` when no reply arrives within ``timeout`` seconds (the first
        ping to a peer includes the WireGuard handshake).
        """
        self._require_running()
        destination = await self._overlay_address(str(address))
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
                raise TimeoutError(self._ping_timeout_message(destination, address, timeout)) from None
        finally:
            self._ping_waiters.pop(key, None)
        received_at = waiter[1]
        assert isinstance(received_at, float)
        return max(received_at - started, 0.0)

    def _ping_timeout_message(self, destination: bytes, address: object, timeout: float) -> str:
        """Say which of the three reasons it is: no route, no handshake, or a peer that did not answer."""
        head = f"no echo reply from {address} within {timeout:g} s"
        peer = self._device.allowed_ips.lookup(destination)
        if peer is None:  # removed while we waited (a new network map)
            return f"{head}: no peer routes {address} any more"
        who = self._peer_label(peer.public_key)
        last = peer.stats.last_handshake
        if last is not None:
            ago = time.monotonic() - last
            return f"{head}: the WireGuard handshake with {who} completed {ago:.0f} s ago, but no reply came"
        if peer.endpoint is None:
            return (
                f"{head}: no WireGuard handshake with {who} yet, and its endpoint is unknown "
                "(it has to contact this node first, or give it an Endpoint)"
            )
        host, port = peer.endpoint
        return (
            f"{head}: no WireGuard handshake with {who} yet; check that it runs, is reachable at "
            f"{join_host_port(host, port)} and lists this node's public key {self.public_key}"
        )

    def _peer_label(self, public_key: bytes) -> str:
        """A peer as a user knows it: its tailnet name, or in static mode its public key."""
        if self._netmap is not None:
            for info in self._netmap.peers.values():
                if info.node_key == public_key and info.name:
                    return f"peer {info.name}"
        return f"peer {base64.b64encode(public_key).decode()}"

    async def listen(self, network: str, address: str, *, backlog: int = 128) -> TcpListener:
        """Listen for TCP connections on the mesh: ``await node.listen("tcp", ":8080")``.

        ``address`` is ``":PORT"`` (every address of this node), ``"IP:PORT"``, ``"[IPv6]:PORT"``
        or ``"NAME:PORT"`` with this node's own name; port 0 picks a free port (see the
        listener's ``port``). Returns an anyio ``Listener``.
        """
        self._require_running()
        if network not in ("tcp", "tcp4", "tcp6"):
            raise ValueError(f"listen() supports network 'tcp', not {network!r}; use listen_packet() for UDP")
        local, port = await self._local_endpoint(address, {"tcp4": 4, "tcp6": 6}.get(network))
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
        remote = await self._overlay_address(host, {"tcp4": 4, "tcp6": 6}.get(network))
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
        local, port = await self._local_endpoint(address, {"udp4": 4, "udp6": 6}.get(network))
        return self._sockets.bind_udp(local, port)

    async def serve_asgi(self, app: ASGIApp, address: str = ":80", *, root_path: str = "") -> TcpListener:
        """Serve an ASGI application (Starlette, FastAPI, Django, ...) on the mesh over HTTP/1.1.

        Starts in the background (with the app's lifespan startup done before this returns) and
        serves until the node closes or the returned listener is closed; either way the app's
        lifespan shutdown runs (``close()`` waits for it, at most 10 s per app).
        """
        self._require_running()
        assert self._task_group is not None
        listener = await self.listen("tcp", address)
        scope = anyio.CancelScope()
        stopped = anyio.Event()

        async def serve(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await serve_asgi(app, listener, root_path=root_path, task_status=task_status)
            finally:
                stopped.set()

        await self._task_group.start(serve)
        self._asgi_servers.append((scope, stopped))
        return listener

    async def _local_endpoint(self, address: str, family: int | None = None) -> tuple[bytes | None, int]:
        host, port = split_host_port(address)
        if not 0 <= port < 65536:
            raise ValueError(f"port {port} is outside 0..65535")
        if not host:
            return None, port
        try:
            local = ip_address(host.split("%")[0]).packed
        except ValueError:
            # A name: this node's own (``web``, ``web.mesh.internal``), resolved through MagicDNS.
            candidates = [a.packed for a in await self.resolve(host, family=family)]
            local = next((a for a in candidates if self._interface.is_local(a)), b"")
            if not local:
                raise OSError(
                    99, f"{host} is not a name of this node ({', '.join(map(str, self.ips))})"
                ) from None
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


class _Overlay:
    """The node's overlay as the DNS service sees it, for resolvers inside the tailnet."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def routes(self, host: str) -> bool:
        try:
            address = ip_address(host.split("%")[0])
        except ValueError:
            return False
        return self._node._device.allowed_ips.lookup(address.packed) is not None

    async def bind_udp(self) -> UdpSocket:
        return self._node._sockets.bind_udp(None, 0)

    async def dial_tcp(self, host: str, port: int) -> TcpStream:
        return await self._node._sockets.dial_tcp(ip_address(host).packed, port, 10.0)


def _whois_address(address: str | IPAddress) -> IPAddress:
    """The IP of a whois query: an address, or an ``ip:port`` / ``[ipv6]:port`` string."""
    if not isinstance(address, str):
        return address
    try:
        return ip_address(address.split("%")[0])
    except ValueError:
        pass
    try:
        host, port = split_host_port(address)
        if not 0 <= port < 65536:
            raise ValueError(port)
        return ip_address(host.split("%")[0])
    except ValueError:
        raise ValueError(f"whois() needs an IP address, ip:port or [ipv6]:port, not {address!r}") from None


def _whois(info: PeerInfo) -> WhoIs:
    return WhoIs(
        name=info.name,
        fqdn=info.fqdn,
        addresses=tuple(info.addresses),
        tags=tuple(info.tags),
        user=info.user,
        node_key=base64.b64encode(info.node_key).decode(),
        node_id=info.id,
    )


def _local_addresses() -> list[str]:
    """This host's interface addresses worth advertising as underlay endpoints.

    IPv4 from the kernel's interface table (one SIOCGIFADDR ioctl per interface), IPv6 from
    /proc/net/if_inet6; loopback and link-local addresses are left out (peers elsewhere cannot
    reach them). Falls back to what the host name resolves to.
    """
    found: list[str] = []
    try:
        import fcntl
        import struct

        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _, name in socket.if_nameindex():
                request = struct.pack("256s", name.encode()[:15])
                try:
                    reply = fcntl.ioctl(probe.fileno(), 0x8915, request)  # SIOCGIFADDR
                except OSError:
                    continue
                address = ip_address(reply[20:24])
                if not address.is_loopback and not address.is_link_local:
                    found.append(str(address))
        finally:
            probe.close()
    except (ImportError, OSError):
        pass
    try:
        with open("/proc/net/if_inet6") as table:
            for line in table:
                raw = line.split()[0]
                address6 = ip_address(bytes.fromhex(raw))
                if not address6.is_loopback and not address6.is_link_local:
                    found.append(str(address6))
    except OSError:
        pass
    if not found:
        try:
            found = sorted({str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)})
        except OSError:
            found = []
    return found
