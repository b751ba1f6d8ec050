"""The MagicDNS resolver core, sans-IO: a query in, an answer (or upstream exchanges) out.

:meth:`Resolver.receive_query` takes a query's bytes, who sent it and ``now``. The tailnet's own
names are answered at once from the :class:`~embedmesh.dns.records.MagicZone`; every other name is
forwarded to the resolvers of its split-DNS route or of the host (resolv.conf), through a cache that
honours TTLs (RFC 2308 negative caching included) and with identical questions in flight shared.
Forwarding is pulled, aioquic-style: :meth:`Resolver.pop_exchanges` lists the queries to send
upstream, the driver feeds what comes back to :meth:`Resolver.receive_upstream`, and
:meth:`Resolver.handle_timeout` moves a lookup on to the next upstream when one stays silent. Answers
to queries that had to wait come out of :meth:`Resolver.pop_replies`.

No socket, clock or task here; message IDs come from the ``random.Random`` it is handed (a
``random.SystemRandom`` in the node, so they cannot be guessed).
"""

from __future__ import annotations

import enum
import logging
import math
import random
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from dnslib import EDNS0, QTYPE, RR, DNSHeader, DNSLabel, DNSQuestion, DNSRecord  # type: ignore[import-untyped]

from embedmesh.dns.message import (
    CLASS_ANY,
    CLASS_IN,
    EDNS_FLAG_DO,
    EDNS_UDP_SIZE,
    FLAG_AA,
    FLAG_AD,
    FLAG_CD,
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    FLAG_TC,
    HEADER,
    OPCODE_QUERY,
    QUESTION_TAIL,
    RCODE_BADVERS,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NOTIMP,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    TYPE_ANY,
    TYPE_AXFR,
    TYPE_IXFR,
    TYPE_OPT,
    TYPE_SOA,
    Message,
    Name,
    Query,
    QueryFormatError,
    encode_name,
    header_only,
    lower_name,
    name_to_text,
    opt_record,
    parse_header,
    parse_message,
    parse_query,
    without_records,
)
from embedmesh.dns.records import MagicZone, rfc8482_hinfo
from embedmesh.dns.upstream import HostDnsConfig, Upstream
from embedmesh.errors import ParseError

logger = logging.getLogger("embedmesh.dns")

#: Seconds one upstream gets to answer one try, unless resolv.conf says otherwise. Shorter than
#: glibc's 5 s so that a stub client, which itself waits about 5 s, sees our SERVFAIL rather than
#: its own timeout when every upstream is down.
DEFAULT_TIMEOUT = 2.0
#: A lookup gives up after this long whatever is left to try.
MAX_LOOKUP_TIME = 8.0
#: RFC 9520: resolution failures are cached (at least 1 s) so a dead upstream is not hammered.
FAILURE_TTL = 2.0
#: Upper bound on any cached TTL (a day is common; an hour keeps a changed record from lingering).
MAX_CACHE_TTL = 3600
CACHE_ENTRIES = 4096
#: Distinct questions in flight upstream, and clients waiting on one question.
MAX_LOOKUPS = 512
MAX_WAITERS = 64


class Pending(enum.Enum):
    """The query was accepted; its answer comes later through :meth:`Resolver.pop_replies`."""

    PENDING = "pending"


PENDING = Pending.PENDING


class Recursion(enum.Enum):
    """How far a client's questions may reach beyond the tailnet's own names (which everyone gets).

    MagicDNS must not become an open resolver, nor a window into the node's host network: a peer
    on the overlay gets the tailnet's names and its split-DNS routes (the admin's resolvers), and
    only a node that opts in lets its peers use the host's own resolvers too.
    """

    #: Tailnet names only: REFUSED for anything else (a stranger on a host port).
    NONE = "none"
    #: Tailnet names and split-DNS routes (a peer, unless the node forwards for peers).
    ROUTES = "routes"
    #: Everything, through the host's resolvers too (the node itself, loopback clients).
    ALL = "all"


