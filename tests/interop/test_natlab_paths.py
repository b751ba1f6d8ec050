"""Issue 10, "The NAT lab, with real peers": path changes under a live TCP stream, keepalives through
a 30-s NAT, and a relay that sees only ciphertext.

One lab for the module (control, DERP (`embedmesh derp serve`) and STUN on its internet); each
test builds its own pair of hosts, ``p`` and ``q``, and nodes on them, so no test inherits
another's NAT state or path history. Every test runs with tailscaled on both hosts (that proves
the rig against Tailscale's own client) and with embedmesh nodes (`embedmesh up`). Topologies:
``nat`` puts each host behind its own ``eim-apdf`` router (home routers: endpoint-independent
mapping, address-and-port-dependent filtering); ``public`` (bulk transfer only) makes ``p`` a
public host, so the direct path dies another way.

* Bulk transfer: ``p`` sends a paced, deterministic byte stream to ``q``'s sink. It starts on
  DERP (a firewall rule on a router drops UDP between the two, STUN still works), the rule goes
  (the path upgrades to direct, mid-stream), then the direct path dies: with ``nat`` ``p``'s
  router comes back ``symmetric`` (conntrack flushed, ``p``'s next packets mapped to new random
  ports that ``q``'s router filters out), with ``public`` ``q``'s router comes back
  ``udp-blocked``; traffic falls back to DERP. The sink's SHA-256 must equal the stream's, with
  bytes arriving in every phase.
* Keepalives: the routers' UDP timeouts are 30 s (``nf_conntrack_udp_timeout`` and the
  ``_stream`` one, so an assured flow gets no 120 s either); after a direct exchange the
  application is silent for 40 s. The peer-to-peer UDP flow must stay in the routers' conntrack
  the whole time, and the path direct, while a one-off UDP flow from the same host (the
  control) expires after 30 s.
* Ciphertext: with ``p`` behind ``udp-blocked``, a known random marker goes 200 times from ``p``
  to ``q`` through DERP; tcpdump on the internet bridge (the DERP server's host) captures the
  relay's TCP traffic, which must hold more bytes than were sent and no copy of the marker,
  while a capture of ``q``'s loopback (where the plaintext is delivered) holds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import natmatrix
import pytest
from natlab import (
    EMBEDMESH_DERP_LISTEN,
    SERVER_IPS,
    SINK_PORT,
    TOOLS,
    LabHost,
    LabPeer,
    LabTailnet,
    LabTailscaled,
    NatLab,
    Router,
    _log_text,
    skip_unless_natlab,
)
from natlab_tools import stream_bytes
from netns import RigError, wait_for

pytestmark = pytest.mark.interop

IMPLS = ("tailscaled", "embedmesh")


@dataclass
class Pair:
    """Two hosts of the lab and a node of one implementation on each."""

    p: LabHost
    q: LabHost
    a: LabPeer  # the node on p
    b: LabPeer  # the node on q
    impl: str

    @property
    def routers(self) -> list[Router]:
        return [r for h in (self.p, self.q) for r in h.routers]


class PathsLab:
    def __init__(self, lab: NatLab, net: LabTailnet) -> None:
        self.lab, self.net = lab, net
        self.pairs: list[Pair] = []

    def pair(
        self, impl: str, kind_p: str, kind_q: str, setup: Callable[[LabHost, LabHost], None] | None = None
    ) -> Pair:
        """Fresh hosts behind fresh routers (``setup(p, q)`` runs before the nodes start), and a
        node of ``impl`` on each, up, with the lab's services."""
        n = len(self.pairs)
        p = self.lab.host_behind(kind_p, f"p{n}")
        q = self.lab.host_behind(kind_q, f"q{n}")
        if setup is not None:
            setup(p, q)
        make: Callable[[LabHost], Any] = self.net.tailscaled if impl == "tailscaled" else self.net.embedmesh
        a, b = make(p), make(q)
        for node in (a, b):
            node.wait_up()
            node.start_services()
        pair = Pair(p, q, a, b, impl)
        self.pairs.append(pair)
        return pair

    def logs(self, pair: Pair) -> str:
        parts = [self.net.logs()]
        for node in (pair.a, pair.b):
            log = node.ts.log() if isinstance(node, LabTailscaled) else node.log()  # type: ignore[attr-defined]
            parts.append(f"----- {pair.impl} {node.name} -----\n" + "\n".join(log.splitlines()[-80:]))
        return "\n".join(parts)


