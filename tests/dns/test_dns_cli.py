"""`embedmesh up --dns 127.0.0.1:PORT`: MagicDNS for programs on the same host, as a real process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import dns.message
import dns.query
from tests.control.control_harness import Admin, start_server
from tests.dns.dns_harness import answers


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_up_serves_magicdns_on_a_local_port(tmp_path: Path) -> None:
    running = start_server(tmp_path / "control")
    admin = Admin(running)
    port = free_udp_port()
    log = tmp_path / "up.log"
    env = dict(os.environ, EMBEDMESH_AUTH_KEY=admin.key(reusable=True))
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "embedmesh.cli.main",
                "up",
                "--control-url",
                running.url,
                "--hostname",
                "box",
                "--listen-host",
                "127.0.0.1",
                "--dns",
                f"127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 20
        while "MagicDNS on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert f"MagicDNS on 127.0.0.1:{port} (UDP and TCP)" in log.read_text()
        reply = dns.query.udp(
            dns.message.make_query("box.mesh.internal", "A"), "127.0.0.1", port=port, timeout=3
        )
        (line,) = answers(reply)
        assert line.startswith("box.mesh.internal. A 100.")
        reply = dns.query.tcp(dns.message.make_query("box", "AAAA"), "127.0.0.1", port=port, timeout=3)
        assert answers(reply)[0].startswith("box. AAAA fd7a:115c:a1e0::")
        if shutil.which("dig"):
            result = subprocess.run(
                ["dig", "@127.0.0.1", "-p", str(port), "+short", "box"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert result.stdout.strip() == line.split()[-1]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        running.stop()


def test_up_rejects_a_bad_dns_address(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedmesh.cli.main",
            "up",
            "--control-url",
            "http://127.0.0.1:9",
            "--dns",
            "127.0.0.1:notaport",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and "--dns" in result.stderr
