"""The MagicDNS zone: what the network map says about names, rebuilt whole on every map.

A :class:`MagicZone` answers, for the tailnet's own names, A, AAAA and PTR for every node the map
shows (the node itself included), by short name (``db``) and by fully qualified name
(``db.mesh.internal``), case-insensitively; plus the extra records and split-DNS routes an admin
configures. It is immutable: a new map builds a new zone, so a renamed or removed node has no
answer left behind anywhere. Names it is not authoritative for return ``None`` from
:meth:`MagicZone.lookup`, and the resolver forwards them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

from dnslib import AAAA, CNAME, PTR, QTYPE, RD, RR, SOA, TXT, A, DNSBuffer, DNSLabel  # type: ignore[import-untyped]

from embedmesh.dns.message import (
    TYPE_A,
    TYPE_AAAA,
    TYPE_ANY,
    TYPE_CNAME,
    TYPE_HINFO,
    TYPE_PTR,
    TYPE_SOA,
    Name,
    lower_name,
    name_to_text,
    text_to_name,
)
from embedmesh.dns.upstream import Upstream, parse_upstream

logger = logging.getLogger("embedmesh.dns")

IPAddress = IPv4Address | IPv6Address

DEFAULT_BASE_DOMAIN = "mesh.internal"
#: TTL of the tailnet's own records: short, so a rename or a removed node is forgotten quickly by
#: the caches of clients, while answers stay cheap to repeat.
NAME_TTL = 30
#: TTL of negative answers (the SOA's MINIMUM and its own TTL, RFC 2308 §5): a node that joins is
#: found a few seconds later at most by a client that asked before.
NEGATIVE_TTL = 5
#: The tailnet's address ranges: reverse lookups there are ours to answer, NXDOMAIN included.
TAILNET_V4 = IPv4Network("100.64.0.0/10")
TAILNET_V6 = IPv6Network("fd7a:115c:a1e0::/48")
_REVERSE_V4_APEX: Name = (b"100", b"in-addr", b"arpa")
_REVERSE_V6_APEX: Name = (*tuple(b"fd7a115ca1e0"[::-1][i : i + 1] for i in range(12)), b"ip6", b"arpa")
_IN_ADDR: Name = (b"in-addr", b"arpa")
_IP6: Name = (b"ip6", b"arpa")


@dataclass(frozen=True, slots=True)
class ZoneAnswer:
    """What the zone says about one question (records are dnslib ``RR`` objects)."""

    rcode: int
    answer: tuple[RR, ...] = ()
    authority: tuple[RR, ...] = ()


@dataclass(frozen=True, slots=True)
class SplitRoute:
    """Queries for ``suffix`` and below go to ``upstreams``; none means: answer only locally."""

    suffix: Name
    upstreams: tuple[Upstream, ...]


@dataclass(frozen=True, slots=True)
class _Record:
    rtype: int
    rdata: RD
    ttl: int


@dataclass(slots=True)
class MagicZone:
    """The tailnet's names, reverse names, extra records and split-DNS routes at one moment."""

    base_domain: Name = field(default_factory=lambda: text_to_name(DEFAULT_BASE_DOMAIN))
    #: Lower-cased name (short and FQDN) -> the node's overlay addresses.
    hosts: dict[Name, tuple[IPAddress, ...]] = field(default_factory=dict)
    #: Overlay address -> the node's FQDN.
    reverse: dict[IPAddress, Name] = field(default_factory=dict)
    extra: dict[Name, tuple[_Record, ...]] = field(default_factory=dict)
    #: Longest suffix first.
    routes: tuple[SplitRoute, ...] = ()
    #: Search domains from the map (the base domain first), for the in-process stub resolver.
    search_domains: tuple[str, ...] = ()
    #: Whether MagicDNS answers node names to clients (the map's ``magic_dns``); the in-process
    #: resolver always knows them.
    serve_names: bool = True
    serial: int = 1
    #: Every name that exists under the base domain, with its ancestors (empty non-terminals give
    #: NODATA, not NXDOMAIN: RFC 8020).
    _existing: frozenset[Name] = field(default=frozenset(), init=False, repr=False)
    _existing_nodes: frozenset[Name] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        self._existing = self._under_base(self.extra)
        self._existing_nodes = self._existing | self._under_base(self.hosts)

    def _under_base(self, names: Iterable[Name]) -> frozenset[Name]:
        base = self.base_domain
        existing: set[Name] = {base}
        for name in names:
            if name[-len(base) :] == base:
                for cut in range(len(name) - len(base) + 1):
                    existing.add(name[cut:])
        return frozenset(existing)

    # -------------------------------------------------------------------------------- building

    @classmethod
    def from_netmap(cls, netmap: Any, *, serial: int = 1) -> MagicZone:
        """The zone a network map describes (a ``NetworkMap``; DNS fields read with defaults, so
        maps from older coordination servers work too)."""
        dns = getattr(netmap, "dns", None)
        base_text = str(getattr(dns, "base_domain", "") or DEFAULT_BASE_DOMAIN)
        base = lower_name(text_to_name(base_text))
        hosts: dict[Name, tuple[IPAddress, ...]] = {}
        reverse: dict[IPAddress, Name] = {}
        for info in (netmap.self_node, *netmap.peers.values()):
            addresses = tuple(sorted(info.addresses, key=lambda a: a.version))
            if not addresses or not info.name:
                continue
            try:
                short = lower_name(text_to_name(info.name))
                names = {short, short + base}
                if info.fqdn:
                    names.add(lower_name(text_to_name(info.fqdn)))
            except ValueError:
                logger.warning("node %r has a name that is not a DNS name; no MagicDNS record", info.name)
                continue
            fqdn = short + base
            for name in names:
                hosts[name] = addresses
            for address in addresses:
                reverse.setdefault(address, fqdn)
        extra = _extra_records(getattr(dns, "extra_records", ()) or (), base)
        for name, records in extra.items():
            for record in records:
                if record.rtype in (TYPE_A, TYPE_AAAA) and len(name) > 1:
                    reverse.setdefault(ip_address(str(record.rdata)), name)
        routes = _split_routes(dict(getattr(dns, "split_dns", ()) or ()))
        search = [name_to_text(base)]
        for domain in getattr(dns, "search_domains", ()) or ():
            domain = str(domain).strip(".").lower()
            if domain and domain not in search:
                search.append(domain)
        return cls(
            base_domain=base,
            hosts=hosts,
            reverse=reverse,
            extra=extra,
            routes=routes,
            search_domains=tuple(search),
            serve_names=bool(getattr(dns, "magic_dns", True)),
            serial=serial,
        )

    # -------------------------------------------------------------------------------- queries

    def lookup(self, name: Name, qtype: int, *, internal: bool = False) -> ZoneAnswer | None:
        """The answer for ``name`` (labels as the client sent them), or None when the name is not
        ours and should be forwarded. ``internal`` is the in-process resolver, which knows node
        names even when the map turned MagicDNS off for clients."""
        key = lower_name(name)
        nodes = internal or self.serve_names
        addresses = self.hosts.get(key) if nodes else None
        extra = self.extra.get(key)
        if addresses is not None or extra is not None:
            return self._host_answer(name, key, qtype, addresses or (), extra or (), nodes)
        if key[-2:] in (_IN_ADDR, _IP6):
            return self._reverse_answer(name, key, qtype, nodes)
        base = self.base_domain
        if key[-len(base) :] == base:
            if key in (self._existing_nodes if nodes else self._existing):
                if key == base and qtype == TYPE_ANY:
                    return ZoneAnswer(0, minimal_any(name, [[self._soa(name)]]))
                if key == base and qtype == TYPE_SOA:
                    return ZoneAnswer(0, (self._soa(name),))
                return self._negative(0, qtype, self._soa())
            return self._negative(3, qtype, self._soa())
        return None

    def route(self, name: Name) -> SplitRoute | None:
        """The split-DNS route for ``name``, or None for the host's resolvers."""
        key = lower_name(name)
        for route in self.routes:
            if not route.suffix or key[-len(route.suffix) :] == route.suffix:
                return route
        return None

    def addresses_of(self, name: str) -> tuple[IPAddress, ...]:
        """A node's addresses by short name or FQDN (in-process, no DNS message involved)."""
        try:
            key = lower_name(text_to_name(name))
        except ValueError:
            return ()
        found = list(self.hosts.get(key, ()))
        for record in self.extra.get(key, ()):
            if record.rtype in (TYPE_A, TYPE_AAAA):
                found.append(ip_address(str(record.rdata)))
        return tuple(found)

    def _host_answer(
        self,
        name: Name,
        key: Name,
        qtype: int,
        addresses: Iterable[IPAddress],
        extra: Iterable[_Record],
        nodes: bool,
    ) -> ZoneAnswer:
        owner = DNSLabel(name)
        records = [
            _Record(TYPE_A if a.version == 4 else TYPE_AAAA, _address_rdata(a), NAME_TTL) for a in addresses
        ]
        records += extra
        cnames = [r for r in records if r.rtype == TYPE_CNAME]
        if cnames and qtype not in (TYPE_CNAME, TYPE_ANY):
            # A CNAME owns its name alone (RFC 1034 §3.6.2): answer it, and follow it once when
            # the target is ours too, so clients get the addresses in the same answer.
            target = cnames[0]
            answer = [RR(owner, TYPE_CNAME, ttl=target.ttl, rdata=target.rdata)]
            target_name = lower_name(tuple(target.rdata.label.label))
            if target_name != key:
                followed = self.lookup(target_name, qtype, internal=nodes)
                if followed is not None and followed.rcode == 0:
                    answer += followed.answer
            return ZoneAnswer(0, tuple(answer))
        if qtype == TYPE_ANY and records:
            rrsets: dict[int, list[RR]] = {}
            for r in records:
                rrsets.setdefault(r.rtype, []).append(RR(owner, r.rtype, ttl=r.ttl, rdata=r.rdata))
            return ZoneAnswer(0, minimal_any(name, list(rrsets.values())))
        matching = [r for r in records if r.rtype == qtype]
        if matching:
            return ZoneAnswer(0, tuple(RR(owner, r.rtype, ttl=r.ttl, rdata=r.rdata) for r in matching))
        within = key[-len(self.base_domain) :] == self.base_domain
        return ZoneAnswer(0, (), (self._soa(),) if within else ())

    def _reverse_answer(self, name: Name, key: Name, qtype: int, nodes: bool) -> ZoneAnswer | None:
        address = reverse_to_address(key)
        if address is None:
            return None
        target = self.reverse.get(address)
        if target is not None and not nodes and address not in self._extra_addresses():
            target = None
        if target is not None:
            if qtype in (TYPE_PTR, TYPE_ANY):
                ptr = RR(DNSLabel(name), TYPE_PTR, ttl=NAME_TTL, rdata=PTR(DNSLabel(target)))
                return ZoneAnswer(0, (ptr,) if qtype == TYPE_PTR else minimal_any(name, [[ptr]]))
            return ZoneAnswer(0, (), (self._reverse_soa(address),))
        if address in TAILNET_V4 or address in TAILNET_V6:
            return self._negative(3, qtype, self._reverse_soa(address))
        return None

    @staticmethod
    def _negative(rcode: int, qtype: int, soa: RR) -> ZoneAnswer:
        """NXDOMAIN or NODATA with the SOA for negative caching (RFC 2308); for ANY without it,
        so that no answer to ANY is much larger than the question (RFC 8482's intent)."""
        return ZoneAnswer(rcode, (), () if qtype == TYPE_ANY else (soa,))

    def _extra_addresses(self) -> set[IPAddress]:
        return {
            ip_address(str(r.rdata))
            for records in self.extra.values()
            for r in records
            if r.rtype in (TYPE_A, TYPE_AAAA)
        }

    def _soa(self, owner: Name | None = None) -> RR:
        apex = DNSLabel(owner if owner is not None else self.base_domain)
        return _soa_record(apex, self.base_domain, self.serial)

    def _reverse_soa(self, address: IPAddress) -> RR:
        apex = _REVERSE_V4_APEX if address.version == 4 else _REVERSE_V6_APEX
        return _soa_record(DNSLabel(apex), self.base_domain, self.serial)


