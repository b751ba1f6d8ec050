"""STUN and netcheck against software we did not write: Tailscale's Go stun client and netcheck
(tests/interop/go/tsnetcheck, tailscale.com v1.102.5) against our STUN server, and our netcheck
against Tailscale's ``derper`` (its STUN server and ``/derp/latency-check``), all on loopback."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from embedmesh.runtime.netcheck import measure_https_latency, run_netcheck
from embedmesh.tailscale import stun
from embedmesh.tailscale.derpmap import parse_derp_map
from embedmesh.tailscale.keys import NodePrivate
from embedmesh.tailscale.stunserver import StunResponder, StunServer
from tests.interop import gopeers
from tests.tailscale.test_stun import RFC5769_RESPONSE_V6
from tests.test_netcheck_loopback import slow_stun_server

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def tsnetcheck() -> Path:
    return gopeers.require(lambda: gopeers.go_program("tsnetcheck"))


def _go(binary: Path, *args: str) -> dict[str, Any]:
    result = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return doc


def _text(address: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]) -> str:
    ip, port = address
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def test_our_bytes_are_gos_and_go_parses_our_responses(tsnetcheck: Path) -> None:
    cases = [
        (os.urandom(12), ("203.0.113.9", 41641)),
        (bytes(12), ("1.2.3.4", 5678)),
        (os.urandom(12), ("2001:db8::7", 3478)),
        (os.urandom(12), ("::ffff:198.51.100.2", 1)),
    ]
    for txid, address in cases:
        ip = ipaddress.ip_address(address[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # we answer a v4-mapped source as IPv4; Go is given it so
        vectors = _go(tsnetcheck, "vectors", txid.hex(), _text((ip, address[1])))
        assert stun.binding_request(txid) == bytes.fromhex(vectors["request"])
        ours = stun.binding_response(txid, address)
        assert ours == bytes.fromhex(vectors["response"])
        parsed = _go(tsnetcheck, "parse", ours.hex())
        assert parsed == {"txid": txid.hex(), "addr": _text(stun.parse_binding_response(ours).address)}
    # The RFC 5769 response (SOFTWARE, MESSAGE-INTEGRITY, FINGERPRINT around the address) too.
    assert (
        _go(tsnetcheck, "parse", RFC5769_RESPONSE_V6.hex())["addr"]
        == "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
    )


@pytest.mark.parametrize("tailscale_only", [False, True])
def test_go_stun_client_against_our_server(tsnetcheck: Path, tailscale_only: bool) -> None:
    async def main() -> None:
        server = StunServer(StunResponder(tailscale_only=tailscale_only))
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            result = await anyio.run_process([str(tsnetcheck), "stun", f"127.0.0.1:{port}"], check=False)
            tg.cancel_scope.cancel()
        assert result.returncode == 0, result.stderr.decode()
        doc = json.loads(result.stdout)
        assert doc["addr"] == doc["local"]  # the address and port the Go client sent from
        assert server.counters["success"] == 1

    anyio.run(main)


def test_go_netcheck_against_our_stun_servers(tsnetcheck: Path, tmp_path: Path) -> None:
    """Tailscale's netcheck measures two regions served by our STUN server (one held back 50 ms)
    and prefers the near one; it sees no NAT on loopback."""

    async def main() -> None:
        near = StunServer()
        async with anyio.create_task_group() as tg, slow_stun_server("127.0.0.2", 0.05) as far_port:
            near_port = await tg.start(near.serve, "127.0.0.1", 0)
            derp_map = {
                "Regions": {
                    str(r): {
                        "RegionID": r,
                        "RegionCode": f"r{r}",
                        "RegionName": f"Region {r}",
                        # STUNTestIP: Go probes test nodes whatever interfaces the host has.
                        "Nodes": [
                            {
                                "Name": f"{r}a",
                                "RegionID": r,
                                "HostName": ip,
                                "STUNTestIP": ip,
                                "STUNPort": p,
                                "STUNOnly": True,
                            }
                        ],
                    }
                    for r, ip, p in ((1, "127.0.0.2", far_port), (2, "127.0.0.1", near_port))
                }
            }
            map_file = tmp_path / "derpmap.json"
            map_file.write_text(json.dumps(derp_map))
            result = await anyio.run_process([str(tsnetcheck), "netcheck", str(map_file)], check=False)
            tg.cancel_scope.cancel()
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        report = json.loads(result.stdout)
        assert report["UDP"] is True and report["IPv4"] is True
        latency = {int(r): ns / 1e9 for r, ns in report["RegionLatency"].items()}
        assert set(latency) == {1, 2} and latency[1] >= 0.05 > latency[2]
        assert report["PreferredDERP"] == 2
        assert report["GlobalV4"].startswith("127.0.0.1:")
        assert report["MappingVariesByDestIP"] is False
        assert near.counters["success"] >= 1

    anyio.run(main)


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def derper(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """Tailscale's derper on loopback: plain HTTP on one port, its STUN server on another."""
    binary = gopeers.require(gopeers.derper)
    config = tmp_path / "derper.json"
    config.write_text(json.dumps({"PrivateKey": NodePrivate.generate(os.urandom(32)).to_text()}))
    config.chmod(0o600)
    http_port, stun_port = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
    with gopeers.running_derper(binary, config, http_port, "-stun-port", str(stun_port)):
        yield http_port, stun_port


