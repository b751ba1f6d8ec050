"""`embedmesh up` as a real process: local API (status, ping), SOCKS5, --serve and --forward."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_node_static import _configs

EMBEDMESH = [sys.executable, "-m", "embedmesh.cli.main"]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.terminate()
    for p in started:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def test_up_with_local_api_socks5_serve_and_forward(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    port_b = free_port(socket.SOCK_DGRAM)
    a_text, b_text = _configs()
    a_conf, b_conf = tmp_path / "a.conf", tmp_path / "b.conf"
    a_conf.write_text(a_text.replace("{port_b}", str(port_b)))
    b_conf.write_text(b_text.replace("[Interface]\n", f"[Interface]\nListenPort = {port_b}\n"))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("served from B's host\n")
    http_port, socks_port, forward_port = free_port(), free_port(), free_port()
    procs.append(
        subprocess.Popen(
            [sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1"],
            cwd=tmp_path / "site",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    state_a = tmp_path / "state-a"
    procs.append(
        subprocess.Popen(
            [
                *EMBEDMESH,
                "up",
                "--wireguard-config",
                str(b_conf),
                "--listen-host",
                "127.0.0.1",
                "--serve",
                f"80=127.0.0.1:{http_port}",
            ]
        )
    )
    procs.append(
        subprocess.Popen(
            [
                *EMBEDMESH,
                "up",
                "--wireguard-config",
                str(a_conf),
                "--listen-host",
                "127.0.0.1",
                "--state-dir",
                str(state_a),
                "--socks5",
                f"127.0.0.1:{socks_port}",
                "--forward",
                f"127.0.0.1:{forward_port}=100.64.0.2:80",
            ]
        )
    )
    wait_for(
        lambda: port_open(socks_port) and port_open(http_port) and (state_a / "embedmesh.sock").exists(),
        what="the nodes to start",
    )
    assert oct((state_a / "embedmesh.sock").stat().st_mode & 0o777) == "0o600"

    ping = subprocess.run(
        [*EMBEDMESH, "ping", "100.64.0.2", "--state-dir", str(state_a), "-c", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert ping.stdout.count("pong from 100.64.0.2") == 2

    status = subprocess.run(
        [*EMBEDMESH, "status", "--state-dir", str(state_a), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0, status.stderr
    assert '"100.64.0.1"' in status.stdout and f'"127.0.0.1",\n        {port_b}' in status.stdout

    if shutil.which("curl"):
        via_socks = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--socks5-hostname",
                f"127.0.0.1:{socks_port}",
                "http://100.64.0.2/index.html",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert via_socks.stdout == "served from B's host\n", via_socks.stderr
    with socket.create_connection(("127.0.0.1", forward_port), timeout=10) as s:
        s.sendall(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        response = b""
        while chunk := s.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.0 200") and response.endswith(b"served from B's host\n")


def test_status_without_a_running_node_says_what_to_do(tmp_path: Path) -> None:
    result = subprocess.run(
        [*EMBEDMESH, "status", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ},
    )
    assert result.returncode != 0
    assert result.stderr == (
        f"Error: no node is running (state dir {tmp_path}): start one with `embedmesh up --state-dir {tmp_path}`\n"
    )
