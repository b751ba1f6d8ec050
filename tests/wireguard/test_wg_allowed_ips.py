from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

from hypothesis import given
from hypothesis import strategies as st

from embedmesh.wireguard.allowedips import AllowedIPs


def test_longest_prefix_wins_and_insert_moves() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("10.0.0.0/8", "wide")
    table.insert("10.1.0.0/16", "narrow")
    table.insert("0.0.0.0/0", "default")
    table.insert("fd7a::/16", "v6")
    assert table.lookup(IPv4Address("10.1.2.3").packed) == "narrow"
    assert table.lookup(IPv4Address("10.2.2.3").packed) == "wide"
    assert table.lookup(IPv4Address("8.8.8.8").packed) == "default"
    assert table.lookup(IPv6Address("fd7a::1").packed) == "v6"
    assert table.lookup(IPv6Address("fd7b::1").packed) is None
    table.insert("10.1.0.0/16", "moved")
    assert table.lookup(IPv4Address("10.1.2.3").packed) == "moved"
    table.remove_value("moved")
    assert table.lookup(IPv4Address("10.1.2.3").packed) == "wide"


def test_host_bits_are_masked() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("192.0.2.77/24", "x")
    assert table.networks_of("x") == [ip_network("192.0.2.0/24")]


v4_nets = st.builds(
    lambda a, p: IPv4Network((a, p), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)
)
v6_nets = st.builds(
    lambda a, p: IPv6Network((a, p), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128)
)


@given(
    st.lists(st.tuples(st.one_of(v4_nets, v6_nets), st.integers(0, 5)), max_size=30),
    st.lists(
        st.one_of(st.integers(0, 2**32 - 1).map(IPv4Address), st.integers(0, 2**128 - 1).map(IPv6Address)),
        max_size=30,
    ),
)
def test_matches_brute_force(
    entries: list[tuple[IPv4Network | IPv6Network, int]], probes: list[IPv4Address | IPv6Address]
) -> None:
    table: AllowedIPs[int] = AllowedIPs()
    model: dict[IPv4Network | IPv6Network, int] = {}
    for net, value in entries:
        table.insert(net, value)
        model[net] = value
    # Probe the inserted networks' own addresses too, so matches are common.
    for address in [*probes, *(n.network_address for n in model)]:
        matching = [n for n in model if n.version == address.version and address in n]
        expected = model[max(matching, key=lambda n: n.prefixlen)] if matching else None
        assert table.lookup(address.packed) == expected
