"""Hypothesis strategies for control messages and network maps (shared by the property tests)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from hypothesis import strategies as st

from embedmesh.control.messages import (
    DeltaMessage,
    ErrorMessage,
    FullMap,
    LoggedOut,
    RegisterResponse,
)
from embedmesh.control.netmap import (
    ALLOW_ALL,
    UNCHANGED,
    DNSChanged,
    DNSConfig,
    FilterChanged,
    FilterRule,
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

keys = st.binary(min_size=32, max_size=32)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
tags = st.lists(st.from_regex(r"tag:[a-z0-9][a-z0-9-]{0,8}", fullmatch=True), max_size=3, unique=True).map(
    tuple
)
texts = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF), max_size=20)
finite = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)
ports = st.integers(1, 65535)
ipv4s = st.integers(0, 2**32 - 1).map(IPv4Address)
ipv6s = st.integers(0, 2**128 - 1).map(IPv6Address)
endpoint = st.one_of(
    st.builds(lambda a, p: f"{a}:{p}", ipv4s, ports), st.builds(lambda a, p: f"[{a}]:{p}", ipv6s, ports)
)
endpoints = st.lists(endpoint, max_size=4).map(tuple)


@st.composite
def peers(draw: st.DrawFn) -> PeerInfo:
    v4 = draw(ipv4s)
    v6 = draw(ipv6s)
    name = draw(labels)
    return PeerInfo(
        id=draw(st.integers(1, 50)),
        node_key=draw(keys),
        disco_key=draw(keys),
        name=name,
        hostname=draw(texts),
        fqdn=f"{name}.mesh.internal",
        addresses=(v4, v6),
        allowed_ips=(IPv4Network(f"{v4}/32"), IPv6Network(f"{v6}/128")),
        endpoints=draw(endpoints),
        tags=draw(tags),
        user=draw(texts),
        os=draw(texts),
        online=draw(st.booleans()),
        last_seen=draw(st.none() | finite),
        authorized=draw(st.booleans()),
        key_expiry=draw(st.none() | finite),
        key_expired=draw(st.booleans()),
        ephemeral=draw(st.booleans()),
    )


dns_configs = st.builds(
    DNSConfig, labels.map(lambda s: s + ".internal"), st.booleans(), st.lists(labels, max_size=2).map(tuple)
)
filters = st.one_of(
    st.just(ALLOW_ALL),
    st.lists(
        st.builds(
            FilterRule,
            st.lists(st.sampled_from(["*", "100.64.0.1", "tag:web"]), min_size=1, max_size=2).map(tuple),
            st.lists(st.sampled_from(["*", "100.64.0.2"]), min_size=1, max_size=2).map(tuple),
            st.lists(st.tuples(st.integers(0, 100), st.integers(100, 65535)), max_size=2).map(tuple),
            st.lists(st.integers(0, 255), max_size=2).map(tuple),
        ),
        max_size=3,
    ).map(lambda rules: PacketFilter(tuple(rules))),
)


@st.composite
def changes(draw: st.DrawFn) -> PeerChange:
    fields = draw(
        st.sets(
            st.sampled_from(
                [
                    "node_key",
                    "disco_key",
                    "name",
                    "endpoints",
                    "tags",
                    "online",
                    "last_seen",
                    "key_expiry",
                    "os",
                ]
            ),
            min_size=1,
        )
    )
    values: dict[str, object] = {}
    generators = {
        "node_key": keys,
        "disco_key": keys,
        "name": labels,
        "endpoints": endpoints,
        "tags": tags,
        "online": st.booleans(),
        "last_seen": st.none() | finite,
        "key_expiry": st.none() | finite,
        "os": texts,
    }
    for name in fields:
        values[name] = draw(generators[name])
    return PeerChange(draw(st.integers(1, 50)), **values)  # type: ignore[arg-type]


ops = st.one_of(
    peers().map(PeerAdded),
    st.integers(1, 50).map(PeerRemoved),
    changes(),
    peers().map(SelfChanged),
    dns_configs.map(DNSChanged),
    filters.map(FilterChanged),
)


@st.composite
def netmaps(draw: st.DrawFn) -> NetworkMap:
    peer_list = draw(st.lists(peers(), max_size=5, unique_by=lambda p: p.id))
    return NetworkMap(draw(peers()), {p.id: p for p in peer_list}, draw(dns_configs), draw(filters))


server_messages = st.one_of(
    st.builds(RegisterResponse, st.integers(1, 2**40), st.sampled_from(list(NodeState)), texts),
    netmaps().map(FullMap),
    st.lists(ops, max_size=6).map(lambda o: DeltaMessage(MapDelta(tuple(o)))),
    st.just(LoggedOut()),
    st.builds(ErrorMessage, st.from_regex(r"[a-z_]{1,20}", fullmatch=True), texts),
)

__all__ = ["UNCHANGED", "netmaps", "ops", "peers", "server_messages"]
