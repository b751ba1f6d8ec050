"""MagicDNS over real WireGuard: a stock wireguard-go peer in a network namespace, whose
configuration says ``DNS = 100.100.100.100`` in effect (AllowedIPs includes 100.100.100.100/32 and
fd7a:115c:a1e0::53/128 on the embedmesh node's entry), asks with dig and dnspython.

The real path: a coordination server on loopback, an embedmesh tailnet node ``db`` bound to the
root end of a veth link, a second embedmesh node ``web`` on loopback, and the wireguard-go peer
registered in the same tailnet (a control client with its key) so every node has it in its map.
Names outside the tailnet go to a test resolver on 127.0.0.1 in the root namespace.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import anyio
import pytest
from netns import NetnsRig, generate_keypair, skip_unless_tool

from embedmesh import Node
from embedmesh.tailscale.client import TailscaleControlClient
from embedmesh.wireguard.crypto import generate_private_key

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.control.control_harness import Admin, start_server  # noqa: E402
from tests.dns.dns_harness import TestUpstream, zone_handler  # noqa: E402


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[Any, Admin]]:
    running = start_server(tmp_path / "control")
    try:
        yield running, Admin(running)
    finally:
        running.stop()


def dig(ns: Any, *args: str) -> str:
    result = ns.run(["dig", "+time=3", "+tries=2", *args], check=False, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    return str(result.stdout)


def short(ns: Any, *args: str) -> list[str]:
    return dig(ns, "+short", *args).split()


DNSPYTHON_CLIENT = textwrap.dedent(
    """
    import sys
    import dns.resolver
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [sys.argv[1]]
    resolver.lifetime = 8
    for name, rdtype in (("db", "A"), ("web.mesh.internal", "A"), ("db.mesh.internal", "AAAA")):
        print(name, rdtype, *sorted(r.to_text() for r in resolver.resolve(name, rdtype)))
    try:
        resolver.resolve("nobody.mesh.internal", "A")
    except dns.resolver.NXDOMAIN:
        print("nobody NXDOMAIN")
    print("ptr", resolver.resolve_address(sys.argv[2])[0].to_text())
    """
)


def test_wireguard_go_peer_uses_magicdns_at_100_100_100_100(
    wg_rig: NetnsRig, control: tuple[Any, Admin]
) -> None:
    skip_unless_tool("dig", "dnsutils")
    running, admin = control
    key = admin.key(reusable=True)
    ns = wg_rig.add_namespace("dns")
    link = wg_rig.veth_to_root(ns)
    wg_keys = generate_keypair()
    upstream = TestUpstream(zone_handler({("example.com", "A"): ["93.184.216.34"]}))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            up_port = await tg.start(upstream.run)
            # The wireguard-go peer joins the tailnet under its own WireGuard key.
            peer_client = TailscaleControlClient(
                running.url,
                machine_key=generate_private_key(os.urandom(32)),
                node_key=wg_keys.private_raw,
                # wireguard-go speaks no disco: a zero disco key says so (as for Tailscale's
                # WireGuard-only peers), so no node waits for its pongs.
                disco_key=bytes(32),
                hostname="wgpeer",
                auth_key=key,
                endpoints=[f"{link.b.ip}:51820"],
            )
            async with (
                peer_client,
                Node(
                    hostname="db",
                    control_url=running.url,
                    auth_key=key,
                    listen_host=link.a.ip,
                    dns_upstreams=[f"127.0.0.1:{up_port}"],
                    dns_forward_for_peers=True,  # the WireGuard peer uses db as its resolver
                ) as db,
                Node(
                    hostname="web",
                    control_url=running.url,
                    auth_key=key,
                    listen_host="127.0.0.1",
                    dns_upstreams=[],
                ) as web,
            ):
                await db.up(timeout=10)
                await web.up(timeout=10)
                assert peer_client.netmap is not None
                peer_addresses = peer_client.netmap.self_node.addresses
                v4 = next(a for a in peer_addresses if a.version == 4)
                v6 = next(a for a in peer_addresses if a.version == 6)
                wg = wg_rig.start_wireguard(ns, wg_keys, 51820, [f"{v4}/10", f"{v6}/48"])
                wg.add_peer(
                    db.public_key,
                    [f"{db.ips[0]}/32", f"{db.ips[1]}/128", "100.100.100.100/32", "fd7a:115c:a1e0::53/128"],
                    endpoint=(link.a.ip, db.listen_port),
                )
                with anyio.fail_after(10):
                    while db.netmap is None or len(db.netmap.peers) < 2:
                        await anyio.sleep(0.02)

                def checks() -> None:
                    # Short names, FQDNs, AAAA, PTR, the peer's own name, over UDP and TCP.
                    assert short(ns, "@100.100.100.100", "web") == [str(web.ips[0])]
                    assert short(ns, "@100.100.100.100", "db.mesh.internal") == [str(db.ips[0])]
                    assert short(ns, "@100.100.100.100", "DB.Mesh.Internal", "AAAA") == [str(db.ips[1])]
                    assert short(ns, "@100.100.100.100", "wgpeer") == [str(v4)]
                    assert short(ns, "@100.100.100.100", "-x", str(web.ips[0])) == ["web.mesh.internal."]
                    assert short(ns, "@100.100.100.100", "-x", str(db.ips[1])) == ["db.mesh.internal."]
                    assert short(ns, "@100.100.100.100", "+tcp", "web.mesh.internal") == [str(web.ips[0])]
                    # IPv6 transport to the IPv6 service address.
                    assert short(ns, "@fd7a:115c:a1e0::53", "db", "AAAA") == [str(db.ips[1])]
                    assert short(ns, "@fd7a:115c:a1e0::53", "+tcp", "web") == [str(web.ips[0])]
                    # Unknown names: NXDOMAIN with the zone's SOA; forwarded names: the upstream's answer.
                    out = dig(ns, "@100.100.100.100", "nobody.mesh.internal")
                    assert "status: NXDOMAIN" in out and "SOA" in out and "flags: qr aa" in out
                    assert short(ns, "@100.100.100.100", "example.com") == ["93.184.216.34"]
                    assert "status: NXDOMAIN" in dig(ns, "@100.100.100.100", "missing.example.com")

                await anyio.to_thread.run_sync(checks)
                assert ("udp", "example.com.", "A") in upstream.queries

                # dnspython as a second client, from inside the namespace.
                result = await anyio.to_thread.run_sync(
                    lambda: ns.run(
                        [sys.executable, "-c", DNSPYTHON_CLIENT, "100.100.100.100", str(web.ips[0])],
                        check=False,
                        timeout=60,
                    )
                )
                assert result.returncode == 0, result.stdout + result.stderr
                lines = result.stdout.splitlines()
                assert lines[0] == f"db A {db.ips[0]}"
                assert lines[1] == f"web.mesh.internal A {web.ips[0]}"
                assert lines[2] == f"db.mesh.internal AAAA {db.ips[1]}"
                assert lines[3] == "nobody NXDOMAIN"
                assert lines[4] == "ptr web.mesh.internal."

                # A rename: the first map that carries it changes the answers (no stale name).
                web_id = web._control.node_id  # type: ignore[union-attr]
                admin.post(f"/nodes/{web_id}/rename", name="frontend")
                with anyio.fail_after(10):
                    while db.netmap is None or db.netmap.peers[web_id].name != "frontend":
                        await anyio.sleep(0.005)
                renamed = await anyio.to_thread.run_sync(
                    lambda: (
                        short(ns, "@100.100.100.100", "frontend"),
                        dig(ns, "@100.100.100.100", "web.mesh.internal"),
                        short(ns, "@100.100.100.100", "-x", str(web.ips[0])),
                    )
                )
                assert renamed[0] == [str(web.ips[0])]
                assert "status: NXDOMAIN" in renamed[1]
                assert renamed[2] == ["frontend.mesh.internal."]

                # A removal: gone from the very next map.
                admin.delete(web_id)
                with anyio.fail_after(10):
                    while db.netmap is None or web_id in db.netmap.peers:
                        await anyio.sleep(0.005)
                out = await anyio.to_thread.run_sync(
                    lambda: dig(ns, "@100.100.100.100", "frontend.mesh.internal")
                )
                assert "status: NXDOMAIN" in out
                counters = db.dns.resolver.counters
                assert counters["local"] >= 15 and counters["forwarded"] >= 2
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_static_mode_node_serves_its_own_names_extra_records_and_split_dns(wg_rig: NetnsRig) -> None:
    """A plain WireGuard network (wg-quick configuration, no coordination server): the node gets
    its names from a network map built here, with extra records and a split-DNS route."""
    skip_unless_tool("dig", "dnsutils")
    from test_wireguard_interop import NODE_V4, PEER_V4, PEER_V6, setup
    from tests.dns.dns_harness import AdminDNSConfig, netmap, peer

    from embedmesh.dns.records import MagicZone

    config, ns, (wg, link) = setup(wg_rig)
    wg.add_peer(
        generate_public_of(config),
        [f"{NODE_V4}/32", "fd7a:115c:a1e0::1/128", "100.100.100.100/32"],
        endpoint=(link.a.ip, 51901),
    )
    ns.ip("route", "add", "100.100.100.100/32", "dev", wg.ifname)
    lab = TestUpstream(zone_handler({("nas.lab.example", "A"): ["10.9.0.7"]}))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            lab_port = await tg.start(lab.run)
            dns_config = AdminDNSConfig(
                extra_records=(("printer", "A", "100.64.0.50"), ("docs", "CNAME", "kernel.mesh.internal")),
                split_dns={"lab.example": (f"127.0.0.1:{lab_port}",)},
            )
            names = netmap(
                peer(2, "kernel", PEER_V4, PEER_V6),
                me=peer(1, "static", NODE_V4, "fd7a:115c:a1e0::1"),
                dns=dns_config,
            )
            async with Node(wireguard_config=config, listen_host=link.a.ip, dns_upstreams=[]) as node:
                await node.up()
                node.dns.set_zone(MagicZone.from_netmap(names))

                def checks() -> None:
                    assert short(ns, "@100.100.100.100", "kernel") == [PEER_V4]
                    assert short(ns, "@100.100.100.100", "static.mesh.internal") == [NODE_V4]
                    assert short(ns, "@100.100.100.100", "printer") == ["100.64.0.50"]
                    assert short(ns, "@100.100.100.100", "docs.mesh.internal") == [
                        "kernel.mesh.internal.",
                        PEER_V4,
                    ]
                    assert short(ns, "@100.100.100.100", "-x", PEER_V6) == ["kernel.mesh.internal."]
                    assert short(ns, "@100.100.100.100", "nas.lab.example") == ["10.9.0.7"]
                    # Names for the host's resolvers: not for peers (the node does not opt in).
                    assert "status: REFUSED" in dig(ns, "@100.100.100.100", "example.com")

                await anyio.to_thread.run_sync(checks)
                assert lab.queries == [("udp", "nas.lab.example.", "A")]
                assert await node.resolve("kernel") == [ip_address(PEER_V4), ip_address(PEER_V6)]
                assert await node.ping("kernel") > 0
            tg.cancel_scope.cancel()

    anyio.run(main)


def generate_public_of(config: str) -> str:
    import re

    from netns import public_key as wg_public_key

    private = re.search(r"PrivateKey = (\S+)", config)
    assert private
    return wg_public_key(private.group(1))
