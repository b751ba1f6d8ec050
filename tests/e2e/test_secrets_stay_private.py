"""What held up in the security review of issue 8, kept proved with real processes: a server and two
nodes run at ``-vv`` (debug logging), join, ping each other and stop. No secret appears in their
logs (auth keys, the admin token, the server's and the nodes' private keys, in any encoding the
code uses), and every file of both state folders is 0600 in 0700 folders even under umask 022."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

EMBEDMESH = [sys.executable, "-m", "embedmesh.cli.main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ADMIN_STDERR: list[str] = []  # what the admin commands wrote besides their answers


def _run(*args: str, timeout: float = 60) -> str:
    result = subprocess.run([*EMBEDMESH, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"embedmesh {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    ADMIN_STDERR.append(result.stderr)
    return result.stdout


def _lenient_umask() -> None:
    # What a default shell has: the code, not the umask, must keep the files private.
    os.umask(0o022)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _spawn(procs: list[subprocess.Popen[bytes]], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*EMBEDMESH, "-vv", *args], stdout=out, stderr=subprocess.STDOUT, preexec_fn=_lenient_umask
        )
    procs.append(proc)
    return proc


def _encodings(raw: bytes) -> set[str]:
    return {
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        base64.b64encode(raw).decode().rstrip("=")[:24],  # a prefix is a leak too
        raw.hex(),
        raw.hex()[:24],
        raw.hex().upper(),
    }


def _secrets(server_dir: Path, node_dirs: list[Path], keys: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for text in keys:
        found[text] = "auth key"
        found[text.rsplit("-", 1)[1]] = "auth key secret"
    found[(server_dir / "admin-token").read_text().strip()] = "admin token"
    server_key = base64.b64decode((server_dir / "server.key").read_text().strip())
    found.update(dict.fromkeys(_encodings(server_key), "server private key"))
    for folder in node_dirs:
        document = json.loads((folder / "keys.json").read_text())
        assert set(document) == {"machine_key", "node_key", "disco_key"}
        for name, value in document.items():
            found.update(dict.fromkeys(_encodings(base64.b64decode(value)), f"{folder.name} {name}"))
    return found


def _assert_private(folder: Path) -> int:
    """Every folder under ``folder`` (itself included) is 0700 and every file 0600; the count."""
    count = 0
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for path in folder.rglob("*"):
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):
            assert stat.S_IMODE(mode) == 0o700, f"{path} is {oct(stat.S_IMODE(mode))}"
        else:
            assert stat.S_IMODE(mode) == 0o600, f"{path} is {oct(stat.S_IMODE(mode))}"
        count += 1
    return count


def test_vv_logs_hold_no_secret_and_state_files_are_private(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    server_dir, port = tmp_path / "control", _free_port()
    url = f"http://127.0.0.1:{port}"
    nodes = {"alpha": tmp_path / "alpha", "beta": tmp_path / "beta"}
    ADMIN_STDERR.clear()
    # Folders someone created open: both programs tighten them (the server's one, the nodes').
    for folder in (server_dir, *nodes.values()):
        folder.mkdir(mode=0o755)
        os.chmod(folder, 0o755)
    server = _spawn(
        procs, tmp_path / "server.log", "control", "serve", "--listen", f"127.0.0.1:{port}",
        "--state-dir", str(server_dir),
    )  # fmt: skip
    for _ in range(300):
        if (server_dir / "server.json").exists() and server.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                pass
        assert server.poll() is None, (tmp_path / "server.log").read_text()
        subprocess.run(["sleep", "0.1"], check=True)
    one_off = _run("control", "authkey", "create", "--state-dir", str(server_dir)).strip().splitlines()[-1]
    env_key = _run("control", "authkey", "create", "--state-dir", str(server_dir)).strip().splitlines()[-1]
    assert one_off.startswith("emk-") and env_key.startswith("emk-")

    common = ["up", "--control-url", url, "--listen-host", "127.0.0.1"]
    socks_port = _free_port()
    # One key on the command line, one in the environment, as a CI job passes it.
    _spawn(procs, tmp_path / "alpha.log", *common, "--hostname", "alpha", "--state-dir", str(nodes["alpha"]),
           "--auth-key", one_off, "--socks5", f"127.0.0.1:{socks_port}")  # fmt: skip
    os.environ["EMBEDMESH_AUTH_KEY"] = env_key
    try:
        _spawn(procs, tmp_path / "beta.log", *common, "--hostname", "beta", "--state-dir", str(nodes["beta"]))
    finally:
        del os.environ["EMBEDMESH_AUTH_KEY"]
    for folder in nodes.values():
        _run("status", "--wait", "--timeout", "40", "--state-dir", str(folder), timeout=60)
    listed = _run("-vv", "control", "nodes", "list", "--state-dir", str(server_dir), "--json")
    assert {"alpha", "beta"} <= {node["name"] for node in json.loads(listed)["nodes"]}
    ping = _run("ping", "beta", "--state-dir", str(nodes["alpha"]), "-c", "2", timeout=60)
    assert "pong" in ping.lower() or "time" in ping.lower(), ping
    # A SOCKS5 client that offers only username/password: refused, and logged at debug level.
    with socket.create_connection(("127.0.0.1", socks_port), timeout=10) as client:
        client.sendall(b"\x05\x01\x02")
        assert client.recv(2) == b"\x05\xff"

    # While everything runs (sockets, locks, the WAL of the database exist now) ...
    for folder in (server_dir, *nodes.values()):
        assert _assert_private(folder) >= 2, folder
    # The nodes first (they log out through the server), then the server (Ctrl-C, as a user would).
    for proc in procs[1:]:
        proc.send_signal(signal.SIGTERM)
    for proc in procs[1:]:
        assert proc.wait(timeout=20) == 0
    server.send_signal(signal.SIGINT)
    assert server.wait(timeout=20) == 0
    # ... and after everything stopped and wrote its last state.
    for folder in (server_dir, *nodes.values()):
        _assert_private(folder)

    assert (
        "embedmesh.socks5 DEBUG SOCKS5 client offered no acceptable method"
        in (tmp_path / "alpha.log").read_text()
    )
    secrets = _secrets(server_dir, list(nodes.values()), [one_off, env_key])
    # The admin CLI's own output: the key is printed once by `authkey create` (its answer) and
    # nowhere else; the node list and every command's stderr hold no secret.
    for secret, what in secrets.items():
        assert secret not in listed, f"the {what} appears in nodes list"
        for text in ADMIN_STDERR:
            assert secret not in text, f"the {what} appears in an admin command's stderr"
    for name in ("server", "alpha", "beta"):
        log = (tmp_path / f"{name}.log").read_text()
        # The logs are the debug logs (so the check means something) ...
        assert " DEBUG " in log and "registered" in log, f"{name} did not log at debug level:\n{log[:2000]}"
        # ... and no secret is in them.
        for secret, what in secrets.items():
            assert secret not in log, f"the {what} appears in the -vv log of {name}"
