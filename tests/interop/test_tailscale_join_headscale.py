"""An embedmesh Node joins a headscale tailnet (issue 9: "embedmesh nodes join Tailscale-protocol
tailnets"), next to a real tailscaled of tailscale.com v1.102.5.

The Node runs in the test process (the root namespace, attached to the rig's hub); headscale and
tailscaled run in namespaces of their own. Proved: the Tailscale control protocol end to end
(ts2021, HTTP/2, register with a pre-auth key, the zstd map stream), MagicDNS names from the map,
disco (tailscaled's `tailscale ping` gets pongs from the Node's UDP socket, which is what makes
tailscaled send WireGuard to it directly), and TCP both ways over WireGuard.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from tailnet import TailnetRig, TailscaleBins

import embedmesh

pytestmark = pytest.mark.interop


async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"embedmesh says hello to {request.client.host if request.client else '?'}\n")


def test_an_embedmesh_node_joins_a_headscale_tailnet(
    tailnet: TailnetRig, tailscale_bins: TailscaleBins, headscale_bin: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    root_ip = tailnet.attach_root()
    hs = tailnet.headscale(headscale_bin)
    key = hs.create_authkey()
    ts = tailnet.tailscaled(tailscale_bins, "ts-a")
    ts.up(hs.url, key)
    domain = hs.base_domain
    app = Starlette(routes=[Route("/hello", _hello)])

    async def main() -> None:
        async with (
            embedmesh.Node(
                control_url=hs.url,
                hostname="py",
                auth_key=key,
                state_dir=tmp_path / "py",
                listen_host=root_ip,
            ) as node,
            anyio.create_task_group() as tg,
        ):
            await node.up(timeout=30)
            assert node.fqdn == f"py.{domain}"
            assert str(node.ips[0]).startswith("100.64.")
            tg.start_soon(node.serve_asgi, app, ":8080")
            # headscale lists the node; tailscaled has it in its map by its MagicDNS name.
            assert "py" in {n["given_name"] for n in hs.nodes()}
            await anyio.to_thread.run_sync(lambda: ts.wait_peers({f"py.{domain}"}))
            # The Node has tailscaled in its map, and resolves it by MagicDNS name.
            with anyio.fail_after(20):
                while node.netmap is None or node.netmap.peer_by_name("ts-a") is None:
                    await anyio.sleep(0.2)
            (ts_ip,) = [ip for ip in await node.resolve(f"ts-a.{domain}") if ip.version == 4]
            assert str(ts_ip) == ts.ipv4()

            # Disco: tailscaled's ping gets a pong over the direct path, from the Node's socket.
            # (tailscaled puts a new peer into its engine a moment after its map has it: until
            # then its ping says "unknown peer".)
            out = await anyio.to_thread.run_sync(lambda: ts.ping_when_known(str(node.ips[0])))
            assert re.search(rf"pong from py \(100\.\S+\) via {re.escape(root_ip)}:\d+", out), out

            # tailscaled -> Node: its SOCKS5 server carries curl to the Node's ASGI app by name.
            body = await anyio.to_thread.run_sync(lambda: ts.curl(f"http://py.{domain}:8080/hello"))
            assert body == f"embedmesh says hello to {ts.ipv4()}\n"
            # Node -> tailscaled: ping over WireGuard (tailscaled's netstack answers ICMP echo).
            rtt = await node.ping(f"ts-a.{domain}", timeout=10)
            assert rtt < 5
            tg.cancel_scope.cancel()

    anyio.run(main)
    print(
        f"embedmesh node in a headscale tailnet with tailscaled, proved in {time.monotonic() - started:.1f}s"
    )


def test_a_node_without_a_key_shows_headscales_login_url(
    tailnet: TailnetRig, headscale_bin: Path, tmp_path: Path
) -> None:
    """As `tailscale up` does: no auth key, so the server's AuthURL is what the node waits for;
    once an admin completes the login (headscale's `auth register`), up() returns."""
    root_ip = tailnet.attach_root()
    hs = tailnet.headscale(headscale_bin)
    hs.user_id("test")

    async def main() -> None:
        async with embedmesh.Node(
            control_url=hs.url, hostname="interactive", state_dir=tmp_path / "n", listen_host=root_ip
        ) as node:
            with pytest.raises(
                embedmesh.errors.UpTimeoutError, match="waiting for a login: open http"
            ) as caught:
                await node.up(timeout=2)
            assert caught.value.waiting_for == "login"
            auth_url = node.status().auth_url
            assert f"{hs.url}/register/" in auth_url
            auth_id = auth_url.rstrip("/").rsplit("/", 1)[1]
            await anyio.to_thread.run_sync(
                lambda: hs.cli("auth", "register", "--auth-id", auth_id, "--user", "test")
            )
            await node.up(timeout=30)
            assert node.fqdn == f"interactive.{hs.base_domain}" and node.status().auth_url == ""

    anyio.run(main)
