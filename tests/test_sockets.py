"""The anyio socket API over the mesh: two static-mode nodes on loopback, under asyncio and trio."""

from __future__ import annotations

import datetime
import errno
import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSListener, TLSStream

from embedmesh import Node
from tests.test_node_static import _configs

pytestmark = pytest.mark.parametrize("backend", ["asyncio", "trio"])


@asynccontextmanager
async def two_nodes() -> AsyncIterator[tuple[Node, Node]]:
    a_text, b_text = _configs()
    async with Node(wireguard_config=b_text, listen_host="127.0.0.1") as b:
        a_text = a_text.replace("{port_b}", str(b.listen_port))
        async with Node(wireguard_config=a_text, listen_host="127.0.0.1") as a:
            yield a, b


def run(backend: str, fn: Callable[[], Any]) -> None:
    anyio.run(fn, backend=backend)


def test_echo_with_half_close_and_attributes(backend: str) -> None:
    async def main() -> None:
        async with two_nodes() as (a, b):
            listener = await b.listen("tcp", ":7000")
            async with anyio.create_task_group() as tg:

                async def echo(stream: Any) -> None:
                    chunks = [chunk async for chunk in stream]
                    await stream.send(b"".join(chunks)[::-1])

                tg.start_soon(listener.serve, echo)
                stream = await a.dial("tcp", "100.64.0.2:7000")
                assert stream.extra(SocketAttribute.remote_address) == ("100.64.0.2", 7000)
                assert stream.extra(SocketAttribute.local_address)[0] == "100.64.0.1"
                await stream.send(b"hello, ")
                await stream.send(b"mesh")
                await stream.send_eof()
                reply = b""
                with pytest.raises(anyio.EndOfStream):
                    while True:
                        reply += await stream.receive()
                assert reply == b"hsem ,olleh"
                await stream.aclose()
                tg.cancel_scope.cancel()

    run(backend, main)


def test_bulk_transfer_both_directions_over_ipv6(backend: str) -> None:
    async def main() -> None:
        async with two_nodes() as (a, b):
            listener = await b.listen("tcp", "[fd7a:115c:a1e0::2]:7001")
            payload = os.urandom(3_000_000)
            async with anyio.create_task_group() as tg:

                async def sink(stream: Any) -> None:
                    digest = hashlib.sha256()
                    async for chunk in stream:
                        digest.update(chunk)
                    await stream.send(digest.digest())
                    await stream.send(payload)

                tg.start_soon(listener.serve, sink)
                stream = await a.dial("tcp", "[fd7a:115c:a1e0::2]:7001")
                await stream.send(payload)
                await stream.send_eof()
                received = bytearray()
                async for chunk in stream:
                    received += chunk
                assert bytes(received[:32]) == hashlib.sha256(payload).digest()
                assert bytes(received[32:]) == payload
                tg.cancel_scope.cancel()

    run(backend, main)


def test_refused_unreachable_and_reset(backend: str) -> None:
    async def main() -> None:
        async with two_nodes() as (a, b):
            with pytest.raises(ConnectionRefusedError, match="refused"):
                await a.dial("tcp", "100.64.0.2:1", timeout=5)
            # 100.64.0.2 answers; 100.64.0.99 is routed to no peer: host unreachable at once.
            with pytest.raises(OSError, match="no peer of this node routes") as info:
                await a.dial("tcp", "100.64.0.99:80", timeout=5)
            assert info.value.errno == errno.EHOSTUNREACH
            listener = await b.listen("tcp", ":7002")
            server_side: list[Any] = []
            async with anyio.create_task_group() as tg:

                async def accept() -> None:
                    server_side.append(await listener.accept())

                tg.start_soon(accept)
                stream = await a.dial("tcp", "100.64.0.2:7002")
                await stream.send(b"x")
                while not server_side:
                    await anyio.sleep(0.01)
                server_side[0].connection.abort(None)
                b._dataplane.kick()
                with pytest.raises(anyio.BrokenResourceError):
                    while True:
                        await stream.receive()
                tg.cancel_scope.cancel()

    run(backend, main)