#: RFC 8482 §4.2: the HINFO a server may synthesize to answer ANY (CPU "RFC8482", OS "").
_RFC8482_RDATA = b"\x07RFC8482\x00"


def rfc8482_hinfo(name: Name) -> RR:
    """The synthesized ``HINFO "RFC8482" ""`` answer to an ANY question for ``name``."""
    return RR(DNSLabel(name), TYPE_HINFO, ttl=NAME_TTL, rdata=RD(_RFC8482_RDATA))


def minimal_any(name: Name, rrsets: Iterable[list[RR]]) -> tuple[RR, ...]:
    """The answer to ANY (RFC 8482 §4): one RRset, the smallest the name has, or the synthesized
    HINFO when even that is larger. Each record costs 12 bytes besides its data (the owner, a
    pointer to the question, and type, class, TTL, length), so an ANY answer is at most the
    question plus 21 bytes: 2.1 times a one-letter name's 19-byte query at worst."""
    limit = 12 + len(_RFC8482_RDATA)
    best: list[RR] | None = None
    best_size = 0
    for rrset in rrsets:
        size = sum(12 + _rdata_size(rr.rdata) for rr in rrset)
        if best is None or size < best_size:
            best, best_size = rrset, size
    if best is None or best_size > limit:
        return (rfc8482_hinfo(name),)
    return tuple(best)


