"""The resolver core on virtual time: local answers, forwarding, caching, failures, policy, sizes."""

from __future__ import annotations

import struct
from collections.abc import Callable

import dns.flags
import dns.message
import dns.rcode
import pytest
from tests.dns.dns_harness import (
    AdminDNSConfig,
    answers,
    parse,
    query,
    renamed,
    rng,
    standard_map,
    without,
    zone_handler,
)

from embedmesh.dns.message import encode_name
from embedmesh.dns.records import MagicZone
from embedmesh.dns.resolver import FAILURE_TTL, PENDING, Client, Exchange, Recursion, Resolver
from embedmesh.dns.upstream import HostDnsConfig, Upstream

UP1 = Upstream("192.0.2.53", 53)
UP2 = Upstream("192.0.2.54", 53)
UDP = Client(1, "udp", Recursion.ALL)
STRANGER = Client(2, "udp", Recursion.NONE)
PEER = Client(4, "udp", Recursion.ROUTES)
TCP = Client(3, "tcp", Recursion.ALL)

EXAMPLE = zone_handler(
    {
        ("example.com", "A"): ["93.184.216.34"],
        ("example.com", "AAAA"): ["2606:2800:220:1:248:1893:25c8:1946"],
        ("big.example.com", "TXT"): [f'"{i:03d}{"x" * 200}"' for i in range(10)],
        ("db.lab.example", "A"): ["10.1.0.5"],
    },
    ttl=60,
    soa_minimum=30,
)


def make(**kw: object) -> Resolver:
    resolver = Resolver(rng=rng(), host_config=HostDnsConfig((UP1, UP2)), **kw)  # type: ignore[arg-type]
    resolver.set_zone(MagicZone.from_netmap(standard_map()))
    return resolver


def ask(resolver: Resolver, data: bytes, client: Client = UDP, now: float = 0.0) -> dns.message.Message:
    reply = resolver.receive_query(data, client, now)
    assert isinstance(reply, bytes), reply
    return parse(reply)


def serve(
    resolver: Resolver, handler: Callable[[dns.message.Message], dns.message.Message | None], now: float
) -> list[Exchange]:
    """Answer every pending exchange with ``handler`` (None: stay silent); return the exchanges."""
    sent = resolver.pop_exchanges()
    for exchange in sent:
        reply = handler(dns.message.from_wire(exchange.data))
        if reply is not None:
            resolver.receive_upstream(exchange.id, reply.to_wire(max_size=65535), now)
    return sent


def replies(resolver: Resolver) -> dict[int, dns.message.Message]:
    return {client.id: parse(data) for client, data in resolver.pop_replies()}


# ------------------------------------------------------------------------------------------ local


def test_tailnet_names_are_answered_locally_and_authoritatively() -> None:
    resolver = make()
    reply = ask(resolver, query("db", "A"))
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
    assert answers(reply) == ["db. A 100.64.0.2"]
    assert answers(ask(resolver, query("DB.mesh.internal", "AAAA"))) == [
        "DB.mesh.internal. AAAA fd7a:115c:a1e0::6440:2"
    ]
    assert answers(ask(resolver, query("2.0.64.100.in-addr.arpa", "PTR"))) == [
        "2.0.64.100.in-addr.arpa. PTR db.mesh.internal."
    ]
    missing = ask(resolver, query("nope.mesh.internal", "A"))
    assert missing.rcode() == dns.rcode.NXDOMAIN and missing.authority[0].ttl == 5
    assert not resolver.pop_exchanges()


def test_local_answers_need_no_forwarding_permission() -> None:
    resolver = make()
    assert answers(ask(resolver, query("web.mesh.internal", "A"), STRANGER)) == [
        "web.mesh.internal. A 100.64.0.3"
    ]


def test_a_new_map_changes_answers_at_once() -> None:
    resolver = make()
    m = standard_map()
    resolver.set_zone(MagicZone.from_netmap(renamed(m, 2, "postgres")))
    assert ask(resolver, query("db.mesh.internal", "A")).rcode() == dns.rcode.NXDOMAIN
    assert answers(ask(resolver, query("postgres", "A"))) == ["postgres. A 100.64.0.2"]
    resolver.set_zone(MagicZone.from_netmap(without(m, 3)))
    assert ask(resolver, query("web.mesh.internal", "A")).rcode() == dns.rcode.NXDOMAIN


# ------------------------------------------------------------------------------------------ forwarding