#: One line per passed test for the docs: (test, implementation, topology, what was measured).
RESULTS: list[tuple[str, str, str, str]] = []
TITLE = "Path changes, keepalives and ciphertext"
INTRO = """\
`tests/interop/test_natlab_paths.py`: a fresh pair of hosts per test (``nat``: each behind its own
`eim-apdf` router; ``public``: the sender is a public host), control and `embedmesh derp serve`
on the lab's internet. The bulk transfer is 2 MiB at 128 KiB/s through the sender's SOCKS5
proxy into the receiver's sink; it starts on DERP (a firewall rule drops UDP between the two),
upgrades when the rule goes, and falls back when the NAT mapping is flushed and the direct path
is dead (``nat``: the sender's router comes back symmetric; ``public``: the receiver's router
comes back blocking UDP). Timings are from the change to the node's status showing the new path."""


def _report() -> None:
    if not RESULTS:
        return
    rows = ["| test | node | topology | result |", "|---|---|---|---|"]
    rows += [f"| {t} | {impl} | {topo} | {what} |" for t, impl, topo, what in RESULTS]
    text = "\n".join(rows)
    print(f"\n{TITLE}\n{text}")
    doc = os.environ.get(natmatrix.DOC_ENV)
    if doc:
        natmatrix.write_results(Path(doc), TITLE, INTRO, text, key_columns=3)


@pytest.fixture(scope="module")
def pathslab(tailscale_bins: Any, _swept: None) -> Iterator[PathsLab]:
    skip_unless_natlab()
    with NatLab() as lab:
        net = LabTailnet(lab, tailscale_bins, derp="embedmesh")
        state = PathsLab(lab, net)
        try:
            yield state
        finally:
            for pair in state.pairs:
                pair.a.close()  # type: ignore[attr-defined]
                pair.b.close()  # type: ignore[attr-defined]
            _report()


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
    """Bytes the host's sink has taken from its latest connection (each pair's sink serves
    one transfer), finished or not."""
    events = _progress(host.extra["sink"])
    for event in reversed(events):
        if "bytes" in event:
            return int(event["bytes"])
    return 0


def _sink_done(host: LabHost, after: int) -> dict[str, Any] | None:
    done = [e for e in _progress(host.extra["sink"]) if e.get("done")]
    return done[-1] if len(done) > after else None


# (An embedmesh node on a public address beside one behind a NAT is left to the simulator, which
# runs every such pair in milliseconds: the suite's time goes to the NAT cases.)
CASES = [
    pytest.param("tailscaled", "nat", id="tailscaled-nat"),
    pytest.param("embedmesh", "nat", id="embedmesh-nat"),
]


def _kinds(topology: str) -> tuple[str, str]:
    return ("eim-apdf", "eim-apdf") if topology == "nat" else ("none", "eim-apdf")


