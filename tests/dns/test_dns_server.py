"""The DNS service on real loopback sockets: dnspython and dig against the local port, forwarding to
a test upstream on 127.0.0.1, TCP, truncation, the stub resolver with search domains, and policy."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import dns.asyncbackend
import dns.asyncquery
import dns.asyncresolver
import dns.flags
import dns.message
import dns.rcode
import pytest
from tests.dns.dns_harness import AdminDNSConfig, TestUpstream, answers, query, standard_map, zone_handler

from embedmesh.dns.records import MagicZone
from embedmesh.dns.resolver import Client, Recursion, Resolver
from embedmesh.dns.server import DnsService, _is_loopback
from embedmesh.dns.upstream import HostDnsConfig, ResolvConf, Upstream
from embedmesh.errors import NameResolutionError

UPSTREAM_ZONE = {
    ("example.com", "A"): ["93.184.216.34"],
    ("big.example.com", "TXT"): [f'"{i:03d}{"x" * 200}"' for i in range(10)],
    ("db2.lab.example", "A"): ["10.1.0.5"],
    ("printer.home.arpa", "A"): ["192.168.1.9"],
}


@asynccontextmanager
async def running(
    *, dns_config: Any = None, resolv_conf: ResolvConf | None = None, upstream: TestUpstream | None = None
) -> AsyncIterator[tuple[DnsService, int, TestUpstream]]:
    upstream = upstream or TestUpstream(zone_handler(UPSTREAM_ZONE))
    async with anyio.create_task_group() as tg:
        port = await tg.start(upstream.run)
        if dns_config is not None and getattr(dns_config, "split_dns", None) == "test-upstream":
            dns_config = AdminDNSConfig(
                search_domains=("mesh.internal", "lab.example"),
                split_dns={"lab.example": (f"127.0.0.1:{port}",)},
            )
        host = None if resolv_conf else HostDnsConfig((Upstream("127.0.0.1", port),), timeout=0.5)
        service = DnsService(Resolver(rng=random.Random(1), host_config=host), resolv_conf=resolv_conf)
        service.set_zone(MagicZone.from_netmap(standard_map(dns_config)))
        await tg.start(service.run)
        _, dns_port = await tg.start(service.serve_local, "127.0.0.1", 0)
        yield service, dns_port, upstream
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_dnspython_over_udp_and_tcp(backend: str) -> None:
    async def main() -> None:
        dns_backend = dns.asyncbackend.get_backend(backend)  # dnspython's own, per event loop
        async with running() as (_, port, upstream):
            for transport in (dns.asyncquery.udp, dns.asyncquery.tcp):

                async def ask(name: str, rdtype: str) -> dns.message.Message:
                    query = dns.message.make_query(name, rdtype)
                    return await transport(query, "127.0.0.1", port=port, timeout=3, backend=dns_backend)  # noqa: B023

                assert answers(await ask("db", "A")) == ["db. A 100.64.0.2"]
                assert answers(await ask("db.mesh.internal", "AAAA")) == [
                    "db.mesh.internal. AAAA fd7a:115c:a1e0::6440:2"
                ]
                ptr = await ask("3.0.64.100.in-addr.arpa", "PTR")
                assert answers(ptr) == ["3.0.64.100.in-addr.arpa. PTR web.mesh.internal."]
                assert (await ask("nope.mesh.internal", "A")).rcode() == dns.rcode.NXDOMAIN
                assert answers(await ask("example.com", "A")) == ["example.com. A 93.184.216.34"]
            # The second example.com came from the cache.
            assert [q for q in upstream.queries if q[1] == "example.com."] == [("udp", "example.com.", "A")]

    anyio.run(main, backend=backend)


def test_dnspython_resolver_falls_back_to_tcp_on_truncation() -> None:
    async def main() -> None:
        async with running() as (_, port, upstream):
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
            resolver.port = port
            resolver.lifetime = 5
            answer = await resolver.resolve("big.example.com", "TXT")
            assert len(answer.rrset) == 10  # 2 KB: truncated over UDP, whole over TCP
            # Upstream too: the UDP answer to us was truncated, so we asked it again over TCP.
            assert ("tcp", "big.example.com.", "TXT") in upstream.queries
            answer = await resolver.resolve("web.mesh.internal", "A")
            assert [r.to_text() for r in answer] == ["100.64.0.3"]
            with pytest.raises(dns.resolver.NXDOMAIN):
                await resolver.resolve("gone.mesh.internal", "A")

    anyio.run(main)


def test_pipelined_tcp_queries_on_one_connection() -> None:
    async def main() -> None:
        async with running() as (_, port, _upstream), await anyio.connect_tcp("127.0.0.1", port) as stream:
            names = ["example.com", "db", "web.mesh.internal", "nope.mesh.internal"]
            wire = [query(n, "A") for n in names]
            await stream.send(b"".join(len(w).to_bytes(2, "big") + w for w in wire))
            buffered = anyio.streams.buffered.BufferedByteReceiveStream(stream)
            got = {}
            for _ in names:
                length = int.from_bytes(await buffered.receive_exactly(2), "big")
                reply = dns.message.from_wire(await buffered.receive_exactly(length))
                got[str(reply.question[0].name)] = reply
            assert answers(got["db."]) == ["db. A 100.64.0.2"]
            assert got["nope.mesh.internal."].rcode() == dns.rcode.NXDOMAIN
            assert answers(got["example.com."]) == ["example.com. A 93.184.216.34"]

    anyio.run(main)


def test_hostile_datagrams_never_stop_the_server() -> None:
    async def main() -> None:
        async with (
            running() as (service, port, _),
            await anyio.create_connected_udp_socket("127.0.0.1", port) as sock,
        ):
            for junk in (
                b"",
                b"\x00",
                b"\xff" * 12,
                b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\xc0\x0c\x00\x01\x00\x01",
            ):
                await sock.send(junk)
            await sock.send(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\xc0\x0c\x00\x01\x00\x01")
            with anyio.fail_after(3):
                reply = dns.message.from_wire(await sock.receive())
            assert reply.rcode() == dns.rcode.FORMERR
            reply = await dns.asyncquery.udp(
                dns.message.make_query("db", "A"), "127.0.0.1", port=port, timeout=3
            )
            assert answers(reply) == ["db. A 100.64.0.2"]
            # A TCP client that sends half a length prefix and goes away.
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"\x00")
            reply = await dns.asyncquery.tcp(
                dns.message.make_query("web", "A"), "127.0.0.1", port=port, timeout=3
            )
            assert answers(reply) == ["web. A 100.64.0.3"]
            assert service.resolver.counters["formerr"] >= 2

    anyio.run(main)


def test_dead_upstream_gives_servfail_before_the_client_gives_up() -> None:
    async def main() -> None:
        silent = TestUpstream(zone_handler(UPSTREAM_ZONE))
        silent.silent = True
        async with running(upstream=silent) as (_, port, upstream):
            with anyio.fail_after(4):
                reply = await dns.asyncquery.udp(
                    dns.message.make_query("example.com", "A"), "127.0.0.1", port=port, timeout=4
                )
            assert reply.rcode() == dns.rcode.SERVFAIL
            assert len(upstream.queries) == 2  # two attempts at 0.5 s each

    anyio.run(main)


def test_the_stub_resolver_applies_search_domains_and_split_dns() -> None:
    async def main() -> None:
        async with running(dns_config=AdminDNSConfig(split_dns="test-upstream")) as (service, _, upstream):  # type: ignore[arg-type]
            assert [str(a) for a in await service.resolve("db")] == ["100.64.0.2", "fd7a:115c:a1e0::6440:2"]
            assert [str(a) for a in await service.resolve("db", family=6)] == ["fd7a:115c:a1e0::6440:2"]
            assert [str(a) for a in await service.resolve("DB.Mesh.Internal.")] == [
                "100.64.0.2",
                "fd7a:115c:a1e0::6440:2",
            ]
            # Not a node: the search domains, so `db2` finds db2.lab.example at its split-DNS resolver.
            assert [str(a) for a in await service.resolve("db2")] == ["10.1.0.5"]
            assert ("udp", "db2.lab.example.", "A") in upstream.queries
            assert [str(a) for a in await service.resolve("example.com")] == ["93.184.216.34"]
            with pytest.raises(NameResolutionError):
                await service.resolve("nothing-here")
            for bad in ("", ".", "a..b", "x" * 64):
                with pytest.raises(NameResolutionError, match="not a valid DNS name"):
                    await service.resolve(bad)
            assert [str(a) for a in await service.resolve("100.64.0.9")] == ["100.64.0.9"]

    anyio.run(main)


def test_resolve_takes_socket_families_and_names_the_missing_one() -> None:
    """``family`` is 4/6 or what the socket module calls them, and "no answer" says for which."""

    async def main() -> None:
        async with running() as (service, _, upstream):
            assert [str(a) for a in await service.resolve("db", family=socket.AF_INET)] == ["100.64.0.2"]
            assert [str(a) for a in await service.resolve("db", family=socket.AF_INET6)] == [
                "fd7a:115c:a1e0::6440:2"
            ]
            assert len(await service.resolve("db", family=socket.AF_UNSPEC)) == 2
            assert [str(a) for a in await service.resolve("example.com", family=socket.AF_INET)] == [
                "93.184.216.34"
            ]
            # web is a node with an IPv4 address only: the zone says so without asking upstream.
            asked = len(upstream.queries)
            with pytest.raises(NameResolutionError, match=r"'web' has no IPv6 address \(only 100\.64\.0\.3\)"):
                await service.resolve("web", family=socket.AF_INET6)
            assert len(upstream.queries) == asked
            with pytest.raises(NameResolutionError, match=r"'example\.com' has no IPv6 address"):
                await service.resolve("example.com", family=6)
            with pytest.raises(NameResolutionError, match=r"'100\.64\.0\.9' is an IPv4 address, not IPv6"):
                await service.resolve("100.64.0.9", family=socket.AF_INET6)
            with pytest.raises(NameResolutionError, match="no such name"):
                await service.resolve("nothing-here", family=socket.AF_INET)
            with pytest.raises(ValueError, match="family"):
                await service.resolve("db", family=socket.AF_UNIX)

    anyio.run(main)


def test_resolv_conf_search_domains_and_nameserver(tmp_path: Any) -> None:
    async def main() -> None:
        upstream = TestUpstream(zone_handler(UPSTREAM_ZONE))
        async with anyio.create_task_group() as tg:
            port = await tg.start(upstream.run)
            path = tmp_path / "resolv.conf"
            path.write_text("# test\nnameserver 127.0.0.1\nsearch home.arpa\noptions ndots:1 timeout:1\n")
            conf = ResolvConf(path)
            service = DnsService(Resolver(rng=random.Random(1)), resolv_conf=conf)
            await tg.start(service.run)
            config = service._host_config()
            assert config.nameservers == (Upstream("127.0.0.1", 53),) and config.search == ("home.arpa",)
            # resolv.conf cannot name a port; point the parsed server at the test upstream.
            service.resolver.set_host_config(
                HostDnsConfig((Upstream("127.0.0.1", port),), search=("home.arpa",))
            )
            service.resolv_conf = None
            assert [str(a) for a in await service.resolve("printer")] == ["192.168.1.9"]
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_only_loopback_clients_get_forwarding_on_the_local_port() -> None:
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("::ffff:127.0.0.1")
    assert not _is_loopback("192.168.1.5") and not _is_loopback("100.64.0.2") and not _is_loopback("junk")

    async def main() -> None:
        async with running() as (service, _, upstream):
            stranger = Client(99, "udp", Recursion.NONE)
            reply = service.handle(query("example.com", "A"), stranger, lambda data: None)
            assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.REFUSED
            assert not upstream.queries
            local = service.handle(query("db", "A"), stranger, lambda data: None)
            assert local is not None and answers(dns.message.from_wire(local)) == ["db. A 100.64.0.2"]

    anyio.run(main)


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed: apt-get install dnsutils")
def test_dig_against_the_local_port() -> None:
    def dig(port: int, *args: str) -> str:
        result = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(port), "+time=3", "+tries=1", *args],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    async def main() -> None:
        async with running() as (_, port, _upstream):
            out = await anyio.to_thread.run_sync(dig, port, "+short", "db")
            assert out.split() == ["100.64.0.2"]
            out = await anyio.to_thread.run_sync(dig, port, "+short", "db.mesh.internal", "AAAA")
            assert out.split() == ["fd7a:115c:a1e0::6440:2"]
            out = await anyio.to_thread.run_sync(dig, port, "+short", "-x", "100.64.0.3")
            assert out.split() == ["web.mesh.internal."]
            out = await anyio.to_thread.run_sync(dig, port, "nope.mesh.internal")
            assert "status: NXDOMAIN" in out and "mesh.internal.\t\t5\tIN\tSOA" in out.replace("  ", "\t")
            out = await anyio.to_thread.run_sync(dig, port, "+tcp", "+short", "web")
            assert out.split() == ["100.64.0.3"]
            out = await anyio.to_thread.run_sync(dig, port, "+short", "example.com")
            assert out.split() == ["93.184.216.34"]
            out = await anyio.to_thread.run_sync(dig, port, "+ignore", "+noedns", "big.example.com", "TXT")
            assert " tc " in out.split("flags:")[1].split(";")[0] + " "  # truncated over UDP
            out = await anyio.to_thread.run_sync(dig, port, "big.example.com", "TXT")
            assert out.count("\tTXT\t") == 10  # dig retried over TCP by itself

    anyio.run(main)
