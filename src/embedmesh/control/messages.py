"""The coordinator's messages to a node's stream: typed dataclasses and their JSON codec.

The sans-IO :class:`~embedmesh.control.coordinator.Coordinator` queues, per node stream, JSON
objects with a ``type``: ``registered``, ``map`` (full), ``delta``, ``logged_out``, ``error``. A
delta op is encoded once and its bytes shared by every stream that gets it, which keeps a change's
fan-out O(affected). :mod:`embedmesh.control.tsapi` parses them back and renders Tailscale's
MapResponses. (These were embedmesh's own wire format before it spoke Tailscale's protocol.)
Parsing is strict: unknown types or fields, wrong JSON types, bad keys, addresses or names, NaN and
oversized lists all raise :class:`ControlProtocolError` (a ``ParseError``).

:class:`RegisterRequest` is what :meth:`Coordinator.register` takes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any, TypeVar

from embedmesh.control.errors import ControlProtocolError
from embedmesh.control.netmap import (
    CHANGEABLE_FIELDS,
    NULLABLE_FIELDS,
    UNCHANGED,
    DeltaOp,
    DNSChanged,
    DNSConfig,
    FilterChanged,
    FilterRule,
    IPAddress,
    IPNetwork,
    MapDelta,
    NetworkMap,
    NodeState,
    PacketFilter,
    PeerAdded,
    PeerChange,
    PeerInfo,
    PeerRemoved,
    SelfChanged,
)

MAX_ENDPOINTS = 64
MAX_TAGS = 64
MAX_HOSTNAME = 255
MAX_TEXT = 256
MAX_MESSAGE_TEXT = 2048
#: Bounds every list in a message (peers in a map, ops in a delta, filter rules).
MAX_ITEMS = 1_000_000

TAG_RE = re.compile(r"tag:[a-z0-9][a-z0-9-]{0,62}")
LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
FQDN_RE = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
ERROR_CODE_RE = re.compile(r"[a-z_]{1,64}")

T = TypeVar("T")


# ---------------------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    """The node asks to join (or rejoin) with its node key; the auth key is optional on rejoin."""

    node_key: bytes
    disco_key: bytes
    hostname: str
    os: str = ""
    tags: tuple[str, ...] = ()
    ephemeral: bool = False
    auth_key: str | None = None
    endpoints: tuple[str, ...] = ()

    def __repr__(self) -> str:
        # The auth key never appears in logs or reprs.
        return (
            f"RegisterRequest(hostname={self.hostname!r}, tags={self.tags!r}, ephemeral={self.ephemeral}, "
            f"auth_key={'<set>' if self.auth_key else None})"
        )


@dataclass(frozen=True, slots=True)
class RegisterResponse:
    node_id: int
    state: NodeState
    #: A human-readable note, e.g. the approval command for an admin.
    message: str = ""


@dataclass(frozen=True, slots=True)
class FullMap:
    netmap: NetworkMap


@dataclass(frozen=True, slots=True)
class DeltaMessage:
    delta: MapDelta


@dataclass(frozen=True, slots=True)
class LoggedOut:
    pass


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    code: str
    message: str


ServerMessage = RegisterResponse | FullMap | DeltaMessage | LoggedOut | ErrorMessage


# ---------------------------------------------------------------------------------------- field checks


def _fail(message: str) -> ControlProtocolError:
    return ControlProtocolError(f"malformed control message: {message}")


def _reject_constant(name: str) -> float:
    raise _fail(f"{name} is not a number")


def loads(data: bytes | memoryview) -> dict[str, Any]:
    """Decode one JSON object; only :class:`ControlProtocolError` escapes."""
    try:
        value = json.loads(bytes(data), parse_constant=_reject_constant)
    except ControlProtocolError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _fail(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise _fail("expected a JSON object")
    return value


def dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(f"{where} must be an object")
    return value


def _fields(obj: dict[str, Any], where: str, required: Iterable[str], optional: Iterable[str] = ()) -> None:
    required = tuple(required)
    for name in required:
        if name not in obj:
            raise _fail(f"{where} lacks {name!r}")
    extra = set(obj) - set(required) - set(optional)
    if extra:
        raise _fail(f"{where} has unknown fields {sorted(extra)}")


def _int(value: object, where: str, low: int = 0, high: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(f"{where} must be an integer in [{low}, {high}]")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(f"{where} must be true or false")
    return value


def _float(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(f"{where} must be a finite number")
    return float(value)


def _opt_float(value: object, where: str) -> float | None:
    return None if value is None else _float(value, where)


def _str(value: object, where: str, max_len: int = MAX_TEXT, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise _fail(f"{where} must be a string of at most {max_len} characters")
    if pattern is not None and pattern.fullmatch(value) is None:
        raise _fail(f"{where} {value[:80]!r} is not valid")
    if any(ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise _fail(f"{where} contains control characters")
    return value


def _list(
    value: object, where: str, item: Callable[[object, str], T], max_items: int = MAX_ITEMS
) -> tuple[T, ...]:
    if not isinstance(value, list) or len(value) > max_items:
        raise _fail(f"{where} must be a list of at most {max_items} items")
    return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode()


def decode_key(value: object, where: str) -> bytes:
    if not isinstance(value, str) or len(value) != 44:
        raise _fail(f"{where} must be a base64 32-byte key")
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _fail(f"{where} must be a base64 32-byte key") from None
    if len(key) != 32 or encode_key(key) != value:
        raise _fail(f"{where} must be a base64 32-byte key")
    return key


def parse_endpoint(text: str) -> tuple[IPAddress, int]:
    """``"1.2.3.4:5"`` or ``"[2001:db8::1]:5"`` in canonical form; raises :class:`ControlProtocolError`."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or len(port) > 5:
        raise _fail(f"endpoint {text[:80]!r} is not ip:port")
    try:
        address = ip_address(host)
    except ValueError:
        raise _fail(f"endpoint {text[:80]!r} is not ip:port") from None
    if isinstance(address, IPv6Address) != text.startswith("[") or str(address) != host:
        raise _fail(f"endpoint {text[:80]!r} is not in canonical ip:port form")
    number = int(port)
    if not 1 <= number <= 65535 or str(number) != port:
        raise _fail(f"endpoint {text[:80]!r} has a bad port")
    return address, number


