"""Real DERP peers both ways (issue 10): tailscaled and an embedmesh Node that cannot reach each
other over UDP talk through embedmesh's embedded DERP relay, and through Tailscale's derper; the
relay's host sees only ciphertext.

The rig: `embedmesh control serve` (with its embedded relay, region 999, or with a derper as region
900 and `--no-derp`) in one namespace, tailscaled (v1.102.5, userspace networking) in another, the
Node in the test process. UDP between tailscaled's host and the Node is dropped (iptables in
tailscaled's namespace), so the only path is DERP over TCP.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from tailnet import EmbedmeshControl, TailnetRig, TailscaleBins

import embedmesh

pytestmark = pytest.mark.interop

#: A payload whose bytes must never appear in the clear on the relay's host.
SECRET = b"embedmesh-plaintext-marker-" + os.urandom(8).hex().encode()


async def _secret(request: Request) -> PlainTextResponse:
    return PlainTextResponse(SECRET.decode() * 4)


@pytest.mark.parametrize(
    ("relays", "region", "tls"),
    [("embedded", "embedmesh", True), ("embedded", "embedmesh", False), ("derper", "test", False)],
    ids=["embedded-tls", "embedded-http", "derper-http"],
)
def test_tailscaled_and_a_node_talk_only_through_a_relay(
    tailnet: TailnetRig,
    tailscale_bins: TailscaleBins,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    relays: str,
    region: str,
    tls: bool,
) -> None:
    """With ``tls`` both sides speak TLS to the embedded relay, as by default, and check its
    self-signed certificate against the map's ``CertName: "sha256-raw:<hex>"`` pin (tailscaled
    with Go's SetConfigExpectedCertHash); otherwise plain HTTP (the rig's derper speaks only that;
    the embedded relay answers both on one port)."""
    started = time.monotonic()
    if tls:
        monkeypatch.delenv("TS_DEBUG_USE_DERP_HTTP", raising=False)
    else:
        monkeypatch.setenv("TS_DEBUG_USE_DERP_HTTP", "1")
    root_ip = tailnet.attach_root()
    control = EmbedmeshControl(tailnet, tailscale_bins, relays=relays)
    key = control.key(reusable=True)
    ts = tailnet.tailscaled(tailscale_bins, "ts-a", derp_tls=tls)
    for chain, flag in (("OUTPUT", "-d"), ("INPUT", "-s")):
        ts.host.ns.run(["iptables", "-I", chain, "-p", "udp", flag, root_ip, "-j", "DROP"])
    ts.up(control.url, key)
    service = ts.host.ns.popen(
        [sys.executable, "-m", "http.server", "8000", "--bind", "127.0.0.1", "--directory", str(tmp_path)],
        log_name="ts-a-http",
    )
    (tmp_path / "file.txt").write_text("served behind the relay\n")
    capture = tailnet.rig.capture(control.host.ns, control.host.ifname, "tcp")
    app = Starlette(routes=[Route("/secret", _secret)])

    async def main() -> None:
        async with (
            embedmesh.Node(
                control_url=control.url, hostname="py", auth_key=key, state_dir=tmp_path / "py", listen_host=root_ip
            ) as node,
            anyio.create_task_group() as tg,
        ):
            await node.up(timeout=30)
            tg.start_soon(node.serve_asgi, app, ":8080")
            await anyio.to_thread.run_sync(lambda: ts.wait_peers({"py.mesh.internal"}))
            out = await anyio.to_thread.run_sync(lambda: ts.ping_when_known(str(node.ips[0]), "--until-direct=false"))
            assert re.search(rf"pong from py \(100\.\S+\) via DERP\({region}\)", out), out
            first_byte = time.monotonic()
            body = await anyio.to_thread.run_sync(lambda: ts.curl("http://py.mesh.internal:8080/secret"))
            assert body == SECRET.decode() * 4
            print(f"relay {region}: first byte from tailscaled {time.monotonic() - first_byte:.2f}s after the ping")
            async with node.http_client() as http:
                reply = await http.get("http://ts-a.mesh.internal:8000/file.txt")
                assert reply.text == "served behind the relay\n"
            (peer,) = node.status().peers
            assert peer.path == "derp" and peer.path_address == region, (peer.path, peer.path_address)
            assert f'relay "{region}"' in peer.path_text
            tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    finally:
        control.admin.close()
        service.terminate()
    capture.stop()
    data = capture.path.read_bytes()
    # The relay's host carried the exchange (thousands of bytes of TCP) and never the plaintext.
    assert len(data) > 4000
    assert SECRET not in data
    print(f"tailscaled <-> embedmesh through {relays} relay, proved in {time.monotonic() - started:.1f}s")
