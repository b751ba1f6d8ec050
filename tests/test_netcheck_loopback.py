"""Netcheck on loopback against our STUN server (127.0.0.1 and 127.0.0.2 as two server addresses),
the HTTPS fallback against our DERP server, and the two commands: `embedmesh netcheck` and
`embedmesh derp serve`'s STUN server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from embedmesh.control.embeddedderp import certificate_sha256, self_signed_certificate
from embedmesh.runtime.netcheck import measure_https_latency, run_netcheck
from embedmesh.tailscale import stun
from embedmesh.tailscale.derpmap import parse_derp_map
from embedmesh.tailscale.derpserver import DerpServer, tls_context
from embedmesh.tailscale.keys import NodePrivate
from embedmesh.tailscale.stunserver import StunResponder, StunServer

CLI = [sys.executable, "-m", "embedmesh.cli.main"]


def _node(region: int, ip: str, stun_port: int, **extra: Any) -> dict[str, Any]:
    return {
        "Name": f"{region}a",
        "RegionID": region,
        "HostName": ip,
        "IPv4": ip,
        "STUNPort": stun_port,
        **extra,
    }


def _map(*regions: tuple[int, dict[str, Any]]) -> dict[str, Any]:
    return {
        "Regions": {
            str(r): {"RegionID": r, "RegionCode": f"r{r}", "RegionName": f"Region {r}", "Nodes": [node]}
            for r, node in regions
        }
    }


@asynccontextmanager
async def slow_stun_server(host: str, delay: float) -> AsyncIterator[int]:
    """Our responder behind a socket that holds each answer ``delay`` seconds (a far region)."""
    responder = StunResponder()
    async with await anyio.create_udp_socket(local_host=host) as sock, anyio.create_task_group() as tg:

        async def answer_later(data: bytes, source: tuple[str, int]) -> None:
            await anyio.sleep(delay)
            answer = responder.answer(data, source)
            if answer is not None:
                await sock.sendto(answer, *source)

        async def serve() -> None:
            async for data, source in sock:
                tg.start_soon(answer_later, data, (source[0], source[1]))

        tg.start_soon(serve)
        yield int(sock.extra(anyio.abc.SocketAttribute.local_port))
        tg.cancel_scope.cancel()


def test_netcheck_on_loopback_measures_regions_and_prefers_the_nearest() -> None:
    async def main() -> None:
        near = StunServer()
        async with anyio.create_task_group() as tg, slow_stun_server("127.0.0.2", 0.05) as far_port:
            near_port = await tg.start(near.serve, "127.0.0.1", 0)
            derp_map = parse_derp_map(
                _map((1, _node(1, "127.0.0.2", far_port)), (2, _node(2, "127.0.0.1", near_port)))
            )
            started = time.monotonic()
            report = await run_netcheck(derp_map, bind_host="127.0.0.1")
            elapsed = time.monotonic() - started
            tg.cancel_scope.cancel()
        assert report.udp and report.ipv4
        assert report.preferred_derp == 2
        assert 0 < report.region_latency[2] < 0.05 <= report.region_latency[1] < 1.0
        # Two server addresses saw the one socket: its address and port, no hard NAT.
        assert report.global_v4 is not None and report.global_v4[0] == "127.0.0.1"
        assert report.mapping_varies_by_dest_ip is False
        assert report.global_v4_counters == {report.global_v4: 2}
        assert near.counters["success"] == 1
        assert elapsed < 1.0  # every region answered: no waiting for the STUN timeout

    anyio.run(main)


def test_stun_server_counts_junk_and_answers_ipv6() -> None:
    async def main() -> None:
        server = StunServer()
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "::1", 0)
            async with await anyio.create_connected_udp_socket("::1", port) as client:
                await client.send(b"\x01\x00\x00\x00 not stun")
                await client.send(stun.binding_request(bytes(range(12))))
                with anyio.fail_after(5):
                    answer = stun.parse_binding_response(await client.receive())
                local = client.extra(anyio.abc.SocketAttribute.local_port)
            tg.cancel_scope.cancel()
        assert answer.txid == bytes(range(12))
        assert (str(answer.address[0]), answer.address[1]) == ("::1", local)
        assert server.counters == {"drop_not_stun": 1, "success": 1, "ipv6": 1}

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    anyio.run(main)


def _closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_without_udp_answers_latency_comes_from_https(tmp_path: Path) -> None:
    """STUN goes unanswered; the DERP servers' /derp/latency-check over TLS (a pinned self-signed
    certificate) gives the latencies and the preferred region."""
    cert, key = self_signed_certificate(tmp_path, "127.0.0.1")

    async def main() -> None:
        server = DerpServer(NodePrivate.generate(os.urandom(32)), ssl_context=tls_context(cert, key))
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            pinned = {"DERPPort": port, "CertName": f"sha256-raw:{certificate_sha256(cert)}"}
            derp_map = parse_derp_map(
                _map(
                    (1, _node(1, "127.0.0.1", _closed_udp_port(), **pinned)),
                    # A region whose only server is STUN-only has no HTTPS to measure.
                    (2, _node(2, "127.0.0.1", _closed_udp_port(), STUNOnly=True)),
                )
            )
            latency, address = await measure_https_latency(derp_map.regions[1].nodes[0])
            assert 0 < latency < 1 and address == "127.0.0.1"
            report = await run_netcheck(derp_map)
            tg.cancel_scope.cancel()
        assert not report.udp
        assert set(report.region_latency) == {1} and report.preferred_derp == 1
        assert report.ipv4 and report.global_v4 is None

    anyio.run(main)


def test_https_latency_refuses_a_certificate_the_map_does_not_pin(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path, "127.0.0.1")

    async def main() -> None:
        server = DerpServer(NodePrivate.generate(os.urandom(32)), ssl_context=tls_context(cert, key))
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            node = (
                parse_derp_map(
                    _map((1, _node(1, "127.0.0.1", -1, DERPPort=port, CertName="sha256-raw:" + "00" * 32)))
                )
                .regions[1]
                .nodes[0]
            )
            with pytest.raises(OSError, match="does not pin"):
                await measure_https_latency(node)
            tg.cancel_scope.cancel()

    anyio.run(main)


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_derp_serve_runs_stun_and_netcheck_reads_it(tmp_path: Path) -> None:
    """`embedmesh derp serve --stun-port 0` beside a second STUN server; `embedmesh netcheck` prints
    what `tailscale netcheck` prints, and its --json is Go's report shape."""
    derp_port = _free_port()
    process = subprocess.Popen(
        [*CLI, "derp", "serve", "--listen", f"127.0.0.1:{derp_port}", "--stun-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("DERP server on http://")
        line = process.stdout.readline()
        assert line.startswith("STUN server on udp 127.0.0.1:"), line
        stun_port = int(line.rsplit(":", 1)[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind(("127.0.0.2", 0))
            other.settimeout(10)
            derp_map = _map(
                (900, _node(900, "127.0.0.1", stun_port, DERPPort=derp_port)),
                (901, _node(901, "127.0.0.2", other.getsockname()[1])),
            )
            derp_map["Regions"]["900"]["RegionName"] = "Home"
            map_file = tmp_path / "derpmap.json"
            map_file.write_text(json.dumps(derp_map))
            # The second server is a plain socket answering with our responder, in this process.
            netcheck = subprocess.Popen(
                [*CLI, "netcheck", "--derp-map", str(map_file)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            data, source = other.recvfrom(2048)
            answer = StunResponder().answer(data, source)
            assert answer is not None
            other.sendto(answer, source)
            out, err = netcheck.communicate(timeout=60)
        assert netcheck.returncode == 0, err
        lines = out.splitlines()
        assert lines[1] == "Report:"
        assert "\t* UDP: true" in lines
        assert any(line.startswith("\t* IPv4: yes, 127.0.0.1:") for line in lines)
        assert "\t* MappingVariesByDestIP: false" in lines
        assert "\t* Nearest DERP: Home" in lines or "\t* Nearest DERP: Region 901" in lines
        latencies = lines[lines.index("\t* DERP latency:") + 1 :]
        assert len(latencies) == 2 and all(
            line.endswith(")") and ("ms" in line or "µs" in line) for line in latencies
        )
        result = subprocess.run(
            [*CLI, "netcheck", "--derp-map", str(map_file), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["UDP"] is True and doc["RegionLatency"]["900"] > 0 and doc["PreferredDERP"] in (900, 901)
        assert doc["GlobalV4"].startswith("127.0.0.1:")
        process.terminate()
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_derp_serve_default_stun_port_in_use_is_a_warning() -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            blocker.bind(("127.0.0.1", 3478))
        except OSError:
            pass  # someone else holds it: in use either way
        process = subprocess.Popen(
            [*CLI, "derp", "serve", "--listen", f"127.0.0.1:{_free_port()}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None and process.stderr is not None
            assert process.stdout.readline().startswith("DERP server on http://")
            assert (
                "warning: no STUN server: port 3478 on 127.0.0.1 is already in use"
                in process.stderr.readline()
            )
            process.terminate()
            assert process.wait(10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        blocker.close()


def test_netcheck_command_errors_are_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from embedmesh.cli.main import main

    bad = tmp_path / "map.json"
    bad.write_text('{"Regions": {"x": {}}}')
    result = CliRunner().invoke(main, ["netcheck", "--derp-map", str(bad)])
    assert result.exit_code == 1 and "is not a DERP map" in result.output
    empty = tmp_path / "empty.json"
    empty.write_text('{"Regions": {}}')
    result = CliRunner().invoke(main, ["netcheck", "--derp-map", str(empty)])
    assert result.exit_code == 1 and "no DERP regions" in result.output
