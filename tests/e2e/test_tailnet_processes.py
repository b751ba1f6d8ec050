"""A tailnet of separate processes, driven only through the CLI, as a user would run it:
`embedmesh control serve`, `embedmesh control authkey create`, `embedmesh up`, `embedmesh status`,
`embedmesh ping`, curl through the SOCKS5 proxy, a server restart and a node crash."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

EMBEDMESH = [sys.executable, "-m", "embedmesh.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*EMBEDMESH, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"embedmesh {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


class Tailnet:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.control_dir = root / "control"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[str]] = []
        self.server: subprocess.Popen[str] | None = None

    def start_server(self) -> None:
        self.server = self.spawn(
            "control",
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--state-dir",
            str(self.control_dir),
            "--ephemeral-timeout",
            "3s",
            log="server",
        )
        wait_for(lambda: self._port_open(self.port), what="the control server")

    def stop_server(self) -> None:
        assert self.server is not None
        self.server.send_signal(signal.SIGTERM)
        self.server.wait(timeout=15)

    def authkey(self, *flags: str) -> str:
        out = run("control", "authkey", "create", "--state-dir", str(self.control_dir), *flags).stdout
        return out.strip().splitlines()[-1]

    def nodes(self) -> list[dict[str, object]]:
        out = run("control", "nodes", "list", "--state-dir", str(self.control_dir), "--json").stdout
        data = json.loads(out)
        return list(data["nodes"] if isinstance(data, dict) else data)

    def up(self, name: str, key: str | None, *extra: str, state: bool = True) -> subprocess.Popen[str]:
        args = ["up", "--control-url", self.url, "--hostname", name, "--listen-host", "127.0.0.1"]
        if key:
            args += ["--auth-key", key]
        if state:
            args += ["--state-dir", str(self.root / name)]
        return self.spawn(*args, *extra, log=name)

    def spawn(self, *args: str, log: str) -> subprocess.Popen[str]:
        logfile = open(self.root / f"{log}.log", "a")  # noqa: SIM115 -- closed with the process
        proc = subprocess.Popen([*EMBEDMESH, *args], stdout=logfile, stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text() if path.exists() else ""

    @staticmethod
    def _port_open(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def tailnet(tmp_path: Path) -> Iterator[Tailnet]:
    net = Tailnet(tmp_path)
    net.start_server()
    try:
        yield net
    finally:
        net.close()


def test_tailnet_of_processes(tailnet: Tailnet, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("hello from web's local service\n")
    http_port, socks_port = free_port(), free_port()
    tailnet.procs.append(
        subprocess.Popen(
            [sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1"],
            cwd=site,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    key = tailnet.authkey("--reusable")
    assert key.startswith("emk-")
    web = tailnet.up("web", key, "--serve", f"80=127.0.0.1:{http_port}")
    tailnet.up("laptop", key, "--socks5", f"127.0.0.1:{socks_port}")
    laptop_state = tailnet.root / "laptop"
    wait_for(
        lambda: (laptop_state / "embedmesh.sock").exists() and Tailnet._port_open(socks_port),
        what="laptop to come up",
    )
    assert web.poll() is None, tailnet.log("web")
    wait_for(lambda: len(tailnet.nodes()) == 2, what="both nodes registered")

    def status() -> dict[str, object]:
        return dict(json.loads(run("status", "--state-dir", str(laptop_state), "--json").stdout))

    wait_for(lambda: any(p["name"] == "web" for p in status()["peers"]), what="laptop to see web")  # type: ignore[index, union-attr]
    ping = run("ping", "web", "--state-dir", str(laptop_state), "-c", "2")
    assert ping.stdout.count("pong from web") == 2

    def curl() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--socks5-hostname",
                f"127.0.0.1:{socks_port}",
                "http://web/index.html",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    if shutil.which("curl"):
        result = curl()
        assert result.stdout == "hello from web's local service\n", result.stderr + tailnet.log("laptop")

    # The coordination server goes away: the tunnel keeps working without it...
    tailnet.stop_server()
    assert run("ping", "web", "--state-dir", str(laptop_state), "-c", "1").returncode == 0
    if shutil.which("curl"):
        assert curl().stdout == "hello from web's local service\n"
    assert status()["control_connected"] is False
    # ... and both nodes reconnect on their own when it is back.
    tailnet.start_server()
    wait_for(lambda: status()["control_connected"] is True, timeout=40, what="laptop to reconnect")
    assert {n["name"] for n in tailnet.nodes()} == {"web", "laptop"}

    # A one-off key works once; the second use is refused with a clear error.
    one_off = tailnet.authkey()
    first = tailnet.up("once", one_off, state=False)
    wait_for(lambda: any(n["name"] == "once" for n in tailnet.nodes()), what="the one-off node")
    second = tailnet.up("twice", one_off, state=False)
    assert second.wait(timeout=30) != 0
    assert "already been used" in tailnet.log("twice") or "used" in tailnet.log("twice"), tailnet.log("twice")

    # An ephemeral node that crashes (kill -9, no logout) is removed by the server on its own.
    ci_key = tailnet.authkey("--ephemeral")
    ci = tailnet.up("ci", ci_key, state=False)
    wait_for(lambda: any(n["name"] == "ci" for n in tailnet.nodes()), what="the ephemeral node")
    ci.kill()
    ci.wait()
    wait_for(
        lambda: not any(n["name"] == "ci" for n in tailnet.nodes()),
        timeout=30,
        what="the crashed ephemeral node to be removed",
    )
    first.send_signal(signal.SIGINT)
    first.wait(timeout=15)
    assert os.path.exists(tailnet.root / "web" / "keys.json")
