"""The DERP map parser: Tailscale's DERPMap JSON, read as Go reads it, and the URLs a client dials."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedmesh.errors import ConfigError, ParseError
from embedmesh.tailscale import gojson
from embedmesh.tailscale.derpmap import DerpMapError, load_derp_map, parse_derp_map

MAP: dict[str, Any] = {
    "Regions": {
        "900": {
            "RegionID": 900,
            "RegionCode": "home",
            "RegionName": "Home",
            "Nodes": [
                {"Name": "900a", "RegionID": 900, "HostName": "derp.example.com", "IPv4": "203.0.113.1", "DERPPort": 8443},
                {"Name": "900b", "RegionID": 900, "HostName": "203.0.113.2", "STUNOnly": True, "STUNPort": 3479},
            ],
        },
        "901": None,
        "902": {"RegionID": 902, "RegionCode": "far", "NoMeasureNoHome": True, "Nodes": []},
    },
    "OmitDefaultRegions": True,
}


def test_a_map_from_a_file_and_from_a_network_map_read_the_same() -> None:
    from_dict = parse_derp_map(MAP)
    # A network map arrives through Go-style decoding (case-insensitive keys).
    from_netmap = parse_derp_map(gojson.loads(json.dumps(MAP).replace('"HostName"', '"hostname"'), "map"))
    assert from_dict == from_netmap
    assert sorted(from_dict.regions) == [900, 902]  # the null region is dropped, as Go's client does
    assert from_dict.omit_default_regions
    home = from_dict.regions[900]
    assert home.region_code == "home" and len(home.nodes) == 2
    assert from_dict.regions[902].no_measure_no_home


def test_urls_follow_tailscales_client(monkeypatch: pytest.MonkeyPatch) -> None:
    node, stun_only = parse_derp_map(MAP).regions[900].nodes
    monkeypatch.delenv("TS_DEBUG_USE_DERP_HTTP", raising=False)
    assert node.derp_url() == "https://derp.example.com:8443/derp"
    assert node.dial_host() == "203.0.113.1"  # the pinned address; TLS still names the host
    monkeypatch.setenv("TS_DEBUG_USE_DERP_HTTP", "1")
    assert node.derp_url() == "http://derp.example.com:8443/derp"
    # Without a DERPPort: 443 for TLS, 3340 for plain HTTP (Go's derphttp dials those).
    bare = parse_derp_map({"Regions": {"1": {"Nodes": [{"HostName": "d.example"}]}}}).regions[1].nodes[0]
    assert bare.derp_url(plain_http=False) == "https://d.example/derp"
    assert bare.derp_url(plain_http=True) == "http://d.example:3340/derp"
    assert stun_only.stun_only and stun_only.stun_targets() == [("203.0.113.2", 3479)]
    assert node.stun_targets() == [("203.0.113.1", 3478)]


def test_a_pinned_self_signed_certificate() -> None:
    node = parse_derp_map(
        {"Regions": {"1": {"Nodes": [{"HostName": "127.0.0.1", "CertName": "sha256-raw:ABCDEF"}]}}}
    ).regions[1].nodes[0]
    assert node.pinned_cert_sha256 == "abcdef"
    plain = parse_derp_map({"Regions": {"1": {"Nodes": [{"HostName": "h", "CertName": "other"}]}}}).regions[1]
    assert plain.nodes[0].pinned_cert_sha256 is None


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"Regions": []},
        {"Regions": {"x": {}}},
        {"Regions": {"0": {}}},
        {"Regions": {"1": {"Nodes": {}}}},
        {"Regions": {"1": {"Nodes": [3]}}},
        {"Regions": {"1": {"Nodes": [{"DERPPort": 70000}]}}},
        {"Regions": {"1": {"Nodes": [{"STUNPort": "3478"}]}}},
        {"Regions": {"1": {"RegionCode": 5}}},
    ],
)
def test_malformed_maps_are_refused_with_a_reason(document: object) -> None:
    with pytest.raises(DerpMapError):
        parse_derp_map(document)


def test_load_derp_map_says_which_file_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text('{"Regions": {"1": {"Nodes": [1]}}}')
    with pytest.raises(ConfigError, match=str(path)):
        load_derp_map(path)
    path.write_text(json.dumps(MAP))
    assert 900 in load_derp_map(path).regions


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["Regions", "regions", "OmitDefaultRegions", "x"]), _json, max_size=3))
def test_hostile_maps_raise_only_parse_errors(document: dict[str, Any]) -> None:
    try:
        parsed = parse_derp_map(document)
    except ParseError:
        return
    for region in parsed.regions.values():
        for node in region.nodes:
            node.derp_url(plain_http=False)
            node.stun_targets()
