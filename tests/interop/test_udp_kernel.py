"""embedmesh's UDP (and its answers on closed ports) against the Linux kernel's sockets.

Each test runs twice: with the stack on a TUN device whose kernel side sits in a namespace
(``stackhost.StackHost``), and as a ``Node`` peered with wireguard-go in a namespace. The kernel
side is socat and small Python programs run in that namespace:

* a kernel datagram reaches ``listen_packet`` and embedmesh's reply comes back to the sender;
* embedmesh sends to a kernel UDP socket and gets its echoes;
* a datagram to a closed embedmesh UDP port: the kernel gets ICMP port unreachable, which a
  connected UDP socket reports as ECONNREFUSED;
* a connection to a closed embedmesh TCP port: RST, which curl reports as "Connection refused"
  at once.
"""

from __future__ import annotations

import contextlib
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from netns import NetnsRig, skip_unless_wireguard
from stackhost import (
    KERNEL_V4,
    KERNEL_V6,
    NODE_V4,
    NODE_V6,
    PEER_V4,
    PEER_V6,
    STACK_V4,
    STACK_V6,
    StackHost,
    capture_node,
    curl,
    explain_failure,
    overlay_pcap_path,
    url_host,
    wireguard_peer,
)

from embedmesh import Node
from embedmesh.pcap import PcapWriter


@dataclass
class Setup:
    """One embedmesh host and the namespace of its kernel peer, with both sides' addresses."""

    transport: str
    ns: Any
    ours: str
    theirs: str
    pcap: Path
    run: Any  # () -> async context manager yielding the host (a StackHost or a Node)


@contextlib.contextmanager
def make_setup(rig: NetnsRig, transport: str, version: int) -> Iterator[Setup]:
    if transport == "tun":
        ns = rig.add_namespace("kernel")
        with StackHost(rig, ns, pcap_name=f"udp-tun-v{version}") as host:
            assert host.pcap_path is not None

            @contextlib.asynccontextmanager
            async def run_tun() -> AsyncIterator[Any]:
                async with host.running():
                    yield host

            ours, theirs = (STACK_V4, KERNEL_V4) if version == 4 else (STACK_V6, KERNEL_V6)
            yield Setup(transport, ns, ours, theirs, host.pcap_path, run_tun)
    else:
        skip_unless_wireguard()
        config, ns, link = wireguard_peer(rig)
        pcap = overlay_pcap_path(rig, f"udp-wireguard-v{version}")

        @contextlib.asynccontextmanager
        async def run_node() -> AsyncIterator[Any]:
            node = Node(wireguard_config=config, listen_host=link.a.ip)
            capture_node(node, PcapWriter(pcap))
            async with node:
                yield node

        ours, theirs = (NODE_V4, PEER_V4) if version == 4 else (NODE_V6, PEER_V6)
        yield Setup(transport, ns, ours, theirs, pcap, run_node)


PARAMS = [
    pytest.param(transport, version, id=f"{transport}-v{version}")
    for transport in ("tun", "wireguard")
    for version in (4, 6)
]

# A kernel UDP echo server: answers each datagram with its upper-case copy, N times, then exits.
ECHO_SERVER = textwrap.dedent(
    """
    import socket, sys
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    print("bound", flush=True)
    for _ in range(count):
        data, peer = s.recvfrom(65535)
        s.sendto(data.upper(), peer)
    """
)

# A connected kernel UDP socket sends one datagram and reports what comes back.
PROBE = textwrap.dedent(
    """
    import socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect((host, port))
    for attempt in range(3):
        s.send(b"anyone there?")
        try:
            print("REPLY", s.recv(100))
            break
        except ConnectionRefusedError:
            print("REFUSED")
            break
        except TimeoutError:
            print("TIMEOUT")
    """
)