@dataclass(frozen=True, slots=True)
class Client:
    """Who asked: an id the driver chooses (to route the answer), the transport (UDP answers are
    size-limited and may be truncated), and how far it may use us to reach other resolvers."""

    id: int
    transport: str = "udp"  # "udp", "tcp" or "internal" (the node itself)
    recursion: Recursion = Recursion.ALL


@dataclass(frozen=True, slots=True)
class Exchange:
    """One query to send to one upstream; the driver reports back by ``id``."""

    id: int
    upstream: Upstream
    transport: str  # "udp" or "tcp"
    data: bytes


CacheKey = tuple[Name, int, int, bool, bool]


@dataclass(slots=True)
class _CacheEntry:
    data: bytes
    message: Message | None  # None: a cached resolution failure (SERVFAIL)
    stored_at: float
    expires_at: float


@dataclass(slots=True)
class _Lookup:
    key: CacheKey
    tries: list[Upstream]
    started: float
    waiters: list[tuple[Client, Query]] = field(default_factory=list)
    next_try: int = 0
    exchange: int | None = None


@dataclass(slots=True)
class _ExchangeState:
    id: int
    lookup: _Lookup
    upstream: Upstream
    transport: str
    message_id: int
    deadline: float


class ResponseCache:
    """Upstream answers by question, each until its TTL runs out; least recently used evicted."""

    def __init__(self, capacity: int = CACHE_ENTRIES) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[CacheKey, _CacheEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey, now: float) -> _CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: CacheKey, entry: _CacheEntry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


