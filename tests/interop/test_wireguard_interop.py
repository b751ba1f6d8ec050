"""embedmesh against stock WireGuard: Debian's wireguard-go in a network namespace, with the
Linux kernel's ping on the other side of its TUN device.

The embedmesh node runs in this process, in the root namespace, bound to the root end of a veth
link; wireguard-go listens on the namespace end. Traffic stays on that link.
"""

from __future__ import annotations

import re
import time

import anyio
import pytest
from netns import NetnsRig, generate_keypair, generate_preshared_key

from embedmesh import Node

NODE_V4, PEER_V4 = "100.64.0.1", "100.64.0.2"
NODE_V6, PEER_V6 = "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"
NODE_PORT = 51901


def setup(
    rig: NetnsRig,
    *,
    psk: str | None = None,
    node_knows_endpoint: bool = True,
    peer_knows_endpoint: bool = True,
    keepalive: int | None = None,
) -> tuple[str, object, object]:
    """A namespace with wireguard-go, and the wg-quick text of an embedmesh node that peers with it."""
    ns = rig.add_namespace("wg")
    link = rig.veth_to_root(ns)
    wg = rig.start_wireguard(ns, addresses=[f"{PEER_V4}/24", f"{PEER_V6}/64"], listen_port=51820)
    me = generate_keypair()
    wg.add_peer(
        me.public,
        [f"{NODE_V4}/32", f"{NODE_V6}/128"],
        endpoint=(link.a.ip, NODE_PORT) if peer_knows_endpoint else None,
        preshared_key=psk,
    )
    lines = [
        "[Interface]",
        f"PrivateKey = {me.private}",
        f"ListenPort = {NODE_PORT}",
        f"Address = {NODE_V4}/32, {NODE_V6}/128",
        "",
        "[Peer]",
        f"PublicKey = {wg.public_key}",
        f"AllowedIPs = {PEER_V4}/32, {PEER_V6}/128",
    ]
    if node_knows_endpoint:
        lines.append(f"Endpoint = {link.b.ip}:51820")
    if psk:
        lines.append(f"PresharedKey = {psk}")
    if keepalive:
        lines.append(f"PersistentKeepalive = {keepalive}")
    return "\n".join(lines) + "\n", ns, (wg, link)


