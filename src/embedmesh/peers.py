"""Keeps the WireGuard device's peers in step with the network map the coordination server sends.

Each peer of the map becomes a WireGuard peer keyed by its node key, with its overlay prefixes as
allowed IPs. A peer reports several underlay endpoints (every address it listens on); the device
talks to one at a time. :class:`PeerSync` starts with the most promising candidate and moves to the
next when a handshake has gone unanswered for longer than a retransmission, until one answers; from
then on WireGuard's roaming keeps the endpoint on whatever address the peer's packets come from.
This is the seam where NAT traversal (disco pings, relays) will plug in.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field

from embedmesh.control.netmap import NetworkMap, NodeState, PeerInfo
from embedmesh.hostport import split_host_port
from embedmesh.wireguard.device import WireGuardDevice
from embedmesh.wireguard.peer import Peer
from embedmesh.wireguard.timers import REKEY_TIMEOUT

logger = logging.getLogger("embedmesh.peers")

Endpoint = tuple[str, int]

#: How long a candidate endpoint gets to answer a handshake before the next one is tried: one
#: handshake retransmission (REKEY_TIMEOUT plus its jitter) and a little slack.
CANDIDATE_TIMEOUT = REKEY_TIMEOUT + 1.0


def parse_endpoint(text: str) -> Endpoint | None:
    """``"1.2.3.4:5"`` / ``"[v6]:5"`` to a socket address, or None if malformed."""
    try:
        host, port = split_host_port(text)
        return (str(ipaddress.ip_address(host)), port)
    except ValueError:
        return None


def rank_endpoints(endpoints: tuple[str, ...], own_hosts: set[str]) -> list[Endpoint]:
    """Order candidates: an address we share (the same host, e.g. loopback) first, then private
    addresses (likely the same LAN), then the rest; IPv4 before IPv6 within a class."""
    parsed = [ep for ep in (parse_endpoint(e) for e in endpoints) if ep is not None]

    def rank(endpoint: Endpoint) -> tuple[int, int]:
        address = ipaddress.ip_address(endpoint[0])
        if endpoint[0] in own_hosts:
            klass = 0
        elif address.is_private and not address.is_loopback:
            klass = 1
        elif address.is_loopback:
            klass = 2 if own_hosts & {"127.0.0.1", "::1"} else 4
        else:
            klass = 3
        return (klass, address.version)

    return sorted(parsed, key=rank)


@dataclass(slots=True)
class _PeerPaths:
    node_id: int
    public_key: bytes
    candidates: list[Endpoint] = field(default_factory=list)
    index: int = 0
    tried_since: float = 0.0


class PeerSync:
    """Applies network maps to a :class:`WireGuardDevice` and rotates endpoint candidates."""

    def __init__(self, device: WireGuardDevice, own_hosts: set[str]) -> None:
        self.device = device
        self.own_hosts = own_hosts
        self._paths: dict[int, _PeerPaths] = {}

    def apply(self, netmap: NetworkMap, now: float) -> None:
        """Make the device's peers those of ``netmap`` (none while this node is not authorized)."""
        wanted: dict[int, PeerInfo] = {}
        if netmap.state is NodeState.AUTHORIZED:
            wanted = {pid: p for pid, p in netmap.peers.items() if p.authorized and not p.key_expired}
        for node_id in list(self._paths):
            paths = self._paths[node_id]
            peer = wanted.get(node_id)
            if peer is None or peer.node_key != paths.public_key:
                self.device.remove_peer(paths.public_key)
                del self._paths[node_id]
        for node_id, info in wanted.items():
            candidates = rank_endpoints(info.endpoints, self.own_hosts)
            existing = self._paths.get(node_id)
            if existing is None:
                self._paths[node_id] = _PeerPaths(node_id, info.node_key, candidates, 0, now)
                self.device.add_peer(
                    info.node_key,
                    allowed_ips=info.allowed_ips,
                    endpoint=candidates[0] if candidates else None,
                )
                continue
            paths = existing
            device_peer = self.device.peers[info.node_key]
            self.device.set_allowed_ips(device_peer, info.allowed_ips)
            if candidates != paths.candidates:
                paths.candidates = candidates
                if device_peer.endpoint not in candidates and not self._recently_heard(device_peer, now):
                    paths.index = 0
                    paths.tried_since = now
                    device_peer.endpoint = candidates[0] if candidates else None

    def _recently_heard(self, peer: Peer, now: float) -> bool:
        last = peer.stats.last_handshake
        return last is not None and now - last < 180.0

    def check_paths(self, now: float) -> None:
        """Move peers whose handshake goes unanswered to their next endpoint candidate."""
        for paths in self._paths.values():
            if len(paths.candidates) < 2:
                continue
            peer = self.device.peers.get(paths.public_key)
            if peer is None or peer.handshake is None:
                continue
            answered_since = (
                peer.stats.last_handshake is not None and peer.stats.last_handshake >= paths.tried_since
            )
            if answered_since or now - paths.tried_since < CANDIDATE_TIMEOUT:
                continue
            paths.index = (paths.index + 1) % len(paths.candidates)
            paths.tried_since = now
            peer.endpoint = paths.candidates[paths.index]
            logger.debug("peer %d: no answer, trying endpoint %s", paths.node_id, peer.endpoint)
            # Try the new path now rather than at the next retransmission.
            peer.last_initiation_sent = float("-inf")
            self.device.initiate_handshake(peer, now)

    def node_key_of(self, node_id: int) -> bytes | None:
        paths = self._paths.get(node_id)
        return paths.public_key if paths else None