class Resolver:
    """Answers queries: the tailnet's names locally, everything else through upstream resolvers."""

    def __init__(
        self,
        *,
        rng: random.Random,
        zone: MagicZone | None = None,
        host_config: HostDnsConfig | None = None,
        timeout: float | None = None,
        cache_entries: int = CACHE_ENTRIES,
    ) -> None:
        self.rng = rng
        self.zone = zone or MagicZone()
        self.counters: Counter[str] = Counter()
        self.cache = ResponseCache(cache_entries)
        #: Upstreams never to forward to: our own listening addresses (a resolv.conf that names
        #: this very server must not make a loop).
        self.excluded: set[Upstream] = set()
        self._timeout = timeout
        self._host = host_config or HostDnsConfig()
        self._lookups: dict[CacheKey, _Lookup] = {}
        self._exchanges: dict[int, _ExchangeState] = {}
        self._next_exchange = 1
        self._new_exchanges: list[Exchange] = []
        self._finished: list[int] = []
        self._replies: list[tuple[Client, bytes]] = []

    # -------------------------------------------------------------------------------- configuration

    def set_zone(self, zone: MagicZone) -> None:
        """Use a new zone (from a new network map). Local answers change at once; cached upstream
        answers are dropped when the split-DNS routes changed, since they may come from the wrong
        resolver now."""
        if zone.routes != self.zone.routes:
            self.cache.clear()
        self.zone = zone

    def set_host_config(self, config: HostDnsConfig) -> None:
        if config.nameservers != self._host.nameservers:
            self.cache.clear()
        self._host = config

    @property
    def host_config(self) -> HostDnsConfig:
        return self._host

    # -------------------------------------------------------------------------------- input

    def receive_query(self, data: bytes, client: Client, now: float) -> bytes | Pending | None:
        """Answer ``data``: the answer's bytes, :data:`PENDING` (it comes later from
        :meth:`pop_replies`), or None when the packet deserves no answer (not a query, no header).
        Never raises for anything the packet contains."""
        try:
            header = parse_header(data)
        except ParseError:
            self.counters["drop_malformed"] += 1
            return None
        if header.is_response:
            # Answering a response would let anyone make two servers talk to each other forever.
            self.counters["drop_response"] += 1
            return None
        self.counters["queries"] += 1
        if header.opcode != OPCODE_QUERY:
            self.counters["notimp"] += 1
            return header_only(header, RCODE_NOTIMP)
        try:
            query = parse_query(data)
        except QueryFormatError as exc:
            self.counters["formerr"] += 1
            return header_only(exc.header, RCODE_FORMERR)
        except ParseError:  # pragma: no cover - parse_query wraps everything after the header
            return header_only(header, RCODE_FORMERR)
        return self._answer(query, client, now)

    def receive_upstream(self, exchange_id: int, data: bytes, now: float) -> bool:
        """A message from the upstream of exchange ``exchange_id``. Returns True when that
        exchange is over (the driver stops listening); False to keep waiting, e.g. after a
        datagram that does not answer our question (a spoofing attempt or a late duplicate)."""
        exchange = self._exchanges.get(exchange_id)
        if exchange is None:
            return True
        lookup = exchange.lookup
        try:
            message = parse_message(data)
        except ParseError:
            message = None
        if message is None or not self._matches(message, exchange):
            self.counters["upstream_mismatch"] += 1
            if exchange.transport == "tcp":
                self._next_try(lookup, now)
                return True
            return False
        if message.truncated and exchange.transport == "udp":
            # RFC 7766 §5: the whole answer is to be had over TCP from the same server.
            self.counters["upstream_truncated"] += 1
            self._finish_exchange(exchange)
            self._send(lookup, exchange.upstream, "tcp", now)
            return True
        rcode = message.rcode
        if rcode in (RCODE_NOERROR, RCODE_NXDOMAIN):
            self._complete(lookup, data, message, now)
            return True
        # SERVFAIL, REFUSED, FORMERR, NOTIMP...: this server cannot help; maybe the next can.
        self.counters[f"upstream_rcode_{rcode}"] += 1
        self._next_try(lookup, now)
        return True

    def exchange_failed(self, exchange_id: int, now: float) -> None:
        """The driver could not send or receive (port unreachable, connection refused)."""
        exchange = self._exchanges.get(exchange_id)
        if exchange is not None:
            self.counters["upstream_error"] += 1
            self._next_try(exchange.lookup, now)

    def handle_timeout(self, now: float) -> None:
        for exchange in [e for e in self._exchanges.values() if e.deadline <= now]:
            if exchange.id in self._exchanges:
                self.counters["upstream_timeout"] += 1
                self._next_try(exchange.lookup, now)

    # -------------------------------------------------------------------------------- output

    def next_deadline(self) -> float | None:
        return min((e.deadline for e in self._exchanges.values()), default=None)

    def pop_exchanges(self) -> list[Exchange]:
        """Queries to send upstream, each to be reported on with its ``id``."""
        out, self._new_exchanges = self._new_exchanges, []
        return out

    def pop_finished(self) -> list[int]:
        """Exchanges that are over (answered, timed out, superseded): stop listening for them."""
        out, self._finished = self._finished, []
        return out

    def pop_replies(self) -> list[tuple[Client, bytes]]:
        """Answers to queries that were :data:`PENDING`."""
        out, self._replies = self._replies, []
        return out

    @property
    def in_flight(self) -> int:
        return len(self._lookups)

    # -------------------------------------------------------------------------------- answering

    def _answer(self, query: Query, client: Client, now: float) -> bytes | Pending | None:
        question = query.question
        if query.edns is not None and query.edns.version > 0:
            return self._build(query, client, RCODE_BADVERS)
        if question.qtype == TYPE_OPT:
            return self._build(query, client, RCODE_FORMERR)
        if question.qtype in (TYPE_AXFR, TYPE_IXFR):
            self.counters["refused"] += 1
            return self._build(query, client, RCODE_REFUSED)
        if question.qclass not in (CLASS_IN, CLASS_ANY):
            self.counters["refused"] += 1
            return self._build(query, client, RCODE_REFUSED)
        local = self.zone.lookup(question.name, question.qtype, internal=client.transport == "internal")
        if local is not None:
            self.counters["local"] += 1
            return self._build(query, client, local.rcode, local.answer, local.authority, authoritative=True)
        route = self.zone.route(question.name)
        if route is not None and not route.upstreams:
            # An admin routed this domain to nowhere: it exists only in the tailnet.
            return self._build(query, client, RCODE_NXDOMAIN, authoritative=True)
        if client.recursion is not Recursion.ALL and (route is None or client.recursion is Recursion.NONE):
            # Not an open resolver: the host's resolvers serve the node itself and loopback
            # clients (and peers only where the node opts in); split DNS serves peers too.
            self.counters["refused"] += 1
            return self._build(query, client, RCODE_REFUSED)
        if question.qtype == TYPE_ANY and client.transport == "udp":
            # RFC 8482: ANY over UDP is a favourite of amplification attacks; answer it here
            # with the synthesized HINFO instead of relaying whatever an upstream has.
            self.counters["any_minimal"] += 1
            return self._build(query, client, RCODE_NOERROR, (rfc8482_hinfo(question.name),))
        upstreams = [
            u for u in (route.upstreams if route else self._host.nameservers) if u not in self.excluded
        ]
        key: CacheKey = (
            lower_name(question.name),
            question.qtype,
            question.qclass,
            query.dnssec_ok,
            query.checking_disabled,
        )
        entry = self.cache.get(key, now)
        if entry is not None:
            self.counters["cache_hit"] += 1
            return self._cached_answer(query, client, entry, now)
        lookup = self._lookups.get(key)
        if lookup is not None:
            if len(lookup.waiters) >= MAX_WAITERS:
                self.counters["drop_waiters_full"] += 1
                return None if client.transport == "udp" else self._build(query, client, RCODE_SERVFAIL)
            self.counters["coalesced"] += 1
            lookup.waiters.append((client, query))
            return PENDING
        if not upstreams:
            self.counters["servfail_no_upstream"] += 1
            return self._build(query, client, RCODE_SERVFAIL)
        if len(self._lookups) >= MAX_LOOKUPS:
            self.counters["servfail_overload"] += 1
            return self._build(query, client, RCODE_SERVFAIL)
        self.counters["forwarded"] += 1
        attempts = max(1, self._host.attempts if route is None else 2)
        start = self.rng.randrange(len(upstreams)) if self._host.rotate and route is None else 0
        ordered = upstreams[start:] + upstreams[:start]
        lookup = _Lookup(key, ordered * attempts, now, [(client, query)])
        self._lookups[key] = lookup
        self._next_try(lookup, now)
        return PENDING

    def _build(
        self,
        query: Query,
        client: Client,
        rcode: int,
        answer: tuple[RR, ...] = (),
        authority: tuple[RR, ...] = (),
        *,
        authoritative: bool = False,
    ) -> bytes:
        """Our own answer to ``query``, built with dnslib, truncated when it does not fit."""
        question = query.question
        header = DNSHeader(
            id=query.id,
            qr=1,
            opcode=OPCODE_QUERY,
            aa=int(authoritative),
            rd=int(query.recursion_desired),
            ra=1,
            cd=int(query.checking_disabled),
            rcode=rcode & 0xF,
        )
        record = DNSRecord(
            header,
            questions=[DNSQuestion(DNSLabel(question.name), question.qtype, question.qclass)],
            rr=list(answer),
            auth=list(authority),
        )
        if query.edns is not None:
            record.add_ar(
                EDNS0(udp_len=EDNS_UDP_SIZE, ext_rcode=rcode >> 4, flags="do" if query.dnssec_ok else "")
            )
        data = bytes(record.pack())
        return self._fit(query, client, data, rcode, authoritative)

    def _fit(self, query: Query, client: Client, data: bytes, rcode: int, authoritative: bool) -> bytes:
        if client.transport != "udp" or len(data) <= query.max_udp_size():
            return data
        # RFC 2181 §9 / RFC 7766: the client retries over TCP on TC; an empty answer section
        # is what it can use meanwhile (and what every stub expects).
        self.counters["truncated"] += 1
        flags = FLAG_QR | FLAG_RA | FLAG_TC | (query.header.flags & (FLAG_RD | FLAG_CD)) | (rcode & 0xF)
        if authoritative:
            flags |= FLAG_AA
        opt = b""
        if query.edns is not None:
            opt = opt_record(EDNS_UDP_SIZE, ext_rcode=rcode >> 4, flags=query.edns.flags & EDNS_FLAG_DO)
        question = query.question
        return (
            HEADER.pack(query.id, flags, 1, 0, 0, 1 if opt else 0)
            + encode_name(question.name)
            + QUESTION_TAIL.pack(question.qtype, question.qclass)
            + opt
        )

    def _cached_answer(self, query: Query, client: Client, entry: _CacheEntry, now: float) -> bytes:
        if entry.message is None:
            return self._build(query, client, RCODE_SERVFAIL)
        # Round the age up: a TTL handed out must never outlast the original (RFC 2181 §8).
        return self._adapt(query, client, entry.data, entry.message, math.ceil(now - entry.stored_at))

    def _adapt(self, query: Query, client: Client, data: bytes, message: Message, age: int) -> bytes:
        """An upstream's answer, made ours for one client: its ID, its spelling of the name, its
        flags, TTLs aged by the time spent in the cache, an OPT record only if it sent one."""
        out = bytearray(data)
        keep = message.header.flags & (0x7800 | FLAG_AD | 0xF)
        if not (query.dnssec_ok or query.header.flags & FLAG_AD):
            keep &= ~FLAG_AD  # RFC 6840 §5.8: AD only for clients that asked about DNSSEC
        flags = FLAG_QR | FLAG_RA | keep | (query.header.flags & (FLAG_RD | FLAG_CD))
        struct.pack_into("!HH", out, 0, query.id, flags)
        asked = encode_name(query.question.name)
        if out[12] & 0xC0 == 0 and lower_name(message.questions[0].name) == lower_name(query.question.name):
            out[12 : 12 + len(asked)] = asked  # same length: the names differ in case at most
        for record in message.records:
            if record.rtype != TYPE_OPT:
                struct.pack_into("!I", out, record.ttl_offset, max(0, record.ttl - age))
        opts = [r for r in message.records if r.rtype == TYPE_OPT]
        if query.edns is None:
            result = without_records(bytes(out), message, opts) if opts else bytes(out)
        elif opts:
            struct.pack_into("!H", out, opts[0].start + 3, EDNS_UDP_SIZE)
            result = bytes(out)
        else:
            struct.pack_into("!H", out, 10, message.header.arcount + 1)
            result = bytes(out) + opt_record(EDNS_UDP_SIZE, flags=query.edns.flags & EDNS_FLAG_DO)
        return self._fit(query, client, result, message.rcode, False)

    # -------------------------------------------------------------------------------- forwarding

    def _next_try(self, lookup: _Lookup, now: float) -> None:
        if lookup.exchange is not None:
            current = self._exchanges.get(lookup.exchange)
            if current is not None:
                self._finish_exchange(current)
        if lookup.next_try >= len(lookup.tries) or now - lookup.started >= MAX_LOOKUP_TIME:
            self._fail(lookup, now)
            return
        upstream = lookup.tries[lookup.next_try]
        lookup.next_try += 1
        self._send(lookup, upstream, "udp", now)

    def _send(self, lookup: _Lookup, upstream: Upstream, transport: str, now: float) -> None:
        name, qtype, qclass, dnssec_ok, checking_disabled = lookup.key
        message_id = self.rng.randrange(0x10000)
        flags = FLAG_RD | (FLAG_CD if checking_disabled else 0)
        data = (
            HEADER.pack(message_id, flags, 1, 0, 0, 1)
            + encode_name(name)
            + QUESTION_TAIL.pack(qtype, qclass)
            + opt_record(EDNS_UDP_SIZE, flags=EDNS_FLAG_DO if dnssec_ok else 0)
        )
        timeout = self._timeout or self._host.timeout or DEFAULT_TIMEOUT
        exchange = _ExchangeState(
            self._next_exchange,
            lookup,
            upstream,
            transport,
            message_id,
            now + (timeout if transport == "udp" else 2 * timeout),
        )
        self._next_exchange += 1
        self._exchanges[exchange.id] = exchange
        lookup.exchange = exchange.id
        self._new_exchanges.append(Exchange(exchange.id, upstream, transport, data))
        logger.debug(
            "asking %s about %s (%s) over %s", upstream, name_to_text(name), _type_name(qtype), transport
        )

    def _matches(self, message: Message, exchange: _ExchangeState) -> bool:
        header = message.header
        if not header.is_response or header.id != exchange.message_id or header.opcode != OPCODE_QUERY:
            return False
        if len(message.questions) != 1:
            return False
        question = message.questions[0]
        name, qtype, qclass = exchange.lookup.key[:3]
        return lower_name(question.name) == name and question.qtype == qtype and question.qclass == qclass

    def _complete(self, lookup: _Lookup, data: bytes, message: Message, now: float) -> None:
        ttl = _cache_ttl(data, message)
        if ttl:
            self.cache.put(lookup.key, _CacheEntry(data, message, now, now + ttl))
        self._finish_lookup(lookup)
        for client, query in lookup.waiters:
            self._replies.append((client, self._adapt(query, client, data, message, 0)))

    def _fail(self, lookup: _Lookup, now: float) -> None:
        self.counters["servfail"] += 1
        logger.debug("no upstream answered about %s", name_to_text(lookup.key[0]))
        self.cache.put(lookup.key, _CacheEntry(b"", None, now, now + FAILURE_TTL))
        self._finish_lookup(lookup)
        for client, query in lookup.waiters:
            self._replies.append((client, self._build(query, client, RCODE_SERVFAIL)))

    def _finish_lookup(self, lookup: _Lookup) -> None:
        if lookup.exchange is not None:
            exchange = self._exchanges.get(lookup.exchange)
            if exchange is not None:
                self._finish_exchange(exchange)
        if self._lookups.get(lookup.key) is lookup:
            del self._lookups[lookup.key]

    def _finish_exchange(self, exchange: _ExchangeState) -> None:
        if self._exchanges.pop(exchange.id, None) is not None:
            self._finished.append(exchange.id)
        if exchange.lookup.exchange == exchange.id:
            exchange.lookup.exchange = None