def test_backpressure_bounds_the_send_buffer(backend: str) -> None:
    async def main() -> None:
        async with two_nodes() as (a, b):
            listener = await b.listen("tcp", ":7003")
            async with anyio.create_task_group() as tg:
                accepted: list[Any] = []

                async def accept() -> None:
                    accepted.append(await listener.accept())

                tg.start_soon(accept)
                stream = await a.dial("tcp", "100.64.0.2:7003")
                sent = 0
                # Nobody reads on B: sends must block once both buffers are full.
                with anyio.move_on_after(1.0):
                    while True:
                        await stream.send(bytes(65536))
                        sent += 65536
                config = a._stack.tcp.config
                assert sent <= config.send_buffer + config.recv_buffer + 65536 * 2
                assert stream.connection.send_queued <= config.send_buffer
                # Reading on B releases the writer.
                total = 0
                while total < sent:
                    total += len(await accepted[0].receive())
                tg.cancel_scope.cancel()

    run(backend, main)


def test_udp_both_ways_and_port_unreachable(backend: str) -> None:
    async def main() -> None:
        async with two_nodes() as (a, b):
            server = await b.listen_packet("udp", ":5353")
            client = await a.listen_packet("udp", ":0")
            await client.sendto(b"question", "100.64.0.2", 5353)
            with anyio.fail_after(5):
                data, (host, port) = await server.receive()
            assert data == b"question" and host == "100.64.0.1"
            await server.sendto(b"answer", host, port)
            with anyio.fail_after(5):
                assert (await client.receive())[0] == b"answer"
            await client.sendto(b"nobody home", "100.64.0.2", 5354)
            with anyio.fail_after(5):
                while not b._stack.udp.counters["tx_port_unreachable"]:
                    await anyio.sleep(0.01)
            await server.aclose()
            await client.aclose()

    run(backend, main)


def _self_signed() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web.mesh.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("web.mesh.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
        with open(cert_path, "wb") as f:
            f.write(pem_cert)
        with open(key_path, "wb") as f:
            f.write(pem_key)
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(cert_path, key_path)
        client = ssl.create_default_context(cafile=cert_path)
    return server, client


def test_tls_over_mesh_streams(backend: str) -> None:
    async def main() -> None:
        server_ctx, client_ctx = _self_signed()
        async with two_nodes() as (a, b):
            listener = TLSListener(await b.listen("tcp", ":443"), server_ctx)
            async with anyio.create_task_group() as tg:

                async def handler(stream: Any) -> None:
                    request = await stream.receive()
                    await stream.send(b"TLS says: " + request)
                    await stream.aclose()  # TLSListener leaves closing (close_notify) to the handler

                tg.start_soon(listener.serve, handler)
                raw = await a.dial("tcp", "100.64.0.2:443")
                tls = await TLSStream.wrap(raw, hostname="web.mesh.test", ssl_context=client_ctx)
                await tls.send(b"ping")
                assert await tls.receive() == b"TLS says: ping"
                await tls.aclose()
                tg.cancel_scope.cancel()

    run(backend, main)


def test_address_errors(backend: str) -> None:
    async def main() -> None:
        async with two_nodes() as (a, _b):
            with pytest.raises(ValueError, match="brackets"):
                await a.listen("tcp", "fd7a::1:80")
            with pytest.raises(OSError, match="not an address of this node"):
                await a.listen("tcp", "100.64.0.2:80")
            with pytest.raises(ValueError, match="listen_packet"):
                await a.listen("udp", ":53")
            listener = await a.listen("tcp", ":0")
            assert listener.port > 0
            with pytest.raises(OSError):
                await a.listen("tcp", f":{listener.port}")
            await listener.aclose()

    run(backend, main)