@pytest.mark.parametrize(("transport", "version"), PARAMS)
def test_udp_both_directions(rig: NetnsRig, transport: str, version: int) -> None:
    with make_setup(rig, transport, version) as setup:
        ns, ours, theirs = setup.ns, setup.ours, setup.theirs

        async def main() -> None:
            async with setup.run() as host:
                # The kernel (socat, a connected UDP socket) sends to listen_packet; we answer.
                sock = await host.listen_packet("udp", ":5353")

                async def answer() -> tuple[bytes, tuple[str, int]]:
                    data, source = await sock.receive()
                    await sock.sendto(b"pong:" + data, *source)
                    return data, source

                async with anyio.create_task_group() as tg:
                    got: list[tuple[bytes, tuple[str, int]]] = []

                    async def answer_once() -> None:
                        got.append(await answer())

                    tg.start_soon(answer_once)
                    family = "UDP4" if version == 4 else "UDP6"
                    target = f"{family}:{url_host(ours)}:5353,sourceport=40000"
                    result = await anyio.to_thread.run_sync(
                        lambda: ns.run(["socat", "-t", "1", "-", target], input="ping\n", check=False)
                    )
                assert result.returncode == 0, result.stderr
                assert result.stdout == "pong:ping\n"
                assert got == [(b"ping\n", (theirs, 40000))]

                # ... and many datagrams from a Python socket, each answered.
                async with anyio.create_task_group() as tg:
                    count = 50

                    async def answer_all() -> None:
                        for _ in range(count):
                            await answer()

                    tg.start_soon(answer_all)
                    script = (
                        "import socket,sys\n"
                        f"s=socket.socket(socket.AF_INET{'6' if version == 6 else ''},socket.SOCK_DGRAM)\n"
                        "s.settimeout(5)\n"
                        f"s.connect(({ours!r},5353))\n"
                        f"for i in range({count}):\n"
                        "    s.send(b'%04d' % i + bytes(1000))\n"
                        "    r = s.recv(2000)\n"
                        "    assert r == b'pong:' + b'%04d' % i + bytes(1000), r[:20]\n"
                        "print('ok')\n"
                    )
                    result = await anyio.to_thread.run_sync(
                        lambda: ns.run(["python3", "-c", script], check=False, timeout=30)
                    )
                assert result.stdout.strip() == "ok", result.stdout + result.stderr
                await sock.aclose()

                # embedmesh sends to a kernel UDP socket and gets its echoes.
                server = ns.popen(["python3", "-c", ECHO_SERVER, theirs, "7000", "20"], log_name="udp-echo")
                client = await host.listen_packet("udp", ":0")
                deadline = time.monotonic() + 10
                while "bound" not in Path(server.log_path).read_text():
                    assert time.monotonic() < deadline and server.poll() is None, Path(
                        server.log_path
                    ).read_text()
                    await anyio.sleep(0.02)
                for i in range(20):
                    payload = f"datagram {i} ".encode() * 50
                    await client.sendto(payload, theirs, 7000)
                    with anyio.fail_after(5):
                        data, source = await client.receive()
                    assert (data, source) == (payload.upper(), (theirs, 7000))
                await client.aclose()
                assert await anyio.to_thread.run_sync(lambda: server.wait(10)) == 0

        with explain_failure(setup.pcap):
            anyio.run(main)


@pytest.mark.parametrize(("transport", "version"), PARAMS)
def test_closed_ports_refuse(rig: NetnsRig, transport: str, version: int) -> None:
    """A closed UDP port answers ICMP port unreachable (the kernel's connected socket sees
    ECONNREFUSED); a closed TCP port answers RST (curl: "Connection refused", at once)."""
    with make_setup(rig, transport, version) as setup:
        ns, ours = setup.ns, setup.ours

        async def main() -> None:
            async with setup.run():
                result = await anyio.to_thread.run_sync(
                    lambda: ns.run(["python3", "-c", PROBE, ours, "5999"], check=False, timeout=30)
                )
                assert result.stdout.splitlines()[-1:] == ["REFUSED"], result.stdout + result.stderr
                started = time.monotonic()
                result = await anyio.to_thread.run_sync(
                    lambda: curl(
                        ns, "-v", "--connect-timeout", "5", f"http://{url_host(ours)}:8999/", timeout=10
                    )
                )
                elapsed = time.monotonic() - started
                assert result.returncode == 7, (result.returncode, result.stderr)  # couldn't connect
                assert "Connection refused" in result.stderr, result.stderr
                # Immediate: an RST, not a timeout (the first packet through wireguard-go includes
                # the WireGuard handshake, already done here by the UDP probe).
                assert elapsed < 2.0, elapsed

        with explain_failure(setup.pcap):
            anyio.run(main)
