"""tailcfg decoding and the client's map session: a real first map (recorded from headscale
v0.29.2), deltas applied by Go's rules, hostile JSON, and disco answers to pings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedmesh.control.netmap import NodeState
from embedmesh.errors import ParseError
from embedmesh.tailscale import tailcfg
from embedmesh.tailscale.keys import DiscoPrivate, NodePublic
from embedmesh.tailscale.mapsession import MapSession, MapSessionError

FIRST_MAP = (Path(__file__).parent / "vectors" / "headscale-v0.29.2-first-map.json").read_bytes()
NOW = 1_800_000_000.0


def _session() -> MapSession:
    session = MapSession()
    assert session.apply(tailcfg.parse_map_response(FIRST_MAP), NOW)
    return session


def test_headscales_first_map_becomes_the_nodes_network_map() -> None:
    document = json.loads(FIRST_MAP)
    netmap = _session().network_map(NOW)
    me = document["Node"]
    assert netmap.self_node.id == me["ID"]
    assert netmap.self_node.fqdn == me["Name"].rstrip(".")
    assert [str(a) for a in netmap.self_node.addresses] == [a.split("/")[0] for a in me["Addresses"]]
    assert netmap.state is NodeState.AUTHORIZED
    assert netmap.self_node.user == document["UserProfiles"][0]["LoginName"]
    assert sorted(netmap.peers) == sorted(p["ID"] for p in document["Peers"])
    for peer in document["Peers"]:
        info = netmap.peers[peer["ID"]]
        assert info.node_key == NodePublic.from_text(peer["Key"]).raw
        assert info.endpoints == tuple(peer["Endpoints"])
        assert [str(n) for n in info.allowed_ips] == peer["AllowedIPs"]
    assert netmap.dns.base_domain == me["Name"].rstrip(".").split(".", 1)[1]
    assert netmap.dns.magic_dns is document["DNSConfig"].get("Proxied", False)


def _peer(document: dict[str, object], node_id: int, **changes: object) -> dict[str, object]:
    peer = dict(document["Peers"][0])  # type: ignore[index]
    peer.update(ID=node_id, StableID=str(node_id), Name=f"p{node_id}.ts.test.", **changes)
    peer["Key"] = "nodekey:" + f"{node_id:02x}" * 32
    return peer


def test_deltas_follow_go_client_rules() -> None:
    document = json.loads(FIRST_MAP)
    session = _session()

    def apply(message: dict[str, object]) -> bool:
        return session.apply(tailcfg.parse_map_response(json.dumps(message).encode()), NOW)

    assert not apply({"KeepAlive": True})  # a keep-alive changes nothing
    assert apply({"PeersChanged": [_peer(document, 90)]})
    assert 90 in session.network_map(NOW).peers
    assert apply({"PeersChangedPatch": [{"NodeID": 90, "Endpoints": ["192.0.2.9:41641"]}, {"NodeID": 12345}]})
    assert session.network_map(NOW).peers[90].endpoints == ("192.0.2.9:41641",)
    assert apply({"OnlineChange": {"90": True}, "PeerSeenChange": {"90": False}})
    assert session.network_map(NOW).peers[90].online and session.network_map(NOW).peers[90].last_seen is None
    assert apply({"PeersRemoved": [90]})
    assert 90 not in session.network_map(NOW).peers
    # A full Peers list replaces everything, and the message's other peer deltas are ignored.
    assert apply({"Peers": [_peer(document, 7)], "PeersRemoved": [7]})
    assert list(session.network_map(NOW).peers) == [7]
    # Absent fields keep their value: DNS and the self node are still there.
    assert session.network_map(NOW).dns.base_domain
    # The server expiring the node: the node sees it in its own entry.
    me = dict(document["Node"], KeyExpiry="2020-01-01T00:00:00Z")
    assert apply({"Node": me})
    assert session.network_map(NOW).state is NodeState.KEY_EXPIRED


def test_a_first_message_without_a_self_node_is_an_error() -> None:
    with pytest.raises(MapSessionError):
        MapSession().apply(tailcfg.parse_map_response(b'{"PeersRemoved": [1]}'), NOW)


def test_times_and_requests_are_what_go_writes() -> None:
    assert tailcfg.parse_time("2026-12-07T11:50:12.402158514Z", "t") == pytest.approx(1796644212.402158)
    assert tailcfg.parse_time(tailcfg.ZERO_TIME, "t") is None
    assert tailcfg.format_time(None) == "0001-01-01T00:00:00Z"
    key = NodePublic(bytes(range(32)))
    body = json.loads(tailcfg.register_request(key, hostinfo={"Hostname": "a"}, auth_key="k"))
    assert body["NodeKey"] == key.to_text() and body["Auth"] == {"AuthKey": "k"}
    assert body["Expiry"] == "0001-01-01T00:00:00Z" and body["Version"] == tailcfg.CAPABILITY_VERSION
    request = json.loads(
        tailcfg.map_request(
            key, DiscoPrivate.generate(bytes(32)).public(), hostinfo={}, endpoints=["192.0.2.1:1"]
        )
    )
    assert request["Compress"] == "zstd" and request["Stream"] and request["EndpointTypes"] == [1]


@pytest.mark.parametrize(
    "body",
    [
        b'{"Node": {"ID": "one"}}',
        b'{"Node": {"ID": 1}}',  # no Key
        b'{"Peers": [{"ID": 1, "Key": "nodekey:zz"}]}',
        b'{"PeersRemoved": ["x"]}',
        b'{"OnlineChange": {"a": true}}',
        b'{"Node": {"ID": 1, "Key": "nodekey:' + b"0" * 64 + b'", "Addresses": ["300.1.1.1/32"]}}',
        b'{"Node": {"ID": 1, "Key": "nodekey:' + b"0" * 64 + b'", "KeyExpiry": "yesterday"}}',
        b'{"DNSConfig": {"Routes": {"a": 5}}}',
        b"[]",
        b"{",
    ],
)
def test_bad_map_json_is_a_parse_error(body: bytes) -> None:
    with pytest.raises(ParseError):
        tailcfg.parse_map_response(body)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: (
            st.lists(c, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "Node",
                        "Peers",
                        "ID",
                        "Key",
                        "Addresses",
                        "PeersChanged",
                        "PeersChangedPatch",
                        "NodeID",
                        "Endpoints",
                        "DNSConfig",
                        "Routes",
                        "OnlineChange",
                        "UserProfiles",
                    ]
                ),
                c,
                max_size=4,
            )
        ),
        max_leaves=12,
    )
)
def test_any_json_is_a_map_response_or_a_parse_error(document: object) -> None:
    try:
        response = tailcfg.parse_map_response(json.dumps(document).encode())
    except ParseError:
        return
    session = MapSession()
    try:
        session.apply(response, NOW)
        session.network_map(NOW)
    except ParseError:
        pass
