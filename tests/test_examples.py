"""Every program in examples/ runs here as a user would run it (its own process, configured by
environment variables and arguments), against a coordination server and peers on loopback, so an
example that stops working fails the suite instead of misleading a reader."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from embedmesh import Node
from tests.control.control_harness import Admin, start_server

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[Any, Admin]]:
    running = start_server(tmp_path / "control")
    try:
        yield running, Admin(running)
    finally:
        running.stop()


def example_env(**extra: str) -> dict[str, str]:
    """The environment of an example's process: this checkout's embedmesh first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("EMBEDMESH_AUTH_KEY", None)
    env.update(extra)
    return env


class Example:
    """A running example: its output line by line, and its exit."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self.output = ""
        self._buffer = b""

    async def expect(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait for an output line matching ``pattern``; fail with everything printed so far."""
        assert self.process.stdout is not None
        try:
            with anyio.fail_after(timeout):
                while True:
                    while b"\n" in self._buffer:
                        raw, self._buffer = self._buffer.split(b"\n", 1)
                        line = raw.decode(errors="replace")
                        self.output += line + "\n"
                        if match := re.search(pattern, line):
                            return match
                    try:
                        self._buffer += await self.process.stdout.receive()
                    except anyio.EndOfStream:
                        raise AssertionError(
                            f"example exited ({await self.process.wait()}) before printing {pattern!r}:\n"
                            f"{self.output}{self._buffer.decode(errors='replace')}"
                        ) from None
        except TimeoutError:
            raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.output}") from None

    async def exit_code(self, timeout: float = 10.0) -> int:
        """Wait for the example to finish on its own."""
        with anyio.fail_after(timeout):
            return await self.process.wait()

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (what docker stop and systemd send) and the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(timeout):
            return await self.process.wait()