@pytest.mark.parametrize(("impl", "topology"), CASES)
def test_bulk_transfer_survives_relay_to_direct_and_back(
    pathslab: PathsLab, impl: str, topology: str
) -> None:
    # The firewall sits on a NATed host's router: p's for "nat", q's for "public".
    def firewall(p: LabHost, q: LabHost) -> None:
        host, other = (p, q) if topology == "nat" else (q, p)
        assert host.router is not None
        host.router.block_udp_with(other.public_ip)

    pair = pathslab.pair(impl, *_kinds(topology), setup=firewall)
    a, b = pair.a, pair.b
    walled = (pair.p if topology == "nat" else pair.q).router
    assert walled is not None
    total, rate = 2 * 1024 * 1024, 128 * 1024  # 16 s of stream
    seed = f"bulk-{impl}-{topology}-{secrets.token_hex(4)}"
    started = time.monotonic()
    sender = pair.p.popen(
        [sys.executable, str(TOOLS), "send", f"{b.ipv4()}:{SINK_PORT}", "--socks", a.socks,
         "--bytes", str(total), "--rate", str(rate), "--seed", seed, "--every", "0.5"],
        log_name=f"send-{impl}",
    )  # fmt: skip
    phases: dict[str, float] = {}
    try:
        # 1. on DERP: bytes flow while the firewall drops UDP between the two
        wait_for(lambda: _sink_bytes(pair.q) > 64 * 1024, 20, 0.1, "the first 64 KiB through DERP")
        assert a.path_to(b).kind == "derp", a.path_to(b)
        phases["first 64 KiB, on DERP"] = time.monotonic() - started
        on_derp = _sink_bytes(pair.q)
        # 2. the firewall opens: the path upgrades to direct, mid-stream
        walled.unblock_udp()
        changed = time.monotonic()
        _wait_path(a, b, "direct", 15, f"{a.name}'s path to {b.name} to turn direct")
        phases["relay -> direct"] = time.monotonic() - changed
        wait_for(lambda: _sink_bytes(pair.q) > on_derp + 64 * 1024, 10, 0.1, "64 KiB more, direct")
        on_direct = _sink_bytes(pair.q)
        # 3. the NAT mapping is flushed and the direct path is gone: back to DERP
        walled.set_kind("symmetric" if topology == "nat" else "udp-blocked")
        changed = time.monotonic()
        _wait_path(a, b, "derp", 20, f"{a.name}'s path to {b.name} to fall back to DERP")
        phases["direct dead -> DERP"] = time.monotonic() - changed
        # (TCP inside the tunnel retransmits with backoff while the path is dead: its next
        # retransmission after the fallback can be 10-20 s away)
        resumed = time.monotonic()
        wait_for(lambda: _sink_bytes(pair.q) > on_direct + 64 * 1024, 45, 0.1, "64 KiB more, on DERP again")
        phases["stream resumed on DERP"] = time.monotonic() - resumed
        # 4. the rest of the stream, and the digest
        done = wait_for(lambda: _sink_done(pair.q, 0), 60, 0.2, "the sink to finish")
    except (RigError, AssertionError):
        print(_log_text(sender), pathslab.logs(pair))
        raise
    finally:
        if sender.poll() is None:
            sender.wait(30)
    sent = [e for e in _progress(sender) if e.get("done")]
    expected = hashlib.sha256(stream_bytes(seed.encode(), total)).hexdigest()
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
    print(f"{impl} ({topology}): {total} bytes byte-exact; {timings}; all in {done['t']:.1f} s")
    assert sent and sent[-1]["sha256"] == expected
    assert done["bytes"] == total and done["sha256"] == expected, done
    RESULTS.append(("bulk transfer DERP → direct → DERP", impl, topology, f"byte-exact; {timings}"))


