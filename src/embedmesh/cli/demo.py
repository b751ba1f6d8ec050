"""``embedmesh demo``: a complete tailnet on loopback in one command.

A coordination server on SQLite in a temporary folder, then three nodes joining it with an auth
key: ``web`` serves a small ASGI app, ``laptop`` and ``ci-runner`` (ephemeral) reach it by name
across the mesh. Everything runs in this process; every packet between nodes is WireGuard over
loopback UDP, and the server only matches keys and addresses.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.table import Table

from embedmesh.node import Node


def hello_app(node: Node) -> Any:
    """A tiny ASGI app on ``node``: says who called, using the caller's mesh identity (whois)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        caller = node.whois(scope["client"][0]) if scope.get("client") else None
        body = json.dumps({"served_by": node.name, "caller": caller.name if caller else None}).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


async def http_get(node: Node, url: str) -> tuple[int, bytes, float]:
    """GET ``url`` over the tailnet with the node's httpx client (names through MagicDNS), timed."""
    async with node.http_client(timeout=10) as client:
        started = time.perf_counter()
        response = await client.get(url)
        elapsed = time.perf_counter() - started
    return response.status_code, response.content, elapsed


async def run_demo(console: Console, pings: int = 3) -> None:
    from embedmesh.control.server import ControlServer, ServerConfig

    console.rule("[bold]embedmesh demo: a tailnet inside one Python process")
    with tempfile.TemporaryDirectory(prefix="embedmesh-demo-") as tmp:
        state = Path(tmp)
        started = time.perf_counter()
        server = ControlServer(ServerConfig(state_dir=state / "control")).start_in_thread("127.0.0.1", 0)
        try:
            console.print(
                f"coordination server on [cyan]{server.url}[/] (SQLite in {state / 'control'}), "
                f"key {server.server.public_key_b64[:12]}…"
            )
            key = server.call(
                lambda: server.server.coordinator.create_auth_key(reusable=True, now=time.time())[1]
            )
            console.print("created a reusable auth key [dim](stored hashed; never sent in clear)[/]\n")

            def make(name: str, **options: Any) -> Node:
                return Node(
                    hostname=name, control_url=server.url, auth_key=key, listen_host="127.0.0.1", **options
                )

            async with (
                make("web", state_dir=state / "web") as web,
                make("laptop", state_dir=state / "laptop") as laptop,
                make("ci-runner", ephemeral=True) as ci,
            ):
                for node in (web, laptop, ci):
                    await node.up(timeout=15)
                joined = time.perf_counter() - started
                nodes = Table(
                    title=f"nodes joined in {joined * 1000:.0f} ms (no root, no TUN device, no daemon)"
                )
                for column in ("name", "overlay addresses", "underlay UDP", "ephemeral"):
                    nodes.add_column(column)
                for node in (web, laptop, ci):
                    nodes.add_row(
                        node.fqdn,
                        ", ".join(str(ip) for ip in node.ips),
                        f"127.0.0.1:{node.listen_port}",
                        "yes" if node.ephemeral else "no",
                    )
                console.print(nodes)

                await web.serve_asgi(hello_app(web), ":80")
                console.print("\n[bold]web[/] serves an ASGI app on port 80 of the tailnet.")
                with anyio.fail_after(10):
                    while any(n.netmap is None or len(n.netmap.peers) < 2 for n in (web, laptop, ci)):
                        await anyio.sleep(0.02)

                for client in (laptop, ci):
                    status, body, elapsed = await http_get(client, "http://web/hello")
                    console.print(
                        f"  {client.name} → GET http://web/hello → {status} in {elapsed * 1000:.1f} ms: "
                        f"[green]{body.decode()}[/]"
                    )

                console.print(f"\n[bold]laptop pings web[/] by name ({pings} ICMP echoes over WireGuard):")
                for i in range(pings):
                    rtt = await laptop.ping("web")
                    console.print(
                        f"  reply from web.mesh.internal: icmp_seq={i + 1} time={rtt * 1000:.3f} ms"
                    )

                view = Table(title="laptop's view of the tailnet (like `tailscale status`)")
                for column in ("peer", "address", "endpoint", "handshake", "transfer"):
                    view.add_column(column)
                for peer in laptop.status().peers:
                    ago = (
                        "no handshake yet" if peer.last_handshake_ago is None else f"{peer.last_handshake_ago:.1f} s ago"
                    )
                    view.add_row(
                        peer.fqdn,
                        peer.allowed_ips[0].split("/")[0] if peer.allowed_ips else "-",
                        f"{peer.endpoint[0]}:{peer.endpoint[1]}" if peer.endpoint else "-",
                        ago,
                        f"{peer.rx_bytes} B in, {peer.tx_bytes} B out",
                    )
                console.print(view)
            coordinator = server.server.coordinator
            names = server.call(lambda: [coordinator.describe(n)["name"] for n in coordinator.nodes()])
            console.print(
                f"\nnodes closed; the ephemeral ci-runner logged out and is gone: the server now lists {names}."
            )
        finally:
            server.stop()
    console.print("[green]done[/]: the server never saw a data packet; every request above was WireGuard.")


def main(pings: int = 3) -> None:
    anyio.run(run_demo, Console(), pings)
