"""``embedmesh demo``: a WireGuard network of in-process nodes on loopback, shown step by step."""

from __future__ import annotations

import base64
import time

import anyio
from rich.console import Console
from rich.table import Table

from embedmesh.node import Node
from embedmesh.wireguard import crypto


def _config(private: bytes, address: str, port: int, peers: list[tuple[bytes, str, int]]) -> str:
    lines = [
        "[Interface]",
        f"PrivateKey = {base64.b64encode(private).decode()}",
        f"ListenPort = {port}",
        f"Address = {address}",
    ]
    for public, allowed, peer_port in peers:
        lines += [
            "",
            "[Peer]",
            f"PublicKey = {base64.b64encode(public).decode()}",
            f"AllowedIPs = {allowed}",
            f"Endpoint = 127.0.0.1:{peer_port}",
        ]
    return "\n".join(lines) + "\n"


async def run_demo(console: Console, pings: int = 5) -> None:
    """Two nodes, each with its own key pair and UDP port, ping each other over WireGuard."""
    import os
    import socket

    def free_port() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    key_a = crypto.generate_private_key(os.urandom(32))
    key_b = crypto.generate_private_key(os.urandom(32))
    pub_a, pub_b = crypto.public_key(key_a), crypto.public_key(key_b)
    port_a, port_b = free_port(), free_port()
    config_a = _config(
        key_a,
        "100.64.0.1/32, fd7a:115c:a1e0::1/128",
        port_a,
        [(pub_b, "100.64.0.2/32, fd7a:115c:a1e0::2/128", port_b)],
    )
    config_b = _config(
        key_b,
        "100.64.0.2/32, fd7a:115c:a1e0::2/128",
        port_b,
        [(pub_a, "100.64.0.1/32, fd7a:115c:a1e0::1/128", port_a)],
    )

    console.rule("[bold]embedmesh demo: a WireGuard network inside one Python process")
    started = time.perf_counter()
    async with (
        Node(wireguard_config=config_a, listen_host="127.0.0.1") as alpha,
        Node(wireguard_config=config_b, listen_host="127.0.0.1") as beta,
    ):
        await alpha.up()
        await beta.up()
        nodes = Table(title="nodes (no root, no TUN device, no daemon)")
        nodes.add_column("node")
        nodes.add_column("public key")
        nodes.add_column("overlay addresses")
        nodes.add_column("underlay UDP")
        for name, node in (("alpha", alpha), ("beta", beta)):
            nodes.add_row(
                name, node.public_key, ", ".join(str(ip) for ip in node.ips), f"127.0.0.1:{node.listen_port}"
            )
        console.print(nodes)
        console.print(f"both nodes up in {1000 * (time.perf_counter() - started):.1f} ms")

        console.print("\n[bold]alpha pings beta[/] (the first ping carries the Noise_IKpsk2 handshake):")
        for i in range(pings):
            rtt = await alpha.ping("100.64.0.2")
            console.print(f"  64 bytes from 100.64.0.2: icmp_seq={i + 1} time={rtt * 1000:.3f} ms")
        rtt6 = await alpha.ping("fd7a:115c:a1e0::2")
        console.print(f"  64 bytes from fd7a:115c:a1e0::2: icmp_seq=1 time={rtt6 * 1000:.3f} ms  (ICMPv6)")
        console.print("\n[bold]beta pings alpha[/] over the same session:")
        rtt = await beta.ping("100.64.0.1")
        console.print(f"  64 bytes from 100.64.0.1: icmp_seq=1 time={rtt * 1000:.3f} ms")

        peers = Table(title="alpha's view of its peer (like `wg show`)")
        for column in ("peer", "endpoint", "latest handshake", "transfer"):
            peers.add_column(column)
        for peer in alpha.status().peers:
            ago = "never" if peer.last_handshake_ago is None else f"{peer.last_handshake_ago:.2f} s ago"
            peers.add_row(
                peer.public_key,
                f"{peer.endpoint[0]}:{peer.endpoint[1]}" if peer.endpoint else "-",
                ago,
                f"{peer.rx_bytes} B received, {peer.tx_bytes} B sent",
            )
        console.print(peers)
    console.print(
        "[green]done[/]: every packet above was encrypted with WireGuard and carried over loopback UDP."
    )


def main(pings: int = 5) -> None:
    anyio.run(run_demo, Console(), pings)