def _rdata_size(rdata: RD) -> int:
    """The uncompressed wire size of ``rdata`` (an upper bound of what it takes in a message)."""
    buffer = DNSBuffer()
    rdata.pack(buffer)
    return len(buffer.data)


def _soa_record(owner: DNSLabel, base: Name, serial: int) -> RR:
    soa = SOA(
        mname=DNSLabel(base),
        rname=DNSLabel((b"hostmaster", *base)),
        times=(serial & 0xFFFFFFFF, 3600, 600, 86400, NEGATIVE_TTL),
    )
    return RR(owner, TYPE_SOA, ttl=NEGATIVE_TTL, rdata=soa)


def _address_rdata(address: IPAddress) -> RD:
    return A(str(address)) if address.version == 4 else AAAA(str(address))


def reverse_name(address: IPAddress) -> Name:
    """``100.64.0.1`` -> ``1.0.64.100.in-addr.arpa``; IPv6 as nibbles under ``ip6.arpa``."""
    if address.version == 4:
        return tuple(str(octet).encode() for octet in reversed(address.packed)) + _IN_ADDR
    nibbles = address.packed.hex()
    return tuple(n.encode() for n in reversed(nibbles)) + _IP6


def reverse_to_address(name: Name) -> IPAddress | None:
    """The address a full reverse name stands for, or None (partial or malformed names)."""
    if name[-2:] == _IN_ADDR and len(name) == 6:
        octets = name[:4]
        if all(o.isdigit() and len(o) <= 3 and (o == b"0" or not o.startswith(b"0")) for o in octets):
            values = [int(o) for o in reversed(octets)]
            if all(v < 256 for v in values):
                return IPv4Address(bytes(values))
        return None
    if name[-2:] == _IP6 and len(name) == 34:
        nibbles = name[:32]
        text = b"".join(reversed(nibbles))
        if all(len(n) == 1 for n in nibbles) and all(c in b"0123456789abcdef" for c in text):
            return IPv6Address(bytes.fromhex(text.decode()))
    return None


