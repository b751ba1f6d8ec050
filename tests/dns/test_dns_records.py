"""The MagicDNS zone: names, reverse names, extra records and routes from a network map."""

from __future__ import annotations

from ipaddress import ip_address

from tests.dns.dns_harness import AdminDNSConfig, renamed, standard_map, without

from embedmesh.dns.message import (
    TYPE_A,
    TYPE_AAAA,
    TYPE_ANY,
    TYPE_MX,
    TYPE_PTR,
    TYPE_SOA,
    TYPE_TXT,
    text_to_name,
)
from embedmesh.dns.records import MagicZone, reverse_name, reverse_to_address
from embedmesh.dns.upstream import Upstream


def rdatas(answer) -> list[str]:  # type: ignore[no-untyped-def]
    return [f"{rr.rname} {rr.rdata}" for rr in answer]


def test_short_names_and_fqdns_case_insensitive() -> None:
    zone = MagicZone.from_netmap(standard_map())
    for name in ("db", "DB", "db.mesh.internal", "Db.Mesh.Internal."):
        found = zone.lookup(text_to_name(name), TYPE_A)
        assert found is not None and found.rcode == 0
        assert [str(rr.rdata) for rr in found.answer] == ["100.64.0.2"]
    # The owner is spelled as asked (0x20-style clients compare it).
    answer = zone.lookup(text_to_name("Db.Mesh.Internal"), TYPE_A)
    assert answer is not None and str(answer.answer[0].rname) == "Db.Mesh.Internal."


def test_aaaa_any_and_nodata() -> None:
    zone = MagicZone.from_netmap(standard_map())
    aaaa = zone.lookup(text_to_name("db"), TYPE_AAAA)
    assert aaaa is not None and [str(r.rdata) for r in aaaa.answer] == ["fd7a:115c:a1e0::6440:2"]
    # ANY (RFC 8482): the smallest RRset, the A record, not A and AAAA together.
    minimal = zone.lookup(text_to_name("db"), TYPE_ANY)
    assert minimal is not None and [(r.rtype, str(r.rdata)) for r in minimal.answer] == [(TYPE_A, "100.64.0.2")]
    nodata = zone.lookup(text_to_name("web.mesh.internal"), TYPE_AAAA)  # web has no IPv6
    assert nodata is not None and nodata.rcode == 0 and not nodata.answer
    assert nodata.authority[0].rtype == TYPE_SOA
    mx = zone.lookup(text_to_name("db"), TYPE_MX)
    assert mx is not None and mx.rcode == 0 and not mx.answer


def test_the_node_itself_is_in_the_zone() -> None:
    zone = MagicZone.from_netmap(standard_map())
    me = zone.lookup(text_to_name("me.mesh.internal"), TYPE_A)
    assert me is not None and [str(r.rdata) for r in me.answer] == ["100.64.0.1"]


def test_unknown_names_under_the_base_domain_are_nxdomain_with_soa() -> None:
    zone = MagicZone.from_netmap(standard_map())
    for name in ("nope.mesh.internal", "x.db.mesh.internal"):
        found = zone.lookup(text_to_name(name), TYPE_A)
        assert found is not None and found.rcode == 3
        soa = found.authority[0]
        assert soa.rtype == TYPE_SOA and str(soa.rname) == "mesh.internal." and soa.rdata.times[4] == 5
    apex = zone.lookup(text_to_name("mesh.internal"), TYPE_SOA)
    assert apex is not None and apex.rcode == 0 and apex.answer[0].rtype == TYPE_SOA


def test_other_names_are_not_ours() -> None:
    zone = MagicZone.from_netmap(standard_map())
    assert zone.lookup(text_to_name("example.com"), TYPE_A) is None
    assert zone.lookup(text_to_name("internal"), TYPE_A) is None
    assert zone.lookup(text_to_name("printer"), TYPE_A) is None  # not a node: forwarded


def test_reverse_names() -> None:
    zone = MagicZone.from_netmap(standard_map())
    v4 = zone.lookup(reverse_name(ip_address("100.64.0.2")), TYPE_PTR)
    assert v4 is not None and [str(r.rdata) for r in v4.answer] == ["db.mesh.internal."]
    v6 = zone.lookup(reverse_name(ip_address("fd7a:115c:a1e0::6440:2")), TYPE_PTR)
    assert v6 is not None and [str(r.rdata) for r in v6.answer] == ["db.mesh.internal."]
    unknown = zone.lookup(reverse_name(ip_address("100.64.9.9")), TYPE_PTR)
    assert unknown is not None and unknown.rcode == 3  # the tailnet range is ours
    unknown6 = zone.lookup(reverse_name(ip_address("fd7a:115c:a1e0::1234")), TYPE_PTR)
    assert unknown6 is not None and unknown6.rcode == 3
    assert zone.lookup(reverse_name(ip_address("192.0.2.1")), TYPE_PTR) is None  # forwarded
    assert zone.lookup(text_to_name("64.100.in-addr.arpa"), TYPE_PTR) is None
    assert reverse_to_address(text_to_name("1.0.64.100.in-addr.arpa")) == ip_address("100.64.0.1")
    assert reverse_to_address(text_to_name("01.0.64.100.in-addr.arpa")) is None
    assert reverse_to_address(text_to_name("256.0.64.100.in-addr.arpa")) is None


