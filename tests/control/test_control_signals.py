"""``embedmesh control serve`` stops cleanly on the signals service managers send.

systemd and ``docker stop`` send SIGTERM, a closed terminal SIGHUP: the server closes its node
streams and the store, and exits 0 (uvicorn's own handlers used to re-raise the signal after the
graceful stop, so the process died with status -15).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

from embedmesh import Node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(state: Path, port: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedmesh.cli.main",
            "control",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(state),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError("control server did not start")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_control_serve_stops_cleanly_on_a_signal_with_a_node_connected(
    tmp_path: Path, signum: signal.Signals
) -> None:
    state = tmp_path / "server"
    port = _free_port()
    process = _start(state, port)
    try:
        token = (state / "admin-token").read_text().strip()
        key = httpx.post(
            f"http://127.0.0.1:{port}/admin/v1/authkeys",
            json={"reusable": True},
            headers={"authorization": f"Bearer {token}"},
        ).json()["key"]

        async def main() -> None:
            # A node holds its long-lived stream open while the server is told to stop.
            node = Node(
                hostname="held", control_url=f"http://127.0.0.1:{port}", auth_key=key, listen_host="127.0.0.1"
            )
            async with node:
                await node.up(timeout=10)
                process.send_signal(signum)
                code = await anyio.to_thread.run_sync(lambda: process.wait(15))
                assert code == 0

        anyio.run(main)
        output = process.stdout.read() if process.stdout else ""
        assert f"{signum.name}: stopping the control server" in output
        assert "Traceback" not in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
