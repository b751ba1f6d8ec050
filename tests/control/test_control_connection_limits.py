"""Idle and slow connections cannot starve the coordination server (issue 8's security review:
300 idle sockets from 127.0.0.1 exhausted a server limited to 256 descriptors, and registrations
then timed out with ``Too many open files``)."""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from control_harness import Admin, Identity, start_server

from embedmesh.control.limits import ConnectionLimiter

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _idle(port: int, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        sockets.append(s)
    return sockets


def _closed_by_server(s: socket.socket, wait: float) -> bool:
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    yield sockets
    for s in sockets:
        s.close()


async def _register(url: str, key: str, hostname: str) -> None:
    with anyio.fail_after(10):
        async with Identity.new().client(url, hostname, auth_key=key) as client:
            netmap = await client.wait_for_netmap(lambda m: m.self_node is not None, timeout=10)
            assert netmap.self_node is not None and netmap.self_node.name == hostname


async def test_300_idle_sockets_do_not_starve_a_256_fd_server(tmp_path: Path, held: list[socket.socket]) -> None:
    """The review's measurement with the default caps: a server limited to 256 descriptors (the
    first-request timeout is set by its flag, to keep the test short)."""
    state, port = tmp_path / "server", _free_port()

    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    process = subprocess.Popen(
        [sys.executable, "-m", "embedmesh.cli.main", "control", "serve", "--listen", f"127.0.0.1:{port}",
         "--state-dir", str(state), "--first-request-timeout", "2s"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=limit_fds,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "control server did not start"
            time.sleep(0.05)
        token = (state / "admin-token").read_text().strip()
        response = httpx.post(
            f"{url}/admin/v1/authkeys", json={"reusable": True},
            headers={"authorization": f"Bearer {token}"}, timeout=10,
        )
        assert response.status_code == 201, response.text
        held.extend(_idle(port, 300))
        await anyio.sleep(0.2)
        await _register(url, str(response.json()["key"]), "real")
        # The server kept only a capped number of them, and closes those after the first-request
        # timeout.
        await anyio.sleep(2.5)
        assert all(_closed_by_server(s, 0.5) for s in held)
    finally:
        process.terminate()
        process.wait(15)


def test_idle_and_slow_connections_are_closed_after_the_first_request_timeout(
    tmp_path: Path, held: list[socket.socket]
) -> None:
    with start_server(tmp_path / "server", first_request_timeout=0.5) as running:
        held.extend(_idle(running.port, 3))
        slow = socket.create_connection(("127.0.0.1", running.port))
        held.append(slow)
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        started = time.monotonic()
        for _ in range(8):  # a slowloris: a header byte every 0.1 s, never a whole request
            try:
                slow.sendall(b"X")
            except OSError:  # the server closed it already
                break
            time.sleep(0.1)
        assert all(_closed_by_server(s, 2.0) for s in held)
        assert time.monotonic() - started < 3.0
        # A prompt request is served, and its keep-alive connection is not cut by that timeout.
        with httpx.Client(base_url=running.url, timeout=5) as http:
            assert http.get("/health").status_code == 200
            time.sleep(0.8)
            assert http.get("/health").status_code == 200


async def test_idle_sockets_from_the_nodes_own_address_cannot_lock_it_out(
    tmp_path: Path, held: list[socket.socket]
) -> None:
    with start_server(tmp_path / "server", max_connections_per_source=8, max_connections=32) as running:
        key = Admin(running).key(reusable=True)
        held.extend(_idle(running.port, 40))
        await anyio.sleep(0.2)
        # The table never held more than the cap of one source: the rest were closed at once.
        still_open = [s for s in held if not _closed_by_server(s, 0.05)]
        assert len(still_open) <= 8
        assert running.call(lambda: len(running.server.limiter)) <= 8
        # Registered nodes do not count against their source: more than 8 stay connected.
        # One after another: ten nodes starting in the same instant from one address would be more
        # than 8 unauthenticated connections at once (a Node retries those with backoff).
        async with contextlib.AsyncExitStack() as stack:
            clients = []
            for i in range(10):
                client = await stack.enter_async_context(
                    Identity.new().client(running.url, f"n{i}", auth_key=key)
                )
                await client.wait_for_netmap(lambda m: m.self_node is not None, timeout=10)
                clients.append(client)
            for client in clients:
                await client.wait_for_netmap(lambda m: len(m.peers) == 9, timeout=10)
            held.extend(_idle(running.port, 40))
            await _register(running.url, key, "late")


async def test_idle_sockets_from_many_sources_cannot_fill_the_table(
    tmp_path: Path, held: list[socket.socket]
) -> None:
    with start_server(tmp_path / "server", max_connections_per_source=4, max_connections=16) as running:
        key = Admin(running).key(reusable=True)
        for last in range(2, 12):  # 10 sources of 4: more than the table holds
            held.extend(_idle(running.port, 4, f"127.0.0.{last}"))
        await anyio.sleep(0.2)
        assert running.call(lambda: len(running.server.limiter)) <= 16
        await _register(running.url, key, "real")


def test_the_limiter_pushes_out_the_oldest_waiting_connection() -> None:
    closed: list[int] = []
    limiter = ConnectionLimiter(max_connections=3, max_per_source=2, first_request_timeout=1.0)

    def opener(n: int, host: str) -> bool:
        return limiter.open((host, n), lambda: closed.append(n))

    assert opener(1, "192.0.2.1") and opener(2, "192.0.2.1")
    limiter.started(("192.0.2.1", 1))
    assert opener(3, "192.0.2.1") and closed == [2]  # the source is full; 1 sent a request: 2 goes
    limiter.started(("192.0.2.1", 3))
    assert not opener(4, "192.0.2.1")  # both of the source's connections are busy: refused
    assert opener(5, "2001:db8::1") and closed == [2]
    assert opener(6, "2001:db8::2") and closed == [2, 5]  # the table is full: the oldest waiting
    limiter.authenticated(("192.0.2.1", 1))  # registered: it leaves its source's count
    assert opener(8, "192.0.2.1") and closed == [2, 5, 6]
    assert opener(9, "192.0.2.1") and closed == [2, 5, 6, 8]  # 3 and 8 hold the source: 8 waits
    assert len(limiter) == 3
    for n in (1, 3, 9):
        limiter.closed(("192.0.2.1", n))
        limiter.closed(("192.0.2.1", n))
    assert len(limiter) == 0


def test_serve_refuses_a_bad_connection_limit(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from embedmesh.cli.main import main

    for flags in (["--first-request-timeout", "0"], ["--max-connections", "0"]):
        result = CliRunner().invoke(main, ["control", "serve", "--state-dir", str(tmp_path), *flags])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