# embedmesh only: the test checks the rig itself (a one-off UDP flow from the same host expires
# at 30 s), and tailscaled's heartbeats are Go's, which embedmesh's follow.
@pytest.mark.parametrize(("impl", "topology"), [("embedmesh", "nat")])
def test_keepalives_hold_a_direct_path_through_a_30s_nat(
    pathslab: PathsLab, impl: str, topology: str
) -> None:
    def short_timeouts(p: LabHost, q: LabHost) -> None:
        for router in p.routers + q.routers:
            router.set_udp_timeouts(30, 30)

    pair = pathslab.pair(impl, *_kinds(topology), setup=short_timeouts)
    a, b = pair.a, pair.b
    reflector = pathslab.lab.inet.popen(
        [sys.executable, str(TOOLS), "reflect", f"{SERVER_IPS[0]}:{3480 + len(pathslab.pairs)}"],
        log_name="reflect",
    )
    wait_for(lambda: "listening" in _log_text(reflector), 10, 0.05, "the reflector")
    rq = pair.q.router
    assert rq is not None
    try:
        a.echo(b)
        _wait_path(a, b, "direct", 15, f"{a.name}'s path to {b.name} to turn direct")
        _wait_path(b, a, "direct", 5, f"{b.name}'s path to {a.name} to turn direct")
        direct = a.path_to(b).address
        # the control: a one-off UDP exchange from q, nothing after it
        pair.q.run([sys.executable, str(TOOLS), "probe", "--port", "45000",
                    f"{SERVER_IPS[0]}:{3480 + len(pathslab.pairs)}"])  # fmt: skip

        def peer_flow(router: Router) -> list[Any]:
            # the peers' flow: between this router's host and the other side's public address
            other = pair.q.public_ip if router in pair.p.routers else pair.p.public_ip
            return [e for e in router.conntrack() if other in (e.original[2], e.original[0])]

        def control_flow() -> list[Any]:
            return [e for e in rq.conntrack() if e.original[1] == 45000]

        assert control_flow(), rq.conntrack()
        silent_from = time.monotonic()
        control_gone_at = None
        while time.monotonic() - silent_from < 40:
            time.sleep(1)
            for router in pair.routers:
                assert peer_flow(router), (
                    f"the peers' UDP flow left {router.name}'s conntrack after "
                    f"{time.monotonic() - silent_from:.0f} s of silence"
                )
            path = a.path_to(b)
            assert path.kind == "direct", f"{path} after {time.monotonic() - silent_from:.0f} s of silence"
            if control_gone_at is None and not control_flow():
                control_gone_at = time.monotonic() - silent_from
        assert control_gone_at is not None and 25 <= control_gone_at <= 35, control_gone_at
        result = a.echo(b)
        assert a.path_to(b).kind == "direct" and a.path_to(b).address == direct
        what = (
            f"40 s silent, path stayed direct ({direct}); the control flow expired after "
            f"{control_gone_at:.0f} s; echo after the silence {result['ttfb_s'] * 1000:.1f} ms"
        )
        print(f"{impl} ({topology}): {what}")
        RESULTS.append(("keepalives through a 30-s NAT", impl, topology, what))
    except (RigError, AssertionError):
        print(pathslab.logs(pair))
        raise
    finally:
        reflector.terminate()


@pytest.mark.parametrize("impl", IMPLS)
def test_relay_sees_only_ciphertext(pathslab: PathsLab, impl: str) -> None:
    pair = pathslab.pair(impl, "udp-blocked", "eim-apdf")
    a, b = pair.a, pair.b
    marker = secrets.token_bytes(24)
    count = 200
    port = EMBEDMESH_DERP_LISTEN.rsplit(":", 1)[1]
    try:
        a.echo(b)
        assert a.path_to(b).kind == "derp", a.path_to(b)
        with (
            pathslab.lab.capture(pathslab.lab.inet, "br0", f"tcp port {port}") as relay_pcap,
            pathslab.lab.capture(pair.q.ns, "lo", f"tcp port {SINK_PORT}") as plain_pcap,
        ):
            out = pair.p.run(
                [sys.executable, str(TOOLS), "repeat", f"{b.ipv4()}:{SINK_PORT}", "--socks", a.socks,
                 "--marker", marker.hex(), "--count", str(count), "--pause", "0.005"],
                timeout=60,
            )  # fmt: skip
            assert json.loads(out.stdout.splitlines()[-1])["bytes"] == len(marker) * count
            time.sleep(0.5)
        relayed = relay_pcap.read_bytes()
        plain = plain_pcap.read_bytes()
    except (RigError, AssertionError):
        print(pathslab.logs(pair))
        raise
    assert plain.count(marker) >= count // 2, "the loopback capture should see the plaintext"
    assert len(relayed) > len(marker) * count, f"the relay capture holds only {len(relayed)} bytes"
    assert marker not in relayed
    assert marker[:12] not in relayed and marker[12:] not in relayed
    what = (
        f"relay capture (tcpdump on the internet bridge, DERP's port) {len(relayed)} bytes, no copy of "
        f"the 24-byte marker sent {count} times; {plain.count(marker)} copies on the receiver's loopback"
    )
    print(f"{impl}: {what}")
    RESULTS.append(("relays see only ciphertext", impl, "udp-blocked / eim-apdf", what))
