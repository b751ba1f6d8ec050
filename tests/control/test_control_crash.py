"""kill -9 of a server process in the middle of a burst of registrations leaves a consistent store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import httpx
from control_harness import Admin, Identity, start_server

from embedmesh.control.authkeys import parse_auth_key
from embedmesh.control.errors import ControlError
from embedmesh.control.store import Store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_process(state: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedmesh.cli.control",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(state),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError("control server subprocess did not start")


def test_kill_9_during_registrations(tmp_path: Path) -> None:
    state = tmp_path / "server"
    port = _free_port()
    process = _start_process(state, port)
    try:
        _burst_and_check(state, port, process)
    finally:
        # A failure anywhere above must not leave the server process running.
        if process.poll() is None:
            process.kill()
            process.wait(10)


def _burst_and_check(state: Path, port: int, process: subprocess.Popen[bytes]) -> None:
    url = f"http://127.0.0.1:{port}"
    token = (state / "admin-token").read_text().strip()
    http = httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"})
    reusable = http.post("/admin/v1/authkeys", json={"reusable": True}).json()["key"]
    one_offs = [http.post("/admin/v1/authkeys", json={}).json()["key"] for _ in range(40)]
    acknowledged: dict[int, bytes] = {}
    failures: Counter[str] = Counter()

    async def register(index: int) -> None:
        identity = Identity.new()
        # Half of the nodes race for one-off keys, two per key: exactly one of each pair may win.
        key = one_offs[index // 2 % len(one_offs)] if index % 2 else reusable
        client = identity.client(url, f"burst-{index % 7}", auth_key=key, connect_timeout=3)
        try:
            await client.start()
        except (ControlError, OSError) as exc:
            failures[type(exc).__name__] += 1
            return
        assert client.node_id is not None
        acknowledged[client.node_id] = client.machine_public_key
        await client.close()

    async def burst() -> None:
        limiter = anyio.CapacityLimiter(25)

        async def limited(index: int) -> None:
            async with limiter:
                await register(index)

        async with anyio.create_task_group() as tg:
            for index in range(300):
                tg.start_soon(limited, index)
                if len(acknowledged) >= 30:
                    # Kill while up to 25 registrations are in flight, then a few more find it gone.
                    os.kill(process.pid, signal.SIGKILL)
                    for late in range(300, 305):
                        tg.start_soon(limited, late)
                    break
                await anyio.sleep(0.002)

    anyio.run(burst)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    assert process.returncode == -signal.SIGKILL
    assert failures, "the kill landed after the burst: nothing was interrupted"

    # The store on disk, as the restarted server will see it.
    store = Store(state / "control.db")
    assert store.integrity_check() == "ok"
    nodes = store.load_nodes()
    keys = {k.id: k for k in store.list_auth_keys()}
    store.close()
    # Every registration a node was told about survived the crash.
    by_id = {n.id: n for n in nodes}
    for node_id, machine in acknowledged.items():
        assert by_id[node_id].machine_key == machine
    assert len({n.ipv4 for n in nodes}) == len(nodes)
    assert len({n.name for n in nodes}) == len(nodes)
    assert len({n.machine_key for n in nodes}) == len(nodes)
    # No half-registered node: every node used its key, every use has its node.
    per_key = Counter(n.auth_key_id for n in nodes)
    for key_id, record in keys.items():
        assert record.uses == per_key.get(key_id, 0), key_id
        if not record.reusable:
            assert record.uses <= 1
    assert parse_auth_key(reusable)[0] in per_key

    # The restarted server lists exactly those nodes and keeps allocating fresh addresses.
    with start_server(state, port=port) as running:
        admin = Admin(running)
        listed = admin.nodes()
        assert sorted(n["id"] for n in listed) == sorted(by_id)
        assert len({a for n in listed for a in n["addresses"]}) == 2 * len(listed)

        async def one_more() -> None:
            async with Identity.new().client(running.url, "after", auth_key=reusable) as client:
                assert client.netmap is not None
                addresses = {str(a) for a in client.netmap.self_node.addresses}
                assert not addresses & {a for n in listed for a in n["addresses"]}

        anyio.run(one_more)