def test_forwarded_answer_is_cached_with_aging_ttls() -> None:
    resolver = make()
    assert resolver.receive_query(query("example.com", "A"), UDP, 0.0) is PENDING
    (exchange,) = serve(resolver, EXAMPLE, 0.0)
    assert exchange.upstream == UP1 and exchange.transport == "udp"
    assert resolver.pop_finished() == [exchange.id]
    first = replies(resolver)[UDP.id]
    assert answers(first) == ["example.com. A 93.184.216.34"]
    assert first.answer[0].ttl == 60 and not first.flags & dns.flags.AA and first.flags & dns.flags.RA
    # From the cache 25 s later: no upstream query, the TTL has aged.
    again = ask(resolver, query("EXAMPLE.com", "A"), UDP, 25.0)
    assert again.answer[0].ttl == 35 and str(again.question[0].name) == "EXAMPLE.com."
    assert not resolver.pop_exchanges()
    # Expired after 60 s: asked again.
    assert resolver.receive_query(query("example.com", "A"), UDP, 61.0) is PENDING
    assert len(resolver.pop_exchanges()) == 1


def test_identical_questions_in_flight_share_one_upstream_query() -> None:
    resolver = make()
    clients = [Client(i, "udp") for i in range(10, 15)]
    for client in clients:
        data = bytearray(query("example.com", "A"))
        struct.pack_into("!H", data, 0, client.id)
        assert resolver.receive_query(bytes(data), client, 0.0) is PENDING
    sent = serve(resolver, EXAMPLE, 0.1)
    assert len(sent) == 1
    got = replies(resolver)
    assert sorted(got) == [c.id for c in clients]
    assert all(got[i].id == i for i in got)  # each client gets its own ID back


def test_negative_answers_are_cached_by_the_soa_minimum() -> None:
    resolver = make()
    resolver.receive_query(query("missing.example.com", "A"), UDP, 0.0)
    serve(resolver, EXAMPLE, 0.0)
    assert replies(resolver)[UDP.id].rcode() == dns.rcode.NXDOMAIN
    cached = ask(resolver, query("missing.example.com", "A"), UDP, 10.0)
    assert cached.rcode() == dns.rcode.NXDOMAIN and cached.authority[0].ttl == 50
    assert resolver.receive_query(query("missing.example.com", "A"), UDP, 31.0) is PENDING  # min(60, 30)


def test_silent_upstream_moves_on_to_the_next_then_servfail() -> None:
    resolver = make(timeout=1.0)
    resolver.receive_query(query("example.com", "A"), UDP, 0.0)
    tried = [e.upstream for e in serve(resolver, lambda q: None, 0.0)]
    assert resolver.next_deadline() == 1.0
    resolver.handle_timeout(1.0)
    tried += [e.upstream for e in serve(resolver, lambda q: None, 1.0)]
    for t in (2.0, 3.0):
        resolver.handle_timeout(t)
        tried += [e.upstream for e in serve(resolver, lambda q: None, t)]
    assert not replies(resolver)
    resolver.handle_timeout(4.0)
    assert tried == [UP1, UP2, UP1, UP2]  # attempts (2) x servers, glibc order
    assert replies(resolver)[UDP.id].rcode() == dns.rcode.SERVFAIL
    assert resolver.next_deadline() is None and resolver.in_flight == 0
    # The failure is cached briefly (RFC 9520), then retried.
    assert ask(resolver, query("example.com", "A"), UDP, 4.5).rcode() == dns.rcode.SERVFAIL
    assert resolver.receive_query(query("example.com", "A"), UDP, 4.0 + FAILURE_TTL) is PENDING