def _extra_records(entries: Iterable[Any], base: Name) -> dict[Name, tuple[_Record, ...]]:
    """Admin-configured records ``(name, type, value)``. A name without a dot is relative to the
    base domain. A malformed entry is logged and skipped: a map never breaks the resolver."""
    out: dict[Name, list[_Record]] = {}
    for entry in entries:
        try:
            name_text, type_text, value = (str(part) for part in entry)
            name = lower_name(text_to_name(name_text))
            names = [name]
            if len(name) == 1 and not name_text.endswith("."):
                # Relative to the base domain, and answered by its short name too, like a node.
                names.append(name + base)
            record = _parse_record(names[-1], type_text.upper(), value)
        except Exception as exc:  # anything in an entry from the map: skip it, say which
            logger.warning("ignoring extra DNS record %r: %s", entry, exc)
            continue
        for each in names:
            out.setdefault(each, []).append(record)
    return {name: tuple(records) for name, records in out.items()}


def _parse_record(name: Name, rtype: str, value: str) -> _Record:
    if rtype == "A":
        return _Record(TYPE_A, A(str(IPv4Address(value.strip()))), NAME_TTL)
    if rtype == "AAAA":
        return _Record(TYPE_AAAA, AAAA(str(IPv6Address(value.strip()))), NAME_TTL)
    if rtype in ("CNAME", "PTR"):
        target = DNSLabel(lower_name(text_to_name(value.strip())))
        return _Record(getattr(QTYPE, rtype), (CNAME if rtype == "CNAME" else PTR)(target), NAME_TTL)
    if rtype == "TXT":
        data = value.encode()
        return _Record(
            QTYPE.TXT, TXT([data[i : i + 255] for i in range(0, len(data), 255)] or [b""]), NAME_TTL
        )
    # Anything else in zone-file syntax (MX, SRV, CAA, ...), parsed by dnslib.
    (rr,) = RR.fromZone(f"{name_to_text(name)}. {NAME_TTL} IN {rtype} {value}")
    return _Record(rr.rtype, rr.rdata, NAME_TTL)


def _split_routes(split: Mapping[Any, Any] | Iterable[Any]) -> tuple[SplitRoute, ...]:
    """Routes from ``{domain: [resolver, ...]}`` or from ``((domain, (resolver, ...)), ...)``, the
    form the network map carries."""
    pairs = split.items() if isinstance(split, Mapping) else split
    routes: list[SplitRoute] = []
    for pair in pairs:
        try:
            domain, upstreams = pair
            suffix = lower_name(text_to_name(str(domain)))
            if isinstance(upstreams, str):
                upstreams = [upstreams]
            parsed = tuple(parse_upstream(str(u)) for u in upstreams)
        except (TypeError, ValueError) as exc:
            logger.warning("ignoring split-DNS route %r: %s", pair, exc)
            continue
        routes.append(SplitRoute(suffix, parsed))
    routes.sort(key=lambda r: len(r.suffix), reverse=True)
    return tuple(routes)