def _cache_ttl(data: bytes, message: Message) -> int | None:
    """How long an upstream answer may be kept: the smallest TTL of its answer and authority
    records; for a negative answer (NXDOMAIN, or NOERROR without answers) the SOA's TTL capped by
    its MINIMUM (RFC 2308 §5). None when it must not be cached: a negative answer without SOA, a
    truncated or failed one."""
    if message.truncated or message.rcode not in (RCODE_NOERROR, RCODE_NXDOMAIN):
        return None
    answers = message.section(1)
    if answers and message.rcode == RCODE_NOERROR:
        ttls = [r.ttl for r in (*answers, *message.section(2)) if r.rtype != TYPE_OPT]
        return min([*ttls, MAX_CACHE_TTL])
    for record in message.section(2):
        if record.rtype == TYPE_SOA and record.rdata_length >= 22:
            # MINIMUM is the SOA's last field; its names may be compressed, so read from the end.
            end = record.rdata_offset + record.rdata_length
            (minimum,) = struct.unpack_from("!I", data, end - 4)
            return min(record.ttl, int(minimum), MAX_CACHE_TTL)
    return None


def _type_name(qtype: int) -> str:
    name = QTYPE.forward.get(qtype)
    return str(name) if name is not None else f"TYPE{qtype}"