def test_rename_and_removal_leave_nothing_behind() -> None:
    m = standard_map()
    zone = MagicZone.from_netmap(renamed(m, 2, "postgres"))
    old = zone.lookup(text_to_name("db"), TYPE_A)
    assert old is None  # a single label that is not a node any more is forwarded
    gone = zone.lookup(text_to_name("db.mesh.internal"), TYPE_A)
    assert gone is not None and gone.rcode == 3
    new = zone.lookup(text_to_name("postgres.mesh.internal"), TYPE_A)
    assert new is not None and [str(r.rdata) for r in new.answer] == ["100.64.0.2"]
    ptr = zone.lookup(reverse_name(ip_address("100.64.0.2")), TYPE_PTR)
    assert ptr is not None and str(ptr.answer[0].rdata) == "postgres.mesh.internal."
    removed = MagicZone.from_netmap(without(m, 3))
    assert removed.lookup(text_to_name("web.mesh.internal"), TYPE_A).rcode == 3  # type: ignore[union-attr]
    assert removed.lookup(reverse_name(ip_address("100.64.0.3")), TYPE_PTR).rcode == 3  # type: ignore[union-attr]


def test_extra_records_and_split_routes() -> None:
    config = AdminDNSConfig(
        base_domain="corp.ts",
        search_domains=("corp.ts", "lab.example"),
        extra_records=(
            ("grafana", "A", "100.64.0.3"),
            ("alias.corp.ts", "CNAME", "db.corp.ts"),
            ("status.example.org", "TXT", "all good"),
            ("mail.example.org", "MX", "10 mx.example.org."),
            ("broken", "A", "not-an-address"),
        ),
        split_dns={"lab.example": ("127.0.0.1:5300",), "deep.lab.example": ("[::1]:53",), "hidden.test": ()},
    )
    zone = MagicZone.from_netmap(standard_map(config))
    grafana = zone.lookup(text_to_name("grafana.corp.ts"), TYPE_A)
    assert grafana is not None and [str(r.rdata) for r in grafana.answer] == ["100.64.0.3"]
    alias = zone.lookup(text_to_name("alias.corp.ts"), TYPE_A)
    assert alias is not None and rdatas(alias.answer) == [
        "alias.corp.ts. db.corp.ts.",
        "db.corp.ts. 100.64.0.2",
    ]
    txt = zone.lookup(text_to_name("status.example.org"), TYPE_TXT)
    assert txt is not None and [str(r.rdata) for r in txt.answer] == ['"all good"']
    mx = zone.lookup(text_to_name("mail.example.org"), TYPE_MX)
    assert mx is not None and str(mx.answer[0].rdata) == "10 mx.example.org."
    assert zone.lookup(text_to_name("broken.corp.ts"), TYPE_A).rcode == 3  # type: ignore[union-attr]
    assert zone.route(text_to_name("x.lab.example")).upstreams == (Upstream("127.0.0.1", 5300),)  # type: ignore[union-attr]
    assert zone.route(text_to_name("a.deep.lab.example")).upstreams == (Upstream("::1", 53),)  # type: ignore[union-attr]
    assert zone.route(text_to_name("hidden.test")).upstreams == ()  # type: ignore[union-attr]
    assert zone.route(text_to_name("example.com")) is None
    assert zone.search_domains == ("corp.ts", "lab.example")
    assert zone.addresses_of("grafana") == (ip_address("100.64.0.3"),)


def test_magic_dns_off_hides_node_names_from_clients_only() -> None:
    zone = MagicZone.from_netmap(standard_map(AdminDNSConfig(magic_dns=False)))
    assert zone.lookup(text_to_name("db.mesh.internal"), TYPE_A).rcode == 3  # type: ignore[union-attr]
    internal = zone.lookup(text_to_name("db.mesh.internal"), TYPE_A, internal=True)
    assert internal is not None and internal.answer


def test_the_network_maps_own_dns_config_form() -> None:
    """DNSConfig carries split DNS as ((domain, (resolver, ...)), ...), not a mapping."""
    from embedmesh.control.netmap import DNSConfig

    config = DNSConfig(
        "corp.ts",
        True,
        ("corp.ts", "lab.example"),
        extra_records=(("grafana", "A", "100.64.0.3"), ("wiki.corp.ts", "AAAA", "fd7a:115c:a1e0::9")),
        split_dns=(("lab.example", ("127.0.0.1:5300", "[::1]:5300")), ("bad", ("not-an-address",))),
    )
    zone = MagicZone.from_netmap(standard_map(config))
    assert zone.addresses_of("grafana") == (ip_address("100.64.0.3"),)
    assert zone.addresses_of("wiki.corp.ts") == (ip_address("fd7a:115c:a1e0::9"),)
    route = zone.route(text_to_name("nas.lab.example"))
    assert route is not None and route.upstreams == (Upstream("127.0.0.1", 5300), Upstream("::1", 5300))
    assert zone.route(text_to_name("x.bad")) is None  # a malformed route is skipped, not fatal
