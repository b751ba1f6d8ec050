"""The seam between the WireGuard device and the path layer, sans-IO.

:class:`DevicePaths` binds a :class:`~embedmesh.wireguard.device.WireGuardDevice` to a
:class:`~embedmesh.paths.PathCore`: the device reports traffic and sources (its ``on_send`` and
``on_source`` hooks) instead of moving a peer's endpoint itself, the path core decides, and its
decisions (:class:`~embedmesh.paths.PathChanged`) become the device's endpoints. Disco datagrams,
from the UDP socket or from DERP, go to the path core; what the path core wants sent (pings,
pongs, CallMeMaybe) waits in :meth:`DevicePaths.datagrams_to_send` beside WireGuard's.

The node's runtime (:class:`~embedmesh.runtime.links.WireGuardLink`) and the simulator drive the
same object, so a path decision made in a simulated mesh is the one a real node makes.

Destinations are UDP endpoints, or DERP addresses (``(DERP_HOST, slot)``) that
:meth:`~embedmesh.paths.PathCore.derp_route` maps to a peer's node key and home region: whoever
sends the datagrams routes those into DERP connections.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network

from embedmesh.paths import Datagram, Endpoint, PathChanged, PathCore, PingReceived
from embedmesh.tailscale import disco
from embedmesh.wireguard.device import WireGuardDevice
from embedmesh.wireguard.peer import Peer


class DevicePaths:
    """A WireGuard device whose peers' endpoints the path layer chooses."""

    def __init__(self, device: WireGuardDevice, paths: PathCore) -> None:
        self.device = device
        self.paths = paths
        self._out: list[Datagram] = []
        device.on_source = self._on_source
        device.on_send = self._on_send

    # ------------------------------------------------------------------ peers

    def set_peer(
        self,
        node_key: bytes,
        disco_key: bytes,
        endpoints: Iterable[Endpoint],
        allowed_ips: Iterable[IPv4Network | IPv6Network | str],
        now: float,
        *,
        home_derp: int = 0,
    ) -> None:
        """Add or update a peer of the network map (device and path layer together)."""
        peer = self.device.peers.get(node_key)
        if peer is None:
            peer = self.device.add_peer(node_key, allowed_ips=list(allowed_ips))
        else:
            self.device.set_allowed_ips(peer, list(allowed_ips))
        self.paths.set_peer(node_key, disco_key, endpoints, now, home_derp=home_derp)
        self._apply(now)
        if peer.endpoint is None:
            # A new peer's first path (DERP, or a wireguard-only peer's endpoint) comes at once.
            path = self.paths.send_path(node_key, now)
            if path is not None:
                self.device.set_endpoint(peer, path, now)

    def remove_peer(self, node_key: bytes) -> None:
        self.device.remove_peer(node_key)
        self.paths.remove_peer(node_key)

    def set_derp_enabled(self, enabled: bool, now: float) -> None:
        self.paths.set_derp_enabled(enabled, now)
        self._apply(now)

    # ------------------------------------------------------------------ inputs

    def receive_disco(
        self, datagram: bytes | memoryview, source: Endpoint, now: float, *, via_derp: bool = False
    ) -> None:
        """A datagram :func:`~embedmesh.tailscale.disco.classify` called disco."""
        out = self.paths.receive_disco(datagram, source, now, via_derp=via_derp)
        if out:
            self._out += out
        self._apply(now)

    def receive_relayed(self, payload: bytes, src_key: bytes, now: float) -> bytes | None:
        """A packet a DERP server relayed from the node ``src_key``: disco (which then counts as
        having come through DERP, as a CallMeMaybe must) or WireGuard, from that peer's DERP
        address. Returns the IP packet WireGuard decrypted, if any; None also for a sender that
        is no peer (counted as ``path_drop_derp_unknown_peer``)."""
        source = self.paths.derp_address(src_key)
        if source is None:
            self.paths.counters["drop_derp_unknown_peer"] += 1
            return None
        if disco.classify(payload) is disco.PacketKind.DISCO:
            self.receive_disco(payload, source, now, via_derp=True)
            return None
        self.paths.counters["rx_derp_wireguard"] += 1
        return self.device.receive_datagram(payload, source, now)

    def handle_timeout(self, now: float) -> None:
        """Fire the device's and the path layer's timers."""
        self.device.handle_timeout(now)
        out = self.paths.handle_timeout(now)
        if out:
            self._out += out
        self._apply(now)

    def next_deadline(self) -> float | None:
        device = self.device.next_deadline()
        paths = self.paths.next_deadline()
        if device is None:
            return paths
        if paths is None:
            return device
        return min(device, paths)

    # ------------------------------------------------------------------ outputs

    def datagrams_to_send(self) -> list[Datagram]:
        """WireGuard's datagrams and the path layer's, each with its destination. A WireGuard
        datagram to an untrusted best path goes to the peer's DERP address too
        (:attr:`~embedmesh.paths.PathCore.derp_copies`); the receiver's replay window drops
        whichever copy comes second."""
        datagrams = self.device.datagrams_to_send()
        copies = self.paths.derp_copies
        if copies and datagrams:
            datagrams += [(data, copies[to]) for data, to in datagrams if to in copies]
        if self._out:
            out, self._out = self._out, []
            if datagrams:
                out += datagrams
            return out
        return datagrams

    # ------------------------------------------------------------------ hooks

    def _on_source(self, peer: Peer, source: Endpoint, now: float) -> None:
        out = self.paths.note_wireguard(peer.public_key, source, now)
        if out:
            self._out += out
        self._apply(now)

    def _on_send(self, peer: Peer, now: float) -> None:
        out = self.paths.note_send(peer.public_key, now)
        if out:
            self._out += out
        self._apply(now)

    def _apply(self, now: float) -> None:
        paths, device = self.paths, self.device
        event = paths.next_event()
        while event is not None:
            peer = device.peers.get(event.node_key)
            if peer is not None:
                if isinstance(event, PathChanged):
                    device.set_endpoint(peer, paths.send_path(event.node_key, now), now)
                elif isinstance(event, PingReceived):
                    # The peer is looking for a path to us, most likely because our handshake
                    # found none: resend it now rather than at the 5 s retransmit.
                    device.hurry_handshake(peer, now)
            event = paths.next_event()


__all__ = ["DevicePaths"]
