"""The client's map session: MapResponses in, the node's whole network map out (sans-IO).

Go's ``controlclient.mapSession`` rules: the first message that is not a keep-alive carries the
self ``Node``; a non-empty ``Peers`` is the complete list (and the message's other peer deltas are
ignored); otherwise ``PeersChanged`` upserts whole nodes, ``PeersRemoved`` drops them,
``PeersChangedPatch`` sets fields of known peers (unknown ids are ignored), ``OnlineChange`` and
``PeerSeenChange`` flip presence; every absent top-level field keeps its previous value.

:meth:`MapSession.network_map` renders the state as embedmesh's :class:`NetworkMap`, the type
the node's WireGuard peers, MagicDNS and ``status()`` already follow.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from embedmesh.control.netmap import ALLOW_ALL, DNSConfig, NetworkMap, PeerInfo
from embedmesh.tailscale import tailcfg
from embedmesh.tailscale.errors import TailscaleProtocolError

_ZERO_KEY = bytes(32)


class MapSessionError(TailscaleProtocolError):
    """The map stream broke a rule of the protocol (a delta before any self node)."""


class MapSession:
    """The state one map stream has built so far."""

    def __init__(self) -> None:
        self.node: tailcfg.Node | None = None
        self.peers: dict[int, tailcfg.Node] = {}
        self.dns: tailcfg.DNSConfig | None = None
        self.domain = ""
        self.users: dict[int, tailcfg.UserProfile] = {}
        self.derp_map: object | None = None
        self.messages = 0
        # Rendering a peer costs ~20 µs; a delta changes a few of N, so each rendering is kept
        # while its tailcfg.Node (immutable) and the user profiles stay the same.
        self._rendered: dict[int, tuple[tailcfg.Node, PeerInfo]] = {}  # id -> (node, rendering)
        self._users_version = 0
        self._rendered_users_version = 0

    def apply(self, response: tailcfg.MapResponse, now: float) -> bool:
        """Apply one message; True if the map changed (a keep-alive changes nothing)."""
        if response.keep_alive and response.node is None and not _has_content(response):
            return False
        if response.node is not None:
            self.node = response.node
        elif self.node is None:
            raise MapSessionError("the control server's first map has no self node")
        self.messages += 1
        if response.peers:
            self.peers = {peer.id: peer for peer in response.peers}
        else:
            for peer in response.peers_changed:
                self.peers[peer.id] = peer
            for peer_id in response.peers_removed:
                self.peers.pop(peer_id, None)
        for patch in response.peers_changed_patch:
            current = self.peers.get(patch.node_id)
            if current is not None:
                self.peers[patch.node_id] = _patched(current, patch)
        for peer_id, online in response.online_change.items():
            current = self.peers.get(peer_id)
            if current is not None:
                self.peers[peer_id] = dataclasses.replace(current, online=online)
        for peer_id, seen in response.peer_seen_change.items():
            current = self.peers.get(peer_id)
            if current is not None:
                self.peers[peer_id] = dataclasses.replace(current, last_seen=now if seen else None)
        if response.dns_config is not None:
            self.dns = response.dns_config
        if response.domain:
            self.domain = response.domain
        for profile in response.user_profiles:
            if self.users.get(profile.id) != profile:
                self.users[profile.id] = profile
                self._users_version += 1
        if response.derp_map is not None:
            self.derp_map = response.derp_map
        return True

    # ------------------------------------------------------------------ rendering

    def network_map(self, now: float) -> NetworkMap:
        """The state as embedmesh's network map (raises if no self node arrived yet)."""
        if self.node is None:
            raise MapSessionError("no map yet")
        me = self._peer_info(self.node, now)
        if self._rendered_users_version != self._users_version:
            self._rendered.clear()
            self._rendered_users_version = self._users_version
        rendered = self._rendered
        peers: dict[int, PeerInfo] = {}
        for peer in self.peers.values():
            if peer.key.raw == _ZERO_KEY or not peer.addresses:
                continue
            cached = rendered.get(peer.id)
            # The rendering depends on `now` only through whether the key has expired by then.
            expired = peer.expired or (peer.key_expiry is not None and peer.key_expiry <= now)
            if cached is None or cached[0] is not peer or cached[1].key_expired != expired:
                cached = (peer, self._peer_info(peer, now))
                rendered[peer.id] = cached
            peers[peer.id] = cached[1]
        if len(rendered) > len(peers) * 2 + 16:
            for gone in set(rendered) - set(peers):
                del rendered[gone]
        return NetworkMap(me, peers, self._dns(me), ALLOW_ALL)

    def _peer_info(self, node: tailcfg.Node, now: float) -> PeerInfo:
        fqdn = node.name.rstrip(".")
        label = fqdn.split(".", 1)[0] if fqdn else node.hostinfo.hostname
        profile = self.users.get(node.user)
        expired = node.expired or (node.key_expiry is not None and node.key_expiry <= now)
        return PeerInfo(
            id=node.id,
            node_key=node.key.raw,
            disco_key=node.disco_key.raw if node.disco_key is not None else _ZERO_KEY,
            name=label,
            hostname=node.hostinfo.hostname or label,
            fqdn=fqdn or label,
            addresses=tuple(prefix.network_address for prefix in node.addresses if _is_host(prefix)),
            allowed_ips=node.routed,
            endpoints=node.endpoints,
            tags=node.tags,
            # Tagged nodes have no user identity (the user id is the tagger's); show no owner.
            user="tagged-devices" if node.tags else (profile.login_name if profile else str(node.user)),
            os=node.hostinfo.os,
            online=bool(node.online),
            last_seen=node.last_seen,
            # Servers (headscale, embedmesh) clear MachineAuthorized once the key expires: the
            # expiry is the reason to show (re-authenticate), not a missing approval.
            authorized=node.machine_authorized or expired,
            key_expiry=node.key_expiry,
            key_expired=expired,
            home_derp=node.home_derp,
            ephemeral=tailcfg.EPHEMERAL_CAP in node.capabilities,
        )

    def _dns(self, me: PeerInfo) -> DNSConfig:
        base = me.fqdn.split(".", 1)[1] if "." in me.fqdn else (self.domain or "")
        dns = self.dns or tailcfg.DNSConfig()
        split = tuple(
            (suffix.rstrip("."), tuple(_resolver_address(r) for r in resolvers if _resolver_address(r)))
            for suffix, resolvers in dns.routes
            if resolvers and any(_resolver_address(r) for r in resolvers)
        )
        records = tuple(
            (_relative(name.rstrip("."), base), kind or _record_type(value), value)
            for name, kind, value in dns.extra_records
            # Tailscale's records are A/AAAA by their value (Type ""); embedmesh's server also
            # sends typed ones (CNAME, TXT, ...), which embedmesh's MagicDNS serves. An untyped
            # value that is no address is nothing a resolver could answer.
            if kind or _record_type(value)
        )
        return DNSConfig(
            base_domain=base,
            magic_dns=dns.proxied,
            search_domains=tuple(d.rstrip(".") for d in dns.domains),
            extra_records=records,
            split_dns=split,
        )


