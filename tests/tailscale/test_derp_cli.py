"""`embedmesh derp serve`: a real process serves DERP to our client, keeps its key in a 0600 file
(derper's config format), and exits 0 on SIGTERM; bad flags are one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio

from embedmesh.tailscale import derp
from embedmesh.tailscale.derpclient import connect_derp
from embedmesh.tailscale.keys import NodePrivate


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
    result = subprocess.run(
        [sys.executable, "-m", "embedmesh.cli.main", "derp", "serve", "--listen", "127.0.0.1:1", "--tls-cert", str(tmp_path / "c.pem")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "TLS needs both" in result.stderr and "Traceback" not in result.stderr
