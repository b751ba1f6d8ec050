"""Secrets stay secret in real processes (issue 8's review, kept proved): `embedmesh -vv control
serve` and `embedmesh -vv up` log at DEBUG without ever writing an auth key, the admin token or a
private key, and every state file of either is 0600 in a 0700 folder, even in folders that were
created open."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CLI = [sys.executable, "-m", "embedmesh.cli.main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def _stop(process: subprocess.Popen[bytes], log: Path) -> str:
    """SIGTERM (as systemd and docker send), wait, and return everything the process wrote."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return log.read_text(errors="replace")


def _secret_forms(raw: bytes) -> list[str]:
    """How a 32-byte key could show up in a log: base64, URL-safe base64, hex."""
    return [base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("="), raw.hex()]


def _assert_private(folder: Path) -> list[str]:
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    names = []
    for entry in folder.iterdir():
        mode = entry.lstat().st_mode
        assert stat.S_ISREG(mode) or stat.S_ISSOCK(mode), entry
        assert stat.S_IMODE(mode) == 0o600, (entry, oct(mode))
        names.append(entry.name)
    return sorted(names)


def test_no_secret_in_vv_logs_and_state_files_are_private(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    server_dir, node_dir = tmp_path / "server", tmp_path / "node"
    # Folders someone created open: both programs tighten them.
    server_dir.mkdir(mode=0o755)
    node_dir.mkdir(mode=0o755)
    os.chmod(server_dir, 0o755)
    os.chmod(node_dir, 0o755)
    port = _free_port()
    server_log = tmp_path / "server.log"
    with server_log.open("wb") as out:
        server = subprocess.Popen(
            [
                *CLI,
                "-vv",
                "control",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--state-dir",
                str(server_dir),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    processes.append(server)
    url = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        try:
            return httpx.get(f"{url}/key", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    _wait(serving, "the control server")
    created = subprocess.run(
        [*CLI, "-vv", "control", "authkey", "create", "--state-dir", str(server_dir), "--reusable"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert created.returncode == 0, created.stderr
    auth_key = created.stdout.strip().splitlines()[-1]
    admin_token = (server_dir / "admin-token").read_text().strip()

    node_log = tmp_path / "node.log"
    state = ("--state-dir", str(node_dir))
    with node_log.open("wb") as out:
        node = subprocess.Popen(
            [*CLI, "-vv", "up", "--control-url", url, "--auth-key", auth_key, *("--hostname", "ci"), *state],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    processes.append(node)
    _wait(lambda: "up: ci.mesh.internal" in node_log.read_text(errors="replace"), "the node to join")
    # The admin API in use too, so its request handling is in the server's log.
    listed = subprocess.run(
        [*CLI, "-vv", "control", "nodes", "list", "--state-dir", str(server_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.returncode == 0 and "ci" in listed.stdout, listed.stderr

    # While both run: every state file private, every folder 0700.
    assert {"admin-token", "control.db", "server.json", "server.key"} <= set(_assert_private(server_dir))
    assert {"control-server.json", "embedmesh.sock", "keys.json"} <= set(_assert_private(node_dir))

    secrets_: dict[str, str] = {
        "auth key": auth_key,
        "auth key secret": auth_key.rsplit("-", 1)[1],
        "admin token": admin_token,
    }
    server_key = base64.b64decode((server_dir / "server.key").read_text().strip())
    for form in _secret_forms(server_key):
        secrets_[f"server private key {form[:4]}"] = form
    for name, value in json.loads((node_dir / "keys.json").read_text()).items():
        for form in _secret_forms(base64.b64decode(value)):
            secrets_[f"node {name} {form[:4]}"] = form

    logs = {
        "up": _stop(node, node_log),
        "control serve": _stop(server, server_log),
        "authkey create (stderr)": created.stderr,
        "nodes list": listed.stderr + listed.stdout,
    }
    # The logs are DEBUG logs of real work, so their silence about secrets means something.
    assert (" DEBUG " in logs["up"] and " DEBUG " in logs["control serve"]) or "INFO" in logs["control serve"]
    assert "registered node" in logs["control serve"]
    for where, text in logs.items():
        for what, secret in secrets_.items():
            assert secret not in text, f"the {what} appears in the -vv output of {where}"
    # After a clean stop the files are still private (the socket is gone).
    _assert_private(server_dir)
    assert "embedmesh.sock" not in _assert_private(node_dir)
