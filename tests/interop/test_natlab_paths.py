"""Issue 10, "The NAT lab, with real peers": path changes under a live TCP stream, keepalives through
a 30-s NAT, and a relay that sees only ciphertext.

A small lab of its own (the tests change its routers): hosts ``p`` and ``q``, each behind an
``eim-apdf`` router (a home router: endpoint-independent mapping, address-and-port-dependent
filtering), control, DERP (`embedmesh derp serve`) and STUN on the lab's internet. Each test runs
with tailscaled on both hosts first (that proves the rig against Tailscale's own client), then
with embedmesh nodes (`embedmesh up`).

* Bulk transfer: ``p`` sends a paced, deterministic byte stream to ``q``'s sink. It starts while
  ``p``'s router blocks UDP (so on DERP), the router becomes ``eim-apdf`` (the path upgrades to
  direct), then it becomes ``symmetric``, which flushes conntrack and maps ``p``'s next packets
  to new random ports that ``q``'s router filters out: the direct path is dead and traffic falls
  back to DERP. The sink's SHA-256 must equal the sender's, with bytes arriving in every phase.
* Keepalives: both routers' UDP timeouts set to 30 s (``nf_conntrack_udp_timeout`` and the
  ``_stream`` one, so an assured flow gets no 120 s either); after a direct exchange the
  application is silent for 40 s. The peer-to-peer UDP flow must stay in both routers' conntrack
  the whole time, and the path direct, while a one-off UDP flow from the same host (the
  control) expires after 30 s.
* Ciphertext: with ``p`` behind ``udp-blocked``, a known random marker goes 200 times from ``p``
  to ``q`` through DERP; tcpdump on the internet bridge (the DERP server's host) captures the
  relay's TCP traffic, which must hold at least as many bytes as were sent and no copy of the
  marker, while a capture of ``q``'s loopback (where the plaintext is delivered) holds it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from natlab import (
    EMBEDMESH_DERP_LISTEN,
    SERVER_IPS,
    SINK_PORT,
    TOOLS,
    LabHost,
    LabPeer,
    LabTailnet,
    NatLab,
    Router,
    _log_text,
    skip_unless_natlab,
)
from natlab_tools import stream_bytes
from netns import RigError, wait_for

pytestmark = pytest.mark.interop

IMPLS = ("tailscaled", "embedmesh")


class PairLab:
    def __init__(self, lab: NatLab, net: LabTailnet) -> None:
        self.lab, self.net = lab, net
        self.p = lab.host_behind("eim-apdf", "p")
        self.q = lab.host_behind("eim-apdf", "q")
        self.nodes: dict[str, tuple[LabPeer, LabPeer]] = {}

    @property
    def rp(self) -> Router:
        assert self.p.router is not None
        return self.p.router

    @property
    def rq(self) -> Router:
        assert self.q.router is not None
        return self.q.router

    def pair(self, impl: str) -> tuple[LabPeer, LabPeer]:
        if impl not in self.nodes:
            make: Callable[[LabHost], Any] = (
                self.net.tailscaled if impl == "tailscaled" else self.net.embedmesh
            )
            a, b = make(self.p), make(self.q)
            for node in (a, b):
                node.wait_up()
                node.start_services()
            self.nodes[impl] = (a, b)
        return self.nodes[impl]

    def reset(self) -> None:
        for router in (self.rp, self.rq):
            router.set_kind("eim-apdf")
            router.set_udp_timeouts(30, 120)

    def logs(self, impl: str) -> str:
        parts = [self.net.logs()]
        for node in self.nodes.get(impl, ()):
            log = node.ts.log() if hasattr(node, "ts") else node.log()  # type: ignore[attr-defined]
            parts.append(f"----- {impl} {node.name} -----\n" + "\n".join(log.splitlines()[-80:]))
        return "\n".join(parts)


@pytest.fixture(scope="module")
def pairlab(tailscale_bins: Any) -> Iterator[PairLab]:
    skip_unless_natlab()
    with NatLab() as lab:
        net = LabTailnet(lab, tailscale_bins, derp="embedmesh")
        state = PairLab(lab, net)
        try:
            yield state
        finally:
            for a, b in state.nodes.values():
                a.close()  # type: ignore[attr-defined]
                b.close()  # type: ignore[attr-defined]


def _wait_path(a: LabPeer, b: LabPeer, kind: str, timeout: float, what: str) -> float:
    start = time.monotonic()
    wait_for(lambda: a.path_to(b).kind == kind, timeout=timeout, interval=0.1, what=what)
    return time.monotonic() - start


def _progress(proc: Any) -> list[dict[str, Any]]:
    lines = []
    for line in _log_text(proc).splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
    return lines


def _sink_bytes(host: LabHost) -> int:
    """Bytes the host's sink has taken from the connection it is reading now."""
    events = _progress(host.extra["sink"])
    for event in reversed(events):
        if "bytes" in event:
            return int(event["bytes"]) if not event.get("done") else 0
    return 0


