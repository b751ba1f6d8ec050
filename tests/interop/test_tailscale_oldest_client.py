"""The oldest client the control server serves (issue 9, "serve every client from Tailscale 1.80 to
1.102"): tailscaled and the CLI of tailscale.com v1.80.3 (capability version 113) join an embedmesh
control server beside a current tailscaled (v1.102.5) and an embedmesh Node.

Proved: `tailscale up --authkey` brings 1.80 to Running; its `tailscale status --json` lists the
Node by MagicDNS name; `tailscale ping` gets a direct pong from the Node; curl through its SOCKS5
server fetches the Node's `serve_asgi` app by name; 1.80 and 1.102 ping each other. And the server
answers each its own version's form: with a non-default key lifetime (`--key-expiry 90d`) the
1.102 client finds it in its self node's CapMap (`tailnet.maxKeyDuration`, from capability
version 114), while 1.80, which reads MapResponse.MaxKeyDuration instead, has no such attribute.
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
from tailnet import EmbedmeshControl, TailnetRig, TailscaleBins, serving_node

pytestmark = pytest.mark.interop

DOMAIN = "mesh.internal"
NINETY_DAYS = 90 * 86400


async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"hello, {request.client.host if request.client else '?'}\n")


def test_tailscale_1_80_joins_an_embedmesh_tailnet(
    tailnet: TailnetRig,
    oldest_tailscale_bins: TailscaleBins,
    tailscale_bins: TailscaleBins,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    root_ip = tailnet.attach_root()
    control = EmbedmeshControl(tailnet, tailscale_bins, "--key-expiry", "90d")
    key = control.key(reusable=True)
    old = tailnet.tailscaled(oldest_tailscale_bins, "old")
    new = tailnet.tailscaled(tailscale_bins, "new")
    try:
        assert old.cli("version").stdout.splitlines()[0] == "1.80.3"
        old.up(control.url, key)
        new.up(control.url, key)
        old_status = old.status()
        assert old_status["BackendState"] == "Running" and old_status["Version"].startswith("1.80.3")
        old.wait_peers({f"new.{DOMAIN}"})

        # Each client got its version's form of the tailnet's key lifetime (1.80's status lists its
        # self node's CapMap too, so the attribute would show there had it been sent).
        self_caps = new.status()["Self"].get("CapMap") or {}
        assert self_caps.get("tailnet.maxKeyDuration") == [NINETY_DAYS], self_caps
        assert "tailnet.maxKeyDuration" not in (old.status()["Self"].get("CapMap") or {})

        # 1.80 and 1.102 reach each other through the embedmesh map (disco, then WireGuard).
        out = old.ping_when_known(new.ipv4())
        assert re.search(r"pong from new \(100\.\S+\) via ", out), out
        out = new.ping_when_known(old.ipv4())
        assert re.search(r"pong from old \(100\.\S+\) via ", out), out

        app = Starlette(routes=[Route("/hello", _hello)])

        async def main() -> None:
            async with serving_node(control.url, key, tmp_path / "py", root_ip, app) as node:
                await anyio.to_thread.run_sync(lambda: old.wait_peers({f"py.{DOMAIN}", f"new.{DOMAIN}"}))
                peers = {p["DNSName"]: p for p in (old.status().get("Peer") or {}).values()}
                assert str(node.ips[0]) in peers[f"py.{DOMAIN}."]["TailscaleIPs"]

                out = await anyio.to_thread.run_sync(lambda: old.ping_when_known(str(node.ips[0])))
                assert re.search(rf"pong from py \(100\.\S+\) via {re.escape(root_ip)}:\d+", out), out
                body = await anyio.to_thread.run_sync(lambda: old.curl(f"http://py.{DOMAIN}:8080/hello"))
                assert body == f"hello, {old.ipv4()}\n"
                # And the Node reaches the old client back over WireGuard, by name.
                assert await node.ping(f"old.{DOMAIN}", timeout=10) < 5

        anyio.run(main)
    finally:
        control.admin.close()
    print(f"tailscaled 1.80.3 in an embedmesh tailnet, proved in {time.monotonic() - started:.1f}s")