@asynccontextmanager
async def run_example(*argv: str, env: dict[str, str]) -> AsyncIterator[Example]:
    command = [sys.executable, *argv] if argv[0].endswith(".py") else list(argv)
    process = await anyio.open_process(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        yield Example(process)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(10):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.aclose()


def tailnet_node(url: str, name: str, key: str, **kw: Any) -> Node:
    return Node(hostname=name, control_url=url, auth_key=key, listen_host="127.0.0.1", **kw)


async def wait_for_peer(node: Node, name: str, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not any(peer.name == name for peer in node.status().peers):
            await anyio.sleep(0.05)


def tailnet_env(running: Any, key: str, **extra: str) -> dict[str, str]:
    return example_env(
        EMBEDMESH_CONTROL_URL=running.url, EMBEDMESH_AUTH_KEY=key, EMBEDMESH_LISTEN_HOST="127.0.0.1", **extra
    )


# ---------------------------------------------------------------- fastapi_whois.py


def test_fastapi_app_greets_its_caller_by_name(control: tuple[Any, Admin]) -> None:
    running, admin = control
    key = admin.key(reusable=True)

    async def main() -> None:
        # The caller joins first, so the app's first network map already holds it and the
        # caller's first handshake is answered (a peer added later would need a retry).
        async with tailnet_node(running.url, "alice", key) as alice:
            await alice.up(timeout=10)
            env = tailnet_env(running, key, EMBEDMESH_HOSTNAME="hello", PORT="8080")
            async with run_example("examples/fastapi_whois.py", env=env) as app:
                await app.expect(r"serving http://hello\.mesh\.internal:8080/")
                await wait_for_peer(alice, "hello")
                async with alice.http_client(timeout=10) as http:
                    response = await http.get("http://hello:8080/")
                assert response.status_code == 200, response.text
                assert response.json() == {"greeting": "Hello, alice!", "user": "default", "tags": []}
                assert await app.stop() == 0
                await app.expect("SIGTERM: stopping")
            # The app's node was ephemeral and logged out on SIGTERM: it is gone at once.
            assert [n["name"] for n in admin.nodes()] == ["alice"]

    anyio.run(main)


# ---------------------------------------------------------------- ci_job.sh


def free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ci_job_reaches_a_service_by_name_through_socks5_and_leaves(
    control: tuple[Any, Admin], tmp_path: Path
) -> None:
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    running, admin = control
    key = admin.key(reusable=True, ephemeral=True, preapproved=True)
    # `embedmesh` on the job's PATH is this checkout's CLI, as `pip install` would provide it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "embedmesh").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m embedmesh.cli.main "$@"\n')
    (bin_dir / "embedmesh").chmod(0o755)
    job_tmp = tmp_path / "job-tmp"  # where the job's mktemp -d puts the node's state
    job_tmp.mkdir()

    async def main() -> None:
        async with tailnet_node(running.url, "web", admin.key()) as web:
            await web.up(timeout=10)

            async def index(request: Request) -> PlainTextResponse:
                who = web.whois(request.client.host) if request.client else None
                return PlainTextResponse(f"deployed, {who.name if who else 'stranger'}\n")

            from starlette.applications import Starlette

            await web.serve_asgi(Starlette(routes=[Route("/", index)]), ":80")
            env = tailnet_env(
                running,
                key,
                EMBEDMESH_HOSTNAME="ci-job",
                SOCKS_PORT=str(free_tcp_port()),
                PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                TMPDIR=str(job_tmp),
            )
            async with run_example("bash", "examples/ci_job.sh", env=env) as job:
                await job.expect(r"deployed, ci-job", timeout=20)
                assert await job.exit_code(15) == 0, job.output
        # The trap stopped the node and removed its state; the ephemeral node logged out, so it
        # left the tailnet before the job ended.
        assert list(job_tmp.iterdir()) == []
        assert not any(n["name"] == "ci-job" for n in admin.nodes())

    anyio.run(main)


def test_ci_job_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    env = example_env(EMBEDMESH_CONTROL_URL="http://127.0.0.1:9")
    result = subprocess.run(
        ["bash", "examples/ci_job.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=10
    )
    assert result.returncode != 0
    assert "EMBEDMESH_AUTH_KEY" in result.stderr


# ---------------------------------------------------------------- httpx_client.py


def test_httpx_client_calls_a_service_by_magicdns_name(control: tuple[Any, Admin]) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    running, admin = control
    key = admin.key(reusable=True)

    async def main() -> None:
        async with tailnet_node(running.url, "web", key) as web:
            await web.up(timeout=10)

            async def status(request: Request) -> JSONResponse:
                who = web.whois(request.client.host) if request.client else None
                return JSONResponse(
                    {"ok": True, "caller": who.name if who else None, "agent": request.headers["user-agent"]}
                )

            await web.serve_asgi(Starlette(routes=[Route("/status", status)]), ":80")
            env = tailnet_env(running, key, EMBEDMESH_HOSTNAME="fetcher")
            async with run_example(
                "examples/httpx_client.py", "http://web.mesh.internal/status", env=env
            ) as ok:
                await ok.expect(r"^200 application/json")
                body = await ok.expect(r"^\{.*\}$")
                assert json.loads(body.group(0)) == {
                    "ok": True,
                    "caller": "fetcher",
                    "agent": "embedmesh-example",
                }
                assert await ok.exit_code() == 0
            # A failed request is one line and exit status 1, not a traceback.
            async with run_example("examples/httpx_client.py", "http://web/missing", env=env) as missing:
                await missing.expect(r"^http://web/missing: Client error '404 Not Found'")
                assert await missing.exit_code() == 1
                assert "Traceback" not in missing.output
        # Both runs left the tailnet when they finished (in-memory keys: ephemeral nodes).
        assert admin.nodes() == []

    anyio.run(main)


# ---------------------------------------------------------------- static_service.py


def _static_pair() -> tuple[str, str]:
    """wg-quick files for the service (10.77.0.1) and a client peer (10.77.0.2) that dials it."""
    import base64

    from embedmesh.wireguard import crypto

    service_key, client_key = (crypto.generate_private_key(os.urandom(32)) for _ in range(2))

    def b64(key: bytes) -> str:
        return base64.b64encode(key).decode()

    service = (
        f"[Interface]\nPrivateKey = {b64(service_key)}\nAddress = 10.77.0.1/24\n\n"
        f"[Peer]\nPublicKey = {b64(crypto.public_key(client_key))}\nAllowedIPs = 10.77.0.2/32\n"
    )
    client = (
        f"[Interface]\nPrivateKey = {b64(client_key)}\nAddress = 10.77.0.2/24\n\n"
        f"[Peer]\nPublicKey = {b64(crypto.public_key(service_key))}\nAllowedIPs = 10.77.0.1/32\n"
        "Endpoint = 127.0.0.1:{port}\n"
    )
    return service, client


def test_static_service_serves_its_port_to_a_wireguard_peer(tmp_path: Path) -> None:
    service_text, client_text = _static_pair()
    config = tmp_path / "wg0.conf"
    config.write_text(service_text)
    config.chmod(0o600)

    async def main() -> None:
        env = example_env(WG_CONFIG=str(config), PORT="7000", EMBEDMESH_LISTEN_HOST="127.0.0.1")
        async with run_example("examples/static_service.py", env=env) as service:
            ready = await service.expect(
                r"serving TCP port 7000 on 10\.77\.0\.1; WireGuard on UDP port (\d+)"
            )
            client_config = client_text.replace("{port}", ready.group(1))
            async with Node(wireguard_config=client_config, listen_host="127.0.0.1") as client:
                await client.up()
                stream = await client.dial("tcp", "10.77.0.1:7000", timeout=10)
                async with stream:
                    await stream.send(b"hello over wireguard\n")
                    assert await stream.receive() == b"HELLO OVER WIREGUARD\n"
                await service.expect(r"^10\.77\.0\.2 disconnected")
            assert await service.stop() == 0
            await service.expect("SIGTERM: stopping")
            assert "warning" not in service.output  # the file is 0600

    anyio.run(main)


def test_static_service_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "wg0.conf"
    config.write_text("[Interface]\nPrivateKey = not-a-key\n")
    config.chmod(0o644)
    result = subprocess.run(
        [sys.executable, "examples/static_service.py", str(config)],
        cwd=ROOT,
        env=example_env(),
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 1
    assert "is accessible to other users" in result.stderr
    assert f"{config}: " in result.stderr and "line 2" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- trio_echo.py


def test_trio_program_serves_and_talks_by_name(control: tuple[Any, Admin]) -> None:
    running, admin = control
    key = admin.key(reusable=True)

    async def main() -> None:
        # The test itself runs on asyncio and the example on trio: one library, both loops.
        async with tailnet_node(running.url, "alice", key) as alice:
            await alice.up(timeout=10)
            serve_env = tailnet_env(running, key, EMBEDMESH_HOSTNAME="echo")
            async with run_example("examples/trio_echo.py", "serve", env=serve_env) as server:
                await server.expect(r"^echo on echo\.mesh\.internal:7$")
                await wait_for_peer(alice, "echo")
                stream = await alice.dial("tcp", "echo:7", timeout=10)
                async with stream:
                    await stream.send(b"ping\n")
                    assert await stream.receive() == b"ping\n"
                await server.expect(r"^alice connected")
                send_env = tailnet_env(running, key, EMBEDMESH_HOSTNAME="sender")
                async with run_example(
                    "examples/trio_echo.py", "send", "echo", "hello from trio", env=send_env
                ) as sender:
                    await sender.expect(r"^hello from trio$", timeout=20)
                    assert await sender.exit_code() == 0
                await server.expect(r"^sender connected")
                assert await server.stop() == 0
                await server.expect("SIGTERM: stopping")
            # Both example nodes were ephemeral (no state_dir) and left when they exited.
            with anyio.fail_after(5):
                while [n["name"] for n in admin.nodes()] != ["alice"]:
                    await anyio.sleep(0.05)

    anyio.run(main)
