"""1,000 DERP clients on one server process (loopback TCP, all in this process): every client gets
every packet its partner sends it, and a client that never reads, flooded meanwhile, stalls nobody:
the other pairs finish about as fast as without it, and its packets are dropped and counted.

The clients are the sans-IO ``ClientConnection`` on a bare socket each (fast start, one task per
client), so that the server, not a thousand full clients, gets the process's CPU.
"""

from __future__ import annotations

import os
import resource
import socket
import time

import anyio
import anyio.abc
import pytest

from embedmesh.tailscale import derp
from embedmesh.tailscale.derpclient import connect_derp
from embedmesh.tailscale.derpserver import DerpServer
from embedmesh.tailscale.keys import NodePrivate, NodePublic

CLIENTS = 1000
PACKETS = 8  # per client and round: fewer than the per-client queue depth, so none may be dropped
PACKET = 1200  # a typical WireGuard packet
FLOOD = 1500  # 16-KiB packets to the client that never reads
FAST_START = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n"


@pytest.fixture
def enough_descriptors() -> None:
    # Each client is two sockets here (ours and the server's end), plus the runtime's own.
    need = 2 * CLIENTS + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {need} descriptors this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


async def _login(port: int, private: NodePrivate, server_key: NodePublic) -> tuple[anyio.abc.SocketStream, derp.ClientConnection]:
    conn = derp.ClientConnection(private, os.urandom(24), server_key=server_key)
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(FAST_START + conn.data_to_send())
    return stream, conn


def test_a_thousand_clients_and_a_client_that_never_reads(enough_descriptors: None) -> None:
    # A long write timeout keeps the stalled client connected for the whole test (with derper's
    # 2 s it would be cut off, which tests/tailscale/test_derp_server.py covers).
    server = DerpServer(NodePrivate.generate(os.urandom(32)), write_timeout=120)
    keys = [NodePrivate.generate(os.urandom(32)) for _ in range(CLIENTS)]
    publics = [key.public() for key in keys]
    got = [0] * CLIENTS
    logged_in = [False] * CLIENTS

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            rounds = [anyio.Event(), anyio.Event()]
            finished = anyio.Event()

            async def run_client(i: int) -> None:
                stream, conn = await _login(port, keys[i], server.public_key)
                partner = publics[i ^ 1]

                def handle(event: derp.ClientEvent, n: int) -> None:
                    if isinstance(event, derp.ServerInfoReceived):
                        logged_in[i] = True
                    elif isinstance(event, derp.PacketReceived):
                        assert event.src == partner
                        assert event.packet[:4] == (i ^ 1).to_bytes(2, "big") + bytes([n, got[i] - n * PACKETS])
                        got[i] += 1

                async with stream:
                    while not logged_in[i]:
                        for event in conn.receive_data(await stream.receive()):
                            handle(event, 0)
                    for n, start in enumerate(rounds):
                        await start.wait()
                        for seq in range(PACKETS):
                            conn.send_packet(partner, i.to_bytes(2, "big") + bytes([n, seq]) + bytes(PACKET - 4))
                            await stream.send(conn.data_to_send())
                        while got[i] < (n + 1) * PACKETS:
                            for event in conn.receive_data(await stream.receive()):
                                handle(event, n)
                    await finished.wait()

            started = time.monotonic()
            async with anyio.create_task_group() as clients_tg:
                for i in range(CLIENTS):
                    clients_tg.start_soon(run_client, i)
                with anyio.fail_after(60):
                    while not all(logged_in):
                        await anyio.sleep(0.01)
                connect_time = time.monotonic() - started
                assert len(server.core) == CLIENTS == server.stats.connections

                async def round_trip(n: int) -> float:
                    t0 = time.monotonic()
                    rounds[n].set()
                    with anyio.fail_after(60):
                        while sum(got) < (n + 1) * PACKETS * CLIENTS:
                            await anyio.sleep(0.005)
                    return time.monotonic() - t0

                baseline = await round_trip(0)
                # The slow client: logs in, shrinks its receive buffer and never reads again.
                slow_key = NodePrivate.generate(os.urandom(32))
                raw, _ = await _login(port, slow_key, server.public_key)
                raw.extra(anyio.abc.SocketAttribute.raw_socket).setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                while not server.core.is_connected(slow_key.public()):
                    await anyio.sleep(0.005)
                async with raw, connect_derp(f"http://127.0.0.1:{port}/derp", NodePrivate.generate(os.urandom(32))) as flooder:

                    async def flood() -> None:
                        for _ in range(FLOOD):
                            await flooder.send(slow_key.public(), bytes(16 << 10))

                    async with anyio.create_task_group() as flood_tg:
                        flood_tg.start_soon(flood)
                        during = await round_trip(1)
                    dropped = server.core.drops[derp.DropReason.QUEUE_HEAD]
                    assert dropped > 0
                    assert server.core.is_connected(slow_key.public())  # stalled, still there, costing nobody
                finished.set()
            tg.cancel_scope.cancel()
        print(
            f"\n{CLIENTS} clients logged in in {connect_time:.1f} s; a round of {CLIENTS * PACKETS} packets took "
            f"{baseline:.2f} s, {during:.2f} s beside a flood to a client that never reads ({dropped} drops)"
        )
        assert got == [2 * PACKETS] * CLIENTS
        # Only the flood to the slow client lost packets.
        assert server.core.drops[derp.DropReason.UNKNOWN_DEST] == 0
        assert during < 3 * baseline + 1.0

    anyio.run(main)