def _sink_done(host: LabHost, after: int) -> dict[str, Any] | None:
    done = [e for e in _progress(host.extra["sink"]) if e.get("done")]
    return done[-1] if len(done) > after else None


@pytest.mark.parametrize("impl", IMPLS)
def test_bulk_transfer_survives_relay_to_direct_and_back(pairlab: PairLab, impl: str) -> None:
    pairlab.reset()
    pairlab.rp.set_kind("udp-blocked")
    a, b = pairlab.pair(impl)
    total, rate = 3 * 1024 * 1024, 128 * 1024  # 24 s of stream
    seed = f"bulk-{impl}-{secrets.token_hex(4)}"
    finished_before = len([e for e in _progress(pairlab.q.extra["sink"]) if e.get("done")])
    started = time.monotonic()
    sender = pairlab.p.popen(
        [sys.executable, str(TOOLS), "send", f"{b.ipv4()}:{SINK_PORT}", "--socks", a.socks,
         "--bytes", str(total), "--rate", str(rate), "--seed", seed, "--every", "0.5"],
        log_name=f"send-{impl}",
    )  # fmt: skip
    phases: dict[str, float] = {}
    try:
        # 1. on DERP: bytes flow while UDP is blocked
        wait_for(lambda: _sink_bytes(pairlab.q) > 64 * 1024, 20, 0.1, "the first 64 KiB through DERP")
        assert a.path_to(b).kind == "derp", a.path_to(b)
        phases["first 64 KiB (DERP)"] = time.monotonic() - started
        on_derp = _sink_bytes(pairlab.q)
        # 2. UDP allowed: the path upgrades to direct, mid-stream
        pairlab.rp.set_kind("eim-apdf")
        changed = time.monotonic()
        _wait_path(a, b, "direct", 15, f"{a.name}'s path to {b.name} to turn direct")
        phases["relay -> direct"] = time.monotonic() - changed
        wait_for(lambda: _sink_bytes(pairlab.q) > on_derp + 64 * 1024, 10, 0.1, "64 KiB more, direct")
        on_direct = _sink_bytes(pairlab.q)
        # 3. the mapping is flushed and comes back symmetric: direct is dead, back to DERP
        pairlab.rp.set_kind("symmetric")
        changed = time.monotonic()
        _wait_path(a, b, "derp", 20, f"{a.name}'s path to {b.name} to fall back to DERP")
        phases["direct dead -> DERP"] = time.monotonic() - changed
        wait_for(
            lambda: _sink_bytes(pairlab.q) > on_direct + 64 * 1024, 20, 0.1, "64 KiB more, on DERP again"
        )
        # 4. the rest of the stream, and the digest
        done = wait_for(lambda: _sink_done(pairlab.q, finished_before), 60, 0.2, "the sink to finish")
    except (RigError, AssertionError):
        print(_log_text(sender), pairlab.logs(impl))
        raise
    finally:
        sender.wait(30) if sender.poll() is None else None
    sent = [e for e in _progress(sender) if e.get("done")]
    expected = hashlib.sha256(stream_bytes(seed.encode(), total)).hexdigest()
    print(f"{impl}: bulk transfer {total} bytes, phases (s from start / from the change): {phases}")
    assert sent and sent[-1]["sha256"] == expected
    assert done["bytes"] == total and done["sha256"] == expected, done