def kernel_ping(ns, target: str, count: int = 3) -> str:  # type: ignore[no-untyped-def]
    result = ns.run(["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "3", target], check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{count} received" in result.stdout, result.stdout
    return str(result.stdout)


def test_kernel_pings_embedmesh_through_wireguard_go(wg_rig: NetnsRig) -> None:
    """wireguard-go initiates the handshake; the kernel's ping gets its answers from embedmesh."""
    config, ns, (wg, link) = setup(wg_rig, node_knows_endpoint=False)

    async def main() -> None:
        async with Node(wireguard_config=config, listen_host=link.a.ip) as node:
            await node.up()
            await anyio.to_thread.run_sync(kernel_ping, ns, NODE_V4)
            await anyio.to_thread.run_sync(kernel_ping, ns, NODE_V6)
            status = node.status()
            assert status.counters["rx_initiation"] == 1 and status.counters.get("tx_initiation", 0) == 0
            assert status.counters["ip_tx_echo_reply"] == 6
            (peer,) = status.peers
            assert peer.endpoint == (link.b.ip, 51820)  # learned from the handshake
            # ... and embedmesh can now reach the kernel over the same session.
            assert await node.ping(PEER_V4) > 0

    anyio.run(main)
    peer = wg.peer(wg_rig_public(config))
    assert peer.latest_handshake > 0 and peer.rx_bytes > 0 and peer.tx_bytes > 0


def wg_rig_public(config: str) -> str:
    from netns import public_key

    private = re.search(r"PrivateKey = (\S+)", config)
    assert private
    return public_key(private.group(1))


def test_embedmesh_pings_the_kernel_through_wireguard_go(wg_rig: NetnsRig) -> None:
    """embedmesh initiates; the kernel behind wireguard-go answers, over IPv4 and IPv6."""
    config, ns, (wg, link) = setup(wg_rig, peer_knows_endpoint=False)

    async def main() -> None:
        async with Node(wireguard_config=config, listen_host=link.a.ip) as node:
            await node.up()
            rtts = [await node.ping(PEER_V4, timeout=5) for _ in range(5)]
            assert all(0 < r < 1 for r in rtts)
            assert await node.ping(PEER_V6, timeout=5) > 0
            assert node.status().counters["tx_initiation"] == 1
            # The kernel side can answer back: wireguard-go learned our endpoint.
            await anyio.to_thread.run_sync(kernel_ping, ns, NODE_V4)

    anyio.run(main)
    assert wg.peer(wg_rig_public(config)).endpoint == f"{link.a.ip}:{NODE_PORT}"


def test_serve_only_node_handshakes_with_wireguard_go_at_start(wg_rig: NetnsRig) -> None:
    """wireguard-go has no endpoint for the node, which only serves: the kernel reaches it anyway,
    because the node handshakes with every peer that has an Endpoint when it starts (as wg-quick)."""
    config, ns, (wg, link) = setup(wg_rig, peer_knows_endpoint=False)

    async def main() -> None:
        async with Node(wireguard_config=config, listen_host=link.a.ip) as node:
            await node.up()
            with anyio.fail_after(5):
                while node.status().counters.get("tx_keepalive", 0) == 0:  # sent once the handshake is done
                    await anyio.sleep(0.02)
            await anyio.to_thread.run_sync(kernel_ping, ns, NODE_V4)
            counters = node.status().counters
            assert counters["tx_initiation"] == 1 and counters.get("ip_tx_echo_request", 0) == 0
            assert counters["ip_tx_echo_reply"] == 3

    anyio.run(main)
    assert wg.peer(wg_rig_public(config)).endpoint == f"{link.a.ip}:{NODE_PORT}"


def test_persistent_keepalives_reach_wireguard_go_without_traffic(wg_rig: NetnsRig) -> None:
    """PersistentKeepalive = 1 and no traffic at all: wireguard-go sees a handshake at start and then
    a keepalive (32 bytes of transport) about every second, which is what keeps a NAT mapping open."""
    config, _ns, (wg, link) = setup(wg_rig, peer_knows_endpoint=False, keepalive=1)
    me = wg_rig_public(config)

    async def main() -> None:
        async with Node(wireguard_config=config, listen_host=link.a.ip) as node:
            await node.up()
            await anyio.to_thread.run_sync(lambda: wg.wait_for_handshake(me, 5))
            first = wg.peer(me).rx_bytes
            await anyio.sleep(3.5)
            grown = wg.peer(me).rx_bytes - first
            assert 3 * 32 <= grown <= 5 * 32, grown  # keepalives only: nothing else was sent
            assert node.status().counters.get("ip_tx_echo_request", 0) == 0

    anyio.run(main)


def test_preshared_key_interop(wg_rig: NetnsRig) -> None:
    psk = generate_preshared_key()
    config, ns, (_wg, link) = setup(wg_rig, psk=psk)

    async def main() -> None:
        async with Node(wireguard_config=config, listen_host=link.a.ip) as node:
            assert await node.ping(PEER_V4) > 0
            await anyio.to_thread.run_sync(kernel_ping, ns, NODE_V4)

    anyio.run(main)


def test_wrong_preshared_key_fails_cleanly(wg_rig: NetnsRig) -> None:
    config, _ns, (_wg, link) = setup(wg_rig, psk=generate_preshared_key())
    config = re.sub(r"PresharedKey = \S+", f"PresharedKey = {generate_preshared_key()}", config)

    async def main() -> None:
        async with Node(wireguard_config=config, listen_host=link.a.ip) as node:
            with pytest.raises(TimeoutError):
                await node.ping(PEER_V4, timeout=1.5)
            # wireguard-go answered, but the response could not be authenticated.
            assert node.status().counters["drop_authentication"] >= 1

    anyio.run(main)


def test_rekeys_with_wireguard_go_without_losing_traffic(wg_rig: NetnsRig) -> None:
    """New sessions replace old ones while pings flow: ours forced every 0.5 s (the 120-s schedule
    itself is proved on the virtual clock in tests/wireguard/test_wg_timers.py), and the kernel
    pings throughout."""
    config, ns, (_wg, link) = setup(wg_rig)

    async def main() -> None:
        async with Node(wireguard_config=config, listen_host=link.a.ip) as node:
            await node.ping(PEER_V4)
            device = node._device
            peer = next(iter(device.peers.values()))
            sessions = set()
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, kernel_ping, ns, NODE_V4, 20)
                for _ in range(8):
                    assert peer.current is not None
                    sessions.add(peer.current.local_index)
                    peer.last_initiation_sent = float("-inf")  # lift the 5-s rate limit on initiations
                    device.initiate_handshake(peer, time.monotonic())
                    node._dataplane.kick()
                    for _ in range(3):
                        assert await node.ping(PEER_V4, timeout=2) > 0
                    await anyio.sleep(0.3)
            assert len(sessions) >= 7
            assert device.counters["rx_response"] >= 8

    anyio.run(main)


def test_handshake_and_ping_through_a_lossy_reordering_link(wg_rig: NetnsRig) -> None:
    config, ns, (_wg, link) = setup(wg_rig)
    wg_rig.netem(None, link.a.ifname, "delay 20ms 5ms loss 20% reorder 25% 50%", seed=1)
    wg_rig.netem(ns, link.b.ifname, "delay 20ms 5ms loss 20% duplicate 10%", seed=2)

    async def main() -> None:
        async with Node(wireguard_config=config, listen_host=link.a.ip) as node:
            answered = 0
            for _ in range(30):
                try:
                    await node.ping(PEER_V4, timeout=1.0)
                    answered += 1
                except TimeoutError:
                    pass
                if answered >= 10:
                    break
            assert answered >= 10, node.status().counters

    anyio.run(main)
