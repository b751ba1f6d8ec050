"""Static mode's handshakes as a user sees them: initiated at start as wg-quick does, and visible
when they never happen (status, ping errors). In-process nodes on loopback."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.from_thread import start_blocking_portal
from click.testing import CliRunner

from embedmesh import ConfigError, Node
from embedmesh.wireguard import crypto


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def _keys() -> tuple[bytes, bytes]:
    private = crypto.generate_private_key(os.urandom(32))
    return private, crypto.public_key(private)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback UDP port that receives and never answers: a peer that is down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def test_serve_only_node_that_restarts_is_reachable_without_sending_traffic() -> None:
    """S serves and lists C's Endpoint; C knows S only from its handshakes. When S restarts on a new
    port, C still holds the old endpoint: only S's own handshake at start can tell C the new one."""
    s_key, s_pub = _keys()
    c_key, c_pub = _keys()
    c_text = (
        f"[Interface]\nPrivateKey = {_b64(c_key)}\nAddress = 10.7.0.1/32\n"
        f"[Peer]\nPublicKey = {_b64(s_pub)}\nAllowedIPs = 10.7.0.2/32\n"
    )

    def s_text(port_c: int) -> str:
        return (
            f"[Interface]\nPrivateKey = {_b64(s_key)}\nAddress = 10.7.0.2/32\n"
            f"[Peer]\nPublicKey = {_b64(c_pub)}\nAllowedIPs = 10.7.0.1/32\nEndpoint = 127.0.0.1:{port_c}\n"
        )

    async def main() -> None:
        async with Node(wireguard_config=c_text, listen_host="127.0.0.1") as c:
            for incarnation in range(2):
                async with Node(wireguard_config=s_text(c.listen_port), listen_host="127.0.0.1") as s:
                    # S never sends a packet of its own, yet its handshake reaches C: the session is
                    # confirmed by S's first keepalive. (Before that, C still sends on the previous
                    # incarnation's session, which S no longer has, as any WireGuard responder does.)
                    with anyio.fail_after(3):
                        while c.status().counters.get("rx_keepalive", 0) <= incarnation:
                            await anyio.sleep(0.02)
                    assert await c.ping("10.7.0.2", timeout=3) > 0
                    (peer,) = c.status().peers
                    assert peer.endpoint == ("127.0.0.1", s.listen_port), incarnation
                    assert s.status().counters.get("tx_initiation", 0) >= 1

    anyio.run(main)


def test_persistent_keepalive_runs_from_the_start() -> None:
    # A PersistentKeepalive keeps a NAT mapping open from the moment the node starts, not from its
    # first packet of traffic.
    a_key, a_pub = _keys()
    b_key, b_pub = _keys()
    b_text = (
        f"[Interface]\nPrivateKey = {_b64(b_key)}\nAddress = 10.8.0.2/32\n"
        f"[Peer]\nPublicKey = {_b64(a_pub)}\nAllowedIPs = 10.8.0.1/32\n"
    )

    async def main() -> None:
        async with Node(wireguard_config=b_text, listen_host="127.0.0.1") as b:
            a_text = (
                f"[Interface]\nPrivateKey = {_b64(a_key)}\nAddress = 10.8.0.1/32\n"
                f"[Peer]\nPublicKey = {_b64(b_pub)}\nAllowedIPs = 10.8.0.2/32\n"
                f"Endpoint = 127.0.0.1:{b.listen_port}\nPersistentKeepalive = 1\n"
            )
            async with Node(wireguard_config=a_text, listen_host="127.0.0.1"):
                with anyio.fail_after(5):
                    while b.status().counters.get("rx_keepalive", 0) < 2:
                        await anyio.sleep(0.05)

    anyio.run(main)


def test_interface_without_address_is_a_config_error_naming_the_section() -> None:
    key, _ = _keys()
    _, peer = _keys()
    text = f"# wg(8) style\n[Interface]\nPrivateKey = {_b64(key)}\n[Peer]\nPublicKey = {_b64(peer)}\n"
    with pytest.raises(ConfigError, match=r"^line 2: the \[Interface\] section has no Address; add") as info:
        Node(wireguard_config=text)
    assert info.value.line == 2


