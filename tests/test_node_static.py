"""Node in static mode on loopback, under both anyio backends."""

from __future__ import annotations

import base64
import errno
import os
import socket
import subprocess
import sys

import anyio
import pytest

from embedmesh import ConfigError, Node, NodeError
from embedmesh.wireguard import crypto


def _configs(psk: bytes | None = None) -> tuple[str, str]:
    ka = crypto.generate_private_key(os.urandom(32))
    kb = crypto.generate_private_key(os.urandom(32))
    b64 = lambda k: base64.b64encode(k).decode()  # noqa: E731
    psk_line = f"PresharedKey = {b64(psk)}\n" if psk else ""
    a = (
        f"[Interface]\nPrivateKey = {b64(ka)}\nAddress = 100.64.0.1/32, fd7a:115c:a1e0::1/128\n"
        f"[Peer]\nPublicKey = {b64(crypto.public_key(kb))}\n{psk_line}"
        "AllowedIPs = 100.64.0.2/32, fd7a:115c:a1e0::2/128\nEndpoint = 127.0.0.1:{port_b}\n"
    )
    b = (
        f"[Interface]\nPrivateKey = {b64(kb)}\nAddress = 100.64.0.2/32, fd7a:115c:a1e0::2/128\n"
        f"[Peer]\nPublicKey = {b64(crypto.public_key(ka))}\n{psk_line}"
        "AllowedIPs = 100.64.0.1/32, fd7a:115c:a1e0::1/128\n"
    )
    return a, b


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_two_nodes_ping_each_other(backend: str) -> None:
    async def main() -> None:
        a_text, b_text = _configs(psk=os.urandom(32))
        async with Node(wireguard_config=b_text, listen_host="127.0.0.1") as b:
            await b.up()
            a_text = a_text.replace("{port_b}", str(b.listen_port))
            async with Node(wireguard_config=a_text, listen_host="127.0.0.1") as a:
                await a.up()
                rtt = await a.ping("100.64.0.2", timeout=5)
                assert 0 < rtt < 5
                assert await a.ping("fd7a:115c:a1e0::2") > 0
                # B learned A's endpoint from the handshake and can answer back.
                assert await b.ping("100.64.0.1") > 0
                status = a.status()
                (peer,) = status.peers
                assert peer.endpoint == ("127.0.0.1", b.listen_port)
                assert peer.last_handshake_ago is not None and peer.rx_bytes > 0 and peer.tx_bytes > 0
                assert status.addresses == ("100.64.0.1", "fd7a:115c:a1e0::1")

    anyio.run(main, backend=backend)


def test_ping_unrouted_address_fails_at_once() -> None:
    """No peer routes 100.64.0.99: host unreachable now, not a timeout (and nothing is sent)."""

    async def main() -> None:
        _, b_text = _configs()
        async with Node(wireguard_config=b_text, listen_host="127.0.0.1") as b:
            with pytest.raises(OSError, match=r"no peer of this node routes 100\.64\.0\.99") as info:
                await b.ping("100.64.0.99", timeout=5)
            assert info.value.errno == errno.EHOSTUNREACH
            assert b.status().counters.get("drop_no_route", 0) == 0

    anyio.run(main)


def test_config_errors_name_the_line() -> None:
    with pytest.raises(ConfigError, match="line 2"):
        Node(wireguard_config="[Interface]\nPrivateKey = nonsense\n")


def test_hostname_in_static_mode() -> None:
    """wg-quick files name no host, so a static node is called what it is asked to be, or what
    this machine is called (the short host name), as in a tailnet."""
    _, b_text = _configs()
    assert Node(wireguard_config=b_text).hostname == socket.gethostname().split(".")[0]
    assert Node(wireguard_config=b_text, hostname="sensor").hostname == "sensor"


def test_lifecycle_errors() -> None:
    async def main() -> None:
        _, b_text = _configs()
        node = Node(wireguard_config=b_text, listen_host="127.0.0.1")
        with pytest.raises(NodeError, match="not running"):
            await node.ping("100.64.0.1")
        async with node:
            await node.up()
        await node.close()  # twice is fine
        with pytest.raises(NodeError, match="closed"):
            await node.start()

    anyio.run(main)


def test_demo_command_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "embedmesh.cli.main", "demo", "--pings", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert result.returncode == 0, result.stderr
    assert '{"served_by": "web", "caller": "laptop"}' in result.stdout
    assert "icmp_seq=2" in result.stdout
    assert "is gone: the server now lists ['web', 'laptop']" in result.stdout


def test_pcap_option_records_the_overlay(tmp_path: object) -> None:
    from pathlib import Path

    from embedmesh.wire.ip import parse_ip

    capture = Path(str(tmp_path)) / "a.pcap"

    async def main() -> None:
        a_text, b_text = _configs()
        async with Node(wireguard_config=b_text, listen_host="127.0.0.1") as b:
            a_text = a_text.replace("{port_b}", str(b.listen_port))
            async with Node(wireguard_config=a_text, listen_host="127.0.0.1", pcap=capture) as a:
                await a.ping("100.64.0.2")

    anyio.run(main)
    data = capture.read_bytes()
    assert data[:4] in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4")
    # Two packets: the echo request and its reply, each a valid IP packet in clear.
    offset, packets = 24, []
    while offset < len(data):
        length = int.from_bytes(data[offset + 8 : offset + 12], "little")
        packets.append(parse_ip(data[offset + 16 : offset + 16 + length]))
        offset += 16 + length
    assert len(packets) == 2
    assert packets[0].protocol == packets[1].protocol == 1