@pytest.mark.parametrize("impl", IMPLS)
def test_keepalives_hold_a_direct_path_through_a_30s_nat(pairlab: PairLab, impl: str) -> None:
    pairlab.reset()
    for router in (pairlab.rp, pairlab.rq):
        router.set_udp_timeouts(30, 30)
    a, b = pairlab.pair(impl)
    reflector = pairlab.lab.inet.popen(
        [sys.executable, str(TOOLS), "reflect", f"{SERVER_IPS[0]}:3479"], log_name="reflect"
    )
    wait_for(lambda: "listening" in _log_text(reflector), 10, 0.05, "the reflector")
    try:
        a.echo(b)
        _wait_path(a, b, "direct", 15, f"{a.name}'s path to {b.name} to turn direct")
        _wait_path(b, a, "direct", 5, f"{b.name}'s path to {a.name} to turn direct")
        direct = a.path_to(b).address
        # the control: a one-off UDP exchange from q, nothing after it
        pairlab.q.run([sys.executable, str(TOOLS), "probe", "--port", "45000", f"{SERVER_IPS[0]}:3479"])

        def peer_flow(router: Router) -> list[Any]:
            # the peers' flow: between this router's host and the other router's public address
            other = pairlab.rq if router is pairlab.rp else pairlab.rp
            return [e for e in router.conntrack() if other.wan_ip in (e.original[2], e.original[0])]

        def control_flow() -> list[Any]:
            return [e for e in pairlab.rq.conntrack() if e.original[1] == 45000]

        assert control_flow(), pairlab.rq.conntrack()
        silent_from = time.monotonic()
        control_gone_at = None
        samples = 0
        while time.monotonic() - silent_from < 40:
            time.sleep(1)
            samples += 1
            for router in (pairlab.rp, pairlab.rq):
                assert peer_flow(router), (
                    f"the peers' UDP flow left {router.name}'s conntrack after "
                    f"{time.monotonic() - silent_from:.0f} s of silence"
                )
            assert a.path_to(b).kind == "direct", a.path_to(b)
            if control_gone_at is None and not control_flow():
                control_gone_at = time.monotonic() - silent_from
        assert control_gone_at is not None and 25 <= control_gone_at <= 35, control_gone_at
        result = a.echo(b)
        assert a.path_to(b).kind == "direct" and a.path_to(b).address == direct
        print(
            f"{impl}: 40 s silent, path stayed direct ({direct}); the control flow expired after "
            f"{control_gone_at:.0f} s; echo after the silence {result['ttfb_s'] * 1000:.1f} ms"
        )
    except (RigError, AssertionError):
        print(pairlab.logs(impl))
        raise
    finally:
        reflector.terminate()
        for router in (pairlab.rp, pairlab.rq):
            router.set_udp_timeouts(30, 120)


@pytest.mark.parametrize("impl", IMPLS)
def test_relay_sees_only_ciphertext(pairlab: PairLab, impl: str) -> None:
    pairlab.reset()
    pairlab.rp.set_kind("udp-blocked")
    a, b = pairlab.pair(impl)
    marker = secrets.token_bytes(24)
    count = 200
    port = EMBEDMESH_DERP_LISTEN.rsplit(":", 1)[1]
    try:
        a.echo(b)
        assert a.path_to(b).kind == "derp", a.path_to(b)
        with (
            pairlab.lab.capture(pairlab.lab.inet, "br0", f"tcp port {port}") as relay_pcap,
            pairlab.lab.capture(pairlab.q.ns, "lo", f"tcp port {SINK_PORT}") as plain_pcap,
        ):
            out = pairlab.p.run(
                [sys.executable, str(TOOLS), "repeat", f"{b.ipv4()}:{SINK_PORT}", "--socks", a.socks,
                 "--marker", marker.hex(), "--count", str(count), "--pause", "0.005"],
                timeout=60,
            )  # fmt: skip
            assert json.loads(out.stdout.splitlines()[-1])["bytes"] == len(marker) * count
            time.sleep(0.5)
        relayed = relay_pcap.read_bytes()
        plain = plain_pcap.read_bytes()
    except (RigError, AssertionError):
        print(pairlab.logs(impl))
        raise
    assert plain.count(marker) >= count // 2, "the loopback capture should see the plaintext"
    assert len(relayed) > len(marker) * count, f"the relay capture holds only {len(relayed)} bytes"
    assert marker not in relayed
    assert marker[:12] not in relayed and marker[12:] not in relayed
    print(
        f"{impl}: relay capture {len(relayed)} bytes, no marker; loopback capture {plain.count(marker)} markers"
    )
