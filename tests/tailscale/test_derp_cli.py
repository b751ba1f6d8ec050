"""`embedmesh derp serve`: a real process serves DERP to our client, keeps its key in a 0600 file
(derper's config format), and exits 0 on SIGTERM, after telling every client Restarting (TCP and
WebSocket alike); bad flags are one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner

from embedmesh.cli.main import main
from embedmesh.tailscale import derp
from embedmesh.tailscale.derpclient import DerpClient, DerpConnectError, DerpConnectionClosed, connect_derp
from embedmesh.tailscale.keys import NodePrivate

SERVE = [sys.executable, "-m", "embedmesh.cli.main", "derp", "serve"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_derp_serve_relays_and_stops_on_sigterm(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "derper.json"
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "embedmesh.cli.main", "derp", "serve", "--listen", f"127.0.0.1:{port}", "--key-file", str(key_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith(f"DERP server on http://127.0.0.1:{port}/derp, key nodekey:"), line
        assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.parent.stat().st_mode & 0o777 == 0o700
        server_key = NodePrivate.from_text(json.loads(key_file.read_text())["PrivateKey"]).public()

        async def main() -> None:
            async with connect_derp(f"http://127.0.0.1:{port}/derp", NodePrivate.generate(os.urandom(32))) as client:
                assert client.server_key == server_key
                await client.send(client.public_key, b"loop")
                with anyio.fail_after(10):
                    while (await client.receive()) != derp.PacketReceived(client.public_key, b"loop"):
                        pass

        anyio.run(main)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert "Traceback" not in (process.stderr.read() if process.stderr else "")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_derp_serve_bad_flags_are_one_line(tmp_path: Path) -> None:
    for flags, message in [
        (["--tls-cert", str(tmp_path / "c.pem")], "TLS needs both"),
        (["--verify-client-url", "ftp://x/admit"], "give an http:// or https:// URL"),
        (["--verify-client-url-fail-open"], "needs --verify-client-url"),
        (["--per-client-rate-limit", "-5"], "per-client-rate-limit"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "embedmesh.cli.main", "derp", "serve", "--listen", "127.0.0.1:1", *flags],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode != 0
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_derp_serve_verify_client_url_fails_closed(tmp_path: Path) -> None:
    # Nothing listens at the admission URL: every client is refused (derper's default is open).
    dead, port = _free_port(), _free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "embedmesh.cli.main", "derp", "serve", "--listen", f"127.0.0.1:{port}",
            "--verify-client-url", f"http://127.0.0.1:{dead}/derp/admit",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline().startswith("DERP server on ")

        async def main() -> None:
            with pytest.raises(DerpConnectError, match="login"):
                async with connect_derp(f"http://127.0.0.1:{port}/derp", NodePrivate.generate(os.urandom(32)), timeout=8):
                    pass

        anyio.run(main)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_tells_every_client_restarting_then_exits_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "embedmesh.cli.main", "derp", "serve", "--listen", f"127.0.0.1:{port}",
            "--restart-smear-ms", "800", "--restart-try-for-ms", "4000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("DERP server on ")
        url = f"http://127.0.0.1:{port}/derp"

        async def main() -> None:
            keys = [NodePrivate.generate(os.urandom(32)) for _ in range(3)]
            async with (
                connect_derp(url, keys[0]) as a,
                connect_derp(url, keys[1]) as b,
                connect_derp(url, keys[2], websocket=True) as c,
            ):
                for client in (a, b, c):
                    await client.ping()  # logged in and served
                process.send_signal(signal.SIGTERM)
                for client in (a, b, c):
                    events = []
                    with anyio.fail_after(10):
                        try:
                            while True:
                                events.append(await client.receive())
                        except DerpConnectionClosed:
                            pass  # the server closed the connection after telling us
                    (restarting,) = [e for e in events if isinstance(e, derp.Restarting)]
                    assert restarting.try_for_ms == 4000 and 0 <= restarting.reconnect_in_ms <= 800
                    assert isinstance(events[-1], derp.Restarting)  # nothing after it
            # The listener is closed: nobody new gets in while the server stops.
            with anyio.fail_after(10):
                while process.poll() is None:
                    await anyio.sleep(0.05)

        anyio.run(main)
        assert process.wait(10) == 0
        stderr = process.stderr.read() if process.stderr else ""
        assert "told 3 client(s) to reconnect" in stderr and "Traceback" not in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def _resend_until_received(sender: DerpClient, receiver: DerpClient, data: bytes) -> None:
    with anyio.fail_after(20):
        while True:
            await sender.send(receiver.public_key, data)
            with anyio.move_on_after(0.2):
                while (await receiver.receive()) != derp.PacketReceived(sender.public_key, data):
                    pass
                return


def test_two_derp_serve_processes_mesh_with_each_other(tmp_path: Path) -> None:
    mesh_key = tmp_path / "mesh.key"
    mesh_key.write_text(os.urandom(32).hex() + "\n")
    ports = [_free_port(), _free_port()]
    region = ",".join(f"127.0.0.1:{port}" for port in ports)  # each server finds itself in the list
    processes = [
        subprocess.Popen(
            [*SERVE, "--listen", f"127.0.0.1:{port}", "--mesh-with", region, "--mesh-key-file", str(mesh_key)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for port in ports
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().startswith("DERP server on http://127.0.0.1:")

        async def main() -> None:
            alice_key, bob_key = NodePrivate.generate(os.urandom(32)), NodePrivate.generate(os.urandom(32))
            async with (
                connect_derp(f"http://127.0.0.1:{ports[0]}/derp", alice_key) as alice,
                connect_derp(f"http://127.0.0.1:{ports[1]}/derp", bob_key) as bob,
            ):
                # A server's link to the other retries every 5 s (derper's interval) until the other
                # listens, so each direction gets resent until it arrives.
                for sender, receiver in ((alice, bob), (bob, alice)):
                    await _resend_until_received(sender, receiver, b"through the mesh")

        anyio.run(main)
        for process in processes:
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == 0
            assert "Traceback" not in (process.stderr.read() if process.stderr else "")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_derp_serve_mesh_flags_are_checked(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not hex")
    zero_key = tmp_path / "zero.key"
    zero_key.write_text("00" * 32)
    for flags, message in [
        (["--mesh-with", "127.0.0.1:2"], "needs the region's mesh key"),
        (["--mesh-key-file", str(bad_key)], "64 hex digits"),
        (["--mesh-key-file", str(zero_key)], "all-zero"),
        (["--mesh-key-file", str(tmp_path / "missing.key")], "cannot read the mesh key file"),
        (["--mesh-with", "a:b:c"], "--mesh-with"),
    ]:
        result = CliRunner().invoke(main, ["derp", "serve", "--listen", "127.0.0.1:1", *flags])
        assert result.exit_code == 1, (flags, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (flags, result.stderr)