def format_endpoint(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if isinstance(address, IPv6Address) else f"{address}:{port}"


def _endpoint(value: object, where: str) -> str:
    text = _str(value, where, 64)
    parse_endpoint(text)
    return text


def _tag(value: object, where: str) -> str:
    return _str(value, where, 68, TAG_RE)


def _address(value: object, where: str) -> IPAddress:
    text = _str(value, where, 64)
    try:
        address = ip_address(text)
    except ValueError:
        raise _fail(f"{where} is not an IP address") from None
    if str(address) != text:
        raise _fail(f"{where} is not in canonical form")
    return address


def _network(value: object, where: str) -> IPNetwork:
    text = _str(value, where, 64)
    try:
        network = ip_network(text, strict=True)
    except ValueError:
        raise _fail(f"{where} is not an IP prefix") from None
    if str(network) != text:
        raise _fail(f"{where} is not in canonical form")
    return network


def _endpoints(value: object, where: str) -> tuple[str, ...]:
    return _list(value, where, _endpoint, MAX_ENDPOINTS)


def _tags(value: object, where: str) -> tuple[str, ...]:
    tags = _list(value, where, _tag, MAX_TAGS)
    if len(set(tags)) != len(tags):
        raise _fail(f"{where} repeats a tag")
    return tags


# ---------------------------------------------------------------------------------------- network map

_PEER_FIELDS = (
    "id",
    "node_key",
    "disco_key",
    "name",
    "hostname",
    "fqdn",
    "addresses",
    "allowed_ips",
    "endpoints",
    "tags",
    "user",
    "os",
    "online",
    "last_seen",
    "authorized",
    "key_expiry",
    "key_expired",
    "ephemeral",
    "home_derp",
)


def peer_to_json(peer: PeerInfo) -> dict[str, Any]:
    return {
        "id": peer.id,
        "node_key": encode_key(peer.node_key),
        "disco_key": encode_key(peer.disco_key),
        "name": peer.name,
        "hostname": peer.hostname,
        "fqdn": peer.fqdn,
        "addresses": [str(a) for a in peer.addresses],
        "allowed_ips": [str(n) for n in peer.allowed_ips],
        "endpoints": list(peer.endpoints),
        "tags": list(peer.tags),
        "user": peer.user,
        "os": peer.os,
        "online": peer.online,
        "last_seen": peer.last_seen,
        "authorized": peer.authorized,
        "key_expiry": peer.key_expiry,
        "key_expired": peer.key_expired,
        "ephemeral": peer.ephemeral,
        "home_derp": peer.home_derp,
    }


_FIELD_PARSERS: dict[str, Callable[[object, str], Any]] = {
    "node_key": decode_key,
    "disco_key": decode_key,
    "name": lambda v, w: _str(v, w, 63, LABEL_RE),
    "hostname": lambda v, w: _str(v, w, MAX_HOSTNAME),
    "fqdn": lambda v, w: _str(v, w, 253, FQDN_RE),
    "endpoints": _endpoints,
    "tags": _tags,
    "user": lambda v, w: _str(v, w),
    "os": lambda v, w: _str(v, w),
    "online": _bool,
    "last_seen": _opt_float,
    "key_expiry": _opt_float,
    "authorized": _bool,
    "key_expired": _bool,
    "ephemeral": _bool,
    "home_derp": lambda v, w: _int(v, w, 0, 65535),
    "id": lambda v, w: _int(v, w, 1),
    "addresses": lambda v, w: _list(v, w, _address, 16),
    "allowed_ips": lambda v, w: _list(v, w, _network, 4096),
}


def parse_peer(value: object, where: str = "peer") -> PeerInfo:
    obj = _object(value, where)
    _fields(obj, where, _PEER_FIELDS)
    return PeerInfo(**{name: _FIELD_PARSERS[name](obj[name], f"{where}.{name}") for name in _PEER_FIELDS})


def _dns_to_json(dns: DNSConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "base_domain": dns.base_domain,
        "magic_dns": dns.magic_dns,
        "search_domains": list(dns.search_domains),
    }
    # Only when configured: older peers of the protocol never see fields they do not know.
    if dns.extra_records:
        out["extra_records"] = [list(record) for record in dns.extra_records]
    if dns.split_dns:
        out["split_dns"] = [[domain, list(upstreams)] for domain, upstreams in dns.split_dns]
    return out


#: Bounds on admin DNS settings carried in every map.
MAX_DNS_RECORDS = 1000
MAX_SPLIT_ROUTES = 100
DNS_RECORD_TYPE_RE = re.compile(r"[A-Z][A-Z0-9]{0,9}")


def _dns_record(value: object, where: str) -> tuple[str, str, str]:
    if not isinstance(value, list) or len(value) != 3:
        raise _fail(f"{where} must be [name, type, value]")
    return (
        _str(value[0], f"{where}.name", 253),
        _str(value[1], f"{where}.type", 10, DNS_RECORD_TYPE_RE),
        _str(value[2], f"{where}.value", 4096),
    )


def _split_route(value: object, where: str) -> tuple[str, tuple[str, ...]]:
    if not isinstance(value, list) or len(value) != 2:
        raise _fail(f"{where} must be [domain, [resolver, ...]]")
    domain = _str(value[0], f"{where}.domain", 253, FQDN_RE)

    def resolver(item: object, w: str) -> str:
        text = _str(item, w, 64)
        parse_endpoint(text)
        return text

    return domain, _list(value[1], f"{where}.resolvers", resolver, 8)


def parse_dns_config(value: object, where: str = "dns") -> DNSConfig:
    """A DNS config from its JSON form, validated; raises :class:`ControlProtocolError`."""
    return _parse_dns(value, where)


def _parse_dns(value: object, where: str) -> DNSConfig:
    obj = _object(value, where)
    _fields(obj, where, ("base_domain", "magic_dns", "search_domains"), ("extra_records", "split_dns"))
    return DNSConfig(
        _str(obj["base_domain"], f"{where}.base_domain", 253, FQDN_RE),
        _bool(obj["magic_dns"], f"{where}.magic_dns"),
        _list(obj["search_domains"], f"{where}.search_domains", lambda v, w: _str(v, w, 253, FQDN_RE), 64),
        _list(obj.get("extra_records", []), f"{where}.extra_records", _dns_record, MAX_DNS_RECORDS),
        _list(obj.get("split_dns", []), f"{where}.split_dns", _split_route, MAX_SPLIT_ROUTES),
    )


def _filter_to_json(packet_filter: PacketFilter) -> list[dict[str, Any]]:
    return [
        {
            "sources": list(rule.sources),
            "destinations": list(rule.destinations),
            "ports": [list(p) for p in rule.ports],
            "protocols": list(rule.protocols),
        }
        for rule in packet_filter.rules
    ]


def _port_range(value: object, where: str) -> tuple[int, int]:
    pair = _list(value, where, lambda v, w: _int(v, w, 0, 65535), 2)
    if len(pair) != 2 or pair[0] > pair[1]:
        raise _fail(f"{where} must be [first, last]")
    return pair[0], pair[1]


def _selector(value: object, where: str) -> str:
    text = _str(value, where, 128)
    if not text:
        raise _fail(f"{where} is empty")
    return text


def _parse_rule(value: object, where: str) -> FilterRule:
    obj = _object(value, where)
    _fields(obj, where, ("sources", "destinations", "ports", "protocols"))
    return FilterRule(
        _list(obj["sources"], f"{where}.sources", _selector, 4096),
        _list(obj["destinations"], f"{where}.destinations", _selector, 4096),
        _list(obj["ports"], f"{where}.ports", _port_range, 1024),
        _list(obj["protocols"], f"{where}.protocols", lambda v, w: _int(v, w, 0, 255), 256),
    )


def _parse_filter(value: object, where: str) -> PacketFilter:
    return PacketFilter(_list(value, where, _parse_rule, 65536))


def netmap_to_json(netmap: NetworkMap) -> dict[str, Any]:
    return {
        "self": peer_to_json(netmap.self_node),
        "peers": [peer_to_json(p) for p in netmap.peers.values()],
        "dns": _dns_to_json(netmap.dns),
        "packet_filter": _filter_to_json(netmap.packet_filter),
    }


def parse_netmap(value: object, where: str = "map") -> NetworkMap:
    obj = _object(value, where)
    _fields(obj, where, ("self", "peers", "dns", "packet_filter"))
    peers = _list(obj["peers"], f"{where}.peers", parse_peer)
    by_id = {p.id: p for p in peers}
    if len(by_id) != len(peers):
        raise _fail(f"{where}.peers repeats a node id")
    return NetworkMap(
        parse_peer(obj["self"], f"{where}.self"),
        by_id,
        _parse_dns(obj["dns"], f"{where}.dns"),
        _parse_filter(obj["packet_filter"], f"{where}.packet_filter"),
    )


def op_to_json(op: DeltaOp) -> dict[str, Any]:
    if isinstance(op, PeerAdded):
        return {"op": "add", "peer": peer_to_json(op.peer)}
    if isinstance(op, PeerRemoved):
        return {"op": "remove", "id": op.id}
    if isinstance(op, PeerChange):
        out: dict[str, Any] = {"op": "change", "id": op.id}
        for name, value in op.changes().items():
            if name in ("node_key", "disco_key"):
                assert isinstance(value, bytes)
                out[name] = encode_key(value)
            elif isinstance(value, tuple):
                out[name] = list(value)
            else:
                out[name] = value
        return out
    if isinstance(op, SelfChanged):
        return {"op": "self", "node": peer_to_json(op.node)}
    if isinstance(op, DNSChanged):
        return {"op": "dns", "dns": _dns_to_json(op.dns)}
    return {"op": "filter", "rules": _filter_to_json(op.packet_filter)}


def parse_op(value: object, where: str = "op") -> DeltaOp:
    obj = _object(value, where)
    kind = obj.get("op")
    if kind == "add":
        _fields(obj, where, ("op", "peer"))
        return PeerAdded(parse_peer(obj["peer"], f"{where}.peer"))
    if kind == "remove":
        _fields(obj, where, ("op", "id"))
        return PeerRemoved(_int(obj["id"], f"{where}.id", 1))
    if kind == "change":
        _fields(obj, where, ("op", "id"), CHANGEABLE_FIELDS)
        changes: dict[str, Any] = {}
        for name in CHANGEABLE_FIELDS:
            if name in obj:
                parsed = _FIELD_PARSERS[name](obj[name], f"{where}.{name}")
                if parsed is None and name not in NULLABLE_FIELDS:
                    raise _fail(f"{where}.{name} cannot be null")
                changes[name] = parsed
        if not changes:
            raise _fail(f"{where} changes nothing")
        return PeerChange(_int(obj["id"], f"{where}.id", 1), **changes)
    if kind == "self":
        _fields(obj, where, ("op", "node"))
        return SelfChanged(parse_peer(obj["node"], f"{where}.node"))
    if kind == "dns":
        _fields(obj, where, ("op", "dns"))
        return DNSChanged(_parse_dns(obj["dns"], f"{where}.dns"))
    if kind == "filter":
        _fields(obj, where, ("op", "rules"))
        return FilterChanged(_parse_filter(obj["rules"], f"{where}.rules"))
    raise _fail(f"{where} has unknown op {str(kind)[:40]!r}")


# ---------------------------------------------------------------------------------------- encode / parse


def encode_delta_ops(fragments: Iterable[bytes]) -> bytes:
    """A ``delta`` message from ops already encoded with :func:`encode_op` (the server's fan-out
    encodes each op once and shares the bytes among every stream that gets it)."""
    return b'{"type":"delta","ops":[' + b",".join(fragments) + b"]}"


def encode_op(op: DeltaOp) -> bytes:
    return dumps(op_to_json(op))


def encode_peer(peer: PeerInfo) -> bytes:
    return dumps(peer_to_json(peer))


def encode_full_map(
    self_node: PeerInfo, peer_fragments: Iterable[bytes], dns: DNSConfig, packet_filter: PacketFilter
) -> bytes:
    """A ``map`` message from peers already encoded with :func:`encode_peer`."""
    return (
        b'{"type":"map","netmap":{"self":'
        + encode_peer(self_node)
        + b',"peers":['
        + b",".join(peer_fragments)
        + b'],"dns":'
        + dumps(_dns_to_json(dns))
        + b',"packet_filter":'
        + dumps(_filter_to_json(packet_filter))
        + b"}}"
    )


def encode_server_message(message: ServerMessage) -> bytes:
    if isinstance(message, RegisterResponse):
        return dumps(
            {
                "type": "registered",
                "node_id": message.node_id,
                "state": message.state.value,
                "message": message.message,
            }
        )
    if isinstance(message, FullMap):
        netmap = message.netmap
        return encode_full_map(
            netmap.self_node,
            (encode_peer(p) for p in netmap.peers.values()),
            netmap.dns,
            netmap.packet_filter,
        )
    if isinstance(message, DeltaMessage):
        return encode_delta_ops(encode_op(op) for op in message.delta.ops)
    if isinstance(message, LoggedOut):
        return b'{"type":"logged_out"}'
    return dumps({"type": "error", "code": message.code, "message": message.message})


def _state(value: object, where: str) -> NodeState:
    try:
        return NodeState(value)
    except ValueError:
        raise _fail(f"{where} is not a node state") from None


def parse_server_message(data: bytes | memoryview) -> ServerMessage:
    obj = loads(data)
    kind = obj.get("type")
    if kind == "registered":
        _fields(obj, "registered", ("type", "node_id", "state", "message"))
        return RegisterResponse(
            _int(obj["node_id"], "registered.node_id", 1),
            _state(obj["state"], "registered.state"),
            _str(obj["message"], "registered.message", MAX_MESSAGE_TEXT),
        )
    if kind == "map":
        _fields(obj, "map", ("type", "netmap"))
        return FullMap(parse_netmap(obj["netmap"], "map.netmap"))
    if kind == "delta":
        _fields(obj, "delta", ("type", "ops"))
        return DeltaMessage(MapDelta(_list(obj["ops"], "delta.ops", parse_op)))
    if kind == "logged_out":
        _fields(obj, "logged_out", ("type",))
        return LoggedOut()
    if kind == "error":
        _fields(obj, "error", ("type", "code", "message"))
        return ErrorMessage(
            _str(obj["code"], "error.code", 64, ERROR_CODE_RE),
            _str(obj["message"], "error.message", MAX_MESSAGE_TEXT),
        )
    raise _fail(f"unknown message type {str(kind)[:40]!r} from the server")


# Re-exported for the server and tests.
__all__ = [
    "UNCHANGED",
    "DeltaMessage",
    "ErrorMessage",
    "FullMap",
    "IPv4Address",
    "LoggedOut",
    "RegisterRequest",
    "RegisterResponse",
    "ServerMessage",
    "decode_key",
    "encode_delta_ops",
    "encode_full_map",
    "encode_key",
    "encode_op",
    "encode_peer",
    "encode_server_message",
    "format_endpoint",
    "parse_endpoint",
    "parse_netmap",
    "parse_op",
    "parse_peer",
    "parse_server_message",
]