def _has_content(response: tailcfg.MapResponse) -> bool:
    return bool(
        response.peers
        or response.peers_changed
        or response.peers_removed
        or response.peers_changed_patch
        or response.online_change
        or response.peer_seen_change
        or response.dns_config is not None
        or response.domain
        or response.user_profiles
        or response.derp_map is not None
    )


def _patched(node: tailcfg.Node, patch: tailcfg.PeerChange) -> tailcfg.Node:
    changes: dict[str, object] = {}
    if patch.derp_region is not None:
        changes["home_derp"] = patch.derp_region
    if patch.endpoints is not None:
        changes["endpoints"] = patch.endpoints
    if patch.key is not None:
        changes["key"] = patch.key
    if patch.disco_key is not None:
        changes["disco_key"] = patch.disco_key
    if patch.online is not None:
        changes["online"] = patch.online
    if patch.last_seen is not None:
        changes["last_seen"] = patch.last_seen
    if patch.key_expiry is not None:
        changes["key_expiry"] = patch.key_expiry
    if patch.cap is not None:
        changes["cap"] = patch.cap
    return dataclasses.replace(node, **changes)  # type: ignore[arg-type]


def _is_host(prefix: tailcfg.IPNetwork) -> bool:
    return prefix.prefixlen == prefix.max_prefixlen


def _relative(name: str, base: str) -> str:
    """A record of one label under the tailnet's domain, as the short name (MagicDNS answers it
    by either name, as it does a node's)."""
    label, _, rest = name.partition(".")
    return label if base and rest == base else name


def _record_type(value: str) -> str:
    try:
        return "A" if ipaddress.ip_address(value).version == 4 else "AAAA"
    except ValueError:
        return ""


def _resolver_address(addr: str) -> str:
    """A plain resolver as ``ip:port`` (DoH and peer resolvers are not used by embedmesh yet)."""
    try:
        ip = ipaddress.ip_address(addr.strip("[]"))
        return f"[{ip}]:53" if ip.version == 6 else f"{ip}:53"
    except ValueError:
        pass
    host, sep, port = addr.rpartition(":")
    if sep and port.isdigit():
        try:
            ipaddress.ip_address(host.strip("[]"))
            return addr
        except ValueError:
            return ""
    return ""
