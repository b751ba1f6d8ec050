"""The DERP server's limits: the token bucket (x/time/rate semantics, sans-IO), the per-client
receive rate limit (a client past it is read slower, others are not), and the accept limit (a
connection over it is closed at once); each counted in DerpStats."""

from __future__ import annotations

import math
import os
import time

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedmesh.tailscale import derp
from embedmesh.tailscale.derpclient import DerpConnectError, connect_derp
from embedmesh.tailscale.derpserver import DerpServer
from embedmesh.tailscale.keys import NodePrivate


def test_token_bucket_starts_full_and_goes_into_debt() -> None:
    bucket = derp.TokenBucket(rate=100, burst=50)
    assert bucket.reserve(50, now=0.0) == 0.0
    assert bucket.reserve(10, now=0.0) == pytest.approx(0.1)  # 10 tokens owed at 100/s
    assert bucket.reserve(10, now=0.05) == pytest.approx(0.15)  # 5 refilled, 15 owed
    assert not bucket.allow(now=0.1)
    assert bucket.allow(now=1.0) and bucket.allow(now=1.0, n=40)
    # More than the burst counts as the burst: a frame never waits forever.
    assert derp.TokenBucket(10, 5).reserve(1_000, now=0.0) == 0.0
    unlimited = derp.TokenBucket(math.inf, 1)
    assert unlimited.reserve(10**9, 0.0) == 0.0 and all(unlimited.allow(0.0) for _ in range(100))
    with pytest.raises(ValueError):
        derp.TokenBucket(0, 1)


@given(
    st.floats(1, 1e6),
    st.floats(1, 1e6),
    st.lists(st.tuples(st.floats(0, 10), st.floats(0, 2e6)), max_size=60),
)
def test_token_bucket_never_lets_more_through_than_rate_and_burst(rate: float, burst: float, steps: list[tuple[float, float]]) -> None:
    reserving, allowing = derp.TokenBucket(rate, burst), derp.TokenBucket(rate, burst)
    now, taken, allowed = 0.0, 0.0, 0.0
    for gap, n in steps:
        now += gap
        # A reservation acts after its delay; what acted by then fits in burst + rate * elapsed.
        acted_at = now + reserving.reserve(n, now)
        taken += min(n, burst)
        assert taken <= burst + rate * acted_at + 1e-6 * (taken + 1)
        if allowing.allow(now, n):
            allowed += n
        assert allowed <= burst + rate * now + 1e-6 * (allowed + 1)


@pytest.fixture(params=[True, False], ids=["protocols", "streams"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_a_client_past_its_rate_limit_is_read_slower_and_others_are_not(fast_path: bool) -> None:
    rate = 400_000  # bytes per second
    server = DerpServer(NodePrivate.generate(os.urandom(32)), rate_limit=rate, rate_burst=1, fast_path=fast_path)
    assert server.rate_burst == derp.MIN_RATE_LIMIT_BURST  # at least one full packet

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            url = f"http://127.0.0.1:{port}/derp"
            async with (
                connect_derp(url, NodePrivate.generate(os.urandom(32))) as heavy,
                connect_derp(url, NodePrivate.generate(os.urandom(32))) as sink,
                connect_derp(url, NodePrivate.generate(os.urandom(32))) as light,
            ):
                packet = bytes(20_000)
                count = 30  # 600 kB: about (600 k - 65 k) / 400 k = 1.3 s at the limit
                received = 0

                async def drain() -> None:
                    nonlocal received
                    async for _, data in sink.packets():
                        received += len(data)
                        if received >= count * len(packet):
                            return

                start = time.monotonic()
                async with anyio.create_task_group() as flow:
                    flow.start_soon(drain)
                    for _ in range(count):
                        await heavy.send(sink.public_key, packet)
                    # While the heavy client waits for its bucket, a light one is not held up.
                    light_rtt = await light.ping()
                elapsed = time.monotonic() - start
                assert elapsed >= (count * len(packet) - derp.MIN_RATE_LIMIT_BURST) / rate * 0.9
                assert light_rtt < 0.5
                assert server.stats.rate_limited > 0
                # Lifting the limit applies to connected clients too.
                server.update_rate_limits(0)
                waits = server.stats.rate_limited
                received, start = 0, time.monotonic()
                async with anyio.create_task_group() as flow:
                    flow.start_soon(drain)
                    for _ in range(count):
                        await heavy.send(sink.public_key, packet)
                assert server.stats.rate_limited == waits
                assert time.monotonic() - start < elapsed
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_mesh_peers_skip_admission_and_the_rate_limit(fast_path: bool) -> None:
    """As in Go: a client with the region's mesh key (another server) is neither asked about nor
    paced; everyone else is."""
    mesh_key = os.urandom(32)
    asked: list[str] = []

    async def refuse_all(key: object, source: tuple[str, int]) -> bool:
        asked.append(str(key))
        return False

    rate = 100_000
    server = DerpServer(
        NodePrivate.generate(os.urandom(32)), mesh_key=mesh_key, admit=refuse_all, rate_limit=rate, fast_path=fast_path
    )

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            url = f"http://127.0.0.1:{port}/derp"
            with pytest.raises(DerpConnectError):
                async with connect_derp(url, NodePrivate.generate(os.urandom(32)), timeout=5):
                    pass
            assert len(asked) == 1 and server.stats.refused == 1
            info = derp.ClientInfo(mesh_key=mesh_key)
            async with (
                connect_derp(url, NodePrivate.generate(os.urandom(32)), info=info) as peer,
                connect_derp(url, NodePrivate.generate(os.urandom(32)), info=info) as other,
            ):
                assert len(asked) == 1  # never asked about mesh peers
                packet = bytes(20_000)
                start = time.monotonic()
                for _ in range(30):  # 600 kB: 5 s at the limit, were it applied
                    await peer.send(other.public_key, packet)
                got = 0
                with anyio.fail_after(10):
                    async for _, data in other.packets():
                        got += len(data)
                        if got >= 30 * len(packet):
                            break
                assert time.monotonic() - start < 3
                assert server.stats.rate_limited == 0
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_connections_over_the_accept_limit_are_closed_at_once() -> None:
    server = DerpServer(NodePrivate.generate(os.urandom(32)), accept_rate=0.5, accept_burst=3)

    async def probe(port: int) -> bytes:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            try:
                await stream.send(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
            except (anyio.BrokenResourceError, OSError):
                return b""
            data = b""
            try:
                while True:
                    data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return data

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            with anyio.fail_after(10):
                answers = [await probe(port) for _ in range(6)]
            assert [a.startswith(b"HTTP/1.1 200 ") for a in answers] == [True] * 3 + [False] * 3
            assert answers[3:] == [b""] * 3
            assert server.stats.accept_limited == 3
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_limits_are_off_by_default() -> None:
    server = DerpServer(NodePrivate.generate(os.urandom(32)))
    assert server.rate_limit == 0 and server.admit is None
    with pytest.raises(ValueError):
        DerpServer(NodePrivate.generate(os.urandom(32)), accept_rate=0)