def _ask(port: int, request: bytes, timeout: float) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(request, ("127.0.0.1", port))
        try:
            return sock.recv(2048)
        except TimeoutError:
            return None


def test_derper_stun_answers_our_requests(derper: tuple[int, int]) -> None:
    _, stun_port = derper
    txid = os.urandom(12)
    answer = None
    for _ in range(50):  # derper's STUN socket may open a moment after its HTTP listener
        answer = _ask(stun_port, stun.binding_request(txid), 0.2)
        if answer is not None:
            break
    assert answer is not None
    response = stun.parse_binding_response(answer)
    assert response.txid == txid and str(response.address[0]) == "127.0.0.1"
    # derper answers only Tailscale's requests: no SOFTWARE "tailnode" or no FINGERPRINT, no answer.
    assert _ask(stun_port, stun.binding_request(os.urandom(12), software="other"), 0.3) is None
    assert _ask(stun_port, stun.binding_request(os.urandom(12), with_fingerprint=False), 0.3) is None


def test_our_netcheck_against_derper(derper: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    http_port, stun_port = derper
    monkeypatch.setenv("TS_DEBUG_USE_DERP_HTTP", "1")  # derper serves plain HTTP here

    def node(region: int, ip: str, stun_port: int) -> dict[str, Any]:
        return {
            "Name": f"{region}a",
            "RegionID": region,
            "HostName": "127.0.0.1",
            "IPv4": ip,
            "STUNPort": stun_port,
            "DERPPort": http_port,
        }

    def region(r: int, n: dict[str, Any]) -> dict[str, Any]:
        return {"RegionID": r, "RegionCode": f"r{r}", "RegionName": f"Region {r}", "Nodes": [n]}

    async def main() -> None:
        # derper's STUN plus ours on 127.0.0.2: two server addresses, so the mapping is known.
        ours = StunServer()
        async with anyio.create_task_group() as tg:
            our_port = await tg.start(ours.serve, "127.0.0.2", 0)
            derp_map = parse_derp_map(
                {
                    "Regions": {
                        "1": region(1, node(1, "127.0.0.1", stun_port)),
                        "2": region(2, node(2, "127.0.0.2", our_port)),
                    }
                }
            )
            with anyio.fail_after(20):
                while True:  # until derper's STUN socket is up
                    report = await run_netcheck(derp_map, bind_host="127.0.0.1", https_fallback=False)
                    if 1 in report.region_latency:
                        break
            # The HTTP latency check against derper's /derp/latency-check.
            latency, address = await measure_https_latency(derp_map.regions[1].nodes[0])
            # And the whole fallback: STUN to a port where nothing listens, latency over HTTP.
            silent = parse_derp_map(
                {"Regions": {"1": region(1, node(1, "127.0.0.1", _free_port(socket.SOCK_DGRAM)))}}
            )
            fallback = await run_netcheck(silent)
            tg.cancel_scope.cancel()
        assert report.udp and set(report.region_latency) == {1, 2}
        assert report.global_v4 is not None and report.global_v4[0] == "127.0.0.1"
        assert report.mapping_varies_by_dest_ip is False
        assert report.preferred_derp in (1, 2)
        assert 0 < latency < 1 and address == "127.0.0.1"
        assert not fallback.udp and set(fallback.region_latency) == {1} and fallback.preferred_derp == 1

    anyio.run(main)
