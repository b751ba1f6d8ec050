"""A local port that another program holds (issue 8): `up --forward/--socks5/--dns` exits non-zero
with one line naming the option and the port, and the API underneath raises AddressInUseError."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from embedmesh import Node
from embedmesh.errors import AddressInUseError, EmbedmeshError, ListenError
from embedmesh.gateway import listen_local
from tests.test_node_static import _configs

EMBEDMESH = [sys.executable, "-m", "embedmesh.cli.main"]


@contextmanager
def held_port(kind: int = socket.SOCK_STREAM) -> Iterator[int]:
    """A loopback port that another socket holds (listening, for TCP) while the block runs."""
    with socket.socket(socket.AF_INET, kind) as holder:
        holder.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            holder.listen()
        yield int(holder.getsockname()[1])


def test_listen_local_names_the_port_in_use() -> None:
    async def main() -> None:
        with held_port() as port, pytest.raises(AddressInUseError) as info:
            await listen_local("127.0.0.1", port)
        error = info.value
        assert isinstance(error, EmbedmeshError) and isinstance(error, OSError)
        assert error.errno == errno.EADDRINUSE and (error.host, error.port) == ("127.0.0.1", port)
        assert f"port {port} on 127.0.0.1 is already in use" in str(error) and "\n" not in str(error)

    anyio.run(main)


def test_listen_local_says_why_for_an_address_not_of_this_host() -> None:
    async def main() -> None:
        with pytest.raises(ListenError, match=r"192\.0\.2\.1 is not an address of this host") as info:
            await listen_local("192.0.2.1", 0)
        assert not isinstance(info.value, AddressInUseError)

    anyio.run(main)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["tcp", "udp"])
def test_serve_dns_on_a_port_in_use_raises_and_the_node_keeps_working(kind: int) -> None:
    async def main() -> None:
        _, b_text = _configs()
        async with Node(wireguard_config=b_text, listen_host="127.0.0.1", dns_upstreams=[]) as node:
            with (
                held_port(kind) as port,
                pytest.raises(AddressInUseError, match=rf"port {port} on 127\.0\.0\.1 is already in use"),
            ):
                await node.serve_dns(f"127.0.0.1:{port}")
            host, bound = await node.serve_dns("127.0.0.1:0")  # the node and its DNS still serve
            assert host == "127.0.0.1" and bound > 0
            assert [str(a) for a in await node.resolve("100.64.0.9")] == ["100.64.0.9"]

    anyio.run(main)


@pytest.mark.parametrize("option", ["--forward", "--socks5", "--dns"])
def test_up_with_a_port_in_use_exits_with_one_line(option: str, tmp_path: Path) -> None:
    a_text, _ = _configs()
    config = tmp_path / "a.conf"
    config.write_text(a_text.replace("{port_b}", "9"))
    with held_port() as port:
        value = f"127.0.0.1:{port}" + ("=100.64.0.2:80" if option == "--forward" else "")
        result = subprocess.run(
            [*EMBEDMESH, "up", "--wireguard-config", str(config), "--listen-host", "127.0.0.1", option, value],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"Error: {option} 127.0.0.1:{port}")
    assert f"port {port} on 127.0.0.1 is already in use" in errors[0]