def test_cli_up_without_address_fails_with_one_line(tmp_path: Path) -> None:
    # Before the fix `up` accepted the file and ran (the first packet would fail): this timed out.
    key, _ = _keys()
    _, peer = _keys()
    config = tmp_path / "wg0.conf"
    config.write_text(f"[Interface]\nPrivateKey = {_b64(key)}\n\n[Peer]\nPublicKey = {_b64(peer)}\n")
    result = subprocess.run(
        [sys.executable, "-m", "embedmesh.cli.main", "up", "--wireguard-config", str(config)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "Error: line 1: the [Interface] section has no Address; add this node's overlay address, "
        "e.g. 'Address = 10.0.0.2/32', the one its peers list in their AllowedIPs"
    ]


def _unanswered_config(port: int, allowed: str = "10.9.0.2/32") -> str:
    key, _ = _keys()
    _, peer = _keys()
    return (
        f"[Interface]\nPrivateKey = {_b64(key)}\nAddress = 10.9.0.1/32\n"
        f"[Peer]\nPublicKey = {_b64(peer)}\nAllowedIPs = {allowed}\nEndpoint = 127.0.0.1:{port}\n"
    )


def test_peer_without_handshake_is_visible_in_status_and_ping(silent_port: int) -> None:
    async def main() -> None:
        async with Node(wireguard_config=_unanswered_config(silent_port), listen_host="127.0.0.1") as a:
            (peer,) = a.status().peers
            assert peer.handshake == "no handshake yet" and peer.last_handshake_ago is None
            assert str(peer).endswith(": no handshake yet")
            with pytest.raises(TimeoutError) as info:
                await a.ping("10.9.0.2", timeout=0.3)
            message = str(info.value)
            assert message.startswith("no echo reply from 10.9.0.2 within 0.3 s: no WireGuard handshake with peer ")
            assert peer.public_key in message and f"127.0.0.1:{silent_port}" in message
            assert a.public_key in message  # what the peer has to list

    anyio.run(main)


def test_ping_timeout_after_a_handshake_says_so() -> None:
    a_key, a_pub = _keys()
    b_key, b_pub = _keys()
    b_text = (
        f"[Interface]\nPrivateKey = {_b64(b_key)}\nAddress = 10.6.0.2/32\n"
        f"[Peer]\nPublicKey = {_b64(a_pub)}\nAllowedIPs = 10.6.0.1/32\n"
    )

    async def main() -> None:
        async with Node(wireguard_config=b_text, listen_host="127.0.0.1") as b:
            a_text = (
                f"[Interface]\nPrivateKey = {_b64(a_key)}\nAddress = 10.6.0.1/32\n"
                f"[Peer]\nPublicKey = {_b64(b_pub)}\nAllowedIPs = 10.6.0.0/24\n"
                f"Endpoint = 127.0.0.1:{b.listen_port}\n"
            )
            async with Node(wireguard_config=a_text, listen_host="127.0.0.1") as a:
                assert await a.ping("10.6.0.2", timeout=3) > 0
                (peer,) = a.status().peers
                assert peer.handshake.endswith(" s ago") and peer.last_handshake_ago is not None
                # B is routed 10.6.0.0/24 but has only .2: the handshake works, the echo goes unanswered.
                with pytest.raises(TimeoutError, match=r"handshake with peer .* completed \d+ s ago, but no reply"):
                    await a.ping("10.6.0.9", timeout=0.3)

    anyio.run(main)


def test_cli_status_shows_no_handshake_yet(tmp_path: Path, silent_port: int) -> None:
    from embedmesh.cli.main import main
    from embedmesh.localapi import serve_local_api

    async def run_node(*, task_status: anyio.abc.TaskStatus[anyio.CancelScope]) -> None:
        # The node runs in the portal's event loop; the CLI's own anyio.run runs in this thread.
        async with Node(wireguard_config=_unanswered_config(silent_port), listen_host="127.0.0.1") as node:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    await tg.start(serve_local_api, node, tmp_path)
                    task_status.started(scope)

    with start_blocking_portal() as portal:
        future, scope = portal.start_task(run_node)
        try:
            result = CliRunner().invoke(main, ["status", "--state-dir", str(tmp_path)], env={"COLUMNS": "200"})
        finally:
            portal.call(scope.cancel)
            future.result(timeout=10)
    assert result.exit_code == 0, result.output
    assert "no handshake yet" in result.output
