"""The Tailscale rig proved with real software only: headscale, two tailscaleds and a tsnet program.

This is the yardstick the embedmesh control server and node are held to later (issue 9): what real
clients do with headscale, they must do with embedmesh.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from netns import RigError
from tailnet import TailnetRig, TailscaleBins


def test_hosts_reach_each_other_through_the_dead_end_and_nothing_else(tailnet: TailnetRig) -> None:
    a, b = tailnet.add_host("a"), tailnet.add_host("b")
    a.ns.run(["ping", "-n", "-c", "1", "-W", "2", b.ip])
    b.ns.run(["ping", "-n", "-c", "1", "-W", "2", a.ip])
    # Each host has a default route (tsnet and tailscaled pause without one) into the hub ...
    for host in (a, b):
        assert "default via" in host.ns.ip("route", "show").stdout
    # ... and the hub has no route anywhere but the hosts' links: no packet leaves the machine.
    # (`ip route get` only asks the routing table; nothing is sent.)
    assert "default" not in tailnet.hub.ip("route", "show").stdout
    with pytest.raises(RigError, match="unreachable"):
        tailnet.hub.ip("route", "get", "192.0.2.1")


def test_headscale_tailnet_of_real_clients(
    tailnet: TailnetRig, tailscale_bins: TailscaleBins, headscale_bin: Path, tsnetpeer_bin: Path
) -> None:
    started = time.monotonic()
    hs = tailnet.headscale(headscale_bin)
    key = hs.create_authkey()
    a = tailnet.tailscaled(tailscale_bins, "ts-a")
    b = tailnet.tailscaled(tailscale_bins, "ts-b")
    web = tailnet.tsnet(tsnetpeer_bin, "tsnet-web", hs.url, key, "-http", "80")
    # The three join at once: a pre-auth key each, no approval step.
    waits = [a.up_async(hs.url, key), b.up_async(hs.url, key)]
    for wait in waits:
        wait()
    web.wait_event("serving")

    domain = hs.base_domain
    names = {f"ts-a.{domain}", f"ts-b.{domain}", f"tsnet-web.{domain}"}
    assert {n["given_name"] for n in hs.nodes()} == {"ts-a", "ts-b", "tsnet-web"}
    a.wait_peers(names - {f"ts-a.{domain}"})
    b.wait_peers(names - {f"ts-b.{domain}"})

    # Disco: a pong over the direct path (b's namespace address, its --port), not via DERP.
    out = a.ping("ts-b")
    assert re.search(rf"pong from ts-b \(100\.\S+\) via {re.escape(b.host.ip)}:41641", out), out

    # b's SOCKS5 server resolves the MagicDNS name and carries the TCP connection to the tsnet node.
    # Its dial fails at once while no path to the tsnet node is proven yet (under load the first
    # WireGuard handshake answer can be lost and is retried only after 5 s), so the path is
    # warmed with a disco ping first, as a user would, and a first refused dial is retried.
    b.ping("tsnet-web")
    body = ""
    for attempt in range(3):
        try:
            body = b.curl(f"http://tsnet-web.{domain}/hello")
            break
        except RigError as exc:
            if "(97)" not in str(exc) or attempt == 2:
                raise
            time.sleep(2)
    assert body == "tsnetpeer tsnet-web /hello\n"
    print(f"tailnet of headscale + 2 tailscaled + tsnet proved in {time.monotonic() - started:.1f}s")