def test_servfail_and_refused_from_one_upstream_try_the_next() -> None:
    resolver = make()
    resolver.receive_query(query("example.com", "A"), UDP, 0.0)

    def refuse(q: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(q)
        reply.set_rcode(dns.rcode.REFUSED)
        return reply

    (first,) = serve(resolver, refuse, 0.0)
    (second,) = serve(resolver, EXAMPLE, 0.0)
    assert (first.upstream, second.upstream) == (UP1, UP2)
    assert answers(replies(resolver)[UDP.id]) == ["example.com. A 93.184.216.34"]


def test_spoofed_or_mismatched_answers_are_ignored() -> None:
    resolver = make()
    resolver.receive_query(query("example.com", "A"), UDP, 0.0)
    (exchange,) = resolver.pop_exchanges()
    upstream_query = dns.message.from_wire(exchange.data)
    wrong_id = EXAMPLE(upstream_query)
    assert wrong_id is not None
    wrong_id.id ^= 1
    assert resolver.receive_upstream(exchange.id, wrong_id.to_wire(), 0.0) is False
    other = EXAMPLE(dns.message.make_query("db.lab.example", "A", id=upstream_query.id))
    assert other is not None
    assert resolver.receive_upstream(exchange.id, other.to_wire(), 0.0) is False
    assert resolver.receive_upstream(exchange.id, b"\x00garbage", 0.0) is False
    assert not replies(resolver)
    good = EXAMPLE(upstream_query)
    assert good is not None
    assert resolver.receive_upstream(exchange.id, good.to_wire(), 0.0) is True
    assert answers(replies(resolver)[UDP.id]) == ["example.com. A 93.184.216.34"]
    assert resolver.counters["upstream_mismatch"] == 3


def test_truncated_upstream_answer_is_retried_over_tcp() -> None:
    resolver = make()
    resolver.receive_query(query("big.example.com", "TXT"), TCP, 0.0)

    def truncating(q: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(q)
        reply.flags |= dns.flags.TC
        return reply

    (udp,) = serve(resolver, truncating, 0.0)
    (tcp,) = serve(resolver, EXAMPLE, 0.0)
    assert udp.transport == "udp" and tcp.transport == "tcp" and tcp.upstream == udp.upstream
    assert len(replies(resolver)[TCP.id].answer[0]) == 10


def test_large_answers_are_truncated_for_udp_clients() -> None:
    resolver = make()
    resolver.receive_query(query("big.example.com", "TXT"), TCP, 0.0)
    serve(resolver, EXAMPLE, 0.0)
    replies(resolver)
    # Without EDNS: 512 bytes at most, TC set, empty answer; with EDNS 1232 is still too small.
    plain = resolver.receive_query(query("big.example.com", "TXT"), UDP, 1.0)
    assert isinstance(plain, bytes) and len(plain) <= 512
    message = parse(plain)
    assert message.flags & dns.flags.TC and not message.answer
    edns = resolver.receive_query(query("big.example.com", "TXT", edns=0, payload=4096), UDP, 1.0)
    assert isinstance(edns, bytes) and len(edns) <= 1232 and parse(edns).flags & dns.flags.TC
    assert parse(edns).edns == 0
    # Over TCP the whole answer.
    whole = ask(resolver, query("big.example.com", "TXT"), TCP, 1.0)
    assert len(whole.answer[0]) == 10 and not whole.flags & dns.flags.TC


def test_edns_is_answered_in_kind() -> None:
    resolver = make()
    resolver.receive_query(query("example.com", "A", edns=0), UDP, 0.0)
    serve(resolver, EXAMPLE, 0.0)
    with_edns = replies(resolver)[UDP.id]
    assert with_edns.edns == 0 and with_edns.payload == 1232
    plain = ask(resolver, query("example.com", "A"), UDP, 1.0)  # from the cache, which has an OPT
    assert plain.edns == -1 and answers(plain) == ["example.com. A 93.184.216.34"]
    local = ask(resolver, query("db", "A", edns=0, payload=4096))
    assert local.edns == 0 and local.payload == 1232
    badvers = ask(resolver, query("db", "A", edns=1))
    assert badvers.rcode() == dns.rcode.BADVERS and not badvers.answer


def test_strangers_get_no_recursion() -> None:
    resolver = make()
    refused = ask(resolver, query("example.com", "A"), STRANGER)
    assert refused.rcode() == dns.rcode.REFUSED and not resolver.pop_exchanges()


def test_peers_get_split_dns_but_not_the_host_resolvers() -> None:
    """Recursion.ROUTES (a peer at 100.100.100.100): the tailnet's names and its split-DNS routes;
    a name for the host's resolvers is REFUSED before anything is sent."""
    lab = Upstream("127.0.0.1", 5300)
    resolver = make()
    resolver.set_zone(MagicZone.from_netmap(standard_map(AdminDNSConfig(split_dns={"lab.example": (str(lab),)}))))
    assert answers(ask(resolver, query("db", "A"), PEER)) == ["db. A 100.64.0.2"]
    refused = ask(resolver, query("example.com", "A"), PEER)
    assert refused.rcode() == dns.rcode.REFUSED and not resolver.pop_exchanges()
    assert resolver.receive_query(query("db.lab.example", "A"), PEER, 0.0) is PENDING
    (exchange,) = serve(resolver, EXAMPLE, 0.0)
    assert exchange.upstream == lab
    assert answers(replies(resolver)[PEER.id]) == ["db.lab.example. A 10.1.0.5"]
    # A stranger on a host port gets no split DNS either; the node itself gets everything.
    assert ask(resolver, query("db.lab.example", "A"), STRANGER).rcode() == dns.rcode.REFUSED
    assert resolver.receive_query(query("example.com", "A"), UDP, 0.0) is PENDING


def test_any_gets_a_minimal_answer() -> None:
    """RFC 8482: ANY gets one RRset (the smallest) or the synthesized HINFO, and over UDP a name
    that would be forwarded gets the HINFO without any upstream being asked; over TCP it is
    forwarded as before."""
    resolver = make()
    assert answers(ask(resolver, query("db", "ANY"))) == ["db. A 100.64.0.2"]
    apex = ask(resolver, query("mesh.internal", "ANY"))
    assert answers(apex) == ['mesh.internal. HINFO "RFC8482" ""']
    missing = ask(resolver, query("nope.mesh.internal", "ANY"))
    assert missing.rcode() == dns.rcode.NXDOMAIN and not missing.authority  # no SOA for ANY
    assert ask(resolver, query("nope.mesh.internal", "A")).authority  # but for other types
    outside = ask(resolver, query("example.com", "ANY"))
    assert answers(outside) == ['example.com. HINFO "RFC8482" ""'] and not resolver.pop_exchanges()
    assert resolver.receive_query(query("example.com", "ANY"), TCP, 0.0) is PENDING


def test_split_dns_routes_and_local_only_domains() -> None:
    lab = Upstream("127.0.0.1", 5300)
    config = AdminDNSConfig(split_dns={"lab.example": (str(lab),), "corp.test": ()})
    resolver = make()
    resolver.set_zone(MagicZone.from_netmap(standard_map(config)))
    resolver.receive_query(query("db.lab.example", "A"), UDP, 0.0)
    (exchange,) = serve(resolver, EXAMPLE, 0.0)
    assert exchange.upstream == lab
    assert answers(replies(resolver)[UDP.id]) == ["db.lab.example. A 10.1.0.5"]
    nowhere = ask(resolver, query("x.corp.test", "A"))
    assert nowhere.rcode() == dns.rcode.NXDOMAIN and not resolver.pop_exchanges()


def test_no_upstream_at_all_is_servfail_at_once() -> None:
    resolver = Resolver(rng=rng())
    assert ask(resolver, query("example.com", "A")).rcode() == dns.rcode.SERVFAIL
    resolver.set_host_config(HostDnsConfig((UP1,)))
    resolver.excluded.add(UP1)  # our own listening address: never forward to ourselves
    assert ask(resolver, query("example.org", "A")).rcode() == dns.rcode.SERVFAIL


# ------------------------------------------------------------------------------------------ hostile


def test_hostile_and_odd_queries() -> None:
    resolver = make()
    header = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    formerr = ask(resolver, header + b"\x05ab")
    assert formerr.rcode() == dns.rcode.FORMERR and formerr.id == 0x4242 and not formerr.question
    loop = ask(resolver, header + b"\x01a\xc0\x0c\x00\x01\x00\x01")
    assert loop.rcode() == dns.rcode.FORMERR
    assert resolver.receive_query(b"\x00" * 5, UDP, 0.0) is None  # no header: dropped
    response = bytearray(query("db", "A"))
    response[2] |= 0x80
    assert resolver.receive_query(bytes(response), UDP, 0.0) is None  # a response: never answered
    notify = bytearray(query("db", "A"))
    notify[2] = (notify[2] & 0x87) | (4 << 3)
    assert ask(resolver, bytes(notify)).rcode() == dns.rcode.NOTIMP
    assert ask(resolver, query("mesh.internal", "AXFR")).rcode() == dns.rcode.REFUSED
    assert ask(resolver, query("version.bind", "TXT", rdclass="CH")).rcode() == dns.rcode.REFUSED
    root = resolver.receive_query(query(".", "NS"), UDP, 0.0)
    assert root is PENDING  # the root is forwarded like any other name


@pytest.mark.parametrize("qtype", ["A", "AAAA", "PTR", "ANY", "SOA", "TXT"])
def test_every_local_answer_is_well_formed(qtype: str) -> None:
    resolver = make()
    for name in ("db", "web.mesh.internal", "mesh.internal", "nope.mesh.internal", "2.0.64.100.in-addr.arpa"):
        message = ask(resolver, query(name, qtype, edns=0))
        assert message.id and message.flags & dns.flags.QR
        assert str(message.question[0].name).rstrip(".") == name


def test_name_with_odd_bytes_round_trips() -> None:
    resolver = make()
    name = (b"a.b", b"c\x00d", b"mesh", b"internal")
    data = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + encode_name(name) + b"\x00\x01\x00\x01"
    reply = resolver.receive_query(data, UDP, 0.0)
    assert isinstance(reply, bytes)
    assert reply[12 : 12 + len(encode_name(name))] == encode_name(name)
